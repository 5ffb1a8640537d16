"""Attention against an independent numpy reference, kernel agreement, KV-cache decoding, sharding, errors."""

import math

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from axmini.config import ConfigBase
from axmini.layers.attention import (
    KV,
    Attention,
    FusedQKVProjection,
    QKVProjection,
    QueryOnlyProjection,
    SlidingWindowModifier,
)
from axmini.layers.kernels import ReferenceKernel, XLAKernel
from axmini.layers.norm import RMSNorm
from axmini.layers.position import RoPEModifier
from axmini.module import Layer, build_sharded, param_infos, sharding_context

D = 16


def attention_config(**fields) -> Attention.Config:
    return Attention.default_config().set(**{"input_dim": D, "num_heads": 4, **fields})


def with_rope(cfg: Attention.Config) -> Attention.Config:
    return RoPEModifier.default_config().set(theta=100.0).instantiate()(cfg)


def build(cfg: Attention.Config, seed: int = 0) -> Attention:
    return cfg.instantiate(rngs=nnx.Rngs(seed))


def np_rms(x: np.ndarray, scale: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def np_attention(layer: Attention, x, *, segment_ids=None, window=None, softcap=None) -> np.ndarray:
    """Loop-by-loop attention over token indices (no RoPE), from the layer's weights."""
    x = np.asarray(x, np.float64)
    p = layer.input_linear
    wq, wk, wv = (np.asarray(w[...], np.float64) for w in (p.q, p.k, p.v))
    wo = np.asarray(layer.output_linear.weight[...], np.float64)
    q, k, v = (np.einsum("btd,dnh->btnh", x, w) for w in (wq, wk, wv))
    if layer.q_norm is not None:
        q = np_rms(q, np.asarray(layer.q_norm.scale[...]))
        k = np_rms(k, np.asarray(layer.k_norm.scale[...]))
    b_size, t_size, heads, head_dim = q.shape
    group = heads // k.shape[2]
    out = np.zeros_like(q)
    for b, h, i in np.ndindex(b_size, heads, t_size):
        keys = [
            j
            for j in range(i + 1)
            if (window is None or i - j <= window)
            and (segment_ids is None or segment_ids[b, i] == segment_ids[b, j] != 0)
        ]
        if not keys:
            continue
        logits = k[b, keys, h // group] @ q[b, i, h] / math.sqrt(head_dim)
        if softcap is not None:
            logits = softcap * np.tanh(logits / softcap)
        probs = np.exp(logits - logits.max())
        out[b, i, h] = probs / probs.sum() @ v[b, keys, h // group]
    return np.einsum("btnh,nhd->btd", out, wo)


@nnx.jit
def run(layer, x, positions, segment_ids=None, cache=None, shared_kv=None):
    """The layer's call, jitted: far faster on CPU than op-by-op."""
    return layer(x, positions=positions, segment_ids=segment_ids, cache=cache, shared_kv=shared_kv)


def random_x(shape=(2, 7, D), seed=1):
    # Test inputs are numpy arrays: eager jax ops would each compile, which dominates CPU test time.
    return np.random.default_rng(seed).standard_normal(shape, np.float32)


def arange_positions(b, t):
    return np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))


PACKED = np.array([[1, 1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 0, 0]])
PACKED_POSITIONS = np.array([[0, 1, 2, 0, 1, 2, 0], [0, 1, 2, 3, 4, 0, 0]])


@pytest.mark.parametrize(
    "fields, segments, check",
    [
        (dict(), False, "multi-head causal"),
        (dict(num_kv_heads=1), False, "multi-query"),
        (dict(num_kv_heads=2, sliding_window=2), False, "grouped-query + sliding window"),
        (dict(num_kv_heads=2), True, "grouped-query + segment ids"),
        (dict(sliding_window=1), True, "window + segments"),
        (dict(logit_softcap=0.5), False, "softcap"),
        (dict(num_kv_heads=2, qk_norm=RMSNorm.default_config(), head_dim=6), False, "qk-norm"),
    ],
)
def test_attention_matches_numpy_reference(fields, segments, check):
    layer = build(attention_config(**fields))
    if layer.q_norm is not None:  # Non-trivial norm scales, so the reference really checks them.
        layer.q_norm.scale[...] = jnp.asarray(np.linspace(0.5, 1.5, 6, dtype=np.float32))
        layer.k_norm.scale[...] = jnp.asarray(np.linspace(1.5, 0.5, 6, dtype=np.float32))
    x = random_x()
    segment_ids = PACKED if segments else None
    positions = PACKED_POSITIONS if segments else arange_positions(2, 7)
    got = layer(x, positions=positions, segment_ids=segment_ids)
    want = np_attention(
        layer, x, segment_ids=segment_ids, window=fields.get("sliding_window"), softcap=fields.get("logit_softcap")
    )
    np.testing.assert_allclose(np.asarray(got.output), want, rtol=1e-4, atol=1e-5, err_msg=check)


@pytest.mark.parametrize("fields", [dict(num_kv_heads=2), dict(num_kv_heads=1, sliding_window=3)])
def test_xla_kernel_matches_reference_kernel(fields):
    reference = build(with_rope(attention_config(**fields)))
    xla = build(with_rope(attention_config(kernel=XLAKernel.default_config(), **fields)))
    x, segment_ids, positions = random_x(), PACKED, PACKED_POSITIONS
    want = run(reference, x, positions=positions, segment_ids=segment_ids).output
    got = run(xla, x, positions=positions, segment_ids=segment_ids).output
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_xla_kernel_with_softcap_falls_back_to_reference():
    fields = dict(logit_softcap=1.0, num_kv_heads=2)
    x, positions = random_x(), arange_positions(2, 7)
    want = build(attention_config(**fields))(x, positions=positions).output
    got = build(attention_config(kernel=XLAKernel.default_config(), **fields))(x, positions=positions).output
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


def test_fused_projection_matches_separate_weights():
    separate = build(attention_config(num_kv_heads=2))
    fused = build(attention_config(num_kv_heads=2, input_linear=FusedQKVProjection.default_config()))
    q, k, v = (np.asarray(w[...]) for w in (separate.input_linear.q, separate.input_linear.k, separate.input_linear.v))
    # Query head h = kv head * group + g.
    fused.input_linear.qkv[...] = jnp.asarray(np.concatenate([q.reshape(D, 2, 2, 4), k[:, :, None], v[:, :, None]], 2))
    fused.output_linear.weight[...] = separate.output_linear.weight[...]
    x, positions = random_x(), arange_positions(2, 7)
    want = run(separate, x, positions=positions).output
    np.testing.assert_allclose(
        np.asarray(run(fused, x, positions=positions).output), np.asarray(want), rtol=1e-5, atol=1e-6
    )


def test_padding_is_never_attended():
    layer = build(attention_config(num_kv_heads=2))
    x, segment_ids, positions = random_x(), PACKED, PACKED_POSITIONS
    out = run(layer, x, positions=positions, segment_ids=segment_ids).output
    noisy = np.where(segment_ids[..., None] == 0, 100.0, x)
    out_noisy = run(layer, noisy, positions=positions, segment_ids=segment_ids).output
    real = np.asarray(PACKED) != 0
    np.testing.assert_allclose(np.asarray(out_noisy)[real], np.asarray(out)[real], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(out)[~real], 0.0)


@pytest.mark.parametrize("kernel", [ReferenceKernel.default_config(), XLAKernel.default_config()])
def test_gradients_are_finite_with_fully_masked_padding_rows(kernel):
    layer = build(attention_config(num_kv_heads=2, kernel=kernel))
    graphdef, state = nnx.split(layer)

    def loss(state, x):
        out = nnx.merge(graphdef, state)(x, positions=PACKED_POSITIONS, segment_ids=PACKED).output
        return jnp.sum(out**2)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(state, random_x())
    leaves = jax.tree.leaves(grads)
    assert all(np.isfinite(np.asarray(g)).all() for g in leaves)
    assert np.abs(np.asarray(grads[1])[PACKED == 0]).max() == 0  # Padding tokens influence nothing.


def test_parameters_carry_logical_axes():
    cfg = attention_config(num_kv_heads=2, qk_norm=RMSNorm.default_config())
    axes = {info.path: (info.shape, info.axes) for info in param_infos(build(cfg))}
    assert axes == {
        "input_linear/q": ((D, 4, 4), ("embed", "heads", "head_dim")),
        "input_linear/k": ((D, 2, 4), ("embed", "kv_heads", "head_dim")),
        "input_linear/v": ((D, 2, 4), ("embed", "kv_heads", "head_dim")),
        "output_linear/weight": ((4, 4, D), ("heads", "head_dim", "embed")),
        "q_norm/scale": ((4,), ("head_dim",)),
        "k_norm/scale": ((4,), ("head_dim",)),
    }
    fused = build(attention_config(num_kv_heads=2, input_linear=FusedQKVProjection.default_config()))
    assert fused.input_linear.qkv.get_metadata()["axes"] == ("embed", "kv_heads", None, "head_dim")
    assert fused.input_linear.qkv[...].shape == (D, 2, 4, 4)


# ----------------------------------------------------------------------------------------------------
# Decoding with a KV cache.


def decode(layer, x, prompt_length, max_length):
    """Prefill the prompt, then extend one token at a time; returns the outputs [B,T,D] and the caches."""
    b, t, _ = x.shape
    positions = arange_positions(b, t)
    cache = layer.init_cache(b, max_length, jnp.float32)
    result = run(layer, x[:, :prompt_length], positions[:, :prompt_length], cache=cache)
    outputs, caches = [result.output], [result.cache]
    for i in range(prompt_length, t):
        result = run(layer, x[:, i : i + 1], positions[:, i : i + 1], cache=result.cache)
        outputs.append(result.output)
        caches.append(result.cache)
    return np.concatenate(outputs, axis=1), caches


WINDOW_3 = dict(num_kv_heads=1, sliding_window=3, kernel=XLAKernel.default_config())


@pytest.mark.parametrize(
    "fields, prompt_length",
    [
        (dict(num_kv_heads=2, input_linear=FusedQKVProjection.default_config(), qk_norm=RMSNorm.default_config()), 3),
        (dict(num_kv_heads=2, sliding_window=2), 5),  # The prompt is longer than the ring buffer.
        (WINDOW_3, 1),
    ],
)
def test_decode_matches_forward(fields, prompt_length):
    layer = build(with_rope(attention_config(**fields)))
    x = random_x((2, 9, D))
    want = run(layer, x, positions=arange_positions(2, 9)).output
    got, caches = decode(layer, x, prompt_length, max_length=12)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    window = fields.get("sliding_window")
    expected_length = window if window is not None else 12
    assert all(c.k.shape[1] == expected_length and c.positions.shape[1] == expected_length for c in caches)


def test_sliding_window_cache_never_grows_past_the_window():
    layer = build(with_rope(attention_config(**WINDOW_3)))  # As in test_decode_matches_forward: compiled once.
    _, caches = decode(layer, random_x((2, 9, D)), 1, max_length=12)
    assert {c.k.shape for c in caches} == {(2, 3, 1, 4)}
    # It holds exactly the newest `window` positions.
    np.testing.assert_array_equal(np.sort(np.asarray(caches[-1].positions), axis=1), [[6, 7, 8]] * 2)
    assert layer.init_cache(1, 2).k.shape[1] == 2  # A short max_length needs fewer slots.


@pytest.mark.parametrize("window", [None, 2])
def test_decode_batch_with_different_prompt_lengths(window):
    """Right-padded prompts of lengths 5, 2, 4 (padding positions 0, so a careless write would clobber slot 0),
    then each row extends from its own position; each row equals the forward over its own sequence."""
    layer = build(with_rope(attention_config(num_kv_heads=2, sliding_window=window)))
    lengths, steps, b = [5, 2, 4], 3, 3
    x = random_x((b, 5 + steps, D), seed=3)
    segment_ids = np.asarray([[1] * n + [0] * (5 - n) for n in lengths])
    positions = np.asarray([list(range(n)) + [0] * (5 - n) for n in lengths])
    cache = layer.init_cache(b, 16)
    result = run(layer, x[:, :5], positions=positions, segment_ids=segment_ids, cache=cache)
    prompt_out = np.asarray(result.output)
    step_out = []
    for s in range(steps):
        # Row r's s-th new token is x[r, 5 + s], at position lengths[r] + s.
        pos = np.asarray([[n + s] for n in lengths])
        result = run(layer, x[:, 5 + s : 6 + s], positions=pos, cache=result.cache)
        step_out.append(np.asarray(result.output[:, 0]))
    # The reference: each row's whole sequence (prompt + new tokens), left-aligned, one forward.
    sequences = np.zeros((b, 5 + steps, D), np.float32)
    for r, n in enumerate(lengths):
        sequences[r, : n + steps] = np.concatenate([x[r, :n], x[r, 5:]])
    ref_segments = np.asarray([[1] * (n + steps) + [0] * (5 - n) for n in lengths])
    want = np.asarray(run(layer, sequences, arange_positions(b, 5 + steps), ref_segments).output)
    for r, n in enumerate(lengths):
        np.testing.assert_allclose(prompt_out[r, :n], want[r, :n], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.stack([o[r] for o in step_out]), want[r, n : n + steps], rtol=1e-5, atol=1e-5)


def test_writing_past_the_cache_is_an_error_outside_jit():
    layer = build(attention_config())
    cache = layer.init_cache(2, 4)
    with pytest.raises(ValueError, match="position 5 does not fit a KV cache of length 4"):
        layer(random_x((2, 1, D)), positions=np.full((2, 1), 5), cache=cache)
    short_window = build(attention_config(sliding_window=8))
    with pytest.raises(ValueError, match="length 3"):
        short_window(random_x((2, 4, D)), positions=arange_positions(2, 4), cache=short_window.init_cache(2, 3))
    # Padding positions are not written, so they may lie beyond the cache.
    ok = layer(
        random_x((1, 2, D)),
        positions=np.asarray([[0, 9]]),
        segment_ids=np.asarray([[1, 0]]),
        cache=layer.init_cache(1, 4),
    )
    assert ok.cache.positions.tolist() == [[0, -1, -1, -1]]


def test_writing_past_the_cache_under_jit_gives_nan():
    layer = build(attention_config())
    cache = layer.init_cache(2, 4)
    step = nnx.jit(lambda m, x, p, c: m(x, positions=p, cache=c))
    out = step(layer, random_x((2, 1, D)), np.asarray([[3], [4]]), cache)
    assert np.isfinite(np.asarray(out.output[0])).all()
    assert np.isnan(np.asarray(out.output[1])).all()


# ----------------------------------------------------------------------------------------------------
# KV sharing.


def consumer_of(producer: Attention, **fields) -> Attention:
    """A query-only layer with the producer's query and output weights: it must reproduce the producer."""
    cfg = with_rope(attention_config(input_linear=QueryOnlyProjection.default_config(), **fields))
    consumer = build(cfg, seed=5)
    consumer.input_linear.inner.q[...] = producer.input_linear.inner.q[...]
    consumer.output_linear.weight[...] = producer.output_linear.weight[...]
    return consumer


def test_shared_kv_consumer_reproduces_producer():
    producer = build(with_rope(attention_config(num_kv_heads=2)))
    consumer = consumer_of(producer, num_kv_heads=2)
    x, positions, segment_ids = random_x(), PACKED_POSITIONS, PACKED
    produced = run(producer, x, positions=positions, segment_ids=segment_ids)
    consumed = run(consumer, x, positions=positions, segment_ids=segment_ids, shared_kv=produced.kv)
    assert consumed.cache is None and consumer.init_cache(2, 8) is None
    np.testing.assert_allclose(np.asarray(consumed.output), np.asarray(produced.output), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("window", [None, 2])
def test_shared_kv_consumer_decodes_from_producer_cache(window):
    producer = build(with_rope(attention_config(num_kv_heads=2, sliding_window=window)))
    consumer = consumer_of(producer, num_kv_heads=2, sliding_window=window)
    x = random_x((2, 6, D))
    want = run(
        consumer, x, positions=arange_positions(2, 6), shared_kv=run(producer, x, positions=arange_positions(2, 6)).kv
    )
    cache = producer.init_cache(2, 8)
    outputs = []
    for start, stop in [(0, 3), (3, 4), (4, 5), (5, 6)]:
        positions = arange_positions(2, 6)[:, start:stop]
        produced = run(producer, x[:, start:stop], positions=positions, cache=cache)
        cache = produced.cache
        outputs.append(run(consumer, x[:, start:stop], positions=positions, shared_kv=produced.kv).output)
    np.testing.assert_allclose(np.concatenate(outputs, 1), np.asarray(want.output), rtol=1e-5, atol=1e-6)


def test_kv_sharing_misuse_is_refused():
    producer = build(attention_config())
    consumer = build(attention_config(input_linear=QueryOnlyProjection.default_config()))
    x, positions = random_x(), arange_positions(2, 7)
    kv = run(producer, x, positions=positions).kv
    with pytest.raises(ValueError, match="projects queries only: pass shared_kv"):
        consumer(x, positions=positions)
    with pytest.raises(ValueError, match="QueryOnlyProjection"):
        producer(x, positions=positions, shared_kv=kv)
    with pytest.raises(ValueError, match="keeps no cache"):
        consumer(x, positions=positions, shared_kv=kv, cache=producer.init_cache(2, 8))
    assert isinstance(kv, KV) and kv.k.shape == (2, 7, 4, 4)


# ----------------------------------------------------------------------------------------------------
# Sharding and dtypes.


def test_sharded_matches_single_device():
    cfg = with_rope(attention_config(num_kv_heads=4, head_dim=8, sliding_window=4))
    mesh = jax.make_mesh((2, 4), ("fsdp", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    rules = [("batch", "fsdp"), ("embed", "fsdp"), ("heads", "model"), ("kv_heads", "model")]
    sharded = build_sharded(cfg, mesh, rules)
    specs = {i.path: i.spec for i in param_infos(sharded, mesh, rules)}
    assert specs["input_linear/inner/k"] == jax.sharding.PartitionSpec("fsdp", "model", None)
    assert specs["output_linear/weight"] == jax.sharding.PartitionSpec("model", None, "fsdp")
    assert len(sharded.input_linear.inner.q[...].sharding.device_set) == 8
    single = build(cfg, seed=7)
    nnx.update(single, jax.device_get(nnx.state(sharded)))

    @nnx.jit
    def forward(model, x, positions, segment_ids):
        with sharding_context(mesh, rules):
            return model(x, positions=positions, segment_ids=segment_ids).output

    x = random_x((4, 7, D))
    positions, segment_ids = np.tile(PACKED_POSITIONS, (2, 1)), np.tile(PACKED, (2, 1))
    got = forward(sharded, x, positions, segment_ids).block_until_ready()
    want = run(single, x, positions=positions, segment_ids=segment_ids).output
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_bf16_runs_and_is_close_to_f32():
    layer = build(with_rope(attention_config(num_kv_heads=2, qk_norm=RMSNorm.default_config())))
    x, positions = random_x(), arange_positions(2, 7)
    want = run(layer, x, positions=positions).output
    got = run(layer, x.astype(jnp.bfloat16), positions=positions).output
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), rtol=0.05, atol=0.05)
    cache = layer.init_cache(2, 8, jnp.bfloat16)
    decoded = run(layer, x[:, :3].astype(jnp.bfloat16), positions=positions[:, :3], cache=cache)
    assert decoded.cache.k.dtype == jnp.bfloat16 and decoded.output.dtype == jnp.bfloat16


# ----------------------------------------------------------------------------------------------------
# Bad configs are refused at build time, naming the path and the values.


class Parent(Layer):
    """Builds its `attn` child, as a transformer layer does, so errors carry the child's path."""

    class Config(Layer.Config):
        attn: Attention.Config = Attention.default_config()

    def __init__(self, cfg, *, rngs):
        super().__init__(cfg, rngs=rngs)
        self.attn = self.config.attn.instantiate(rngs=rngs)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(num_kv_heads=3), r"attn\.num_heads=4 is not divisible by attn\.num_kv_heads=3"),
        (dict(num_heads=3), r"attn\.input_dim=16 is not divisible by attn\.num_heads=3.*head_dim"),
        (dict(num_kv_heads=0), r"attn\.num_kv_heads=0 must be positive"),
        (dict(head_dim=-2), r"attn\.head_dim=-2 must be positive"),
        (dict(sliding_window=0), r"attn\.sliding_window=0 must be positive"),
        (dict(logit_softcap=-1.0), r"attn\.logit_softcap=-1.0 must be positive"),
        (
            dict(qk_norm=RMSNorm.default_config().set(input_dim=8)),
            r"attn\.qk_norm\.input_dim=8 conflicts with attn\.\w+=4, which sets it",
        ),
        (
            dict(input_linear=FusedQKVProjection.default_config().set(head_dim=8)),
            r"attn\.input_linear\.head_dim=8 conflicts with attn\.\w+=4, which sets it",
        ),
        (
            dict(input_linear=QKVProjection.default_config().set(num_kv_heads=4), num_kv_heads=2),
            r"attn\.input_linear\.num_kv_heads=4 conflicts with attn\.num_kv_heads=2, which sets it",
        ),
    ],
)
def test_bad_config_is_refused_at_build_time(fields, message):
    with pytest.raises(ValueError, match=message):
        Parent.default_config().set(attn=attention_config(**fields)).instantiate(rngs=nnx.Rngs(0))


def test_bad_call_shapes_are_refused():
    layer = build(attention_config())
    with pytest.raises(ValueError, match=r"positions must be \[B, T\]"):
        layer(random_x(), positions=np.zeros((2, 6), np.int32))
    with pytest.raises(ValueError, match=r"x must be \[B, T, 16\]"):
        layer(random_x((2, 7, 8)), positions=arange_positions(2, 7))
    with pytest.raises(ValueError, match="the cache holds batch size 3, x has 2"):
        layer(random_x(), positions=arange_positions(2, 7), cache=layer.init_cache(3, 8))


def test_sliding_window_modifier_reaches_every_attention():
    class Tree(ConfigBase):
        attn: Attention.Config = Attention.default_config()
        layers: list = [Attention.default_config(), RMSNorm.default_config()]

    after = SlidingWindowModifier.default_config().set(sliding_window=16).instantiate()(with_rope(Tree()))
    assert after.attn.sliding_window == 16 and after.layers[0].sliding_window == 16
    assert after.layers[1] == RMSNorm.default_config()
    with pytest.raises(ValueError, match="sliding_window=0 must be positive"):
        SlidingWindowModifier.default_config().set(sliding_window=0).instantiate()(Tree())
