"""RAttention: sliding-window attention plus a residual linear attention over the tokens left of the window.

One more filler of the transformer layer's `self_attention` slot, with Attention's call contract and
Attention's projections (the QKV projection slot, grouped-query heads, qk-norm, output projection):

    output = out_proj( RMSNorm_swa(SWA_w(q, k, v)) + RMSNorm_rla(RLA_w(q, k, v)) )     (norms per head)

Query i sees key j through the window when i - w <= j <= i and through the linear branch when
j <= i - w - 1 (see linear_attention.py), so every earlier token is seen by exactly one branch. The
window branch uses the rotated q/k (`rotate`: RoPE when configured); the linear branch uses q/k before
positional encoding (`project`, then qk-norm).

One code path for training, prefill and extend. The keys are the concatenation of a buffer of the last
w + 1 tokens (empty in training) and the T new tokens:

- window branch: new token t attends buffer-or-new keys t + 1 .. t + w + 1 (itself and w before it),
  which the kernel computes in blocks of queries (`blocked_window_attention`, shared with Attention's
  sliding window), so the cost is O(T * w), not O(T^2);
- linear branch: key number t of that concatenation is the first one out of the window of new token t,
  so it is the aligned causal linear attention of the new queries over the first T keys, from the state;
- the cache keeps the last w + 1 tokens (rotated keys, values, keys before RoPE) and the state, whose
  size does not depend on the context length.

Padding (segment id 0, or position < 0) is moved behind the valid tokens of its row before all this, so it
is neither attended nor cached wherever it sits. Valid tokens of a row must have consecutive positions (one
sequence, or packed sequences with `segment_ids`); in cache mode, as in Attention, segment ids only mark
padding. RAttention keeps its own keys: it cannot be a KV-sharing consumer (its linear state would need the
producer's keys before RoPE), so `RAttentionModifier` refuses stacks with `kv_sharing`.
"""

from __future__ import annotations

import enum
from typing import Any, NamedTuple

import flax.nnx as nnx
import jax
import jax.numpy as jnp

from axmini.config import (
    ConfigBase,
    ConfigModifier,
    ConfigValueError,
    check_positive,
    config_path,
    fill_child,
    find_configs,
    map_configs,
    optional,
)
from axmini.layers.attention import KV, QKV, Attention, KVCache, map_attention_configs
from axmini.layers.kernels import AttentionMask
from axmini.layers.linear_attention import (
    FeatureMap,
    LinearState,
    apply_feature_map,
    causal_linear_attention,
    empty_state,
    feature_dim,
)
from axmini.layers.norm import RMSNorm
from axmini.layers.transformer import BaseStack, GlobalLocalModifier, PatternStack
from axmini.module import shard_activation

Array = jax.Array


class RAttentionCache(NamedTuple):
    """Decoding state of RAttention: constant size, whatever the context length."""

    # The last window + 1 valid tokens, oldest first, right-aligned: rotated keys, values, positions (-1 = empty).
    window: KVCache
    keys: Array  # [B, window + 1, K, Dh]: the same tokens' keys before positional encoding.
    state: LinearState  # phi(k)^T v summed over every earlier token: [B, K, F, Dh].


class RAttentionBranches(NamedTuple):
    window: Array  # [B,T,H,Dh] sliding-window softmax attention, before its norm
    linear: Array  # [B,T,H,Dh] residual linear attention, before its norm
    cache: RAttentionCache | None
    kv: KV


def _take(x: Array, index: Array) -> Array:
    """x[b, index[b, i]] along axis 1, for x [B, N, ...] and index [B, M]."""
    return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


