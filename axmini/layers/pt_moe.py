"""Parallel-Track Mixture of Experts (PT-MoE, Apple Intelligence Foundation Language Models, 2025).

The model is split into `num_tracks` tracks: smaller transformers of the same shape that run side by
side. Each track is a sequence of track blocks of `block_depth` layers; tracks exchange their hidden
states only at block boundaries (the sum or mean over tracks, which every track then continues from).
Inside a block, every other layer's feed-forward can be an MoE with the track's own experts, and the
attention can follow a local/global pattern: the block is an ordinary stack config, so every stack
feature (`GlobalLocalModifier`, `MoEModifier(every=2)`, ...) reaches it unchanged.

Parameters of one block are stacked over tracks (leading logical axis `track`) and the block runs under
`jax.vmap`; with `track` mapped to a mesh axis, each track lives on its own devices and the only
cross-track communication is one all-reduce per block boundary: 1 per `block_depth` layers, where
tensor parallelism needs 2 per layer.

`ParallelTrackStack` fills the decoder's `stack` slot (same call contract as the other stacks).
`pt_moe_tiny()` and `pt_moe_large()` are model configs.
"""

from __future__ import annotations

import enum
from typing import Any

import flax.nnx as nnx
import jax
import jax.numpy as jnp

from axmini.config import (
    REQUIRED,
    ConfigValueError,
    Required,
    check_positive,
    config_for_function,
    config_path,
    fill_child,
)
from axmini.layers.attention import Attention, QKVProjection
from axmini.layers.decoder import Decoder
from axmini.layers.feed_forward import FeedForward
from axmini.layers.moe import MoE, MoEModifier, TopKGating
from axmini.layers.norm import RMSNorm
from axmini.layers.position import RoPEProjection
from axmini.layers.transformer import BaseStack, GlobalLocalModifier, RepeatedStack, StackOutput, TransformerLayer
from axmini.module import AuxLoss, Layer, Summary, normal, resow, shard_activation, stack_modules

Array = jax.Array


class TrackReduction(enum.Enum):
    """How the tracks' hidden states combine at a block boundary."""

    MEAN = "mean"
    SUM = "sum"


def _call_block(block: nnx.Module, x: Array, positions: Array, segment_ids: Array | None, cache: Any) -> StackOutput:
    return block(x, positions=positions, segment_ids=segment_ids, cache=cache)


class ParallelTrackStack(Layer):
    """`num_tracks` tracks of `num_layers` layers each, synchronized every `block_depth` layers.

    `block` is the stack config of one track block (e.g. a `PatternStack` of local/global, dense/MoE
    layers); its `input_dim` and `num_layers` (= block_depth) are set here. The cache is a tuple with one
    entry per block: that block's cache stacked over tracks.
    """

    class Config(Layer.Config):
        input_dim: Required[int] = REQUIRED
        num_layers: Required[int] = REQUIRED  # The depth of each track.
        num_tracks: int = 2
        block_depth: int = 4
        block: BaseStack.Config = RepeatedStack.default_config()
        reduction: TrackReduction = TrackReduction.MEAN

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        cfg = self.config
        check_positive(cfg, "num_tracks", "block_depth", "num_layers")
        if cfg.num_layers % cfg.block_depth:
            raise ConfigValueError(
                f"{config_path(cfg, 'num_layers')}={cfg.num_layers} is not a multiple of "
                f"{config_path(cfg, 'block_depth')}={cfg.block_depth}; each track must be a whole number of blocks"
            )
        block = fill_child(cfg.block, parent=cfg, input_dim=cfg.input_dim, num_layers=cfg.block_depth)
        num_blocks = cfg.num_layers // cfg.block_depth
        self.blocks = nnx.List(
            [stack_modules(block, cfg.num_tracks, axis="track", rngs=rngs) for _ in range(num_blocks)]
        )

    def __call__(
        self, x: Array, *, positions: Array, segment_ids: Array | None = None, cache: Any | None = None
    ) -> StackOutput:
        new_cache = []
        for i, block in enumerate(self.blocks):
            tracks = jnp.broadcast_to(x, (self.config.num_tracks, *x.shape))
            tracks = shard_activation(tracks, ("track", "batch", "length", "embed"))
            out = self._run_tracks(block, tracks, positions, segment_ids, None if cache is None else cache[i])
            new_cache.append(out.cache)
            tracks = shard_activation(out.x, ("track", "batch", "length", "embed"))
            # The block boundary: the only place where tracks see each other.
            x = jnp.sum(tracks, axis=0) if self.config.reduction is TrackReduction.SUM else jnp.mean(tracks, axis=0)
            x = shard_activation(x, ("batch", "length", "embed"))
        return StackOutput(x, tuple(new_cache) if cache is not None else None)

    @staticmethod
    def _run_tracks(
        block: nnx.Module, tracks: Array, positions: Array, segment_ids: Array | None, cache: Any
    ) -> StackOutput:
        """Runs every track's copy of `block` on its own input (vmap over the track axis).

        What the layers sow is captured per track and sown again on `block`: aux losses summed over
        tracks (a scalar, as from one block), summaries stacked over tracks.
        """

        def one_track(module: nnx.Module, x: Array, cache: Any) -> tuple[StackOutput, Any, Any]:
            return nnx.capture(_call_block, AuxLoss, Summary)(module, x, positions, segment_ids, cache)

        # The module goes in as a pytree (graph-mode transforms of a module holding an nnx.List fail while
        # an outer nnx.capture is active); that capture's collections (Intermediate variables) are not per track.
        block_axes = jax.tree.map(
            lambda v: None if isinstance(v, nnx.Intermediate) else 0,
            block,
            is_leaf=lambda v: isinstance(v, nnx.Variable),
        )
        out, losses, summaries = jax.vmap(one_track, in_axes=(block_axes, 0, 0))(block, tracks, cache)
        resow(block, losses, summaries)
        return out

    def init_cache(self, batch_size: int, max_length: int, dtype: Any = jnp.float32) -> Any:
        """Per block, the block's cache stacked over tracks."""
        tracks = self.config.num_tracks
        return tuple(
            jax.tree.map(
                lambda a: jnp.broadcast_to(a, (tracks, *a.shape)), block.init_cache(batch_size, max_length, dtype)
            )
            for block in self.blocks
        )


