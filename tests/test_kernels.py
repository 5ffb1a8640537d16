"""Attention kernels: every kernel that runs on CPU against the reference (causal, window, segments, grouped heads,
soft-capping, query scale, gradients), the blocked window against the full mask at window boundaries, the cuDNN and
splash selection logic, cuDNN's arguments emulated on CPU, and the mesh rules that choose kernels per backend."""

import itertools

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from axmini import experiments
from axmini.config import ConfigValueError, find_configs
from axmini.layers.attention import Attention
from axmini.layers.kernels import (
    AttentionMask,
    CudnnKernel,
    ReferenceKernel,
    SplashKernel,
    XLAKernel,
    blocked_window_attention,
    segment_layout,
)
from axmini.layers.position import RoPEModifier
from axmini.mesh_rules import default_mesh_rules, select_mesh_rule
from axmini.module import sharding_context

FULL_MASK = ReferenceKernel.default_config().set(window_block_size=None)


def qkv(batch, length, heads, kv_heads, head_dim=8, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, length, heads, head_dim)).astype(dtype)
    k, v = (rng.standard_normal((batch, length, kv_heads, head_dim)).astype(dtype) for _ in range(2))
    return q, k, v


def packed(batch, length, cuts):
    """Segment ids and positions of rows packed with segments ending at `cuts` (the rest padding)."""
    segments = np.zeros((batch, length), np.int32)
    positions = np.zeros((batch, length), np.int32)
    start = 0
    for i, end in enumerate(cuts):
        segments[:, start:end] = i + 1
        positions[:, start:end] = np.arange(end - start)
        start = end
    return segments, positions


def aligned_mask(batch, length, *, window=None, cuts=None):
    if cuts is None:
        positions = np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length))
        return AttentionMask(positions, positions, None, None, window, aligned=True)
    segments, positions = packed(batch, length, cuts)
    return AttentionMask(positions, positions, segments, segments, window, aligned=True)


def run_kernel(kernel_cfg, q, k, v, mask, softcap=None, scale=None):
    """Output and gradients of sum(out^2) with respect to q, k, v, jitted."""
    kernel = kernel_cfg.instantiate()

    def loss(q, k, v):
        out = kernel(q, k, v, mask, logit_softcap=softcap, query_scale=scale)
        return jnp.sum(out.astype(jnp.float32) ** 2), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


def assert_same(got, want, rtol, atol):
    (out, grads), (want_out, want_grads) = got, want
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want_out, np.float32), rtol=rtol, atol=atol)
    for g, w in zip(grads, want_grads):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), rtol=rtol, atol=atol)


CASES = {
    "causal, grouped heads": dict(heads=4, kv_heads=2),
    "multi-query, window 20, query scale 0.3": dict(heads=4, kv_heads=1, window=20, scale=0.3),
    "packed segments": dict(heads=2, kv_heads=2, cuts=(50, 128)),
    "window 16 across packed segments and padding": dict(heads=4, kv_heads=2, window=16, cuts=(10, 70, 100)),
    "soft-capping": dict(heads=2, kv_heads=1, softcap=2.0),
}
KERNELS = {
    "xla": XLAKernel.default_config().set(window_block_size=None),
    "reference, blocked by 16": ReferenceKernel.default_config().set(window_block_size=16),
    "xla, blocked by 32": XLAKernel.default_config().set(window_block_size=32),
    "splash (interpreted)": SplashKernel.default_config().set(interpret=True, block_size=128),
    "cudnn on cpu (falls back)": CudnnKernel.default_config(),
}


# Splash runs interpreted on CPU (seconds a call): three cases cover its masks.
SPLASH_CASES = (
    "multi-query, window 20, query scale 0.3",
    "window 16 across packed segments and padding",
    "soft-capping",
)
PAIRS = [(k, c) for k in KERNELS for c in CASES if not k.startswith("splash") or c in SPLASH_CASES]


