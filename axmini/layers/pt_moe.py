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

`ParallelTrackStack` fills the decoder's `stack` slot (same call contract as the other stacks); the PT-MoE model
configs are in `experiments/decoders.py`.
"""

from __future__ import annotations

import enum
from typing import Any

import flax.nnx as nnx
import jax
import jax.numpy as jnp

from axmini.config import REQUIRED, ConfigValueError, Required, check_positive, config_path, fill_child
from axmini.layers.transformer import BaseStack, RepeatedStack, StackOutput
from axmini.module import AuxLoss, Layer, Summary, resow, shard_activation, stack_modules

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
