"""`axmini report modularity`: outputs with valid PNGs, outcome counts everywhere, the comparison section, the
README table, `--grid`, and one-line errors with exit status 2."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
import pytest
from test_loc_patches import FEATURES, toy_experiments, toy_family

from axmini import features as features_lib
from axmini.cli import main as axmini_main
from axmini.tools import cli, modularity
from axmini.tools.families import grid_sizes

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def toy(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[tuple[int, int]]:
    """The toy features, a toy N x M family and three toy experiments stand in for axmini's; no peer measurement.
    Returns the grid sizes the report asked for."""
    asked = []

    def families(n: int, m: int):
        asked.append((n, m))
        return [(toy_family(n, m, forward=False), grid_sizes(n, m)), (toy_experiments(), [(1, 1), (2, 1), (3, 1)])]

    monkeypatch.setattr(features_lib, "FEATURES", dict(FEATURES))
    monkeypatch.setattr(modularity, "default_families", families)
    monkeypatch.setattr(modularity, "DEFAULT_PEERS", tmp_path / "no-peers.json")
    return asked


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    status = cli.main(["modularity", *argv, "--no-progress"])
    return status, capsys.readouterr().err


def test_report_writes_markdown_html_json_and_valid_pngs(
    tmp_path: Path, toy: list, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    status, err = _run(["--out", str(out), "--grid", "2x2"], capsys)
    assert status == 0, err
    for name in ("report.md", "report.html", "report.json"):
        assert (out / name).stat().st_size > 0
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["changes_vs_lines.png", "integration_moe.png", "integration_rope.png"]
    html = (out / "report.html").read_text()
    for png in pngs:
        assert (out / png).read_bytes().startswith(PNG_SIGNATURE)
        image = matplotlib.image.imread(out / png)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        assert f"({png})" in (out / "report.md").read_text()
    assert html.count("data:image/png;base64,") == len(pngs) and 'src="integration' not in html

    data = json.loads((out / "report.json").read_text())
    assert set(data["features"]) == {"rope", "moe"} and data["features"]["rope"]["user_lines"] == 1
    assert data["features"]["rope"]["modifiers"] == ["ToyRoPEModifier"]
    sweeps = {(s["feature"], s["family"]): s for s in data["sweeps"]}
    assert sweeps["rope", "toy"]["complexity"]["user_lines"]["label"] == "O(1)"
    assert [p["n"] * p["m"] for p in sweeps["rope", "toy"]["points"]] == [1, 2, 2, 4]
    assert data["baselines"]["rope"]["complexity"]["label"] == "O(N*M)"
    assert data["baselines"]["moe"]["complexity"]["label"] == "O(N)"


def test_outcomes_and_refusal_reasons_are_in_the_tables_and_the_plots(
    tmp_path: Path, toy: list, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    status, err = _run(["--out", str(tmp_path), "--grid", "2x2"], capsys)
    assert status == 0, err
    text = (tmp_path / "report.md").read_text()
    reason = "patch: ValueError: ToyRoPEModifier: the model has no blocks to give RoPE to"
    assert "| rope | experiments | 1 | 8 | 2 applies / 1 refused |" in text
    assert f"- refused on 1: {reason}" in text
    data = json.loads((tmp_path / "report.json").read_text())
    (sweep,) = [s for s in data["sweeps"] if s["feature"] == "rope" and s["family"] == "experiments"]
    assert sweep["reasons"]["refused"] == {reason: 1}
    assert [(p["applies"], p["refused"]) for p in sweep["points"]] == [(1, 0), (1, 1), (2, 1)]
    # The plot's legend carries the same counts (checked where the label is drawn).
    labels, draw = [], modularity.plots.series
    monkeypatch.setattr(
        modularity.plots, "series", lambda ax, xs, ys, label, *a: labels.append(label) or draw(ax, xs, ys, label, *a)
    )
    modularity.plot_integration(modularity.run_modularity(grid=(2, 2), progress=False), "rope", tmp_path)
    assert any("experiments (2 applies / 1 refused)" in label for label in labels)


def test_checks_past_the_budget_are_reported_as_not_checked(
    tmp_path: Path, toy: list, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--out", str(tmp_path), "--features", "rope", "--check-budget", "0", "--grid", "2x2"]
    status, err = _run(argv, capsys)
    assert status == 0, err
    text = (tmp_path / "report.md").read_text()
    assert "6 of 7 targets were not build-checked within the check budget of 0 s" in text  # 1 refused anyway.
    assert "0 applies / 4 not checked" in text


def test_grid_option_sets_the_synthetic_family_size(
    tmp_path: Path, toy: list, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--out", str(tmp_path), "--features", "moe", "--check-budget", "0", "--grid", "20x10"]
    status, err = _run(argv, capsys)
    assert status == 0, err
    assert toy == [(20, 10)]
    data = json.loads((tmp_path / "report.json").read_text())
    (sweep,) = [s for s in data["sweeps"] if s["family"] == "toy"]
    assert data["grid"] == [20, 10] and sweep["points"][-1]["n"] == 20 and sweep["points"][-1]["m"] == 10


def test_the_comparison_puts_axmini_beside_the_paper_and_the_peers(
    tmp_path: Path, toy: list, capsys: pytest.CaptureFixture[str]
) -> None:
    peers = tmp_path / "peers.json"
    change = {"number": 7, "repository": "peer", "feature": "rope", "status": "measured", "reason": ""}
    change |= {"revisions": ["a" * 40], "commits": [{"id": "a" * 40, "date": "2024-01-02T00:00:00"}]}
    change |= {"stats": {"integration_loc": 40, "implementation_loc": 9, "models_touched": ["m1", "m2"]}}
    refused = change | {"number": 8, "status": "refused", "reason": "not in this clone", "stats": None}
    peers.write_text(
        json.dumps({"catalogue": {"sha256": "f" * 64}, "changes": [change | {"integration_per_model": 20.0}, refused]})
    )
    status, err = _run(["--out", str(tmp_path / "out"), "--grid", "2x2", "--peers", str(peers)], capsys)
    assert status == 0, err
    text = (tmp_path / "out/report.md").read_text()
    section = text.split("## axmini beside the AXLearn paper and the peers", 1)[1]
    assert "| rope | axmini `rope` | 1 lines written (+8 modifier lines) | 4 targets |" in section
    assert "| rope | AXLearn (paper) | 10 | hundreds of modules | O(1) | abstract, arXiv 2507.05411" in section
    assert "| rope | peer | 40 integration (+9 implementation) | 2 models touched, 20.0/model |" in section
    assert "| rope | peer | refused: not in this clone |" in section
    assert "aaaaaaaaaa 2024-01-02" in section


def test_without_a_peer_measurement_the_comparison_says_where_to_get_one(
    tmp_path: Path, toy: list, capsys: pytest.CaptureFixture[str]
) -> None:
    status, err = _run(["--out", str(tmp_path), "--grid", "2x2", "--features", "rope"], capsys)
    assert status == 0, err
    assert "run benchmarks/peer_history.py to make one" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--features", "ropee"], "unknown feature 'ropee'; did you mean 'rope'?"),
        (["--grid", "8by8"], "--grid must be NxM"),
        (["--check-budget", "-3"], "--check-budget must be a number of seconds"),
        (["--peers", "/no/such/report.json"], "--peers /no/such/report.json: no such file"),
        (["--family", "8x8"], "unrecognized arguments: --family 8x8"),
    ],
)
def test_bad_input_is_one_line_and_exit_status_2(
    argv: list[str], message: str, tmp_path: Path, toy: list, capsys: pytest.CaptureFixture[str]
) -> None:
    status, err = _run(["--out", str(tmp_path / "out"), *argv], capsys)
    assert status == 2
    assert err.count("\n") == 1 and err.startswith("axmini report: error: ") and message in err
    assert not (tmp_path / "out").exists()


def test_usage_errors_of_the_report_command_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert axmini_main(["report", "nosuch"]) == 2
    assert axmini_main(["report", "modularity"]) == 2  # --out is required.
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "invalid choice: 'nosuch'" in err and "required: --out" in err
    assert axmini_main(["report", "history", "--help"]) == 0


def test_readme_table_is_regenerated_between_markers_and_missing_markers_are_refused(
    tmp_path: Path, toy: list, capsys: pytest.CaptureFixture[str]
) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n{modularity.README_BEGIN}\nstale table\n{modularity.README_END}\nafter\n")
    argv = ["--out", str(tmp_path / "out"), "--features", "rope", "--readme", str(readme), "--grid", "2x2"]
    status, err = _run(argv, capsys)
    assert status == 0, err
    text = readme.read_text()
    assert (
        "stale table" not in text
        and text.startswith("# title\n")
        and text.endswith(f"{modularity.README_END}\nafter\n")
    )
    reason = "patch: ValueError: ToyRoPEModifier: the model has no blocks to give RoPE to"
    assert f"| `rope` | 1 | 2 applies / 1 refused | {reason} | 4 applies |" in text

    plain = tmp_path / "PLAIN.md"
    plain.write_text("no markers\n")
    status, err = _run(["--out", str(tmp_path / "out2"), "--readme", str(plain)], capsys)
    assert status == 2 and "has no '<!-- modularity-table:begin" in err and err.count("\n") == 1
    assert plain.read_text() == "no markers\n" and not (tmp_path / "out2").exists()
