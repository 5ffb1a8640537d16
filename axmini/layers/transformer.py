"""The transformer layer and the stacks of layers: repeated (scanned), patterned, and KV-cache sharing.

- `TransformerLayer`: pre-norm residual block with three slots (`norm`, `self_attention`, `feed_forward`).
- `RepeatedStack`: one layer config x `num_layers`; parameters stacked on a leading `layers` axis and run
  with `jax.lax.scan` (one compiled layer whatever the depth), in training and in decoding.
- `PatternStack`: a list of layer configs tiled to `num_layers` ("3 local : 1 global", "dense, MoE"), scanned
  over repeats of the pattern (one `LayerGroup` of the pattern's layers, parameters stacked per repeat).
- KV-cache sharing (Apple Foundation LM 2025): with `kv_sharing=(a, b)` both stacks split into two blocks
  of depth ratio a:b. Second-block layers have no key/value projections (their projection becomes a
  `QueryOnlyProjection`) and attend to the keys/values of the LAST first-block layer; only first-block
  layers keep a KV cache, so the cache shrinks by b / (a + b).

Every call is one code path: `cache=None` is the training forward; with a cache (from `init_cache`) the
new tokens are written into it (prefill or one-step extend).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
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
    map_configs,
    optional,
    replace_config,
)
from axmini.layers.attention import KV, Attention, BaseQKVProjection, QueryOnlyProjection, SlidingWindowModifier
from axmini.layers.feed_forward import FeedForward
from axmini.layers.norm import RMSNorm
from axmini.layers.position import RoPEProjection
from axmini.module import AuxLoss, Layer, Summary, resow, stack_modules

Array = jax.Array


class LayerOutput(NamedTuple):
    x: Array  # [B,T,D]
    cache: Any | None  # The layer's updated cache (None without a cache, or for a KV-sharing consumer).
    kv: KV | None  # The keys/values its attention used, for a KV-sharing consumer.


class TransformerLayer(Layer):
    """x + attention(norm(x)), then x + feed_forward(norm(x)). Each of the three parts is a slot.

    With the optional "sandwich" norms (Gemma 2 and 3) each residual branch is also normalized at its output:
    x + post_attention_norm(attention(norm(x))), then x + post_feed_forward_norm(feed_forward(norm(x))).
    """

    class Config(Layer.Config):
        input_dim: Required[int] = REQUIRED
        norm: Layer.Config = RMSNorm.default_config()
        self_attention: Layer.Config = Attention.default_config()
        feed_forward: Layer.Config = FeedForward.default_config()
        post_attention_norm: Layer.Config | None = optional(None)
        post_feed_forward_norm: Layer.Config | None = optional(None)

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        cfg = self.config
        norm, attention, feed_forward = (
            fill_child(child, parent=cfg, input_dim=cfg.input_dim)
            for child in (cfg.norm, cfg.self_attention, cfg.feed_forward)
        )
        self.attention_norm = norm.instantiate(rngs=rngs)
        self.self_attention = attention.instantiate(rngs=rngs)
        self.feed_forward_norm = norm.instantiate(rngs=rngs)
        self.feed_forward = feed_forward.instantiate(rngs=rngs)
        self.post_attention_norm, self.post_feed_forward_norm = (
            fill_child(child, parent=cfg, input_dim=cfg.input_dim).instantiate(rngs=rngs) if child is not None else None
            for child in (cfg.post_attention_norm, cfg.post_feed_forward_norm)
        )

    def __call__(
        self,
        x: Array,
        *,
        positions: Array,
        segment_ids: Array | None = None,
        cache: Any | None = None,
        shared_kv: KV | None = None,
    ) -> LayerOutput:
        attn = self.self_attention(
            self.attention_norm(x), positions=positions, segment_ids=segment_ids, cache=cache, shared_kv=shared_kv
        )
        y = x + maybe_apply(self.post_attention_norm, attn.output)
        y = y + maybe_apply(self.post_feed_forward_norm, self.feed_forward(self.feed_forward_norm(y)))
        self._sow_activations(x, y)
        return LayerOutput(y, attn.cache, attn.kv)

    def _sow_activations(self, x: Array, y: Array) -> None:
        """Sows the mean |output| and |output - input| of each channel over the tokens [D]: what activation-based
        channel and layer pruning read."""
        mean_abs = lambda a: jnp.mean(jnp.abs(a.astype(jnp.float32)), axis=(0, 1))
        self.add_summary("channel_activation", mean_abs(y))
        self.add_summary("update_activation", mean_abs(y - x))

    def init_cache(self, batch_size: int, max_length: int, dtype: Any = jnp.float32) -> Any:
        return self.self_attention.init_cache(batch_size, max_length, dtype)


def maybe_apply(norm: nnx.Module | None, x: Array) -> Array:
    """`norm(x)`, or `x` where the optional norm (a sandwich norm) is off."""
    return x if norm is None else norm(x)


# ----------------------------------------------------------------------------------------------------
# Stacks.


class RematPolicy(enum.Enum):
    """What each layer (scanned group, for a PatternStack) keeps for the backward pass: a jax.checkpoint policy."""

    NONE = "none"  # No remat: keep every activation (fastest, most memory).
    NOTHING_SAVEABLE = "nothing_saveable"  # Keep only the layer's input; recompute the rest (least memory).
    DOTS_SAVEABLE = "dots_saveable"  # Keep every matmul output.
    DOTS_WITH_NO_BATCH_DIMS_SAVEABLE = "dots_with_no_batch_dims_saveable"  # Keep weight matmuls; recompute attention.
    # As DOTS_WITH_NO_BATCH_DIMS_SAVEABLE, kept in pinned host memory instead of device memory (GPU, TPU; a device
    # without pinned host memory keeps them).
    OFFLOAD_DOTS_WITH_NO_BATCH_DIMS = "offload_dot_with_no_batch_dims"

    @property
    def policy(self) -> Callable | None:
        """The jax.checkpoint policy (None for NONE: no checkpoint at all)."""
        if self is RematPolicy.NONE:
            return None
        if self is RematPolicy.OFFLOAD_DOTS_WITH_NO_BATCH_DIMS:
            if not any(memory.kind == "pinned_host" for memory in jax.devices()[0].addressable_memories()):
                return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
            return jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host")
        return getattr(jax.checkpoint_policies, self.value)

    def apply(self, fn: Callable) -> Callable:
        """`fn` wrapped in jax.checkpoint with this policy (unchanged for NONE)."""
        return fn if self is RematPolicy.NONE else jax.checkpoint(fn, policy=self.policy)


class StackOutput(NamedTuple):
    x: Array  # [B,T,D]
    cache: Any | None  # The updated cache of the first-block layers (None without a cache).


def is_leaf_projection(cfg: ConfigBase) -> bool:
    """A QKV projection config that does the projecting itself (not a wrapper such as RoPE)."""
    return BaseQKVProjection.matches(cfg) and not cfg.klass.wraps_projection


def kv_consumer_config(layer_cfg: ConfigBase, path: str) -> ConfigBase:
    """`layer_cfg` with every key/value-producing projection replaced by a query-only one."""
    if not find_configs(layer_cfg, is_leaf_projection):
        raise ConfigValueError(
            f"{path}: KV sharing needs layers whose attention has a QKV projection slot (input_linear); "
            f"{type(layer_cfg).__qualname__} has none. Set kv_sharing=None or use such an attention"
        )
    return replace_config(layer_cfg, target=is_leaf_projection, new=QueryOnlyProjection.default_config())


def _windows(layer_cfg: ConfigBase) -> set[int | None]:
    """The sliding windows (None = global) of the attentions in a layer config."""
    return {attention.sliding_window for _, attention in find_configs(layer_cfg, Attention.matches)}


class BaseStack(Layer):
    """A stack of layers: [B,T,D] -> [B,T,D], with optional KV-cache sharing between two blocks."""

    class Config(Layer.Config):
        input_dim: Required[int] = REQUIRED
        num_layers: Required[int] = REQUIRED
        # KV-cache sharing: depth ratio (first block, second block), e.g. (5, 3) or (35, 21). None: off.
        kv_sharing: tuple[int, int] | None = None
        remat: RematPolicy = RematPolicy.NONE

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        check_positive(self.config, "num_layers")

    @property
    def num_kv_layers(self) -> int:
        """The number of first-block layers: those that produce keys/values and keep a cache."""
        return self.kv_layer_count(self.config)

    @staticmethod
    def kv_layer_count(cfg: Config) -> int:
        """`num_kv_layers` of a stack config."""
        if cfg.kv_sharing is None:
            return cfg.num_layers
        first, second = cfg.kv_sharing
        total = first + second
        if first <= 0 or second <= 0 or (cfg.num_layers * first) % total:
            raise ConfigValueError(
                f"{config_path(cfg, 'kv_sharing')}={cfg.kv_sharing} does not split {config_path(cfg, 'num_layers')}="
                f"{cfg.num_layers} into two whole, non-empty blocks; use a ratio a:b with a, b > 0 and "
                f"num_layers * a divisible by a + b (e.g. (5, 3) for 56 layers gives 35 + 21)"
            )
        return cfg.num_layers * first // total

    @classmethod
    def layer_location(cls, cfg: Config, index: int) -> tuple[str, int]:
        """Where the parameters of layer `index` live: (their path in the stack, their index on the leading
        `layers` axis of those stacked parameters). How a checkpoint converter finds layer i."""
        raise NotImplementedError(cls)

    def _block_configs(self, layer_cfgs: list[ConfigBase]) -> list[ConfigBase]:
        """Per-layer configs with input_dim filled and second-block layers made KV consumers."""
        cfg = self.config
        n_kv = self.num_kv_layers
        layer_cfgs = [fill_child(c, parent=cfg, input_dim=cfg.input_dim) for c in layer_cfgs]
        if n_kv == cfg.num_layers:
            return layer_cfgs
        path = config_path(cfg, "kv_sharing")
        provider = _windows(layer_cfgs[n_kv - 1])
        for i in range(n_kv, cfg.num_layers):
            layer_cfgs[i] = kv_consumer_config(layer_cfgs[i], path)
            for window in _windows(layer_cfgs[i]):
                if any(w is not None and (window is None or window > w) for w in provider):
                    raise ConfigValueError(
                        f"{path}: layer {i} attends with sliding_window={window} (None = global) to the keys/"
                        f"values of layer {n_kv - 1} (sliding_window={sorted(provider, key=str)}), whose cache "
                        "only holds its own window; decoding would differ from training. Make the last "
                        "first-block layer global or give second-block layers a window no larger than its"
                    )
        return layer_cfgs

    def __call__(
        self, x: Array, *, positions: Array, segment_ids: Array | None = None, cache: Any | None = None
    ) -> StackOutput:
        raise NotImplementedError(type(self))

    def init_cache(self, batch_size: int, max_length: int, dtype: Any = jnp.float32) -> Any:
        raise NotImplementedError(type(self))


def _scan_layers(
    layers: nnx.Module,
    x: Array,
    *,
    positions: Array,
    segment_ids: Array | None,
    cache: Any | None,
    shared_kv: KV | None,
    want_kv: bool,
    remat: RematPolicy,
) -> tuple[Array, Any | None, KV | None]:
    """Runs stacked `layers` in order with jax.lax.scan; returns (x, stacked new cache, last layer's kv).

    What the layers sow is captured per layer inside the scan and sown again on `layers` afterwards:
    aux losses summed over layers (a scalar, as from an unscanned layer), summaries stacked over layers.
    """
    graphdef, sown, state = nnx.split(layers, nnx.Intermediate, ...)

    def step(layer_state: Any, x: Array, layer_cache: Any) -> tuple[LayerOutput, Any]:
        layer = nnx.merge(graphdef, sown, layer_state)
        out, losses, summaries = nnx.capture(_call_layer, AuxLoss, Summary)(
            layer, x, positions, segment_ids, layer_cache, shared_kv
        )
        return out, (losses, summaries)

    step = remat.apply(step)
    kv = None
    if want_kv:  # The scan carries the latest layer's kv, so only the last one is kept.

        def first_kv(state: Any, cache: Any) -> KV:
            first_state, first_cache = jax.tree.map(lambda a: a[0], (state, cache))
            return step(first_state, x, first_cache)[0].kv

        kv = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(first_kv, state, cache))

    def body(carry: tuple[Array, KV | None], xs: tuple[Any, Any]) -> tuple[tuple[Array, KV | None], Any]:
        out, aux = step(xs[0], carry[0], xs[1])
        return (out.x, out.kv if want_kv else None), (out.cache, aux)

    (x, kv), (new_cache, (losses, summaries)) = jax.lax.scan(body, (x, kv), (state, cache))
    resow(layers, losses, summaries)
    return x, new_cache if cache is not None else None, kv


class RepeatedStack(BaseStack):
    """`num_layers` copies of one layer config, scanned over parameters stacked on a `layers` axis.

    With KV sharing, `layers` holds the first block and `shared_kv_layers` the second (query-only) block.
    The cache is the first block's layer caches stacked on a leading axis.
    """

    class Config(BaseStack.Config):
        layer: Layer.Config = TransformerLayer.default_config()

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        cfg = self.config
        n_kv = self.num_kv_layers
        layer_cfgs = self._block_configs([cfg.layer] * cfg.num_layers)
        self.layers = stack_modules(layer_cfgs[0], n_kv, axis="layers", rngs=rngs)
        n_shared = cfg.num_layers - n_kv
        self.shared_kv_layers = stack_modules(layer_cfgs[-1], n_shared, axis="layers", rngs=rngs) if n_shared else None

    @classmethod
    def layer_location(cls, cfg: Config, index: int) -> tuple[str, int]:
        n_kv = cls.kv_layer_count(cfg)
        return ("layers", index) if index < n_kv else ("shared_kv_layers", index - n_kv)

    def __call__(
        self, x: Array, *, positions: Array, segment_ids: Array | None = None, cache: Any | None = None
    ) -> StackOutput:
        remat = self.config.remat
        shared = self.shared_kv_layers is not None
        x, cache, kv = _scan_layers(
            self.layers,
            x,
            positions=positions,
            segment_ids=segment_ids,
            cache=cache,
            shared_kv=None,
            want_kv=shared,
            remat=remat,
        )
        if shared:
            x, _, _ = _scan_layers(
                self.shared_kv_layers,
                x,
                positions=positions,
                segment_ids=segment_ids,
                cache=None,
                shared_kv=kv,
                want_kv=False,
                remat=remat,
            )
        return StackOutput(x, cache)

    def init_cache(self, batch_size: int, max_length: int, dtype: Any = jnp.float32) -> Any:
        """The first block's layer caches, stacked on a leading axis of length `num_kv_layers`."""
        one = self.layers.init_cache(batch_size, max_length, dtype)
        return jax.tree.map(lambda a: jnp.broadcast_to(a, (self.num_kv_layers, *a.shape)), one)


def _in_order(modules: nnx.Dict, count: int) -> list[nnx.Module]:
    """The `count` modules of an nnx.Dict keyed "0", "1", ..., in index order (its len() also counts what nnx.capture
    attaches)."""
    return [modules[str(i)] for i in range(count)]


class LayerGroup(Layer):
    """Layers applied in turn, with a layer's call contract: the unit a PatternStack scans over.

    Its cache is a tuple with one entry per layer; its `kv` is its last layer's. In a KV-sharing consumer group every
    layer reads the same `shared_kv`. Layers are kept in an nnx.Dict keyed "0", "1", ... (not an nnx.List, whose mix of
    int keys and the str keys nnx.capture adds cannot be split inside a capture, as the scan does).
    """

    class Config(Layer.Config):
        input_dim: Required[int] = REQUIRED
        layers: list[Layer.Config] = []

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        cfg = self.config
        self.layers = nnx.Dict(
            {
                str(i): fill_child(layer, parent=cfg, input_dim=cfg.input_dim).instantiate(rngs=rngs)
                for i, layer in enumerate(cfg.layers)
            }
        )

    def __call__(
        self,
        x: Array,
        *,
        positions: Array,
        segment_ids: Array | None = None,
        cache: Any | None = None,
        shared_kv: KV | None = None,
    ) -> LayerOutput:
        caches, kv = [], None
        for i, layer in enumerate(_in_order(self.layers, len(self.config.layers))):
            layer_cache = None if cache is None else cache[i]
            out = layer(x, positions=positions, segment_ids=segment_ids, cache=layer_cache, shared_kv=shared_kv)
            x, kv = out.x, out.kv
            caches.append(out.cache)
        return LayerOutput(x, tuple(caches) if cache is not None else None, kv)

    def init_cache(self, batch_size: int, max_length: int, dtype: Any = jnp.float32) -> Any:
        return tuple(
            layer.init_cache(batch_size, max_length, dtype) for layer in _in_order(self.layers, len(self.config.layers))
        )


class PatternStack(BaseStack):
    """The layer configs in `pattern`, tiled to `num_layers`, scanned over repeats of the pattern.

    E.g. pattern=[local, local, local, global] with num_layers=8 gives L L L G L L L G: one `LayerGroup` of the
    four pattern layers, its parameters stacked twice on a leading `layers` axis (`groups/0/layers/3/...` is the
    global layer of every repeat), run with jax.lax.scan. So build and compile time do not grow with depth.

    With KV sharing the two blocks are separate groups (the second of query-only consumers); a block whose length
    is not a multiple of the pattern ends in a group of one repeat holding the rest. The cache is a tuple with one
    entry per first-block group: its layers' caches, stacked over repeats. Remat applies to each group call.
    """

    class Config(BaseStack.Config):
        pattern: list[Layer.Config] = [TransformerLayer.default_config()]

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        cfg = self.config
        period = len(cfg.pattern)
        if period == 0 or cfg.num_layers % period:
            raise ConfigValueError(
                f"{config_path(cfg, 'num_layers')}={cfg.num_layers} is not a multiple of the pattern length "
                f"len({config_path(cfg, 'pattern')})={period}; use num_layers = k * {period or 'len(pattern)'}"
            )
        layer_cfgs = self._block_configs([cfg.pattern[i % period] for i in range(cfg.num_layers)])
        runs = self.group_runs(cfg)
        self.num_kv_groups = sum(first < self.num_kv_layers for first, _, _ in runs)
        self.repeats = tuple(repeats for _, _, repeats in runs)

        def group(first: int, size: int) -> LayerGroup.Config:
            return LayerGroup.default_config().set(input_dim=cfg.input_dim, layers=layer_cfgs[first : first + size])

        self.groups = nnx.Dict(
            {
                str(i): stack_modules(group(first, size), repeats, axis="layers", rngs=rngs)
                for i, (first, size, repeats) in enumerate(runs)
            }
        )

    @classmethod
    def group_runs(cls, cfg: Config) -> list[tuple[int, int, int]]:
        """(first layer, layers, repeats) of each scanned group: per KV-sharing block, its whole patterns, then its
        rest."""
        period, n_kv = len(cfg.pattern), cls.kv_layer_count(cfg)
        runs = []
        for start, end in ((0, n_kv), (n_kv, cfg.num_layers)):
            repeats = (end - start) // period
            rest = start + repeats * period
            runs += [(start, period, repeats)] if repeats else []
            runs += [(rest, end - rest, 1)] if rest < end else []
        return runs

    @classmethod
    def layer_location(cls, cfg: Config, index: int) -> tuple[str, int]:
        for group, (first, size, repeats) in enumerate(cls.group_runs(cfg)):
            if first <= index < first + size * repeats:
                return f"groups/{group}/layers/{(index - first) % size}", (index - first) // size
        raise IndexError(f"{config_path(cfg, 'num_layers')}={cfg.num_layers} has no layer {index}")

    def __call__(
        self, x: Array, *, positions: Array, segment_ids: Array | None = None, cache: Any | None = None
    ) -> StackOutput:
        new_cache, kv = [], None
        last_producer = self.num_kv_groups - 1
        for i, group in enumerate(_in_order(self.groups, len(self.repeats))):
            producer = i < self.num_kv_groups
            x, group_cache, group_kv = _scan_layers(
                group,
                x,
                positions=positions,
                segment_ids=segment_ids,
                cache=cache[i] if cache is not None and producer else None,
                shared_kv=None if producer else kv,
                want_kv=i == last_producer and len(self.repeats) > self.num_kv_groups,
                remat=self.config.remat,
            )
            if producer:
                new_cache.append(group_cache)
            if i == last_producer:
                kv = group_kv  # What the second block's groups read (None without KV sharing).
        return StackOutput(x, tuple(new_cache) if cache is not None else None)

    def layer_configs(self) -> list[Layer.Config]:
        """The config of every layer in order, as built (second-block layers with their query-only projections)."""
        groups = zip(_in_order(self.groups, len(self.repeats)), self.repeats)
        return [layer for group, n in groups for _ in range(n) for layer in group.config.layers]

    def init_cache(self, batch_size: int, max_length: int, dtype: Any = jnp.float32) -> Any:
        """Per first-block group, its layers' caches stacked over its repeats."""
        return tuple(
            jax.tree.map(
                lambda a, n=n: jnp.broadcast_to(a, (n, *a.shape)), group.init_cache(batch_size, max_length, dtype)
            )
            for group, n in zip(_in_order(self.groups, len(self.repeats))[: self.num_kv_groups], self.repeats)
        )


def _call_layer(
    layer: nnx.Module, x: Array, positions: Array, segment_ids: Array | None, cache: Any, shared_kv: KV | None
) -> LayerOutput:
    return layer(x, positions=positions, segment_ids=segment_ids, cache=cache, shared_kv=shared_kv)


def to_pattern_stack(stack: BaseStack.Config) -> PatternStack.Config:
    """`stack` as a PatternStack config (a RepeatedStack's layer becomes a pattern of one), with every other field
    carried over: what a modifier that gives a stack per-layer patterns starts from."""
    if PatternStack.matches(stack):
        return stack.clone()
    if not RepeatedStack.matches(stack):
        raise ConfigValueError(f"{type(stack).__qualname__} is neither a RepeatedStack nor a PatternStack config")
    result = PatternStack.default_config()
    for name in set(result.field_names()) & set(stack.field_names()) - {"klass", "pattern"}:
        setattr(result, name, getattr(stack, name))
    return result.set(pattern=[stack.layer])


# ----------------------------------------------------------------------------------------------------
# Feature modifiers.


class KVSharingModifier(ConfigModifier):
    """Turns on KV-cache sharing in every stack of a tree, with the given block depth ratio."""

    class Config(ConfigModifier.Config):
        # (first block, second block) depth ratio; the Apple on-device model uses 5:3 (35 + 21 layers).
        split: tuple[int, int] = (5, 3)

    def __call__(self, cfg: ConfigBase) -> ConfigBase:
        return map_configs(cfg, BaseStack.matches, lambda stack: stack.set(kv_sharing=tuple(self.config.split)))


class GlobalLocalModifier(ConfigModifier):
    """Turns every stack into a pattern of `local_layers` sliding-window layers then `global_layers` global
    ones (e.g. 3 local : 1 global), optionally without RoPE on the global layers (NoPE)."""

    class Config(ConfigModifier.Config):
        local_layers: int = 3
        global_layers: int = 1
        sliding_window: int = 4096
        # Remove RoPE from the global layers (their attention then has no positional encoding).
        strip_global_rope: bool = True
        # The RoPE theta of the local layers (Gemma 3: 10k local, 1M global); None: as the layer config has it.
        local_rope_theta: float | None = None

    def __call__(self, cfg: ConfigBase) -> ConfigBase:
        check_positive(self.config, "local_layers", "global_layers", "sliding_window", "local_rope_theta")
        for path, stack in find_configs(cfg, BaseStack.matches):
            period = len(to_pattern_stack(stack).pattern)
            if period != 1:
                raise ConfigValueError(
                    f"GlobalLocalModifier: {path or '<root>'} already has a pattern of {period} layer configs; "
                    "apply it to a stack with one layer config"
                )
        return map_configs(cfg, BaseStack.matches, self._convert)

    def _convert(self, stack: ConfigBase) -> ConfigBase:
        mcfg = self.config
        stack = to_pattern_stack(stack)
        window = SlidingWindowModifier.default_config().set(sliding_window=mcfg.sliding_window).instantiate()
        local = window(stack.pattern[0].clone())
        if mcfg.local_rope_theta is not None:
            local = map_configs(local, RoPEProjection, lambda rope: rope.set(theta=mcfg.local_rope_theta))
        global_ = stack.pattern[0].clone()
        if mcfg.strip_global_rope:
            global_ = map_configs(global_, RoPEProjection, lambda rope: rope.inner)
        return stack.set(pattern=[local] * mcfg.local_layers + [global_] * mcfg.global_layers)


class RematModifier(ConfigModifier):
    """Sets the remat policy of every stack in a tree (e.g. from a mesh rule, for the hardware's memory)."""

    class Config(ConfigModifier.Config):
        policy: RematPolicy = RematPolicy.NOTHING_SAVEABLE

    def __call__(self, cfg: ConfigBase) -> ConfigBase:
        return map_configs(cfg, BaseStack.matches, lambda stack: stack.set(remat=self.config.policy))
