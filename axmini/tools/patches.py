"""Patch mode: what it costs to give a feature to N targets in axmini, against an honest copy-per-class baseline.

In axmini every feature is a named config modifier (`axmini/features.py` exports `FEATURES: dict[str, Feature]`;
a Feature has `name`, `modifier` (a `ConfigModifier` config, or a function returning one) and `user_code`, the
lines a user writes to apply it). Applying a feature to a target (a named experiment, or a model of a synthetic
family) is running its modifier on the target's config. For the first n models x m variants of a family we
measure:

- lines written: the code lines of `user_code` (counting rules of `axmini.tools.loc`); the user writes them once,
  whatever the number of targets, so this is axmini's integration cost;
- modifier lines: the code lines of the modifier classes' own source (read with `inspect`), the implementation;
- config paths changed: `path: value` lines of `debug_string()` that differ, appear or vanish, summed over targets;
- layer instances changed: layer configs (klass a `Layer`) whose class changed or that are new, summed;
- layers touched: layer configs that own a changed path (the innermost layer config above it), summed: the
  "modules changed" of the report's second plot (a window-size change touches every attention, changing none);
- builds: whether every model in the patched config builds abstractly (`build_abstract`), and, when the family
  has a `forward_check(cfg)`, whether a forward pass at tiny size runs (on every target, or, by default, on a
  set of targets that covers every model and every variant: see `ForwardChecks`).

The baseline ("other systems"): for a synthetic family of N models x M attention variants we generate the Python
source of a model-per-file library, in the style of libraries that give each model its own copy of every attention
variant: `common.py` (a shared config dataclass and helpers) and, per model i, `models/model_i.py` with classes
`Model{i}Attention{j}` (one per variant j: `__init__` and `__call__`), `Model{i}FeedForward` and `Model{i}`. Adding
feature `f` there is generated as the smallest inline edit we could write: a new file `features/f.py` holding
`apply_f` (implementation, not integration), one config field `f` in `common.py`, and in every model file one
import line plus, for each edited class, one line in `__init__` (`self.f = config.f`) and one in `__call__` (the
call of `apply_f`). The edited classes follow what the feature changed in axmini: if it changed configs inside the
family's variant slot (e.g. the attention), every `Model{i}Attention{j}` is edited; if it changed configs outside
it, every `Model{i}` is edited. Both versions (every size in its own `NxM/` directory) are committed to a scratch
git repository and measured by history mode (`axmini.tools.history`), so both sides use the same counting rules.
Real libraries need more lines per class (and so grow faster): the baseline is a lower bound, and its growth, not
its constant, is the point.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import functools
import importlib
import inspect
import math
import re
import subprocess
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np

from axmini.config import ConfigBase, ConfigModifier, find_configs, map_configs, replace_config, visit
from axmini.module import Layer, build_abstract
from axmini.tools.history import Repository, measure_change
from axmini.tools.loc import Complexity, count_code_lines, fit_complexity


class UnknownFeatureError(ValueError):
    """A feature name that is not registered."""


class FamilyUnavailableError(RuntimeError):
    """A target family whose layers or experiments are not available in this checkout."""


class FeatureLike(Protocol):
    """The contract of `axmini.features.Feature`."""

    name: str
    modifier: Any  # ConfigModifier config, or a function returning one
    user_code: str


def registered_features() -> dict[str, FeatureLike]:
    """`axmini.features.FEATURES`, or {} while that module does not exist."""
    try:
        features = importlib.import_module("axmini.features")
    except ModuleNotFoundError as e:
        if e.name != "axmini.features":
            raise
        return {}
    return dict(features.FEATURES)


def select_features(names: Sequence[str] | None, registry: Mapping[str, FeatureLike]) -> dict[str, FeatureLike]:
    """The named features (all when `names` is None); an unknown name raises with the closest suggestion."""
    if names is None:
        return dict(registry)
    selected = {}
    for name in names:
        if name not in registry:
            close = difflib.get_close_matches(name, list(registry), n=1, cutoff=0.4)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            known = ", ".join(sorted(registry)) or "none: axmini/features.py is missing"
            raise UnknownFeatureError(f"unknown feature {name!r}{hint} (registered features: {known})")
        selected[name] = registry[name]
    return selected


def modifier_config(feature: FeatureLike) -> ConfigBase:
    """A fresh copy of the feature's modifier config (calling `feature.modifier` when it is a factory)."""
    value = feature.modifier
    cfg = value() if callable(value) and not isinstance(value, ConfigBase) else value
    klass = getattr(cfg, "klass", None)
    if not (isinstance(klass, type) and issubclass(klass, ConfigModifier)):
        raise TypeError(f"feature {feature.name!r}: modifier must be a ConfigModifier config or a factory of one")
    return cfg.clone()


