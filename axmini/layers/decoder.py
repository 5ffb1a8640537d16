"""A causal language model: token embedding, a stack of layers, a final norm and the logits.

`forward(input_ids, positions=..., segment_ids=..., cache=...)` is the one code path of training,
prefill and extend; `__call__(batch)` returns the weighted cross-entropy loss (plus an optional z-loss)
and metrics. The output projection is tied to the embedding (`lm_head=None`) or a separate Linear.

Mixed precision is three dtypes (`MixedPrecisionModifier`): each layer's `param_dtype`, the decoder's `dtype` for
activations (weights are cast to it where they are used) and `output_dtype` for the logits. Whatever they are,
norms, attention softmax, the MoE router and the loss compute in float32.
"""

from __future__ import annotations

from collections.abc import Mapping
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
    check_non_negative,
    check_positive,
    config_path,
    fill_child,
    find_configs,
    map_configs,
    optional,
)
from axmini.layers.embedding import Embedding
from axmini.layers.linear import Linear
from axmini.layers.norm import RMSNorm
from axmini.layers.transformer import RepeatedStack
from axmini.module import DType, Layer, shard_activation

Array = jax.Array


def _is_non_causal(cfg: ConfigBase) -> bool:
    """A config whose class declares `causal = False` (e.g. expert-choice routing)."""
    return getattr(getattr(cfg, "klass", None), "causal", True) is False


class DecoderOutput(NamedTuple):
    logits: Array  # [B,T,V] in the decoder's output_dtype
    cache: Any | None  # The stack's updated cache (None without a cache).


