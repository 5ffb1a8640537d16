"""Slicing parameters by logical axis: the one mechanism behind every structured removal.

A removal is named by where and along which logical axis it keeps what: `{(module path, axis): kept indices}`,
e.g. `("stack/layers/feed_forward", "mlp"): [L, F']` keeps F' hidden units in each of the L stacked layers, and
`("", "embed"): [D']` keeps D' channels of every parameter of the model. A variable is sliced by every entry whose
module path is a prefix of its own path and whose axis it carries (its `axes` metadata), so the same removal slices
the parameters, the optimizer statistics shaped like them, and anything else that names its axes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.nnx as nnx
import jax
import numpy as np

from axmini.config import ConfigBase, ConfigValueError, config_path, find_configs
from axmini.module import Layer, build_abstract

Key = tuple[str, str]  # (module path, logical axis)
Kept = dict[Key, np.ndarray]  # Kept indices, [..., n'], the leading dims being the variable's stacked dims.


class Removal(NamedTuple):
    """One removal step: the indices kept along each (module path, axis) and the factors that some parameters are
    multiplied by to keep the outputs exact (RMSNorm scales when channels go)."""

    kept: Kept
    scales: dict[str, float] = {}


def check_plain_weights(cfg: ConfigBase) -> None:
    """Refuses a model whose layers read their weights through a weight transform (QAT, LoRA): pruning scores and
    slices the weights themselves, and a LoRA model's base weights get no gradient, so its scores would be wrong."""
    found = find_configs(cfg, lambda c: Layer.matches(c) and c.weight_transform is not None)
    if found:
        _, layer = found[0]
        raise ConfigValueError(
            f"{config_path(layer, 'weight_transform')} is a {layer.weight_transform.klass.__name__}: pruning reads "
            "plain weights; prune the model without it and apply the transform after (merge LoRA adapters first: "
            "axmini.lora.merge)"
        )


def take_along(value: Any, indices: np.ndarray, axis: int) -> np.ndarray:
    """value[..., indices[...], ...] along `axis`, where `indices` [..., n'] leads with value's first dims (stacked
    layers, tracks) and its last dim indexes `axis`."""
    lead = indices.ndim - 1
    index = indices.reshape(
        indices.shape[:-1] + (1,) * (axis - lead) + indices.shape[-1:] + (1,) * (np.ndim(value) - axis - 1)
    )
    return np.take_along_axis(np.asarray(value), index, axis=axis)


def per_unit_sum(value: np.ndarray, axis: int, lead: int) -> np.ndarray:
    """Sums `value` over every dim but its first `lead` dims and `axis`: [*value.shape[:lead], value.shape[axis]]."""
    moved = np.moveaxis(np.asarray(value, np.float64), axis, -1)
    return moved.sum(axis=tuple(range(lead, moved.ndim - 1)))


def is_under(path: str, module_path: str) -> bool:
    return not module_path or path == module_path or path.startswith(module_path + "/")


def axes_of(variable: nnx.Variable) -> tuple[str | None, ...]:
    return tuple(variable.get_metadata().get("axes") or ())


def slice_value(path: str, variable: nnx.Variable, removal: Removal, *, scale: bool) -> np.ndarray:
    """The value of the variable at `path` after `removal` (times its factor when `scale`)."""
    value = np.asarray(variable.get_value())
    axes = axes_of(variable)
    for (module_path, axis), indices in removal.kept.items():
        if axis in axes and is_under(path, module_path):
            value = take_along(value, np.asarray(indices), axes.index(axis))
    if scale and path in removal.scales:
        value = value * np.asarray(removal.scales[path], value.dtype)
    return value


def _param_path(keys: tuple[Any, ...], param_paths: Mapping[str, tuple[int, ...]]) -> str | None:
    """The parameter path that ends the key path of a variable in a tree (optimizer statistics are nested in the
    optimizer's state), or None."""
    names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in keys]
    for start in range(len(names)):
        candidate = "/".join(names[start:])
        if candidate in param_paths:
            return candidate
    return None


def slice_tree(tree: Any, removals: list[Removal], param_shapes: Mapping[str, tuple[int, ...]], *, scale: bool) -> Any:
    """`tree` (parameters, or an optimizer state) with every variable shaped like the parameter it belongs to sliced
    by `removals` in order; `param_shapes` maps each parameter path of the model before them to its shape. Other
    leaves (step counts, statistics of another shape) are returned unchanged."""

    def visit(keys: tuple[Any, ...], leaf: Any) -> Any:
        if not isinstance(leaf, nnx.Variable):
            return leaf
        path = _param_path(keys, param_shapes)
        if path is None or tuple(np.shape(leaf.get_value())) != param_shapes[path]:
            return leaf
        for removal in removals:
            leaf = leaf.replace(slice_value(path, leaf, removal, scale=scale))
        return leaf

    return jax.tree_util.tree_map_with_path(visit, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shapes(state: nnx.State) -> dict[str, tuple[int, ...]]:
    return {"/".join(map(str, path)): tuple(np.shape(v.get_value())) for path, v in nnx.to_flat_state(state)}


def check_shapes(state: nnx.State, expected: nnx.State, what: str) -> None:
    """Refuses a sliced state whose shapes are not those of the config it is meant for."""
    got, want = shapes(state), shapes(expected)
    for path in sorted(set(got) | set(want)):
        if got.get(path) != want.get(path):
            raise ValueError(f"{what}: {path} has shape {got.get(path)}; the pruned config expects {want.get(path)}")


def build(cfg: ConfigBase, state: nnx.State) -> nnx.Module:
    """The model of `cfg` with the variables of `state`."""
    graphdef, _ = nnx.split(build_abstract(cfg))
    return nnx.merge(graphdef, state)
