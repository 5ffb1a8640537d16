"""Structured pruning of dense decoders: score whole units, remove the least important, get a smaller model.

A unit is a slice of the model along one logical axis (`Unit`): the hidden units of every feed-forward (`mlp`), the
attention heads (`heads`, with their key/value heads `kv_heads`), the model width (`embed`, every parameter's
channel) and whole layers of the stack (`layers`). Importance (`Criterion`) is measured per unit:

- ACTIVATION: the mean magnitude of what the unit outputs on calibration batches (|hidden unit|, the norm of a
  head's output, |channel| of the layers' outputs, |update| a layer adds to the residual stream), read from the
  summaries the layers sow;
- WEIGHT: the L2 norm of every weight of the unit;
- TAYLOR: the first-order Taylor estimate of the loss change, sum over the unit's weights of |w * dL/dw|,
  accumulated over the calibration batches.

`remove` keeps the top units of one kind (ties: the lower index goes first); under grouped-query attention a key/
value group is kept or removed with its query heads (group score: its kv heads' plus its query heads' scores), then
each kept group keeps its best query heads, so every group keeps H'/K' heads. `prune` reaches a `TargetShape` in
one shot (`rounds=1`) or gradually: in `rounds` steps of evenly interpolated shapes, scores re-estimated on the
pruned model before each step (which removes layers, then heads, FFN units and channels). The result is a complete
config (widths written explicitly where they were derived from the model width) and the sliced parameters that
build into it and train on.

Removing a unit equals zeroing its weights in the unpruned model: a removed channel is zero everywhere in the
residual stream, and the RMSNorms over it (whose mean would now divide by D' instead of D) get their scale times
sqrt(D/D') and their eps times D/D', so outputs agree to float rounding.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import flax.nnx as nnx
import numpy as np

from axmini.config import ConfigBase, ConfigValueError, config_path, map_configs, maybe_instantiate
from axmini.layers.attention import Attention, FusedQKVProjection, map_attention_configs
from axmini.layers.decoder import Decoder
from axmini.layers.feed_forward import FeedForward
from axmini.layers.moe import MoE
from axmini.layers.norm import LayerNorm, RMSNorm
from axmini.layers.transformer import BaseStack, RepeatedStack, TransformerLayer
from axmini.module import build_abstract
from axmini.pruning.calibration import Batch, LossFn, accumulate_gradients, decoder_loss, flat, mean_summaries
from axmini.pruning.slicing import (
    Kept,
    Key,
    Removal,
    axes_of,
    build,
    check_plain_weights,
    check_shapes,
    is_under,
    per_unit_sum,
    shapes,
    slice_tree,
)

_STACKED_AXES = ("track", "layers")


class Unit(enum.Enum):
    """What is removed, named by the logical axis it is a slice of; members in the order a round removes them."""

    LAYERS = "layers"
    HEADS = "heads"
    FFN = "mlp"
    CHANNELS = "embed"


class Criterion(enum.Enum):
    """How a unit's importance is measured (see the module docstring); a higher score means more important."""

    ACTIVATION = "activation"
    WEIGHT = "weight"
    TAYLOR = "taylor"


class ModelShape(NamedTuple):
    """The prunable dims of a decoder (one value for the whole model) and its head width."""

    dim: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    hidden_dim: int
    head_dim: int

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads


_AXES = {unit: (unit.value, "kv_heads") if unit is Unit.HEADS else (unit.value,) for unit in Unit}
_UNIT_FIELDS = {
    Unit.LAYERS: ("num_layers",),
    Unit.HEADS: ("num_heads", "num_kv_heads"),
    Unit.FFN: ("hidden_dim",),
    Unit.CHANNELS: ("dim",),
}


class TargetShape(ConfigBase):
    """The shape to prune a decoder to; a field left None keeps the model's value."""

    dim: int | None = None
    num_layers: int | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None
    hidden_dim: int | None = None

    def resolve(self, current: ModelShape) -> ModelShape:
        """The full target shape: `current` with this target's fields set."""
        return current._replace(**{k: v for k, v in self.items() if v is not None})


