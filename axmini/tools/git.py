"""A git repository read through the `git` command line: only its objects are needed, so bare mirrors work.

- A shallow clone is detected; the commits whose parents it cut off (`shallow_commits`) are named so that callers
  refuse them instead of comparing them against an empty tree.
- Every failure of git is a `GitError` carrying git's own message on one line.
- `changes` diffs only the paths it is given (the counted files): a partial clone that lacks the blob of a data
  file it never counts is measured all the same.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


class GitError(RuntimeError):
    """A git command failed for a reason other than bad user input."""


class NotAGitRepositoryError(ValueError):
    """The given path is neither a git work tree nor a git directory."""


class UnknownRevisionError(ValueError):
    """A revision that the repository does not have."""


@dataclass(frozen=True)
class Commit:
    """A commit's id, parents, author date (ISO 8601) and subject line."""

    id: str
    parents: tuple[str, ...]
    date: str
    subject: str

    @property
    def short(self) -> str:
        return self.id[:10]


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
_PATHS_PER_DIFF = 500  # Pathspecs per `git diff` call, far below any command-line limit.


def _hunk_lines(start: str, count: str | None) -> range:
    n = 1 if count is None else int(count)
    return range(int(start), int(start) + n)


def _one_line(text: str) -> str:
    return " ".join(text.split())


class Repository:
    """A local git repository (work tree or bare), read through the `git` command line."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_dir():
            raise NotAGitRepositoryError(f"repository path {str(path)!r} is not a directory")
        try:
            self.git_dir = Path(_run(["-C", str(path), "rev-parse", "--absolute-git-dir"]).strip())
        except GitError:
            raise NotAGitRepositoryError(f"{str(path)!r} is not a git repository (git rev-parse failed)") from None
        self.path = path
        shallow = Path(self.git("rev-parse", "--git-path", "shallow").strip())
        self.shallow_commits = frozenset(shallow.read_text().split()) if shallow.is_file() else frozenset()
        self._empty_tree: str | None = None

    @property
    def is_shallow(self) -> bool:
        return bool(self.shallow_commits)

    def git(self, *args: str, stdin: str | None = None) -> str:
        """Runs `git args...` on the repository's objects and returns stdout."""
        return _run(["--git-dir", str(self.git_dir), *args], stdin=stdin)

    def commit_id(self, rev: str) -> str:
        """The full commit id of `rev`; UnknownRevisionError if there is none."""
        try:
            return self.git("rev-parse", "--verify", "--quiet", "--end-of-options", f"{rev}^{{commit}}").strip()
        except GitError:
            raise UnknownRevisionError(f"unknown commit {rev!r} in repository {str(self.path)!r}") from None

    def has_commits(self, ids: Sequence[str]) -> list[bool]:
        """Whether each id names a commit present in the repository (one `git cat-file` process)."""
        if not ids:
            return []
        out = self.git("cat-file", "--batch-check=%(objecttype)", stdin="".join(f"{i}\n" for i in ids))
        return [line.strip() == "commit" for line in out.splitlines()]

    def commits(self, ids: Sequence[str]) -> list[Commit]:
        """The Commit of each id, in order."""
        if not ids:
            return []
        out = self.git("log", "--no-walk=unsorted", "-z", "--format=%H%x1f%P%x1f%aI%x1f%s", *ids)
        found = {}
        for record in filter(None, out.split("\0")):
            commit, parents, date, subject = record.strip("\n").split("\x1f", 3)
            found[commit] = Commit(commit, tuple(parents.split()), date, subject)
        return [found[i] for i in ids]

    def first_parent_chain(self, head: str = "HEAD") -> frozenset[str]:
        """The commits on `head`'s first-parent history: its mainline, as opposed to the branches merged into it."""
        return frozenset(self.git("rev-list", "--first-parent", head).split())

    def commits_between(self, base: str, head: str) -> frozenset[str]:
        """The commits reachable from `head` but not from `base` (`git rev-list base..head`)."""
        return frozenset(self.git("rev-list", f"{base}..{head}").split())

    def empty_tree(self) -> str:
        if self._empty_tree is None:
            self._empty_tree = self.git("hash-object", "-t", "tree", "--stdin", stdin="").strip()
        return self._empty_tree

    def changed_paths(self, base: str, head: str) -> list[str]:
        """Every path that differs between two trees (no rename detection, so no file content is read)."""
        out = self.git("diff", "--no-renames", "--name-only", "-z", "--no-ext-diff", base, head)
        return [p for p in out.split("\0") if p]

    def changes(self, base: str, head: str, paths: Sequence[str]) -> list[FileChange]:
        """The changes of the given paths between two trees, renames among them detected, with changed lines."""
        changes = []
        for k in range(0, len(paths), _PATHS_PER_DIFF):
            changes += self._changes(base, head, paths[k : k + _PATHS_PER_DIFF])
        return changes

    def _changes(self, base: str, head: str, paths: Sequence[str]) -> list[FileChange]:
        limit = ["--", *paths]
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

    def read_blobs(self, specs: Sequence[str]) -> list[str]:
        """Contents of `rev:path` objects, read in one `git cat-file --batch` process; a missing one is a GitError."""
        if not specs:
            return []
        process = subprocess.run(
            ["git", "--git-dir", str(self.git_dir), "cat-file", "--batch"],
            input="".join(f"{s}\n" for s in specs).encode(),
            capture_output=True,
        )
        if process.returncode != 0:
            raise GitError(f"git cat-file --batch failed: {_one_line(process.stderr.decode(errors='replace'))}")
        out, pos, contents = process.stdout, 0, []
        for spec in specs:
            end = out.index(b"\n", pos)
            header = out[pos:end].decode(errors="replace").split()
            pos = end + 1
            if len(header) < 3 or header[-1] == "missing":
                raise GitError(f"git object {spec} is missing from this clone (a partial or size-limited clone?)")
            size = int(header[2])
            contents.append(out[pos : pos + size].decode("utf-8", errors="replace"))
            pos += size + 1
        return contents


def _run(args: Sequence[str], *, stdin: str | None = None) -> str:
    result = subprocess.run(
        ["git", "-c", "core.quotePath=false", "--literal-pathspecs", *args],
        input=stdin,
        capture_output=True,
        text=True,
        errors="replace",
    )
    if result.returncode != 0:
        shown = " ".join(a for a in args if a != "--")[:200]
        raise GitError(f"git {shown} failed: {_one_line(result.stderr) or f'exit status {result.returncode}'}")
    return result.stdout
