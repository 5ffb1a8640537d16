"""Decoder LM: forward vs a plain numpy model, loss/z-loss/metrics formulas, padding, sharding, bad input."""

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from axmini.config import ConfigValueError, find_configs
from axmini.layers.decoder import Decoder, MixedPrecisionModifier
from axmini.layers.linear import Linear
from axmini.layers.moe import ExpertChoiceGating, MoE, MoEModifier, TopKGating
from axmini.layers.position import RoPEModifier
from axmini.layers.transformer import RepeatedStack
from axmini.module import Layer, build_abstract, build_sharded, param_infos, sharding_context

VOCAB, DIM, HEADS, KV_HEADS, HIDDEN, THETA = 40, 16, 4, 2, 32, 100.0


def _config(*, num_layers=2, tied=True, kv_sharing=None, z_loss_weight=0.0) -> Decoder.Config:
    cfg = Decoder.default_config().set(vocab_size=VOCAB, dim=DIM, z_loss_weight=z_loss_weight)
    cfg.stack = RepeatedStack.default_config().set(num_layers=num_layers, kv_sharing=kv_sharing)
    cfg.stack.layer.self_attention.set(num_heads=HEADS, num_kv_heads=KV_HEADS)
    cfg.stack.layer.feed_forward.set(hidden_dim=HIDDEN)
    cfg.lm_head = None if tied else Linear.default_config()
    return RoPEModifier.default_config().set(theta=THETA).instantiate()(cfg)


@nnx.jit
def _forward(model, ids):
    return model.forward(ids).logits


@nnx.jit
def _loss(model, batch):
    return model(batch)


# ------------------------------------------------------------------------------------------------------
# An independent numpy model: pre-norm RMSNorm, RoPE (rotate-half), grouped-query causal attention,
# SwiGLU, final norm, tied or separate output; second-block layers reuse the provider layer's k/v.


def _np(a):
    return np.asarray(a, np.float64)


