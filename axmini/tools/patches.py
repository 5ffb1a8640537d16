"""Patch mode: a feature (`axmini.features`) given to every target of a family, measured and checked.

Applying a feature to a target (a named experiment, or a model of the synthetic family) is running its patch on
the target's config. For the first n models x m variants of a family we measure:

- lines written: the code lines of the feature's `user_code` (the patch function's body and the imports it
  uses, counted by `axmini.tools.loc`); the user writes them once, whatever the number of targets: axmini's
  integration cost;
- modifier lines: the code lines of the ConfigModifier classes the patch names (their source, read with
  `inspect`): the implementation;
- config paths changed, layers changed, layers touched (`axmini.tools.metrics`), summed over targets;
- the outcome on each target: *applies* (the patched model builds abstractly, and its tiny forward pass is finite
  where one ran), *refused* (the patch or the build raised a ValueError: a config error naming its reason, e.g.
  a 3:1 layer pattern on a 2-layer model), *failed* (anything else: a bug), or *not checked* (past the check
  budget; its config metrics are still measured). Forward passes run on every target, or by default on a set
  that covers every model and every variant (`ForwardChecks`).
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import inspect
import textwrap
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from axmini.config import find_configs
from axmini.features import Feature
from axmini.tools.families import Family, build_abstract_check
from axmini.tools.fit import Complexity, fit_complexity
from axmini.tools.loc import count_code_lines
from axmini.tools.metrics import config_paths_changed, inside, layers_changed, layers_touched

APPLIES, REFUSED, FAILED, NOT_CHECKED = "applies", "refused", "failed", "not checked"
OUTCOMES = (APPLIES, REFUSED, FAILED, NOT_CHECKED)


class UnknownFeatureError(ValueError):
    """A feature name that is not registered."""


def select_features(names: Sequence[str] | None, registry: Mapping[str, Feature]) -> dict[str, Feature]:
    """The named features (all when `names` is None); an unknown name raises with the closest suggestion."""
    if names is None:
        return dict(registry)
    selected = {}
    for name in names:
        if name not in registry:
            close = difflib.get_close_matches(name, list(registry), n=1, cutoff=0.4)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UnknownFeatureError(f"unknown feature {name!r}{hint} (registered: {', '.join(sorted(registry))})")
        selected[name] = registry[name]
    return selected


def user_lines(feature: Feature) -> int:
    return count_code_lines(feature.user_code)


def modifier_lines(feature: Feature) -> int:
    """Code lines of the source of every ConfigModifier class the feature's patch names."""
    return sum(count_code_lines(textwrap.dedent(inspect.getsource(k))) for k in feature.modifiers)


class ForwardChecks(enum.Enum):
    """Which targets of a family run the forward check (each costs a compilation: about a second on CPU).

    ALL: every target. COVER: max(N, M) targets (k mod N, k mod M) that include every model and every
    variant at least once. NONE: no forward check (builds are still checked on every target).
    """

    ALL = "all"
    COVER = "cover"
    NONE = "none"

    def targets(self, n: int, m: int) -> set[tuple[int, int]]:
        if self is ForwardChecks.ALL:
            return {(i, j) for i in range(n) for j in range(m)}
        if self is ForwardChecks.COVER:
            return {(k % n, k % m) for k in range(max(n, m))}
        return set()


@dataclass(frozen=True)
class TargetResult:
    """One patched target: what changed, where (inside the family's variant slot or not), and the outcome."""

    target: str
    model: int
    variant: int
    paths_changed: int
    layers_changed: int
    layers_touched: int
    paths_in_slot: int
    outcome: str  # one of OUTCOMES
    forward_ok: bool | None = None  # None: no forward pass ran
    reason: str | None = None  # why it was refused or failed


