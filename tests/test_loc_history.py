"""History mode on a git repository built in the test: a feature added once in a shared slot vs copied into N models."""

from __future__ import annotations

import subprocess
import textwrap
from pathlib import Path

import pytest

from axmini.tools.history import (
    CommitsFileError,
    NotAGitRepositoryError,
    Repository,
    UnknownRevisionError,
    history_complexity,
    measure_change,
    measure_history,
    parse_commit_lines,
    parse_commits_file,
)
from axmini.tools.loc import classify_path, code_lines, fit_complexity, python_symbols

SIZES = (1, 2, 4, 8)

ATTENTION = '''\
"""Attention shared by all models."""


def attention(q, k, v):
    # plain dot-product attention
    scores = q @ k.T
    return scores @ v
'''

# The shared-slot integration: 2 code lines added (the import, the call); a comment and a blank line are free.
ATTENTION_WITH_ROPE = '''\
"""Attention shared by all models."""

from shared.rope import rope


def attention(q, k, v):
    # plain dot-product attention
    # with rope on q and k
    q, k = rope(q), rope(k)
    scores = q @ k.T
    return scores @ v
'''

# The implementation, in a new file: 2 code lines (def, return).
ROPE = '''\
"""Rotary embedding (a toy)."""

# Not the real thing.


def rope(x):
    """Rotates x."""
    return x * 2
'''

MODEL = '''\
"""Model {i}."""

from shared.attention import attention


class Model{i}:
    """A model."""

    def __call__(self, q, k, v):
        return attention(q, k, v)
'''

# The copy-per-model integration: +3 code lines (def, return, new call) and -1 (old call) in each model file.
MODEL_WITH_ROPE = '''\
"""Model {i}."""

from shared.attention import attention


class Model{i}:
    """A model."""

    def rope(self, x):
        """Rotates x: copied into every model."""
        # rotate half

        return x * 2

    def __call__(self, q, k, v):
        return attention(self.rope(q), self.rope(k), v)
'''


def _git(repo: Path, *args: str) -> str:
    command = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    return subprocess.run([*command, *args], check=True, capture_output=True, text=True).stdout


def _write(repo: Path, files: dict[str, str]) -> None:
    for path in repo.rglob("*.py"):
        path.unlink()
    for path, text in files.items():
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / path).write_text(text)


