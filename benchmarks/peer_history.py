"""The shipped peer catalogue measured in local clones of the peers: `axmini report history`, then a summary.

    git clone --bare https://github.com/apple/axlearn            # and maxtext, torchtitan, Megatron-LM, praxis
    python benchmarks/peer_history.py CLONE [CLONE ...]          # full clones: a shallow one refuses most rows

Writes benchmarks/results/peers/ (report.md, report.html, report.json, one plot per feature) and prints, per
feature and repository, the changes measured and the median integration LoC per model touched. The clones are
never part of the repository or of the test suite; the committed report names each clone's HEAD.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from axmini.tools import catalogue, cli

OUT = Path(__file__).parent / "results" / "peers"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("clones", nargs="+", help="local clones of the catalogue's repositories (bare is fine)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    shipped = catalogue.SHIPPED.relative_to(Path.cwd()) if catalogue.SHIPPED.is_relative_to(Path.cwd()) else None
    argv = ["history", "--out", str(args.out), "--catalogue", str(shipped or catalogue.SHIPPED), "--no-progress"]
    status = cli.main([*argv, *(x for clone in args.clones for x in ("--repo", clone))])
    if status:
        return status
    data = json.loads((args.out / "report.json").read_text())
    print(f"\n{'feature':<16}{'repository':<14}{'measured':>9}{'refused':>8}  integration LoC per change (per model)")
    groups: dict[tuple[str, str], list[dict]] = {}
    for change in data["changes"]:
        groups.setdefault((change["feature"], change["repository"]), []).append(change)
    for (feature, repo), changes in groups.items():
        measured = [c for c in changes if c["stats"]]
        cells = [
            f"{c['stats']['integration_loc']}"
            + (f" ({c['integration_per_model']:.0f})" if c["integration_per_model"] is not None else "")
            for c in measured
        ]
        refused = sum(c["status"] == "refused" for c in changes)
        print(f"{feature:<16}{repo:<14}{len(measured):>9}{refused:>8}  {', '.join(cells)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
