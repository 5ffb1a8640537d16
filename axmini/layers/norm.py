"""Normalization layers: RMSNorm and LayerNorm, computed in float32 whatever the input dtype."""

from __future__ import annotations

import flax.nnx as nnx
import jax
import jax.numpy as jnp

from axmini.config import REQUIRED, Required, check_positive
from axmini.module import Layer, constant_init


class RMSNorm(Layer):
    """x / rms(x) * scale, over the last dim."""

    class Config(Layer.Config):
        input_dim: Required[int] = REQUIRED
        eps: float = 1e-6
        # Logical name of the normalized dim (e.g. `head_dim` for a qk-norm).
        axis_name: str = "embed"

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        super().check_config(cfg)
        check_positive(cfg, "input_dim", "eps")

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        cfg = self.config
        self.scale = self.param((cfg.input_dim,), axes=(cfg.axis_name,), rngs=rngs, init=constant_init(1.0))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.config.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class LayerNorm(Layer):
    """(x - mean) / std * scale + bias, over the last dim."""

    class Config(Layer.Config):
        input_dim: Required[int] = REQUIRED
        eps: float = 1e-6
        axis_name: str = "embed"

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        super().check_config(cfg)
        check_positive(cfg, "input_dim", "eps")

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
