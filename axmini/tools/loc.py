"""Counting rules for the modularity tools: which lines are code, which files count and as what.

- A *code line* is a line that holds at least one program token. Blank lines, comment lines and Python docstrings
  are not code; a line of a multi-line string that is not a docstring is. Python is tokenized with `tokenize` and
  docstrings found with `ast`, so strings holding `#` and code beside a comment are classified correctly.
- Every repository file is of one kind (`classify_path`): *code* (source files, `CODE_EXTENSIONS`, and build files
  such as `Makefile`), *config* (YAML, TOML, JSON, INI), *script* (shell), each counted in its own class; or
  *test* (a `tests/` or `test/` directory, `test_*.py`, `*_test.py`, `conftest.py`), *doc* (`docs/`, `*.md`,
  `*.rst`, `*.txt`, README/LICENSE) and *data* (`golden/`, `testdata/`, `fixtures/` directories, and every other
  file), which are reported but never counted, and never diffed.
- Python definitions (`python_symbols`) are read with `ast`: what `axmini.tools.history` sorts changes by.
"""

from __future__ import annotations

import ast
import io
import tokenize
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

CODE_EXTENSIONS = frozenset(
    ".py .pyi .pyx .c .cc .cpp .cxx .h .hh .hpp .cu .cuh .rs .go .java .scala .kt .js .jsx .ts .tsx .swift .m .mm "
    ".jl .proto .bzl".split()
)
CONFIG_EXTENSIONS = frozenset(".yaml .yml .toml .json .cfg .ini".split())
SCRIPT_EXTENSIONS = frozenset(".sh .bash .zsh".split())
COUNTED_KINDS = ("code", "config", "script")
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
    """The kind of a repository file: "code", "config", "script" (counted), or "test", "doc", "data"."""
    p = PurePosixPath(path)
    dirs = {part.lower() for part in p.parts[:-1]}
    name, suffix = p.name, p.suffix.lower()
    if dirs & DATA_DIRS:
        return "data"
    if dirs & TEST_DIRS or name == "conftest.py" or (suffix == ".py" and name.startswith("test_")):
        return "test"
    if p.stem.endswith("_test") and suffix in CODE_EXTENSIONS | SCRIPT_EXTENSIONS:
        return "test"
    if name in BUILD_FILE_NAMES:
        return "code"
    if dirs & DOC_DIRS or suffix in DOC_EXTENSIONS or name.upper().startswith(DOC_NAMES):
        return "doc"
    for kind, extensions in (("code", CODE_EXTENSIONS), ("config", CONFIG_EXTENSIONS), ("script", SCRIPT_EXTENSIONS)):
        if suffix in extensions:
            return kind
    return "data"


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
