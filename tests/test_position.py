"""RoPE: numpy reference, partial rotary, relative-position property, and the modifier that adds it everywhere."""

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from axmini.config import REQUIRED, ConfigBase, Required
from axmini.layers.attention import (
    Attention,
    BaseQKVProjection,
    FusedQKVProjection,
    QKVProjection,
    QueryOnlyProjection,
)
from axmini.layers.linear import Linear
from axmini.layers.position import RoPEModifier, RoPEProjection, apply_rope


def np_rope(x: np.ndarray, positions: np.ndarray, theta: float, rotary_dims: int) -> np.ndarray:
    """Rotates each pair (i, i + r/2) of the first r dims by angle position * theta^(-2i/r), one by one."""
    out = np.array(x, dtype=np.float64)
    half = rotary_dims // 2
    for b, t in np.ndindex(*positions.shape):
        for i in range(half):
            angle = positions[b, t] * theta ** (-2.0 * i / rotary_dims)
            c, s = np.cos(angle), np.sin(angle)
            a, bb = x[b, t, :, i], x[b, t, :, i + half]
            out[b, t, :, i] = a * c - bb * s
            out[b, t, :, i + half] = bb * c + a * s
    return out


def _inputs(shape=(2, 5, 3, 8), seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape), rng.integers(0, 1000, shape[:2])


# Jitted: eager jax ops each compile, which would dominate the CPU time of these tests.
rope = jax.jit(apply_rope, static_argnames=("theta", "rotary_fraction"))


@pytest.mark.parametrize("fraction, theta", [(1.0, 10000.0), (0.5, 10000.0), (0.25, 500.0)])
def test_apply_rope_matches_numpy_reference(fraction, theta):
    x, positions = _inputs()
    got = rope(x.astype(np.float32), positions, theta=theta, rotary_fraction=fraction)
    want = np_rope(x, positions, theta, int(x.shape[-1] * fraction))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


