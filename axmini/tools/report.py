"""The modularity report: history mode and patch mode in one run, written as report.md, report.html, PNGs, report.json.

`axmini report modularity --out DIR [--repo PATH --commits FILE] [--features rope,moe] [--family 8x8]
[--forward cover] [--check-budget 80]`:

- with `--repo`/`--commits`, history mode measures the listed commits of any git repository (`history.py`);
- patch mode applies each registered feature (`axmini/features.py`; all of them unless `--features` names some) to
  every named experiment and to a synthetic family of N models x M attention variants (`--family NxM`, powers of
  two up to N and M), next to the generated copy-per-class baseline (`patches.py`);
- every patched target is built abstractly and some run a tiny forward pass (`--forward`), while the sweeps
  are within their wall-time budget (`--check-budget`, default 80 s, so the whole report stays under 2 minutes
  on CPU; past it, config metrics still cover every target and the rest count as not checked);
- plots (matplotlib, Agg): integration LoC against the number of targets, per feature, log-log with the fitted
  slope; and changes made against lines written. report.html embeds them (base64), so it is one file.

Bad input (a path that is not a git repository, an unknown commit, an unknown feature, a malformed option) is one
line on stderr and exit status 2. The definitions of every number are in `loc.py` and `patches.py`.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import html
import json
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from tqdm import tqdm

from axmini.tools import loc, patches
from axmini.tools.history import (
    ChangeStats,
    CommitsFileError,
    NotAGitRepositoryError,
    Repository,
    UnknownRevisionError,
    history_complexity,
    measure_history,
    parse_commits_file,
)
from axmini.tools.patches import (
    BaselinePoint,
    Family,
    FamilySweep,
    FamilyUnavailableError,
    FeatureLike,
    ForwardChecks,
    UnknownFeatureError,
)

Sizes = list[tuple[int, int]]


@dataclass
class ModularityResult:
    """Everything the report shows; `notes` say what was skipped and why."""

    features: dict[str, FeatureLike] = field(default_factory=dict)
    sweeps: list[FamilySweep] = field(default_factory=list)
    baselines: dict[str, list[BaselinePoint]] = field(default_factory=dict)  # by feature
    baseline_family: str | None = None  # the family (with a variant slot) the baselines mirror
    family_notes: dict[str, str] = field(default_factory=dict)  # how each family is built
    history: list[ChangeStats] = field(default_factory=list)
    repo: str | None = None
    notes: list[str] = field(default_factory=list)
    timings: list[tuple[str, float]] = field(default_factory=list)  # (phase, seconds)
    seconds: float = 0.0


def default_families(max_n: int, max_m: int) -> tuple[list[tuple[Family, Sizes]], list[str]]:
    """The synthetic N x M family and the named experiments (N = 1..all), with a note for each one unavailable.

    The synthetic family comes first: its checks are cheap and uniform, so the check budget reaches every feature.
    """
    families, notes = [], []
    try:
        families.append((patches.synthetic_family(max_n, max_m), patches.grid_sizes(max_n, max_m)))
    except FamilyUnavailableError as e:
        notes.append(f"synthetic family skipped: {e}")
    try:
        family = patches.experiment_family()
        families.append((family, [(n, 1) for n in patches.powers_of_two(len(family.models))]))
    except FamilyUnavailableError as e:
        notes.append(f"experiments family skipped: {e}")
    return families, notes


def run_modularity(
    *,
    repo: str | None = None,
    commits: str | None = None,
    feature_names: Sequence[str] | None = None,
    family: tuple[int, int] = (8, 8),
    forward: ForwardChecks = ForwardChecks.COVER,
    check_budget: float = 80.0,
    progress: bool = True,
) -> ModularityResult:
    """Validates every input first (repository, commits, feature names), then measures.

    The sweeps get `check_budget` seconds of wall time, split evenly (time one sweep leaves goes to the next):
    past its share a sweep starts no more build or forward checks; config metrics always cover every target,
    and unchecked targets are counted as such.

    Raises NotAGitRepositoryError, UnknownRevisionError, CommitsFileError or UnknownFeatureError on bad input.
    """
    start = time.perf_counter()
    result = ModularityResult()
    entries, repository = [], None
    if repo is not None:
        repository = Repository(repo)
        entries = parse_commits_file(commits) if commits else []
        for entry in entries:
            try:
                repository.resolve(entry.rev)
            except UnknownRevisionError as e:
                raise UnknownRevisionError(f"{entry.where}: {e}") from None
        result.repo = str(repository.root)
    registry = patches.registered_features()
    result.features = patches.select_features(feature_names, registry)
    if not registry and feature_names is None:
        result.notes.append("patch mode skipped: no features are registered (axmini/features.py is missing)")
    if repository is not None and entries:
        tick = time.perf_counter()
        result.history = measure_history(repository, entries)
        result.timings.append(("history", time.perf_counter() - tick))
    if result.features:
        families, notes = default_families(*family)
        result.notes += notes
        result.family_notes = {fam.name: fam.note for fam, _ in families}
        total = sum(len(result.features) * max(n for n, _ in s) * max(m for _, m in s) for _, s in families)
        baselines: dict[tuple[bool, bool], list[BaselinePoint]] = {}
        sweeps_left, checks_end = len(families) * len(result.features), time.perf_counter() + check_budget
        with tqdm(total=total, desc="modularity", unit="target", disable=not progress, file=sys.stderr) as bar:
            for fam, sizes in families:
                for feature in result.features.values():
                    bar.set_postfix_str(f"{feature.name} on {fam.name}")
                    tick = time.perf_counter()
                    deadline = tick + max(checks_end - tick, 0.0) / sweeps_left
                    sweeps_left -= 1
                    swept = patches.sweep(
                        feature, fam, sizes, forward=forward, deadline=deadline, on_target=lambda: bar.update(1)
                    )
                    result.sweeps.append(swept)
                    result.timings.append((f"{feature.name} on {fam.name}", time.perf_counter() - tick))
                    if fam.variant_slot is None:
                        continue
                    # The generated code's line counts do not depend on the feature's name: one run per kind.
                    kind = (swept.reaches_slot, swept.reaches_outside_slot)
                    if kind not in baselines:
                        tick = time.perf_counter()
                        baselines[kind] = patches.baseline_sweep(feature.name, sizes, variants=kind[0], models=kind[1])
                        result.timings.append((f"baseline {feature.name}", time.perf_counter() - tick))
                    result.baselines[feature.name] = [
                        dataclasses.replace(p, feature=feature.name) for p in baselines[kind]
                    ]
                    result.baseline_family = fam.name
    unchecked = sum(r.built is None for sweep in result.sweeps for r in sweep.results)
    if unchecked:
        total = sum(len(sweep.results) for sweep in result.sweeps)
        result.notes.append(
            f"{unchecked} of {total} targets were not build-checked within the check budget of {check_budget:g} s "
            "(config metrics cover every target); raise --check-budget (or give inf) to check them all"
        )
    result.seconds = time.perf_counter() - start
    return result


# ----------------------------------------------------------------------------------------------------
# Plots.


def _loglog_fit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Slope and intercept of log(y) against log(x) (y < 1 fitted as 1, as in `fit_complexity`)."""
    x, y = np.log(np.asarray(xs, float)), np.log(np.maximum(np.asarray(ys, float), 1.0))
    if len(set(xs)) < 2:
        return 0.0, float(y.mean())
    slope, intercept = np.polyfit(x, y, 1)
    return float(slope), float(intercept)


