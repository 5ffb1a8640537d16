"""`axmini train --config=NAME [--set path=value ...] [--trainer_dir=DIR] [--mesh_selector=TYPE]`: trains a named
experiment, resuming from the latest checkpoint in the trainer dir.

A trainer dir whose checkpoints were written by another model or config, or none of whose checkpoints restores, is
refused in one line (exit code 2) before anything is written; `--from_scratch` starts over, moving them aside. A run
stopped by a non-finite loss exits with code 1."""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from axmini.cli.common import RUN_FILE, Runner, UsageError, check_utf8, check_writable_dir, experiment_config
from axmini.cli.sample import sample_text


def add_parser(commands: Any) -> None:
    parser = commands.add_parser("train", help="train a named experiment", description="Train a named experiment.")
    parser.add_argument("--config", "--experiment", required=True, help="experiment name (see `axmini configs list`)")
    parser.add_argument("--set", action="append", default=[], metavar="PATH=VALUE", help="override a config field")
    parser.add_argument("--trainer_dir", help="run directory (default: runs/<config>); resumes from its checkpoints")
    parser.add_argument("--mesh_selector", help="instance type (cpu, gpu-h100-8, tpu-v5p-256...); default: detected")
    parser.add_argument("--sample_prompt", default="The", help="print a sample for this prompt at the end ('': none)")
    parser.add_argument(
        "--from_scratch", action="store_true", help="start at step 0, moving the trainer dir's checkpoints aside"
    )
    parser.add_argument("--verbose", action="store_true", help="show the libraries' own start-up output")
    parser.set_defaults(prepare=prepare)


def prepare(args: argparse.Namespace) -> Runner:
    from axmini.launch.distributed import initialize_from_env

    initialize_from_env()  # Before anything touches jax devices.
    import jax

    trainer_dir = args.trainer_dir or str(Path("runs") / args.config)
    check_utf8(args.sample_prompt, "--sample_prompt")
    check_writable_dir(trainer_dir)
    previous = Path(trainer_dir) / RUN_FILE
    if previous.exists() and json.loads(previous.read_text()).get("config") != args.config:
        other = json.loads(previous.read_text()).get("config")
        raise UsageError(f"--trainer_dir={trainer_dir} holds a run of experiment {other!r}; use another dir")
    cfg = experiment_config(args.config, args.set, trainer_dir)
    if args.mesh_selector:
        cfg.set(mesh_selector=args.mesh_selector)
    trainer = cfg.instantiate()  # Validates everything; writes nothing in the trainer dir.
    for field in ("checkpointer", "summary_writer"):
        check_writable_dir(getattr(trainer.config, field).dir, f"{field}.dir")

    def run() -> int:
        state = trainer.restore_or_init(from_scratch=args.from_scratch)  # Before anything is written: may refuse.
        if jax.process_index() == 0:
            Path(trainer_dir).mkdir(parents=True, exist_ok=True)
            record = {"config": args.config, "overrides": list(args.set)}
            (Path(trainer_dir) / RUN_FILE).write_text(json.dumps(record, indent=2) + "\n")
            print(
                f"axmini train: experiment {args.config!r} -> {trainer_dir}; {trainer.num_params:,} parameters; "
                f"instance {trainer.instance.name}, mesh {dict(trainer.mesh.shape)}",
                flush=True,
            )
        result = trainer.run(state)
        if jax.process_index() == 0:
            _print_result(result)
        if result.non_finite_step is not None:  # The trainer has said so, in one line.
            return 1
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
