"""Rotary position embedding (RoPE) as a wrapper of any QKV projection, and the modifier that applies it.

`RoPEProjection` implements the QKV projection slot around another projection: `project` delegates, and
`rotate` rotates q and k by their token positions. Because it is just another filler of the slot,
`RoPEModifier` adds RoPE to every attention of a model (full, local, query-only consumers, RAttention)
with one config rewrite, and no layer changes.
"""

from __future__ import annotations

import enum

import flax.nnx as nnx
import jax
import jax.numpy as jnp

from axmini.config import (
    ConfigBase,
    ConfigModifier,
    ConfigValueError,
    check_positive,
    config_path,
    fill_child,
    optional,
)
from axmini.layers.attention import QKV, BaseQKVProjection, QKVProjection, map_attention_configs

Array = jax.Array


def rotary_dim(head_dim: int, rotary_fraction: float) -> int:
    """The number of leading head dims that rotate: head_dim * rotary_fraction, which must be a positive
    even integer."""
    dims = head_dim * rotary_fraction
    if not 0 < rotary_fraction <= 1 or dims != int(dims) or int(dims) % 2:
        raise ValueError(
            f"rotary_fraction={rotary_fraction} of head_dim={head_dim} gives {dims} rotated dims; "
            "need a fraction in (0, 1] that gives a positive even integer"
        )
    return int(dims)


class RoPELayout(enum.Enum):
    """Which head dims rotate together, as the pair of the i-th frequency."""

    ROTATE_HALF = "rotate_half"  # (i, i + r/2): Hugging Face, Llama, Gemma.
    INTERLEAVED = "interleaved"  # (2i, 2i + 1): AXLearn, GPT-J, the RoFormer paper.


def apply_rope(
    x: Array,
    positions: Array,
    *,
    theta: float = 10000.0,
    rotary_fraction: float = 1.0,
    layout: RoPELayout = RoPELayout.ROTATE_HALF,
) -> Array:
    """Rotates x [B,T,N,Dh] by `positions` [B,T] (computed in float32, returned in x's dtype).

    The first r = Dh * rotary_fraction dims rotate, the i-th pair at frequency theta^(-2i/r), the pairs laid out
    as `layout` says; the other dims pass through unchanged.
    """
    r = rotary_dim(x.shape[-1], rotary_fraction)
    freqs = theta ** (-jnp.arange(0, r, 2, dtype=jnp.float32) / r)  # [r/2]
    angles = positions.astype(jnp.float32)[:, :, None, None] * freqs  # [B,T,1,r/2]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x32 = x.astype(jnp.float32)
    rotating, rest = x32[..., :r], x32[..., r:]
    if layout is RoPELayout.ROTATE_HALF:
        x1, x2 = rotating[..., : r // 2], rotating[..., r // 2 :]
        rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    else:
        x1, x2 = rotating[..., 0::2], rotating[..., 1::2]
        rotated = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(rotating.shape)
    return jnp.concatenate([rotated, rest], axis=-1).astype(x.dtype)


class RoPEProjection(BaseQKVProjection):
    """The `inner` projection, with q and k rotated by position (after the inner's own `rotate`)."""

    class Config(BaseQKVProjection.Config):
        inner: BaseQKVProjection.Config = QKVProjection.default_config()
        theta: float = 10000.0
        # Fraction of head_dim that rotates (partial rotary embedding); 1.0 rotates all of it.
        rotary_fraction: float = 1.0
        layout: RoPELayout = optional(RoPELayout.ROTATE_HALF)

    wraps_projection = True

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        cfg = self.config
        check_positive(cfg, "theta")
        if cfg.bias:
            raise ConfigValueError(f"{config_path(cfg, 'bias')}: RoPE adds no projection; set inner.bias instead")
        try:
            rotary_dim(cfg.head_dim, cfg.rotary_fraction)
        except ValueError as e:
            raise ConfigValueError(f"{config_path(cfg, 'rotary_fraction')}: {e}") from None
        dims = {name: getattr(cfg, name) for name in ("input_dim", "num_heads", "num_kv_heads", "head_dim")}
        self.inner = fill_child(cfg.inner, parent=cfg, **dims).instantiate(rngs=rngs)

    @property
    def has_kv(self) -> bool:
        return self.inner.has_kv

    def project(self, x: Array) -> QKV:
        return self.inner.project(x)

    def rotate(self, qkv: QKV, positions: Array) -> QKV:
        cfg = self.config
        q, k, v = self.inner.rotate(qkv, positions)
        rope = dict(theta=cfg.theta, rotary_fraction=cfg.rotary_fraction, layout=cfg.layout)
        return QKV(apply_rope(q, positions, **rope), apply_rope(k, positions, **rope) if k is not None else None, v)


class RoPEModifier(ConfigModifier):
    """Wraps the `input_linear` of every attention-like config in a tree with RoPE.

    Idempotent: a projection that already has RoPE keeps it as it is (with its own theta), so a model
    that sets a different theta per layer keeps that choice.
    """

    class Config(ConfigModifier.Config):
        theta: float = 10000.0
        rotary_fraction: float = 1.0

    def __call__(self, cfg: ConfigBase) -> ConfigBase:
        rope = RoPEProjection.default_config().set(theta=self.config.theta, rotary_fraction=self.config.rotary_fraction)

        def wrap(attention: ConfigBase) -> ConfigBase:
            if not RoPEProjection.matches(attention.input_linear):
                attention.input_linear = rope.clone(inner=attention.input_linear)
            return attention

        return map_attention_configs(cfg, wrap)
