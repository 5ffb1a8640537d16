"""`axmini configs list | show NAME [--set ...] | diff A B`: the named experiments and their config text."""

from __future__ import annotations

import argparse
from typing import Any

from axmini.cli.common import Runner, UsageError, add_feature_flag, experiment_config


def add_parser(commands: Any) -> None:
    parser = commands.add_parser("configs", help="list, show or diff experiment configs")
    parser.add_argument("action", choices=("list", "show", "diff"))
    parser.add_argument("names", nargs="*", metavar="NAME")
    parser.add_argument("--set", action="append", default=[], metavar="PATH=VALUE", help="override (show, diff)")
    add_feature_flag(parser)
    parser.set_defaults(prepare=prepare)


def prepare(args: argparse.Namespace) -> Runner:
    import experiments

    if args.action == "list":
        text = "\n".join(experiments.names())
    elif args.action == "show":
        if len(args.names) != 1:
            raise UsageError(f"configs show takes one experiment name, got {len(args.names)}")
        text = experiment_config(args.names[0], args.set, features=args.feature).debug_string()
    else:
        if len(args.names) != 2:
            raise UsageError(f"configs diff takes two experiment names, got {len(args.names)}")
        a, b = (_debug_lines(experiment_config(name, args.set, features=args.feature)) for name in args.names)
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
