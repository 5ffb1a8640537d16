"""RAttention against an independent reference; branch coverage, decoding, gradients, sharding, modifier, training."""

import math

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from axmini.config import ConfigValueError, find_configs
from axmini.experiments.decoders import rattention_variant
from axmini.layers.attention import KV, Attention, KVCache, QueryOnlyProjection
from axmini.layers.decoder import Decoder
from axmini.layers.feed_forward import FeedForward
from axmini.layers.linear_attention import FeatureMap
from axmini.layers.position import RoPEModifier, RoPEProjection, apply_rope
from axmini.layers.rattention import (
    RAttention,
    RAttentionCache,
    RAttentionLayout,
    RAttentionModifier,
)
from axmini.layers.transformer import PatternStack, RepeatedStack, TransformerLayer
from axmini.module import build_sharded, sharding_context

D, H, K, DH = 16, 4, 2, 8
THETA = 100.0


def rattention_config(**fields) -> RAttention.Config:
    cfg = RAttention.default_config().set(
        **{"input_dim": D, "num_heads": H, "num_kv_heads": K, "head_dim": DH, "sliding_window": 3, "chunk_size": 4}
    )
    cfg.input_linear = RoPEProjection.default_config().set(theta=THETA)
    return cfg.set(**fields)


def build(cfg: RAttention.Config, seed: int = 0) -> RAttention:
    layer = cfg.instantiate(rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)  # Non-trivial norm scales, so a swapped norm would show.
    for norm in (layer.window_norm, layer.linear_norm):
        norm.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, size=layer.head_dim), jnp.float32)
    return layer


def weights(layer: RAttention) -> dict[str, jax.Array]:
    p = layer.input_linear.inner
    return {
        "q": p.q[...],
        "k": p.k[...],
        "v": p.v[...],
        "o": layer.output_linear.weight[...],
        "window_scale": layer.window_norm.scale[...],
        "linear_scale": layer.linear_norm.scale[...],
    }


def reference(w, x, positions, segment_ids, window, feature_map=FeatureMap.SOFTMAX_PAIR):
    """RAttention from its definition, by position: dense masks over all (query, key) pairs."""
    q, k, v = (jnp.einsum("btd,dnh->btnh", x, w[n]) for n in ("q", "k", "v"))
    qr, kr = apply_rope(q, positions, theta=THETA), apply_rope(k, positions, theta=THETA)
    k, v, kr = (jnp.repeat(a, H // K, axis=2) for a in (k, v, kr))
    seg = jnp.ones_like(positions) if segment_ids is None else segment_ids
    pi, pj = positions[:, :, None], positions[:, None, :]
    same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] != 0) & (seg[:, None, :] != 0)
    in_window = same & (pj <= pi) & (pi - pj <= window)
    left_of_window = same & (pj <= pi - window - 1)

    logits = jnp.einsum("bihd,bjhd->bhij", qr, kr) / math.sqrt(DH)
    logits = jnp.where(in_window[:, None], logits, -jnp.inf)
    probs = jnp.exp(logits - jnp.max(logits, -1, keepdims=True))
    probs = jnp.where(in_window[:, None], probs, 0.0)
    probs = probs / jnp.maximum(probs.sum(-1, keepdims=True), 1e-30)
    window_out = jnp.einsum("bhij,bjhd->bihd", probs, v)

    def phi(a):
        if feature_map is FeatureMap.RELU:
            return jnp.maximum(a, 0.0)
        e, f = jnp.exp(a - a.max(-1, keepdims=True)), jnp.exp(-a - (-a).max(-1, keepdims=True))
        return jnp.concatenate([e / e.sum(-1, keepdims=True), f / f.sum(-1, keepdims=True)], -1)

    scores = jnp.einsum("bihf,bjhf->bhij", phi(q), phi(k)) * left_of_window[:, None]
    linear_out = jnp.einsum("bhij,bjhd->bihd", scores, v)

    def rms(a, scale):
        return a / jnp.sqrt(jnp.mean(a * a, -1, keepdims=True) + 1e-6) * scale

    out = rms(window_out, w["window_scale"]) + rms(linear_out, w["linear_scale"])
    return jnp.einsum("bthd,hdo->bto", out, w["o"])


def packed_inputs(length=14, seed=0):
    """Row 0: two packed sequences (positions restart) then padding; row 1: one sequence."""
    x = jax.random.normal(jax.random.key(seed), (2, length, D))
    cut, pad = 6, length - 2
    seg = np.ones((2, length), np.int32)
    seg[0, cut:pad], seg[0, pad:] = 2, 0
    pos = np.tile(np.arange(length), (2, 1))
    pos[0, cut:] -= cut
    return x, jnp.asarray(pos, jnp.int32), jnp.asarray(seg)


