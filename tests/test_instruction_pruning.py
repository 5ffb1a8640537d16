"""Instruction-following pruning: masks keep the budget and differ across instructions (per packed sequence),
decoding with gathered weights equals the masked forward, decoding FLOPs per token drop with the active fraction
(from the compiled program's cost analysis), the predictor trains jointly with the model, refusals."""

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from axmini.config import ConfigValueError, map_configs
from axmini.decoding import generate
from axmini.experiments.decoders import DecoderShape, decoder_config
from axmini.layers.moe import MoE, MoEModifier
from axmini.layers.norm import RMSNorm
from axmini.layers.transformer import KVSharingModifier, TransformerLayer, to_pattern_stack
from axmini.lora import LoRA, LoRAModifier
from axmini.pruning.instruction import InstructionPrunedLayer, InstructionPruningModifier
from axmini.qat import QATModifier

V, D, L, F = 64, 32, 2, 64
PROMPT = 4


def dense(pattern=False):
    cfg = decoder_config(DecoderShape(V, D, L, 4, 2, F))
    return cfg.set(stack=to_pattern_stack(cfg.stack)) if pattern else cfg


def pruned(fraction=0.25, pattern=False):
    modifier = InstructionPruningModifier.default_config().set(active_fraction=fraction, prompt_length=PROMPT)
    return modifier.instantiate()(dense(pattern))


def layer(fraction=0.25):
    cfg = InstructionPrunedLayer.default_config().set(input_dim=D, active_fraction=fraction, prompt_length=PROMPT)
    cfg.self_attention.set(num_heads=4)
    cfg.feed_forward.set(hidden_dim=F)
    return cfg.instantiate(rngs=nnx.Rngs(0))


