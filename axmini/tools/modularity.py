"""`axmini report modularity`: axmini's features given to its experiments and to a synthetic grid, beside a
copy-per-class baseline, the AXLearn paper's numbers and the measured histories of peer systems.

- Every registered feature (`axmini/features.py`; `--features` picks some) is applied to a synthetic family of
  N models x M attention variants (`--grid NxM`, powers of two up to N and M; 20x10 is the paper's setting) and
  to every named experiment (`patches.py`), next to the generated copy-per-class baseline (`baseline.py`).
- Every patched target is built abstractly and some run a tiny forward pass (`--forward`) while the sweeps are
  within their wall-time budget (`--check-budget`, default 90 s, so the default report stays near 2 minutes on
  CPU); past it, config metrics still cover every target and the rest count as not checked. Each feature's
  outcomes (applies / refused, with the reasons / failed / not checked) are in its table, its plot and the
  README table.
- A last section puts axmini's numbers beside the paper's (`catalogue/paper.toml`) and beside the peers'
  catalogued changes, read from a history report's JSON (`--peers`; by default the committed
  `benchmarks/results/peers/report.json`, written by `benchmarks/peer_history.py`).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from axmini import features as features_lib
from axmini.features import Feature
from axmini.tools import baseline, families, fit, loc, patches, plots
from axmini.tools.baseline import BaselinePoint
from axmini.tools.catalogue import PaperRow, load_paper
from axmini.tools.families import Family
from axmini.tools.patches import FamilySweep, ForwardChecks
from axmini.tools.render import Block, render_markdown, slug, table, write_report

Sizes = list[tuple[int, int]]
BUILD_SHARE = 2 / 3  # Of the check budget, the part builds may use before forward passes start.
DEFAULT_PEERS = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "peers" / "report.json"


@dataclass
class ModularityResult:
    """Everything the report shows; `notes` say what was skipped and why."""

    grid: tuple[int, int] = (8, 8)
    features: dict[str, Feature] = field(default_factory=dict)
    sweeps: list[FamilySweep] = field(default_factory=list)
    baselines: dict[str, list[BaselinePoint]] = field(default_factory=dict)  # by feature
    baseline_family: str = ""  # the family (with a variant slot) the baselines mirror
    family_notes: dict[str, str] = field(default_factory=dict)  # how each family is built
    paper: list[PaperRow] = field(default_factory=list)
    peers: dict[str, Any] | None = None  # a history report's JSON
    peers_source: str = ""
    notes: list[str] = field(default_factory=list)
    timings: list[tuple[str, float]] = field(default_factory=list)  # (phase, seconds)
    seconds: float = 0.0

    def sweep(self, feature: str, family: str) -> FamilySweep | None:
        return next((s for s in self.sweeps if s.feature == feature and s.family == family), None)


def default_families(max_n: int, max_m: int) -> list[tuple[Family, Sizes]]:
    """The synthetic N x M family and the named experiments (N = 1..all).

    The synthetic family comes first: its checks are cheap and uniform, so the check budget reaches every feature.
    """
    experiments = families.experiment_family()
    return [
        (families.synthetic_family(max_n, max_m), families.grid_sizes(max_n, max_m)),
        (experiments, [(n, 1) for n in families.powers_of_two(len(experiments.models))]),
    ]


def load_peers(path: Path | None) -> tuple[dict[str, Any] | None, str]:
    """A history report's JSON and a note on where it came from (or why there is none)."""
    path = DEFAULT_PEERS if path is None else path
    shown = path.resolve().relative_to(Path.cwd()) if path.resolve().is_relative_to(Path.cwd()) else path
    if not path.is_file():
        return None, f"no peer measurement at {shown} (run benchmarks/peer_history.py to make one)"
    return json.loads(path.read_text()), str(shown)