def test_partial_rotary_leaves_the_other_dims_unchanged():
    x, positions = _inputs()
    got = np.asarray(rope(x.astype(np.float32), positions, rotary_fraction=0.5))
    np.testing.assert_array_equal(got[..., 4:], x[..., 4:].astype(np.float32))  # Pass-through dims: copied exactly.
    assert not np.allclose(got[..., :4], x[..., :4], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_rope_scores_depend_only_on_relative_position(fraction):
    x, positions = _inputs((2, 6, 2, 8))
    q, k = x.astype(np.float32), x[::-1].astype(np.float32)

    def scores(offset, k_offset=0):
        qr = np.asarray(rope(q, positions + offset, rotary_fraction=fraction), np.float64)
        kr = np.asarray(rope(k, positions + offset + k_offset, rotary_fraction=fraction), np.float64)
        return np.einsum("btnh,bsnh->bnts", qr, kr)

    np.testing.assert_allclose(scores(0), scores(1234), rtol=1e-3, atol=1e-3)
    # And the scores really depend on position: rotating k alone changes them.
    assert not np.allclose(scores(0, k_offset=1), scores(0), atol=1e-3)


def test_rope_projection_rotates_the_inner_projection():
    cfg = RoPEProjection.default_config().set(input_dim=16, num_heads=4, num_kv_heads=2, head_dim=8, theta=100.0)
    layer = cfg.instantiate(rngs=nnx.Rngs(0))
    x = np.random.default_rng(1).standard_normal((2, 5, 16), np.float32)
    positions = np.array([[3, 4, 5, 6, 7], [0, 1, 2, 0, 1]])
    q, k, v = nnx.jit(lambda m, x, p: m(x, positions=p))(layer, x, positions)
    q0, k0, v0 = layer.inner.project(x)
    np.testing.assert_allclose(np.asarray(q), np_rope(np.asarray(q0), np.asarray(positions), 100.0, 8), atol=1e-5)
    np.testing.assert_allclose(np.asarray(k), np_rope(np.asarray(k0), np.asarray(positions), 100.0, 8), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(v), np.asarray(v0))


def test_rope_over_query_only_projection_rotates_q_and_has_no_kv():
    cfg = RoPEProjection.default_config().set(
        input_dim=16, num_heads=4, num_kv_heads=2, head_dim=8, inner=QueryOnlyProjection.default_config()
    )
    layer = cfg.instantiate(rngs=nnx.Rngs(0))
    q, k, v = layer(jnp.ones((1, 3, 16)), positions=jnp.arange(3)[None])
    assert q.shape == (1, 3, 4, 8) and k is None and v is None and not layer.has_kv


class _Block(ConfigBase):
    """A test-only config tree: attentions in a field, in a list, and a subclass of Attention."""

    dim: Required[int] = REQUIRED
    attention: Attention.Config = Attention.default_config()
    layers: list = []
    other: Linear.Config = Linear.default_config()


class _OtherAttention(Attention):  # Stands in for RAttention: any subclass of Attention gets the patch.
    class Config(Attention.Config):
        input_linear: BaseQKVProjection.Config = FusedQKVProjection.default_config()
        window: int = 4
        local: Attention.Config | None = None  # A nested attention, as a composite layer could have.


def _tree() -> _Block:
    return _Block(
        dim=8,
        layers=[
            Attention.default_config().set(num_heads=2, sliding_window=4),
            Attention.default_config().set(input_linear=QueryOnlyProjection.default_config()),
            _OtherAttention.default_config(),
        ],
    )


def _input_linear_lines(text: str) -> tuple[list[str], list[str]]:
    lines = text.splitlines()
    return [line for line in lines if ".input_linear." in line], [
        line for line in lines if ".input_linear." not in line
    ]


def test_rope_patch_reaches_every_attention():
    before = _tree()
    after = RoPEModifier.default_config().set(theta=500.0).instantiate()(before)
    wrapped = [after.attention, *after.layers]
    for attention, old in zip(wrapped, [before.attention, *before.layers]):
        assert attention.input_linear.klass is RoPEProjection
        assert attention.input_linear.theta == 500.0
        assert attention.input_linear.inner == old.input_linear
    # Nothing else changed: every line outside the input_linear subtrees is identical.
    assert _input_linear_lines(after.debug_string())[1] == _input_linear_lines(before.debug_string())[1]
    assert before.attention.input_linear.klass is QKVProjection  # The input tree is untouched.


def test_rope_modifier_is_idempotent():
    modifier = RoPEModifier.default_config().instantiate()
    once = modifier(_tree())
    assert modifier(once) == once
    # A layer that already has RoPE keeps its own settings.
    custom = _tree()
    custom.attention.input_linear = RoPEProjection.default_config().set(theta=1e6)
    assert modifier(custom).attention.input_linear.theta == 1e6


class _LookAlike(Linear):  # Has an `input_linear` field, but builds no Attention: it fills no attention slot.
    class Config(Linear.Config):
        input_linear: BaseQKVProjection.Config = QKVProjection.default_config()


def test_rope_recognises_attentions_by_class_not_by_an_input_linear_field():
    after = RoPEModifier.default_config().instantiate()(_Block(dim=4, layers=[_LookAlike.default_config()]))
    assert after.layers[0].input_linear.klass is QKVProjection
    assert after.attention.input_linear.klass is RoPEProjection


def test_rope_reaches_attention_nested_inside_attention_like_config():
    composite = _OtherAttention.default_config().set(local=Attention.default_config())
    after = RoPEModifier.default_config().instantiate()(_Block(dim=4, layers=[composite]))
    assert after.layers[0].input_linear.klass is RoPEProjection
    assert after.layers[0].local.input_linear.klass is RoPEProjection


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(rotary_fraction=0.3), "rotary_fraction"),
        (dict(rotary_fraction=0.0), "rotary_fraction"),
        (dict(rotary_fraction=1.5), "rotary_fraction"),
        (dict(theta=0.0), "theta=0.0"),
        (dict(theta=-1.0), "theta=-1.0"),
    ],
)
def test_bad_rope_config_is_refused_at_build_time(fields, message):
    cfg = Attention.default_config().set(input_dim=16, num_heads=2)
    cfg.input_linear = RoPEProjection.default_config().set(**fields)
    with pytest.raises(ValueError, match=message) as info:
        cfg.instantiate(rngs=nnx.Rngs(0))
    assert "input_linear" in str(info.value)


def test_apply_rope_refuses_odd_rotary_dims():
    with pytest.raises(ValueError, match="positive even integer"):
        apply_rope(jnp.ones((1, 2, 1, 6)), jnp.zeros((1, 2), jnp.int32), rotary_fraction=0.5)