def _series(ax: Any, xs: Sequence[int], ys: Sequence[float], label: str, marker: str) -> None:
    slope, intercept = _loglog_fit(xs, ys)
    slope = slope if abs(slope) >= 0.005 else 0.0
    points = ax.scatter(xs, np.maximum(ys, 1), marker=marker, alpha=0.8, label=f"{label}; slope vs targets {slope:.2f}")
    grid = np.array(sorted(set(xs)), float)
    ax.plot(grid, np.exp(intercept) * grid**slope, color=points.get_facecolor()[0], linewidth=1)


def _finish(fig: Any, ax: Any, path: Path, title: str, xlabel: str, ylabel: str) -> Path:
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_integration(result: ModularityResult, feature: str, out: Path) -> Path:
    """Integration LoC vs number of targets for one feature: axmini's lines written and the baseline's edits."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, sweep in enumerate(s for s in result.sweeps if s.feature == feature):
        fit = sweep.complexity("user_lines").describe()
        xs, ys = [p.targets for p in sweep.points], [p.user_lines for p in sweep.points]
        _series(ax, xs, ys, f"axmini, {sweep.family}: lines written, {fit}", "os^"[i % 3])
    baseline = result.baselines.get(feature)
    if baseline:
        fit = patches.baseline_complexity(baseline).describe()
        xs, ys = [p.targets for p in baseline], [p.integration_loc for p in baseline]
        _series(ax, xs, ys, f"copy-per-class baseline: {fit}", "x")
    return _finish(fig, ax, out / f"integration_{_slug(feature)}.png", f"Integrating {feature}", "targets", "LoC")


def plot_changes_vs_lines(result: ModularityResult, out: Path) -> Path:
    """Modules changed vs lines written, per feature on the baseline's family: axmini's layer configs touched
    against its lines written, the baseline's classes edited against its integration LoC."""
    fig, ax = plt.subplots(figsize=(8.4, 4.6))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, feature in enumerate(result.features):
        color = colors[k % len(colors)]
        for sweep in (s for s in result.sweeps if s.feature == feature and s.family == result.baseline_family):
            points = sorted((p.layers_touched, p.user_lines) for p in sweep.points if p.layers_touched > 0)
            if points:
                xs, ys = [x for x, _ in points], [y for _, y in points]
                ax.plot(xs, ys, "o-", color=color, label=f"axmini {feature}: layer configs touched")
        baseline = sorted((p.classes_touched, p.integration_loc) for p in result.baselines.get(feature, []))
        if baseline:
            xs, ys = [x for x, _ in baseline], [y for _, y in baseline]
            ax.plot(xs, ys, "x--", color=color, label=f"baseline {feature}: classes edited")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_title("Modules changed vs lines written", fontsize=10)
    ax.set_xlabel("modules changed (summed over targets)")
    ax.set_ylabel("lines written (LoC)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    path = out / "changes_vs_lines.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_history(result: ModularityResult, out: Path) -> Path | None:
    """Integration LoC vs targets per history label (only labels with a target count)."""
    fits = history_complexity(result.history)
    series = {s.label for s in result.history if s.targets is not None}
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, label in enumerate(sorted(series)):
        points = sorted((s.targets, s.integration_loc) for s in result.history if s.label == label and s.targets)
        _series(
            ax, [x for x, _ in points], [y for _, y in points], f"{label}: {fits[label].describe()}", "os^xd"[i % 5]
        )
    return _finish(fig, ax, out / "history.png", "History: integration LoC per commit", "targets", "LoC")


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


# ----------------------------------------------------------------------------------------------------
# The document: a list of blocks, rendered as Markdown and as self-contained HTML.

Block = tuple[str, Any]


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> Block:
    return ("table", (list(header), [[str(c) for c in row] for row in rows]))


def _checks(ok: int, checked: int, total: int) -> str:
    """ "ok/checked", and how many targets were not checked."""
    if not checked:
        return "-"
    return f"{ok}/{checked}" + (f" ({total - checked} not checked)" if checked < total else "")


def build_document(result: ModularityResult, images: dict[str, Path]) -> list[Block]:
    """The report's content, in order."""
    doc: list[Block] = [("h1", "axmini modularity report")]
    doc.append(("p", f"Generated by `axmini report modularity` in {result.seconds:.1f} s."))
    doc.append(("p", loc.__doc__.split("\n\n", 1)[1].strip()))
    for note in result.notes:
        doc.append(("p", f"Note: {note}"))
    if result.features:
        doc.append(("h2", "Patch mode: features as config modifiers"))
        doc.append(("p", patches.__doc__.split("\n\n", 1)[1].strip()))
        rows = []
        for sweep in result.sweeps:
            last, baseline = sweep.points[-1], result.baselines.get(sweep.feature)
            mirrored = sweep.family == result.baseline_family
            rows.append(
                [sweep.feature, sweep.family, last.user_lines, last.modifier_lines]
                + [sweep.complexity("user_lines").describe(), sweep.complexity("paths_changed").describe()]
                + [f"{last.targets} / {last.paths_changed} / {last.layers_changed} / {last.layers_touched}"]
                + [_checks(last.built, last.build_checked, last.targets)]
                + [_checks(last.forward_ok, last.forward_checked, last.targets)]
                + [patches.baseline_complexity(baseline).describe() if baseline and mirrored else "-"]
            )
        header = ["feature", "family", "lines written", "modifier lines", "lines written grow as"]
        header += [
            "config paths grow as",
            "largest: targets / paths / layers changed / touched",
            "built",
            "forward ok",
            "baseline grows as",
        ]
        doc.append(_table(header, rows))
        for name, feature in result.features.items():
            doc.append(("h3", name))
            doc.append(("p", "What the user writes:"))
            doc.append(("code", feature.user_code.strip()))
            if f"integration_{name}" in images:
                doc.append(("img", (images[f"integration_{name}"], f"Integration LoC vs targets: {name}")))
            baseline = {(p.n, p.m): p for p in result.baselines.get(name, [])}
            for sweep in (s for s in result.sweeps if s.feature == name):
                rows = []
                for p in sweep.points:
                    b = baseline.get((p.n, p.m)) if sweep.family == result.baseline_family else None
                    rows.append(
                        [p.n, p.m, p.targets, p.user_lines, p.paths_changed, p.layers_changed, p.layers_touched]
                        + [
                            _checks(p.built, p.build_checked, p.targets),
                            _checks(p.forward_ok, p.forward_checked, p.targets),
                        ]
                        + ([b.integration_loc, b.classes_touched, b.modules_affected] if b else ["-", "-", "-"])
                    )
                header = ["N models", "M variants", "targets", "lines written", "paths changed", "layers changed"]
                header += ["layers touched"]
                header += ["built", "forward ok", "baseline LoC", "baseline classes", "baseline modules"]
                note = result.family_notes.get(sweep.family, "")
                doc.append(("p", f"Family `{sweep.family}`{': ' + note if note else '.'}"))
                doc.append(_table(header, rows))
                failures = sorted({f for p in sweep.points for f in p.failures})
                if failures:
                    doc.append(("p", "Failures:\n" + "\n".join(f"- {f}" for f in failures[:20])))
        if "changes_vs_lines" in images:
            doc.append(("img", (images["changes_vs_lines"], "Modules changed vs lines written")))
    if result.history:
        doc.append(("h2", f"History mode: {result.repo}"))
        rows = [
            [
                s.label,
                " ".join(s.revs),
                s.targets or "-",
                s.implementation_loc,
                f"{s.integration_loc} (+{s.integration_added} -{s.integration_deleted})",
                f"{len(s.files_new)} / {len(s.files_modified)} / {len(s.files_deleted)}",
                len(s.classes_touched),
                len(s.functions_touched),
                len(s.modules_affected),
                len(s.excluded_files),
            ]
            for s in result.history
        ]
        header = ["label", "revisions", "targets", "implementation LoC", "integration LoC", "files new/mod/del"]
        header += ["classes touched", "functions touched", "modules affected", "excluded files"]
        doc.append(_table(header, rows))
        fits = history_complexity(result.history)
        doc.append(_table(["label", "LoC-complexity"], [[k, v.describe()] for k, v in fits.items()]))
        if "history" in images:
            doc.append(("img", (images["history"], "History: integration LoC vs targets")))
    if result.timings:
        doc.append(("h2", "Timings"))
        doc.append(_table(["phase", "seconds"], [[phase, f"{sec:.1f}"] for phase, sec in result.timings]))
    return doc


def render_markdown(doc: Sequence[Block]) -> str:
    lines = []
    for kind, value in doc:
        if kind in ("h1", "h2", "h3"):
            lines.append(f"{'#' * int(kind[1])} {value}")
        elif kind == "p":
            lines.append(value)
        elif kind == "code":
            lines.append(f"```python\n{value}\n```")
        elif kind == "table":
            header, rows = value
            cells = [header, ["---"] * len(header), *rows]
            lines.append("\n".join("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells))
        elif kind == "img":
            path, caption = value
            lines.append(f"![{caption}]({path.name})")
        lines.append("")
    return "\n".join(lines)


def _html_text(text: str) -> str:
    """Paragraph text: `code` spans, and "- " lines as a list."""
    out, items = [], []
    for line in text.splitlines():
        escaped = re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(line))
        if line.startswith("- "):
            items.append(f"<li>{escaped[2:]}</li>")
        elif line.startswith("  ") and items:
            items[-1] = items[-1][:-5] + " " + escaped.strip() + "</li>"
        else:
            if items:
                out.append("<ul>" + "".join(items) + "</ul>")
                items = []
            out.append(escaped)
    if items:
        out.append("<ul>" + "".join(items) + "</ul>")
    return "<p>" + "\n".join(out) + "</p>"


def render_html(doc: Sequence[Block]) -> str:
    parts = []
    for kind, value in doc:
        if kind in ("h1", "h2", "h3"):
            parts.append(f"<{kind}>{html.escape(value)}</{kind}>")
        elif kind == "p":
            parts.append(_html_text(value))
        elif kind == "code":
            parts.append(f"<pre><code>{html.escape(value)}</code></pre>")
        elif kind == "table":
            header, rows = value
            head = "".join(f"<th>{html.escape(c)}</th>" for c in header)
            body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif kind == "img":
            path, caption = value
            data = base64.b64encode(path.read_bytes()).decode()
            parts.append(
                f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{html.escape(caption)}</figcaption></figure>"
            )
    style = (
        "body{font-family:sans-serif;max-width:70em;margin:2em auto;line-height:1.4}"
        "table{border-collapse:collapse;font-size:0.85em;margin:1em 0}td,th{border:1px solid #ccc;padding:2px 6px}"
        "th{background:#f3f3f3}pre{background:#f6f6f6;padding:0.5em}img{max-width:100%}"
    )
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>axmini modularity report</title>'
        f"<style>{style}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n"
    )


def report_json(result: ModularityResult) -> dict[str, Any]:
    """Plain data of the whole result, with each fitted complexity."""
    sweeps = []
    for s in result.sweeps:
        metrics = ("user_lines", "paths_changed", "layers_changed", "layers_touched")
        fits = {m: patches.to_json(s.complexity(m)) for m in metrics}
        sweeps.append({**patches.to_json(s), "complexity": fits})
    return {
        "seconds": round(result.seconds, 3),
        "timings": [{"phase": phase, "seconds": round(sec, 3)} for phase, sec in result.timings],
        "notes": result.notes,
        "features": {
            name: {
                "user_code": f.user_code,
                "user_lines": loc.count_code_lines(f.user_code),
                "modifier": patches.modifier_config(f).klass.__qualname__,
                "modifier_lines": patches.modifier_lines(patches.modifier_config(f)),
            }
            for name, f in result.features.items()
        },
        "sweeps": sweeps,
        "baselines": {
            name: {
                "points": patches.to_json(points),
                "complexity": patches.to_json(patches.baseline_complexity(points)),
            }
            for name, points in result.baselines.items()
        },
        "history": {
            "repo": result.repo,
            "changes": [s.to_json() for s in result.history],
            "complexity": {k: patches.to_json(v) for k, v in history_complexity(result.history).items()},
        },
    }


def write_report(result: ModularityResult, out: str | Path) -> dict[str, Path]:
    """Writes report.md, report.html, report.json and the PNGs into `out`; returns their paths by name."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images: dict[str, Path] = {}
    for name in result.features:
        if any(s.feature == name for s in result.sweeps):
            images[f"integration_{name}"] = plot_integration(result, name, out)
    if result.sweeps:
        images["changes_vs_lines"] = plot_changes_vs_lines(result, out)
    if result.history and (path := plot_history(result, out)) is not None:
        images["history"] = path
    doc = build_document(result, images)
    paths = {"md": out / "report.md", "html": out / "report.html", "json": out / "report.json"}
    paths["md"].write_text(render_markdown(doc))
    paths["html"].write_text(render_html(doc))
    paths["json"].write_text(json.dumps(report_json(result), indent=1, default=str) + "\n")
    return {**paths, **images}


README_BEGIN = "<!-- modularity-table:begin (written by axmini report modularity --readme) -->"
README_END = "<!-- modularity-table:end -->"


def readme_table(result: ModularityResult) -> str:
    """The per-feature summary a README shows: what a user writes, and how each side grows."""
    rows = []
    for sweep in result.sweeps:
        if sweep.family != result.baseline_family:
            continue
        last, baseline = sweep.points[-1], result.baselines.get(sweep.feature)
        rows.append(
            [f"`{sweep.feature}`", last.user_lines, sweep.complexity("user_lines").describe()]
            + [sweep.complexity("paths_changed").describe(), last.paths_changed]
            + [patches.baseline_complexity(baseline).describe() if baseline else "-"]
        )
    header = ["feature", "lines written", "lines written grow as", "config paths changed grow as"]
    header += [f"paths changed ({result.baseline_family})", "copy-per-class baseline grows as"]
    return render_markdown([_table(header, rows)])


def _readme_parts(path: Path) -> tuple[str, str]:
    """The README text before and after its modularity table; refused when the markers are missing."""
    text = path.read_text() if path.is_file() else ""
    begin, end = text.find(README_BEGIN), text.find(README_END)
    if begin < 0 or end < begin:
        raise _UsageError(f"{path} has no '{README_BEGIN}' ... '{README_END}' block to update")
    return text[: begin + len(README_BEGIN)], text[end:]


def update_readme(path: Path, table: str) -> None:
    """Replaces the text between the README's modularity markers with `table`."""
    before, after = _readme_parts(path)
    path.write_text(f"{before}\n{table.strip()}\n{after}")


# ----------------------------------------------------------------------------------------------------
# Command line.


class _OneLineParser(argparse.ArgumentParser):
    """argparse that reports bad usage as one line and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(message)


class _UsageError(ValueError):
    pass


def _family_size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)x(\d+)", text.strip())
    if not match or int(match[1]) < 1 or int(match[2]) < 1:
        raise argparse.ArgumentTypeError(f"--family must be NxM with N, M >= 1 (e.g. 8x8 or 20x10), got {text!r}")
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
    parser = _OneLineParser(prog="axmini report modularity", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory for report.md/.html/.json and the PNGs")
    parser.add_argument("--repo", help="a local git repository for history mode (needs --commits)")
    parser.add_argument("--commits", help="file of 'label<TAB>rev-or-range[<TAB>targets]' lines (needs --repo)")
    parser.add_argument("--features", help="comma-separated feature names (default: every registered feature)")
    parser.add_argument("--family", type=_family_size, default=(8, 8), help="synthetic family size NxM (default 8x8)")
    parser.add_argument(
        "--forward",
        choices=[c.value for c in ForwardChecks],
        default=ForwardChecks.COVER.value,
        help="targets that run a tiny forward pass: all, cover (every model and variant once; default), none",
    )
    parser.add_argument(
        "--check-budget",
        type=_seconds,
        default=80.0,
        help="wall-time seconds of the patch-mode sweeps after which no more checks start (default 80; inf: all)",
    )
    parser.add_argument("--readme", type=Path, help="also rewrite the feature table between this file's markers")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main_modularity(argv: list[str] | None = None) -> int:
    """Entry point of `axmini report modularity`; returns the exit status (2 on bad input)."""
    prog = "axmini report modularity"
    try:
        args = _parser().parse_args(argv)
        if (args.repo is None) != (args.commits is None):
            raise _UsageError("--repo and --commits go together (history mode needs both)")
        names = [n.strip() for n in args.features.split(",") if n.strip()] if args.features else None
        if args.readme is not None:
            _readme_parts(args.readme)  # Refuse a README without markers before the long run.
        result = run_modularity(
            repo=args.repo,
            commits=args.commits,
            feature_names=names,
            family=args.family,
            forward=ForwardChecks(args.forward),
            check_budget=args.check_budget,
            progress=not args.no_progress,
        )
    except (_UsageError, NotAGitRepositoryError, UnknownRevisionError, CommitsFileError, UnknownFeatureError) as e:
        message = " ".join(str(e).split())
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2
    paths = write_report(result, args.out)
    if args.readme is not None:
        update_readme(args.readme, readme_table(result))
        paths["readme"] = args.readme
    print(f"{prog}: wrote {', '.join(str(p) for p in paths.values())} in {result.seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main_modularity())
