"""The optional layer choices real checkpoints need (Gemma, Qwen, AXLearn), each against a plain-numpy reference:
norm scale offset and per-head scales, embedding scale, query scale, RoPE layout, q/k/v/o biases, sandwich norms,
local RoPE theta, RAttention's per-head norm scales, output logit soft-capping; and, left at their defaults, their
absence from config text (goldens)."""

import math

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from axmini.config import ConfigValueError, find_configs
from axmini.layers.attention import Attention, FusedQKVProjection, QKVProjection
from axmini.layers.decoder import Decoder
from axmini.layers.embedding import Embedding
from axmini.layers.kernels import ReferenceKernel, XLAKernel, reference_attention
from axmini.layers.linear_attention import FeatureMap
from axmini.layers.norm import RMSNorm
from axmini.layers.position import RoPELayout, RoPEModifier, RoPEProjection, apply_rope
from axmini.layers.rattention import RAttention
from axmini.layers.transformer import GlobalLocalModifier, RepeatedStack, TransformerLayer
from axmini.module import param_infos

RNG = np.random.default_rng(0)


def _normal(*shape) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def _randomize(module: nnx.Module, seed: int = 0) -> None:
    """Every parameter drawn at random (norm scales and biases start constant, which would hide mistakes)."""
    rng = np.random.default_rng(seed)
    for _, param in nnx.iter_graph(module):
        if isinstance(param, nnx.Param):
            value = param.get_value()
            param.set_value(jnp.asarray(rng.standard_normal(value.shape), value.dtype))