def modifier_lines(cfg: ConfigBase) -> int:
    """Code lines of the source of every modifier class in the modifier config (a chain counts its parts)."""
    classes = [c.klass for _, c in find_configs(cfg, lambda c: _is_subclass(getattr(c, "klass", None), ConfigModifier))]
    return sum(count_code_lines(textwrap.dedent(inspect.getsource(k))) for k in dict.fromkeys(classes))


def _is_subclass(value: Any, base: type) -> bool:
    return isinstance(value, type) and issubclass(value, base)


# ----------------------------------------------------------------------------------------------------
# What a patch changes in a config tree.


def _debug_lines(cfg: ConfigBase) -> dict[str, str]:
    lines = {}
    for line in cfg.debug_string().splitlines():
        path, _, value = line.partition(": ")
        lines[path] = value
    return lines


def config_paths_changed(before: ConfigBase, after: ConfigBase) -> list[str]:
    """The `debug_string` paths whose value differs, or that only one of the two configs has."""
    a, b = _debug_lines(before), _debug_lines(after)
    return sorted(path for path in a.keys() | b.keys() if a.get(path) != b.get(path))


def _layer_classes(cfg: ConfigBase) -> dict[str, type]:
    found = {"": cfg.klass} if _is_subclass(getattr(cfg, "klass", None), Layer) else {}

    def add(path: str, value: Any) -> None:
        if isinstance(value, ConfigBase) and _is_subclass(getattr(value, "klass", None), Layer):
            found[path] = value.klass

    visit(cfg, add)
    return found


def layers_changed(before: ConfigBase, after: ConfigBase) -> list[str]:
    """Paths of layer configs in `after` whose class differs from `before`'s at that path, or that are new."""
    old = _layer_classes(before)
    return sorted(path for path, klass in _layer_classes(after).items() if old.get(path) is not klass)


def layers_touched(before: ConfigBase, after: ConfigBase) -> list[str]:
    """Paths of the layer configs that own a changed config path (the innermost layer config above it).

    Unlike `layers_changed`, a layer whose class stays but whose fields change (a window size) counts.
    """
    roots = set(_layer_classes(before)) | set(_layer_classes(after))
    touched = set()
    for path in config_paths_changed(before, after):
        owners = [root for root in roots if root != path and _inside(path, [root])]  # A slot line: its parent.
        if owners:
            touched.add(max(owners, key=len))
    return sorted(touched)


def _inside(path: str, roots: Iterable[str]) -> bool:
    return any(
        root == "" or path == root or path.startswith(f"{root}.") or path.startswith(f"{root}[") for root in roots
    )


# ----------------------------------------------------------------------------------------------------
# Targets and families.

ConfigFn = Callable[[], ConfigBase]
Rewrite = Callable[[ConfigBase], ConfigBase]
Slot = type | Callable[[ConfigBase], bool]


def _identity(cfg: ConfigBase) -> ConfigBase:
    return cfg


