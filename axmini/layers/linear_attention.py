"""Residual linear attention (the RLA half of RAttention), as pure jax functions.

RAttention pairs a sliding window of width `w` with a linear attention over exactly the tokens that
fell out of the window: query `i` sees key `j` through the window when `i - w <= j <= i` and through
the linear branch when `j <= i - w - 1`, so every earlier token is seen by exactly one branch::

    S_t = S_{t-1} + phi(k_t)^T v_t          o_i = phi(q_i) S_{i-w-1}      (no normalizing denominator)

`causal_linear_attention` computes the aligned form (query `t` sees keys `s <= t`) chunk by chunk:
inside a chunk by masked matmuls, across chunks through a running state, optionally keeping only
every m-th group of chunk states and recomputing the rest under `jax.checkpoint`. The residual form
is the aligned form with keys and values delayed by `w + 1` tokens (`residual_linear_attention`).

Segments (packed sequences) must be contiguous runs of one id. A key feeds a query only when both
have the same id; the running state holds the keys of one run (the run of the last key summed) and
is reset when a new run begins, which is exact for contiguous runs.
"""

from __future__ import annotations

import enum
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


class FeatureMap(enum.Enum):
    """The feature map phi applied to queries and keys over the head dim."""

    # [softmax(x), softmax(-x)]: positive features that see both signs; doubles the key dim.
    SOFTMAX_PAIR = "softmax_pair"
    RELU = "relu"
    # [relu(x), relu(-x)]: AXLearn's RAttention feature map; doubles the key dim.
    RELU_PAIR = "relu_pair"

    @property
    def paired(self) -> bool:
        return self in (FeatureMap.SOFTMAX_PAIR, FeatureMap.RELU_PAIR)


def feature_dim(head_dim: int, kind: FeatureMap) -> int:
    """The size of phi(x) for an x of `head_dim` entries."""
    return 2 * head_dim if kind.paired else head_dim


def apply_feature_map(x: Array, kind: FeatureMap) -> Array:
    """phi(x) over the last dim, in float32."""
    x = x.astype(jnp.float32)
    if kind is FeatureMap.SOFTMAX_PAIR:
        return jnp.concatenate([jax.nn.softmax(x, axis=-1), jax.nn.softmax(-x, axis=-1)], axis=-1)
    if kind is FeatureMap.RELU:
        return jax.nn.relu(x)
    if kind is FeatureMap.RELU_PAIR:
        return jnp.concatenate([jax.nn.relu(x), jax.nn.relu(-x)], axis=-1)
    raise ValueError(f"unknown feature map {kind!r}; use one of {[k.name for k in FeatureMap]}")


class LinearState(NamedTuple):
    """The recurrent state of a linear attention: constant size, whatever the length consumed."""

    state: Array  # [B, K, F, Dv] float32: sum of phi(k)^T v over the keys of the current run
    segment_ids: Array  # [B] int32: the segment id of that run (-1 = no key yet)


def empty_state(batch_size: int, num_kv_heads: int, key_dim: int, value_dim: int) -> LinearState:
    """The state before any key: zeros, in no segment."""
    return LinearState(
        jnp.zeros((batch_size, num_kv_heads, key_dim, value_dim), jnp.float32),
        jnp.full((batch_size,), -1, jnp.int32),
    )


def _pad_time(x: Array, length: int, *, mode: str = "constant", value: int | float = 0) -> Array:
    pad = [(0, 0)] * x.ndim
    pad[1] = (0, length - x.shape[1])
    return jnp.pad(x, pad, mode=mode) if mode == "edge" else jnp.pad(x, pad, constant_values=value)


def _chunks_to_front(x: Array, groups: int, per_group: int, chunk: int) -> Array:
    """[B, T, ...] -> [groups, B, per_group, chunk, ...] (groups leading, for lax.scan)."""
    x = x.reshape(x.shape[0], groups, per_group, chunk, *x.shape[2:])
    return jnp.moveaxis(x, 1, 0)


def _group_of_chunks(carry: tuple[Array, Array], xs: tuple[Array, ...]) -> tuple[tuple[Array, Array], Array]:
    """Outputs of `m` consecutive chunks and the state after them.

    carry: state [B,K,F,Dv], its segment [B]. xs: q [B,m,C,K,G,F], k [B,m,C,K,F], v [B,m,C,K,Dv],
    q_seg [B,m,C], k_seg [B,m,C].
    """
    state, state_seg = carry
    q, k, v, q_seg, k_seg = xs
    chunk = q.shape[2]

    # What each chunk adds to the state: its keys in the run of its last key (a suffix of the chunk).
    last_seg = k_seg[:, :, -1]  # [B, m]
    in_last_run = (k_seg == last_seg[..., None]).astype(k.dtype)
    chunk_kv = jnp.einsum("bncKf,bncKd->bnKfd", k * in_last_run[..., None, None], v)

    def step(carry: tuple[Array, Array], x: tuple[Array, Array]) -> tuple[tuple[Array, Array], tuple[Array, Array]]:
        st, seg = carry
        kv, last = x
        continues = (last == seg)[:, None, None, None]
        return (jnp.where(continues, st, 0.0) + kv, last), (st, seg)

    (state, state_seg), (states_in, segs_in) = jax.lax.scan(
        step, (state, state_seg), (jnp.moveaxis(chunk_kv, 1, 0), jnp.moveaxis(last_seg, 1, 0))
    )
    states_in = jnp.moveaxis(states_in, 0, 1)  # [B, m, K, F, Dv]: the state entering each chunk
    segs_in = jnp.moveaxis(segs_in, 0, 1)  # [B, m]

    # Across chunks: the entering state, for queries in its run.
    sees_state = (q_seg == segs_in[..., None]).astype(q.dtype)
    inter = jnp.einsum("bncKgf,bnKfd->bncKgd", q, states_in) * sees_state[..., None, None, None]

    # Inside a chunk: causal (s <= t), same segment.
    causal = jnp.tril(jnp.ones((chunk, chunk), bool))
    mask = causal & (q_seg[..., :, None] == k_seg[..., None, :])  # [B, m, C, C]
    scores = jnp.einsum("bntKgf,bnsKf->bnKgts", q, k) * mask[:, :, None, None].astype(q.dtype)
    intra = jnp.einsum("bnKgts,bnsKd->bntKgd", scores, v)
    return (state, state_seg), inter + intra


