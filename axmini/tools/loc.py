"""Counting rules for the modularity report: which lines are code, which files count, what a change touches.

Definitions used throughout `axmini.tools`:

- A *feature integration* is a change that gives one capability (RoPE, MoE, ...) to a set of *targets*: models,
  experiments, layer variants.
- Its *implementation* is the code it adds in files that did not exist before the change (the new module that
  holds the feature). Its *integration cost* is the code lines added plus the code lines deleted in files that
  did exist before (the edits every existing place needs so the feature reaches it).
- A *code line* is a line of a counted file that holds at least one program token. Blank lines, comment lines
  and Python docstrings are not code; a line of a multi-line string that is not a docstring is. Python is
  tokenized with `tokenize` and docstrings found with `ast`, so strings holding `#` and code on the same line as
  a comment are classified correctly.
- Counted files are source files (`CODE_EXTENSIONS`, or a build file such as `Makefile`). Tests (a `tests/` or
  `test/` directory, `test_*.py`, `*_test.py`, `conftest.py`), documentation (`docs/`, `*.md`, `*.rst`,
  `*.txt`, README/LICENSE) and golden or fixture data (`golden/`, `testdata/`, `fixtures/` directories, and
  every non-source file such as `*.json`) are reported but never counted.
- *LoC-complexity* is how the integration cost grows with the number of targets: a least-squares fit of
  log(cost) against log(N) (and log(M) when a second dimension varies), classified by the rounded slopes as
  O(1), O(N), O(N*M), ... with the fitted slopes shown next to the class.
"""

from __future__ import annotations

import ast
import io
import math
import tokenize
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

import numpy as np

CODE_EXTENSIONS = frozenset(
    ".py .pyi .pyx .c .cc .cpp .cxx .h .hh .hpp .cu .cuh .rs .go .java .scala .kt .js .jsx .ts .tsx .swift .m .mm "
    ".jl .sh .bash .proto .bzl .yaml .yml .toml .cfg .ini".split()
)
BUILD_FILE_NAMES = frozenset({"Makefile", "BUILD", "WORKSPACE", "Dockerfile", "CMakeLists.txt"})
DOC_EXTENSIONS = frozenset({".md", ".rst", ".txt", ".adoc", ".tex"})
DOC_NAMES = ("README", "LICENSE", "CHANGELOG", "CONTRIBUTING", "NOTICE", "AUTHORS")
TEST_DIRS = frozenset({"tests", "test"})
DATA_DIRS = frozenset({"golden", "goldens", "testdata", "test_data", "fixtures"})
DOC_DIRS = frozenset({"docs", "doc"})
_LINE_COMMENT = {
    ".c": "//", ".cc": "//", ".cpp": "//", ".cxx": "//", ".h": "//", ".hh": "//", ".hpp": "//", ".cu": "//",
    ".cuh": "//", ".rs": "//", ".go": "//", ".java": "//", ".scala": "//", ".kt": "//", ".js": "//", ".jsx": "//",
    ".ts": "//", ".tsx": "//", ".swift": "//", ".m": "//", ".mm": "//", ".proto": "//", ".ini": ";",
}  # fmt: skip
_BLOCK_COMMENT_EXTENSIONS = frozenset(ext for ext, prefix in _LINE_COMMENT.items() if prefix == "//")


def classify_path(path: str) -> str:
    """The kind of a repository file: "code" (counted), or "test", "doc", "data" (reported, not counted)."""
    p = PurePosixPath(path)
    dirs = {part.lower() for part in p.parts[:-1]}
    name, suffix = p.name, p.suffix.lower()
    if dirs & DATA_DIRS:
        return "data"
    if dirs & TEST_DIRS or name == "conftest.py" or (suffix == ".py" and name.startswith("test_")):
        return "test"
    if p.stem.endswith("_test") and suffix in CODE_EXTENSIONS:
        return "test"
    if name in BUILD_FILE_NAMES:
        return "code"
    if dirs & DOC_DIRS or suffix in DOC_EXTENSIONS or name.upper().startswith(DOC_NAMES):
        return "doc"
    return "code" if suffix in CODE_EXTENSIONS else "data"


# ----------------------------------------------------------------------------------------------------
# Code lines.


def _docstring_nodes(tree: ast.AST) -> list[ast.Constant]:
    nodes = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                if isinstance(first.value.value, str):
                    nodes.append(first.value)
    return nodes


def _python_code_lines(text: str) -> set[int] | None:
    """Line numbers (1-based) holding a program token that is not part of a docstring; None if untokenizable."""
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
        tree = ast.parse(text)
    except (tokenize.TokenError, SyntaxError, ValueError):
        return None
    docstrings = [((n.lineno, n.col_offset), (n.end_lineno, n.end_col_offset)) for n in _docstring_nodes(tree)]
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}
    skip.add(tokenize.ENCODING)
    lines: set[int] = set()
    for tok in tokens:
        if tok.type in skip:
            continue
        if tok.type == tokenize.STRING and any(start <= tok.start and tok.end <= end for start, end in docstrings):
            continue
        lines.update(range(tok.start[0], tok.end[0] + 1))
    return lines


