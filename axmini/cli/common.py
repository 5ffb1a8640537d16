"""What the `axmini` commands share: the usage error, the experiment config of a run and its directory."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

USAGE_ERROR = 2  # The exit code of a bad invocation (as argparse's).
RUN_FILE = "run.json"  # In the trainer dir: the experiment name and overrides, so `sample` can rebuild the config.
ADAPTER_DIR = "adapter"  # In the trainer dir of a LoRA run: its adapter, for `axmini sample --adapter`.
QUANTIZED_FILE = "quantized.npz"  # In the trainer dir of a QAT run: what `axmini sample --quantized` loads.

Runner = Callable[[], int]  # What a command does once its arguments are checked; returns the exit code.


class UsageError(Exception):
    """A bad invocation: printed in one line, exit code 2."""


def add_feature_flag(parser: Any) -> None:
    parser.add_argument(
        "--feature",
        action="append",
        default=[],
        metavar="NAME",
        help="apply a named feature (axmini/features.py: qat, lora, rope...) before the --set overrides",
    )


def experiment_config(
    name: str, overrides: Sequence[str], trainer_dir: str | None = None, features: Sequence[str] = ()
) -> Any:
    """The named experiment with `features` (names in axmini.features.FEATURES) and then the `--set` overrides
    applied (and `dir` set when given)."""
    import experiments
    from axmini.config import apply_overrides
    from axmini.features import FEATURES

    cfg = experiments.get(name)
    for feature in features:
        if feature not in FEATURES:
            raise UsageError(f"--feature {feature}: unknown feature; known: {', '.join(FEATURES)}")
        cfg = FEATURES[feature].apply(cfg)
    cfg = apply_overrides(cfg, list(overrides))
    if trainer_dir is not None:
        cfg.set(dir=trainer_dir)
    return cfg


def check_writable_dir(path: str) -> None:
    """Refuses a trainer dir that cannot be created or written, without creating anything."""
    target = Path(path).absolute()
    if target.exists() and not target.is_dir():
        raise UsageError(f"--trainer_dir={path} exists and is not a directory")
    existing = target
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--trainer_dir={path} is not writable ({existing} does not allow writing); pick another dir")


def read_run_file(trainer_dir: str) -> dict[str, Any]:
    """The experiment name and overrides a trainer dir was trained with."""
    path = Path(trainer_dir) / RUN_FILE
    if not path.exists():
        raise UsageError(f"--trainer_dir={trainer_dir} holds no run ({RUN_FILE} is missing); train there first")
    return json.loads(path.read_text())