def run_modularity(
    *,
    feature_names: Sequence[str] | None = None,
    grid: tuple[int, int] = (8, 8),
    forward: ForwardChecks = ForwardChecks.COVER,
    check_budget: float = 90.0,
    peers: Path | None = None,
    progress: bool = True,
) -> ModularityResult:
    """Measures the selected features (raises UnknownFeatureError first, on a bad name).

    Checks get `check_budget` seconds of wall time: builds first, family by family, within `BUILD_SHARE` of it
    (time one family leaves goes to the next), then the forward passes `forward` selects, with the rest. Past a
    deadline no more checks start; config metrics always cover every target.
    """
    start = time.perf_counter()
    result = ModularityResult(grid=grid)
    result.features = patches.select_features(feature_names, features_lib.FEATURES)
    result.paper = load_paper()
    result.peers, result.peers_source = load_peers(peers)
    fams = default_families(*grid)
    result.family_notes = {fam.name: fam.note for fam, _ in fams}
    total = sum(len(result.features) * max(n for n, _ in s) * max(m for _, m in s) for _, s in fams)
    baselines: dict[tuple[bool, bool], list[BaselinePoint]] = {}
    start_checks = time.perf_counter()
    builds_end, checks_end = start_checks + BUILD_SHARE * check_budget, start_checks + check_budget

    def share(end: float, left: int) -> float:
        """An even share of the time left until `end` over the `left` runs still to go."""
        now = time.perf_counter()
        return now + max(end - now, 0.0) / left

    # Builds first (cheap, every feature on one target before the next), then forward passes (about a second each).
    features = list(result.features.values())
    with tqdm(total=total, desc="modularity", unit="target", disable=not progress, file=sys.stderr) as bar:
        for k, (fam, sizes) in enumerate(fams):
            bar.set_postfix_str(fam.name)
            tick = time.perf_counter()
            deadline = share(builds_end, len(fams) - k)
            swept = patches.sweep_features(features, fam, sizes, deadline=deadline, on_target=bar.update)
            result.sweeps += swept
            result.timings.append((f"{fam.name}: config metrics and builds", time.perf_counter() - tick))
            if fam.variant_slot is None:
                continue
            result.baseline_family = fam.name
            for s in swept:
                # The generated code's line counts do not depend on the feature's name: one run per kind.
                kind = (s.reaches_slot, s.reaches_outside_slot)
                if kind not in baselines:
                    tick = time.perf_counter()
                    baselines[kind] = baseline.baseline_sweep(s.feature, sizes, variants=kind[0], models=kind[1])
                    result.timings.append((f"baseline like {s.feature}", time.perf_counter() - tick))
                result.baselines[s.feature] = [dataclasses.replace(p, feature=s.feature) for p in baselines[kind]]
    families_by_name = {fam.name: fam for fam, _ in fams}
    checked = [k for k, s in enumerate(result.sweeps) if families_by_name[s.family].forward_check is not None]
    tick = time.perf_counter()
    for left, k in zip(range(len(checked), 0, -1), checked):
        s = result.sweeps[k]
        feature, fam = result.features[s.feature], families_by_name[s.family]
        result.sweeps[k] = patches.check_forwards(s, feature, fam, forward, share(checks_end, left))
    result.timings.append(("forward passes", time.perf_counter() - tick))
    unchecked = sum(r.outcome == patches.NOT_CHECKED for sweep in result.sweeps for r in sweep.results)
    if unchecked:
        total = sum(len(sweep.results) for sweep in result.sweeps)
        result.notes.append(
            f"{unchecked} of {total} targets were not build-checked within the check budget of {check_budget:g} s "
            "(config metrics cover every target); raise --check-budget (or give inf) to check them all"
        )
    skipped = 0
    for swept in result.sweeps:
        if families_by_name[swept.family].forward_check is not None:
            chosen = forward.targets(max(p.n for p in swept.points), max(p.m for p in swept.points))
            skipped += sum(
                r.outcome == patches.APPLIES and r.forward_ok is None
                for r in swept.results
                if (r.model, r.variant) in chosen
            )
    if skipped:
        result.notes.append(
            f"{skipped} built targets that --forward {forward.value} selects got no forward pass within the budget"
        )
    result.seconds = time.perf_counter() - start
    return result


# ----------------------------------------------------------------------------------------------------
# Plots.