@pytest.mark.parametrize(("window", "chunk_size"), [(5, 2), (1, 16)])
def test_forward_matches_reference(window, chunk_size):
    layer = build(rattention_config(sliding_window=window, chunk_size=chunk_size))
    x, pos, seg = packed_inputs()
    out = jax.jit(lambda x, p, s: layer(x, positions=p, segment_ids=s).output)(x, pos, seg)
    want = jax.jit(reference, static_argnums=4)(weights(layer), x, pos, seg, window)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=2e-4, atol=2e-5)
    assert np.all(np.asarray(out)[0, -2:] == 0), "padding tokens attend nothing"


def test_each_earlier_token_seen_by_exactly_one_branch():
    """x = one-hot token index and v = identity: a branch's output is positive exactly on the keys it saw."""
    length, window = 16, 4
    cfg = rattention_config(input_dim=length, num_kv_heads=1, head_dim=length, sliding_window=window, chunk_size=3)
    layer = build(cfg)
    layer.input_linear.inner.v[...] = jnp.eye(length)[:, None, :]
    x = jnp.broadcast_to(jnp.eye(length), (2, length, length))
    seg = jnp.asarray(np.r_[[1] * 7 + [2] * 9, [1] * 16].reshape(2, length))
    pos = jnp.asarray(np.r_[np.arange(7), np.arange(9), np.arange(16)].reshape(2, length))
    out = jax.jit(lambda x: layer.branches(x, positions=pos, segment_ids=seg))(x)
    by_window, by_linear = np.asarray(out.window[:, :, 0] > 0), np.asarray(out.linear[:, :, 0] > 0)
    i, j = np.arange(length)[:, None], np.arange(length)[None, :]
    earlier = (j <= i)[None] & (np.asarray(seg)[:, :, None] == np.asarray(seg)[:, None, :])
    assert not np.any(by_window & by_linear)
    np.testing.assert_array_equal(by_window | by_linear, earlier)
    for query in range(window + 1, length):  # The boundary, on the one-segment row.
        assert by_window[1, query, query - window] and not by_linear[1, query, query - window]
        assert by_linear[1, query, query - window - 1] and not by_window[1, query, query - window - 1]


def test_window_covering_sequence_leaves_linear_branch_silent():
    layer = build(rattention_config(sliding_window=14))
    x, pos, seg = packed_inputs(length=14)
    out = jax.jit(lambda x: layer.branches(x, positions=pos, segment_ids=seg))(x)
    assert np.all(np.asarray(out.linear) == 0.0) and np.any(np.asarray(out.window) != 0.0)


def test_decode_matches_forward():
    """Prefill of a 7-token prompt padded to 9 (row 0: two trailing tokens at position -1; rows 1, 2: two
    tokens of segment 0 on the right, on the left), then one-token extends, give the forward's outputs."""
    layer = build(rattention_config(sliding_window=3, chunk_size=2))
    length, prompt = 12, 7
    x = jax.random.normal(jax.random.key(3), (3, length, D))
    pos = jnp.broadcast_to(jnp.arange(length), (3, length))
    want = np.asarray(jax.jit(lambda x: layer(x, positions=pos).output)(x))

    junk, zeros, ones = jnp.full((2, D), 7.0), np.zeros(2, np.int32), np.ones(2, np.int32)
    ppos, pseg = np.arange(prompt), np.ones(prompt, np.int32)
    rows = [  # (x, positions, segment ids) of each row's prompt
        (jnp.concatenate([x[0, :prompt], junk]), np.r_[ppos, -ones], np.r_[pseg, ones]),
        (jnp.concatenate([x[1, :prompt], junk]), np.r_[ppos, zeros], np.r_[pseg, zeros]),
        (jnp.concatenate([junk, x[2, :prompt]]), np.r_[zeros, ppos], np.r_[zeros, pseg]),
    ]
    px, ppos, pseg = (jnp.stack(parts) for parts in zip(*rows))

    step = jax.jit(lambda x, p, s, c: layer(x, positions=p, segment_ids=s, cache=c))
    out = step(px, ppos, pseg, layer.init_cache(3, 64))
    prefilled = np.asarray(out.output)[np.asarray((pseg == 1) & (ppos >= 0))].reshape(3, prompt, D)
    np.testing.assert_allclose(prefilled, want[:, :prompt], rtol=1e-4, atol=1e-5)
    cache = out.cache
    for t in range(prompt, length):
        out = step(x[:, t : t + 1], pos[:, t : t + 1], jnp.ones((3, 1), jnp.int32), cache)
        cache = out.cache
        np.testing.assert_allclose(np.asarray(out.output)[:, 0], want[:, t], rtol=1e-4, atol=1e-5)