def _rms(x, scale, eps=1e-6):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _rope(x, positions):
    dh = x.shape[-1]
    freqs = THETA ** (-np.arange(0, dh, 2) / dh)
    angles = positions[:, :, None, None] * freqs
    x1, x2 = x[..., : dh // 2], x[..., dh // 2 :]
    return np.concatenate([x1 * np.cos(angles) - x2 * np.sin(angles), x2 * np.cos(angles) + x1 * np.sin(angles)], -1)


def _attention(q, k, v):
    t, h, dh = q.shape[1:]
    group = h // k.shape[2]
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(dh)
    logits = np.where(np.tril(np.ones((t, t), bool)), logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", probs, v)


def _silu(x):
    return x / (1 + np.exp(-x))


def _layer_weights(block, i):
    attn = block.self_attention
    proj = attn.input_linear.inner

    def get(p):
        return _np(p[...])[i]

    return dict(
        attn_norm=get(block.attention_norm.scale),
        q=get(proj.q),
        k=get(proj.k) if hasattr(proj, "k") else None,
        v=get(proj.v) if hasattr(proj, "v") else None,
        o=get(attn.output_linear.weight),
        ffn_norm=get(block.feed_forward_norm.scale),
        wi_0=get(block.feed_forward.wi_0),
        wi_1=get(block.feed_forward.wi_1),
        wo=get(block.feed_forward.wo),
    )


def _reference_logits(model, ids):
    b, t = ids.shape
    positions = np.broadcast_to(np.arange(t), (b, t)).astype(np.float64)
    table = _np(model.embedding.weight[...])
    x = table[np.asarray(ids)]
    stack = model.stack
    weights = [_layer_weights(stack.layers, i) for i in range(stack.num_kv_layers)]
    if stack.shared_kv_layers is not None:
        n_shared = stack.config.num_layers - stack.num_kv_layers
        weights += [_layer_weights(stack.shared_kv_layers, i) for i in range(n_shared)]
    shared_kv = None
    for i, w in enumerate(weights):
        h = _rms(x, w["attn_norm"])
        q = _rope(np.einsum("btd,dhk->bthk", h, w["q"]), positions)
        if w["k"] is not None:
            k = _rope(np.einsum("btd,dhk->bthk", h, w["k"]), positions)
            v = np.einsum("btd,dhk->bthk", h, w["v"])
            if i == stack.num_kv_layers - 1:
                shared_kv = (k, v)
        else:
            k, v = shared_kv
        x = x + np.einsum("bthk,hkd->btd", _attention(q, k, v), w["o"])
        h = _rms(x, w["ffn_norm"])
        x = x + (_silu(h @ w["wi_0"]) * (h @ w["wi_1"])) @ w["wo"]
    x = _rms(x, _np(model.output_norm.scale[...]))
    return x @ table.T if model.lm_head is None else x @ _np(model.lm_head.weight[...])


@pytest.mark.parametrize(("tied", "kv_sharing", "num_layers"), [(True, None, 2), (False, (1, 1), 2), (True, (2, 1), 3)])
def test_forward_matches_plain_numpy_model(tied, kv_sharing, num_layers):
    model = _config(tied=tied, kv_sharing=kv_sharing, num_layers=num_layers).instantiate(rngs=nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(1), (2, 7), 0, VOCAB)
    np.testing.assert_allclose(_forward(model, ids), _reference_logits(model, ids), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------------
# Loss and metrics.


@pytest.fixture(scope="module")
def model():
    return _config().instantiate(rngs=nnx.Rngs(0))


def _batch(pad_from=5):
    ids = np.asarray(jax.random.randint(jax.random.key(2), (2, 8), 1, VOCAB))
    targets = np.roll(ids, -1, axis=1)
    targets[0, pad_from:] = 0  # Row 0 is padded from `pad_from` on (pad_id = 0).
    return {"input_ids": jnp.asarray(ids), "target_ids": jnp.asarray(targets)}


def _np_log_softmax(logits):
    logits = _np(logits)
    return (
        logits
        - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1, keepdims=True))
        - logits.max(-1, keepdims=True)
    )


def test_loss_is_mean_cross_entropy_over_non_padding_targets(model):
    batch = _batch()
    loss, metrics = _loss(model, batch)
    logp = _np_log_softmax(_forward(model, batch["input_ids"]))
    targets = np.asarray(batch["target_ids"])
    mask = targets != 0
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(loss, nll[mask].mean(), rtol=1e-5, atol=1e-6)
    assert metrics["num_tokens"] == mask.sum() == 13
    np.testing.assert_allclose(metrics["accuracy"], (logp.argmax(-1) == targets)[mask].mean(), rtol=1e-6, atol=1e-7)


def test_padding_targets_do_not_change_the_loss(model):
    batch = _batch()
    other = dict(batch, target_ids=batch["target_ids"].at[1, :].set(0))  # Pad all of row 1 as well.
    loss_other, _ = _loss(model, other)
    # Same as computing row 0 alone.
    row0 = {k: v[:1] for k, v in batch.items()}
    loss_row0, metrics = _loss(model, row0)
    np.testing.assert_allclose(loss_other, loss_row0, rtol=1e-6, atol=1e-6)
    assert metrics["num_tokens"] == 5


def test_target_weights_replace_the_padding_mask(model):
    batch = _batch(pad_from=8)
    weights = np.zeros((2, 8), np.float32)
    weights[1, 2] = 3.0
    weights[0, 0] = 1.0
    loss, metrics = _loss(model, dict(batch, target_weights=jnp.asarray(weights)))
    logp = _np_log_softmax(_forward(model, batch["input_ids"]))
    nll = -np.take_along_axis(logp, np.asarray(batch["target_ids"])[..., None], -1)[..., 0]
    np.testing.assert_allclose(loss, (nll * weights).sum() / weights.sum(), rtol=1e-5, atol=1e-6)
    assert metrics["num_tokens"] == 4.0


def test_segment_zero_targets_do_not_count(model):
    batch = _batch(pad_from=8)
    segments = jnp.ones((2, 8), jnp.int32).at[1, 6:].set(0)
    _, metrics = _loss(model, dict(batch, segment_ids=segments))
    assert metrics["num_tokens"] == 14


def test_z_loss_matches_its_formula():
    weight = 1e-2
    model = _config(z_loss_weight=weight).instantiate(rngs=nnx.Rngs(0))
    batch = _batch()
    loss, metrics = _loss(model, batch)
    logits = _np(_forward(model, batch["input_ids"]))
    log_z = np.log(np.sum(np.exp(logits), axis=-1))
    mask = np.asarray(batch["target_ids"]) != 0
    np.testing.assert_allclose(metrics["z_loss"], weight * np.mean(log_z[mask] ** 2), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(loss, metrics["cross_entropy"] + metrics["z_loss"], rtol=1e-6, atol=1e-6)
    assert metrics["z_loss"] > 0


# ------------------------------------------------------------------------------------------------------
# Sharding.


def test_sharded_loss_matches_single_device():
    cfg = _config(kv_sharing=(1, 1))
    mesh = jax.make_mesh((4, 2), ("fsdp", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    rules = [("batch", "fsdp"), ("embed", "fsdp"), ("vocab", "model"), ("mlp", "model"), ("heads", "model")]
    rules += [("kv_heads", "model")]
    sharded = build_sharded(cfg, mesh, rules, seed=0)
    single = cfg.instantiate(rngs=nnx.Rngs(0))
    wi = sharded.stack.layers.feed_forward.wi_0[...]
    assert wi.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "model")

    ids = np.asarray(jax.random.randint(jax.random.key(3), (4, 8), 1, VOCAB))
    batch = {"input_ids": jnp.asarray(ids), "target_ids": jnp.asarray(np.roll(ids, -1, axis=1))}
    with sharding_context(mesh, rules):
        sharded_loss, _ = nnx.jit(lambda m, b: m(b))(sharded, batch)
    sharded_loss = sharded_loss.block_until_ready()
    single_loss, _ = _loss(single, batch)
    np.testing.assert_allclose(sharded_loss, single_loss, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"vocab_size": 0}, r"^vocab_size=0 must be positive"),
        ({"pad_id": 40}, r"^pad_id=40 is not a token id of vocab_size=40"),
        ({"z_loss_weight": -1.0}, r"^z_loss_weight=-1.0 must be >= 0"),
    ],
)
def test_bad_decoder_config_is_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        _config().set(**fields).instantiate(rngs=nnx.Rngs(0))


