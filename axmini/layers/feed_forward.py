"""The transformer's feed-forward block: gated (SwiGLU, GeGLU) or plain (GELU, ReLU, SiLU) MLP.

Gated: y = (act(x @ wi_0) * (x @ wi_1)) @ wo. Plain: y = act(x @ wi) @ wo. The hidden width is an int
or a deferred value (`config_for_function(scale_hidden_dim, scale=8/3, multiple_of=256)`) resolved with
the layer's `input_dim`, so one config scales with the model width.
"""

from __future__ import annotations

import enum
import math

import flax.nnx as nnx
import jax
import jax.numpy as jnp

from axmini.config import REQUIRED, ConfigValueError, FunctionConfigBase, Required, config_path, maybe_instantiate
from axmini.module import Layer, shard_activation


class FeedForwardActivation(enum.Enum):
    """The nonlinearity; the *GLU members are gated (two input projections)."""

    SWIGLU = "swiglu"
    GEGLU = "geglu"
    GELU = "gelu"
    RELU = "relu"
    SILU = "silu"

    @property
    def gated(self) -> bool:
        return self in (FeedForwardActivation.SWIGLU, FeedForwardActivation.GEGLU)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self in (FeedForwardActivation.SWIGLU, FeedForwardActivation.SILU):
            return jax.nn.silu(x)
        if self in (FeedForwardActivation.GEGLU, FeedForwardActivation.GELU):
            return jax.nn.gelu(x, approximate=True)
        return jax.nn.relu(x)


def scale_hidden_dim(input_dim: int, scale: float = 8 / 3, multiple_of: int = 256) -> int:
    """`scale * input_dim` rounded up to a multiple of `multiple_of` (Llama's 8/3 keeps SwiGLU at 4x MLP cost)."""
    return multiple_of * math.ceil(scale * input_dim / multiple_of)


class FeedForward(Layer):
    """[B, T, D] -> [B, T, D] MLP. Weights: wi_0, wi_1 [D, F] and wo [F, D] (gated); wi [D, F], wo (plain)."""

    class Config(Layer.Config):
        input_dim: Required[int] = REQUIRED
        # An int, or a function config called with input_dim= (e.g. scale_hidden_dim).
        hidden_dim: Required[int | FunctionConfigBase] = REQUIRED
        activation: FeedForwardActivation = FeedForwardActivation.SWIGLU

    weight_names = ("wi_0", "wi_1", "wi", "wo")

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        cfg = self.config
        hidden = self.hidden_dim
        if hidden <= 0:
            raise ConfigValueError(
                f"{config_path(cfg, 'hidden_dim')} resolved to {hidden} (input_dim={cfg.input_dim}); "
                "set a positive hidden_dim"
            )
        shape_in, shape_out = (cfg.input_dim, hidden), (hidden, cfg.input_dim)
        if cfg.activation.gated:
            self.wi_0 = self.param(shape_in, axes=("embed", "mlp"), rngs=rngs)
            self.wi_1 = self.param(shape_in, axes=("embed", "mlp"), rngs=rngs)
        else:
            self.wi = self.param(shape_in, axes=("embed", "mlp"), rngs=rngs)
        self.wo = self.param(shape_out, axes=("mlp", "embed"), rngs=rngs)

    @property
    def hidden_dim(self) -> int:
        """The resolved hidden width F."""
        return int(maybe_instantiate(self.config.hidden_dim, input_dim=self.config.input_dim))

    def __call__(self, x: jax.Array) -> jax.Array:
        act = self.config.activation
        if act.gated:
            h = act(self._project(x, self.wi_0)) * self._project(x, self.wi_1)
        else:
            h = act(self._project(x, self.wi))
        h = shard_activation(h, ("batch", "length", "mlp"))
        y = jnp.einsum("...f,fd->...d", h, self.read_weight(self.wo).astype(x.dtype))
        return shard_activation(y, ("batch", "length", "embed"))

    def _project(self, x: jax.Array, w: nnx.Param) -> jax.Array:
        return jnp.einsum("...d,df->...f", x, self.read_weight(w).astype(x.dtype))