@pytest.mark.parametrize("kernel, case", PAIRS)
def test_kernel_matches_full_mask_reference_forward_and_gradients(kernel, case):
    fields = dict(CASES[case])
    options = dict(softcap=fields.pop("softcap", None), scale=fields.pop("scale", None))
    q, k, v = qkv(2, 128, fields.pop("heads"), fields.pop("kv_heads"))
    mask = aligned_mask(2, 128, **fields)
    want = run_kernel(FULL_MASK, q, k, v, mask, **options)
    assert_same(run_kernel(KERNELS[kernel], q, k, v, mask, **options), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("window", [7, 8, 9, 19])
@pytest.mark.parametrize("cuts", [None, (13, 30, 37)])
def test_blocked_window_equals_full_mask_at_window_boundaries(window, cuts):
    # Blocks of 8 queries over 45 tokens (a partial last block); windows just below, at and above one block, and
    # over two blocks; segment boundaries inside blocks, padding at the end.
    q, k, v = qkv(2, 45, 4, 2, seed=window)
    mask = aligned_mask(2, 45, window=window, cuts=cuts)
    want = run_kernel(FULL_MASK, q, k, v, mask)
    blocked = ReferenceKernel.default_config().set(window_block_size=8)
    assert_same(run_kernel(blocked, q, k, v, mask), want, rtol=1e-5, atol=1e-6)


def test_blocked_window_reads_a_key_buffer_before_the_queries():
    # RAttention's layout: S = buffer + T keys, the last T the queries' own. Buffer positions 3..7, queries 8..27.
    q, _, _ = qkv(1, 20, 2, 1, seed=3)
    _, k, v = qkv(1, 25, 2, 1, seed=4)
    q_positions = np.arange(8, 28, dtype=np.int32)[None]
    kv_positions = np.concatenate([[-1], np.arange(4, 8), np.arange(8, 28)]).astype(np.int32)[None]
    mask = AttentionMask(q_positions, kv_positions, sliding_window=5, aligned=True)
    want = ReferenceKernel.default_config().set(window_block_size=None).instantiate()(q, k, v, mask)
    attend = ReferenceKernel.default_config().instantiate().attend
    got = blocked_window_attention(q, k, v, mask, block_size=4, attend=lambda *a: attend(*a, logit_softcap=None))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_blocked_window_memory_grows_linearly_with_length():
    def temp_bytes(block, length):
        q, k, v = (jax.ShapeDtypeStruct(a.shape, a.dtype) for a in qkv(1, length, 2, 1))
        mask = aligned_mask(1, length, window=16)
        kernel = ReferenceKernel.default_config().set(window_block_size=block).instantiate()
        grad = jax.grad(lambda q, k, v: jnp.sum(kernel(q, k, v, mask)), argnums=(0, 1, 2))
        return jax.jit(grad).lower(q, k, v).compile().memory_analysis().temp_size_in_bytes

    full = [temp_bytes(None, n) for n in (256, 512)]
    blocked = [temp_bytes(16, n) for n in (256, 512)]
    assert full[1] > 3.5 * full[0]  # Quadratic.
    assert blocked[1] < 2.5 * blocked[0] and blocked[1] < full[1] / 4  # Linear, and far below the full mask.


# ----------------------------------------------------------------------------------------------------
# Kernels inside the layer: the flash kernels fall back for decoding; every kernel decodes like its forward.


LAYER_KERNELS = {
    "reference": ReferenceKernel.default_config(),
    "xla blocked by 4": XLAKernel.default_config().set(window_block_size=4),
    "cudnn": CudnnKernel.default_config(),
    "splash": SplashKernel.default_config().set(interpret=True),
}


@pytest.mark.parametrize("kernel", list(LAYER_KERNELS))
def test_layer_decode_matches_forward_with_every_kernel(kernel):
    cfg = Attention.default_config().set(
        input_dim=16, num_heads=4, num_kv_heads=2, sliding_window=3, kernel=LAYER_KERNELS[kernel]
    )
    layer = RoPEModifier.default_config().instantiate()(cfg).instantiate(rngs=nnx.Rngs(0))
    run = nnx.jit(lambda m, x, p, c: m(x, positions=p, cache=c))
    x = np.random.default_rng(1).standard_normal((2, 12, 16)).astype(np.float32)
    positions = np.broadcast_to(np.arange(12, dtype=np.int32), (2, 12))
    want = run(layer, x, positions, None).output
    result = run(layer, x[:, :4], positions[:, :4], layer.init_cache(2, 12))
    outputs = [result.output]
    for t in range(4, 12):
        result = run(layer, x[:, t : t + 1], positions[:, t : t + 1], result.cache)
        outputs.append(result.output)
    np.testing.assert_allclose(np.concatenate(outputs, 1), np.asarray(want), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# Selection logic of the flash kernels, on CPU.


def test_cudnn_is_selected_only_for_half_precision_training_on_gpu():
    kernel = CudnnKernel.default_config().instantiate()
    q, k, _ = qkv(1, 16, 4, 2, head_dim=64, dtype=jnp.bfloat16)
    mask = aligned_mask(1, 16, window=4)

    def reason(q=q, k=k, mask=mask, backend="gpu", softcap=None):
        return kernel.unsupported_reason(q, k, k, mask, logit_softcap=softcap, backend=backend)

    assert reason() is None
    assert reason(backend="cpu") == "CudnnKernel runs on gpu, not cpu"
    cached = mask._replace(kv_positions=mask.kv_positions[:, :8])
    assert "not the queries' own tokens" in reason(k=k[:, :8], mask=cached)
    assert "not the queries' own tokens" in reason(mask=mask._replace(aligned=False))
    assert reason(softcap=30.0) == "cuDNN has no logit soft-capping"
    assert reason(q=q.astype(np.float32), k=k.astype(np.float32)) == (
        "cuDNN needs bfloat16 or float16 activations, not float32"
    )
    odd = np.zeros((1, 16, 4, 12), jnp.bfloat16)
    assert reason(q=odd, k=odd[:, :, :2]) == "cuDNN needs head_dim a multiple of 8 up to 256, not 12"


def test_splash_is_selected_only_on_tpu_for_whole_blocks():
    kernel = SplashKernel.default_config().instantiate()
    q, k, _ = qkv(1, 256, 4, 2)
    mask = aligned_mask(1, 256)
    assert kernel.unsupported_reason(q, k, k, mask, backend="tpu") is None
    assert kernel.unsupported_reason(q, k, k, mask, backend="gpu") == "SplashKernel runs on tpu, not gpu"
    assert kernel.unsupported_reason(q, k, k, mask) == "SplashKernel runs on tpu, not cpu"
    short, short_mask = q[:, :100], aligned_mask(1, 100)
    assert "multiple of 128, not 100" in kernel.unsupported_reason(short, short, short, short_mask, backend="tpu")


@pytest.fixture
def cudnn_emulated(monkeypatch):
    """CudnnKernel on CPU with its cuDNN call replaced by the XLA implementation of the same arguments."""
    monkeypatch.setattr(CudnnKernel, "backend", jax.default_backend())
    calls = []

    def xla(q, k, v, **kwargs):
        calls.append(sorted(kwargs))
        return jax.nn.dot_product_attention(q, k, v, implementation="xla", **kwargs)

    monkeypatch.setattr(CudnnKernel, "attention", staticmethod(xla))
    return calls


@pytest.mark.parametrize(
    "fields, scale, arguments",
    [
        (dict(), None, ["is_causal", "local_window_size", "scale"]),
        (dict(window=5), 0.3, ["is_causal", "local_window_size", "scale"]),
        (
            dict(cuts=(40,)),
            None,
            ["is_causal", "key_value_seq_lengths", "local_window_size", "query_seq_lengths", "scale"],
        ),
    ],
)
def test_cudnn_arguments_give_the_reference_mask(cudnn_emulated, fields, scale, arguments):
    q, k, v = (a.astype(jnp.bfloat16) for a in qkv(2, 48, 4, 2, head_dim=16))
    mask = aligned_mask(2, 48, **fields)
    want = run_kernel(FULL_MASK, q, k, v, mask, scale=scale)
    assert_same(run_kernel(CudnnKernel.default_config(), q, k, v, mask, scale=scale), want, rtol=2e-2, atol=2e-2)
    assert cudnn_emulated[0] == arguments  # The cuDNN path ran, with these arguments.


def test_cudnn_rows_with_more_segments_than_configured_are_nan(cudnn_emulated):
    q, k, v = (a.astype(jnp.bfloat16) for a in qkv(2, 16, 2, 2, head_dim=16))
    segments = np.array([[1] * 10 + [0] * 6, [1] * 8 + [2] * 8], np.int32)
    positions = np.array([list(range(10)) + [0] * 6, list(range(8)) * 2], np.int32)
    mask = AttentionMask(positions, positions, segments, segments, aligned=True)
    kernel = CudnnKernel.default_config().instantiate()
    out = np.asarray(jax.jit(lambda q, k, v: kernel(q, k, v, mask))(q, k, v), np.float32)
    assert np.isfinite(out[0]).all() and np.isnan(out[1]).all()


layout = jax.jit(segment_layout, static_argnums=1)


def _np_segment_layout(row, max_segments):
    """Runs of equal non-zero ids; None when the row is not `runs with increasing ids, then padding`."""
    runs, start = [], 0
    for i in range(1, len(row) + 1):
        if i == len(row) or row[i] != row[start]:
            runs.append((row[start], start, i - start))
            start = i
    ids = [r for r in runs if r[0] != 0]
    padding = [r for r in runs if r[0] == 0]
    ok = len(ids) <= max_segments and (not padding or (runs[-1][0] == 0 and len(padding) == 1))
    ok = ok and all(a[0] < b[0] for a, b in itertools.pairwise(ids))
    return ([s for _, s, _ in ids], [n for _, _, n in ids]) if ok else None


@pytest.mark.parametrize(
    "row",
    [
        [1, 1, 1, 2, 2, 3, 0, 0],
        [1] * 8,
        [0] * 8,
        [1, 2, 3, 4, 5, 6, 7, 8],
        [1, 1, 0, 2, 2, 0, 0, 0],  # Padding between segments.
        [2, 2, 1, 1, 0, 0, 0, 0],  # Ids not increasing.
    ],
)
def test_segment_layout_matches_numpy(row):
    offsets, lengths, fits = (np.asarray(a)[0] for a in layout(np.asarray([row], np.int32), 4))
    expected = _np_segment_layout(row, 4)
    assert bool(fits) == (expected is not None)
    if expected is not None:
        starts, sizes = expected
        assert offsets.tolist() == starts + [-1] * (5 - len(starts))
        assert lengths.tolist() == sizes + [-1] * (4 - len(sizes))


def test_packed_layout_describes_the_reference_mask():
    """cuDNN's packed causal window mask, built from the layout (token i of a segment sees token j of the same
    segment when 0 <= i - j <= window), equals the position mask of the same packed rows."""
    cuts = (5, 9, 20)
    segments, positions = packed(1, 24, cuts)
    offsets, lengths, fits = (np.asarray(a)[0] for a in layout(segments, 3))
    assert fits
    packed_mask = np.zeros((24, 24), bool)
    for start, size in zip(offsets, lengths):
        for i in range(start, start + size):
            packed_mask[i, max(start, i - 3) : i + 1] = True
    mask = AttentionMask(positions, positions, segments, segments, 3, aligned=True)
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda: mask.dense())())[0], packed_mask)


