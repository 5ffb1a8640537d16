"""What the `axmini` commands share: the usage error, the experiment config of a run and its directory."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

USAGE_ERROR = 2  # The exit code of a bad invocation (as argparse's).
RUN_FILE = "run.json"  # In the trainer dir: the experiment name and overrides, so `sample` can rebuild the config.

Runner = Callable[[], int]  # What a command does once its arguments are checked; returns the exit code.


class UsageError(Exception):
    """A bad invocation: printed in one line, exit code 2."""


def experiment_config(name: str, overrides: Sequence[str], trainer_dir: str | None = None) -> Any:
    """The named experiment with `--set` overrides applied (and `dir` set when given)."""
    import experiments
    from axmini.config import REQUIRED, apply_overrides

    cfg = apply_overrides(experiments.get(name), list(overrides))
    if trainer_dir is not None:
        if cfg.dir not in (REQUIRED, trainer_dir):
            raise UsageError(f"--set dir={cfg.dir} conflicts with --trainer_dir={trainer_dir}; use --trainer_dir only")
        cfg.set(dir=trainer_dir)
    return cfg


def check_writable_dir(path: str, name: str = "--trainer_dir") -> None:
    """Refuses a local dir (`name`) that cannot be created or written, without creating anything."""
    if "://" in path:  # Cloud storage: checked by its client when written.
        return
    target = Path(path).absolute()
    if target.exists() and not target.is_dir():
        raise UsageError(f"{name}={path} exists and is not a directory")
    existing = target
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{name}={path} is not writable ({existing} does not allow writing); pick another dir")


def check_utf8(text: str, name: str) -> None:
    """Refuses command-line text that is not valid UTF-8 (Python keeps such bytes as lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"{name} is not valid UTF-8 text; pass it in UTF-8") from None


def read_run_file(trainer_dir: str) -> dict[str, Any]:
    """The experiment name and overrides a trainer dir was trained with."""
    path = Path(trainer_dir) / RUN_FILE
    if not path.exists():
        raise UsageError(f"--trainer_dir={trainer_dir} holds no run ({RUN_FILE} is missing); train there first")
    return json.loads(path.read_text())
