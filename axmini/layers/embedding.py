"""Token embedding, with `attend` for a tied unembedding.

An optional `scale` multiplies the looked-up rows (Gemma's sqrt(dim)), cast to the table's dtype first as Gemma
does (in bfloat16 sqrt(2304) becomes 48.0); `attend` uses the table unscaled.
"""

from __future__ import annotations

import flax.nnx as nnx
import jax
import jax.numpy as jnp

from axmini.config import REQUIRED, FunctionConfigBase, Required, check_positive, config_for_function, optional
from axmini.module import Layer, normal


class Embedding(Layer):
    """Looks up rows of a [num_embeddings, dim] table; `attend(x)` scores x against every row."""

    class Config(Layer.Config):
        num_embeddings: Required[int] = REQUIRED
        dim: Required[int] = REQUIRED
        param_init: FunctionConfigBase = config_for_function(normal)
        scale: float | None = optional(None)

    weight_names = ("weight",)

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        cfg = self.config
        check_positive(cfg, "scale")
        # The input dim of the table is `embed` (what `attend` contracts); the initializer ignores the fan-in.
        self.weight = self.param((cfg.num_embeddings, cfg.dim), axes=("vocab", "embed"), rngs=rngs, fan_in_axes=(1,))

    def __call__(self, ids: jax.Array, dtype: jnp.dtype | None = None) -> jax.Array:
        table = self.read_weight(self.weight)
        rows = jnp.take(table, ids, axis=0)
        if self.config.scale is not None:
            rows = rows * jnp.asarray(self.config.scale, table.dtype)
        return rows.astype(dtype or table.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """Logits [..., num_embeddings] = x @ table^T (the tied output projection)."""
        return jnp.einsum("...d,vd->...v", x, self.read_weight(self.weight).astype(x.dtype))
