"""Normalization layers: RMSNorm and LayerNorm, computed in float32 whatever the input dtype."""

from __future__ import annotations

import flax.nnx as nnx
import jax
import jax.numpy as jnp

from axmini.config import REQUIRED, Required, check_positive, optional
from axmini.module import Layer, constant_init


class RMSNorm(Layer):
    """x / rms(x) * (scale + scale_offset), over the last dim.

    `scale_offset=1` is Gemma's `x * (1 + w)`: the stored weight is then the offset from 1 (initialized to 0).
    With `heads` set, each head has its own scale: the scale is [heads, input_dim] for inputs [..., heads, input_dim]
    (RAttention's per-head branch norms, as AXLearn's).
    """

    class Config(Layer.Config):
        input_dim: Required[int] = REQUIRED
        eps: float = 1e-6
        # Logical name of the normalized dim (e.g. `head_dim` for a qk-norm).
        axis_name: str = "embed"
        scale_offset: float = optional(0.0)
        heads: int | None = optional(None)

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        cfg = self.config
        check_positive(cfg, "heads")
        shape, axes = (cfg.input_dim,), (cfg.axis_name,)
        if cfg.heads is not None:
            shape, axes = (cfg.heads, *shape), ("heads", *axes)
        self.scale = self.param(shape, axes=axes, rngs=rngs, init=constant_init(1.0 - cfg.scale_offset))

    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + cfg.eps)
        scale = self.scale[...].astype(jnp.float32)
        if cfg.scale_offset:
            scale = scale + cfg.scale_offset
        return (y * scale).astype(x.dtype)


class LayerNorm(Layer):
    """(x - mean) / std * scale + bias, over the last dim."""

    class Config(Layer.Config):
        input_dim: Required[int] = REQUIRED
        eps: float = 1e-6
        axis_name: str = "embed"

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        cfg = self.config
        self.scale = self.param((cfg.input_dim,), axes=(cfg.axis_name,), rngs=rngs, init=constant_init(1.0))
        self.bias = self.param((cfg.input_dim,), axes=(cfg.axis_name,), rngs=rngs, init=constant_init(0.0))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.config.eps)
        return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)