# ----------------------------------------------------------------------------------------------------
# Model configs.


def pt_moe_decoder(
    *,
    vocab_size: int,
    dim: int,
    num_tracks: int,
    num_blocks: int,
    block_depth: int,
    num_heads: int,
    num_kv_heads: int,
    hidden_dim: int,
    num_experts: int,
    top_k: int,
    sliding_window: int | None,
    local_layers: int = 3,
    global_layers: int = 1,
) -> Decoder.Config:
    """A PT-MoE decoder: tracks of blocks whose layers are RoPE attention + SwiGLU, with every other
    feed-forward an MoE (track-local experts), and `local_layers` sliding-window : `global_layers` global
    (NoPE) attention inside each block when `sliding_window` is set."""
    attention = Attention.default_config().set(
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        input_linear=RoPEProjection.default_config().set(theta=500000.0, inner=QKVProjection.default_config()),
    )
    layer = TransformerLayer.default_config().set(
        self_attention=attention, feed_forward=FeedForward.default_config().set(hidden_dim=hidden_dim)
    )
    stack = ParallelTrackStack.default_config().set(
        num_layers=num_blocks * block_depth,
        num_tracks=num_tracks,
        block_depth=block_depth,
        block=RepeatedStack.default_config().set(layer=layer),
    )
    cfg = Decoder.default_config().set(
        vocab_size=vocab_size, dim=dim, stack=stack, output_norm=RMSNorm.default_config()
    )
    cfg.embedding.param_init = config_for_function(normal, stddev=0.02)
    if sliding_window is not None:
        cfg = (
            GlobalLocalModifier.default_config()
            .set(local_layers=local_layers, global_layers=global_layers, sliding_window=sliding_window)
            .instantiate()(cfg)
        )
    gating = TopKGating.default_config().set(top_k=top_k)
    moe = MoE.default_config().set(num_experts=num_experts, gating=gating)
    return MoEModifier.default_config().set(moe=moe, every=2).instantiate()(cfg)


def pt_moe_tiny() -> Decoder.Config:
    """2 tracks x 2 blocks of 4 layers (3 local : 1 global, MoE every other layer, top-2 of 4), width 64."""
    return pt_moe_decoder(
        vocab_size=2048,
        dim=64,
        num_tracks=2,
        num_blocks=2,
        block_depth=4,
        num_heads=4,
        num_kv_heads=2,
        hidden_dim=128,
        num_experts=4,
        top_k=2,
        sliding_window=64,
    )


def pt_moe_large() -> Decoder.Config:
    """A server-scale PT-MoE shape to inspect with `build_abstract` (32.0B parameters, about 6.7B active):
    4 tracks x 6 blocks of 4 layers, width 2048, 16 heads / 2 KV heads, 3 local (window 4096) : 1 global,
    top-2-of-16 MoE every other layer. An illustration of the architecture, not Apple's published sizes."""
    return pt_moe_decoder(
        vocab_size=153600,
        dim=2048,
        num_tracks=4,
        num_blocks=6,
        block_depth=4,
        num_heads=16,
        num_kv_heads=2,
        hidden_dim=6144,
        num_experts=16,
        top_k=2,
        sliding_window=4096,
    )
