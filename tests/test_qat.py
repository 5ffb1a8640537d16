"""Quantization-aware training: levels, straight-through gradients, scales, packing, export -> load, QAT vs PTQ."""

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import sentencepiece as spm

from axmini.decoding import generate
from axmini.layers.weight_transform import refresh_weight_transforms, transformed_weights
from axmini.qat import (
    CLIP_RATIOS,
    FakeQuantization,
    QATModifier,
    export_quantized,
    fake_quantize,
    initial_scale,
    load_quantized,
    pack_codes,
    unpack_codes,
)
from experiments.decoders import tiny_decoder
from experiments.lm import tiny


def reference_fake_quantize(w, scale, bits):
    """Plain numpy: the nearest of the 2^b balanced levels (k + 1/2) * scale, k = -2^(b-1) .. 2^(b-1) - 1."""
    half = 2 ** (bits - 1)
    levels = (np.arange(-half, half) + 0.5)[:, None, None] * scale
    nearest = np.argmin(np.abs(w[None] - levels), axis=0)
    return (nearest - half + 0.5) * scale


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_fake_quantization_matches_a_numpy_reference(bits):
    rng = np.random.default_rng(bits)
    w = rng.standard_normal((64, 8)).astype(np.float32)
    scale = (0.2 + rng.random((1, 8))).astype(np.float32) * 2.0 / 2**bits
    got = np.asarray(fake_quantize(jnp.asarray(w), jnp.asarray(scale), bits))
    np.testing.assert_allclose(got, reference_fake_quantize(w, scale, bits), rtol=1e-6, atol=1e-6)


def test_two_bit_fake_quantization_has_exactly_four_balanced_levels_per_channel():
    cfg = QATModifier.default_config().set(bits=2).instantiate()(tiny_decoder())
    model = cfg.instantiate(rngs=nnx.Rngs(0))
    for item in transformed_weights(model, FakeQuantization):
        value = np.asarray(item.value())  # [layers, ...] with the per-channel scale broadcast over the inputs.
        scale = np.exp(np.asarray(item.transform.log_scale[...]))
        levels = value / scale
        inputs = tuple(1 + i for i in item.transform.roles.inputs)
        assert np.all(np.isin(np.round(levels, 4), [-1.5, -0.5, 0.5, 1.5])), item.path
        flat = np.moveaxis(levels, inputs, range(-len(inputs), 0)).reshape(
            *levels.shape[:1], -1, np.prod([levels.shape[i] for i in inputs])
        )
        counts = {len(np.unique(np.round(channel, 4))) for row in flat for channel in row}
        assert counts == {4}, (item.path, item.name, counts)


def test_gradients_pass_straight_through_inside_the_clip_range_and_are_zero_outside():
    bits, scale = 2, jnp.asarray([[0.5]])  # Clip range |w| <= 2^(b-1) * scale = 1.0.
    w = jnp.asarray([[-1.7], [-1.0], [-0.3], [0.0], [0.6], [0.99], [1.2], [3.0]])
    upstream = jnp.arange(1.0, 9.0)[:, None]
    grad_w, grad_s = jax.grad(lambda w, s: jnp.sum(fake_quantize(w, s, bits) * upstream), argnums=(0, 1))(w, scale)
    inside = np.abs(np.asarray(w)) <= 1.0
    np.testing.assert_array_equal(np.asarray(grad_w), np.where(inside, np.asarray(upstream), 0.0))
    # The scale's gradient (LSQ): level - w / scale inside the range, the clipped level outside.
    level = np.asarray(fake_quantize(w, scale, bits)) / 0.5
    expected = np.sum(np.asarray(upstream) * np.where(inside, level - np.asarray(w) / 0.5, level))
    np.testing.assert_allclose(np.asarray(grad_s), [[expected]], rtol=1e-6, atol=1e-6)


