"""`axmini configs list | show EXPERIMENT | diff A B`: the experiments and their config text.

`show` prints the experiment's config (the golden text of a built-in one); with `--mesh_selector=TYPE` it prints the
config finalized for that instance type, byte for byte the config.txt of `axmini train` with the same flags. An
experiment is a built-in name, FILE.py:FUNCTION or MODULE:FUNCTION.
"""

from __future__ import annotations

import argparse
from typing import Any

from axmini.cli.common import (
    EXPERIMENT_HELP,
    Runner,
    UsageError,
    add_config_args,
    finalized_config,
    new_run_record,
    run_config,
)


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "configs", help="list, show or diff experiment configs", description=__doc__.split("\n\n")[1]
    )
    parser.add_argument("action", choices=("list", "show", "diff"))
    parser.add_argument("names", nargs="*", metavar="EXPERIMENT", help=EXPERIMENT_HELP)
    add_config_args(parser)  # show, diff: with --mesh_selector, the config finalized for that instance type.
    parser.set_defaults(prepare=prepare)


def _config(experiment: str, args: argparse.Namespace) -> Any:
    if args.mesh_selector:
        return finalized_config(experiment, args)[0]
    return run_config(new_run_record(experiment, args), args.trainer_dir)


def prepare(args: argparse.Namespace) -> Runner:
    from axmini import experiments

    wanted = {"list": 0, "show": 1, "diff": 2}[args.action]
    if len(args.names) != wanted:
        what = {0: "no experiment name", 1: "one experiment name", 2: "two experiment names"}[wanted]
        raise UsageError(f"configs {args.action} takes {what}, got {len(args.names)}")
    if args.action == "list":
        text = "\n".join(experiments.names())
    elif args.action == "show":
        text = _config(args.names[0], args).debug_string()
    else:
        a, b = (_debug_lines(_config(name, args)) for name in args.names)
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


def _debug_lines(cfg: Any) -> dict[str, str]:
    """{path: printed value} from the config's debug string."""
    return dict(line.split(": ", 1) for line in cfg.debug_string().splitlines())