@dataclass(frozen=True)
class Family:
    """Targets built as `variants[j](models[i]())`: N models x M variants of one slot.

    `variant_slot` (a class or predicate for `find_configs`) names the slot the variants rewrite; a family
    that has one is synthetic and gets a generated baseline. `build_check(cfg)` and `forward_check(cfg)` raise
    on failure; the default build check builds every outermost layer config abstractly.
    """

    name: str
    models: Sequence[tuple[str, ConfigFn]]
    variants: Sequence[tuple[str, Rewrite]] = (("base", _identity),)
    variant_slot: Slot | None = None
    build_check: Callable[[ConfigBase], None] | None = None
    forward_check: Callable[[ConfigBase], None] | None = None
    note: str = ""

    def target(self, i: int, j: int) -> ConfigBase:
        return self.variants[j][1](self.models[i][1]())

    def target_name(self, i: int, j: int) -> str:
        return self.models[i][0] if len(self.variants) == 1 else f"{self.models[i][0]}/{self.variants[j][0]}"


def model_configs(cfg: ConfigBase) -> list[tuple[str, ConfigBase]]:
    """The outermost layer configs in a tree (the whole config if it is one): what a build check builds."""
    if _is_subclass(getattr(cfg, "klass", None), Layer):
        return [("", cfg)]
    found = find_configs(cfg, lambda c: _is_subclass(getattr(c, "klass", None), Layer))
    return [(p, c) for p, c in found if not any(p.startswith((f"{q}.", f"{q}[")) for q, _ in found)]


def build_abstract_check(cfg: ConfigBase) -> None:
    """Builds every model of `cfg` abstractly (shapes only); raises what building raises."""
    models = model_configs(cfg)
    if not models:
        raise ValueError("no layer config found to build")
    for _, model in models:
        build_abstract(model.clone())


def powers_of_two(limit: int) -> list[int]:
    """1, 2, 4, ... below `limit`, then `limit` itself."""
    if limit < 1:
        raise ValueError(f"a target count must be >= 1, got {limit}")
    sizes = [2**k for k in range(int(math.log2(limit)) + 1) if 2**k < limit]
    return [*sizes, limit]


def grid_sizes(max_n: int, max_m: int) -> list[tuple[int, int]]:
    """(n, m) for n, m in powers_of_two(max_n) x powers_of_two(max_m)."""
    return [(n, m) for n in powers_of_two(max_n) for m in powers_of_two(max_m)]


# ----------------------------------------------------------------------------------------------------
# Measuring.


