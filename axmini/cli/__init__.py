"""The `axmini` command: train, sample, configs, convert, export (one module each here), report, launch.

    axmini train --config=NAME [--set path=value ...] [--trainer_dir=DIR] [--mesh_selector=TYPE]
    axmini sample --trainer_dir=DIR --prompt "..."
    axmini configs list | show NAME [--set ...] | diff A B
    axmini convert hf DIR --out TRAINER_DIR [--config NAME]     (a Hugging Face model as a trainer dir)
    axmini export hf TRAINER_DIR --out DIR                      (a run's model as a Hugging Face dir)
    axmini report modularity|history  (the modularity reports: axmini.tools.cli)
    axmini launch local|tpu|gpu ...   (multi-process and cluster runs: axmini.launch.launcher)

A command first checks its whole invocation (`prepare`), then runs. Bad input found while preparing (an unknown
experiment, an unknown --set path, a value of the wrong type or one a layer refuses, an unwritable trainer dir) is
reported in one line on stderr with exit code 2, before anything is written. Any other exception is a bug: it
propagates with its traceback (exit code 1). Heavy modules (jax, seqio) are imported inside the commands, so
`--help` is instant.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from axmini.cli import configs, convert, export, sample, train
from axmini.cli.common import USAGE_ERROR, UsageError

COMMANDS = (train, sample, configs, convert, export)


def _setup_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean 'bad input' while a command is being prepared."""
    from axmini.config import ConfigError
    from axmini.interop.errors import ConversionError
    from experiments import UnknownExperimentError

    return (UsageError, ConfigError, UnknownExperimentError, ConversionError)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors in one line (exit code 2) like every other error of the command."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="axmini", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for command in COMMANDS:
        command.add_parser(commands)
    commands.add_parser("report", help="reports: `axmini report modularity|history --help`", add_help=False)
    commands.add_parser("launch", help="multi-process and cluster runs: `axmini launch --help`", add_help=False)
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
    except _setup_errors() as e:
        print(f"axmini {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return USAGE_ERROR
    return run()