def np_rms(x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def test_optional_fields_at_their_default_are_left_out_of_the_config_text():
    cfg = TransformerLayer.default_config()
    assert "post_attention_norm" not in cfg.debug_string()
    assert "scale_offset" not in cfg.debug_string()
    cfg.set(post_attention_norm=RMSNorm.default_config().set(scale_offset=1.0))
    text = cfg.debug_string()
    assert "post_attention_norm.scale_offset: 1.0" in text
    assert "post_feed_forward_norm" not in text
    cfg.post_attention_norm.scale_offset = 0.0  # Back at its default: gone again.
    assert "post_attention_norm.scale_offset" not in cfg.debug_string()


def test_rms_norm_scale_offset_multiplies_by_one_plus_the_weight_and_starts_as_identity():
    cfg = RMSNorm.default_config().set(input_dim=8, scale_offset=1.0)
    norm = cfg.instantiate(rngs=nnx.Rngs(0))
    x = _normal(3, 8)
    np.testing.assert_allclose(np.asarray(norm(x)), np_rms(x), rtol=1e-5, atol=1e-6)  # Weight 0: scale 1.
    _randomize(norm)
    w = np.asarray(norm.scale[...])
    np.testing.assert_allclose(np.asarray(norm(x)), np_rms(x) * (1 + w), rtol=1e-5, atol=1e-6)


def test_rms_norm_per_head_scale_scales_each_head_separately():
    norm = RMSNorm.default_config().set(input_dim=4, heads=3, axis_name="head_dim").instantiate(rngs=nnx.Rngs(0))
    assert norm.scale[...].shape == (3, 4)
    assert param_infos(norm)[0].axes == ("heads", "head_dim")
    _randomize(norm)
    x = _normal(2, 5, 3, 4)
    want = np_rms(x) * np.asarray(norm.scale[...])[None, None]
    np.testing.assert_allclose(np.asarray(norm(x)), want, rtol=1e-5, atol=1e-6)


def test_embedding_scale_is_cast_to_the_table_dtype_and_attend_is_unscaled():
    scale = math.sqrt(640)  # 25.298...; bfloat16 holds 25.25.
    cfg = Embedding.default_config().set(num_embeddings=11, dim=6, scale=scale, param_dtype=jnp.bfloat16)
    embedding = cfg.instantiate(rngs=nnx.Rngs(0))
    table = np.asarray(embedding.weight[...]).astype(np.float32)
    ids = np.array([[1, 4, 10]])
    bf16_scale = float(jnp.asarray(scale, jnp.bfloat16))
    assert bf16_scale == 25.25
    want = np.asarray(jnp.asarray(table[ids] * bf16_scale, jnp.bfloat16)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(embedding(ids)).astype(np.float32), want)
    x = _normal(1, 2, 6)
    got = np.asarray(embedding.attend(jnp.asarray(x, jnp.bfloat16))).astype(np.float32)
    np.testing.assert_allclose(got, x @ table.T, rtol=2e-2, atol=5e-2)


def _np_attention(q, k, v, scale):
    """Causal softmax attention over [B,T,H,Dh] with a given logit scale (H == K), token by token."""
    out = np.zeros_like(q, dtype=np.float64)
    for b, h, i in np.ndindex(q.shape[0], q.shape[2], q.shape[1]):
        logits = k[b, : i + 1, h] @ q[b, i, h] * scale
        probs = np.exp(logits - logits.max())
        out[b, i, h] = probs / probs.sum() @ v[b, : i + 1, h]
    return out


@pytest.mark.parametrize("kernel", [ReferenceKernel.default_config(), XLAKernel.default_config()], ids=["ref", "xla"])
def test_query_scale_replaces_inverse_sqrt_head_dim(kernel):
    q, k, v = _normal(2, 5, 2, 8), _normal(2, 5, 2, 8), _normal(2, 5, 2, 8)
    mask = np.broadcast_to(np.tril(np.ones((5, 5), bool)), (2, 5, 5))
    got = jax.jit(reference_attention, static_argnames="query_scale")(q, k, v, mask, query_scale=0.7)
    np.testing.assert_allclose(np.asarray(got), _np_attention(q, k, v, 0.7), rtol=1e-4, atol=1e-5)
    cfg = Attention.default_config().set(input_dim=16, num_heads=2, head_dim=8, query_scale=0.7, kernel=kernel)
    layer = cfg.instantiate(rngs=nnx.Rngs(0))
    x = _normal(2, 5, 16)
    p = layer.input_linear
    qx, kx, vx = (np.einsum("btd,dnh->btnh", x, np.asarray(w[...])) for w in (p.q, p.k, p.v))
    want = np.einsum("btnh,nhd->btd", _np_attention(qx, kx, vx, 0.7), np.asarray(layer.output_linear.weight[...]))
    positions = np.broadcast_to(np.arange(5), (2, 5))
    got = nnx.jit(lambda m, x: m(x, positions=positions).output)(layer, x)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


def np_rope_interleaved(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
    """Rotates each pair (2i, 2i + 1) by angle position * theta^(-2i/Dh), one by one."""
    out = np.array(x, dtype=np.float64)
    dims = x.shape[-1]
    for b, t in np.ndindex(*positions.shape):
        for i in range(dims // 2):
            angle = positions[b, t] * theta ** (-2.0 * i / dims)
            c, s = np.cos(angle), np.sin(angle)
            a, bb = x[b, t, :, 2 * i], x[b, t, :, 2 * i + 1]
            out[b, t, :, 2 * i] = a * c - bb * s
            out[b, t, :, 2 * i + 1] = bb * c + a * s
    return out


def test_interleaved_rope_matches_numpy_reference_and_is_a_permuted_rotate_half():
    x, positions = _normal(2, 5, 3, 8), RNG.integers(0, 100, (2, 5))
    rope = jax.jit(apply_rope, static_argnames=("theta", "rotary_fraction", "layout"))
    got = rope(x, positions, theta=500.0, layout=RoPELayout.INTERLEAVED)
    np.testing.assert_allclose(np.asarray(got), np_rope_interleaved(x, positions, 500.0), rtol=1e-4, atol=1e-4)
    to_half = np.concatenate([np.arange(0, 8, 2), np.arange(1, 8, 2)])  # Pair (2i, 2i+1) -> (i, i + 4).
    half = rope(x[..., to_half], positions, theta=500.0, layout=RoPELayout.ROTATE_HALF)
    np.testing.assert_allclose(np.asarray(got)[..., to_half], np.asarray(half), rtol=1e-5, atol=1e-5)


def test_rope_layout_reaches_the_projection():
    cfg = Attention.default_config().set(input_dim=16, num_heads=2)
    cfg = RoPEModifier.default_config().instantiate()(cfg)
    cfg.input_linear.layout = RoPELayout.INTERLEAVED
    layer = cfg.instantiate(rngs=nnx.Rngs(0))
    x, positions = _normal(1, 4, 16), np.arange(4)[None]
    q = layer.input_linear.rotate(layer.input_linear.project(x), positions).q
    raw = np.einsum("btd,dnh->btnh", x, np.asarray(layer.input_linear.inner.q[...]))
    np.testing.assert_allclose(np.asarray(q), np_rope_interleaved(raw, positions, 10000.0), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("projection", [QKVProjection, FusedQKVProjection])
def test_qkv_and_output_biases_add_to_the_projections(projection):
    cfg = Attention.default_config().set(input_dim=16, num_heads=4, num_kv_heads=2)
    cfg.input_linear = projection.default_config().set(bias=True)
    cfg.output_linear.bias = True
    layer = cfg.instantiate(rngs=nnx.Rngs(0))
    _randomize(layer)
    x = _normal(2, 3, 16)
    plain = cfg.clone()
    plain.input_linear.bias = False
    plain.output_linear.bias = False
    unbiased = plain.instantiate(rngs=nnx.Rngs(0))
    for name in ("q", "k", "v") if projection is QKVProjection else ("qkv",):
        getattr(unbiased.input_linear, name).set_value(getattr(layer.input_linear, name).get_value())
    unbiased.output_linear.weight.set_value(layer.output_linear.weight.get_value())
    got, base = layer.input_linear.project(x), unbiased.input_linear.project(x)
    if projection is QKVProjection:
        biases = [np.asarray(b[...]) for b in (layer.input_linear.q_bias, layer.input_linear.k_bias)]
        biases.append(np.asarray(layer.input_linear.v_bias[...]))
    else:
        fused = np.asarray(layer.input_linear.qkv_bias[...])  # [K, G + 2, Dh]
        biases = [fused[:, :2].reshape(4, -1), fused[:, 2], fused[:, 3]]
    for g, b, bias in zip(got, base, biases):
        np.testing.assert_allclose(np.asarray(g), np.asarray(b) + bias, rtol=1e-5, atol=1e-5)
    heads = np.asarray(_normal(2, 3, 4, 4))
    want = np.asarray(unbiased.output_linear(heads)) + np.asarray(layer.output_linear.bias[...])
    np.testing.assert_allclose(np.asarray(layer.output_linear(heads)), want, rtol=1e-5, atol=1e-5)


def test_bias_on_the_rope_wrapper_is_refused():
    cfg = Attention.default_config().set(input_dim=16, num_heads=2)
    cfg = RoPEModifier.default_config().instantiate()(cfg)
    cfg.input_linear.bias = True
    with pytest.raises(ConfigValueError, match=r"input_linear\.bias: RoPE adds no projection; set inner\.bias"):
        cfg.instantiate(rngs=nnx.Rngs(0))


def test_sandwich_norms_normalize_each_branch_output():
    cfg = TransformerLayer.default_config().set(
        input_dim=8,
        post_attention_norm=RMSNorm.default_config().set(scale_offset=1.0),
        post_feed_forward_norm=RMSNorm.default_config().set(scale_offset=1.0),
    )
    cfg.self_attention.num_heads = 2
    cfg.feed_forward.hidden_dim = 12
    layer = cfg.instantiate(rngs=nnx.Rngs(0))
    _randomize(layer)
    x, positions = _normal(2, 4, 8), np.broadcast_to(np.arange(4), (2, 4))
    got = nnx.jit(lambda m, x: m(x, positions=positions).x)(layer, x)
    attention = layer.self_attention(layer.attention_norm(x), positions=positions).output
    post_attention = np_rms(np.asarray(attention)) * (1 + np.asarray(layer.post_attention_norm.scale[...]))
    h = x + post_attention
    ffn = np.asarray(layer.feed_forward(layer.feed_forward_norm(h)))
    want = h + np_rms(ffn) * (1 + np.asarray(layer.post_feed_forward_norm.scale[...]))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


def test_global_local_modifier_sets_the_local_rope_theta_only():
    layer = TransformerLayer.default_config()
    layer.self_attention.num_heads = 2
    layer = RoPEModifier.default_config().set(theta=1e6).instantiate()(layer)
    stack = RepeatedStack.default_config().set(num_layers=4, layer=layer)
    modifier = GlobalLocalModifier.default_config().set(
        local_layers=3, global_layers=1, sliding_window=8, strip_global_rope=False, local_rope_theta=1e4
    )
    pattern = modifier.instantiate()(stack).pattern
    thetas = [[rope.theta for _, rope in find_configs(layer, RoPEProjection)] for layer in pattern]
    assert thetas == [[1e4], [1e4], [1e4], [1e6]]


def test_rattention_per_head_norm_scale_scales_each_head():
    cfg = RAttention.default_config().set(
        input_dim=16, num_heads=4, sliding_window=2, chunk_size=4, per_head_norm_scale=True
    )
    cfg.feature_map = FeatureMap.RELU_PAIR
    layer = cfg.instantiate(rngs=nnx.Rngs(0))
    assert layer.window_norm.scale[...].shape == layer.linear_norm.scale[...].shape == (4, 4)
    _randomize(layer)
    x, positions = _normal(1, 6, 16), np.arange(6)[None]
    branches = layer.branches(x, positions=positions)
    heads = np_rms(np.asarray(branches.window)) * np.asarray(layer.window_norm.scale[...])
    heads += np_rms(np.asarray(branches.linear)) * np.asarray(layer.linear_norm.scale[...])
    want = np.einsum("btnh,nhd->btd", heads, np.asarray(layer.output_linear.weight[...]))
    got = layer(x, positions=positions).output
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


def test_decoder_logit_softcap_bounds_the_logits():
    cfg = Decoder.default_config().set(vocab_size=32, dim=8, logit_softcap=2.0)
    cfg.stack.set(num_layers=1)
    cfg.stack.layer.self_attention.num_heads = 2
    cfg.stack.layer.feed_forward.hidden_dim = 16
    model = cfg.instantiate(rngs=nnx.Rngs(0))
    ids = np.arange(6)[None]
    capped = np.asarray(model.forward(ids).logits)
    uncapped = np.asarray(Decoder.forward(_without_cap(model), ids).logits)
    np.testing.assert_allclose(capped, 2.0 * np.tanh(uncapped / 2.0), rtol=1e-5, atol=1e-5)


def _without_cap(model: Decoder) -> Decoder:
    cfg = model.config.clone(logit_softcap=None)
    other = cfg.instantiate(rngs=nnx.Rngs(0))
    nnx.update(other, nnx.state(model, nnx.Param))
    return other
