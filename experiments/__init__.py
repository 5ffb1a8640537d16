"""The built-in experiments: a registry of functions that each return a complete trainer config.

`@register("name")` adds a function; `get("name")` calls it; `names()` lists them. The modules below register on
import, so importing this package makes every experiment reachable by name. This folder is installed as the package
`axmini.experiments` (through the link axmini/experiments -> ../experiments), never as a top-level `experiments`
that would clash with a user's own. Experiments of the user's own are reached by file or module path:
`axmini.experiment_loader`.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from collections.abc import Callable

from axmini.config import ConfigBase
from axmini.experiment_loader import ExperimentError

_REGISTRY: dict[str, Callable[[], ConfigBase]] = {}


class UnknownExperimentError(ExperimentError):
    """A name that no experiment was registered under."""


def register(name: str) -> Callable[[Callable[[], ConfigBase]], Callable[[], ConfigBase]]:
    """Registers `fn` as the experiment `name`."""

    def wrap(fn: Callable[[], ConfigBase]) -> Callable[[], ConfigBase]:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"experiment {name!r} is registered twice ({_REGISTRY[name].__module__}, {fn.__module__})")
        _REGISTRY[name] = fn
        return fn

    return wrap


def _load_all() -> None:
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


def names() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def get(name: str) -> ConfigBase:
    """A fresh config of the named experiment."""
    _load_all()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=3, cutoff=0.4)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise UnknownExperimentError(
            f"unknown experiment {name!r}{hint} (see `axmini configs list`; one of your own: path/to/file.py:FUNCTION)"
        )
    return _REGISTRY[name]()