def test_masks_keep_the_budget_and_differ_across_instructions_one_per_packed_sequence():
    ffn_layer = layer()
    h = jax.random.normal(jax.random.key(0), (2, 10, D))
    positions = jnp.asarray([list(range(10)), [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]])  # Row 1 packs two sequences.
    segments = jnp.asarray([[1] * 10, [1] * 6 + [2] * 4])
    masks = np.asarray(ffn_layer.token_masks(h, positions, segments))
    assert masks.shape == (2, 10, F) and set(np.unique(masks)) == {0.0, 1.0}
    assert np.all(masks.sum(-1) == F // 4)  # The budget: k = active_fraction * F units per token.
    sequences = [masks[0, :], masks[1, :6], masks[1, 6:]]
    assert all(np.all(s == s[0]) for s in sequences)  # One mask per sequence.
    assert len({tuple(s[0]) for s in sequences}) == 3  # Three instructions, three masks.
    # A sequence's mask reads its own first PROMPT tokens only: changing the rest, or the other sequence, keeps it.
    changed = h.at[1, 4:6].set(0.0).at[1, 6:].multiply(-1.0).at[0, PROMPT:].set(1.0)
    np.testing.assert_array_equal(np.asarray(ffn_layer.token_masks(changed, positions, segments))[:, :6], masks[:, :6])


def with_transform(cfg, transform):
    """`cfg` with QAT or (trained-looking: B not zero) LoRA on every linear weight but the embedding and the head."""
    if transform == "qat":
        return QATModifier.default_config().set(bits=4).instantiate()(cfg).instantiate(rngs=nnx.Rngs(0))
    model = LoRAModifier.default_config().set(rank=2).instantiate()(cfg).instantiate(rngs=nnx.Rngs(0))
    for i, (_, adapter) in enumerate(m for m in nnx.iter_modules(model) if isinstance(m[1], LoRA)):
        adapter.b.set_value(jax.random.normal(jax.random.key(i), adapter.b.get_value().shape))
    return model


@pytest.mark.parametrize(
    "pattern, transform", [(False, None), (True, None), (False, "lora"), (True, "qat"), (False, "qat")]
)
def test_gathered_decoding_equals_the_masked_full_forward(pattern, transform):
    """Also under a weight transform: decoding gathers the weights as the layer reads them (transformed)."""
    cfg = pruned(pattern=pattern)
    model = cfg.instantiate(rngs=nnx.Rngs(0)) if transform is None else with_transform(cfg, transform)
    ids = jax.random.randint(jax.random.key(1), (2, 10), 1, V)
    full = nnx.jit(lambda m, x: m.forward(x).logits)(model, ids)
    step = nnx.jit(lambda m, x, p, c: m.forward(x, positions=p, cache=c))
    prompt = 6  # Longer than the instruction (PROMPT tokens): every token's mask comes from the same 4 tokens.
    out = step(model, ids[:, :prompt], jnp.broadcast_to(jnp.arange(prompt), (2, prompt)), model.init_cache(2, 10))
    decoded = [out.logits]
    for t in range(prompt, 10):
        out = step(model, ids[:, t : t + 1], jnp.full((2, 1), t), out.cache)
        decoded.append(out.logits)
    np.testing.assert_allclose(np.concatenate(decoded, axis=1), full, rtol=1e-5, atol=1e-5)
    # Layer 0's active units per row (a pattern stack's cache: per group, per layer, stacked over repeats).
    units = out.cache[0][0].units[0] if pattern else out.cache.units[0]
    assert units.shape == (2, F // 4) and not np.array_equal(units[0], units[1])


def test_generation_from_right_padded_prompts_matches_unpadded_generation_and_the_masked_forward():
    model = pruned().instantiate(rngs=nnx.Rngs(0))
    prompts = jax.random.randint(jax.random.key(4), (2, 6), 1, V)
    out = generate(model, prompts, prompt_lengths=jnp.asarray([6, 3]), max_new_tokens=3)
    # Row 0's prompt holds its whole instruction (PROMPT = 4 tokens): greedy decoding follows the masked forward.
    sequence = jnp.concatenate([prompts[0], out.tokens[0]])[None]
    greedy = jnp.argmax(nnx.jit(lambda m, x: m.forward(x).logits)(model, sequence)[0, 5:-1], axis=-1)
    np.testing.assert_array_equal(greedy, out.tokens[0])
    # Row 1's 3-token prompt is its whole instruction; the padding after it changes nothing.
    alone = generate(model, prompts[1:, :3], max_new_tokens=3)
    np.testing.assert_array_equal(alone.tokens[0], out.tokens[1])


def test_decoding_flops_per_token_drop_with_the_active_fraction():
    ids = jax.random.randint(jax.random.key(2), (2, 7), 1, V)

    def extend_flops(cfg):
        """FLOPs of one decoding step (one token per row) after a prefill, from XLA's cost analysis."""
        model = cfg.instantiate(rngs=nnx.Rngs(0))
        positions = jnp.broadcast_to(jnp.arange(6), (2, 6))
        prefill = nnx.jit(lambda m, x, p, c: m.forward(x, positions=p, cache=c).cache)
        cache = prefill(model, ids[:, :6], positions, model.init_cache(2, 8))
        graphdef, state = nnx.split(model)
        step = jax.jit(lambda s, x, p, c: nnx.merge(graphdef, s).forward(x, positions=p, cache=c).logits)
        return step.lower(state, ids[:, 6:], jnp.full((2, 1), 6), cache).compile().cost_analysis()["flops"]

    # XLA counts a scanned stack's loop body once: the layers counted are the pattern's.
    base = extend_flops(dense(pattern=True))
    counted = len(dense(pattern=True).stack.pattern)
    ffn = 2 * counted * 3 * 2 * D * F  # Rows x layers x matrices x FLOPs per multiply-add x D x F: the dense FFN's.
    for fraction in (0.25, 0.5):
        saved = base - extend_flops(pruned(fraction, pattern=True))
        # The FFN's matmuls shrink to `fraction` (its elementwise ops too, a few % more).
        assert saved / ffn == pytest.approx(1 - fraction, rel=0.06)


def test_the_predictor_trains_jointly_with_the_model():
    model = pruned().instantiate(rngs=nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(3), (4, 13), 1, V)
    batch = {"input_ids": ids[:, :-1], "target_ids": ids[:, 1:]}
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: m(batch)[0])(model)
        optimizer.update(model, grads)
        return loss, grads.stack.layers.predictor.w_out.get_value()

    loss, predictor_grad = step(model, optimizer)
    assert float(jnp.abs(predictor_grad).sum()) > 0  # The straight-through gradient reaches the predictor.
    losses = [float(step(model, optimizer)[0]) for _ in range(10)]
    assert losses[-1] < float(loss) - 0.5


def test_kv_sharing_moe_and_a_bad_budget_are_refused():
    sharing = KVSharingModifier.default_config().set(split=(1, 1)).instantiate()(dense())
    with pytest.raises(ConfigValueError, match=r"stack\.kv_sharing=\(1, 1\).*set it to None"):
        InstructionPruningModifier.default_config().instantiate()(sharing)
    moe = MoEModifier.default_config().set(moe=MoE.default_config().set(num_experts=4)).instantiate()(dense())
    with pytest.raises(ConfigValueError, match=r"feed_forward: instruction-following pruning masks the hidden units"):
        InstructionPruningModifier.default_config().instantiate()(moe).instantiate(rngs=nnx.Rngs(0))
    with pytest.raises(ConfigValueError, match=r"active_fraction=1.5 must be in \(0, 1\]"):
        layer(fraction=1.5)


def test_with_every_unit_active_the_layer_is_the_dense_layer_sandwich_norms_included():
    norms = dict(post_attention_norm=RMSNorm.default_config(), post_feed_forward_norm=RMSNorm.default_config())
    dense_cfg = map_configs(dense(), TransformerLayer, lambda c: c.set(**norms))
    modifier = InstructionPruningModifier.default_config().set(active_fraction=1.0, prompt_length=PROMPT)
    model = modifier.instantiate()(dense_cfg).instantiate(rngs=nnx.Rngs(0))
    plain = dense_cfg.instantiate(rngs=nnx.Rngs(1))
    values = dict(nnx.to_flat_state(nnx.state(model)))
    nnx.update(plain, nnx.from_flat_state([(path, values[path]) for path, _ in nnx.to_flat_state(nnx.state(plain))]))
    ids = jax.random.randint(jax.random.key(5), (2, 8), 1, V)
    forward = nnx.jit(lambda m, x: m.forward(x).logits)
    np.testing.assert_allclose(forward(model, ids), forward(plain, ids), rtol=1e-5, atol=1e-5)
