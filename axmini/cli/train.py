"""`axmini train --config=NAME [--set path=value ...] [--trainer_dir=DIR] [--mesh_selector=TYPE] [--init_from=SRC]`:
trains a named experiment, resuming from the latest checkpoint in the trainer dir.

`--init_from=hf:DIR` (a Hugging Face model dir) or `--init_from=TRAINER_DIR` starts a new run from those weights
(the step-0 checkpoint holds them with a fresh optimizer state). A source that carries its own model (an HF dir, or a
trainer dir made from one) replaces the experiment's model, and its tokenizer the corpus's (axmini.interop.runs).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from axmini.cli.common import RUN_FILE, Runner, UsageError, check_writable_dir, experiment_config
from axmini.cli.sample import sample_text


def add_parser(commands: Any) -> None:
    parser = commands.add_parser("train", help="train a named experiment", description="Train a named experiment.")
    parser.add_argument("--config", "--experiment", required=True, help="experiment name (see `axmini configs list`)")
    parser.add_argument("--set", action="append", default=[], metavar="PATH=VALUE", help="override a config field")
    parser.add_argument("--trainer_dir", help="run directory (default: runs/<config>); resumes from its checkpoints")
    parser.add_argument("--mesh_selector", help="instance type (cpu, gpu-h100-8, tpu-v5p-256...); default: detected")
    parser.add_argument("--sample_prompt", default="The", help="print a sample for this prompt at the end ('': none)")
    parser.add_argument(
        "--init_from", help="start a new run from these weights: hf:DIR (a Hugging Face model dir) or a trainer dir"
    )
    parser.set_defaults(prepare=prepare)


def prepare(args: argparse.Namespace) -> Runner:
    from axmini.launch.distributed import initialize_from_env

    initialize_from_env()  # Before anything touches jax devices.
    import jax

    trainer_dir = args.trainer_dir or str(Path("runs") / args.config)
    check_writable_dir(trainer_dir)
    previous = Path(trainer_dir) / RUN_FILE
    record = json.loads(previous.read_text()) if previous.exists() else {}
    if record and record.get("config") != args.config:
        raise UsageError(
            f"--trainer_dir={trainer_dir} holds a run of experiment {record.get('config')!r}; use another dir"
        )
    if record.get("params_only"):
        raise UsageError(
            f"--trainer_dir={trainer_dir} holds converted weights without optimizer state; fine-tune them in a new dir "
            f"with --init_from={trainer_dir} --trainer_dir=NEW_DIR"
        )
    source, model_dir = _init_source(args, trainer_dir, record)
    cfg = experiment_config(args.config, args.set, trainer_dir, model_dir)
    if args.mesh_selector:
        cfg.set(mesh_selector=args.mesh_selector)
    trainer = cfg.instantiate()  # Validates everything; writes nothing in the trainer dir.

    def run() -> int:
        if jax.process_index() == 0:
            Path(trainer_dir).mkdir(parents=True, exist_ok=True)
            new_record = {"config": args.config, "overrides": list(args.set)}
            if source is not None:
                from axmini.interop.runs import MODEL_DIR, copy_model_dir

                copy_model_dir(source, trainer_dir, cfg.model.param_dtype)
                new_record.update(init_from=source.text, **({"model_dir": MODEL_DIR} if source.model_dir else {}))
            (Path(trainer_dir) / RUN_FILE).write_text(json.dumps({**record, **new_record}, indent=2) + "\n")
            print(
                f"axmini train: experiment {args.config!r} -> {trainer_dir}; {trainer.num_params:,} parameters; "
                f"instance {trainer.instance.name}, mesh {dict(trainer.mesh.shape)}",
                flush=True,
            )
        if source is not None:
            _save_initial_state(trainer, source)
        result = trainer.run()
        if jax.process_index() == 0:
            _print_result(result)
        if result.preempted:
            print(f"axmini train: stopped by SIGTERM at step {result.step}; checkpoint saved", file=sys.stderr)
            return 128 + signal.SIGTERM
        if args.sample_prompt and trainer.input.vocabulary() is not None:  # Every process runs the sharded model.
            try:
                with _sigterm_raises():
                    text = sample_text(
                        trainer, result.state, args.sample_prompt, max_new_tokens=64, temperature=0.7, seed=0
                    )
            except _Terminated:
                print("axmini train: training finished; sample skipped (SIGTERM)", file=sys.stderr)
                return 0
            if jax.process_index() == 0:
                print(f"sample (temperature 0.7, top-k 40, seed 0): {text}")
        return 0

    return run


def _init_source(args: argparse.Namespace, trainer_dir: str, record: dict[str, Any]) -> tuple[Any, Path | None]:
    """(the --init_from source, or None when there is none or the run already has checkpoints to resume from; the
    dir of the model the run trains when it is an imported one)."""
    has_checkpoint = any((Path(trainer_dir) / "checkpoints").glob("[0-9]*"))
    model_dir = Path(trainer_dir) / record["model_dir"] if record.get("model_dir") else None
    if not args.init_from:
        return None, model_dir
    if has_checkpoint:
        print(f"axmini train: {trainer_dir} has checkpoints: resuming, --init_from ignored", file=sys.stderr)
        return None, model_dir
    from axmini.interop.runs import parse_init_from

    source = parse_init_from(args.init_from)
    return source, source.model_dir


def _save_initial_state(trainer: Any, source: Any) -> None:
    """Saves the step-0 checkpoint of a run that starts from `source`'s weights (the run then resumes from it)."""
    from axmini.interop.runs import initial_params, initial_state

    checkpointer = trainer.config.checkpointer.instantiate()
    checkpointer.save(
        0, initial_state(trainer, initial_params(trainer, source)), {"init_from": source.text}, force=True
    )
    checkpointer.close()


class _Terminated(Exception):
    """SIGTERM arrived while `_sigterm_raises` was active."""


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Within this block SIGTERM raises `_Terminated` (e.g. to skip the sample of a finished run and exit 0)."""

    def terminate(signum: int, frame: Any) -> None:
        raise _Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _print_result(result: Any) -> None:
    print(f"trained to step {result.step}; last train loss {result.losses.get(result.step, float('nan')):.4f}")
    if result.eval_metrics:
        loss, entropy = result.eval_metrics["loss"], result.eval_metrics["unigram_entropy"]
        verdict = "below" if loss < entropy else "NOT below"
        print(
            f"validation loss {loss:.4f} nats/token ({verdict} the unigram entropy of the validation tokens, "
            f"{entropy:.4f} nats; {result.eval_metrics['num_tokens']:.0f} tokens)"
        )