@dataclass(frozen=True)
class PatchPoint:
    """A feature applied to the first n models x m variants of a family."""

    feature: str
    family: str
    n: int
    m: int
    user_lines: int
    modifier_lines: int
    paths_changed: int
    layers_changed: int
    layers_touched: int
    applies: int
    refused: int
    failed: int
    not_checked: int
    forward_ok: int
    forward_checked: int

    @property
    def targets(self) -> int:
        return self.n * self.m

    def outcomes(self) -> str:
        """ "a applies / r refused / ..." with the zero counts (but applies) left out."""
        counts = {APPLIES: self.applies, REFUSED: self.refused, FAILED: self.failed, NOT_CHECKED: self.not_checked}
        return " / ".join(f"{n} {name}" for name, n in counts.items() if n or name == APPLIES)


@dataclass(frozen=True)
class FamilySweep:
    """A feature swept over a family: one point per size, and the per-target results they sum."""

    feature: str
    family: str
    points: tuple[PatchPoint, ...]
    results: tuple[TargetResult, ...]

    def complexity(self, metric: str) -> Complexity:
        """The fitted growth of a PatchPoint metric (e.g. "user_lines", "paths_changed") with n and m."""
        return fit_complexity([(p.n, p.m, getattr(p, metric)) for p in self.points])

    def reasons(self, outcome: str = REFUSED) -> Counter[str]:
        """How many targets were refused (or failed) for each reason."""
        return Counter(r.reason or "" for r in self.results if r.outcome == outcome)

    @property
    def reaches_slot(self) -> bool:
        return any(r.paths_in_slot for r in self.results)

    @property
    def reaches_outside_slot(self) -> bool:
        return any(r.paths_changed > r.paths_in_slot for r in self.results)


def _reason(stage: str, e: BaseException) -> str:
    first = str(e).strip().splitlines()
    return f"{stage}: {type(e).__name__}: {first[0] if first else ''}"[:300]


def _outcome(e: BaseException) -> str:
    return REFUSED if isinstance(e, ValueError) else FAILED


def patch_target(
    feature: Feature, family: Family, i: int, j: int, *, build: bool = True, forward: bool = True
) -> TargetResult:
    """Applies the feature to target (i, j) of the family and measures the change.

    `build` / `forward`: whether to run the build check / the family's forward check (if it has one). A target
    whose build was not checked is "not checked" (unless the patch itself refused it).
    """
    name = family.target_name(i, j)
    before = family.target(i, j)
    try:
        after = feature.apply(before.clone())
    except Exception as e:  # A patch that fails on a target is a result, not a crash of the report.
        return TargetResult(name, i, j, 0, 0, 0, 0, _outcome(e), None, _reason("patch", e))
    paths = config_paths_changed(before, after)
    slot_roots = []
    if family.variant_slot is not None:
        slot_roots = [p for cfg in (before, after) for p, _ in find_configs(cfg, family.variant_slot)]
    in_slot = sum(inside(p, slot_roots) for p in paths) if slot_roots else 0
    changed, touched = len(layers_changed(before, after)), len(layers_touched(before, after))
    measured = dict(paths_changed=len(paths), layers_changed=changed, layers_touched=touched, paths_in_slot=in_slot)
    outcome, forward_ok, reason = (APPLIES if build else NOT_CHECKED), None, None
    try:
        if build:
            stage = "build"
            (family.build_check or build_abstract_check)(after)
        if forward and family.forward_check is not None:
            stage, forward_ok = "forward", False
            family.forward_check(after)
            forward_ok = True
    except Exception as e:
        outcome, reason = (FAILED if stage == "forward" else _outcome(e)), _reason(stage, e)
    return TargetResult(name, i, j, **measured, outcome=outcome, forward_ok=forward_ok, reason=reason)


def _in_time(deadline: float | None) -> bool:
    return deadline is None or time.perf_counter() < deadline