def test_decode_state_does_not_grow_with_length():
    layer = build(rattention_config(sliding_window=3))
    small, large = layer.init_cache(1, 16), layer.init_cache(1, 1_000_000)
    shapes = jax.tree.map(jnp.shape, small)
    assert shapes == jax.tree.map(jnp.shape, large)
    assert shapes.state.state == (1, K, 2 * DH, DH) and shapes.window.k == (1, 4, K, DH)
    step = jax.jit(lambda x, p, c: layer(x, positions=p, cache=c).cache)
    cache = small
    for t in range(10):
        cache = step(jnp.ones((1, 1, D)), jnp.full((1, 1), t, jnp.int32), cache)
    assert jax.tree.map(jnp.shape, cache) == shapes
    np.testing.assert_array_equal(cache.window.positions, [[6, 7, 8, 9]])


def test_gradients_match_reference():
    layer = build(rattention_config(sliding_window=2, chunk_size=3, state_checkpoint_every=2))
    x, pos, seg = packed_inputs(length=11, seed=5)
    cot = jax.random.normal(jax.random.key(9), (2, 11, D))
    graphdef, state = nnx.split(layer)

    def loss(state, x):
        return jnp.sum(nnx.merge(graphdef, state)(x, positions=pos, segment_ids=seg).output * cot)

    def loss_reference(w, x):
        return jnp.sum(reference(w, x, pos, seg, 2) * cot)

    got_state, got_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(state, x)
    want_w, want_x = jax.jit(jax.grad(loss_reference, argnums=(0, 1)))(weights(layer), x)
    np.testing.assert_allclose(got_x, want_x, rtol=2e-4, atol=2e-5)
    got_w = weights(nnx.merge(graphdef, got_state))
    for name in want_w:
        np.testing.assert_allclose(got_w[name], want_w[name], rtol=2e-4, atol=2e-5, err_msg=name)


def test_sharded_matches_single_device():
    cfg = rattention_config(num_heads=4, num_kv_heads=4, head_dim=4)
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    rules = [("batch", "data"), ("heads", "model"), ("kv_heads", "model"), ("embed", None), ("head_dim", None)]
    x, pos, seg = packed_inputs()
    single = build(cfg)
    want = jax.jit(lambda x: single(x, positions=pos, segment_ids=seg).output)(x)
    graphdef, state = nnx.split(build_sharded(cfg, mesh, rules))
    # The single-device weights (random norm scales included), placed as the sharded build placed its own.
    state = jax.tree.map(lambda new, old: jax.device_put(old, new.sharding), state, nnx.state(single))
    sharded = nnx.merge(graphdef, state)
    assert sharded.input_linear.inner.q[...].sharding.spec == jax.P(None, "model", None)

    @jax.jit
    def forward(x):
        with sharding_context(mesh, rules):
            return sharded(x, positions=pos, segment_ids=seg).output

    got = forward(jax.device_put(x, jax.NamedSharding(mesh, jax.P("data"))))
    got.block_until_ready()
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def tiny_decoder(num_layers: int = 2, stack=RepeatedStack) -> Decoder.Config:
    attention = Attention.default_config().set(num_heads=2)
    layer = TransformerLayer.default_config().set(
        self_attention=attention, feed_forward=FeedForward.default_config().set(hidden_dim=32)
    )
    stack = stack.default_config().set(num_layers=num_layers)
    stack = stack.set(layer=layer) if isinstance(stack, RepeatedStack.Config) else stack.set(pattern=[layer])
    cfg = Decoder.default_config().set(vocab_size=32, dim=16, stack=stack)
    return RoPEModifier.default_config().instantiate()(cfg)


@pytest.mark.parametrize(("stack", "path"), [(RepeatedStack, "layer"), (PatternStack, "pattern[0]")])
def test_modifier_turns_every_attention_into_rattention(stack, path):
    base = tiny_decoder(stack=stack)
    cfg = RAttentionModifier.default_config().set(sliding_window=3).instantiate()(base)
    assert not find_configs(cfg, Attention)
    (found, attention), *rest = find_configs(cfg, RAttention)
    assert not rest and found == f"stack.{path}.self_attention"
    assert attention.sliding_window == 3 and attention.num_heads == 2
    assert isinstance(attention.input_linear, RoPEProjection.Config), "shared fields (the RoPE slot) carry over"
    assert find_configs(base, Attention), "the modifier does not touch its input"
    assert RAttentionModifier.default_config().set(sliding_window=3).instantiate()(cfg) == cfg, "idempotent"


class _ScaledAttention(Attention):
    """A subclass of Attention with a field (and, in a real one, behaviour) that RAttention does not have."""

    class Config(Attention.Config):
        scale: float = 2.0