class PruneResult(NamedTuple):
    config: ConfigBase  # The smaller model's config.
    state: nnx.State  # Its variables: the kept slices of the original ones.
    removals: list[Removal]  # Each removal step, in order (indices into the model before that step).

    def build(self) -> nnx.Module:
        """The pruned model."""
        return build(self.config, self.state)


# ----------------------------------------------------------------------------------------------------
# The shape of a model and the configs of other shapes.


def _modules(model: nnx.Module, kind: type) -> dict[str, nnx.Module]:
    return {"/".join(map(str, path)): m for path, m in nnx.iter_modules(model) if isinstance(m, kind)}


def _one(values: Iterable[int], what: str) -> int:
    found = sorted(set(values))
    if len(found) != 1:
        raise ValueError(f"structured pruning needs one {what} for the whole model, found {found or 'none'}")
    return found[0]


def model_shape(model: nnx.Module) -> ModelShape:
    """The prunable dims of a Decoder (concrete or abstract)."""
    if not isinstance(model, Decoder):
        raise ValueError(f"structured pruning works on Decoder models, not {type(model).__name__}")
    attentions = _modules(model.stack, Attention).values()
    return ModelShape(
        dim=model.config.dim,
        num_layers=model.stack.config.num_layers,
        num_heads=_one((a.config.num_heads for a in attentions), "num_heads"),
        num_kv_heads=_one((a.num_kv_heads for a in attentions), "num_kv_heads"),
        hidden_dim=_one((f.hidden_dim for f in _modules(model.stack, FeedForward).values()), "feed-forward hidden_dim"),
        head_dim=_one((a.head_dim for a in attentions), "head_dim"),
    )


def changes(current: ModelShape, target: ModelShape, unit: Unit) -> bool:
    return any(getattr(current, f) != getattr(target, f) for f in _UNIT_FIELDS[unit])


def check_target(model: nnx.Module, target: TargetShape) -> ModelShape:
    """The resolved target; refuses one the model cannot be pruned to (or a model with weight transforms), naming
    the target field and the fix."""
    check_plain_weights(model.config)
    current = model_shape(model)
    final = target.resolve(current)
    for field in ModelShape._fields[:5]:
        value, limit = getattr(final, field), getattr(current, field)
        if not 0 < value <= limit:
            raise ConfigValueError(f"{config_path(target, field)}={value} must be in [1, {limit}] (the model's value)")
    if final.num_heads % final.num_kv_heads or final.group_size > current.group_size:
        raise ConfigValueError(
            f"{config_path(target, 'num_heads')}={final.num_heads} must be a multiple of "
            f"{config_path(target, 'num_kv_heads')}={final.num_kv_heads} with at most {current.group_size} query "
            "heads per key/value head (the model's group size): each kept group keeps its own query heads"
        )
    stack = model.stack.config
    if changes(current, final, Unit.LAYERS) and (not RepeatedStack.matches(stack) or stack.kv_sharing):
        raise ConfigValueError(
            f"{config_path(target, 'num_layers')}: layer pruning needs a RepeatedStack without KV sharing; "
            f"{config_path(stack)} is a {type(model.stack).__name__} with kv_sharing={stack.kv_sharing}"
        )
    if changes(current, final, Unit.HEADS):
        if stack.kv_sharing or _modules(model, FusedQKVProjection):
            raise ConfigValueError(
                f"{config_path(target, 'num_heads')}: head pruning needs separate q/k/v projections and no KV sharing "
                f"(keys/values read by other layers); leave num_heads and num_kv_heads unset"
            )
    if changes(current, final, Unit.CHANNELS) and _modules(model, LayerNorm):
        raise ConfigValueError(
            f"{config_path(target, 'dim')}: channel pruning keeps outputs exact through RMSNorm only; this model has "
            f"LayerNorms ({', '.join(_modules(model, LayerNorm))})"
        )
    return final