def _commit(repo: Path, tag: str) -> None:
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "--allow-empty", "-m", tag)
    _git(repo, "tag", tag)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Per N: base-N (N models on a shared attention), shared-N (RoPE in the slot), copy-N (RoPE in each model)."""
    repo = tmp_path_factory.mktemp("history")
    _git(repo, "init", "-q")
    for n in SIZES:
        base = {"shared/attention.py": ATTENTION} | {f"models/model_{i}.py": MODEL.format(i=i) for i in range(n)}
        _write(repo, base)
        _commit(repo, f"base-{n}")
        _write(repo, base | {"shared/attention.py": ATTENTION_WITH_ROPE, "shared/rope.py": ROPE})
        (repo / "tests").mkdir(exist_ok=True)
        (repo / "tests/test_rope.py").write_text("def test_rope():\n    assert True\n" * n)
        (repo / "docs").mkdir(exist_ok=True)
        (repo / "docs/rope.md").write_text(f"# RoPE\n\nNow in {n} models.\n")
        _commit(repo, f"shared-{n}")
        _write(repo, base | {f"models/model_{i}.py": MODEL_WITH_ROPE.format(i=i) for i in range(n)})
        _commit(repo, f"copy-{n}")
    return repo


def test_code_lines_skip_blanks_comments_and_docstrings_but_keep_strings() -> None:
    text = textwrap.dedent('''\
        x = 1  # a comment after code
        # only a comment

        s = """
        # not a comment: inside a string
        """
        def f():
            """Docstring
            on two lines."""
            return "#"
        ''')
    assert code_lines(text, "a.py") == {1, 4, 5, 6, 7, 10}


def test_code_lines_of_c_style_files_skip_line_and_block_comments() -> None:
    text = "int a; // x\n// c\n/* block\n still */\n\nint b;\n/* one */ int c;\n"
    assert code_lines(text, "a.cc") == {1, 6, 7}


def test_paths_are_classified_as_code_test_doc_or_data() -> None:
    kinds = {
        "axmini/layers/attention.py": "code",
        "tests/test_attention.py": "test",
        "pkg/attention_test.py": "test",
        "conftest.py": "test",
        "docs/guide.py": "doc",
        "README.md": "doc",
        "tests/golden/models/tiny.txt": "data",
        "pkg/weights.json": "data",
        "Makefile": "code",
    }
    assert {path: classify_path(path) for path in kinds} == kinds


def test_python_symbols_give_nested_qualified_names_and_spans() -> None:
    symbols = {s.name: (s.kind, s.start, s.end) for s in python_symbols(MODEL_WITH_ROPE.format(i=3))}
    assert symbols == {
        "Model3": ("class", 6, 16),
        "Model3.rope": ("function", 9, 13),
        "Model3.__call__": ("function", 15, 16),
    }


def test_shared_slot_integration_costs_the_same_lines_for_every_n(repo: Path) -> None:
    for n in SIZES:
        stats = measure_change(Repository(repo), f"shared-{n}", label="rope", targets=n)
        assert (stats.integration_added, stats.integration_deleted, stats.implementation_loc) == (2, 0, 2)
        assert stats.files_new == ("shared/rope.py",)
        assert stats.files_modified == ("shared/attention.py",)
        assert stats.modules_affected == ("shared/attention.py",)
        assert stats.functions_touched == ("shared/attention.py::attention",)
        assert stats.classes_touched == ()
        assert stats.functions_new == ("shared/rope.py::rope",)
        assert stats.excluded_files == (("docs/rope.md", "doc"), ("tests/test_rope.py", "test"))


def test_copied_integration_costs_four_lines_per_model(repo: Path) -> None:
    for n in SIZES:
        stats = measure_change(Repository(repo), f"base-{n}..copy-{n}", label="rope", targets=n)
        assert (stats.integration_added, stats.integration_deleted, stats.implementation_loc) == (3 * n, n, 0)
        models = tuple(sorted(f"models/model_{i}.py" for i in range(n)))
        assert stats.files_modified == models and stats.modules_affected == models and stats.files_new == ()
        assert stats.classes_touched == tuple(f"{m}::Model{i}" for i, m in enumerate(models))
        expected_functions = sorted(f"{m}::Model{i}.{f}" for i, m in enumerate(models) for f in ("__call__", "rope"))
        assert list(stats.functions_touched) == expected_functions


def test_pathspecs_limit_what_is_measured(repo: Path) -> None:
    whole = measure_change(Repository(repo), "shared-4")
    shared = measure_change(Repository(repo), "shared-4", paths=["shared/"])
    models = measure_change(Repository(repo), "base-4..copy-4", paths=["models/model_0.py", "models/model_1.py"])
    assert (shared.integration_loc, shared.implementation_loc) == (whole.integration_loc, whole.implementation_loc)
    assert shared.excluded_files == () and whole.excluded_files != ()
    assert models.integration_loc == 2 * 4 and models.files_modified == ("models/model_0.py", "models/model_1.py")


def test_history_classifies_shared_slot_as_constant_and_copies_as_linear(repo: Path, tmp_path: Path) -> None:
    lines = [f"rope-shared\tshared-{n}\t{n}" for n in SIZES] + [f"rope-copied base-{n}..copy-{n} {n}" for n in SIZES]
    commits = tmp_path / "commits.tsv"
    commits.write_text("# label  rev  targets\n\n" + "\n".join(lines) + "\n")
    stats = measure_history(repo, parse_commits_file(commits))
    costs = {(s.label, s.targets): s.integration_loc for s in stats}
    assert costs == {("rope-shared", n): 2 for n in SIZES} | {("rope-copied", n): 4 * n for n in SIZES}
    complexity = history_complexity(stats)
    assert complexity["rope-shared"].label == "O(1)" and complexity["rope-shared"].slope_n == pytest.approx(0.0)
    assert complexity["rope-copied"].label == "O(N)" and complexity["rope-copied"].slope_n == pytest.approx(1.0)


def test_root_commit_is_all_implementation(repo: Path) -> None:
    stats = measure_change(Repository(repo), "base-1")
    # attention.py: def + 2 body lines; model_0.py: import, class, def, return.
    assert (stats.implementation_loc, stats.integration_loc) == (7, 0)
    assert stats.classes_new == ("models/model_0.py::Model0",)


def test_entries_with_the_same_label_and_targets_add_up(repo: Path) -> None:
    entries = parse_commit_lines("both shared-2 2\nboth base-2..copy-2 2\n")
    (stats,) = measure_history(repo, entries)
    assert stats.integration_loc == 2 + 4 * 2 and stats.implementation_loc == 2
    assert stats.revs == ("shared-2", "base-2..copy-2")


def test_fit_complexity_recognizes_products_of_two_axes() -> None:
    grid = [(n, m, 3 * n * m) for n in (1, 2, 4) for m in (1, 2, 4)]
    fit = fit_complexity(grid)
    assert fit.label == "O(N*M)" and fit.slope_n == pytest.approx(1.0) and fit.slope_m == pytest.approx(1.0)
    assert fit_complexity([(n, 1, 5 * n * n) for n in SIZES]).label == "O(N^2)"
    assert fit_complexity([(3, 1, 10)]).label.startswith("n/a")


def test_not_a_git_repository_is_refused(tmp_path: Path) -> None:
    with pytest.raises(NotAGitRepositoryError, match="not a git repository"):
        Repository(tmp_path)
    with pytest.raises(NotAGitRepositoryError, match="not a directory"):
        Repository(tmp_path / "missing")


def test_unknown_commit_names_the_line_of_the_commits_file(repo: Path) -> None:
    entries = parse_commit_lines("rope shared-1 1\nrope nosuchrev 2\n", "c.tsv")
    with pytest.raises(UnknownRevisionError, match=r"c.tsv:2: unknown commit 'nosuchrev'"):
        measure_history(repo, entries)
    with pytest.raises(UnknownRevisionError, match="unknown commit 'base-1~5'"):
        Repository(repo).resolve("base-1~5..base-1")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("rope\n", "expected 'label<TAB>rev-or-range"),
        ("rope abc 0\n", "targets must be a positive integer"),
        ("# nothing\n", "no 'label<TAB>rev-or-range' lines"),
    ],
)
def test_malformed_commits_file_is_refused(text: str, message: str) -> None:
    with pytest.raises(CommitsFileError, match=message):
        parse_commit_lines(text)