def test_modifier_refuses_a_subclass_of_attention_by_path_and_name():
    base = tiny_decoder()
    base.stack.layer.self_attention = _ScaledAttention.default_config().set(num_heads=2)
    message = r"stack\.layer\.self_attention \(_ScaledAttention\) build a subclass of Attention"
    for layout in RAttentionLayout:
        with pytest.raises(ConfigValueError, match=message):
            RAttentionModifier.default_config().set(layout=layout).instantiate()(base)


def test_tiny_rattention_model_trains_and_decodes():
    """A minimal hand-written optax loop: the loss goes down; then decoding matches the forward."""
    cfg = RAttentionModifier.default_config().set(sliding_window=3).instantiate()(tiny_decoder(stack=PatternStack))
    cfg.stack.pattern[0].self_attention.chunk_size = 4
    model = cfg.instantiate(rngs=nnx.Rngs(0))
    layers = [module for _, module in nnx.iter_modules(model.stack) if isinstance(module, TransformerLayer)]
    assert layers and all(isinstance(layer.self_attention, RAttention) for layer in layers)
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    ids = jax.random.randint(jax.random.key(0), (4, 17), 1, 32)
    batch = {"input_ids": ids[:, :-1], "target_ids": ids[:, 1:]}

    @nnx.jit
    def train_step(model, optimizer, batch):
        (loss, _), grads = nnx.value_and_grad(lambda m: m(batch), has_aux=True)(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(train_step(model, optimizer, batch)) for _ in range(12)]
    assert losses[-1] < 0.8 * losses[0], losses

    logits = nnx.jit(lambda m, i: m.forward(i).logits)(model, ids[:1, :10])
    step = nnx.jit(lambda m, i, p, c: m.forward(i, positions=p, cache=c))
    cache, decoded = model.init_cache(1, 10), []
    for t in range(10):  # One token at a time (the layer tests cover prefill).
        out = step(model, ids[:1, t : t + 1], jnp.full((1, 1), t), cache)
        cache, decoded = out.cache, [*decoded, out.logits]
    np.testing.assert_allclose(np.concatenate(decoded, 1), logits, rtol=1e-4, atol=1e-4)
    layer_caches = [c for group in cache for c in group]  # Per scanned group, its layers' caches.
    assert layer_caches and all(isinstance(c, RAttentionCache) and isinstance(c.window, KVCache) for c in layer_caches)


def test_local_global_layout_and_variant():
    cfg = RAttentionModifier.default_config().set(layout=RAttentionLayout.LOCAL_GLOBAL).instantiate()(tiny_decoder(4))
    assert isinstance(cfg.stack, PatternStack.Config) and cfg.stack.num_layers == 4
    kinds = [layer.self_attention for layer in cfg.stack.pattern]
    assert [a.klass for a in kinds] == [RAttention] * 3 + [Attention]
    assert all(a.sliding_window == 512 for a in kinds[:3]) and kinds[3].sliding_window is None
    assert not find_configs(kinds[3], RoPEProjection) and find_configs(kinds[0], RoPEProjection)

    shared = tiny_decoder(4)
    shared.stack.kv_sharing = (1, 1)
    with pytest.raises(ValueError, match=r"stack share keys/values.*kv_sharing=None"):
        RAttentionModifier.default_config().instantiate()(shared)
    variant = rattention_variant(shared)
    assert variant.stack.kv_sharing is None
    assert [layer.self_attention.klass for layer in variant.stack.pattern] == [RAttention] * 3 + [Attention]
    variant.instantiate(rngs=nnx.Rngs(0))  # It builds.


def test_bad_configs_and_calls_are_refused():
    with pytest.raises(ValueError, match=r"chunk_size=0 must be positive"):
        build(rattention_config(chunk_size=0))
    with pytest.raises(ValueError, match=r"state_checkpoint_every=0 must be positive"):
        build(rattention_config(state_checkpoint_every=0))
    with pytest.raises(ValueError, match=r"sliding_window=0 must be positive"):
        build(rattention_config(sliding_window=0))
    with pytest.raises(ValueError, match=r"input_linear projects queries only.*kv_sharing=None"):
        build(rattention_config().set(input_linear=QueryOnlyProjection.default_config()))
    with pytest.raises(ValueError, match=r"sliding_window=-1 must be positive"):
        RAttentionModifier.default_config().set(sliding_window=-1).instantiate()(tiny_decoder())
    layer = build(rattention_config())
    x, pos, _ = packed_inputs()
    with pytest.raises(ValueError, match="cannot consume shared_kv"):
        layer(x, positions=pos, shared_kv=KV(x, x, pos, None))
    with pytest.raises(ValueError, match=r"positions must be \[B, T\]"):
        layer(x, positions=pos[:, :3])
