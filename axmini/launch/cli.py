"""The `axmini` command: train, sample, configs, report, launch.

    axmini train --config=NAME [--set path=value ...] [--trainer_dir=DIR] [--mesh_selector=TYPE]
    axmini sample --trainer_dir=DIR --prompt "..."
    axmini configs list | show NAME [--set ...] | diff A B
    axmini report modularity|history  (the modularity reports: axmini.tools.cli)
    axmini launch local|tpu|gpu ...   (multi-process and cluster runs: axmini.launch.launcher)

A bad invocation (unknown experiment, unknown --set path, a value of the wrong type, an unwritable trainer
dir, an inconsistent config) is reported in one line on stderr with exit code 2, before anything is
written. Heavy modules (jax, seqio) are imported inside the subcommands, so `--help` is instant.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

USAGE_ERROR = 2
RUN_FILE = "run.json"  # In the trainer dir: the experiment name and overrides, so `sample` can rebuild the config.


Runner = Callable[[], int]  # What a subcommand does once its arguments are checked; returns the exit code.


class UsageError(Exception):
    """A bad invocation: printed in one line, exit code 2."""


def _usage_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean 'bad input' while a command is being set up (not while it runs)."""
    from axmini.config import ConfigError
    from experiments import UnknownExperimentError

    return (UsageError, ConfigError, UnknownExperimentError, ValueError)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


# ----------------------------------------------------------------------------------------------------
# Building the trainer config of a run.


def experiment_config(name: str, overrides: Sequence[str], trainer_dir: str | None = None) -> Any:
    """The named experiment with `--set` overrides applied (and `dir` set when given)."""
    import experiments
    from axmini.config import apply_overrides

    cfg = apply_overrides(experiments.get(name), list(overrides))
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


def _read_run_file(trainer_dir: str) -> dict[str, Any]:
    path = Path(trainer_dir) / RUN_FILE
    if not path.exists():
        raise UsageError(f"--trainer_dir={trainer_dir} holds no run ({RUN_FILE} is missing); train there first")
    return json.loads(path.read_text())


# ----------------------------------------------------------------------------------------------------
# Subcommands.


