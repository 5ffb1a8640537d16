"""Named decoder model configs: functions returning a `Decoder.Config` (the trainer wraps them into experiments).

- `tiny_decoder()`: a 2-layer, 64-wide Llama-style model that trains in seconds on CPU.
- `llama_decoder(size)`: Llama-style (RMSNorm, SwiGLU, RoPE, GQA where the real model has it) at sizes
  "tiny", "100m", "1b" (Llama 3.2 1B), "7b" (Llama 2 7B), "70b" (Llama 2 70B).
- `afm_on_device()`: the Apple Intelligence on-device foundation model (tech report 2025): 56 layers,
  width 2048, 16 heads / 2 KV heads, SwiGLU 6656, qk-norm, tied embeddings, RoPE theta 5e5, vocab 153600,
  KV-cache sharing between a 35-layer and a 21-layer block (5:3).
- `afm_on_device_global_local()`: the same with 3 local (window 4096, RoPE) : 1 global (NoPE) layers.
- `pt_moe_tiny()`, `pt_moe_large()`: Parallel-Track MoE decoders (tracks of blocks, MoE every other layer).
- `rattention_variant(model)`: any of them with RAttention (KV sharing off, 3 local RAttention : 1 global).

`MODELS` maps the dense models' names to their functions; tests keep a golden file of each config and its parameter
shapes (the PT-MoE and RAttention models have golden files as experiments, `experiments/variants.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

from axmini.config import ConfigBase, ConfigValueError, FunctionConfigBase, config_for_function, map_configs
from axmini.layers.attention import Attention, QKVProjection
from axmini.layers.decoder import Decoder
from axmini.layers.feed_forward import FeedForward, FeedForwardActivation, scale_hidden_dim
from axmini.layers.linear import Linear
from axmini.layers.moe import MoE, MoEModifier, TopKGating
from axmini.layers.norm import RMSNorm
from axmini.layers.position import RoPEProjection
from axmini.layers.pt_moe import ParallelTrackStack
from axmini.layers.rattention import RAttentionLayout, RAttentionModifier
from axmini.layers.transformer import BaseStack, GlobalLocalModifier, RepeatedStack, TransformerLayer
from axmini.module import normal


class DecoderShape(NamedTuple):
    """The hyperparameters that differ between sizes of one model family."""

    vocab_size: int
    dim: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    hidden_dim: int | FunctionConfigBase
    rope_theta: float = 10000.0
    tied_embeddings: bool = False
    qk_norm: bool = False
    kv_sharing: tuple[int, int] | None = None
    norm_eps: float = 1e-5


_LLAMA_SIZES: dict[str, DecoderShape] = {
    "tiny": DecoderShape(32000, 64, 2, 4, 2, config_for_function(scale_hidden_dim, scale=8 / 3, multiple_of=32)),
    "100m": DecoderShape(32000, 768, 12, 12, 12, 2048, tied_embeddings=True),
    "1b": DecoderShape(128256, 2048, 16, 32, 8, 8192, rope_theta=500000.0, tied_embeddings=True),
    "7b": DecoderShape(32000, 4096, 32, 32, 32, 11008),
    "70b": DecoderShape(32000, 8192, 80, 64, 8, 28672),
}


def decoder_config(shape: DecoderShape) -> Decoder.Config:
    """A pre-norm decoder of `shape`: RMSNorm, SwiGLU, RoPE on every attention, scanned layers."""
    attention = Attention.default_config().set(
        num_heads=shape.num_heads,
        num_kv_heads=shape.num_kv_heads,
        input_linear=RoPEProjection.default_config().set(theta=shape.rope_theta, inner=QKVProjection.default_config()),
        qk_norm=RMSNorm.default_config().set(eps=shape.norm_eps) if shape.qk_norm else None,
    )
    layer = TransformerLayer.default_config().set(
        norm=RMSNorm.default_config().set(eps=shape.norm_eps),
        self_attention=attention,
        feed_forward=FeedForward.default_config().set(
            hidden_dim=shape.hidden_dim, activation=FeedForwardActivation.SWIGLU
        ),
    )
    cfg = Decoder.default_config().set(
        vocab_size=shape.vocab_size,
        dim=shape.dim,
        stack=RepeatedStack.default_config().set(num_layers=shape.num_layers, kv_sharing=shape.kv_sharing, layer=layer),
        output_norm=RMSNorm.default_config().set(eps=shape.norm_eps),
        lm_head=None if shape.tied_embeddings else Linear.default_config(),
    )
    cfg.embedding.param_init = config_for_function(normal, stddev=0.02)
    return cfg


def llama_decoder(size: str) -> Decoder.Config:
    """A Llama-style decoder of `size`: one of "tiny", "100m", "1b", "7b", "70b"."""
    if size not in _LLAMA_SIZES:
        raise ConfigValueError(f"llama_decoder: unknown size {size!r}; choose one of {sorted(_LLAMA_SIZES)}")
    return decoder_config(_LLAMA_SIZES[size])


def tiny_decoder() -> Decoder.Config:
    """2 layers, width 64, 4 heads / 2 KV heads, vocab 2048: a full train step takes milliseconds on CPU."""
    return decoder_config(DecoderShape(2048, 64, 2, 4, 2, 192, tied_embeddings=True))


_AFM_ON_DEVICE = DecoderShape(
    vocab_size=153600,
    dim=2048,
    num_layers=56,
    num_heads=16,
    num_kv_heads=2,
    hidden_dim=6656,
    rope_theta=500000.0,
    tied_embeddings=True,
    qk_norm=True,
    kv_sharing=(5, 3),  # Block 1: 35 layers (62.5%), block 2: 21 layers reading block 1's last KV.
    norm_eps=1e-6,
)


def afm_on_device() -> Decoder.Config:
    """Apple's ~3B on-device model: 56 layers split 35 + 21 by KV-cache sharing."""
    return decoder_config(_AFM_ON_DEVICE)


def afm_on_device_global_local() -> Decoder.Config:
    """`afm_on_device` with a 3 local (window 4096, RoPE) : 1 global (NoPE) layer pattern.

    The KV-sharing split moves to 36 + 20 (9:5): the layer whose keys/values the second block reads must be
    global, since a local layer's cache holds only its window (at 35 + 21 it would be a local layer).
    """
    cfg = decoder_config(_AFM_ON_DEVICE._replace(kv_sharing=(9, 5)))
    modifier = GlobalLocalModifier.default_config().set(local_layers=3, global_layers=1, sliding_window=4096)
    return modifier.instantiate()(cfg)


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


def rattention_variant(
    model: ConfigBase, *, sliding_window: int = 512, layout: RAttentionLayout = RAttentionLayout.LOCAL_GLOBAL
) -> ConfigBase:
    """The RAttention variant of a model config: KV sharing off (RAttention keeps its own keys), then
    `RAttentionModifier` with `layout` (default: 3 local RAttention : 1 global NoPE attention, window 512)."""
    model = map_configs(model, BaseStack.matches, lambda stack: stack.set(kv_sharing=None))
    modifier = RAttentionModifier.default_config().set(sliding_window=sliding_window, layout=layout)
    return modifier.instantiate()(model)


MODELS: dict[str, Callable[[], Decoder.Config]] = {
    "tiny_decoder": tiny_decoder,
    **{f"llama_{size}": partial(llama_decoder, size) for size in _LLAMA_SIZES},
    "afm_on_device": afm_on_device,
    "afm_on_device_global_local": afm_on_device_global_local,
}