def test_splash_runs_per_shard_under_a_sharding_context():
    mesh = jax.make_mesh((2, 2), ("fsdp", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    rules = [("batch", "fsdp"), ("heads", "model"), ("kv_heads", "model")]
    q, k, v = qkv(2, 128, 4, 2)
    mask = aligned_mask(2, 128, window=30, cuts=(60, 128))
    kernel = SplashKernel.default_config().set(interpret=True, block_size=128).instantiate()

    @jax.jit
    def sharded(q, k, v):
        with sharding_context(mesh, rules):
            return kernel(q, k, v, mask)

    hlo = sharded.lower(q, k, v).as_text()
    assert "shard_map" in hlo or "sdy.manual_computation" in hlo or 'custom_call_target="Sharding"' in hlo
    want = FULL_MASK.instantiate()(q, k, v, mask)
    np.testing.assert_allclose(np.asarray(sharded(q, k, v)), np.asarray(want), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# Mesh rules choose the kernel per backend.


@pytest.mark.parametrize(
    "instance, kernel", [("cpu", ReferenceKernel), ("gpu-h100-8", CudnnKernel), ("tpu-v5p-8", SplashKernel)]
)
def test_mesh_rules_choose_the_attention_kernel_per_backend(instance, kernel):
    cfg = experiments.get("afm_on_device_global_local")
    for modifier in select_mesh_rule(instance, default_mesh_rules()).modifiers:
        cfg = modifier.instantiate()(cfg)
    attentions = find_configs(cfg.model, Attention.matches)
    assert attentions and all(a.kernel.klass is kernel for _, a in attentions)


def test_bad_kernel_config_is_refused_with_its_path():
    cfg = Attention.default_config().set(input_dim=8, num_heads=2)
    cfg.kernel.window_block_size = 0
    with pytest.raises(ConfigValueError, match=r"kernel\.window_block_size=0 must be positive"):
        cfg.instantiate(rngs=nnx.Rngs(0))