class Decoder(Layer):
    """Causal LM. Batch keys: input_ids, target_ids [B,T]; optional target_weights, segment_ids, positions.

    Without target_weights, targets equal to `pad_id` (and tokens of segment 0) do not count.
    """

    class Config(Layer.Config):
        vocab_size: Required[int] = REQUIRED
        dim: Required[int] = REQUIRED
        embedding: Embedding.Config = Embedding.default_config()
        stack: Layer.Config = RepeatedStack.default_config()
        output_norm: Layer.Config = RMSNorm.default_config()
        # The output projection [dim, vocab]; None ties it to the embedding (logits = x @ table^T).
        lm_head: Linear.Config | None = None
        # Weight of the z-loss mean(log(Z)^2), which keeps the softmax normalizer near 1. 0: off.
        z_loss_weight: float = 0.0
        pad_id: int = 0
        # Activation (compute) dtype, e.g. jnp.bfloat16 for mixed precision; parameters keep their param_dtype.
        dtype: DType = jnp.float32
        # Logits dtype (the loss computes in float32 either way); bfloat16 halves the largest activation.
        output_dtype: DType = optional(jnp.float32)
        # Logits become cap * tanh(logits / cap) (Gemma 2's final_logit_softcapping), in float32. None: off.
        logit_softcap: float | None = optional(None)

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        cfg = self.config
        check_positive(cfg, "vocab_size", "dim", "logit_softcap")
        check_non_negative(cfg, "z_loss_weight")
        if not 0 <= cfg.pad_id < cfg.vocab_size:
            raise ConfigValueError(
                f"{config_path(cfg, 'pad_id')}={cfg.pad_id} is not a token id of vocab_size={cfg.vocab_size}"
            )
        for child_path, child in find_configs(cfg.stack, _is_non_causal):
            raise ConfigValueError(
                f"{config_path(cfg, 'stack')}.{child_path}: {child.klass.__name__} is not causal (a token's output "
                "would depend on later tokens), so a causal decoder cannot use it; use a causal alternative (for MoE "
                "routing: TopKGating, token choice)"
            )
        embedding = fill_child(cfg.embedding, parent=cfg, num_embeddings=cfg.vocab_size, dim=cfg.dim)
        self.embedding = embedding.instantiate(rngs=rngs)
        self.stack = fill_child(cfg.stack, parent=cfg, input_dim=cfg.dim).instantiate(rngs=rngs)
        self.output_norm = fill_child(cfg.output_norm, parent=cfg, input_dim=cfg.dim).instantiate(rngs=rngs)
        lm_head = None
        if cfg.lm_head is not None:
            # The weight's logical axes are the decoder's choice too: its second dim is the vocabulary.
            lm_head = fill_child(
                cfg.lm_head, parent=cfg, input_dim=cfg.dim, output_dim=cfg.vocab_size, axes=("embed", "vocab")
            )
            lm_head = lm_head.instantiate(rngs=rngs)
        self.lm_head = lm_head

    def forward(
        self,
        input_ids: Array,
        *,
        positions: Array | None = None,
        segment_ids: Array | None = None,
        cache: Any | None = None,
    ) -> DecoderOutput:
        """Logits [B,T,V] for `input_ids` [B,T]. Positions default to 0..T-1 (required with a cache)."""
        cfg = self.config
        if positions is None:
            if cache is not None:
                raise ValueError("Decoder.forward: with a cache, pass the positions of the new tokens")
            positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape)
        x = shard_activation(self.embedding(input_ids, dtype=cfg.dtype), ("batch", "length", "embed"))
        out = self.stack(x, positions=positions, segment_ids=segment_ids, cache=cache)
        x = self.output_norm(out.x)
        logits = self.embedding.attend(x) if self.lm_head is None else self.lm_head(x)
        if cfg.logit_softcap is not None:
            logits = cfg.logit_softcap * jnp.tanh(logits.astype(jnp.float32) / cfg.logit_softcap)
        logits = shard_activation(logits.astype(cfg.output_dtype), ("batch", "length", "vocab"))
        return DecoderOutput(logits, out.cache)

    def __call__(self, batch: Mapping[str, Array]) -> tuple[Array, dict[str, Array]]:
        """(loss, metrics): weighted mean cross-entropy (+ z-loss); metrics loss, cross_entropy, z_loss,
        accuracy, num_tokens."""
        logits = self.forward(
            batch["input_ids"], positions=batch.get("positions"), segment_ids=batch.get("segment_ids")
        ).logits
        return self.loss(logits, batch)

    def loss_weights(self, batch: Mapping[str, Array]) -> Array:
        """[B,T] float32: `target_weights`, or 1 for every target that is not `pad_id` and not in segment 0."""
        weights = batch.get("target_weights")
        if weights is None:
            weights = batch["target_ids"] != self.config.pad_id
            if batch.get("segment_ids") is not None:
                weights &= batch["segment_ids"] != 0
        return weights.astype(jnp.float32)

    def loss(self, logits: Array, batch: Mapping[str, Array]) -> tuple[Array, dict[str, Array]]:
        """(loss, metrics) of `logits` [B,T,V] against the batch's targets (see `__call__`), in float32."""
        cfg = self.config
        logits = logits.astype(jnp.float32)
        targets = batch["target_ids"]
        weights = self.loss_weights(batch)
        # One reduction over the logits serves the normalizer and the accuracy (a target is correct when its logit is
        # the largest; a tie counts as correct): an argmax would read the [B, T, V] logits once more.
        max_logit = jax.lax.stop_gradient(jnp.max(logits, axis=-1))
        log_z = max_logit + jnp.log(jnp.sum(jnp.exp(logits - max_logit[..., None]), axis=-1))
        target_logits = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
        num_tokens = jnp.sum(weights)
        denominator = jnp.maximum(num_tokens, 1.0)
        cross_entropy = jnp.sum((log_z - target_logits) * weights) / denominator
        z_loss = jnp.zeros((), jnp.float32)
        if cfg.z_loss_weight:
            z_loss = cfg.z_loss_weight * jnp.sum(jnp.square(log_z) * weights) / denominator
        correct = (target_logits >= max_logit).astype(jnp.float32)
        loss = cross_entropy + z_loss
        metrics = {
            "loss": loss,
            "cross_entropy": cross_entropy,
            "z_loss": z_loss,
            "accuracy": jnp.sum(correct * weights) / denominator,
            "num_tokens": num_tokens,
        }
        return loss, metrics

    def init_cache(self, batch_size: int, max_length: int, dtype: Any = jnp.float32) -> Any:
        """An empty decoding cache for `batch_size` sequences of up to `max_length` positions."""
        return self.stack.init_cache(batch_size, max_length, dtype)


class MixedPrecisionModifier(ConfigModifier):
    """Sets the dtypes of every decoder in a tree: parameters (the `param_dtype` of each of its layers), activations
    (`dtype`) and logits (`output_dtype`). Norms, softmax and the loss stay in float32 (see the module docstring)."""

    class Config(ConfigModifier.Config):
        param_dtype: Any = jnp.float32
        compute_dtype: Any = jnp.bfloat16
        output_dtype: Any = jnp.float32

    def __call__(self, cfg: ConfigBase) -> ConfigBase:
        mcfg = self.config

        def convert(decoder: ConfigBase) -> ConfigBase:
            for _, layer in find_configs(decoder, Layer.matches):
                layer.param_dtype = mcfg.param_dtype
            return decoder.set(dtype=mcfg.compute_dtype, output_dtype=mcfg.output_dtype)

        return map_configs(cfg, Decoder.matches, convert)
