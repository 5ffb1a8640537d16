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
    name: str,
    overrides: Sequence[str],
    trainer_dir: str | None = None,
    features: Sequence[str] = (),
    model_dir: str | Path | None = None,
) -> Any:
    """The named experiment with `features` (names in axmini.features.FEATURES) and then the `--set` overrides
    applied (and `dir` set when given). With `model_dir` (an imported model's Hugging Face config.json and tokenizer)
    the model, and the tokenizer of the corpus, are that model's; the features then apply to it."""
    import experiments
    from axmini.config import apply_overrides
    from axmini.features import FEATURES

    cfg = experiments.get(name)
    if model_dir is not None:
        from axmini.interop.runs import imported_trainer_config

        cfg = imported_trainer_config(cfg, model_dir)
    for feature in features:
        if feature not in FEATURES:
            raise UsageError(f"--feature {feature}: unknown feature; known: {', '.join(FEATURES)}")
        cfg = FEATURES[feature].apply(cfg)
    cfg = apply_overrides(cfg, list(overrides))
    if trainer_dir is not None:
        cfg.set(dir=trainer_dir)
    return cfg


def run_config(trainer_dir: str, record: dict[str, Any]) -> Any:
    """The config of the run in `trainer_dir`, from its run record (with its own model when it holds an imported
    one: the record's `model_dir`; with the record's features)."""
    model_dir = Path(trainer_dir) / record["model_dir"] if record.get("model_dir") else None
    return experiment_config(record["config"], record["overrides"], trainer_dir, record.get("features", []), model_dir)


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
