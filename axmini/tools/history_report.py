"""`axmini report history`: every change of a catalogue measured in a local clone of its repository, or refused.

Each clone given is matched to the catalogue repository whose pinned commits it holds. A change is refused, with
its reason, rather than measured wrong when:

- one of its commits is not in the clone;
- a commit's parents were cut off by a shallow clone (it would be compared against an empty tree);
- it is a merge commit off the first-parent history of the clone's HEAD: a merge into a side branch (e.g.
  "merge main into my-branch"), whose diff against its first parent is the other branch's work. A merge on the
  mainline is measured against its first parent, i.e. as the whole branch it merged;
- its commits repeat or overlap those of an earlier change (every commit is counted once).

The report names each row's commits with their subject and date, each repository's URL and the HEAD measured,
and the catalogue's SHA-256, so it can be repeated from itself. Growth is fitted per repository and feature, of
integration LoC against models touched, only where there are at least `fit.MIN_POINTS` measured changes.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from axmini.tools import catalogue as catalogue_lib
from axmini.tools import fit, history, plots
from axmini.tools.catalogue import Catalogue, Change
from axmini.tools.git import Commit, NotAGitRepositoryError, Repository, UnknownRevisionError
from axmini.tools.render import Block, slug, table, write_report

MEASURED, REFUSED, NOT_MEASURED = "measured", "refused", "not measured"


@dataclass(frozen=True)
class Row:
    """One change of the catalogue: its status, the reason when refused, its commits and what it cost."""

    change: Change
    status: str
    reason: str = ""
    commits: tuple[Commit, ...] = ()
    stats: history.ChangeStats | None = None

    @property
    def per_model(self) -> float | None:
        """Integration LoC per model touched (None when no model definition was touched)."""
        if self.stats is None or not self.stats.models_touched:
            return None
        return self.stats.integration_loc / len(self.stats.models_touched)


@dataclass(frozen=True)
class Clone:
    """A catalogue repository measured in a local clone: where, and the HEAD it had."""

    repository: catalogue_lib.Repo
    path: str
    head: Commit
    shallow: bool


@dataclass
class HistoryResult:
    catalogue: Catalogue
    clones: list[Clone] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)
    seconds: float = 0.0

    def fits(self) -> dict[tuple[str, str], fit.Complexity]:
        """Integration LoC against models touched, per (repository, feature), over measured changes."""
        series: dict[tuple[str, str], list[tuple[int, int, float]]] = {}
        for row in self.rows:
            points = series.setdefault((row.change.repository, row.change.feature), [])
            if row.stats is not None and row.stats.models_touched:
                points.append((len(row.stats.models_touched), 1, row.stats.integration_loc))
        return {key: fit.fit_complexity(points) for key, points in series.items()}


def _pinned_ids(cat: Catalogue, repository: str) -> list[str]:
    revs = [rev for c in cat.changes if c.repository == repository for rev in c.commits]
    return [part for rev in revs for part in rev.removesuffix("^!").replace("...", "..").split("..") if part]


def match_clones(cat: Catalogue, paths: Sequence[str | Path]) -> dict[str, Repository]:
    """Each path's repository, keyed by the catalogue repository whose pinned commits it holds most of.

    Raises NotAGitRepositoryError for a path that is not a repository, or that holds none of the catalogue's
    commits, or that clones a repository another path already clones.
    """
    clones: dict[str, Repository] = {}
    for path in paths:
        repo = Repository(path)
        found = {name: sum(repo.has_commits(_pinned_ids(cat, name))) for name in cat.repositories}
        name = max(found, key=lambda n: found[n])
        if not found[name]:
            known = ", ".join(f"{r.name} ({r.url})" for r in cat.repositories.values())
            raise NotAGitRepositoryError(
                f"{str(path)!r} holds none of the commits {cat.path} pins (repositories: {known}); "
                "give a full clone of one of them"
            )
        if name in clones:
            raise NotAGitRepositoryError(f"{str(clones[name].path)!r} and {str(path)!r} are both clones of {name}")
        clones[name] = repo
    return clones


class _Measurer:
    """Measures the changes of one clone in catalogue order, remembering which commits were counted."""

    def __init__(self, repo: Repository, globs: Sequence[str]):
        self.repo, self.globs = repo, globs
        self.counted: dict[str, int] = {}  # commit id -> number of the change that counted it
        self._mainline: frozenset[str] | None = None

    def mainline(self) -> frozenset[str]:
        if self._mainline is None:
            self._mainline = self.repo.first_parent_chain()
        return self._mainline

    def measure(self, change: Change) -> Row:
        repo, ranges, members, shown = self.repo, [], set(), []
        for rev in change.commits:
            try:
                base, head = history.resolve(repo, rev)
            except UnknownRevisionError:
                return Row(change, REFUSED, f"{rev} is not in this clone", tuple(shown))
            (commit,) = repo.commits([head])
            shown.append(commit)
            if ".." in rev:
                members |= repo.commits_between(base, head)
            elif commit.id in repo.shallow_commits:
                return Row(change, REFUSED, f"{commit.short}: its parents are cut off in this shallow clone", (commit,))
            elif len(commit.parents) > 1 and commit.id not in self.mainline():
                reason = f"{commit.short} is a merge into a side branch (not on HEAD's first-parent history)"
                return Row(change, REFUSED, f"{reason}: its diff would be the other branch's work", (commit,))
            else:
                members |= repo.commits_between(base, head) if len(commit.parents) > 1 else {commit.id}
            ranges.append((base, head))
        repeated = sorted({self.counted[m] for m in members if m in self.counted})
        if repeated:
            numbers = ", ".join(f"#{n}" for n in repeated)
            return Row(change, REFUSED, f"repeats commits already counted by change {numbers}", tuple(shown))
        stats = history.ChangeStats()
        for base, head in ranges:
            stats = stats.combine(history.measure_change(repo, base, head, model_globs=self.globs))
        self.counted.update(dict.fromkeys(members, change.number))
        return Row(change, MEASURED, "", tuple(shown), stats)


def run_history(
    cat: Catalogue, clones: Mapping[str, Repository], on_change: Callable[[Change], None] | None = None
) -> HistoryResult:
    """Measures every change whose repository has a clone (in catalogue order); the others are not measured."""
    start = time.perf_counter()
    result = HistoryResult(cat)
    measurers = {}
    for name, repo in clones.items():
        (head,) = repo.commits([repo.commit_id("HEAD")])
        result.clones.append(Clone(cat.repositories[name], str(repo.path), head, repo.is_shallow))
        measurers[name] = _Measurer(repo, cat.repositories[name].models)
    for change in cat.changes:
        measurer = measurers.get(change.repository)
        row = measurer.measure(change) if measurer else Row(change, NOT_MEASURED, "no clone of it was given")
        result.rows.append(row)
        if on_change is not None:
            on_change(change)
    result.seconds = time.perf_counter() - start
    return result


# ----------------------------------------------------------------------------------------------------
# The report.


def _commits_text(row: Row) -> str:
    return "; ".join(f"{c.short} {c.date[:10]} {c.subject}" for c in row.commits) or ", ".join(row.change.commits)


def status_counts(rows: Sequence[Row]) -> str:
    """ "m measured / r refused / n not measured" (parts that are zero left out, except measured)."""
    counts = {s: sum(r.status == s for r in rows) for s in (MEASURED, REFUSED, NOT_MEASURED)}
    return " / ".join(f"{n} {s}" for s, n in counts.items() if n or s == MEASURED)


def history_blocks(result: HistoryResult, images: Mapping[str, Path]) -> list[Block]:
    """The history section: definitions, repositories measured, one row per change, per-feature counts, fits."""
    doc: list[Block] = [("h2", f"History: {len(result.catalogue.changes)} catalogued changes")]
    doc.append(("p", history.__doc__.split("\n\n", 1)[1].strip()))
    doc.append(("p", f"Catalogue `{result.catalogue.path}` (SHA-256 `{result.catalogue.sha256[:16]}`)."))
    clones = {c.repository.name: c for c in result.clones}
    rows = []
    for repo in result.catalogue.repositories.values():
        clone = clones.get(repo.name)
        head = f"{clone.head.short} {clone.head.date[:10]} {clone.head.subject}" if clone else "no clone given"
        rows.append([repo.name, repo.url, head, "shallow" if clone and clone.shallow else "", ", ".join(repo.models)])
    doc.append(table(["repository", "URL", "HEAD measured", "clone", "model globs"], rows))
    rows = []
    for row in result.rows:
        s, c = row.stats, row.change
        measured = (
            [s.implementation_loc, s.integration_loc, s.deleted_loc, s.config_loc, s.script_loc]
            + [len(s.models_touched), f"{row.per_model:.1f}" if row.per_model is not None else "-"]
            if s
            else ["-"] * 7
        )
        status = row.status + (f": {row.reason}" if row.reason else "")
        rows.append(
            [
                f"#{c.number}",
                c.repository,
                c.feature,
                _commits_text(row),
                ", ".join(c.models) or "-",
                *measured,
                status,
                c.rationale,
            ]
        )
    header = ["change", "repository", "feature", "commits (id, date, subject)", "models named"]
    header += ["implementation", "integration", "deleted", "config", "script", "models touched", "integration/model"]
    doc.append(table([*header, "status", "rationale"], rows))
    by_feature: dict[str, list[Row]] = {}
    for row in result.rows:
        by_feature.setdefault(row.change.feature, []).append(row)
    doc.append(("h3", "Per feature"))
    fits = result.fits()
    rows = []
    for feature, feature_rows in by_feature.items():
        for repo in dict.fromkeys(r.change.repository for r in feature_rows):
            mine = [r for r in feature_rows if r.change.repository == repo]
            ratios = [r.per_model for r in mine if r.per_model is not None]
            median = f"{sorted(ratios)[len(ratios) // 2]:.1f}" if ratios else "-"
            rows.append([feature, repo, status_counts(mine), median, fits[repo, feature].describe()])
    doc.append(table(["feature", "repository", "changes", "median integration/model", "growth (fit)"], rows))
    for feature in by_feature:
        if f"history_{feature}" in images:
            doc.append(("img", (images[f"history_{feature}"], f"Integration LoC vs models touched: {feature}")))
    return doc


def history_json(result: HistoryResult) -> dict[str, Any]:
    return {
        "catalogue": {"path": result.catalogue.path, "sha256": result.catalogue.sha256},
        "seconds": round(result.seconds, 3),
        "clones": [
            {"repository": c.repository.name, "url": c.repository.url, "path": c.path, "shallow": c.shallow}
            | {"head": dataclasses.asdict(c.head)}
            for c in result.clones
        ],
        "changes": [
            {
                "number": r.change.number,
                "repository": r.change.repository,
                "url": result.catalogue.repositories[r.change.repository].url,
                "feature": r.change.feature,
                "revisions": list(r.change.commits),
                "models_named": list(r.change.models),
                "rationale": r.change.rationale,
                "status": r.status,
                "reason": r.reason,
                "commits": [dataclasses.asdict(c) for c in r.commits],
                "stats": r.stats.to_json() if r.stats else None,
                "integration_per_model": r.per_model,
            }
            for r in result.rows
        ],
        "fits": {f"{repo}/{feature}": dataclasses.asdict(f) for (repo, feature), f in result.fits().items()},
    }


def write_history_report(result: HistoryResult, out: Path) -> dict[str, Path]:
    """report.md/.html/.json and one plot per feature into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    images = {}
    fits = result.fits()
    for feature in result.catalogue.features:
        series = {}
        for row in result.rows:
            if row.change.feature == feature and row.stats is not None:
                series.setdefault(row.change.repository, []).append(
                    (len(row.stats.models_touched), row.stats.integration_loc)
                )
        if series:
            images[f"history_{feature}"] = plots.plot_history(
                series, {repo: fits[repo, feature] for repo in series}, out / f"history_{slug(feature)}.png", feature
            )
    doc: list[Block] = [("h1", "axmini history report")]
    doc.append(("p", f"Generated by `axmini report history` in {result.seconds:.1f} s."))
    doc += history_blocks(result, images)
    return {**write_report(out, doc, history_json(result), "axmini history report"), **images}
