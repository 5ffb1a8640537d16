"""History mode on git repositories built in the test: counting rules, definitions by code structure, and the
repository shapes real histories come in (bare, shallow, partial, with merges)."""

from __future__ import annotations

import subprocess
import textwrap
from pathlib import Path

import pytest

from axmini.tools.fit import fit_complexity
from axmini.tools.git import GitError, NotAGitRepositoryError, Repository, UnknownRevisionError
from axmini.tools.history import measure_change, model_unit, resolve
from axmini.tools.loc import classify_path, code_lines, python_symbols

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

# The copy-per-model integration: in each model file 3 code lines added (def, return, new call) inside the existing
# class, and 1 deleted (old call).
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


def git(repo: Path, *args: str) -> str:
    command = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    return subprocess.run([*command, *args], check=True, capture_output=True, text=True).stdout


def commit(repo: Path, files: dict[str, str], message: str, *, tag: str | None = None, keep: bool = True) -> str:
    """Writes `files` (replacing every other file unless `keep`) and commits them; returns the commit id."""
    if not keep:
        for path in repo.rglob("*"):
            if path.is_file() and ".git" not in path.parts:
                path.unlink()
    for path, text in files.items():
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / path).write_text(text)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "--allow-empty", "-m", message)
    if tag:
        git(repo, "tag", tag)
    return git(repo, "rev-parse", "HEAD").strip()


def init(repo: Path) -> Path:
    repo.mkdir(parents=True, exist_ok=True)
    git(repo, "init", "-q", "-b", "main")
    return repo