class ForwardChecks(enum.Enum):
    """Which targets of a family run the forward check (each costs a compilation: seconds on CPU).

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
    """One patched target: what changed, where (inside the family's variant slot or not), and whether it builds."""

    target: str
    model: int
    variant: int
    paths_changed: int
    layers_changed: int
    layers_touched: int
    paths_in_slot: int
    built: bool | None  # None: not checked
    forward_ok: bool | None  # None: not checked
    error: str | None = None


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
    built: int
    build_checked: int
    forward_ok: int
    forward_checked: int
    failures: tuple[str, ...] = ()

    @property
    def targets(self) -> int:
        return self.n * self.m


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

    @property
    def reaches_slot(self) -> bool:
        return any(r.paths_in_slot for r in self.results)

    @property
    def reaches_outside_slot(self) -> bool:
        return any(r.paths_changed > r.paths_in_slot for r in self.results)


def _error_text(e: BaseException) -> str:
    first = str(e).strip().splitlines()
    return f"{type(e).__name__}: {first[0] if first else ''}"[:300]


def patch_target(
    feature: FeatureLike, family: Family, i: int, j: int, *, build: bool = True, forward: bool = True
) -> TargetResult:
    """Applies the feature's modifier to target (i, j) of the family and measures the change.

    `build` / `forward`: whether to run the build check / the family's forward check (if it has one); a
    check not run is reported as None.
    """
    name = family.target_name(i, j)
    before = family.target(i, j)
    try:
        after = modifier_config(feature).instantiate()(before.clone())
    except Exception as e:  # A modifier that fails on a target is a result, not a crash of the report.
        return TargetResult(name, i, j, 0, 0, 0, 0, False, None, f"modifier: {_error_text(e)}")
    paths = config_paths_changed(before, after)
    slot_roots = []
    if family.variant_slot is not None:
        slot_roots = [p for cfg in (before, after) for p, _ in find_configs(cfg, family.variant_slot)]
    in_slot = sum(_inside(p, slot_roots) for p in paths) if slot_roots else 0
    built, forward_ok, error = None, None, None
    if build:
        try:
            (family.build_check or build_abstract_check)(after)
            built = True
        except Exception as e:
            built, error = False, f"build: {_error_text(e)}"
    if built is not False and forward and family.forward_check is not None:
        try:
            family.forward_check(after)
            forward_ok = True
        except Exception as e:
            forward_ok, error = False, f"forward: {_error_text(e)}"
    changed, touched = len(layers_changed(before, after)), len(layers_touched(before, after))
    return TargetResult(name, i, j, len(paths), changed, touched, in_slot, built, forward_ok, error)


def sweep(
    feature: FeatureLike,
    family: Family,
    sizes: Sequence[tuple[int, int]],
    *,
    build: bool = True,
    forward: ForwardChecks = ForwardChecks.COVER,
    deadline: float | None = None,
    on_target: Callable[[], None] | None = None,
) -> FamilySweep:
    """Measures the feature on every target of the largest size once, then sums each size's targets.

    Every target is built (with `build`); the forward check runs on the targets `forward` selects. After
    `deadline` (a `time.perf_counter()` value) no more checks start: the remaining targets get their config
    metrics only and count as not checked.
    """
    max_n, max_m = max(n for n, _ in sizes), max(m for _, m in sizes)
    if max_n > len(family.models) or max_m > len(family.variants):
        raise ValueError(
            f"family {family.name!r} has {len(family.models)} models x {len(family.variants)} variants; "
            f"sizes ask for {max_n} x {max_m}"
        )

    def in_time() -> bool:
        return deadline is None or time.perf_counter() < deadline

    # Builds are cheap and forward passes are not: one forward first, then every build, then other forwards.
    forward_set = sorted(forward.targets(max_n, max_m))
    order = sorted(((i, j) for i in range(max_n) for j in range(max_m)), key=lambda t: t not in forward_set[:1])
    results = {}
    for i, j in order:
        check = in_time()
        results[i, j] = patch_target(
            feature, family, i, j, build=build and check, forward=check and (i, j) in forward_set[:1]
        )
        if on_target is not None:
            on_target()
    for i, j in forward_set[1:]:
        if results[i, j].built is not False and in_time():
            checked = patch_target(feature, family, i, j, build=False, forward=True)
            results[i, j] = dataclasses.replace(results[i, j], forward_ok=checked.forward_ok, error=checked.error)
    user = count_code_lines(feature.user_code)
    impl = modifier_lines(modifier_config(feature))
    points = []
    for n, m in sizes:
        chosen = [results[i, j] for i in range(n) for j in range(m)]
        built = [r for r in chosen if r.built is not None]
        checked = [r for r in chosen if r.forward_ok is not None]
        points.append(
            PatchPoint(
                feature=feature.name,
                family=family.name,
                n=n,
                m=m,
                user_lines=user,
                modifier_lines=impl,
                paths_changed=sum(r.paths_changed for r in chosen),
                layers_changed=sum(r.layers_changed for r in chosen),
                layers_touched=sum(r.layers_touched for r in chosen),
                built=sum(bool(r.built) for r in built),
                build_checked=len(built),
                forward_ok=sum(bool(r.forward_ok) for r in checked),
                forward_checked=len(checked),
                failures=tuple(f"{r.target}: {r.error}" for r in chosen if r.error),
            )
        )
    return FamilySweep(feature.name, family.name, tuple(points), tuple(results[t] for t in sorted(results)))


# ----------------------------------------------------------------------------------------------------
# The generated baseline.


@dataclass(frozen=True)
class BaselinePoint:
    """The generated copy-per-class library with n models x m variants, measured by history mode."""

    feature: str
    n: int
    m: int
    integration_loc: int
    implementation_loc: int
    modules_affected: int
    classes_touched: int
    functions_touched: int

    @property
    def targets(self) -> int:
        return self.n * self.m


_COMMON = '''\
"""Shared pieces of the generated model-per-file library."""

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass
class ModelConfig:
    dim: int = 64
    hidden: int = 256
    attention: str = "variant_0"
{fields}

def dense(key, fan_in, fan_out):
    return jax.random.normal(key, (fan_in, fan_out)) / jnp.sqrt(fan_in)


def softmax(x):
    return jax.nn.softmax(x, axis=-1)
'''

_ATTENTION = '''

class Model{i}Attention{j}:
    """Attention variant {j}, copied into model {i}."""

    def __init__(self, config, key):
        self.config = config
        self.qkv = dense(key, config.dim, 3 * config.dim)
        self.out = dense(key, config.dim, config.dim){init}

    def __call__(self, x, positions):
        q, k, v = jnp.split(x @ self.qkv, 3, axis=-1){call}
        scores = q @ k.swapaxes(-1, -2) / {scale}
        return softmax(scores) @ v @ self.out
'''

_MODEL = """

class Model{i}FeedForward:
    def __init__(self, config, key):
        self.up = dense(key, config.dim, config.hidden)
        self.down = dense(key, config.hidden, config.dim)

    def __call__(self, x):
        return jnp.maximum(x @ self.up, 0) @ self.down


class Model{i}:
    def __init__(self, config, key):
        self.attention = ATTENTION_CLASSES[config.attention](config, key)
        self.feed_forward = Model{i}FeedForward(config, key){init}

    def __call__(self, x, positions):{call}
        x = x + self.attention(x, positions)
        return x + self.feed_forward(x)


ATTENTION_CLASSES = {{
{table}
}}
"""


def _identifier(name: str) -> str:
    return re.sub(r"\W", "_", name).strip("_").lower() or "feature"


def baseline_files(n: int, m: int, feature: str | None = None, *, variants: bool, models: bool) -> dict[str, str]:
    """The generated library with n models x m attention variants, with `feature` added inline when given."""
    f = _identifier(feature) if feature else None
    field = f"    {f}: dict | None = None\n" if f else ""
    files = {"common.py": _COMMON.format(fields=field)}
    edit_init = f"\n        self.{f} = config.{f}" if f else ""
    for i in range(n):
        imports = "import jax.numpy as jnp\n\nfrom common import dense, softmax\n"
        if f and (variants or models):
            imports += f"from features.{f} import apply_{f}\n"
        parts = [f'"""Model {i}: its own copy of every attention variant."""\n\n{imports}']
        for j in range(m):
            call = f"\n        q, k, v = apply_{f}((q, k, v), positions, self.{f})" if f and variants else ""
            parts.append(_ATTENTION.format(i=i, j=j, init=edit_init if variants else "", call=call, scale=f"{j + 1}.0"))
        table = "\n".join(f'    "variant_{j}": Model{i}Attention{j},' for j in range(m))
        call = f"\n        x = apply_{f}(x, positions, self.{f})" if f and models else ""
        parts.append(_MODEL.format(i=i, init=edit_init if models else "", call=call, table=table))
        files[f"models/model_{i}.py"] = "".join(parts)
    if f:
        files[f"features/{f}.py"] = (
            f'"""{feature}: the shared implementation each edited class calls."""\n\n\n'
            f"def apply_{f}(x, positions, config):\n    if config is None:\n        return x\n    return x\n"
        )
    return files


def _git(root: Path, *args: str) -> str:
    command = ["git", "-C", str(root), "-c", "user.name=axmini", "-c", "user.email=axmini@localhost"]
    command += ["-c", "commit.gpgsign=false", "-c", "core.hooksPath=/dev/null"]
    return subprocess.run([*command, *args], check=True, capture_output=True, text=True).stdout


def _commit_tree(root: Path, files: Mapping[str, str], message: str) -> str:
    for path in list(root.rglob("*.py")):
        path.unlink()
    for path, text in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    _git(root, "add", "-A")
    _git(root, "commit", "-q", "--allow-empty", "-m", message)
    return _git(root, "rev-parse", "HEAD").strip()


def baseline_sweep(
    feature: str, sizes: Sequence[tuple[int, int]], *, variants: bool, models: bool, workdir: Path | None = None
) -> list[BaselinePoint]:
    """Generates the library before and after adding `feature` for each size and measures it with history mode.

    Every size lives in its own directory (`NxM/`) of one scratch repository; one commit holds all of them
    before, the next after, and each size is measured on its directory. `variants` / `models`: whether the
    feature edits every attention-variant class / every model class (in axmini: whether it changed configs
    inside / outside the family's variant slot).
    """

    def tree(name: str | None) -> dict[str, str]:
        return {
            f"{n}x{m}/{path}": text
            for n, m in sizes
            for path, text in baseline_files(n, m, name, variants=variants, models=models).items()
        }

    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        root = Path(tmp)
        _git(root, "init", "-q")
        base = _commit_tree(root, tree(None), "base")
        head = _commit_tree(root, tree(feature), feature)
        repo, points = Repository(root), []
        for n, m in sizes:
            stats = measure_change(repo, f"{base}..{head}", label=feature, targets=n * m, paths=[f"{n}x{m}/"])
            points.append(
                BaselinePoint(
                    feature=feature,
                    n=n,
                    m=m,
                    integration_loc=stats.integration_loc,
                    implementation_loc=stats.implementation_loc,
                    modules_affected=len(stats.modules_affected),
                    classes_touched=len(stats.classes_touched),
                    functions_touched=len(stats.functions_touched),
                )
            )
    return points


def baseline_complexity(points: Sequence[BaselinePoint]) -> Complexity:
    return fit_complexity([(p.n, p.m, p.integration_loc) for p in points])


# ----------------------------------------------------------------------------------------------------
# axmini's own target families.


def experiment_family() -> Family:
    """Every registered named experiment, as N models with one variant each, smallest config first.

    (The order makes the first N the cheapest to build, which matters when checks run out of time.)
    """
    import experiments

    sizes = {name: len(experiments.get(name).debug_string()) for name in experiments.names()}
    if not sizes:
        raise FamilyUnavailableError("no named experiments are registered")
    return Family(
        "experiments",
        [(name, functools.partial(experiments.get, name)) for name in sorted(sizes, key=lambda n: (sizes[n], n))],
        note="every registered named experiment, smallest config first (the first N are the N smallest)",
    )


def materialize(cfg: ConfigBase, seed: int = 0) -> nnx.Module:
    """The model of `cfg` with small random parameters drawn by numpy into its abstract shapes.

    Building a model for real compiles its initializers (seconds per config on CPU); a forward check only
    needs parameters of the right shapes and dtypes, so the abstract model is filled instead.
    """
    graphdef, state = nnx.split(build_abstract(cfg.clone()))
    rng = np.random.default_rng(seed)

    def fill(leaf: Any) -> Any:
        if not isinstance(leaf, jax.ShapeDtypeStruct):
            return leaf
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            return jax.random.split(jax.random.key(seed), leaf.shape) if leaf.shape else jax.random.key(seed)
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            return jnp.asarray(0.1 * rng.standard_normal(leaf.shape), leaf.dtype)
        return jnp.zeros(leaf.shape, leaf.dtype)

    return nnx.merge(graphdef, jax.tree.map(fill, state))


def decoder_forward_check(cfg: ConfigBase) -> None:
    """Runs `forward` of the (materialized) decoder on 8 tokens; raises unless the logits are finite."""
    output = materialize(cfg).forward(jnp.ones((1, 8), jnp.int32))
    logits = getattr(output, "logits", output)
    if not np.isfinite(np.asarray(logits)).all():
        raise ValueError("non-finite logits")


ATTENTION_KNOBS = ("multi-query", "window", "qk-norm", "softcap", "fused-qkv")


def synthetic_family(num_models: int = 20, num_variants: int = 10) -> Family:
    """The paper's setting at tiny size: `num_models` decoders x `num_variants` attention variants.

    Model i is `experiments.decoders.tiny_decoder()` with 8 layers (so 3:1 layer patterns and 5:3 KV-sharing
    splits fit) and without positional encoding (so adding RoPE changes something), with feed-forward activation
    i mod 5, LayerNorm instead of RMSNorm when (i // 5) is odd, and
    hidden width 32 * (1 + i // 10). Variant j sets the attention knobs of the bits of j, in the order of
    `ATTENTION_KNOBS` (multi-query, sliding window 4, qk RMSNorm, logit softcap 30, fused QKV weight).
    """
    try:
        from axmini.layers.attention import Attention, FusedQKVProjection
        from axmini.layers.feed_forward import FeedForward, FeedForwardActivation
        from axmini.layers.norm import LayerNorm, RMSNorm
        from axmini.layers.position import RoPEProjection
        from axmini.layers.transformer import BaseStack
        from experiments.decoders import tiny_decoder
    except ImportError as e:
        raise FamilyUnavailableError(f"synthetic family needs the decoder layers: {e}") from None
    if num_variants > 2 ** len(ATTENTION_KNOBS):
        raise ValueError(f"at most {2 ** len(ATTENTION_KNOBS)} attention variants, got {num_variants}")
    activations = list(FeedForwardActivation)

    def is_a(base: type) -> Callable[[ConfigBase], bool]:
        return lambda c: _is_subclass(getattr(c, "klass", None), base)

    base = map_configs(tiny_decoder(), is_a(RoPEProjection), lambda c: c.inner)
    base = map_configs(base, is_a(BaseStack), lambda c: c.set(num_layers=8))

    @functools.cache
    def build_model(i: int) -> ConfigBase:
        ff = dict(activation=activations[i % len(activations)], hidden_dim=32 * (1 + i // 10))
        cfg = map_configs(base, is_a(FeedForward), lambda c: c.set(**ff))
        if (i // 5) % 2:
            cfg = replace_config(cfg, target=RMSNorm, new=LayerNorm.default_config())
        return cfg

    def model(i: int) -> ConfigBase:
        return build_model(i).clone()  # Built once; every target gets its own copy.

    def variant(j: int) -> Rewrite:
        knobs = {
            "multi-query": dict(num_kv_heads=1),
            "window": dict(sliding_window=4),
            "qk-norm": dict(qk_norm=RMSNorm.default_config()),
            "softcap": dict(logit_softcap=30.0),
            "fused-qkv": dict(input_linear=FusedQKVProjection.default_config()),
        }
        chosen = [name for bit, name in enumerate(ATTENTION_KNOBS) if j >> bit & 1]
        values = {k: v for name in chosen for k, v in knobs[name].items()}
        return lambda cfg: map_configs(cfg, is_a(Attention), lambda c: c.set(**values))

    def variant_name(j: int) -> str:
        return "+".join(name for bit, name in enumerate(ATTENTION_KNOBS) if j >> bit & 1) or "full"

    return Family(
        "synthetic",
        [(f"model{i}", functools.partial(model, i)) for i in range(num_models)],
        [(variant_name(j), variant(j)) for j in range(num_variants)],
        variant_slot=is_a(Attention),
        forward_check=decoder_forward_check,
        note=inspect.getdoc(synthetic_family).split("\n\n", 1)[1].replace("\n", " "),
    )


def to_json(value: Any) -> Any:
    """Plain data for report.json (dataclasses become dicts, with derived `targets` where they have it)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        data = {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if hasattr(value, "targets") and "targets" not in data:
            data["targets"] = value.targets
        return data
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    return value