class RAttention(Attention):
    """Sliding-window attention + residual linear attention, each normalized per head, summed, projected.

    `__call__(x, positions=..., segment_ids=..., cache=...)` as Attention (no `shared_kv`); the cache is an
    `RAttentionCache` from `init_cache`.
    """

    class Config(Attention.Config):
        # The window w: query i sees tokens i - w .. i by softmax attention, earlier ones by the linear branch.
        sliding_window: int = 512
        feature_map: FeatureMap = FeatureMap.SOFTMAX_PAIR
        # Tokens per chunk of the linear branch (the window branch is blocked by its kernel: window_block_size).
        chunk_size: int = 512
        # None: keep every chunk state for the backward pass; m: keep every m-th, recompute the rest (remat).
        state_checkpoint_every: int | None = None
        # Per-head RMSNorms of the two branches (input_dim = head_dim, filled by the layer).
        window_norm: RMSNorm.Config = RMSNorm.default_config()
        linear_norm: RMSNorm.Config = RMSNorm.default_config()
        # A separate norm scale per head ([heads, head_dim], AXLearn's) instead of one [head_dim] shared by all heads.
        per_head_norm_scale: bool = optional(False)

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        cfg = self.config
        if not self.input_linear.has_kv:
            raise ConfigValueError(
                f"{config_path(cfg, 'input_linear')} projects queries only, but RAttention keeps a state of its own "
                "keys before RoPE and cannot read another layer's keys/values; set kv_sharing=None on the stack "
                "or keep plain Attention for KV-sharing consumers"
            )
        heads = {"heads": cfg.num_heads} if cfg.per_head_norm_scale else {}
        window_norm, linear_norm = (
            fill_child(norm, parent=cfg, input_dim=self.head_dim, axis_name="head_dim", **heads)
            for norm in (cfg.window_norm, cfg.linear_norm)
        )
        self.window_norm = window_norm.instantiate(rngs=rngs)
        self.linear_norm = linear_norm.instantiate(rngs=rngs)

    def _validate(self) -> None:
        super()._validate()
        check_positive(self.config, "chunk_size", "state_checkpoint_every")

    def init_cache(self, batch_size: int, max_length: int, dtype: Any = jnp.float32) -> RAttentionCache:
        """An empty cache: w + 1 token slots and the linear state; the same size for any `max_length`."""
        del max_length  # The point of RAttention: the cache does not grow with the context.
        span = self.config.sliding_window + 1
        shape = (batch_size, span, self.num_kv_heads, self.head_dim)
        window = KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.full(shape[:2], -1, jnp.int32))
        key_dim = feature_dim(self.head_dim, self.config.feature_map)
        return RAttentionCache(
            window, jnp.zeros(shape, dtype), empty_state(batch_size, self.num_kv_heads, key_dim, self.head_dim)
        )

    def _check_inputs(
        self,
        x: Array,
        positions: Array,
        segment_ids: Array | None,
        *,
        cache: RAttentionCache | None = None,
        shared_kv: KV | None = None,
    ) -> None:
        """Attention's shape checks; RAttention keeps its own keys, so `shared_kv` is refused."""
        if shared_kv is not None:
            raise ValueError(f"{config_path(self.config)}: RAttention cannot consume shared_kv (see its docstring)")
        del cache  # Constant size: any cache from init_cache fits every position.
        super()._check_inputs(x, positions, segment_ids)

    def _attend_heads(
        self,
        raw: QKV,
        rotated: QKV,
        positions: Array,
        segment_ids: Array | None,
        cache: RAttentionCache | None,
        shared_kv: KV | None,
    ) -> tuple[Array, RAttentionCache | None, KV]:
        """The two branches, each normalized per head, summed."""
        del shared_kv  # Refused by _check_inputs.
        out = self._branches(raw, rotated, positions, segment_ids, cache)
        return self.window_norm(out.window) + self.linear_norm(out.linear), out.cache, out.kv

    def branches(
        self,
        x: Array,
        *,
        positions: Array,
        segment_ids: Array | None = None,
        cache: RAttentionCache | None = None,
    ) -> RAttentionBranches:
        """The two branch outputs (before their norms), the updated cache and the keys/values attended."""
        self._check_inputs(x, positions, segment_ids, cache=cache)
        return self._branches(*self._qkv(x, positions), positions, segment_ids, cache)

    def _branches(
        self, raw: QKV, rotated: QKV, positions: Array, segment_ids: Array | None, cache: RAttentionCache | None
    ) -> RAttentionBranches:
        cfg = self.config
        batch, length = positions.shape
        head_axes = ("batch", "length", "heads", "head_dim")
        kv_axes = ("batch", "length", "kv_heads", "head_dim")

        valid = positions >= 0 if segment_ids is None else (positions >= 0) & (segment_ids != 0)
        own_segments = segment_ids is not None and cache is None  # In cache mode ids only mark padding.
        segments = jnp.where(valid, segment_ids if own_segments else 1, 0).astype(jnp.int32)
        # Valid tokens first, in order: padding is then neither attended nor cached, wherever it was.
        order = jnp.argsort(~valid, axis=1, stable=True)
        num_valid = jnp.sum(valid, axis=1)
        q, k, v, q_raw, k_raw, segments, new_positions = (
            _take(a, order)
            for a in (rotated.q, rotated.k, rotated.v, raw.q, raw.k, segments, jnp.where(valid, positions, -1))
        )
        q, q_raw = shard_activation(q, head_axes), shard_activation(q_raw, head_axes)

        # Keys: the buffer of the last w + 1 tokens (empty in training), then the new tokens.
        buffer = cache if cache is not None else self.init_cache(batch, 0, k.dtype)
        keys = shard_activation(jnp.concatenate([buffer.window.k, k.astype(buffer.window.k.dtype)], axis=1), kv_axes)
        values = shard_activation(jnp.concatenate([buffer.window.v, v.astype(buffer.window.v.dtype)], axis=1), kv_axes)
        keys_raw = jnp.concatenate([buffer.keys, k_raw.astype(buffer.keys.dtype)], axis=1)
        key_positions = jnp.concatenate([buffer.window.positions, new_positions], axis=1)
        key_segments = jnp.where(
            key_positions >= 0, jnp.concatenate([jnp.ones_like(buffer.window.positions), segments], axis=1), -1
        )

        span = cfg.sliding_window + 1
        # The last T keys are the new tokens: an aligned mask, attended in blocks when long (kernels.py).
        mask = AttentionMask(new_positions, key_positions, segments, key_segments, cfg.sliding_window, aligned=True)
        window_out = self.kernel(q, keys, values, mask, logit_softcap=cfg.logit_softcap, query_scale=cfg.query_scale)

        # Linear branch: key t leaves the window at new token t. Keys past this row's valid tokens stay in the
        # buffer: zero features, and the segment of the last key that left, so they leave the state unchanged.
        leaving = jnp.arange(length)[None, :] < num_valid[:, None]
        key_features = apply_feature_map(keys_raw[:, :length], cfg.feature_map)
        key_features = key_features * (leaving & (key_positions[:, :length] >= 0))[..., None, None]
        last_left = _take(key_segments[:, :length], jnp.maximum(num_valid - 1, 0)[:, None])[:, 0]
        run = jnp.where(num_valid > 0, last_left, buffer.state.segment_ids)
        linear_out, state = causal_linear_attention(
            apply_feature_map(q_raw, cfg.feature_map),
            key_features,
            values[:, :length],
            q_segment_ids=segments,
            k_segment_ids=jnp.where(leaving, key_segments[:, :length], run[:, None]),
            initial=buffer.state,
            chunk_size=cfg.chunk_size,
            checkpoint_every=cfg.state_checkpoint_every,
        )

        restore = jnp.argsort(order, axis=1)
        window_out = shard_activation(_take(window_out, restore), head_axes)
        linear_out = shard_activation(_take(linear_out, restore).astype(window_out.dtype), head_axes)
        if cache is None:
            return RAttentionBranches(window_out, linear_out, None, KV(rotated.k, rotated.v, None, None))
        kept = num_valid[:, None] + jnp.arange(span)[None, :]  # The last w + 1 valid tokens.
        new_cache = RAttentionCache(
            KVCache(_take(keys, kept), _take(values, kept), _take(key_positions, kept)), _take(keys_raw, kept), state
        )
        return RAttentionBranches(window_out, linear_out, new_cache, KV(keys, values, key_positions, None))


