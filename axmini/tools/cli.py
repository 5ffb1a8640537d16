"""`axmini report modularity ...` and `axmini report history ...`: options, and one-line errors.

Bad input (an unknown feature, a malformed option or catalogue, a path that is not a git repository or holds none
of the catalogue's commits, a README without its markers) and any failure of git are one line on stderr and exit
status 2, raised before anything is written. Anything else is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from tqdm import tqdm

from axmini.tools import catalogue, history_report, modularity
from axmini.tools.git import GitError, NotAGitRepositoryError, UnknownRevisionError
from axmini.tools.patches import ForwardChecks, UnknownFeatureError

PROG = "axmini report"


class _UsageError(ValueError):
    pass


_BAD_INPUT = (
    _UsageError,
    GitError,
    NotAGitRepositoryError,
    UnknownRevisionError,
    UnknownFeatureError,
    catalogue.CatalogueError,
    modularity.ReadmeError,
)


class _OneLineParser(argparse.ArgumentParser):
    """argparse that reports bad usage as one line and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(message)


def _grid(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)x(\d+)", text.strip())
    if not match or int(match[1]) < 1 or int(match[2]) < 1:
        raise argparse.ArgumentTypeError(f"--grid must be NxM with N, M >= 1 (e.g. 8x8 or 20x10), got {text!r}")
    return int(match[1]), int(match[2])


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"--check-budget must be a number of seconds >= 0 or inf, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="report", required=True, metavar="{modularity,history}")
    mod = sub.add_parser("modularity", help="axmini's features: patch mode, baseline, paper and peers")
    mod.description = modularity.__doc__.split("\n\n")[0]
    mod.add_argument("--out", required=True, type=Path, help="directory for report.md/.html/.json and the PNGs")
    mod.add_argument("--features", help="comma-separated feature names (default: every registered feature)")
    mod.add_argument("--grid", type=_grid, default=(8, 8), help="synthetic models x variants, NxM (default 8x8)")
    mod.add_argument(
        "--forward",
        choices=[c.value for c in ForwardChecks],
        default=ForwardChecks.COVER.value,
        help="targets that run a tiny forward pass: all, cover (every model and variant once; default), none",
    )
    mod.add_argument(
        "--check-budget",
        type=_seconds,
        default=90.0,
        help="wall-time seconds of the sweeps after which no more checks start (default 90; inf: check all)",
    )
    mod.add_argument("--peers", type=Path, help="a history report.json to compare with (default: the committed one)")
    mod.add_argument("--readme", type=Path, help="also rewrite the feature table between this file's markers")
    mod.add_argument("--no-progress", action="store_true", help="no progress bar")
    hist = sub.add_parser("history", help="the changes of a catalogue, measured in local clones")
    hist.description = history_report.__doc__.split("\n\n")[0]
    hist.add_argument("--repo", action="append", required=True, help="a local clone (bare is fine); repeatable")
    hist.add_argument("--catalogue", default=str(catalogue.SHIPPED), help="catalogue TOML (default: the shipped one)")
    hist.add_argument("--out", required=True, type=Path, help="directory for report.md/.html/.json and the PNGs")
    hist.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _modularity(args: argparse.Namespace) -> dict[str, Path]:
    names = [n.strip() for n in args.features.split(",") if n.strip()] if args.features else None
    if args.readme is not None:
        modularity.readme_parts(args.readme)  # Refuse a README without markers before the long run.
    if args.peers is not None and not args.peers.is_file():
        raise _UsageError(f"--peers {args.peers}: no such file (give a history report.json)")
    result = modularity.run_modularity(
        feature_names=names,
        grid=args.grid,
        forward=ForwardChecks(args.forward),
        check_budget=args.check_budget,
        peers=args.peers,
        progress=not args.no_progress,
    )
    paths = modularity.write_modularity_report(result, args.out)
    if args.readme is not None:
        modularity.update_readme(args.readme, modularity.readme_table(result))
        paths["readme"] = args.readme
    return paths


def _history(args: argparse.Namespace) -> dict[str, Path]:
    cat = catalogue.load(args.catalogue)
    clones = history_report.match_clones(cat, args.repo)
    counted = [c for c in cat.changes if c.repository in clones]
    with tqdm(total=len(counted), desc="history", unit="change", disable=args.no_progress, file=sys.stderr) as bar:
        result = history_report.run_history(cat, clones, on_change=lambda c: bar.update(c.repository in clones))
    return history_report.write_history_report(result, args.out)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `axmini report`; returns the exit status (2 on bad input)."""
    try:
        args = _parser().parse_args(argv)
        paths = (_modularity if args.report == "modularity" else _history)(args)
    except _BAD_INPUT as e:
        print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(f"{PROG} {args.report}: wrote {', '.join(str(p) for p in paths.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