def _summarize(feature: Feature, family: str, sizes: Sequence[tuple[int, int]], results: dict) -> FamilySweep:
    """One PatchPoint per size, summing the results of its targets."""
    user, impl = user_lines(feature), modifier_lines(feature)
    points = []
    for n, m in sizes:
        chosen = [results[i, j] for i in range(n) for j in range(m)]
        outcomes = Counter(r.outcome for r in chosen)
        points.append(
            PatchPoint(
                feature=feature.name,
                family=family,
                n=n,
                m=m,
                user_lines=user,
                modifier_lines=impl,
                paths_changed=sum(r.paths_changed for r in chosen),
                layers_changed=sum(r.layers_changed for r in chosen),
                layers_touched=sum(r.layers_touched for r in chosen),
                applies=outcomes[APPLIES],
                refused=outcomes[REFUSED],
                failed=outcomes[FAILED],
                not_checked=outcomes[NOT_CHECKED],
                forward_ok=sum(bool(r.forward_ok) for r in chosen),
                forward_checked=sum(r.forward_ok is not None for r in chosen),
            )
        )
    return FamilySweep(feature.name, family, tuple(points), tuple(results[t] for t in sorted(results)))


def sweep_features(
    features: Sequence[Feature],
    family: Family,
    sizes: Sequence[tuple[int, int]],
    *,
    build: bool = True,
    deadline: float | None = None,
    on_target: Callable[[], None] | None = None,
) -> list[FamilySweep]:
    """Every feature on every target of the largest size (config metrics, and builds until `deadline`), summed
    per size. Targets go smallest square first (max(i, j), then i, j), every feature on one target before the
    next: a deadline leaves the same targets unchecked for every feature, and the small sizes checked."""
    max_n, max_m = max(n for n, _ in sizes), max(m for _, m in sizes)
    if max_n > len(family.models) or max_m > len(family.variants):
        raise ValueError(
            f"family {family.name!r} has {len(family.models)} models x {len(family.variants)} variants; "
            f"sizes ask for {max_n} x {max_m}"
        )
    results: dict[str, dict[tuple[int, int], TargetResult]] = {f.name: {} for f in features}
    for i, j in sorted(((i, j) for i in range(max_n) for j in range(max_m)), key=lambda t: (max(t), t)):
        check = build and _in_time(deadline)
        for feature in features:
            results[feature.name][i, j] = patch_target(feature, family, i, j, build=check, forward=False)
            if on_target is not None:
                on_target()
    return [_summarize(f, family.name, sizes, results[f.name]) for f in features]


def sweep(
    feature: Feature,
    family: Family,
    sizes: Sequence[tuple[int, int]],
    *,
    build: bool = True,
    forward: ForwardChecks = ForwardChecks.COVER,
    deadline: float | None = None,
) -> FamilySweep:
    """One feature on a family: `sweep_features`, then `check_forwards` on the targets `forward` selects."""
    (swept,) = sweep_features([feature], family, sizes, build=build, deadline=deadline)
    return check_forwards(swept, feature, family, forward, deadline)


def check_forwards(
    swept: FamilySweep, feature: Feature, family: Family, forward: ForwardChecks, deadline: float | None = None
) -> FamilySweep:
    """Runs the family's forward check on the built targets `forward` selects, until `deadline`."""
    results = {(r.model, r.variant): r for r in swept.results}
    max_n, max_m = max(i for i, _ in results) + 1, max(j for _, j in results) + 1
    for i, j in sorted(forward.targets(max_n, max_m)) if family.forward_check is not None else []:
        if results[i, j].outcome == APPLIES and results[i, j].forward_ok is None and _in_time(deadline):
            checked = patch_target(feature, family, i, j, build=False, forward=True)
            outcome = APPLIES if checked.forward_ok else FAILED
            results[i, j] = dataclasses.replace(
                results[i, j], outcome=outcome, forward_ok=checked.forward_ok, reason=checked.reason
            )
    return _summarize(feature, swept.family, [(p.n, p.m) for p in swept.points], results)