def plot_integration(result: ModularityResult, feature: str, out: Path) -> Path:
    """Lines written vs number of targets for one feature, per family, and the baseline's integration LoC."""
    fig, ax = plots.figure()
    for i, sweep in enumerate(s for s in result.sweeps if s.feature == feature):
        fitted = sweep.complexity("user_lines")
        xs, ys = [p.targets for p in sweep.points], [p.user_lines for p in sweep.points]
        label = f"axmini, {sweep.family} ({sweep.points[-1].outcomes()}): lines written, {fitted.describe()}"
        plots.series(ax, xs, ys, label, "os^"[i % 3], fitted.fitted)
    points = result.baselines.get(feature)
    if points:
        fitted = baseline.baseline_complexity(points)
        xs, ys = [p.targets for p in points], [p.integration_loc for p in points]
        plots.series(ax, xs, ys, f"copy-per-class baseline: {fitted.describe()}", "x", fitted.fitted)
    path = out / f"integration_{slug(feature)}.png"
    return plots.finish(fig, ax, path, f"Integrating {feature}", "targets", "LoC")


def plot_changes_vs_lines(result: ModularityResult, out: Path) -> Path:
    """Modules changed vs lines written, per feature on the baseline's family: axmini's layer configs touched
    against its lines written, the baseline's classes edited against its integration LoC."""
    fig, ax = plots.figure(wide=True)
    colors = plots.plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, feature in enumerate(result.features):
        color = colors[k % len(colors)]
        sweep = result.sweep(feature, result.baseline_family)
        points = sorted((p.layers_touched, p.user_lines) for p in sweep.points if p.layers_touched > 0) if sweep else []
        if points:
            ax.plot(*zip(*points), "o-", color=color, label=f"axmini {feature}: layer configs touched")
        edits = sorted((p.classes_touched, p.integration_loc) for p in result.baselines.get(feature, []))
        if edits:
            ax.plot(*zip(*edits), "x--", color=color, label=f"baseline {feature}: classes edited")
    title, xlabel = "Modules changed vs lines written", "modules changed (summed over targets)"
    return plots.finish(fig, ax, out / "changes_vs_lines.png", title, xlabel, "lines written (LoC)", legend_right=True)


# ----------------------------------------------------------------------------------------------------
# The document.


def _reasons(sweep: FamilySweep, limit: int = 6) -> str:
    lines = []
    for outcome in (patches.REFUSED, patches.FAILED):
        for reason, count in sweep.reasons(outcome).most_common(limit):
            lines.append(f"- {outcome} on {count}: {reason}")
    return "\n".join(lines)


def _catalogue_matches(feature: str, axmini_name: str) -> bool:
    """A catalogue feature (`moe`) matches axmini's features of that name or prefix (`moe_token_choice`)."""
    return axmini_name == feature or axmini_name.startswith(f"{feature}_")


def comparison_blocks(result: ModularityResult) -> list[Block]:
    """axmini's lines written beside the paper's numbers and the peers' measured changes, per feature."""
    doc: list[Block] = [("h2", "axmini beside the AXLearn paper and the peers")]
    doc.append(
        (
            "p",
            "Different quantities, side by side: for axmini, the lines a user writes to give the feature to every "
            f"target of the {result.grid[0]} x {result.grid[1]} synthetic grid; for the paper, the numbers it "
            "reports, with where each was read; for the peers, what their catalogued commits cost (history mode: "
            "integration LoC, and per model touched). Peer rows are single commits chosen by hand "
            "(`axmini/tools/catalogue/peers.toml`, with a rationale each), not a sample of their histories.",
        )
    )
    changes = (result.peers or {}).get("changes", [])
    names = list(dict.fromkeys([r.feature for r in result.paper] + [c["feature"] for c in changes]))
    rows = []
    for name in names:
        for own, sweep in ((f, result.sweep(f, result.baseline_family)) for f in result.features):
            if sweep is None or not _catalogue_matches(name, own):
                continue
            last = sweep.points[-1]
            growth = sweep.complexity("user_lines").describe()
            cost = f"{last.user_lines} lines written (+{last.modifier_lines} modifier lines)"
            rows.append([name, f"axmini `{own}`", cost, f"{last.targets} targets", growth, "this run"])
        for r in (r for r in result.paper if r.feature == name):
            rows.append([name, r.system, r.loc, r.setting, r.growth, r.source])
        for c in (c for c in changes if c["feature"] == name):
            stats = c["stats"]
            if stats is None:
                rows.append(
                    [name, c["repository"], f"{c['status']}: {c['reason']}", "-", "-", f"change #{c['number']}"]
                )
                continue
            per_model = c["integration_per_model"]
            cost = f"{stats['integration_loc']} integration (+{stats['implementation_loc']} implementation)"
            touched = len(stats["models_touched"])
            models = f"{touched} model{'' if touched == 1 else 's'} touched"
            models += f", {per_model:.1f}/model" if per_model is not None else ""
            commit = c["commits"][0] if c["commits"] else {"id": c["revisions"][0], "date": ""}
            rows.append(
                [
                    name,
                    c["repository"],
                    cost,
                    models,
                    "-",
                    f"change #{c['number']}: {commit['id'][:10]} {commit['date'][:10]}",
                ]
            )
    doc.append(table(["feature", "system", "integration LoC", "targets", "growth", "source"], rows))
    if result.peers is None:
        doc.append(("p", f"Note: {result.peers_source}."))
    else:
        doc.append(
            (
                "p",
                f"Peer measurement: `{result.peers_source}` (catalogue SHA-256 "
                f"`{result.peers['catalogue']['sha256'][:16]}`; its report names every commit and HEAD).",
            )
        )
    return doc


