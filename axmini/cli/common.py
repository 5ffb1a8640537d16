"""What the `axmini` commands share: the usage error, the flags that make a run's config, and a run's record.

A run's config is made the same way by every command, so what `configs show` prints is what `train` trains:
the experiment (a built-in name, `FILE.py:FUNCTION` or `MODULE:FUNCTION`), then the data flags (`--data`...), then an
imported model (`--init_from` a Hugging Face model or a run of one), then the `--feature`s, then the `--set`
overrides, then the trainer dir; `finalize` then fits it to the hardware. `train` records all of it in the trainer
dir (run.json), paths made absolute, so `sample`, `eval` and `export` rebuild the same config from any directory.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

USAGE_ERROR = 2  # The exit code of a bad invocation (as argparse's).
RUN_FILE = "run.json"  # In the trainer dir: the experiment, data, features and overrides, to rebuild the config.
ADAPTER_DIR = "adapter"  # In the trainer dir of a LoRA run: its adapter, for `axmini sample --adapter`.
QUANTIZED_FILE = "quantized.npz"  # In the trainer dir of a QAT run: what `axmini sample --quantized` loads.
EXPERIMENT_HELP = "a built-in experiment (axmini configs list), FILE.py:FUNCTION or MODULE:FUNCTION"

Runner = Callable[[], int]  # What a command does once its arguments are checked; returns the exit code.


class UsageError(Exception):
    """A bad invocation: printed in one line, exit code 2."""


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """The flags that shape a run's config besides the experiment: --feature, --set, --trainer_dir,
    --mesh_selector, data."""
    parser.add_argument(
        "--feature",
        action="append",
        default=[],
        metavar="NAME",
        help="apply a named feature (axmini/features.py: qat, lora, rope...) before the --set overrides",
    )
    parser.add_argument("--set", action="append", default=[], metavar="PATH=VALUE", help="override a config field")
    parser.add_argument("--trainer_dir", help="run directory (default: runs/<experiment>)")
    parser.add_argument(
        "--mesh_selector", help="instance type (cpu, gpu-h100-8, tpu-v5p-256...) to finalize for (train: detected)"
    )
    group = parser.add_argument_group("data from disk (instead of the experiment's seqio task)")
    group.add_argument("--data", metavar="GLOB", help="training text: .txt lines, .jsonl records or .tfrecord files")
    group.add_argument("--validation_data", metavar="GLOB", help="validation files (default: a held-out fraction)")
    group.add_argument("--validation_fraction", type=float, help="of the training examples held out (default 0.01)")
    group.add_argument("--data_field", help="the text field of .jsonl records / .tfrecord examples (default: text)")
    group.add_argument("--vocab", metavar="FILE", help="a SentencePiece model (default: one trained on the data)")


def absolute_path(path: str) -> str:
    """A local path made absolute (`~` expanded); a URL (gs://...) as it is."""
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def data_record(args: argparse.Namespace) -> dict[str, Any] | None:
    """The `TextFiles` fields the data flags give (paths absolute), or None without --data."""
    flags = {"validation": "validation_data", "validation_fraction": "validation_fraction"}
    flags.update(field="data_field", vocab="vocab")
    given = {field: getattr(args, flag) for field, flag in flags.items() if getattr(args, flag, None) is not None}
    if getattr(args, "data", None) is None:
        if given:
            raise UsageError(f"--{flags[next(iter(given))]} needs --data (the training files)")
        return None
    if "validation" in given and "validation_fraction" in given:
        raise UsageError("--validation_data and --validation_fraction exclude each other: give one")
    record = {"train": absolute_path(args.data), **given}
    for field in ("validation", "vocab"):
        if field in record:
            record[field] = absolute_path(record[field])
    return record


def with_data(cfg: Any, data: dict[str, Any], model_dir: str | Path | None = None) -> Any:
    """`cfg` reading the files of `data` (TextFiles fields): its input the train split, its evaluation input (if any)
    the validation split (the split it names). For an imported model (`model_dir`), the text is tokenized with the
    model's own SentencePiece tokenizer unless `data` names a vocabulary."""
    from axmini.trainer.data import TextFiles
    from axmini.trainer.input import SeqioInput

    if model_dir is not None and "vocab" not in data:
        from axmini.interop.vocabulary import SENTENCEPIECE_FILE

        tokenizer = Path(model_dir) / SENTENCEPIECE_FILE
        if not tokenizer.is_file():
            raise UsageError(
                f"--data: the imported model in {model_dir} has no {SENTENCEPIECE_FILE} to tokenize the files with; "
                "give its SentencePiece vocabulary with --vocab"
            )
        data = {**data, "vocab": str(tokenizer.absolute())}
    files = TextFiles.default_config().set(**data)
    for target, path in ((cfg.input, "input"), (cfg.evaluator.input, "evaluator.input")):
        if target is None:
            continue
        if not SeqioInput.matches(target):
            raise UsageError(f"--data: {path} is a {type(target).__qualname__}, not a SeqioInput that reads text")
        target.task = files
    return cfg


def run_config(
    record: dict[str, Any], trainer_dir: str | None, overrides: Sequence[str] = (), model_dir: str | Path | None = None
) -> Any:
    """The config of a run record, not finalized yet: the experiment; the record's data; with an imported model
    (`model_dir`, else the record's, in `trainer_dir`: a Hugging Face config.json and tokenizer) that model, its
    tokenizer reading the corpus or the data; the features (names in axmini.features.FEATURES); the record's
    overrides, then `overrides`."""
    from axmini import experiment_loader
    from axmini.config import apply_overrides
    from axmini.features import FEATURES

    if model_dir is None and record.get("model_dir"):
        model_dir = Path(trainer_dir) / record["model_dir"]
    cfg = experiment_loader.load(record["config"])
    if record.get("data"):
        cfg = with_data(cfg, record["data"], model_dir)
    if model_dir is not None:
        from axmini.interop.runs import imported_trainer_config

        cfg = imported_trainer_config(cfg, model_dir)
    for feature in record.get("features", []):
        if feature not in FEATURES:
            raise UsageError(f"--feature {feature}: unknown feature; known: {', '.join(FEATURES)}")
        cfg = FEATURES[feature].apply(cfg)
    cfg = apply_overrides(cfg, [*record.get("overrides", []), *overrides])
    if trainer_dir is not None:
        cfg.set(dir=trainer_dir)
    return cfg


def new_run_record(experiment: str, args: argparse.Namespace) -> dict[str, Any]:
    """What `train` records of its invocation: the experiment (canonical), the data, the features, the overrides."""
    from axmini import experiment_loader

    canonical = str(experiment_loader.parse(experiment))
    return {"config": canonical, "overrides": list(args.set), "features": list(args.feature), "data": data_record(args)}


def default_trainer_dir(experiment: str) -> str:
    """runs/<the experiment's name> (a file's or module's function name)."""
    from axmini import experiment_loader

    return str(Path("runs") / experiment_loader.parse(experiment).name)


def finalized_config(experiment: str, args: argparse.Namespace) -> tuple[Any, dict[str, Any], str]:
    """(the finalized config, the run record, the trainer dir) that `train` runs for these flags."""
    from axmini.trainer.finalize import finalize

    record = new_run_record(experiment, args)
    trainer_dir = args.trainer_dir or default_trainer_dir(experiment)
    return finalize(run_config(record, trainer_dir), args.mesh_selector), record, trainer_dir


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
    """The run record (experiment, data, features, overrides, imported model) a trainer dir was trained with."""
    path = Path(trainer_dir) / RUN_FILE
    if not path.exists():
        raise UsageError(f"--trainer_dir={trainer_dir} holds no run ({RUN_FILE} is missing); train there first")
    return json.loads(path.read_text())


def read_run(trainer_dir: str, overrides: Sequence[str], mesh_selector: str | None) -> Any:
    """The finalized config of the run in `trainer_dir` on this machine, with `overrides` after the run's own."""
    from axmini.trainer.finalize import finalize

    return finalize(run_config(read_run_file(trainer_dir), trainer_dir, overrides), mesh_selector)


def read_only_checkpointer(cfg: Any, trainer_dir: str) -> Any:
    """A read-only checkpointer of the run (a trainer may be writing beside us), refused when it has no checkpoint."""
    if not Path(cfg.checkpointer.dir).is_dir():
        raise UsageError(f"--trainer_dir={trainer_dir} has no checkpoint yet")
    checkpointer = cfg.checkpointer.instantiate(read_only=True)
    if not checkpointer.all_steps():
        raise UsageError(f"--trainer_dir={trainer_dir} has no checkpoint yet")
    return checkpointer
