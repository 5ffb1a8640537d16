"""`axmini train --config=EXPERIMENT [--data=GLOB ...] [--set path=value ...] [--trainer_dir=DIR]
[--mesh_selector=TYPE]`: trains an experiment (built in, or FILE.py:FUNCTION, or MODULE:FUNCTION), resuming from the
latest checkpoint in the trainer dir."""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from axmini.cli.common import (
    EXPERIMENT_HELP,
    RUN_FILE,
    Runner,
    UsageError,
    add_config_args,
    check_writable_dir,
    finalized_config,
)
from axmini.cli.sample import sample_texts


def add_parser(commands: Any) -> None:
    parser = commands.add_parser("train", help="train an experiment", description="Train an experiment.")
    parser.add_argument("--config", "--experiment", required=True, help=EXPERIMENT_HELP)
    add_config_args(parser)
    parser.add_argument("--sample_prompt", default="The", help="print a sample for this prompt at the end ('': none)")
    parser.set_defaults(prepare=prepare)


def prepare(args: argparse.Namespace) -> Runner:
    from axmini.launch.distributed import initialize_from_env

    initialize_from_env()  # Before anything touches jax devices.
    import jax

    cfg, record, trainer_dir = finalized_config(args.config, args)
    check_writable_dir(trainer_dir)
    previous = Path(trainer_dir) / RUN_FILE
    if previous.exists() and json.loads(previous.read_text()).get("config") != record["config"]:
        other = json.loads(previous.read_text()).get("config")
        raise UsageError(f"--trainer_dir={trainer_dir} holds a run of experiment {other!r}; use another dir")
    trainer = cfg.instantiate()  # Validates everything; writes nothing in the trainer dir.
    # The last check, and the first write: data from disk without a vocabulary has one trained (or reused).
    vocabulary = trainer.input.vocabulary()

    def run() -> int:
        if jax.process_index() == 0:
            Path(trainer_dir).mkdir(parents=True, exist_ok=True)
            (Path(trainer_dir) / RUN_FILE).write_text(json.dumps(record, indent=2) + "\n")
            print(
                f"axmini train: experiment {record['config']!r} -> {trainer_dir}; {trainer.num_params:,} parameters; "
                f"instance {trainer.instance.name}, mesh {dict(trainer.mesh.shape)}",
                flush=True,
            )
        result = trainer.run()
        if jax.process_index() == 0:
            _print_result(result)
        if result.preempted:
            print(f"axmini train: stopped by SIGTERM at step {result.step}; checkpoint saved", file=sys.stderr)
            return 128 + signal.SIGTERM
        if args.sample_prompt and vocabulary is not None:  # Every process runs the sharded model.
            try:
                with _sigterm_raises():
                    (text,) = sample_texts(
                        trainer.model(result.state), vocabulary, [args.sample_prompt], temperature=0.7, seed=0
                    )[0]
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