def interpolate(start: ModelShape, final: ModelShape, fraction: float) -> ModelShape:
    """The shape `fraction` of the way from `start` to `final` (rounded; the group size is interpolated on its own,
    so heads stay a multiple of kv heads)."""
    lerp = lambda a, b: math.floor(a + (b - a) * fraction + 0.5)
    kv_heads = lerp(start.num_kv_heads, final.num_kv_heads)
    return final._replace(
        dim=lerp(start.dim, final.dim),
        num_layers=lerp(start.num_layers, final.num_layers),
        num_kv_heads=kv_heads,
        num_heads=kv_heads * lerp(start.group_size, final.group_size),
        hidden_dim=lerp(start.hidden_dim, final.hidden_dim),
    )


def schedule(start: ModelShape, final: ModelShape, rounds: int) -> list[ModelShape]:
    """The shape after each of `rounds` gradual removal steps (the last is `final`)."""
    if rounds < 1:
        raise ValueError(f"rounds={rounds} must be >= 1")
    return [interpolate(start, final, (i + 1) / rounds) for i in range(rounds)]


def _resolved_hidden_dims(cfg: ConfigBase, dim: int) -> ConfigBase:
    """Feed-forward widths written as ints (a width derived from the model width must not shrink with it)."""
    derived = lambda c: FeedForward.matches(c) or MoE.matches(c)
    return map_configs(cfg, derived, lambda c: c.set(hidden_dim=int(maybe_instantiate(c.hidden_dim, input_dim=dim))))


def _scaled_eps(cfg: ConfigBase, factor: float) -> ConfigBase:
    """Every residual-stream RMSNorm (the layers' `norm`, the decoder's `output_norm`) with eps times `factor`."""

    def scale(norm: ConfigBase) -> ConfigBase:
        return norm.set(eps=norm.eps * factor) if RMSNorm.matches(norm) else norm

    cfg = map_configs(cfg, TransformerLayer.matches, lambda layer: layer.set(norm=scale(layer.norm)))
    return cfg.set(output_norm=scale(cfg.output_norm))


def reshape_unit(cfg: ConfigBase, current: ModelShape, target: ModelShape, unit: Unit) -> ConfigBase:
    """`cfg` (of shape `current`) with the dims of `unit` set to `target`'s."""
    if unit is Unit.LAYERS:
        return map_configs(cfg, BaseStack.matches, lambda s: s.set(num_layers=target.num_layers))
    if unit is Unit.HEADS:
        heads = dict(num_heads=target.num_heads, num_kv_heads=target.num_kv_heads, head_dim=current.head_dim)
        return map_attention_configs(cfg, lambda a: a.set(**heads))
    if unit is Unit.FFN:
        return map_configs(cfg, FeedForward.matches, lambda f: f.set(hidden_dim=target.hidden_dim))
    cfg = _resolved_hidden_dims(cfg, current.dim)
    cfg = map_attention_configs(cfg, lambda a: a.set(head_dim=current.head_dim))
    return _scaled_eps(cfg, current.dim / target.dim).set(dim=target.dim)


def reshape(cfg: ConfigBase, current: ModelShape, target: ModelShape) -> ConfigBase:
    """`cfg` (of shape `current`) rewritten to `target`, unit by unit in the order `prune` removes them, so a
    config precomputed here equals the one pruning returns."""
    for unit in Unit:
        if changes(current, target, unit):
            cfg = reshape_unit(cfg, current, target, unit)
            current = current._replace(**{f: getattr(target, f) for f in _UNIT_FIELDS[unit]})
    return cfg


# ----------------------------------------------------------------------------------------------------
# Importance.


def _unit_params(model: nnx.Module, unit: Unit) -> dict[Key, dict[str, nnx.Variable]]:
    """{(module path, axis): {parameter path: parameter}}: the parameters each group of units is made of."""
    params = flat(nnx.state(model, nnx.Param))
    if unit is Unit.FFN:
        keys = [(path, "mlp") for path in _modules(model, FeedForward)]
    elif unit is Unit.HEADS:
        keys = [(path, axis) for path in _modules(model, Attention) for axis in ("heads", "kv_heads")]
    elif unit is Unit.CHANNELS:
        keys = [("", "embed")]
    else:
        keys = [("stack/layers", "layers")]
    groups = {
        (module, axis): {p: v for p, v in params.items() if is_under(p, module) and axis in axes_of(v)}
        for module, axis in keys
    }
    return {key: members for key, members in groups.items() if members}  # (A frozen teacher's modules have none.)