def build_document(result: ModularityResult, images: dict[str, Path]) -> list[Block]:
    """The report's content, in order."""
    doc: list[Block] = [("h1", "axmini modularity report")]
    doc.append(("p", f"Generated by `axmini report modularity` in {result.seconds:.1f} s."))
    doc.append(("p", loc.__doc__.split("\n\n", 1)[1].strip()))
    doc.append(("p", fit.__doc__.strip()))
    for note in result.notes:
        doc.append(("p", f"Note: {note}"))
    doc.append(("h2", "Patch mode: features as config patches"))
    doc.append(("p", patches.__doc__.split("\n\n", 1)[1].strip()))
    doc.append(("p", baseline.__doc__.split("\n\n", 1)[1].strip()))
    rows = []
    for sweep in result.sweeps:
        last, points = sweep.points[-1], result.baselines.get(sweep.feature)
        mirrored = points and sweep.family == result.baseline_family
        rows.append(
            [sweep.feature, sweep.family, last.user_lines, last.modifier_lines, last.outcomes()]
            + [sweep.complexity("user_lines").describe(), sweep.complexity("paths_changed").describe()]
            + [f"{last.targets} / {last.paths_changed} / {last.layers_changed} / {last.layers_touched}"]
            + [f"{last.forward_ok}/{last.forward_checked}" if last.forward_checked else "-"]
            + [baseline.baseline_complexity(points).describe() if mirrored else "-"]
        )
    header = ["feature", "family", "lines written", "modifier lines", "outcomes (largest size)"]
    header += ["lines written grow as", "config paths grow as", "largest: targets / paths / layers changed / touched"]
    header += ["forward ok", "baseline grows as"]
    doc.append(table(header, rows))
    for name, feature in result.features.items():
        doc.append(("h3", name))
        doc.append(("p", f"{feature.description} What the user writes (the body of `axmini.features.{name}`):"))
        doc.append(("code", feature.user_code))
        if f"integration_{name}" in images:
            doc.append(("img", (images[f"integration_{name}"], f"Integration LoC vs targets: {name}")))
        points = {(p.n, p.m): p for p in result.baselines.get(name, [])}
        for sweep in (s for s in result.sweeps if s.feature == name):
            rows = []
            for p in sweep.points:
                b = points.get((p.n, p.m)) if sweep.family == result.baseline_family else None
                rows.append(
                    [p.n, p.m, p.targets, p.user_lines, p.paths_changed, p.layers_changed, p.layers_touched]
                    + [p.outcomes(), f"{p.forward_ok}/{p.forward_checked}" if p.forward_checked else "-"]
                    + ([b.integration_loc, b.classes_touched, b.modules_affected] if b else ["-", "-", "-"])
                )
            header = ["N models", "M variants", "targets", "lines written", "paths changed", "layers changed"]
            header += ["layers touched", "outcomes", "forward ok", "baseline LoC", "baseline classes"]
            note = result.family_notes.get(sweep.family, "")
            doc.append(("p", f"Family `{sweep.family}`{': ' + note if note else '.'}"))
            doc.append(table([*header, "baseline modules"], rows))
            reasons = _reasons(sweep)
            if reasons:
                doc.append(("p", f"Why targets of `{sweep.family}` were refused or failed:\n{reasons}"))
    if "changes_vs_lines" in images:
        doc.append(("img", (images["changes_vs_lines"], "Modules changed vs lines written")))
    doc += comparison_blocks(result)
    doc.append(("h2", "Timings"))
    doc.append(table(["phase", "seconds"], [[phase, f"{sec:.1f}"] for phase, sec in result.timings]))
    return doc


