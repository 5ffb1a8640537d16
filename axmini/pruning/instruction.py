"""Instruction-following pruning (arXiv 2501.02086): each feed-forward runs only the hidden units that a small mask
predictor picks for the instruction at hand, so a model keeps per-input a fixed budget of its FFN.

`InstructionPrunedLayer` is a TransformerLayer whose feed-forward (a FeedForward of F hidden units) keeps
k = round(active_fraction * F) of them per sequence. Its `predictor` (`MaskPredictor`, a small MLP) reads the mean
of the feed-forward's input over the sequence's instruction, its first `prompt_length` tokens, and scores every
hidden unit; the top k form the mask. Training applies that hard top-k mask and lets the gradient reach the
predictor through sigmoid(scores) (straight-through), so predictor and model learn jointly. Every token of a
sequence, the instruction's included, uses the sequence's mask: the loss on instruction tokens sees the whole
instruction through it (a choice of k units), so weight the loss on responses where that matters. Packed sequences
(segment ids) each get their own mask.

Decoding: the first call with a cache (prefill: the cache holds no units yet) computes each row's mask from its
prompt and gathers the feed-forward's weights, as the feed-forward reads them (through its weight transform, if any:
QAT, LoRA), down to the k active units, per row, into the layer's cache; that call
and every later one run the FeedForward of k units on them, so per-token FFN compute is k/F of the dense layer's.
A prompt shorter than `prompt_length` is used whole.

`InstructionPruningModifier` gives every TransformerLayer of a config tree this behaviour (a feature patch).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.nnx as nnx
import jax
import jax.numpy as jnp

from axmini.config import (
    REQUIRED,
    ConfigBase,
    ConfigModifier,
    ConfigValueError,
    Required,
    check_positive,
    config_path,
    fill_child,
    find_configs,
    replace_config,
)
from axmini.layers.attention import KV
from axmini.layers.feed_forward import FeedForward
from axmini.layers.transformer import BaseStack, LayerOutput, TransformerLayer, maybe_apply
from axmini.module import Layer, constant_init

Array = jax.Array


class MaskPredictor(Layer):
    """Pooled instruction [..., D] -> scores of the hidden units [..., F]: gelu(x @ w_in) @ w_out + bias."""

    class Config(Layer.Config):
        input_dim: Required[int] = REQUIRED  # Filled by the layer: the model width.
        num_units: Required[int] = REQUIRED  # Filled by the layer: the feed-forward's hidden width.
        hidden_dim: int = 64

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        cfg = self.config
        check_positive(cfg, "hidden_dim")
        self.w_in = self.param((cfg.input_dim, cfg.hidden_dim), axes=("embed", None), rngs=rngs)
        self.w_out = self.param((cfg.hidden_dim, cfg.num_units), axes=(None, "mlp"), rngs=rngs)
        self.bias = self.param((cfg.num_units,), axes=("mlp",), rngs=rngs, init=constant_init(0.0))

    def __call__(self, pooled: Array) -> Array:
        h = jax.nn.gelu(pooled.astype(jnp.float32) @ self.w_in[...].astype(jnp.float32))
        return h @ self.w_out[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)


class LayerCache(NamedTuple):
    attention: Any  # The attention's cache.
    units: Array | None  # [B, k] each row's active hidden units (ascending); None before prefill.
    weights: dict[str, Array] | None  # The feed-forward's weights, transformed, gathered to each row's active units.


class InstructionPrunedLayer(TransformerLayer):
    """A TransformerLayer whose feed-forward keeps a per-sequence budget of hidden units; see the module docstring."""

    class Config(TransformerLayer.Config):
        predictor: MaskPredictor.Config = MaskPredictor.default_config()
        active_fraction: float = 0.5  # Of the hidden units, per sequence.
        prompt_length: int = 16  # The instruction: a sequence's first tokens.

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        cfg = self.config
        check_positive(cfg, "prompt_length")
        if not 0 < cfg.active_fraction <= 1:
            raise ConfigValueError(f"{config_path(cfg, 'active_fraction')}={cfg.active_fraction} must be in (0, 1]")
        if not isinstance(self.feed_forward, FeedForward):
            raise ConfigValueError(
                f"{config_path(cfg, 'feed_forward')}: instruction-following pruning masks the hidden units of a "
                f"FeedForward, not of a {type(self.feed_forward).__name__}"
            )
        units = self.feed_forward.hidden_dim
        self.active_units = max(1, round(cfg.active_fraction * units))
        self.predictor = fill_child(cfg.predictor, parent=cfg, input_dim=cfg.input_dim, num_units=units).instantiate(
            rngs=rngs
        )

    def __call__(
        self,
        x: Array,
        *,
        positions: Array,
        segment_ids: Array | None = None,
        cache: LayerCache | None = None,
        shared_kv: KV | None = None,
    ) -> LayerOutput:
        attention_cache, units, weights = (None, None, None) if cache is None else cache
        attn = self.self_attention(
            self.attention_norm(x),
            positions=positions,
            segment_ids=segment_ids,
            cache=attention_cache,
            shared_kv=shared_kv,
        )
        y = x + maybe_apply(self.post_attention_norm, attn.output)
        h = self.feed_forward_norm(y)
        if cache is None:
            out = self.feed_forward(h, unit_mask=self.token_masks(h, positions, segment_ids))
            new_cache = None
        else:
            # Prefill: one sequence per row (segment ids only mark padding), its prompt in these tokens.
            if units is None:
                valid = None if segment_ids is None else (segment_ids != 0).astype(jnp.int32)
                units = self._top_units(self._prompt_means(h, positions, valid, 2)[:, 1])
                weights = self._gather(units)
            out = self._active_feed_forward(h, weights)
            new_cache = LayerCache(attn.cache, units, weights)
        y = y + maybe_apply(self.post_feed_forward_norm, out)
        self._sow_activations(x, y)
        return LayerOutput(y, new_cache, attn.kv)

    def init_cache(self, batch_size: int, max_length: int, dtype: Any = jnp.float32) -> LayerCache:
        return LayerCache(self.self_attention.init_cache(batch_size, max_length, dtype), None, None)

    # ------------------------------------------------------------------------------------------------
    # Masks.

    def _prompt_means(self, h: Array, positions: Array, segment_ids: Array | None, num_segments: int) -> Array:
        """[B, S, D]: the mean of `h` over the prompt tokens (positions < prompt_length) of each segment id < S."""
        segments = jnp.ones(positions.shape, jnp.int32) if segment_ids is None else segment_ids
        prompt = ((positions < self.config.prompt_length) & (segments != 0)).astype(jnp.float32)

        def means(h: Array, segments: Array, prompt: Array) -> Array:
            sums = jax.ops.segment_sum(h.astype(jnp.float32) * prompt[:, None], segments, num_segments=num_segments)
            counts = jax.ops.segment_sum(prompt, segments, num_segments=num_segments)
            return sums / jnp.maximum(counts, 1.0)[:, None]

        return jax.vmap(means)(h, segments, prompt)

    def _top_units(self, pooled: Array) -> Array:
        """[..., k]: the hidden units the predictor scores highest for each pooled instruction, ascending."""
        return jnp.sort(jax.lax.top_k(self.predictor(pooled), self.active_units)[1], axis=-1)

    def token_masks(self, h: Array, positions: Array, segment_ids: Array | None) -> Array:
        """[B, T, F] in {0, 1}: each token's sequence's top-k units, with the straight-through gradient of
        sigmoid(scores) towards the predictor."""
        num_segments = 2 if segment_ids is None else h.shape[1] + 1  # Segment ids are < T + 1.
        pooled = self._prompt_means(h, positions, segment_ids, num_segments)  # [B, S, D]
        scores = self.predictor(pooled)
        top = jax.lax.top_k(scores, self.active_units)[1]
        hard = jnp.put_along_axis(jnp.zeros_like(scores), top, 1.0, axis=-1, inplace=False)
        soft = jax.nn.sigmoid(scores)
        masks = hard + (soft - jax.lax.stop_gradient(soft))  # Exactly `hard`, with the gradient of `soft`.
        segments = jnp.ones(positions.shape, jnp.int32) if segment_ids is None else segment_ids
        return jnp.take_along_axis(masks, segments[..., None], axis=1)

    # ------------------------------------------------------------------------------------------------
    # Decoding with the active units only.

    def _gather(self, units: Array) -> dict[str, Array]:
        """The feed-forward's weights as it reads them (through its weight transform, if any: QAT, LoRA), gathered
        to `units` [B, k] along their `mlp` axis: [B, ...] per weight name."""
        ff = self.feed_forward

        def gather(weight: nnx.Param) -> Array:
            value, axes = ff.read_weight(weight), weight.get_metadata()["axes"]
            axis = axes.index("mlp") - (len(axes) - value.ndim)  # In a scanned stack, axes still name `layers`.
            return jnp.moveaxis(jnp.take(value, units, axis=axis), axis, 0)

        return {name: gather(getattr(ff, name)) for name in ff.weight_names if hasattr(ff, name)}

    def _active_feed_forward(self, h: Array, weights: dict[str, Array]) -> Array:
        """Each row of `h` [B, T, D] through the plain FeedForward of its k active units (`weights`, gathered per row,
        already transformed)."""
        active = self.feed_forward.config.clone(hidden_dim=self.active_units, weight_transform=None)
        graphdef, abstract = nnx.split(nnx.eval_shape(lambda: active.instantiate(rngs=nnx.Rngs(0))))

        def run(weights: dict[str, Array], row: Array) -> Array:
            state = nnx.from_flat_state(
                [(path, v.replace(weights[path[0]])) for path, v in nnx.to_flat_state(abstract)]
            )
            return nnx.merge(graphdef, state)(row)

        return jax.vmap(run)(weights, h)


class InstructionPruningModifier(ConfigModifier):
    """Turns every TransformerLayer of a tree into an InstructionPrunedLayer with these settings."""

    class Config(ConfigModifier.Config):
        active_fraction: float = 0.5
        prompt_length: int = 16
        predictor: MaskPredictor.Config = MaskPredictor.default_config()

    def __call__(self, cfg: ConfigBase) -> ConfigBase:
        mcfg = self.config
        for path, stack in find_configs(cfg, BaseStack.matches):
            if stack.kv_sharing is not None:
                raise ConfigValueError(
                    f"InstructionPruningModifier: {path or '<root>'}.kv_sharing={stack.kv_sharing}: layers reading "
                    "another layer's keys/values keep no cache, where decoding keeps the active units; set it to None"
                )
        layer = InstructionPrunedLayer.default_config().set(
            active_fraction=mcfg.active_fraction, prompt_length=mcfg.prompt_length, predictor=mcfg.predictor
        )
        return replace_config(cfg, target=TransformerLayer, new=layer)
