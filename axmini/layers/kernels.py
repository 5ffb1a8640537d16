"""Attention kernels: how softmax(q k^T * scale) v is computed. One slot (`Attention.Config.kernel`), one interface.

`kernel(q, k, v, mask, logit_softcap=..., query_scale=...)` takes q [B,T,H,Dh], k and v [B,S,K,Dh] (grouped-query
when K < H) and an `AttentionMask` saying which keys each query sees; it returns [B,T,H,Dh], zero for a query that
sees no key. `query_scale` is the logits' factor (None: 1 / sqrt(Dh)); `logit_softcap` caps the scaled logits.

- `ReferenceKernel`: einsum and an explicit [B,T,S] mask, logits and softmax in float32: what the tests trust.
- `XLAKernel`: `jax.nn.dot_product_attention(implementation="xla")` with the same mask.
  Both are `DenseKernel`s: a long sliding window is attended in blocks (`blocked_window_attention`: each block of
  queries against its own and the previous key blocks), so memory is O(T * window), not O(T^2).
- `CudnnKernel` (GPU): cuDNN flash attention, `jax.nn.dot_product_attention(implementation="cudnn",
  is_causal=True, local_window_size=...)`; segment ids as per-row sequence lengths or cuDNN's packed layout.
- `SplashKernel` (TPU): Pallas splash attention (causal, local window, segment ids, soft-capping).

The two flash kernels mask by token index, so they run only where that equals masking by position: the training
forward (`mask.aligned` with S == T: the keys are the queries' own tokens, positions increasing by one within each
segment, as packing makes them). Anything else goes to the kernel's `fallback` (a DenseKernel), and
`unsupported_reason` says why: a decode step against a cache, soft-capping or float32 on cuDNN, another backend.
That function is how the selection is tested on CPU. Mesh rules pick the kernel per backend
(`AttentionKernelModifier` in attention.py: cuDNN for gpu-*, splash for tpu-*).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from axmini.config import Configurable, check_positive, optional
from axmini.module import current_sharding_context, logical_to_spec

Array = jax.Array


class AttentionMask(NamedTuple):
    """Which keys each query sees: key s is visible to query t when `0 <= kv_positions[s] <= q_positions[t]`,
    `q_positions[t] - kv_positions[s] <= sliding_window` (when set), and both have the same non-zero segment id
    (when segment ids are given). Position -1 marks an empty cache slot; segment id 0 marks padding."""

    q_positions: Array  # [B,T] int32
    kv_positions: Array  # [B,S] int32
    q_segment_ids: Array | None = None  # [B,T]
    kv_segment_ids: Array | None = None  # [B,S]
    sliding_window: int | None = None
    # The last T keys are the queries' own tokens, in order (training forward: S == T; RAttention: a buffer of earlier
    # tokens, then these). Kernels that mask by index (flash attention, blocked windows) need it.
    aligned: bool = False

    def dense(self) -> Array:
        """[B,T,S] bool: query t may attend key s."""
        qp, kp = self.q_positions[:, :, None], self.kv_positions[:, None, :]
        mask = (kp >= 0) & (kp <= qp)
        if self.sliding_window is not None:
            mask &= qp - kp <= self.sliding_window
        if self.q_segment_ids is not None:
            mask &= self.q_segment_ids[:, :, None] != 0
        if self.kv_segment_ids is not None:
            mask &= self.kv_segment_ids[:, None, :] != 0
        if self.q_segment_ids is not None and self.kv_segment_ids is not None:
            mask &= self.q_segment_ids[:, :, None] == self.kv_segment_ids[:, None, :]
        return mask

    def valid_queries(self) -> Array:
        """[B,T] bool: queries that are tokens (not padding); in an aligned mask each sees at least itself."""
        valid = self.q_positions >= 0
        return valid if self.q_segment_ids is None else valid & (self.q_segment_ids != 0)


class BaseAttentionKernel(Configurable):
    """`kernel(q, k, v, mask, logit_softcap=None, query_scale=None)` -> [B,T,H,Dh] in q's dtype; see the module
    docstring."""

    def __call__(
        self,
        q: Array,
        k: Array,
        v: Array,
        mask: AttentionMask,
        *,
        logit_softcap: float | None = None,
        query_scale: float | None = None,
    ) -> Array:
        raise NotImplementedError(type(self))


# ----------------------------------------------------------------------------------------------------
# Kernels with an explicit mask.


def reference_attention(
    q: Array,
    k: Array,
    v: Array,
    mask: Array,
    *,
    logit_softcap: float | None = None,
    query_scale: float | None = None,
) -> Array:
    """softmax(q k^T * query_scale) v with q [B,T,H,Dh], k/v [B,S,K,Dh], mask [B,T,S]; logits in float32.
    `query_scale` None is 1 / sqrt(Dh)."""
    b, t, h, dh = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, h // kv_heads, dh)
    logits = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    logits = logits / math.sqrt(dh) if query_scale is None else logits * query_scale
    if logit_softcap is not None:
        logits = logit_softcap * jnp.tanh(logits / logit_softcap)
    logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, h, dh)


class DenseKernel(BaseAttentionKernel):
    """A kernel that reads an explicit [B,T,S] mask; long aligned sliding windows go in blocks of queries."""

    class Config(BaseAttentionKernel.Config):
        # Aligned sliding-window attention over more than `window_block_size + window` queries runs in blocks of this
        # many queries, each against its own and the previous key blocks: memory O(T * window). None: one full mask.
        window_block_size: int | None = 512

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        check_positive(self.config, "window_block_size")

    def __call__(
        self,
        q: Array,
        k: Array,
        v: Array,
        mask: AttentionMask,
        *,
        logit_softcap: float | None = None,
        query_scale: float | None = None,
    ) -> Array:
        block = self.config.window_block_size
        attend = functools.partial(self.attend, logit_softcap=logit_softcap, query_scale=query_scale)
        if mask.aligned and mask.sliding_window is not None and block is not None:
            if q.shape[1] > block + mask.sliding_window:
                return blocked_window_attention(q, k, v, mask, block_size=block, attend=attend)
        return attend(q, k, v, mask)

    def attend(
        self,
        q: Array,
        k: Array,
        v: Array,
        mask: AttentionMask,
        *,
        logit_softcap: float | None = None,
        query_scale: float | None = None,
    ) -> Array:
        """Attention under the full [B,T,S] mask of `mask` (never blocked); rows with nothing visible are zero."""
        dense = mask.dense()
        k, v = k.astype(q.dtype), v.astype(q.dtype)
        out = self.attend_dense(q, k, v, dense, logit_softcap=logit_softcap, query_scale=query_scale)
        return jnp.where(jnp.any(dense, axis=-1)[:, :, None, None], out, 0).astype(q.dtype)

    def attend_dense(
        self, q: Array, k: Array, v: Array, mask: Array, *, logit_softcap: float | None, query_scale: float | None
    ) -> Array:
        """Attention under a [B,T,S] bool mask (rows with nothing visible: any value, zeroed by `attend`)."""
        raise NotImplementedError(type(self))


class ReferenceKernel(DenseKernel):
    """einsum + mask (`reference_attention`)."""

    def attend_dense(
        self, q: Array, k: Array, v: Array, mask: Array, *, logit_softcap: float | None, query_scale: float | None
    ) -> Array:
        return reference_attention(q, k, v, mask, logit_softcap=logit_softcap, query_scale=query_scale)


class XLAKernel(DenseKernel):
    """`jax.nn.dot_product_attention(implementation="xla")` with the mask (soft-capping: the reference math)."""

    def attend_dense(
        self, q: Array, k: Array, v: Array, mask: Array, *, logit_softcap: float | None, query_scale: float | None
    ) -> Array:
        if logit_softcap is not None:
            return reference_attention(q, k, v, mask, logit_softcap=logit_softcap, query_scale=query_scale)
        return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=query_scale, implementation="xla")


def _pad_time(x: Array, before: int, after: int, value: int | float = 0) -> Array:
    pad = [(0, 0)] * x.ndim
    pad[1] = (before, after)
    return jnp.pad(x, pad, constant_values=value)


def blocked_window_attention(
    q: Array,
    k: Array,
    v: Array,
    mask: AttentionMask,
    *,
    block_size: int,
    attend: Callable[[Array, Array, Array, AttentionMask], Array],
) -> Array:
    """Sliding-window attention in blocks of `block_size` queries, each against its own key block and the
    ceil(window / block_size) key blocks before it: O(T * window) memory and work instead of O(T * S).

    `mask` must be aligned (the last T of the S keys are the queries' own tokens; earlier keys are a buffer, e.g.
    RAttention's) with a sliding window. Inside a block the mask is the exact position mask, so the result equals
    the full-mask attention whenever positions increase within each segment (then every visible key lies within
    `window` indices before its query). `attend(q, k, v, block_mask)` runs one folded batch of blocks.
    """
    batch, length, heads, head_dim = q.shape
    window = mask.sliding_window
    before = k.shape[1] - length  # Keys in front of the queries' own tokens.
    block = min(block_size, length)
    blocks = math.ceil(length / block)
    back = math.ceil(window / block)  # Previous key blocks a query block can reach.
    tail = blocks * block - length

    def keys(x: Array | None, fill: int | float) -> Array | None:
        """[B, S, ...] -> [B, blocks, (back + 1) * block, ...]: the keys of each query block's window."""
        if x is None:
            return None
        x = _pad_time(x, max(0, back * block - before), tail, fill)[:, max(0, before - back * block) :]
        x = x.reshape(batch, back + blocks, block, *x.shape[2:])
        x = jnp.concatenate([x[:, i : i + blocks] for i in range(back + 1)], axis=2)
        return x.reshape(batch * blocks, *x.shape[2:])

    def queries(x: Array | None, fill: int | float) -> Array | None:
        if x is None:
            return None
        x = _pad_time(x, 0, tail, fill)
        return x.reshape(batch * blocks, block, *x.shape[2:])

    block_mask = AttentionMask(
        queries(mask.q_positions, -1),
        keys(mask.kv_positions, -1),
        queries(mask.q_segment_ids, 0),
        keys(mask.kv_segment_ids, 0),
        window,
    )
    out = attend(queries(q, 0), keys(k, 0), keys(v, 0), block_mask)
    return out.reshape(batch, blocks * block, heads, head_dim)[:, :length]


# ----------------------------------------------------------------------------------------------------
# Flash kernels: used where they can run, the fallback elsewhere.


class FlashKernel(BaseAttentionKernel):
    """A fused kernel for one backend that masks by index; other calls go to `fallback` (see `unsupported_reason`)."""

    backend: str = ""  # The jax backend the kernel runs on.

    class Config(BaseAttentionKernel.Config):
        fallback: DenseKernel.Config = XLAKernel.default_config()

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.fallback: DenseKernel = self.config.fallback.instantiate()

    def unsupported_reason(
        self,
        q: Array,
        k: Array,
        v: Array,
        mask: AttentionMask,
        *,
        logit_softcap: float | None = None,
        backend: str | None = None,
    ) -> str | None:
        """Why this call cannot use the kernel (None: it can). `backend` defaults to the one this kernel would run
        on now (jax's default backend)."""
        backend = backend or self._current_backend()
        if backend != self.backend:
            return f"{type(self).__name__} runs on {self.backend}, not {backend}"
        if not mask.aligned or k.shape[1] != q.shape[1]:
            return "the keys are not the queries' own tokens (a decode step against a cache, or a key buffer)"
        return self._input_reason(q, logit_softcap)

    def _current_backend(self) -> str:
        return jax.default_backend()

    def _input_reason(self, q: Array, logit_softcap: float | None) -> str | None:
        """Why the kernel cannot take these inputs (dtype, head size, length, soft-capping); None: it can."""
        return None

    def __call__(
        self,
        q: Array,
        k: Array,
        v: Array,
        mask: AttentionMask,
        *,
        logit_softcap: float | None = None,
        query_scale: float | None = None,
    ) -> Array:
        options = dict(logit_softcap=logit_softcap, query_scale=query_scale)
        if self.unsupported_reason(q, k, v, mask, logit_softcap=logit_softcap) is not None:
            return self.fallback(q, k, v, mask, **options)
        out = self.flash(q, k.astype(q.dtype), v.astype(q.dtype), mask, **options)
        return jnp.where(mask.valid_queries()[:, :, None, None], out, 0).astype(q.dtype)

    def flash(
        self,
        q: Array,
        k: Array,
        v: Array,
        mask: AttentionMask,
        *,
        logit_softcap: float | None,
        query_scale: float | None,
    ) -> Array:
        """The fused kernel on inputs it supports; `query_scale` None is 1 / sqrt(Dh)."""
        raise NotImplementedError(type(self))


def _scale(q: Array, query_scale: float | None) -> float:
    """The logits' factor: `query_scale`, or 1 / sqrt(head_dim) when it is None."""
    return 1 / math.sqrt(q.shape[-1]) if query_scale is None else query_scale


def segment_layout(segment_ids: Array, max_segments: int) -> tuple[Array, Array, Array]:
    """cuDNN's packed layout of rows whose segments are contiguous runs with increasing ids, padding (id 0) last.

    Returns (offsets [B, M + 1], lengths [B, M], fits [B]): the first index and the length of each segment, -1 past
    the row's last segment, with M = `max_segments`; `fits` is False for a row the layout cannot describe (more than
    M segments, padding before a token, or an id that does not increase from run to run).
    """
    length = segment_ids.shape[1]
    valid = segment_ids != 0
    previous = jnp.pad(segment_ids[:, :-1], ((0, 0), (1, 0)))
    starts = valid & (segment_ids != previous)
    count = jnp.sum(starts, axis=1)
    num_valid = jnp.sum(valid, axis=1)
    index = jnp.arange(length)
    padding_last = jnp.all(valid == (index[None, :] < num_valid[:, None]), axis=1)
    increasing = jnp.all(~starts | (segment_ids > previous), axis=1)
    first = jax.vmap(lambda s: jnp.nonzero(s, size=max_segments + 1, fill_value=length)[0])(starts)  # [B, M + 1]
    ends = jnp.minimum(first[:, 1:], num_valid[:, None])
    present = jnp.arange(max_segments)[None, :] < count[:, None]
    lengths = jnp.where(present, ends - first[:, :-1], -1).astype(jnp.int32)
    offsets = jnp.where(jnp.arange(max_segments + 1)[None, :] < count[:, None], first, -1).astype(jnp.int32)
    return offsets, lengths, (count <= max_segments) & padding_last & increasing


class CudnnKernel(FlashKernel):
    """cuDNN flash attention (GPU, bfloat16/float16, head_dim a multiple of 8 up to 256).

    Segment ids: with `max_segments_per_row` 1, each row is one sequence followed by padding, given to cuDNN as
    per-row sequence lengths; with M > 1, up to M packed sequences per row through cuDNN's packed layout (Hopper,
    cuDNN >= 9.6). A row that does not fit that description gets NaN outputs, so the mistake cannot pass unnoticed
    (raise M, or use the XLA kernel for such data).
    """

    backend = "gpu"

    class Config(FlashKernel.Config):
        max_segments_per_row: int = 1

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        check_positive(self.config, "max_segments_per_row")

    def _input_reason(self, q: Array, logit_softcap: float | None) -> str | None:
        head_dim = q.shape[-1]
        if logit_softcap is not None:
            return "cuDNN has no logit soft-capping"
        if jnp.dtype(q.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
            return f"cuDNN needs bfloat16 or float16 activations, not {jnp.dtype(q.dtype).name}"
        if head_dim % 8 or head_dim > 256:
            return f"cuDNN needs head_dim a multiple of 8 up to 256, not {head_dim}"
        return None

    def flash(
        self,
        q: Array,
        k: Array,
        v: Array,
        mask: AttentionMask,
        *,
        logit_softcap: float | None,
        query_scale: float | None,
    ) -> Array:
        del logit_softcap  # Refused by unsupported_reason.
        scale = _scale(q, query_scale)
        window = None if mask.sliding_window is None else (mask.sliding_window, 0)
        if mask.q_segment_ids is None:
            return self.attention(q, k, v, scale=scale, is_causal=True, local_window_size=window)
        segments = self.config.max_segments_per_row
        offsets, lengths, fits = segment_layout(mask.q_segment_ids, segments)
        if segments == 1:
            out = self.attention(
                q,
                k,
                v,
                scale=scale,
                is_causal=True,
                local_window_size=window,
                query_seq_lengths=lengths[:, 0],
                key_value_seq_lengths=lengths[:, 0],
            )
        else:
            out = self.packed_attention(q, k, v, offsets, lengths, mask.sliding_window, scale)
        return jnp.where(fits[:, None, None, None], out, jnp.nan)

    @staticmethod
    def attention(q: Array, k: Array, v: Array, **kwargs: Any) -> Array:
        """The public cuDNN entry point (a test swaps in implementation="xla" to check the arguments on CPU)."""
        return jax.nn.dot_product_attention(q, k, v, implementation="cudnn", **kwargs)

    @staticmethod
    def packed_attention(
        q: Array, k: Array, v: Array, offsets: Array, lengths: Array, sliding_window: int | None, scale: float
    ) -> Array:
        """cuDNN's packed layout (jax exposes it in its cuDNN module only)."""
        from jax._src.cudnn.fused_attention_stablehlo import MaskType, dot_product_attention

        return dot_product_attention(
            q,
            k,
            v,
            q_seqlen=lengths,
            kv_seqlen=lengths,
            q_offsets=offsets,
            kv_offsets=offsets,
            scale=scale,
            mask_type=MaskType.CAUSAL,
            sliding_window_length=None if sliding_window is None else sliding_window + 1,
        )


class SplashKernel(FlashKernel):
    """Pallas splash attention (TPU): causal or local-window masks, segment ids, soft-capping, grouped heads.

    Under a sharding context it runs per shard (shard_map) over the batch and, when both divide, the head axes.
    `interpret` runs the Pallas kernel in interpreter mode on any backend (slow: for tests).
    """

    backend = "tpu"

    class Config(FlashKernel.Config):
        block_size: int = 512  # Query and key tile size (capped at the sequence length); a multiple of 128.
        interpret: bool = optional(False)

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        cfg = self.config
        check_positive(cfg, "block_size")

    def _current_backend(self) -> str:
        return self.backend if self.config.interpret else super()._current_backend()

    def _input_reason(self, q: Array, logit_softcap: float | None) -> str | None:
        block = self._block(q.shape[1])
        if block % 128 or q.shape[1] % block:
            return f"splash attention needs a sequence length that is a multiple of 128, not {q.shape[1]}"
        return None

    def _block(self, length: int) -> int:
        return min(self.config.block_size, length)

    def flash(
        self,
        q: Array,
        k: Array,
        v: Array,
        mask: AttentionMask,
        *,
        logit_softcap: float | None,
        query_scale: float | None,
    ) -> Array:
        from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
        from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

        length, heads = q.shape[1], q.shape[2]
        shape = (length, length)
        window = mask.sliding_window
        one = masks.CausalMask(shape) if window is None else masks.LocalMask(shape, window_size=(window, 0), offset=0)
        block = self._block(length)
        sizes = splash.BlockSizes(
            block_q=block,
            block_kv=block,
            block_kv_compute=block,
            block_q_dkv=block,
            block_kv_dkv=block,
            block_kv_dkv_compute=block,
            block_q_dq=block,
            block_kv_dq=block,
        )

        def attend(q: Array, k: Array, v: Array, q_segments: Array | None, kv_segments: Array | None) -> Array:
            kernel = splash.make_splash_mha(
                mask=masks.MultiHeadMask([one] * q.shape[2]),
                block_sizes=sizes,
                head_shards=1,
                q_seq_shards=1,
                attn_logits_soft_cap=logit_softcap,
                interpret=self.config.interpret,
            )
            heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # [B,T,N,Dh] -> [B,N,T,Dh]
            scaled = heads_first(q) * jnp.asarray(_scale(q, query_scale), q.dtype)
            if q_segments is None:
                out = jax.vmap(kernel)(scaled, heads_first(k), heads_first(v))
            else:
                one_row = lambda q, k, v, qs, ks: kernel(q, k, v, segment_ids=splash.SegmentIds(qs, ks))
                out = jax.vmap(one_row)(scaled, heads_first(k), heads_first(v), q_segments, kv_segments)
            return heads_first(out)

        return _per_shard(attend, q, k, v, mask.q_segment_ids, mask.kv_segment_ids, heads=heads)


def _per_shard(fn: Callable[..., Array], q: Array, k: Array, v: Array, q_seg: Any, kv_seg: Any, *, heads: int) -> Array:
    """`fn(q, k, v, q_segment_ids, kv_segment_ids)` run per shard under the active sharding context (batch over its
    data axes, heads over the model axes when both head counts divide), or directly without one."""
    context = current_sharding_context()
    if context is None:
        return fn(q, k, v, q_seg, kv_seg)
    mesh, rules = context
    batch = logical_to_spec(("batch",), rules, q.shape[:1], mesh)[0]
    head_axes = logical_to_spec(("heads",), rules, (heads,), mesh)[0]
    kv_axes = logical_to_spec(("kv_heads",), rules, k.shape[2:3], mesh)[0]
    if head_axes != kv_axes:
        head_axes = None  # Each shard must keep whole groups of query heads with their key/value head.
    qkv = PartitionSpec(batch, None, head_axes, None)
    seg = PartitionSpec(batch, None)
    specs = (qkv, qkv, qkv, None if q_seg is None else seg, None if kv_seg is None else seg)
    return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=qkv, check_vma=False)(q, k, v, q_seg, kv_seg)