def prepare_train(args: argparse.Namespace) -> Runner:
    from axmini.launch.distributed import initialize_from_env

    initialize_from_env()  # Before anything touches jax devices.
    import jax

    trainer_dir = args.trainer_dir or str(Path("runs") / args.config)
    check_writable_dir(trainer_dir)
    previous = Path(trainer_dir) / RUN_FILE
    if previous.exists() and json.loads(previous.read_text()).get("config") != args.config:
        other = json.loads(previous.read_text()).get("config")
        raise UsageError(f"--trainer_dir={trainer_dir} holds a run of experiment {other!r}; use another dir")
    cfg = experiment_config(args.config, args.set, trainer_dir)
    if args.mesh_selector:
        cfg.set(mesh_selector=args.mesh_selector)
    trainer = cfg.instantiate()  # Validates everything; writes nothing in the trainer dir.

    def run() -> int:
        if jax.process_index() == 0:
            Path(trainer_dir).mkdir(parents=True, exist_ok=True)
            record = {"config": args.config, "overrides": list(args.set)}
            (Path(trainer_dir) / RUN_FILE).write_text(json.dumps(record, indent=2) + "\n")
            print(
                f"axmini train: experiment {args.config!r} -> {trainer_dir}; {trainer.num_params:,} parameters; "
                f"instance {trainer.instance.name}, mesh {dict(trainer.mesh.shape)}",
                flush=True,
            )
        result = trainer.run()
        if jax.process_index() == 0:
            _print_result(result)
        if result.preempted:
            print(f"axmini train: stopped by SIGTERM at step {result.step}; checkpoint saved", file=sys.stderr)
            return 128 + signal.SIGTERM
        if args.sample_prompt and trainer.input.vocabulary() is not None:  # Every process runs the sharded model.
            try:
                with _sigterm_raises():
                    text = _sample(
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


def _sample(trainer: Any, state: Any, prompt: str, *, max_new_tokens: int, temperature: float, seed: int) -> str:
    """`prompt` continued by the model of `state`, decoded with the input's vocabulary. Every sequence starts with
    id 0, as in training (seqio shifts the targets right behind a 0). Every process must call it (the model is
    sharded over all of them)."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import multihost_utils

    from axmini.layers.decoding import generate

    vocabulary = trainer.input.vocabulary()
    prompt_ids = [int(i) for i in vocabulary.encode(prompt)]
    out = generate(
        trainer.model(state),
        jnp.asarray([[0, *prompt_ids]], jnp.int32),
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=40 if temperature > 0 else None,
        stop_ids=(vocabulary.eos_id,),
        rng=jax.random.key(seed),
    )
    tokens, lengths = multihost_utils.process_allgather((out.tokens, out.lengths), tiled=True)
    new_ids = [int(t) for t in tokens[0, : int(lengths[0])] if t != vocabulary.eos_id]
    return vocabulary.decode(prompt_ids + new_ids)


def prepare_sample(args: argparse.Namespace) -> Runner:
    from axmini.launch.distributed import initialize_from_env

    initialize_from_env()
    if args.max_new_tokens < 1 or args.temperature < 0 or args.num_samples < 1:
        raise UsageError(
            f"--max_new_tokens={args.max_new_tokens} and --num_samples={args.num_samples} must be >= 1, "
            f"--temperature={args.temperature} >= 0"
        )
    run_record = _read_run_file(args.trainer_dir)
    cfg = experiment_config(run_record["config"], run_record["overrides"], args.trainer_dir)
    cfg.set(progress_bar=False)
    trainer = cfg.instantiate()
    if trainer.input.vocabulary() is None:
        raise UsageError(f"experiment {run_record['config']!r} has synthetic input: no vocabulary to decode with")
    if not Path(trainer.config.checkpointer.dir).is_dir():
        raise UsageError(f"--trainer_dir={args.trainer_dir} has no checkpoint yet")
    checkpointer = trainer.config.checkpointer.instantiate(read_only=True)  # A trainer may be writing beside us.
    if not checkpointer.all_steps():
        raise UsageError(f"--trainer_dir={args.trainer_dir} has no checkpoint yet")

    def run() -> int:
        import jax

        state = trainer.restore_or_init(checkpointer)
        for i in range(args.num_samples):
            text = _sample(
                trainer,
                state,
                args.prompt,
                max_new_tokens=args.max_new_tokens,
                temperature=args.temperature,
                seed=args.seed + i,
            )
            if jax.process_index() == 0:
                print(text)
        return 0

    return run


def _debug_lines(cfg: Any) -> dict[str, str]:
    """{path: printed value} from the config's debug string."""
    return dict(line.split(": ", 1) for line in cfg.debug_string().splitlines())


def prepare_configs(args: argparse.Namespace) -> Runner:
    import experiments

    if args.action == "list":
        text = "\n".join(experiments.names())
    elif args.action == "show":
        if len(args.names) != 1:
            raise UsageError(f"configs show takes one experiment name, got {len(args.names)}")
        text = experiment_config(args.names[0], args.set).debug_string()
    else:
        if len(args.names) != 2:
            raise UsageError(f"configs diff takes two experiment names, got {len(args.names)}")
        a, b = (_debug_lines(experiment_config(name, args.set)) for name in args.names)
        lines = []
        for path in [*a, *(p for p in b if p not in a)]:
            old, new = a.get(path), b.get(path)
            if old != new:
                lines += [f"- {path}: {old}"] if old is not None else []
                lines += [f"+ {path}: {new}"] if new is not None else []
        text = "\n".join(lines) if lines else f"{args.names[0]} and {args.names[1]} are identical"

    def run() -> int:
        print(text)
        return 0

    return run


# ----------------------------------------------------------------------------------------------------
# Argument parsing.


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors in one line (exit code 2) like every other error of the command."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="axmini", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    train = sub.add_parser("train", help="train a named experiment", description="Train a named experiment.")
    train.add_argument("--config", "--experiment", required=True, help="experiment name (see `axmini configs list`)")
    train.add_argument("--set", action="append", default=[], metavar="PATH=VALUE", help="override a config field")
    train.add_argument("--trainer_dir", help="run directory (default: runs/<config>); resumes from its checkpoints")
    train.add_argument("--mesh_selector", help="instance type (cpu, gpu-h100-8, tpu-v5p-256...); default: detected")
    train.add_argument("--sample_prompt", default="The", help="print a sample for this prompt at the end ('': none)")
    train.set_defaults(prepare=prepare_train)

    sample = sub.add_parser("sample", help="generate text from a run's latest checkpoint")
    sample.add_argument("--trainer_dir", required=True)
    sample.add_argument("--prompt", required=True)
    sample.add_argument("--max_new_tokens", type=int, default=64)
    sample.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    sample.add_argument("--num_samples", type=int, default=1)
    sample.add_argument("--seed", type=int, default=0)
    sample.set_defaults(prepare=prepare_sample)

    configs = sub.add_parser("configs", help="list, show or diff experiment configs")
    configs.add_argument("action", choices=("list", "show", "diff"))
    configs.add_argument("names", nargs="*", metavar="NAME")
    configs.add_argument("--set", action="append", default=[], metavar="PATH=VALUE", help="override (show, diff)")
    configs.set_defaults(prepare=prepare_configs)

    sub.add_parser("report", help="reports: `axmini report modularity|history --help`", add_help=False)
    sub.add_parser("launch", help="multi-process and cluster runs: `axmini launch --help`", add_help=False)
    return parser


def _delegate(entry_point: Callable[[list[str]], int], argv: list[str]) -> int:
    """Runs another tool's entry point; an argparse exit inside it (--help, a usage error) becomes its code."""
    try:
        return entry_point(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else USAGE_ERROR if e.code else 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["launch"]:
        from axmini.launch.launcher import main as launch_main

        return _delegate(launch_main, argv[1:])
    if argv[:1] == ["report"]:
        from axmini.tools.cli import main as report_main

        return _delegate(report_main, argv[1:])
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # argparse printed the help or a usage error (code 2).
        return int(e.code or 0)
    try:
        run = args.prepare(args)  # Every check of the invocation; nothing is written yet.
    except _usage_errors() as e:
        print(f"axmini {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return USAGE_ERROR
    return run()


if __name__ == "__main__":
    sys.exit(main())