def measure(repo: Path, rev: str, **kwargs):
    r = Repository(repo)
    return measure_change(r, *resolve(r, rev), **kwargs)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Per N: base-N (N models on a shared attention), shared-N (RoPE in the slot), copy-N (RoPE in each model)."""
    repo = init(tmp_path_factory.mktemp("history"))
    for n in SIZES:
        base = {"shared/attention.py": ATTENTION} | {f"models/model_{i}.py": MODEL.format(i=i) for i in range(n)}
        commit(repo, base, f"base-{n}", tag=f"base-{n}", keep=False)
        extra = {"tests/test_rope.py": "def test_rope():\n    assert True\n" * n, "docs/rope.md": f"# RoPE in {n}\n"}
        commit(repo, base | {"shared/attention.py": ATTENTION_WITH_ROPE, "shared/rope.py": ROPE} | extra, "shared")
        git(repo, "tag", f"shared-{n}")
        copies = {f"models/model_{i}.py": MODEL_WITH_ROPE.format(i=i) for i in range(n)}
        commit(repo, base | copies, f"copy-{n}", tag=f"copy-{n}", keep=False)
    return repo


# ----------------------------------------------------------------------------------------------------
# Counting rules.


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


def test_paths_are_classified_as_code_config_script_test_doc_or_data() -> None:
    kinds = {
        "axmini/layers/attention.py": "code",
        "configs/models/llama.yml": "config",
        "pyproject.toml": "config",
        "model_config.json": "config",
        "scripts/train.sh": "script",
        "tests/test_attention.py": "test",
        "pkg/attention_test.py": "test",
        "conftest.py": "test",
        "docs/guide.py": "doc",
        "README.md": "doc",
        "tests/golden/models/tiny.txt": "data",
        "testdata/weights.json": "data",
        "weights.npz": "data",
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


def test_model_globs_name_one_unit_per_directory_or_file() -> None:
    globs = ["pkg/models/*/**", "**/configs/{llama,gemma}*.yml"]
    assert model_unit("pkg/models/llama/model/attention.py", globs) == "pkg/models/llama/"
    assert model_unit("src/configs/gemma-2b.yml", globs) == "src/configs/gemma-2b.yml"
    assert model_unit("configs/llama-7b.yml", globs) == "configs/llama-7b.yml"
    assert model_unit("pkg/models/moe.py", globs) is None and model_unit("configs/mistral.yml", globs) is None


# ----------------------------------------------------------------------------------------------------
# Definitions by code structure.


def test_shared_slot_integration_costs_the_same_lines_for_every_n(repo: Path) -> None:
    for n in SIZES:
        stats = measure(repo, f"shared-{n}")
        assert (stats.integration_loc, stats.deleted_loc, stats.implementation_loc) == (2, 0, 2)
        assert stats.files_new == ("shared/rope.py",) and stats.files_modified == ("shared/attention.py",)
        assert stats.modules_affected == ("shared/attention.py",)
        assert stats.functions_touched == ("shared/attention.py::attention",) and stats.classes_touched == ()
        assert stats.definitions_new == ("shared/rope.py::rope",)
        assert stats.excluded_files == (("docs/rope.md", "doc"), ("tests/test_rope.py", "test"))


def test_copied_integration_costs_three_lines_per_model_and_deletions_apart(repo: Path) -> None:
    for n in SIZES:
        stats = measure(repo, f"base-{n}..copy-{n}", model_globs=["models/*.py"])
        assert (stats.integration_loc, stats.deleted_loc, stats.implementation_loc) == (3 * n, n, 0)
        models = tuple(sorted(f"models/model_{i}.py" for i in range(n)))
        assert stats.files_modified == models and stats.modules_affected == models and stats.models_touched == models
        assert stats.classes_touched == tuple(f"{m}::Model{i}" for i, m in enumerate(models))
        expected_functions = sorted(f"{m}::Model{i}.{f}" for i, m in enumerate(models) for f in ("__call__", "rope"))
        assert list(stats.functions_touched) == expected_functions


def test_history_of_copies_grows_linearly_and_the_shared_slot_stays_flat(repo: Path) -> None:
    copied = fit_complexity([(n, 1, measure(repo, f"base-{n}..copy-{n}").integration_loc) for n in SIZES])
    shared = fit_complexity([(n, 1, measure(repo, f"shared-{n}").integration_loc) for n in SIZES])
    assert copied.label == "O(N)" and copied.slope_n == pytest.approx(1.0, rel=1e-6, abs=1e-9)
    assert shared.label == "O(1)" and shared.r2 == pytest.approx(1.0, rel=1e-9, abs=1e-9)


def test_a_new_class_in_an_existing_file_is_implementation(tmp_path: Path) -> None:
    repo = init(tmp_path / "r")
    commit(repo, {"layers.py": "class Dense:\n    def __call__(self, x):\n        return x\n"}, "base")
    moe = "\n\nclass MoE:\n    def __call__(self, x):\n        return x * 2\n"
    register = "\n\nLAYERS = {'dense': Dense, 'moe': MoE}\n"
    commit(repo, {"layers.py": "class Dense:\n    def __call__(self, x):\n        return x\n" + moe + register}, "moe")
    stats = measure(repo, "HEAD")
    assert (stats.implementation_loc, stats.integration_loc) == (3, 1)  # The class; the registry line.
    assert stats.definitions_new == ("layers.py::MoE",) and stats.classes_touched == ()


def test_a_file_that_existed_empty_counts_as_new(tmp_path: Path) -> None:
    repo = init(tmp_path / "r")
    commit(repo, {"models/__init__.py": "", "models/llama.py": '"""Placeholder."""\n'}, "placeholders")
    commit(repo, {"models/llama.py": "import math\n\n\nclass Llama:\n    scale = math.pi\n"}, "llama")
    stats = measure(repo, "HEAD")
    assert (stats.implementation_loc, stats.integration_loc) == (3, 0)
    assert stats.files_new == ("models/llama.py",)


def test_deleting_duplicated_code_is_not_integration_cost(tmp_path: Path) -> None:
    repo = init(tmp_path / "r")
    copy = "def moe(x):\n    y = x + 1\n    return y * 2\n"
    commit(
        repo,
        {"a.py": copy + "\n\ndef a(x):\n    return moe(x)\n", "b.py": copy + "\n\ndef b(x):\n    return moe(x)\n"},
        "2",
    )
    shared = {"a.py": "from moe import moe\n\n\ndef a(x):\n    return moe(x)\n", "moe.py": copy}
    commit(repo, shared | {"b.py": "from moe import moe\n\n\ndef b(x):\n    return moe(x)\n"}, "unify")
    stats = measure(repo, "HEAD")
    assert (stats.implementation_loc, stats.integration_loc, stats.deleted_loc) == (3, 2, 6)


def test_config_files_and_scripts_are_their_own_classes(tmp_path: Path) -> None:
    repo = init(tmp_path / "r")
    commit(repo, {"model.py": "x = 1\n", "configs/base.yml": "dim: 8\n"}, "base")
    commit(
        repo,
        {
            "configs/base.yml": "dim: 8\nwindow: 512  # new\n",
            "configs/models/gemma.yml": "# Gemma\nwindow: 4096\nlayers: 2\n",
            "run.sh": "#!/bin/bash\npython train.py --window 4096\n",
        },
        "window",
    )
    stats = measure(repo, "HEAD")
    assert (stats.config_loc, stats.script_loc, stats.implementation_loc, stats.integration_loc) == (3, 1, 0, 0)


def test_renames_are_reported_and_only_their_changed_lines_count(tmp_path: Path) -> None:
    repo = init(tmp_path / "r")
    body = "".join(f"def f{k}(x):\n    return x + {k}\n\n\n" for k in range(6))
    commit(repo, {"old/layers.py": body}, "base")
    (repo / "old/layers.py").unlink()
    commit(repo, {"new/layers.py": body.replace("x + 5", "x + 50")}, "move")
    stats = measure(repo, "HEAD")
    assert stats.files_renamed == ("old/layers.py -> new/layers.py",)
    assert (stats.implementation_loc, stats.integration_loc, stats.deleted_loc) == (0, 1, 1)


# ----------------------------------------------------------------------------------------------------
# Revisions and repository shapes.


def test_revisions_resolve_as_commit_caret_bang_and_ranges(repo: Path) -> None:
    r = Repository(repo)
    head = r.commit_id("shared-2")
    parent = r.commit_id("base-2")
    assert resolve(r, "shared-2") == resolve(r, "shared-2^!") == (parent, head)
    assert resolve(r, "base-2..shared-2") == (parent, head)
    with pytest.raises(UnknownRevisionError, match="unknown commit 'nosuch'"):
        resolve(r, "nosuch")


def test_a_bare_repository_is_measured_like_its_work_tree(repo: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(repo), str(bare)], check=True)
    assert measure(bare, "base-4..copy-4") == measure(repo, "base-4..copy-4")


def test_a_shallow_clone_names_the_commits_whose_parents_it_cut_off(repo: Path, tmp_path: Path) -> None:
    shallow = tmp_path / "shallow"
    subprocess.run(
        ["git", "clone", "-q", "--depth", "2", "--branch", "main", f"file://{repo}", str(shallow)], check=True
    )
    r = Repository(shallow)
    head, parent = r.commit_id("HEAD"), r.commit_id("HEAD~1")
    assert r.is_shallow and r.shallow_commits == {parent} and not Repository(repo).is_shallow
    assert head not in r.shallow_commits


def test_not_a_git_repository_is_refused(tmp_path: Path) -> None:
    with pytest.raises(NotAGitRepositoryError, match="not a git repository"):
        Repository(tmp_path)
    with pytest.raises(NotAGitRepositoryError, match="not a directory"):
        Repository(tmp_path / "missing")


def _drop_blob(repo: Path, rev: str, path: str) -> None:
    """Deletes a blob from the object store, as a partial or size-limited clone lacks it."""
    blob = git(repo, "rev-parse", f"{rev}:{path}").strip()
    (repo / ".git" / "objects" / blob[:2] / blob[2:]).unlink()


def test_a_missing_blob_of_an_uncounted_file_is_never_read_and_of_a_counted_one_is_a_git_error(
    tmp_path: Path,
) -> None:
    repo = init(tmp_path / "r")
    commit(repo, {"model.py": "x = 1\n", "weights.npz": "0" * 100, "tests/test_model.py": "y = 2\n"}, "base")
    commit(repo, {"model.py": "x = 1\ny = 2\n", "weights.npz": "1" * 100, "tests/test_model.py": "y = 3\n"}, "more")
    _drop_blob(repo, "HEAD~1", "weights.npz")
    _drop_blob(repo, "HEAD", "tests/test_model.py")
    stats = measure(repo, "HEAD")
    assert stats.integration_loc == 1 and ("weights.npz", "data") in stats.excluded_files
    _drop_blob(repo, "HEAD~1", "model.py")
    with pytest.raises(GitError, match=r"unable to read|missing from this clone") as error:
        measure(repo, "HEAD")
    assert "\n" not in str(error.value)