def test_initial_scale_is_the_clip_ratio_with_the_least_squared_error():
    w = np.random.default_rng(0).standard_normal((128, 6)).astype(np.float32)
    scale = np.asarray(initial_scale(jnp.asarray(w), (0,), 2))
    top = np.abs(w).max(axis=0, keepdims=True) / 2
    candidates = [top * r for r in np.linspace(1 / CLIP_RATIOS, 1, CLIP_RATIOS)]
    errors = np.stack([np.sum((reference_fake_quantize(w, c, 2) - w) ** 2, axis=0) for c in candidates])
    np.testing.assert_allclose(
        scale[0], np.stack(candidates)[np.argmin(errors, axis=0), 0, np.arange(6)], rtol=1e-5, atol=1e-7
    )
    assert np.all(scale < top)  # At 2 bits the best scale clips the tails of a Gaussian.


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_codes_pack_into_8_over_bits_per_byte_and_unpack_exactly(bits):
    codes = np.random.default_rng(bits).integers(0, 2**bits, size=(7, 5, 3), dtype=np.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == np.uint8 and packed.size == -(-codes.size * bits // 8)
    np.testing.assert_array_equal(unpack_codes(packed, bits, codes.shape), codes)


def test_export_then_load_decodes_bit_identically(tmp_path):
    cfg = QATModifier.default_config().instantiate()(tiny_decoder())
    model = cfg.instantiate(rngs=nnx.Rngs(1))
    manifest = export_quantized(model, tmp_path / "q.npz")
    loaded = load_quantized(cfg, tmp_path / "q.npz")
    assert not transformed_weights(loaded)  # A plain model: dequantized weights, no fake quantization.
    assert {w["bits"] for w in manifest["weights"].values()} == {2}
    with np.load(tmp_path / "q.npz") as data:  # Four 2-bit codes per byte, besides a float32 scale per channel.
        for key, weight in manifest["weights"].items():
            assert data[f"codes:{key}"].dtype == np.uint8 and data[f"codes:{key}"].size == np.prod(weight["shape"]) // 4
    prompts = jnp.asarray([[0, 5, 9, 2], [0, 7, 7, 1]])
    logits = [nnx.jit(lambda m: m.forward(prompts).logits)(m) for m in (model, loaded)]
    np.testing.assert_array_equal(np.asarray(logits[0]), np.asarray(logits[1]))
    tokens = [
        generate(m, prompts, max_new_tokens=12, temperature=1.0, rng=jax.random.key(3)).tokens for m in (model, loaded)
    ]
    np.testing.assert_array_equal(np.asarray(tokens[0]), np.asarray(tokens[1]))


def test_loading_an_export_into_another_model_is_refused(tmp_path):
    cfg = QATModifier.default_config().instantiate()(tiny_decoder())
    export_quantized(cfg.instantiate(rngs=nnx.Rngs(0)), tmp_path / "q.npz")
    other = tiny_decoder()
    other.stack.num_layers = 3
    with pytest.raises(ValueError, match="export it from this model"):
        load_quantized(other, tmp_path / "q.npz")


def _windows(path, vocab, count, length, seed):
    """`count` random windows of `length` + 1 tokens of a corpus file (SentencePiece ids, EOS between lines)."""
    ids = np.concatenate([[*vocab.encode(line), vocab.eos_id()] for line in path.read_text().splitlines()[:3000]])
    starts = np.random.default_rng(seed).integers(0, len(ids) - length - 1, size=count)
    return np.stack([ids[s : s + length + 1] for s in starts]).astype(np.int32)


def _lm_batch(windows):
    return {"input_ids": jnp.asarray(windows[:, :-1]), "target_ids": jnp.asarray(windows[:, 1:])}


def _train(model, batches, steps, lr):
    """`steps` Adam steps on `batches` (cycled): a plain loop, so the test measures quantization, not a trainer."""
    optimizer = nnx.Optimizer(model, optax.adam(lr), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, batch):
        loss, grads = nnx.value_and_grad(lambda m: m(batch)[0])(model)
        optimizer.update(model, grads)
        return loss

    for i in range(steps):
        step(model, optimizer, batches[i % len(batches)])
    return model


def _with_qat(model, cfg):
    """The model of `cfg` with QAT, holding `model`'s weights, its scales started from them (as `init_from` does)."""
    quantized = QATModifier.default_config().instantiate()(cfg).instantiate(rngs=nnx.Rngs(0))
    nnx.update(quantized, nnx.state(model, nnx.Param))
    refresh_weight_transforms(quantized)
    return quantized


def test_qat_fine_tune_of_tiny_ends_below_post_training_quantization():
    from axmini.trainer import corpus

    vocab = spm.SentencePieceProcessor(model_file=str(corpus.prepare_vocab()))
    files = corpus.prepare_corpus()
    train = [_lm_batch(w) for w in np.split(_windows(files.train, vocab, 16 * 40, 32, 0), 40)]
    evaluate = nnx.jit(lambda m, b: m(b)[0])
    held_out = _lm_batch(_windows(files.validation, vocab, 64, 64, 1))
    cfg = tiny().model
    base = _train(cfg.instantiate(rngs=nnx.Rngs(0)), train, 200, 1e-2)
    fine_tune = 100
    ptq = evaluate(_with_qat(base, cfg), held_out)  # Post-training quantization of the base model at 2 bits.
    qat = evaluate(_train(_with_qat(base, cfg), train, fine_tune, 1e-3), held_out)
    # The same further steps in float, quantized after training.
    float_more = _train(nnx.clone(base), train, fine_tune, 1e-3)
    ptq_after = evaluate(_with_qat(float_more, cfg), held_out)
    float_loss = evaluate(base, held_out)
    print(f"float {float_loss:.3f} PTQ {ptq:.3f} float+{fine_tune} then PTQ {ptq_after:.3f} QAT {qat:.3f}")
    assert ptq > float_loss  # 2 bits cost the trained model...
    assert qat < ptq - 0.02  # ...a QAT fine-tune wins more than that back,
    assert qat < ptq_after - 0.01  # more than the same training in float followed by quantization does.
