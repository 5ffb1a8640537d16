"""What a patch changes in a config tree, read from the trees before and after it.

- config paths changed: `path: value` lines of `debug_string()` that differ, appear or vanish;
- layers changed: layer configs (klass a `Layer`) whose class changed or that are new;
- layers touched: layer configs that own a changed path (the innermost layer config above it): a window-size
  change touches every attention and changes none.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from axmini.config import ConfigBase, find_configs, visit
from axmini.module import Layer


def is_subclass(value: Any, base: type) -> bool:
    return isinstance(value, type) and issubclass(value, base)


def is_layer_config(cfg: Any) -> bool:
    return is_subclass(getattr(cfg, "klass", None), Layer)


def _debug_lines(cfg: ConfigBase) -> dict[str, str]:
    lines = {}
    for line in cfg.debug_string().splitlines():
        path, _, value = line.partition(": ")
        lines[path] = value
    return lines


def config_paths_changed(before: ConfigBase, after: ConfigBase) -> list[str]:
    """The `debug_string` paths whose value differs, or that only one of the two configs has."""
    a, b = _debug_lines(before), _debug_lines(after)
    return sorted(path for path in a.keys() | b.keys() if a.get(path) != b.get(path))


def _layer_classes(cfg: ConfigBase) -> dict[str, type]:
    found = {"": cfg.klass} if is_layer_config(cfg) else {}

    def add(path: str, value: Any) -> None:
        if isinstance(value, ConfigBase) and is_layer_config(value):
            found[path] = value.klass

    visit(cfg, add)
    return found


def layers_changed(before: ConfigBase, after: ConfigBase) -> list[str]:
    """Paths of layer configs in `after` whose class differs from `before`'s at that path, or that are new."""
    old = _layer_classes(before)
    return sorted(path for path, klass in _layer_classes(after).items() if old.get(path) is not klass)


def layers_touched(before: ConfigBase, after: ConfigBase) -> list[str]:
    """Paths of the layer configs that own a changed config path (the innermost layer config above it)."""
    roots = set(_layer_classes(before)) | set(_layer_classes(after))
    touched = set()
    for path in config_paths_changed(before, after):
        owners = [root for root in roots if root != path and inside(path, [root])]  # A slot line: its parent.
        if owners:
            touched.add(max(owners, key=len))
    return sorted(touched)


def inside(path: str, roots: Iterable[str]) -> bool:
    """Whether the config path lies in (or is) one of `roots` ("" is the whole tree)."""
    return any(
        root == "" or path == root or path.startswith(f"{root}.") or path.startswith(f"{root}[") for root in roots
    )


def model_configs(cfg: ConfigBase) -> list[tuple[str, ConfigBase]]:
    """The outermost layer configs in a tree (the whole config if it is one): what a build check builds."""
    if is_layer_config(cfg):
        return [("", cfg)]
    found = find_configs(cfg, is_layer_config)
    return [(p, c) for p, c in found if not any(p.startswith((f"{q}.", f"{q}[")) for q, _ in found)]