def _generic_code_lines(text: str, suffix: str) -> set[int]:
    """Non-blank lines not starting with the language's line comment; C-style /* */ blocks are skipped."""
    prefix = _LINE_COMMENT.get(suffix, "#")
    block = suffix in _BLOCK_COMMENT_EXTENSIONS
    lines, in_block = set(), False
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if in_block:
            if "*/" not in stripped:
                continue
            in_block, stripped = False, stripped.split("*/", 1)[1].strip()
        if block and stripped.startswith("/*"):
            rest = stripped[2:]
            if "*/" not in rest:
                in_block = True
                continue
            stripped = rest.split("*/", 1)[1].strip()
        if stripped and not stripped.startswith(prefix):
            lines.add(number)
    return lines


def code_lines(text: str, path: str = "x.py") -> set[int]:
    """The 1-based numbers of the code lines of a file's `text` (the language is taken from `path`)."""
    suffix = PurePosixPath(path).suffix.lower()
    if suffix in (".py", ".pyi"):
        lines = _python_code_lines(text)
        if lines is not None:
            return lines
    return _generic_code_lines(text, suffix)


def count_code_lines(text: str, path: str = "x.py") -> int:
    """How many code lines `text` has (Python by default: used for snippets a user writes)."""
    return len(code_lines(text, path))


# ----------------------------------------------------------------------------------------------------
# AST facts.


@dataclass(frozen=True)
class Symbol:
    """A class or function definition: dotted qualified name within its module, kind and line span."""

    name: str
    kind: str  # "class" or "function"
    start: int  # first line, decorators included
    end: int


def python_symbols(text: str) -> list[Symbol]:
    """Every class and function defined in Python `text` (nested ones as `Outer.inner`); [] if it does not parse."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    symbols: list[Symbol] = []

    def walk(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                start = min([child.lineno] + [d.lineno for d in child.decorator_list])
                kind = "class" if isinstance(child, ast.ClassDef) else "function"
                symbols.append(Symbol(name, kind, start, child.end_lineno or child.lineno))
                walk(child, f"{name}.")
            else:
                walk(child, prefix)

    walk(tree, "")
    return symbols


def symbols_touching(symbols: Sequence[Symbol], lines: Iterable[int]) -> set[Symbol]:
    """The symbols whose span holds at least one of `lines` (a changed method touches its class too)."""
    lines = sorted(set(lines))
    return {s for s in symbols if any(s.start <= line <= s.end for line in lines)}


# ----------------------------------------------------------------------------------------------------
# LoC-complexity.


@dataclass(frozen=True)
class Complexity:
    """A fitted growth law: cost ~ N**slope_n * M**slope_m; `label` is the rounded class, e.g. "O(N*M)"."""

    label: str
    slope_n: float | None
    slope_m: float | None
    points: int

    def describe(self) -> str:
        pairs = (("slope_N", self.slope_n), ("slope_M", self.slope_m))
        slopes = [f"{axis}={s + 0.0 if abs(s) >= 0.005 else 0.0:.2f}" for axis, s in pairs if s is not None]
        return f"{self.label} ({', '.join(slopes)})" if slopes else self.label


def _order(axis: str, exponent: int) -> str:
    return "" if exponent == 0 else axis if exponent == 1 else f"{axis}^{exponent}"


def fit_complexity(points: Sequence[tuple[int, int, float]]) -> Complexity:
    """Fits log(cost) = a + b*log(N) + c*log(M) by least squares over `points` = (N, M, cost).

    A cost of 0 is fitted as 1 (the log of nothing is undefined; constant zero is still O(1)). An axis that
    does not vary is left out of the fit. Each slope is rounded to the nearest integer exponent (|slope| < 0.5
    is constant), giving O(1), O(N), O(N*M), O(N^2), ...
    """
    if not points:
        return Complexity("n/a", None, None, 0)
    ns = np.array([p[0] for p in points], dtype=float)
    ms = np.array([p[1] for p in points], dtype=float)
    costs = np.array([max(float(p[2]), 1.0) for p in points])
    if np.any(ns <= 0) or np.any(ms <= 0):
        raise ValueError(f"fit_complexity: target counts must be positive, got points {list(points)}")
    columns, axes = [np.ones_like(ns)], []
    for axis, values in (("N", ns), ("M", ms)):
        if len(set(values.tolist())) > 1:
            columns.append(np.log(values))
            axes.append(axis)
    if not axes:
        return Complexity("n/a (one target count)", None, None, len(points))
    coeffs, *_ = np.linalg.lstsq(np.stack(columns, axis=1), np.log(costs), rcond=None)
    slopes = dict(zip(axes, (float(c) for c in coeffs[1:])))
    parts = [_order(axis, math.floor(abs(s) + 0.5) * (1 if s >= 0 else -1)) for axis, s in slopes.items()]
    parts = [p for p in parts if p]
    label = f"O({'*'.join(parts)})" if parts else "O(1)"
    return Complexity(label, slopes.get("N"), slopes.get("M"), len(points))