def _lead(axes: tuple[str | None, ...], unit: Unit) -> int:
    """How many leading (stacked) dims a unit's scores keep: per stacked layer for heads and hidden units."""
    if unit is Unit.CHANNELS:
        return 0
    stacked = [a in _STACKED_AXES and a != unit.value for a in axes]
    return stacked.index(False) if False in stacked else len(stacked)


def importance(
    model: nnx.Module,
    batches: Iterable[Batch],
    units: Unit | Sequence[Unit],
    criterion: Criterion = Criterion.TAYLOR,
    *,
    loss_fn: LossFn = decoder_loss,
) -> dict[Key, np.ndarray]:
    """{(module path, axis): scores [..., n]}: one score per unit of each group of one or several kinds, from one
    pass over `batches` (per stacked layer for heads and hidden units; the kv-head scores of the activation
    criterion are 0: a group then scores by its query heads)."""
    units = [units] if isinstance(units, Unit) else list(units)
    groups = {unit: _unit_params(model, unit) for unit in units}
    if criterion is Criterion.ACTIVATION:
        summaries = mean_summaries(model, batches, loss_fn=loss_fn)
        return {k: v for unit in units for k, v in _activation_scores(model, summaries, unit, groups[unit]).items()}
    scores: dict[Key, np.ndarray] = {key: 0.0 for unit in units for key in groups[unit]}

    def add(values: dict[str, nnx.Variable], elementwise: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> None:
        for unit in units:
            for key, members in groups[unit].items():
                for path, param in members.items():
                    axes = axes_of(param)
                    value = elementwise(np.asarray(values[path].get_value()), np.asarray(param.get_value()))
                    scores[key] = scores[key] + per_unit_sum(value, axes.index(key[1]), _lead(axes, unit))

    if criterion is Criterion.WEIGHT:
        add(flat(nnx.state(model, nnx.Param)), lambda w, _: np.square(w, dtype=np.float64))
        return {key: np.sqrt(total) for key, total in scores.items()}
    taylor = lambda g, w: np.abs(g.astype(np.float64) * w)
    accumulate_gradients(model, batches, lambda grads: add(grads, taylor), loss_fn=loss_fn)
    return scores


def _join(path: str, name: str) -> str:
    return f"{path}/{name}" if path else name


def _activation_scores(
    model: nnx.Module, summaries: dict[str, np.ndarray], unit: Unit, groups: dict[Key, dict]
) -> dict[Key, np.ndarray]:
    if unit is Unit.CHANNELS:
        layers = [v.reshape(-1, v.shape[-1]).mean(0) for k, v in summaries.items() if k.endswith("/channel_activation")]
        return {("", "embed"): np.mean(layers, axis=0)}
    if unit is Unit.LAYERS:
        return {("stack/layers", "layers"): summaries["stack/layers/update_activation"].sum(-1)}
    if unit is Unit.FFN:
        return {key: summaries[_join(key[0], "unit_activation")] for key in groups}
    scores = {}
    for path, attention in _modules(model, Attention).items():
        heads = summaries[_join(path, "head_output_norm")]
        scores[(path, "heads")] = heads
        scores[(path, "kv_heads")] = np.zeros(heads.shape[:-1] + (attention.num_kv_heads,))
    return scores


# ----------------------------------------------------------------------------------------------------
# Removal.


def _top(scores: np.ndarray, keep: int) -> np.ndarray:
    """Indices of the `keep` highest scores along the last dim, ascending (ties: the lower index goes first)."""
    order = np.argsort(scores, axis=-1, kind="stable")
    return np.sort(order[..., scores.shape[-1] - keep :], axis=-1)


def select(scores: dict[Key, np.ndarray], unit: Unit, target: ModelShape) -> Kept:
    """The indices each group keeps to reach `target` (see the module docstring for heads)."""
    if unit is not Unit.HEADS:
        keep = getattr(target, _UNIT_FIELDS[unit][0])
        return {key: _top(np.asarray(score), keep) for key, score in scores.items()}
    kept = {}
    for path, axis in scores:
        if axis != "heads":
            continue
        heads, kv_heads = np.asarray(scores[(path, "heads")]), np.asarray(scores[(path, "kv_heads")])
        num_kv = kv_heads.shape[-1]
        by_group = heads.reshape(heads.shape[:-1] + (num_kv, -1))  # [..., K, G]: query head h reads kv head h // G.
        groups = _top(kv_heads + by_group.sum(-1), target.num_kv_heads)  # [..., K']
        in_group = np.take_along_axis(by_group, groups[..., None], axis=-2)  # [..., K', G]
        members = _top(in_group, target.group_size)  # [..., K', G']
        query = groups[..., None] * by_group.shape[-1] + members
        kept[(path, "kv_heads")] = groups
        kept[(path, "heads")] = query.reshape(query.shape[:-2] + (-1,))
    return kept


def _norm_scales(model: nnx.Module, factor: float) -> dict[str, float]:
    """{scale path: factor} of every RMSNorm over the residual stream (its last axis is `embed`)."""
    norms = _modules(model, RMSNorm)
    return {_join(p, "scale"): factor for p, norm in norms.items() if axes_of(norm.scale)[-1:] == ("embed",)}


def remove(
    cfg: ConfigBase, model: nnx.Module, unit: Unit, target: ModelShape, scores: dict[Key, np.ndarray]
) -> PruneResult:
    """Keeps the top-scoring units of one kind, to `target`'s dims for `unit`; `model` is built from `cfg` and
    `scores` are `importance`'s (those of other kinds are ignored)."""
    current = model_shape(model)
    target = current._replace(**{f: getattr(target, f) for f in _UNIT_FIELDS[unit]})
    groups = _unit_params(model, unit)
    scores = {key: score for key, score in scores.items() if key[1] in _AXES[unit]}
    if set(scores) != set(groups):
        raise ValueError(f"remove: scores for {sorted(scores)}; the model's {unit.name} groups are {sorted(groups)}")
    for key, score in scores.items():
        param = next(iter(groups[key].values()))
        units = np.shape(param.get_value())[axes_of(param).index(key[1])]
        if np.shape(score)[-1] != units:
            raise ValueError(f"remove: scores of {key} have shape {np.shape(score)}, not [..., {units}]")
    scales = _norm_scales(model, math.sqrt(current.dim / target.dim)) if unit is Unit.CHANNELS else {}
    removal = Removal(select(scores, unit, target), scales)
    new_cfg = reshape_unit(cfg, current, target, unit)
    old = nnx.state(model, nnx.Not(nnx.Intermediate))
    state = slice_tree(old, [removal], shapes(old), scale=True)
    check_shapes(state, nnx.split(build_abstract(new_cfg))[1], "remove")
    return PruneResult(new_cfg, state, [removal])


def prune(
    cfg: ConfigBase,
    model: nnx.Module,
    batches: Iterable[Batch],
    target: TargetShape,
    *,
    criterion: Criterion = Criterion.TAYLOR,
    rounds: int = 1,
    loss_fn: LossFn = decoder_loss,
) -> PruneResult:
    """Prunes `model` (built from `cfg`) to `target` in `rounds` steps, re-estimating importance on the pruned
    model before each (one pass over `batches` scores every kind of unit the round removes). Pruning to the
    model's own shape returns `cfg` and the model's variables unchanged."""
    final = check_target(model, target)
    batches = list(batches)
    state = nnx.state(model, nnx.Not(nnx.Intermediate))
    removals: list[Removal] = []
    for shape in schedule(model_shape(model), final, rounds):
        units = [unit for unit in Unit if changes(model_shape(model), shape, unit)]
        scores = importance(model, batches, units, criterion, loss_fn=loss_fn) if units else {}
        for unit in units:
            result = remove(cfg, model, unit, shape, scores)
            cfg, state, model = result.config, result.state, result.build()
            removals += result.removals
            if unit is Unit.LAYERS:  # The other kinds' per-layer scores follow the kept layers.
                layers = result.removals[0].kept[("stack/layers", "layers")]
                scores = {k: v[layers] if is_under(k[0], "stack/layers") else v for k, v in scores.items()}
    return PruneResult(cfg, state, removals)
