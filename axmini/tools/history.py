"""History mode: what one change in any git repository cost, sorted by code structure.

A change is a revision against its first parent (`C`, or `C^!`), or the tree of B against that of A (`A..B`), or
B against the merge base of A and B (`A...B`). Only the counted files (`axmini.tools.loc`: code, config, script)
are diffed, and their changed code lines are sorted:

- *implementation*: the code lines of new code files (a file that existed with no code line, an empty
  placeholder, is new), and, in existing Python files, the lines of top-level classes and functions that did not
  exist before: a new class is implementation wherever it lands;
- *integration*: the other code lines added to existing code files: lines inside existing definitions and
  module-level wiring (imports, registrations); a changed line counts once, as added. Definitions of other
  languages are not parsed, so there every line added to an existing file is integration;
- *deleted*: code lines removed (of every counted kind), reported apart: deleting duplicated code is not a cost;
- *renamed*: files moved (lines changed in them count as above);
- *config* and *script*: code lines added to config files and shell scripts, each its own class;
- *models touched*: the model definitions with a changed line, where a repository names its models by globs
  (`model_unit`): "integration LoC per model" is integration divided by this count.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from axmini.tools.git import Repository
from axmini.tools.loc import COUNTED_KINDS, Symbol, classify_path, code_lines, python_symbols, symbols_touching


def resolve(repo: Repository, rev: str) -> tuple[str, str]:
    """(base, head) commit ids of `C` / `C^!` (against its first parent; a root commit against the empty tree),
    `A..B` or `A...B`. Raises UnknownRevisionError."""
    if "..." in rev:
        a, b = (repo.commit_id(x or "HEAD") for x in rev.split("...", 1))
        return repo.git("merge-base", a, b).strip(), b
    if ".." in rev:
        a, b = rev.split("..", 1)
        return repo.commit_id(a or "HEAD"), repo.commit_id(b or "HEAD")
    (commit,) = repo.commits([repo.commit_id(rev.removesuffix("^!"))])
    return (commit.parents[0] if commit.parents else repo.empty_tree()), commit.id


@functools.cache
def _glob_regex(pattern: str) -> re.Pattern[str]:
    """A glob as a regex whose group 1 is the model unit: a trailing `/**` (any files below) ends the unit;
    elsewhere `**/` is any directories, `*` part of one path segment, `?` one character, `{a,b}` alternatives."""
    head, deep = (pattern[:-2], True) if pattern.endswith("/**") else (pattern, False)
    out, i = "", 0
    while i < len(head):
        if head.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif head[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif head[i] == "?":
            out, i = out + "[^/]", i + 1
        elif head[i] == "{" and "}" in head[i:]:
            end = head.index("}", i)
            out, i = out + "(?:" + "|".join(map(re.escape, head[i + 1 : end].split(","))) + ")", end + 1
        else:
            out, i = out + re.escape(head[i]), i + 1
    return re.compile(f"({out})" + (".+" if deep else ""))


def model_unit(path: str, patterns: Sequence[str]) -> str | None:
    """The model definition a file belongs to: what the first matching glob matched up to a trailing `/**`
    (`models/*/**` makes each `models/NAME/` one unit; `**/configs/*.yml` makes each file one)."""
    for pattern in patterns:
        match = _glob_regex(pattern).fullmatch(path)
        if match:
            return match[1]
    return None


@dataclass(frozen=True)
class ChangeStats:
    """The measured cost of one change (definitions in the module docstring).

    Paths are those of counted files; `excluded_files` are the changed tests, docs and data, never counted nor
    diffed. Definitions are `path::Qualified.name`: `definitions_new` the new top-level ones (implementation),
    `classes_touched` / `functions_touched` the existing ones with a changed line.
    """

    implementation_loc: int = 0
    integration_loc: int = 0
    deleted_loc: int = 0
    config_loc: int = 0
    script_loc: int = 0
    files_new: tuple[str, ...] = ()
    files_modified: tuple[str, ...] = ()
    files_deleted: tuple[str, ...] = ()
    files_renamed: tuple[str, ...] = ()  # "old -> new"
    excluded_files: tuple[tuple[str, str], ...] = ()  # (path, kind)
    definitions_new: tuple[str, ...] = ()
    classes_touched: tuple[str, ...] = ()
    functions_touched: tuple[str, ...] = ()
    modules_affected: tuple[str, ...] = ()  # existing code files with an integration line
    models_touched: tuple[str, ...] = ()

    def combine(self, other: ChangeStats) -> ChangeStats:
        """Both changes together (line counts add; file, definition and model sets unite)."""
        merged: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            merged[f.name] = a + b if isinstance(a, int) else tuple(sorted(set(a) | set(b)))
        return ChangeStats(**merged)

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["excluded_files"] = [list(x) for x in self.excluded_files]
        return data


def _top_level(symbols: Sequence[Symbol]) -> dict[tuple[str, str], Symbol]:
    return {(s.name, s.kind): s for s in symbols if "." not in s.name}


def measure_change(
    repo: Repository, base: str, head: str, *, model_globs: Sequence[str] = (), paths: Sequence[str] = ()
) -> ChangeStats:
    """The cost of the change from `base` to `head` (commit or tree ids), sorted by code structure.

    `model_globs` name the repository's model definitions (`model_unit`); `paths`, when given, are the path
    prefixes that are measured (the rest of the change is ignored).
    """
    changed = [p for p in repo.changed_paths(base, head) if not paths or p.startswith(tuple(paths))]
    counted_paths = [p for p in changed if classify_path(p) in COUNTED_KINDS]
    changes = [c for c in repo.changes(base, head, counted_paths) if not c.binary]
    specs = [
        (f"{base}:{c.old_path}" if c.old_path else "", f"{head}:{c.new_path}" if c.new_path else "") for c in changes
    ]
    blobs = iter(repo.read_blobs([s for pair in specs for s in pair if s]))
    texts = [(next(blobs) if old else None, next(blobs) if new else None) for old, new in specs]

    counts = dict(implementation_loc=0, integration_loc=0, deleted_loc=0, config_loc=0, script_loc=0)
    files: dict[str, list[str]] = {k: [] for k in ("new", "modified", "deleted", "renamed", "affected")}
    definitions_new, classes, functions, models = set(), set(), set(), set()
    for c, (old_text, new_text) in zip(changes, texts):
        kind = classify_path(c.path)
        old_code = code_lines(old_text, c.old_path) if old_text is not None else set()
        new_code = code_lines(new_text, c.new_path) if new_text is not None else set()
        added = [n for n in c.added if n in new_code]
        deleted = [n for n in c.deleted if n in old_code]
        counts["deleted_loc"] += len(deleted)
        if added or deleted:
            unit = model_unit(c.path, model_globs)
            if unit is not None:
                models.add(unit)
        if c.status == "R":
            files["renamed"].append(f"{c.old_path} -> {c.new_path}")
        if kind != "code":
            counts[f"{kind}_loc"] += len(added)
            continue
        if c.status == "D":
            files["deleted"].append(c.path)
            continue
        is_python = c.path.endswith((".py", ".pyi"))
        new_symbols = python_symbols(new_text) if is_python and new_text else []
        if c.status in "AC" or not old_code:  # A new file, or an empty placeholder: all implementation.
            counts["implementation_loc"] += len(new_code)
            files["new"].append(c.path)
            definitions_new |= {f"{c.path}::{name}" for name, _ in _top_level(new_symbols)}
            continue
        files["modified"].append(c.path)
        old_symbols = python_symbols(old_text) if is_python and old_text else []
        old_top = _top_level(old_symbols)
        new_defs = [s for key, s in _top_level(new_symbols).items() if key not in old_top]
        definitions_new |= {f"{c.path}::{s.name}" for s in new_defs}
        implementation = [n for n in added if any(s.start <= n <= s.end for s in new_defs)]
        integration = [n for n in added if n not in implementation]
        counts["implementation_loc"] += len(implementation)
        counts["integration_loc"] += len(integration)
        if integration or deleted:
            files["affected"].append(c.path)
        new_names = {s.name for s in new_defs}
        touched = symbols_touching(new_symbols, integration) | symbols_touching(old_symbols, deleted)
        for s in touched:
            if s.name.split(".", 1)[0] not in new_names:
                (classes if s.kind == "class" else functions).add(f"{c.path}::{s.name}")
    counted = {c.path for c in changes} | {c.old_path for c in changes if c.old_path}
    return ChangeStats(
        **counts,
        files_new=tuple(sorted(files["new"])),
        files_modified=tuple(sorted(files["modified"])),
        files_deleted=tuple(sorted(files["deleted"])),
        files_renamed=tuple(sorted(files["renamed"])),
        excluded_files=tuple(sorted((p, classify_path(p)) for p in changed if p not in counted)),
        definitions_new=tuple(sorted(definitions_new)),
        classes_touched=tuple(sorted(classes)),
        functions_touched=tuple(sorted(functions)),
        modules_affected=tuple(sorted(files["affected"])),
        models_touched=tuple(sorted(models)),
    )
