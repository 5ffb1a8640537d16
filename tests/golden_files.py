"""Golden files: the `debug_string()` of named configs and the parameter shapes of the models they build.

A golden test compares today's text with the file checked in; a deliberate change is recorded by
re-running with `pytest --update-golden` (or `UPDATE_GOLDEN=1`) and reviewing the diff. Test harness only (the
switch is in conftest.py): nothing in the library or the command uses it.
"""

from __future__ import annotations

import difflib
from pathlib import Path

import flax.nnx as nnx

from axmini.module import param_infos


class GoldenMismatchError(AssertionError):
    """The text differs from its golden file."""


def param_shapes_text(model: nnx.Module) -> str:
    """One line per parameter: path, shape, dtype, logical axes (works on abstract models)."""
    return "\n".join(f"{i.path}: {i.shape} {i.dtype} {i.axes}" for i in param_infos(model))


def check_golden(path: Path, text: str, *, update: bool) -> None:
    """Compares `text` with the file at `path`; with `update`, rewrites the file instead."""
    text = text.rstrip("\n") + "\n"
    if update:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return
    if not path.exists():
        raise GoldenMismatchError(f"golden file {path} does not exist; create it with `pytest --update-golden`")
    expected = path.read_text()
    if expected != text:
        diff = "".join(difflib.unified_diff(expected.splitlines(True), text.splitlines(True), str(path), "current"))
        raise GoldenMismatchError(f"{path} differs (re-run with --update-golden if intended):\n{diff}")
