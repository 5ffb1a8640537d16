"""History mode: the implementation and integration cost of feature commits in any local git repository.

Input is a list of labelled revisions, usually read from a text file, one per line::

    # label       revision or range       [targets]
    rope          3f2c1ab                 8
    rope          v1.2..v1.3              16
    moe           main~4..main~2

Fields are separated by tabs or spaces; `#` starts a comment. A single revision means "that commit against its
first parent" (a root commit against the empty tree); `A..B` means the tree of B against the tree of A; `A...B`
means B against the merge base of A and B. The optional third field is the number of targets (models,
experiments, variants) the change integrates the feature into; lines with the same label and target count are
added up (a feature integrated over several commits), and the points of one label form the series whose
LoC-complexity is fitted. Counting rules (code lines, which files count, implementation vs integration) are those
of `axmini.tools.loc`. Class and function facts come from parsing each Python file before and after with `ast`.

`git` is run via subprocess; nothing here depends on the repository being axmini.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from axmini.tools.loc import Complexity, classify_path, code_lines, fit_complexity, python_symbols, symbols_touching


class GitError(RuntimeError):
    """A git command failed for a reason other than bad user input."""


class NotAGitRepositoryError(ValueError):
    """The given path is not inside a git work tree."""


class UnknownRevisionError(ValueError):
    """A revision that the repository does not have."""


class CommitsFileError(ValueError):
    """A malformed line in a commits file."""


@dataclass(frozen=True)
class HistoryEntry:
    """One line of a commits file: a feature label, a revision or range, and optionally the number of targets."""

    label: str
    rev: str
    targets: int | None = None
    where: str = ""  # "file:line", for error messages


def parse_commit_lines(text: str, source: str = "<commits>") -> list[HistoryEntry]:
    """Parses commits-file text (format in the module docstring)."""
    entries = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        where = f"{source}:{number}"
        if len(fields) not in (2, 3):
            raise CommitsFileError(f"{where}: expected 'label<TAB>rev-or-range[<TAB>targets]', got {raw.strip()!r}")
        targets = None
        if len(fields) == 3:
            if not fields[2].isdigit() or int(fields[2]) < 1:
                raise CommitsFileError(f"{where}: targets must be a positive integer, got {fields[2]!r}")
            targets = int(fields[2])
        entries.append(HistoryEntry(fields[0], fields[1], targets, where))
    if not entries:
        raise CommitsFileError(f"{source}: no 'label<TAB>rev-or-range' lines found")
    return entries


def parse_commits_file(path: str | Path) -> list[HistoryEntry]:
    """Reads a commits file; a missing file is a CommitsFileError."""
    path = Path(path)
    if not path.is_file():
        raise CommitsFileError(f"commits file {str(path)!r} does not exist")
    return parse_commit_lines(path.read_text(), str(path))


@dataclass(frozen=True)
class FileChange:
    """One file of a diff: status letter (A, D, M, R, T, C), paths, and the changed line numbers."""

    status: str
    old_path: str | None
    new_path: str | None
    deleted: tuple[int, ...] = ()  # line numbers in the old file
    added: tuple[int, ...] = ()  # line numbers in the new file
    binary: bool = False

    @property
    def path(self) -> str:
        return self.new_path or self.old_path or ""


_HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")


def _hunk_lines(start: str, count: str | None) -> range:
    n = 1 if count is None else int(count)
    return range(int(start), int(start) + n)


class Repository:
    """A local git repository, read through the `git` command line."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_dir():
            raise NotAGitRepositoryError(f"repository path {str(path)!r} is not a directory")
        try:
            self.root = Path(self._run(["-C", str(path), "rev-parse", "--show-toplevel"]).strip())
        except GitError:
            raise NotAGitRepositoryError(f"{str(path)!r} is not a git repository (git rev-parse failed)") from None
        self._empty_tree: str | None = None

    @staticmethod
    def _run(args: Sequence[str], *, stdin: str | None = None) -> str:
        result = subprocess.run(
            ["git", "-c", "core.quotePath=false", *args], input=stdin, capture_output=True, text=True, errors="replace"
        )
        if result.returncode != 0:
            raise GitError(f"git {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout

    def git(self, *args: str, stdin: str | None = None) -> str:
        """Runs `git args...` in the repository and returns stdout."""
        return self._run(["-C", str(self.root), *args], stdin=stdin)

    def commit_id(self, rev: str) -> str:
        """The full commit id of `rev`; UnknownRevisionError if there is none."""
        try:
            return self.git("rev-parse", "--verify", "--quiet", "--end-of-options", f"{rev}^{{commit}}").strip()
        except GitError:
            raise UnknownRevisionError(f"unknown commit {rev!r} in repository {str(self.root)!r}") from None

    def _parent_or_empty_tree(self, commit: str) -> str:
        parents = self.git("rev-list", "--parents", "-n", "1", commit).split()[1:]
        if parents:
            return parents[0]
        if self._empty_tree is None:
            self._empty_tree = self.git("hash-object", "-t", "tree", "--stdin", stdin="").strip()
        return self._empty_tree

    def resolve(self, rev: str) -> tuple[str, str]:
        """(base, head) object ids of a revision (against its first parent) or a range `A..B` / `A...B`."""
        if "..." in rev:
            a, b = rev.split("...", 1)
            a, b = self.commit_id(a or "HEAD"), self.commit_id(b or "HEAD")
            return self.git("merge-base", a, b).strip(), b
        if ".." in rev:
            a, b = rev.split("..", 1)
            return self.commit_id(a or "HEAD"), self.commit_id(b or "HEAD")
        head = self.commit_id(rev)
        return self._parent_or_empty_tree(head), head

    def changes(self, base: str, head: str, paths: Sequence[str] = ()) -> list[FileChange]:
        """The files that differ between two trees (under `paths`, git pathspecs, if given), renames detected,
        with changed line numbers."""
        limit = ["--", *paths] if paths else []
        names = self.git("diff", "-M", "--name-status", "-z", "--no-ext-diff", base, head, *limit).split("\0")
        files: list[tuple[str, str | None, str | None]] = []
        i = 0
        while i < len(names) and names[i]:
            status = names[i][0]
            if status in "RC":
                files.append((status, names[i + 1], names[i + 2]))
                i += 3
            else:
                path = names[i + 1]
                files.append((status, None if status == "A" else path, None if status == "D" else path))
                i += 2
        patch = self.git("diff", "-M", "--unified=0", "--no-color", "--no-ext-diff", base, head, *limit)
        blocks = re.split(r"^diff --git .*$", patch, flags=re.M)[1:]
        if len(blocks) != len(files):
            raise GitError(f"git diff {base}..{head}: {len(files)} files but {len(blocks)} patch blocks")
        result = []
        for (status, old, new), block in zip(files, blocks):
            deleted: list[int] = []
            added: list[int] = []
            for line in block.splitlines():
                match = _HUNK.match(line)
                if match:
                    deleted.extend(_hunk_lines(match[1], match[2]))
                    added.extend(_hunk_lines(match[3], match[4]))
            binary = bool(re.search(r"^(Binary files .* differ|GIT binary patch)$", block, flags=re.M))
            result.append(FileChange(status, old, new, tuple(deleted), tuple(added), binary))
        return result

    def read_blobs(self, specs: Sequence[str]) -> list[str | None]:
        """Contents of `rev:path` objects (None when missing), read in one `git cat-file --batch` process."""
        if not specs:
            return []
        process = subprocess.run(
            ["git", "-C", str(self.root), "cat-file", "--batch"],
            input="".join(f"{s}\n" for s in specs).encode(),
            capture_output=True,
        )
        if process.returncode != 0:
            raise GitError(f"git cat-file --batch failed: {process.stderr.decode(errors='replace').strip()}")
        out, pos, contents = process.stdout, 0, []
        for _ in specs:
            end = out.index(b"\n", pos)
            header = out[pos:end].decode(errors="replace").split()
            pos = end + 1
            if len(header) < 3 or header[-1] == "missing":
                contents.append(None)
                continue
            size = int(header[2])
            contents.append(out[pos : pos + size].decode("utf-8", errors="replace"))
            pos += size + 1
        return contents


@dataclass(frozen=True)
class ChangeStats:
    """The cost of one feature integration (one or more revisions with the same label and target count).

    Paths are those of counted (code) files; `excluded_files` lists the changed tests, docs and data, which are
    not counted. Symbols are `path::Qualified.name`: `*_touched` in files that existed before (a changed code
    line lies in the definition), `*_new` defined in new files.
    """

    label: str
    revs: tuple[str, ...]
    targets: int | None
    implementation_loc: int = 0
    integration_added: int = 0
    integration_deleted: int = 0
    files_new: tuple[str, ...] = ()
    files_modified: tuple[str, ...] = ()
    files_deleted: tuple[str, ...] = ()
    excluded_files: tuple[tuple[str, str], ...] = ()  # (path, kind)
    classes_touched: tuple[str, ...] = ()
    functions_touched: tuple[str, ...] = ()
    classes_new: tuple[str, ...] = ()
    functions_new: tuple[str, ...] = ()
    modules_affected: tuple[str, ...] = field(default=())  # pre-existing code files with a changed code line

    @property
    def integration_loc(self) -> int:
        """Code lines added plus deleted in files that existed before the change."""
        return self.integration_added + self.integration_deleted

    def combine(self, other: ChangeStats) -> ChangeStats:
        """The stats of both changes together (line counts add; file and symbol sets unite)."""
        merged: dict[str, Any] = {"revs": self.revs + other.revs}
        for f in dataclasses.fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if f.name in ("label", "targets", "revs"):
                continue
            merged[f.name] = a + b if isinstance(a, int) else tuple(sorted(set(a) | set(b)))
        return dataclasses.replace(self, **merged)

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["integration_loc"] = self.integration_loc
        data["excluded_files"] = [list(x) for x in self.excluded_files]
        return data


def _symbol_names(path: str, text: str | None, lines: Iterable[int]) -> tuple[set[str], set[str]]:
    if not text or not path.endswith((".py", ".pyi")):
        return set(), set()
    touched = symbols_touching(python_symbols(text), lines)
    return {f"{path}::{s.name}" for s in touched if s.kind == "class"}, {
        f"{path}::{s.name}" for s in touched if s.kind == "function"
    }


def measure_change(
    repo: Repository, rev: str, *, label: str = "", targets: int | None = None, paths: Sequence[str] = ()
) -> ChangeStats:
    """Implementation and integration cost of one revision or range, with the files and symbols it touches.

    With `paths` (git pathspecs), only files under them are measured.
    """
    base, head = repo.resolve(rev)
    changes = repo.changes(base, head, paths)
    counted = [c for c in changes if classify_path(c.path) == "code" and not c.binary]
    specs = []
    for c in counted:
        specs += [f"{base}:{c.old_path}" if c.old_path else "", f"{head}:{c.new_path}" if c.new_path else ""]
    blobs = repo.read_blobs([s for s in specs if s])
    it = iter(blobs)
    texts = [next(it) if s else None for s in specs]

    impl = added = deleted = 0
    new, modified, removed, affected = [], [], [], []
    classes, functions, classes_new, functions_new = set(), set(), set(), set()
    for k, c in enumerate(counted):
        old_text, new_text = texts[2 * k], texts[2 * k + 1]
        new_code = code_lines(new_text, c.new_path) if new_text is not None else set()
        if c.status in "AC":  # A new file (a detected copy is a new file too): implementation.
            impl += len(new_code)
            new.append(c.path)
            more_classes, more_functions = _symbol_names(c.path, new_text, new_code)
            classes_new |= more_classes
            functions_new |= more_functions
            continue
        old_code = code_lines(old_text, c.old_path) if old_text is not None else set()
        del_lines = [n for n in c.deleted if n in old_code]
        add_lines = [n for n in c.added if n in new_code] if c.status != "D" else []
        deleted += len(del_lines)
        added += len(add_lines)
        (removed if c.status == "D" else modified).append(c.path)
        if del_lines or add_lines:
            affected.append(c.path)
        for text, lines in ((old_text, del_lines), (new_text, add_lines)):
            more_classes, more_functions = _symbol_names(c.path, text, lines)
            classes |= more_classes
            functions |= more_functions
    excluded = tuple(sorted((c.path, classify_path(c.path)) for c in changes if c not in counted))
    return ChangeStats(
        label=label,
        revs=(rev,),
        targets=targets,
        implementation_loc=impl,
        integration_added=added,
        integration_deleted=deleted,
        files_new=tuple(sorted(new)),
        files_modified=tuple(sorted(modified)),
        files_deleted=tuple(sorted(removed)),
        excluded_files=excluded,
        classes_touched=tuple(sorted(classes)),
        functions_touched=tuple(sorted(functions)),
        classes_new=tuple(sorted(classes_new)),
        functions_new=tuple(sorted(functions_new)),
        modules_affected=tuple(sorted(affected)),
    )


def measure_history(repo: Repository | str | Path, entries: Sequence[HistoryEntry]) -> list[ChangeStats]:
    """Measures every entry; entries with the same label and target count are combined, in first-seen order.

    Every revision is resolved before any is measured, so a typo fails fast with UnknownRevisionError.
    """
    repo = repo if isinstance(repo, Repository) else Repository(repo)
    for entry in entries:
        try:
            repo.resolve(entry.rev)
        except UnknownRevisionError as e:
            raise UnknownRevisionError(f"{entry.where}: {e}" if entry.where else str(e)) from None
    combined: dict[tuple[str, int | None], ChangeStats] = {}
    for entry in entries:
        stats = measure_change(repo, entry.rev, label=entry.label, targets=entry.targets)
        key = (entry.label, entry.targets)
        combined[key] = combined[key].combine(stats) if key in combined else stats
    return list(combined.values())


def history_complexity(stats: Sequence[ChangeStats]) -> dict[str, Complexity]:
    """The LoC-complexity of integration cost per label, over the entries that give a target count."""
    series: dict[str, list[tuple[int, int, float]]] = defaultdict(list)
    for s in stats:
        if s.targets is not None:
            series[s.label].append((s.targets, 1, s.integration_loc))
        else:
            series.setdefault(s.label, [])
    return {label: fit_complexity(points) for label, points in series.items()}
