"""The generated baseline ("other systems"): the same feature added to a copy-per-class model library.

For a synthetic family of N models x M attention variants we generate the Python source of a model-per-file
library, in the style of libraries that give each model its own copy of every attention variant: `common.py` (a
shared config dataclass and helpers) and, per model i, `models/model_i.py` with classes `Model{i}Attention{j}`
(one per variant j: `__init__` and `__call__`), `Model{i}FeedForward` and `Model{i}`. Adding feature `f` there is
generated as the smallest inline edit we could write: a new file `features/f.py` holding `apply_f`
(implementation), one config field `f` in `common.py`, and in every model file one import line plus, for each
edited class, one line in `__init__` (`self.f = config.f`) and one in `__call__` (the call of `apply_f`). The
edited classes follow what the feature changed in axmini: if it changed configs inside the family's variant slot
(e.g. the attention), every `Model{i}Attention{j}` is edited; if it changed configs outside it, every `Model{i}`.
Both versions (every size in its own `NxM/` directory) are committed to a scratch git repository and measured by
history mode (`axmini.tools.history`), so both sides use the same counting rules. Real libraries need more lines
per class (and so grow faster): the baseline is a lower bound, and its growth, not its constant, is the point.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from axmini.tools.fit import Complexity, fit_complexity
from axmini.tools.git import Repository
from axmini.tools.history import measure_change


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
            stats = measure_change(repo, base, head, paths=[f"{n}x{m}/"])
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
