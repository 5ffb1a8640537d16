"""A dense projection with logical axes on its weight."""

from __future__ import annotations

import flax.nnx as nnx
import jax
import jax.numpy as jnp

from axmini.config import REQUIRED, Required
from axmini.module import Layer, constant_init


class Linear(Layer):
    """y = x @ W (+ b). W is [input_dim, output_dim] with logical `axes`."""

    class Config(Layer.Config):
        input_dim: Required[int] = REQUIRED
        output_dim: Required[int] = REQUIRED
        bias: bool = False
        # Logical names of the weight's two dims; the bias takes the second.
        axes: tuple[str | None, str | None] = ("embed", "mlp")

    weight_names = ("weight",)

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        cfg = self.config
        self.weight = self.param((cfg.input_dim, cfg.output_dim), axes=cfg.axes, rngs=rngs)
        self.bias = (
            self.param((cfg.output_dim,), axes=cfg.axes[1:], rngs=rngs, init=constant_init(0.0)) if cfg.bias else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.einsum("...i,io->...o", x, self.read_weight(self.weight).astype(x.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(x.dtype)
        return y
