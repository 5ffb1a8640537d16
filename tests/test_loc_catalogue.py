"""`axmini report history`: a catalogue measured end to end on repositories built in the test; refusals of
shallow, merged-into-side-branch, repeated and missing commits; one-line errors; the shipped peer catalogue."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from test_loc_history import commit, git, init, measure

from axmini.tools import catalogue, cli, history_report
from axmini.tools.fit import MIN_POINTS, fit_complexity
from axmini.tools.git import Repository

ATTENTION = "def attention(q, k):\n    return q @ k\n"
LLAMA = (
    "from layers.attention import attention\n\n\nclass Llama:\n    def __call__(self, q, k):\n"
    "        return attention(q, k)\n"
)


def _write_catalogue(path: Path, url: str, changes: list[tuple[str, str]]) -> Path:
    text = f'[[repository]]\nname = "toy"\nurl = "{url}"\nmodels = ["models/*/**"]\n'
    for feature, rev in changes:
        text += f'\n[[change]]\nrepository = "toy"\nfeature = "{feature}"\ncommits = ["{rev}"]\n'
        text += f'models = ["llama"]\nrationale = "{feature} at {rev}"\n'
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """main: base, rope (in the shared attention), other; branch `window`: window in both models, then "merge main
    into window", then merged into main with --no-ff. Returns the repository path and the commit ids."""
    repo = init(tmp_path_factory.mktemp("toy") / "repo")
    ids = {"repo": str(repo)}
    models = {f"models/{m}/model.py": LLAMA.replace("Llama", m.title()) for m in ("llama", "gemma")}
    ids["base"] = commit(repo, {"layers/attention.py": ATTENTION} | models, "base")
    rope = "def attention(q, k):\n    q, k = rope(q), rope(k)\n    return q @ k\n\n\ndef rope(x):\n    return -x\n"
    ids["rope"] = commit(repo, {"layers/attention.py": rope}, "Add RoPE to the attention")
    git(repo, "checkout", "-q", "-b", "window")
    windowed = {p: t.replace("attention(q, k)", "attention(q, k[-4:])") for p, t in models.items()}
    ids["window"] = commit(repo, windowed, "Window in every model")
    git(repo, "checkout", "-q", "main")
    ids["other"] = commit(repo, {"layers/other.py": "def other():\n    return 1\n"}, "Other work on main")
    git(repo, "checkout", "-q", "window")
    git(repo, "merge", "-q", "--no-ff", "-m", "Merge branch 'main' into window", "main")
    ids["merge_main_into_branch"] = git(repo, "rev-parse", "HEAD").strip()
    git(repo, "checkout", "-q", "main")
    git(repo, "merge", "-q", "--no-ff", "-m", "Merge branch 'window' into 'main'", "window")
    ids["merge_branch_into_main"] = git(repo, "rev-parse", "HEAD").strip()
    return ids


def _run(toy: dict[str, str], tmp_path: Path, changes: list[tuple[str, str]], repo: str | None = None):
    cat = catalogue.load(_write_catalogue(tmp_path / "c.toml", "https://example.com/toy", changes))
    clones = history_report.match_clones(cat, [repo or toy["repo"]])
    return history_report.run_history(cat, clones)


def test_a_merge_on_the_mainline_is_its_branch_and_a_merge_into_a_side_branch_is_refused(
    toy: dict[str, str], tmp_path: Path
) -> None:
    result = _run(toy, tmp_path, [("window", toy["merge_branch_into_main"]), ("x", toy["merge_main_into_branch"])])
    mainline, side = result.rows
    assert mainline.status == "measured"
    assert mainline.stats == measure(Path(toy["repo"]), toy["window"], model_globs=["models/*/**"])
    assert mainline.stats.integration_loc == 2 and mainline.stats.models_touched == ("models/gemma/", "models/llama/")
    assert side.status == "refused" and "merge into a side branch" in side.reason and side.stats is None


def test_repeated_and_overlapping_commits_are_counted_once(toy: dict[str, str], tmp_path: Path) -> None:
    changes = [("rope", toy["rope"]), ("rope", toy["rope"] + "^!"), ("window", toy["merge_branch_into_main"])]
    changes += [("window", toy["window"]), ("both", f"{toy['base']}..{toy['other']}")]
    rows = _run(toy, tmp_path, changes).rows
    assert [r.status for r in rows] == ["measured", "refused", "measured", "refused", "refused"]
    assert rows[1].reason == "repeats commits already counted by change #1"
    assert rows[3].reason == "repeats commits already counted by change #3"
    assert rows[4].reason == "repeats commits already counted by change #1"


def test_a_shallow_clone_refuses_the_commits_it_cut_off_and_lacks(toy: dict[str, str], tmp_path: Path) -> None:
    shallow = tmp_path / "shallow"
    subprocess.run(["git", "clone", "-q", "--depth", "1", f"file://{toy['repo']}", str(shallow)], check=True)
    result = _run(toy, tmp_path, [("window", toy["merge_branch_into_main"]), ("rope", toy["rope"])], str(shallow))
    cut, missing = result.rows
    assert result.clones[0].shallow
    assert cut.status == "refused" and "parents are cut off in this shallow clone" in cut.reason
    assert missing.status == "refused" and missing.reason == f"{toy['rope']} is not in this clone"


def test_rows_name_their_commit_subject_and_date_and_the_head_measured(toy: dict[str, str], tmp_path: Path) -> None:
    result = _run(toy, tmp_path, [("rope", toy["rope"])])
    (row,) = result.rows
    (commit_info,) = row.commits
    assert commit_info.subject == "Add RoPE to the attention" and re.fullmatch(r"\d{4}-\d\d-\d\dT.*", commit_info.date)
    assert result.clones[0].head.id == toy["merge_branch_into_main"]
    # The rope function is new (implementation); the call in the existing attention is integration.
    assert (row.stats.implementation_loc, row.stats.integration_loc, row.stats.deleted_loc) == (2, 1, 0)