# ----------------------------------------------------------------------------------------------------
# Feature modifier.


class RAttentionLayout(enum.Enum):
    """Where RAttention goes in a model."""

    ALL = "all"  # Every attention becomes RAttention.
    # Every stack becomes `local_layers` RAttention layers then `global_layers` global attention layers
    # without positional encoding (NoPE), e.g. 3 : 1.
    LOCAL_GLOBAL = "local_global"


def to_rattention(attention: ConfigBase, *, sliding_window: int, feature_map: FeatureMap) -> ConfigBase:
    """An RAttention config with the fields it shares with `attention` (heads, projections, qk-norm...)."""
    new = RAttention.default_config().set(sliding_window=sliding_window, feature_map=feature_map)
    for name in set(new.field_names()) & set(attention.field_names()) - {"klass", "sliding_window", "feature_map"}:
        setattr(new, name, getattr(attention, name))
    return new


class RAttentionModifier(ConfigModifier):
    """Turns every Attention of a config tree into RAttention (layout ALL), or every stack into
    "3 local RAttention : 1 global attention without RoPE" (layout LOCAL_GLOBAL)."""

    class Config(ConfigModifier.Config):
        sliding_window: int = 512
        feature_map: FeatureMap = FeatureMap.SOFTMAX_PAIR
        layout: RAttentionLayout = RAttentionLayout.ALL
        # For LOCAL_GLOBAL: the pattern of each stack.
        local_layers: int = 3
        global_layers: int = 1

    def __call__(self, cfg: ConfigBase) -> ConfigBase:
        mcfg = self.config
        check_positive(mcfg, "sliding_window")
        shared = [path or "<root>" for path, stack in find_configs(cfg, BaseStack.matches) if stack.kv_sharing]
        if shared:
            raise ConfigValueError(
                f"RAttentionModifier: {', '.join(shared)} share keys/values between layers (kv_sharing), which "
                "RAttention cannot do; set kv_sharing=None there first (experiments.decoders.rattention_variant does)"
            )
        subclasses = [
            f"{path or '<root>'} ({attention.klass.__qualname__})"
            for path, attention in find_configs(cfg, Attention.matches)
            if attention.klass is not Attention and not RAttention.matches(attention)
        ]
        if subclasses:
            raise ConfigValueError(
                f"RAttentionModifier: {', '.join(subclasses)} build a subclass of Attention, which RAttention would "
                "replace together with what the subclass adds; make them plain Attention first, or convert them "
                "with to_rattention yourself"
            )

        def convert(attention: ConfigBase) -> ConfigBase:
            if RAttention.matches(attention):
                return attention
            return to_rattention(attention, sliding_window=mcfg.sliding_window, feature_map=mcfg.feature_map)

        if mcfg.layout is RAttentionLayout.ALL:
            return map_attention_configs(cfg, convert)
        cfg = (
            GlobalLocalModifier.default_config()
            .set(
                local_layers=mcfg.local_layers,
                global_layers=mcfg.global_layers,
                sliding_window=mcfg.sliding_window,
                strip_global_rope=True,
            )
            .instantiate()(cfg)
        )

        def convert_local_layers(stack: ConfigBase) -> ConfigBase:
            local = [map_attention_configs(layer, convert) for layer in stack.pattern[: mcfg.local_layers]]
            return stack.set(pattern=local + list(stack.pattern[mcfg.local_layers :]))

        return map_configs(cfg, PatternStack, convert_local_layers)