def report_json(result: ModularityResult) -> dict[str, Any]:
    """Plain data of the whole result, with each fitted complexity."""
    metrics = ("user_lines", "paths_changed", "layers_changed", "layers_touched")
    return {
        "seconds": round(result.seconds, 3),
        "grid": list(result.grid),
        "timings": [{"phase": phase, "seconds": round(sec, 3)} for phase, sec in result.timings],
        "notes": result.notes,
        "features": {
            name: {
                "description": f.description,
                "user_code": f.user_code,
                "user_lines": patches.user_lines(f),
                "modifiers": [k.__qualname__ for k in f.modifiers],
                "modifier_lines": patches.modifier_lines(f),
            }
            for name, f in result.features.items()
        },
        "sweeps": [
            dataclasses.asdict(s)
            | {"complexity": {m: dataclasses.asdict(s.complexity(m)) for m in metrics}}
            | {"reasons": {o: dict(s.reasons(o)) for o in (patches.REFUSED, patches.FAILED)}}
            for s in result.sweeps
        ],
        "baselines": {
            name: {
                "points": [dataclasses.asdict(p) for p in points],
                "complexity": dataclasses.asdict(baseline.baseline_complexity(points)),
            }
            for name, points in result.baselines.items()
        },
        "paper": [dataclasses.asdict(r) for r in result.paper],
        "peers": result.peers_source,
    }


def write_modularity_report(result: ModularityResult, out: Path) -> dict[str, Path]:
    """Writes report.md, report.html, report.json and the PNGs into `out`; returns their paths by name."""
    out.mkdir(parents=True, exist_ok=True)
    images: dict[str, Path] = {}
    for name in result.features:
        if any(s.feature == name for s in result.sweeps):
            images[f"integration_{name}"] = plot_integration(result, name, out)
    if result.sweeps:
        images["changes_vs_lines"] = plot_changes_vs_lines(result, out)
    doc = build_document(result, images)
    return {**write_report(out, doc, report_json(result), "axmini modularity report"), **images}


# ----------------------------------------------------------------------------------------------------
# The README's table.

README_BEGIN = "<!-- modularity-table:begin (written by axmini report modularity --readme) -->"
README_END = "<!-- modularity-table:end -->"


def readme_table(result: ModularityResult) -> str:
    """The per-feature summary a README shows: lines written, outcomes on the experiments, how each side grows."""
    rows = []
    for name in result.features:
        grid, named = result.sweep(name, result.baseline_family), result.sweep(name, "experiments")
        points = result.baselines.get(name)
        reasons = named.reasons().most_common(1) if named else []
        reason = reasons[0][0] if reasons else "-"
        rows.append(
            [f"`{name}`", grid.points[-1].user_lines if grid else "-"]
            + [named.points[-1].outcomes() if named else "-", reason if len(reason) < 100 else f"{reason[:97]}..."]
            + [grid.points[-1].outcomes() if grid else "-"]
            + [grid.complexity("paths_changed").describe() if grid else "-"]
            + [baseline.baseline_complexity(points).describe() if points else "-"]
        )
    n, m = result.grid
    header = ["feature", "lines written", "named experiments", "main refusal reason", f"synthetic {n}x{m}"]
    header += ["config paths changed grow as", "copy-per-class baseline grows as"]
    return render_markdown([table(header, rows)])


class ReadmeError(ValueError):
    """A README without the modularity table's markers."""


def readme_parts(path: Path) -> tuple[str, str]:
    """The README text before and after its modularity table; ReadmeError when the markers are missing."""
    text = path.read_text() if path.is_file() else ""
    begin, end = text.find(README_BEGIN), text.find(README_END)
    if begin < 0 or end < begin:
        raise ReadmeError(f"{path} has no '{README_BEGIN}' ... '{README_END}' block to update")
    return text[: begin + len(README_BEGIN)], text[end:]


def update_readme(path: Path, table_text: str) -> None:
    """Replaces the text between the README's modularity markers with `table_text`."""
    before, after = readme_parts(path)
    path.write_text(f"{before}\n{table_text.strip()}\n{after}")