def test_fits_need_four_points(toy: dict[str, str], tmp_path: Path) -> None:
    three = [(1, 1, 10.0), (2, 1, 21.0), (4, 1, 39.0)]
    assert fit_complexity(three).label.startswith("n/a (3 points") and not fit_complexity(three).fitted
    four = fit_complexity([*three, (8, 1, 80.0)])
    assert MIN_POINTS == 4 and four.label == "O(N)" and 0.99 < four.r2 <= 1.0 and "R^2=" in four.describe()
    fits = _run(toy, tmp_path, [("rope", toy["rope"])]).fits()
    assert fits["toy", "rope"].label.startswith("n/a (0 points")


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = cli.main([*argv, "--no-progress"])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_report_history_writes_a_report_that_can_be_repeated_from_itself(
    toy: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    changes = [("rope", toy["rope"]), ("window", toy["merge_branch_into_main"]), ("window", toy["window"])]
    path = _write_catalogue(tmp_path / "c.toml", "https://example.com/toy", changes)
    out = tmp_path / "out"
    status, _, err = _cli(["history", "--repo", toy["repo"], "--catalogue", str(path), "--out", str(out)], capsys)
    assert status == 0, err
    text = (out / "report.md").read_text()
    for needle in ("https://example.com/toy", "Add RoPE to the attention", toy["rope"][:10], "Window in every model"):
        assert needle in text
    assert (
        toy["merge_branch_into_main"][:10] in text and "refused: repeats commits already counted by change #2" in text
    )
    data = json.loads((out / "report.json").read_text())
    assert data["catalogue"]["sha256"] == catalogue.load(path).sha256
    assert data["clones"][0]["head"]["id"] == toy["merge_branch_into_main"]
    assert [c["status"] for c in data["changes"]] == ["measured", "measured", "refused"]
    assert sorted(p.name for p in out.glob("*.png")) == ["history_rope.png", "history_window.png"]
    assert (out / "report.html").read_text().count("data:image/png;base64,") == 2


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("not-a-repo", "is not a git repository"),
        ("foreign-repo", "holds none of the commits"),
        ("unknown-key", "change #1: unknown key 'commit'; did you mean 'commits'?"),
        ("bad-toml", "not valid TOML"),
        ("missing-catalogue", "does not exist"),
        ("unknown-repository", "change #1: unknown repository 'other'"),
        ("missing-blob", "unable to read"),
    ],
)
def test_bad_history_input_is_one_line_and_exit_status_2(
    case: str, message: str, toy: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = toy["repo"]
    path = _write_catalogue(tmp_path / "c.toml", "https://example.com/toy", [("rope", toy["rope"])])
    text = path.read_text()
    if case == "not-a-repo":
        repo = str(tmp_path)
    elif case == "foreign-repo":
        repo = str(init(tmp_path / "foreign"))
        commit(Path(repo), {"a.py": "x = 1\n"}, "unrelated")
    elif case == "unknown-key":
        path.write_text(text.replace("commits =", "commit ="))
    elif case == "bad-toml":
        path.write_text(text + "[[change\n")
    elif case == "missing-catalogue":
        path = tmp_path / "nothing.toml"
    elif case == "unknown-repository":
        path.write_text(text.replace('repository = "toy"\nfeature', 'repository = "other"\nfeature'))
    elif case == "missing-blob":
        repo = str(shutil.copytree(toy["repo"], tmp_path / "copy"))  # Loose objects: one can be dropped.
        blob = git(Path(repo), "rev-parse", f"{toy['rope']}:layers/attention.py").strip()
        (Path(repo) / ".git/objects" / blob[:2] / blob[2:]).unlink()
    status, _, err = _cli(["history", "--repo", repo, "--catalogue", str(path), "--out", str(tmp_path / "out")], capsys)
    assert status == 2 and err.count("\n") == 1 and err.startswith("axmini report: error: ") and message in err
    assert not (tmp_path / "out").exists()


def test_the_shipped_catalogue_pins_commits_of_every_peer_for_four_features() -> None:
    cat = catalogue.load()
    assert {"axlearn", "maxtext", "torchtitan", "megatron-lm"} <= set(cat.repositories)
    assert all(r.url.startswith("https://github.com/") and r.models for r in cat.repositories.values())
    assert all(re.fullmatch(r"[0-9a-f]{40}", rev) for c in cat.changes for rev in c.commits)
    assert all(c.rationale and len(c.rationale) <= 120 for c in cat.changes)
    for feature in ("rope", "moe", "sliding_window", "qk_norm"):
        assert {c.repository for c in cat.changes if c.feature == feature} == set(cat.repositories), feature
    revs = [rev for c in cat.changes for rev in c.commits]
    assert len(revs) == len(set(revs))
    assert catalogue.load_paper() and all(row.source for row in catalogue.load_paper())


def test_a_clone_is_matched_to_the_catalogue_repository_whose_commits_it_holds(
    toy: dict[str, str], tmp_path: Path
) -> None:
    path = tmp_path / "two.toml"
    text = ""
    for name, rev in (("other", "0" * 40), ("toy", toy["rope"])):
        text += f'[[repository]]\nname = "{name}"\nurl = "https://example.com/{name}"\n\n'
        text += f'[[change]]\nrepository = "{name}"\nfeature = "rope"\ncommits = ["{rev}"]\nrationale = "r"\n\n'
    path.write_text(text)
    clones = history_report.match_clones(catalogue.load(path), [toy["repo"]])
    assert list(clones) == ["toy"] and isinstance(clones["toy"], Repository)
