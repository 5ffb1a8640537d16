"""Multi-head attention: the QKV projection slot, masks, the kernel slot and the KV cache, on one code path.

Three slots make every attention variant a config:

- `input_linear` (a `BaseQKVProjection`) maps x to q, k, v. `project` does the projections, `rotate` the
  positional encoding (identity here; RoPE in position.py wraps any projection), so qk-norm can sit in
  between and a feature like RoPE reaches every attention without editing one.
- `kernel` (a `BaseAttentionKernel`, kernels.py) computes softmax(q k^T) v: the reference einsum, XLA, cuDNN or
  splash attention; mesh rules choose it per backend (`AttentionKernelModifier`).
- the layer's own fields: grouped-query heads, sliding window, soft-capping and the query scale.

Masking is by position, not by index: a query at position p sees keys at positions q with
`0 <= q <= p` (and `p - q <= sliding_window`), in the same segment (segment 0 is padding and is never
attended). The training forward, prefill and one-token extend differ only in where the keys come from:
the current tokens, or the KV cache after (full cache) or besides (sliding-window ring buffer) writing
the current tokens into it. Packed sequences therefore need `segment_ids` whenever positions restart.
In the training forward the keys are the queries' own tokens (the mask is `aligned`), which lets flash kernels
mask by index: positions must then increase by one within each segment, as packing makes them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np

from axmini.config import (
    REQUIRED,
    ConfigBase,
    ConfigModifier,
    ConfigValueError,
    Required,
    check_positive,
    config_path,
    fill_child,
    map_configs,
    optional,
)
from axmini.layers.kernels import AttentionMask, BaseAttentionKernel, ReferenceKernel, XLAKernel
from axmini.layers.norm import RMSNorm
from axmini.module import Layer, constant_init, shard_activation

Array = jax.Array


class QKV(NamedTuple):
    """Projected queries [B,T,H,Dh] and keys/values [B,T,K,Dh] (None for a query-only projection)."""

    q: Array
    k: Array | None
    v: Array | None


class KV(NamedTuple):
    """Keys/values a layer attended over, with what masking needs: what a KV-sharing consumer reads.

    positions: [B,S] int32, -1 marks an empty slot; None: the keys are the call's own tokens (the training forward),
    masked by the queries' positions and segment ids. segment_ids: [B,S] or None (no segment restriction).
    """

    k: Array
    v: Array
    positions: Array | None
    segment_ids: Array | None


class KVCache(NamedTuple):
    """Per-layer decoding state. S = cache length (a sliding-window cache is a ring of S <= window slots)."""

    k: Array  # [B,S,K,Dh]
    v: Array  # [B,S,K,Dh]
    positions: Array  # [B,S] int32 position held in each slot, -1 = empty


class AttentionOutput(NamedTuple):
    output: Array  # [B,T,D]
    cache: Any | None  # The updated cache (None when called without one).
    kv: KV | None  # The (rotated) keys/values attended over, for KV sharing.


# ----------------------------------------------------------------------------------------------------
# The QKV projection slot.


class BaseQKVProjection(Layer):
    """x [B,T,D] -> QKV. Subclasses implement `project`; `rotate` adds positional encoding (identity here)."""

    class Config(Layer.Config):
        # The parent attention fills these four.
        input_dim: Required[int] = REQUIRED
        num_heads: Required[int] = REQUIRED
        num_kv_heads: Required[int] = REQUIRED
        head_dim: Required[int] = REQUIRED
        # A bias on each projection (Qwen2's q/k/v, Llama's attention_bias). A wrapper (RoPE) leaves it False.
        bias: bool = optional(False)

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        super().check_config(cfg)
        check_positive(cfg, "input_dim", "num_heads", "num_kv_heads", "head_dim")

    # Whether `project` returns keys/values; False for a KV-sharing consumer's query-only projection.
    has_kv: bool = True
    # Whether this projection wraps an `inner` one (as RoPE does): KV sharing then replaces that inner projection.
    wraps_projection: bool = False

    def project(self, x: Array) -> QKV:
        raise NotImplementedError(type(self))

    def _weight_and_bias(self, shape: tuple[int, ...], axes: tuple[str | None, ...], *, rngs: nnx.Rngs) -> nnx.Param:
        """A projection weight [input_dim, *shape] and, with `bias`, its bias [*shape] (stored as `<name>_bias`)."""
        weight = self.param((self.config.input_dim, *shape), axes=("embed", *axes), rngs=rngs)
        bias = self.param(shape, axes=axes, rngs=rngs, init=constant_init(0.0)) if self.config.bias else None
        return weight, bias

    def _apply(self, x: Array, weight: nnx.Param, bias: nnx.Param | None, spec: str) -> Array:
        y = jnp.einsum(spec, x, self.read_weight(weight).astype(x.dtype))
        return y if bias is None else y + bias[...].astype(x.dtype)

    def rotate(self, qkv: QKV, positions: Array) -> QKV:
        del positions
        return qkv

    def __call__(self, x: Array, *, positions: Array) -> QKV:
        return self.rotate(self.project(x), positions)


class QKVProjection(BaseQKVProjection):
    """Separate q [D,H,Dh] and k, v [D,K,Dh] weights (grouped-query when K < H)."""

    weight_names = ("q", "k", "v")

    def __init__(self, cfg: BaseQKVProjection.Config, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        cfg = self.config
        self.q, self.q_bias = self._weight_and_bias((cfg.num_heads, cfg.head_dim), ("heads", "head_dim"), rngs=rngs)
        kv_shape, kv_axes = (cfg.num_kv_heads, cfg.head_dim), ("kv_heads", "head_dim")
        self.k, self.k_bias = self._weight_and_bias(kv_shape, kv_axes, rngs=rngs)
        self.v, self.v_bias = self._weight_and_bias(kv_shape, kv_axes, rngs=rngs)

    def project(self, x: Array) -> QKV:
        pairs = ((self.q, self.q_bias), (self.k, self.k_bias), (self.v, self.v_bias))
        return QKV(*(self._apply(x, w, b, "btd,dnh->btnh") for w, b in pairs))


class QueryOnlyProjection(BaseQKVProjection):
    """Only queries q [D,H,Dh] (k = v = None): the projection of a layer that reads another layer's keys/values."""

    has_kv = False
    weight_names = ("q",)

    def __init__(self, cfg: BaseQKVProjection.Config, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        cfg = self.config
        self.q, self.q_bias = self._weight_and_bias((cfg.num_heads, cfg.head_dim), ("heads", "head_dim"), rngs=rngs)

    def project(self, x: Array) -> QKV:
        return QKV(self._apply(x, self.q, self.q_bias, "btd,dnh->btnh"), None, None)


class FusedQKVProjection(BaseQKVProjection):
    """One weight [D, K, H/K + 2, Dh]: per kv head, its H/K query heads, its key and its value.

    Grouping by kv head keeps each group's q, k and v on the same shard when `kv_heads` is sharded.
    Query head h uses kv head h // (H/K), as in `QKVProjection`.
    """

    weight_names = ("qkv",)

    def __init__(self, cfg: BaseQKVProjection.Config, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        cfg = self.config
        group = cfg.num_heads // cfg.num_kv_heads
        self.qkv, self.qkv_bias = self._weight_and_bias(
            (cfg.num_kv_heads, group + 2, cfg.head_dim), ("kv_heads", None, "head_dim"), rngs=rngs
        )

    def project(self, x: Array) -> QKV:
        cfg = self.config
        group = cfg.num_heads // cfg.num_kv_heads
        y = self._apply(x, self.qkv, self.qkv_bias, "btd,dkgh->btkgh")
        q = y[:, :, :, :group].reshape(*x.shape[:2], cfg.num_heads, cfg.head_dim)
        return QKV(q, y[:, :, :, group], y[:, :, :, group + 1])


class OutputProjection(Layer):
    """[B,T,H,Dh] -> [B,T,D] with one weight [H, Dh, D] (and, with `bias`, a bias [D])."""

    class Config(Layer.Config):
        num_heads: Required[int] = REQUIRED
        head_dim: Required[int] = REQUIRED
        output_dim: Required[int] = REQUIRED
        bias: bool = optional(False)

    weight_names = ("weight",)

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        super().check_config(cfg)
        check_positive(cfg, "num_heads", "head_dim", "output_dim")

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        cfg = self.config
        self.weight = self.param(
            (cfg.num_heads, cfg.head_dim, cfg.output_dim),
            axes=("heads", "head_dim", "embed"),
            rngs=rngs,
            fan_in_axes=(0, 1),
        )
        self.bias = (
            self.param((cfg.output_dim,), axes=("embed",), rngs=rngs, init=constant_init(0.0)) if cfg.bias else None
        )

    def __call__(self, x: Array) -> Array:
        y = jnp.einsum("btnh,nhd->btd", x, self.read_weight(self.weight).astype(x.dtype))
        return y if self.bias is None else y + self.bias[...].astype(x.dtype)


# ----------------------------------------------------------------------------------------------------
# The attention layer.


def _is_traced(*values: Any) -> bool:
    return any(isinstance(v, jax.core.Tracer) for v in values)


class Attention(Layer):
    """Causal multi-head attention with grouped-query heads, masks, soft-capping and a KV cache.

    `__call__(x, positions=..., segment_ids=..., cache=..., shared_kv=...)`:
    - cache=None: the training forward over x.
    - with a cache (from `init_cache`): x holds T >= 1 new tokens at `positions`; they are written into the
      cache and attend to every valid slot (prefill: T = prompt length, extend: T = 1). Tokens with
      segment id 0 are padding: not written, never attended. In cache mode `segment_ids` only mark
      padding; one sequence per batch row.
    - shared_kv: the keys/values of another layer (this layer's `input_linear` is a QueryOnlyProjection,
      possibly wrapped by RoPE); the layer keeps no cache.

    The output's `kv` is what the layer attended over: the current tokens' keys (training forward), the
    updated cache (full cache), or the old ring plus the new tokens (window cache). A consumer of a local
    layer's `kv` therefore sees at most that layer's window when decoding.

    Writing a position that does not fit the cache (position >= S for a full cache, or for a window cache
    shorter than the window) raises ValueError when positions are concrete; under jit the write is
    dropped and that token's output is NaN, so the mistake cannot pass unnoticed.
    """

    class Config(Layer.Config):
        input_dim: Required[int] = REQUIRED
        num_heads: Required[int] = REQUIRED
        num_kv_heads: int | None = None  # None: num_heads (multi-head); 1: multi-query.
        head_dim: int | None = None  # None: input_dim // num_heads.
        input_linear: BaseQKVProjection.Config = QKVProjection.default_config()
        # The [H, Dh, D] output projection.
        output_linear: OutputProjection.Config = OutputProjection.default_config()
        # RMSNorm of q and k over head_dim (separate scales), before positional encoding. None: off.
        qk_norm: RMSNorm.Config | None = None
        # Local attention: the query at position i sees keys at positions i - window .. i (window + 1 keys; Hugging
        # Face's sliding_window=W is window W - 1).
        sliding_window: int | None = None
        # Logits become cap * tanh(logits / cap). None: off.
        logit_softcap: float | None = None
        # How softmax(q k^T) v is computed (kernels.py); mesh rules set cuDNN on GPU and splash on TPU.
        kernel: BaseAttentionKernel.Config = ReferenceKernel.default_config()
        # The factor of q.k in the logits; None: head_dim^-0.5 (Gemma's query_pre_attn_scalar^-0.5 differs).
        query_scale: float | None = optional(None)

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        super().check_config(cfg)
        check_positive(
            cfg, "input_dim", "num_heads", "num_kv_heads", "head_dim", "sliding_window", "logit_softcap", "query_scale"
        )

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        cfg = self.config
        self._validate()
        dims = dict(num_heads=cfg.num_heads, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim)
        self.input_linear = fill_child(cfg.input_linear, parent=cfg, input_dim=cfg.input_dim, **dims).instantiate(
            rngs=rngs
        )
        self.output_linear = fill_child(
            cfg.output_linear, parent=cfg, output_dim=cfg.input_dim, num_heads=cfg.num_heads, head_dim=self.head_dim
        ).instantiate(rngs=rngs)
        norm_cfg = None
        if cfg.qk_norm is not None:
            norm_cfg = fill_child(cfg.qk_norm, parent=cfg, input_dim=self.head_dim, axis_name="head_dim")
        self.q_norm = norm_cfg.instantiate(rngs=rngs) if norm_cfg is not None else None
        self.k_norm = norm_cfg.instantiate(rngs=rngs) if norm_cfg is not None and self.input_linear.has_kv else None
        self.kernel: BaseAttentionKernel = cfg.kernel.instantiate()

    @property
    def num_kv_heads(self) -> int:
        return self.config.num_kv_heads or self.config.num_heads

    @property
    def head_dim(self) -> int:
        return self.config.head_dim or self.config.input_dim // self.config.num_heads

    def _validate(self) -> None:
        cfg = self.config
        if cfg.num_heads % self.num_kv_heads:
            raise ConfigValueError(
                f"{config_path(cfg, 'num_heads')}={cfg.num_heads} is not divisible by "
                f"{config_path(cfg, 'num_kv_heads')}={cfg.num_kv_heads}; use a divisor of num_heads"
            )
        if cfg.head_dim is None and cfg.input_dim % cfg.num_heads:
            raise ConfigValueError(
                f"{config_path(cfg, 'input_dim')}={cfg.input_dim} is not divisible by "
                f"{config_path(cfg, 'num_heads')}={cfg.num_heads}; set {config_path(cfg, 'head_dim')} explicitly"
            )

    def init_cache(self, batch_size: int, max_length: int, dtype: Any = jnp.float32) -> KVCache | None:
        """An empty cache for `max_length` positions (a ring of min(window, max_length) slots for local
        attention); None for a KV-sharing consumer, which keeps no cache."""
        if not self.input_linear.has_kv:
            return None
        window = self.config.sliding_window
        length = min(window, max_length) if window is not None else max_length
        shape = (batch_size, length, self.num_kv_heads, self.head_dim)
        return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.full((batch_size, length), -1, jnp.int32))

    def __call__(
        self,
        x: Array,
        *,
        positions: Array,
        segment_ids: Array | None = None,
        cache: Any | None = None,
        shared_kv: KV | None = None,
    ) -> AttentionOutput:
        self._check_inputs(x, positions, segment_ids, cache=cache, shared_kv=shared_kv)
        raw, rotated = self._qkv(x, positions)
        heads, new_cache, kv = self._attend_heads(raw, rotated, positions, segment_ids, cache, shared_kv)
        # The mean norm of each head's output over the tokens [H]: what activation-based head pruning reads.
        self.add_summary("head_output_norm", jnp.mean(jnp.linalg.norm(heads.astype(jnp.float32), axis=-1), axis=(0, 1)))
        out = shard_activation(self.output_linear(heads), ("batch", "length", "embed"))
        return AttentionOutput(out, new_cache, kv)

    def _qkv(self, x: Array, positions: Array) -> tuple[QKV, QKV]:
        """q, k, v before and after positional encoding: projected (`project`), qk-normed, then rotated (`rotate`)."""
        raw = self.input_linear.project(shard_activation(x, ("batch", "length", "embed")))
        if self.q_norm is not None:
            raw = QKV(self.q_norm(raw.q), self.k_norm(raw.k) if raw.k is not None else None, raw.v)
        return raw, self.input_linear.rotate(raw, positions)

    def _attend_heads(
        self,
        raw: QKV,
        rotated: QKV,
        positions: Array,
        segment_ids: Array | None,
        cache: KVCache | None,
        shared_kv: KV | None,
    ) -> tuple[Array, KVCache | None, KV]:
        """The attention of every head [B,T,H,Dh] (before the output projection), the new cache and the keys/values
        attended over. Subclasses (RAttention) replace this step and keep the rest of the call."""
        del raw  # Plain attention only needs the rotated q/k.
        cfg = self.config
        q, k, v = rotated
        q = shard_activation(q, ("batch", "length", "heads", "head_dim"))
        poison = None
        if shared_kv is not None:
            kv, new_cache = shared_kv, None
        elif cache is None:
            kv_axes = ("batch", "length", "kv_heads", "head_dim")
            kv = KV(shard_activation(k, kv_axes), shard_activation(v, kv_axes), None, None)
            new_cache = None
        else:
            kv, new_cache, poison = self._update_cache(cache, k, v, positions, segment_ids)
        own_tokens = kv.positions is None
        mask = AttentionMask(
            positions,
            positions if own_tokens else kv.positions,
            segment_ids,
            segment_ids if own_tokens else kv.segment_ids,
            cfg.sliding_window,
            aligned=own_tokens,
        )
        out = self.kernel(q, kv.k, kv.v, mask, logit_softcap=cfg.logit_softcap, query_scale=cfg.query_scale)
        if poison is not None:
            out = jnp.where(poison[:, :, None, None], jnp.nan, out)
        return out, new_cache, kv

    def _check_inputs(
        self,
        x: Array,
        positions: Array,
        segment_ids: Array | None,
        *,
        cache: KVCache | None = None,
        shared_kv: KV | None = None,
    ) -> None:
        """Refuses inconsistent calls while tracing (shapes and modes are static): input shapes, then where the
        keys/values come from (own projection or `shared_kv`) and whether the cache fits."""
        name = type(self).__name__
        if x.ndim != 3 or x.shape[-1] != self.config.input_dim:
            raise ValueError(f"{name}: x must be [B, T, {self.config.input_dim}], got {x.shape}")
        for label, value in (("positions", positions), ("segment_ids", segment_ids)):
            if value is not None and value.shape != x.shape[:2]:
                raise ValueError(f"{name}: {label} must be [B, T] = {x.shape[:2]}, got {value.shape}")
        has_kv = self.input_linear.has_kv
        if shared_kv is None and not has_kv:
            raise ValueError(f"{config_path(self.config, 'input_linear')} projects queries only: pass shared_kv")
        if shared_kv is not None and has_kv:
            raise ValueError(
                f"{name} got shared_kv but {config_path(self.config, 'input_linear')} projects its own keys/values; "
                "configure a QueryOnlyProjection for a KV-sharing consumer"
            )
        if shared_kv is not None and cache is not None:
            raise ValueError(f"{name}: a KV-sharing consumer keeps no cache; pass cache=None")
        if cache is not None and cache.k.shape[0] != x.shape[0]:
            raise ValueError(f"{name}: the cache holds batch size {cache.k.shape[0]}, x has {x.shape[0]}")
        if cache is None or _is_traced(positions, segment_ids):
            return
        valid = np.asarray(positions) >= 0
        if segment_ids is not None:
            valid &= np.asarray(segment_ids) != 0
        limit = self._cache_limit(cache)
        if limit is not None and valid.any() and np.asarray(positions)[valid].max() >= limit:
            raise ValueError(
                f"{name}: position {np.asarray(positions)[valid].max()} does not fit a KV cache of length {limit}; "
                "call init_cache with a larger max_length"
            )

    def _cache_limit(self, cache: KVCache) -> int | None:
        """The first position that does not fit `cache`; None when a ring buffer never runs out."""
        length = cache.k.shape[1]
        window = self.config.sliding_window
        return None if window is not None and length >= window else length

    def _update_cache(
        self, cache: KVCache, k: Array, v: Array, positions: Array, segment_ids: Array | None
    ) -> tuple[KV, KVCache, Array]:
        """Writes the new tokens into the cache; returns the keys to attend over, the new cache and the
        [B,T] mask of tokens whose write did not fit (their output becomes NaN)."""
        length = cache.k.shape[1]
        valid = positions >= 0 if segment_ids is None else (positions >= 0) & (segment_ids != 0)
        limit = self._cache_limit(cache)
        overflow = valid & (positions >= limit) if limit is not None else jnp.zeros_like(valid)
        fits = valid & ~overflow
        keep = fits
        if self.config.sliding_window is None:
            slots = positions
        else:
            # A ring buffer: keep each row's newest `length` tokens, at slot position % length.
            newest = jnp.max(jnp.where(valid, positions, -1), axis=1, keepdims=True)
            keep &= positions > newest - length
            slots = positions % length
        slots = jnp.where(keep, slots, length)  # Out of range: dropped by the scatter.
        rows = jnp.arange(k.shape[0])[:, None]

        def write(buffer: Array, values: Array) -> Array:
            return buffer.at[rows, slots].set(values.astype(buffer.dtype), mode="drop")

        new_cache = KVCache(write(cache.k, k), write(cache.v, v), write(cache.positions, positions))
        if self.config.sliding_window is None:
            kv = KV(new_cache.k, new_cache.v, new_cache.positions, None)
        else:
            # The ring may have overwritten keys that earlier new tokens still need: attend over the old
            # cache plus the new tokens instead.
            new_positions = jnp.where(fits, positions, -1).astype(jnp.int32)
            kv = KV(
                jnp.concatenate([cache.k, k.astype(cache.k.dtype)], axis=1),
                jnp.concatenate([cache.v, v.astype(cache.v.dtype)], axis=1),
                jnp.concatenate([cache.positions, new_positions], axis=1),
                None,
            )
        return kv, new_cache, overflow


# ----------------------------------------------------------------------------------------------------
# Feature modifiers.


def map_attention_configs(cfg: ConfigBase, fn: Callable[[ConfigBase], ConfigBase]) -> ConfigBase:
    """A copy of the tree with `fn(c)` applied to every config `c` that builds an Attention (subclasses included),
    attentions nested inside an attention's config too."""

    def apply(attention: ConfigBase) -> ConfigBase:
        attention = fn(attention)
        for name, value in attention.items():
            if isinstance(value, (ConfigBase, list, dict)):
                setattr(attention, name, map_configs(value, Attention.matches, apply))
        return attention

    return map_configs(cfg, Attention.matches, apply)


class SlidingWindowModifier(ConfigModifier):
    """Makes every attention in a tree local with the given window."""

    class Config(ConfigModifier.Config):
        sliding_window: Required[int] = REQUIRED

    def __call__(self, cfg: ConfigBase) -> ConfigBase:
        check_positive(self.config, "sliding_window")
        return map_attention_configs(cfg, lambda attention: attention.set(sliding_window=self.config.sliding_window))


class AttentionKernelModifier(ConfigModifier):
    """Sets the kernel of every attention in a tree: how mesh rules give GPUs cuDNN and TPUs splash attention."""

    class Config(ConfigModifier.Config):
        kernel: BaseAttentionKernel.Config = XLAKernel.default_config()

    def __call__(self, cfg: ConfigBase) -> ConfigBase:
        return map_attention_configs(cfg, lambda attention: attention.set(kernel=self.config.kernel))
