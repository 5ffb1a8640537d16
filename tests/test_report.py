"""The modularity report command: four outputs with valid PNGs, and one-line errors with exit status 2."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import matplotlib.image
import pytest
from test_loc_patches import FEATURES, toy_family

from axmini.tools import patches, report
from axmini.tools.patches import grid_sizes

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _git(repo: Path, *args: str) -> None:
    command = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run([*command, *args], check=True, capture_output=True)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """Two commits: a model per file, then one line of a feature added to each of the 3 models (tag `copy`)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    for i in range(3):
        (repo / f"model_{i}.py").write_text(f"def model_{i}(x):\n    return x\n")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "base")
    for i in range(3):
        (repo / f"model_{i}.py").write_text(f"def model_{i}(x):\n    x = rope(x)\n    return x\n")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "copy")
    _git(repo, "tag", "copy")
    return repo


@pytest.fixture
def toy_features(monkeypatch: pytest.MonkeyPatch) -> None:
    """The toy features and a 2 x 2 toy family stand in for axmini's registry and families."""
    monkeypatch.setattr(patches, "registered_features", lambda: dict(FEATURES))
    monkeypatch.setattr(
        report, "default_families", lambda n, m: ([(toy_family(2, 2, forward=False), grid_sizes(2, 2))], [])
    )


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    status = report.main_modularity(argv)
    return status, capsys.readouterr().err


def test_report_writes_markdown_html_json_and_valid_pngs(
    repo: Path, tmp_path: Path, toy_features: None, capsys: pytest.CaptureFixture[str]
) -> None:
    commits = tmp_path / "commits.tsv"
    commits.write_text("rope-copied\tcopy\t3\n")
    out = tmp_path / "out"
    argv = ["--out", str(out), "--repo", str(repo), "--commits", str(commits), "--features", "rope,moe"]
    status, err = _run([*argv, "--no-progress"], capsys)
    assert status == 0, err
    for name in ("report.md", "report.html", "report.json"):
        assert (out / name).stat().st_size > 0
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["changes_vs_lines.png", "history.png", "integration_moe.png", "integration_rope.png"]
    html = (out / "report.html").read_text()
    for png in pngs:
        data = (out / png).read_bytes()
        assert data.startswith(PNG_SIGNATURE)
        image = matplotlib.image.imread(out / png)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        assert f"({png})" in (out / "report.md").read_text()
    assert html.count("data:image/png;base64,") == len(pngs) and "<img" in html and 'src="integration' not in html

    data = json.loads((out / "report.json").read_text())
    (change,) = data["history"]["changes"]
    assert (change["integration_loc"], change["modules_affected"]) == (3, ["model_0.py", "model_1.py", "model_2.py"])
    assert set(data["features"]) == {"rope", "moe"} and data["features"]["rope"]["user_lines"] == 1
    sweeps = {s["feature"]: s for s in data["sweeps"]}
    assert sweeps["rope"]["complexity"]["user_lines"]["label"] == "O(1)"
    assert [p["targets"] for p in sweeps["rope"]["points"]] == [1, 2, 2, 4]
    assert data["baselines"]["rope"]["complexity"]["label"] == "O(N*M)"
    assert data["baselines"]["moe"]["complexity"]["label"] == "O(N)"


def test_checks_past_the_budget_are_reported_as_not_checked(
    tmp_path: Path, toy_features: None, capsys: pytest.CaptureFixture[str]
) -> None:
    status, err = _run(["--out", str(tmp_path), "--features", "rope", "--check-budget", "0", "--no-progress"], capsys)
    assert status == 0, err
    text = (tmp_path / "report.md").read_text()
    assert "4 of 4 targets were not build-checked within the check budget of 0 s" in text
    (sweep,) = json.loads((tmp_path / "report.json").read_text())["sweeps"]
    assert [p["build_checked"] for p in sweep["points"]] == [0, 0, 0, 0]


def test_report_without_history_or_registry_still_writes_its_outputs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(patches, "registered_features", lambda: {})
    status, err = _run(["--out", str(tmp_path), "--no-progress"], capsys)
    assert status == 0, err
    assert "no features are registered" in (tmp_path / "report.md").read_text()
    assert json.loads((tmp_path / "report.json").read_text())["sweeps"] == []


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("not-a-repo", "is not a git repository"),
        ("unknown-commit", "commits.tsv:2: unknown commit 'nosuch'"),
        ("unknown-feature", "unknown feature 'ropee'; did you mean 'rope'?"),
        ("repo-without-commits", "--repo and --commits go together"),
        ("bad-family", "--family must be NxM"),
        ("bad-budget", "--check-budget must be a number of seconds"),
        ("missing-out", "the following arguments are required: --out"),
    ],
)
def test_bad_input_is_one_line_and_exit_status_2(
    case: str, message: str, repo: Path, tmp_path: Path, toy_features: None, capsys: pytest.CaptureFixture[str]
) -> None:
    commits = tmp_path / "commits.tsv"
    commits.write_text("ok copy 3\nbad nosuch 1\n" if case == "unknown-commit" else "ok copy 3\n")
    not_a_repo = tmp_path / "plain"
    not_a_repo.mkdir()
    out = ["--out", str(tmp_path / "out")]
    history = ["--repo", str(not_a_repo if case == "not-a-repo" else repo), "--commits", str(commits)]
    argv = {
        "not-a-repo": [*out, *history],
        "unknown-commit": [*out, *history],
        "unknown-feature": [*out, "--features", "ropee"],
        "repo-without-commits": [*out, "--repo", str(repo)],
        "bad-family": [*out, "--family", "8by8"],
        "bad-budget": [*out, "--check-budget", "-3"],
        "missing-out": ["--features", "rope"],
    }[case]
    status, err = _run(argv, capsys)
    assert status == 2
    assert err.count("\n") == 1 and err.startswith("axmini report modularity: error: ") and message in err
    assert not (tmp_path / "out").exists()


def test_readme_table_is_regenerated_between_markers_and_missing_markers_are_refused(
    tmp_path: Path, toy_features: None, capsys: pytest.CaptureFixture[str]
) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n{report.README_BEGIN}\nstale table\n{report.README_END}\nafter\n")
    status, err = _run(
        ["--out", str(tmp_path / "out"), "--features", "rope", "--readme", str(readme), "--no-progress"], capsys
    )
    assert status == 0, err
    text = readme.read_text()
    assert "stale table" not in text and text.startswith("# title\n") and text.endswith(f"{report.README_END}\nafter\n")
    assert "| `rope` | 1 | O(1)" in text

    plain = tmp_path / "PLAIN.md"
    plain.write_text("no markers\n")
    status, err = _run(["--out", str(tmp_path / "out2"), "--readme", str(plain), "--no-progress"], capsys)
    assert status == 2 and "has no '<!-- modularity-table:begin" in err and err.count("\n") == 1
    assert plain.read_text() == "no markers\n" and not (tmp_path / "out2").exists()