def causal_linear_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    q_segment_ids: Array | None = None,
    k_segment_ids: Array | None = None,
    initial: LinearState | None = None,
    chunk_size: int = 512,
    checkpoint_every: int | None = None,
) -> tuple[Array, LinearState]:
    """Chunkwise-parallel causal linear attention on features, with grouped-query heads.

    o_t = sum_{s <= t, seg_k(s) == seg_q(t)} (q_t . k_s) v_s  +  [seg_q(t) == initial.segment] q_t initial.state

    Args:
      q: [B, T, H, F] query features; k: [B, T, K, F] key features (H % K == 0); v: [B, T, K, Dv].
      q_segment_ids, k_segment_ids: [B, T] int (contiguous runs); None = one segment (id 0).
      initial: the state before the first key (None = empty).
      chunk_size: tokens per chunk (the last chunk is padded).
      checkpoint_every: None keeps every chunk state for the backward pass; m keeps only the state
        entering every m-th chunk and recomputes the rest under `jax.checkpoint` (less memory).

    Returns:
      ([B, T, H, Dv] outputs in v's dtype, the state after the last key).
    """
    batch, length, num_heads, key_dim = q.shape
    num_kv_heads, value_dim = k.shape[2], v.shape[-1]
    if num_heads % num_kv_heads:
        raise ValueError(f"causal_linear_attention: {num_heads} query heads not a multiple of {num_kv_heads} kv heads")
    if chunk_size < 1 or (checkpoint_every is not None and checkpoint_every < 1):
        raise ValueError(f"chunk_size ({chunk_size}) and checkpoint_every ({checkpoint_every}) must be >= 1")
    zeros = jnp.zeros((batch, length), jnp.int32)
    q_seg = zeros if q_segment_ids is None else q_segment_ids.astype(jnp.int32)
    k_seg = zeros if k_segment_ids is None else k_segment_ids.astype(jnp.int32)
    if initial is None:
        initial = empty_state(batch, num_kv_heads, key_dim, value_dim)

    chunk = min(chunk_size, length)
    num_chunks = math.ceil(length / chunk)
    per_group = num_chunks if checkpoint_every is None else min(checkpoint_every, num_chunks)
    groups = math.ceil(num_chunks / per_group)
    padded = groups * per_group * chunk
    # Padding keys have zero features and extend the last run, so the final state is unchanged.
    q = _pad_time(q.astype(jnp.float32).reshape(batch, length, num_kv_heads, -1, key_dim), padded)
    k = _pad_time(k.astype(jnp.float32), padded)
    v32 = _pad_time(v.astype(jnp.float32), padded)
    q_seg = _pad_time(q_seg, padded, value=-1)
    k_seg = _pad_time(k_seg, padded, mode="edge")
    xs = tuple(_chunks_to_front(x, groups, per_group, chunk) for x in (q, k, v32, q_seg, k_seg))

    carry = (initial.state.astype(jnp.float32), initial.segment_ids)
    if checkpoint_every is None:  # One group: no outer loop.
        (state, state_seg), out = _group_of_chunks(carry, tuple(x[0] for x in xs))
        out = out[None]
    else:
        (state, state_seg), out = jax.lax.scan(jax.checkpoint(_group_of_chunks), carry, xs)
    out = jnp.moveaxis(out, 0, 1).reshape(batch, padded, num_heads, value_dim)[:, :length]
    return out.astype(v.dtype), LinearState(state, state_seg)


def delay(x: Array, steps: int, fill: int | float = 0) -> Array:
    """x delayed by `steps` tokens along axis 1: out[:, t] = x[:, t - steps], `fill` before the start."""
    length = x.shape[1]
    pad = [(0, 0)] * x.ndim
    pad[1] = (min(steps, length), 0)
    return jnp.pad(x, pad, constant_values=fill)[:, :length]


def residual_linear_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    window: int,
    segment_ids: Array | None = None,
    feature_map: FeatureMap = FeatureMap.SOFTMAX_PAIR,
    chunk_size: int = 512,
    checkpoint_every: int | None = None,
) -> Array:
    """The linear branch of RAttention: o_i = sum_{j <= i-w-1, seg_j == seg_i} phi(q_i) . phi(k_j) v_j.

    q: [B, T, H, Dh], k: [B, T, K, Dh], v: [B, T, K, Dv] (no positional encoding); returns [B, T, H, Dv].
    """
    if window < 0:
        raise ValueError(f"residual_linear_attention: window must be >= 0, got {window}")
    segment_ids = jnp.zeros(q.shape[:2], jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    out, _ = causal_linear_attention(
        apply_feature_map(q, feature_map),
        delay(apply_feature_map(k, feature_map), window + 1),
        delay(v, window + 1),
        q_segment_ids=segment_ids,
        k_segment_ids=delay(segment_ids, window + 1, fill=-1),
        chunk_size=chunk_size,
        checkpoint_every=checkpoint_every,
    )
    return out
