"""Which experiment a command means: a built-in name, or a function in a file or a module of the user's own.

    tiny                          a built-in experiment (`axmini configs list`; the registry in axmini.experiments)
    my_project/exps.py:my_model   the function `my_model` of a Python file, anywhere (AXLearn's --module/--config)
    my_package.exps:my_model      the function `my_model` of an importable module

The function takes no argument and returns a complete trainer config (`Trainer.Config`). A file is imported as a
script's neighbour would be: as the module named after it, with its directory on `sys.path`, so it can import the
files beside it. A module path is imported from `sys.path` and the current directory (as `python -m` does).

A reference that leads nowhere (no such file or module, no such function, a function that needs arguments or returns
something other than a trainer config) is an `ExperimentError`: a `ConfigError` the commands print in one line. An
exception raised by the user's own code while it is imported or called is theirs: it keeps its traceback.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.util
import inspect
import os
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from axmini.config import ConfigError

_IDENTIFIER = re.compile(r"[A-Za-z_]\w*")
_MODULE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


class ExperimentError(ConfigError):
    """A reference that names no experiment (printed in one line by the commands)."""


@dataclasses.dataclass(frozen=True)
class ExperimentRef:
    """Where an experiment is: `name` alone (built in), or the function `name` of `file` or of `module`."""

    name: str
    file: str | None = None  # An absolute path.
    module: str | None = None

    def __str__(self) -> str:
        """The canonical text, which parses back to this reference from any directory."""
        location = self.file or self.module
        return f"{location}:{self.name}" if location else self.name

    @property
    def is_builtin(self) -> bool:
        return self.file is None and self.module is None


def parse(text: str) -> ExperimentRef:
    """`tiny`, `path/to/file.py:function` or `package.module:function` as an ExperimentRef (nothing is imported)."""
    location, colon, function = text.strip().rpartition(":")
    if not colon:
        if text.strip().endswith(".py"):
            raise ExperimentError(f"experiment {text!r}: name the function too, as in {text.strip()}:my_experiment")
        if not text.strip():
            raise ExperimentError("the experiment is empty: give a name (axmini configs list) or FILE.py:FUNCTION")
        return ExperimentRef(text.strip())
    if not _IDENTIFIER.fullmatch(function):
        raise ExperimentError(f"experiment {text!r}: {function!r} after the ':' is not a function name")
    if location.endswith(".py") or "/" in location or os.sep in location:
        return ExperimentRef(function, file=os.path.abspath(os.path.expanduser(location)))
    if not _MODULE.fullmatch(location):
        raise ExperimentError(f"experiment {text!r}: {location!r} is neither a .py file nor a module path (a.b.c)")
    return ExperimentRef(function, module=location)


def load(text: str | ExperimentRef) -> Any:
    """A fresh config of the referenced experiment (a `Trainer.Config`)."""
    ref = text if isinstance(text, ExperimentRef) else parse(text)
    if ref.is_builtin:
        from axmini import experiments

        return _checked(ref, experiments.get(ref.name))
    module = _import_file(ref) if ref.file else _import_module(ref)
    where = ref.file or f"module {ref.module}"
    fn = getattr(module, ref.name, None)
    if not callable(fn):
        functions = sorted(n for n, v in vars(module).items() if inspect.isfunction(v) and not n.startswith("_"))
        close = difflib.get_close_matches(ref.name, functions, n=2, cutoff=0.5)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        what = "no function" if fn is None else "no function (it is not callable):"
        listed = ", ".join(functions) or "none"
        raise ExperimentError(f"experiment {str(ref)!r}: {where} has {what} {ref.name!r}{hint} (functions: {listed})")
    required = [
        p.name
        for p in inspect.signature(fn).parameters.values()
        if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    if required:
        raise ExperimentError(
            f"experiment {str(ref)!r}: {ref.name}() needs arguments ({', '.join(required)}); an experiment function "
            "takes none (wrap it: def my_experiment(): return ...)"
        )
    return _checked(ref, fn())


def _checked(ref: ExperimentRef, cfg: Any) -> Any:
    from axmini.trainer.trainer import Trainer

    if not Trainer.matches(cfg):
        klass = getattr(cfg, "klass", None)
        got = f"a {type(cfg).__qualname__} building {klass.__qualname__}" if klass else f"{type(cfg).__name__} {cfg!r}"
        raise ExperimentError(
            f"experiment {str(ref)!r}: {ref.name}() returned {got[:80]}, not a trainer config; return a "
            "Trainer.Config (e.g. Trainer.default_config().set(...), or a built-in one from axmini.experiments.lm)"
        )
    return cfg


def _import_file(ref: ExperimentRef) -> ModuleType:
    """The file as the module named after it (its directory goes first on sys.path, as a script's does)."""
    assert ref.file is not None
    path = Path(ref.file)
    if not path.is_file():
        raise ExperimentError(f"experiment {str(ref)!r}: no such file {ref.file}")
    name = path.stem
    loaded = sys.modules.get(name)
    if loaded is not None:
        if getattr(loaded, "__file__", None) and Path(loaded.__file__).resolve() == path.resolve():
            return loaded
        raise ExperimentError(
            f"experiment {str(ref)!r}: the file's module name {name!r} is already taken by "
            f"{getattr(loaded, '__file__', None) or 'a built-in module'}; rename {path.name}"
        )
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # Before running it: dataclasses and pickling look the module up by name.
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _import_module(ref: ExperimentRef) -> ModuleType:
    assert ref.module is not None
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        return importlib.import_module(ref.module)
    except ModuleNotFoundError as e:
        if e.name is None or not (ref.module == e.name or ref.module.startswith(e.name + ".")):
            raise  # A module that the user's module imports is missing: their bug, with its traceback.
        raise ExperimentError(
            f"experiment {str(ref)!r}: no module named {e.name!r} (not installed, not on PYTHONPATH and not under "
            f"the current directory {os.getcwd()}); or give its file: path/to/{ref.module.split('.')[-1]}.py:{ref.name}"
        ) from None