@pytest.mark.parametrize(
    ("conflict", "message"),
    [
        (lambda c: c.embedding.set(dim=8), r"^embedding\.dim=8 conflicts with dim=16, which sets it;"),
        (lambda c: c.stack.set(input_dim=8), r"^stack\.input_dim=8 conflicts with dim=16, which sets it;"),
        (lambda c: c.output_norm.set(input_dim=8), r"^output_norm\.input_dim=8 conflicts with dim=16"),
        (lambda c: c.lm_head.set(output_dim=8), r"^lm_head\.output_dim=8 conflicts with vocab_size=40"),
        (
            lambda c: c.lm_head.set(axes=("mlp", "embed")),
            r"^lm_head\.axes=\('mlp', 'embed'\) conflicts with \('embed', 'vocab'\) required by Decoder;",
        ),
    ],
)
def test_a_child_dim_that_conflicts_with_the_decoder_is_refused(conflict, message):
    cfg = _config(tied=False)
    conflict(cfg)
    with pytest.raises(ConfigValueError, match=message):
        cfg.instantiate(rngs=nnx.Rngs(0))


def test_forward_with_a_cache_needs_positions(model):
    with pytest.raises(ValueError, match="with a cache, pass the positions"):
        model.forward(jnp.zeros((1, 1), jnp.int32), cache=model.init_cache(1, 4))


def test_separate_lm_head_has_vocab_axis():
    model = _config(tied=False).instantiate(rngs=nnx.Rngs(0))
    assert model.lm_head.weight.get_metadata()["axes"] == ("embed", "vocab")
    assert model.lm_head.weight.shape == (DIM, VOCAB)


def test_expert_choice_routing_is_refused_in_a_causal_decoder():
    moe = MoE.default_config().set(num_experts=4, gating=ExpertChoiceGating.default_config())
    cfg = MoEModifier.default_config().set(moe=moe).instantiate()(_config())
    with pytest.raises(
        ValueError, match=r"stack\.layer\.feed_forward\.gating: ExpertChoiceGating is not causal.*TopKGating"
    ):
        build_abstract(cfg)
    token_choice = moe.clone(gating=TopKGating.default_config())
    build_abstract(MoEModifier.default_config().set(moe=token_choice).instantiate()(_config()))


# ------------------------------------------------------------------------------------------------------
# Mixed precision.


def _mixed(param_dtype, compute_dtype, output_dtype):
    modifier = MixedPrecisionModifier.default_config().set(
        param_dtype=param_dtype, compute_dtype=compute_dtype, output_dtype=output_dtype
    )
    return modifier.instantiate()(_config(tied=False))


def test_mixed_precision_modifier_sets_every_layer_and_the_decoder():
    cfg = _mixed(jnp.bfloat16, jnp.bfloat16, jnp.bfloat16)
    assert {layer.param_dtype for _, layer in find_configs(cfg, Layer.matches)} == {jnp.bfloat16}
    assert (cfg.dtype, cfg.output_dtype) == (jnp.bfloat16, jnp.bfloat16)
    assert {info.dtype for info in param_infos(build_abstract(cfg))} == {"bfloat16"}


@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16])
def test_bfloat16_compute_keeps_float32_loss_close_to_float32(param_dtype):
    reference = _config(tied=False).instantiate(rngs=nnx.Rngs(0))
    mixed = build_abstract(_mixed(param_dtype, jnp.bfloat16, jnp.bfloat16))
    nnx.update(mixed, jax.tree.map(lambda a: a.astype(param_dtype), nnx.state(reference)))
    batch = _batch()
    logits = _forward(mixed, batch["input_ids"])
    (loss, metrics), (want, _) = _loss(mixed, batch), _loss(reference, batch)
    assert logits.dtype == jnp.bfloat16 and loss.dtype == metrics["cross_entropy"].dtype == jnp.float32
    np.testing.assert_allclose(loss, want, rtol=2e-2, atol=2e-2)
