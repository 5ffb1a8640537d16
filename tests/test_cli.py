"""The `axmini` command: bad invocations fail in one line (exit code 2) and write nothing; configs; train, sample."""

import hashlib
import json
import os
import pathlib
import subprocess
import sys

import pytest

from axmini.cli import main
from axmini.layers.embedding import Embedding


def snapshot(root: pathlib.Path) -> dict[str, str]:
    """{relative path: content hash} of every file under `root` (directories as '<dir>')."""
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): "<dir>" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
    }


def fails_in_one_line(capsys, argv, *patterns):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    for pattern in patterns:
        assert pattern in err, err
    return err


def test_unknown_config_name_suggests_the_closest(tmp_path, capsys):
    run = tmp_path / "run"
    fails_in_one_line(capsys, ["train", "--config=tinny", f"--trainer_dir={run}"], "'tinny'", "did you mean 'tiny'")
    assert not run.exists()


def test_unknown_set_path(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "--config=tiny", "--set", "model.dimm=64", f"--trainer_dir={run}"]
    fails_in_one_line(capsys, argv, "model.dimm", "did you mean 'dim'")
    assert not run.exists()


def test_bad_value_type(tmp_path, capsys):
    run = tmp_path / "run"
    fails_in_one_line(capsys, ["train", "--config=tiny", "--set", "max_step=many", f"--trainer_dir={run}"], "max_step")
    fails_in_one_line(capsys, ["train", "--config=tiny", "--set", "max_step", f"--trainer_dir={run}"], "PATH=VALUE")
    assert not run.exists()


def test_trainer_dir_not_writable(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    fails_in_one_line(capsys, ["train", "--config=tiny", f"--trainer_dir={blocker / 'run'}"], "not writable")
    fails_in_one_line(capsys, ["train", "--config=tiny", f"--trainer_dir={blocker}"], "not a directory")
    if os.geteuid() != 0:  # root writes anywhere.
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        fails_in_one_line(capsys, ["train", "--config=tiny", f"--trainer_dir={locked / 'run'}"], "not writable")
    assert blocker.read_text() == "not a directory"


def test_an_existing_run_is_left_untouched_by_a_bad_invocation(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints" / "5").mkdir(parents=True)
    (run / "run.json").write_text('{"config": "tiny", "overrides": []}\n')
    (run / "metrics.jsonl").write_text('{"step": 5}\n')
    before = snapshot(run)
    fails_in_one_line(
        capsys, ["train", "--config=tiny", "--set", "model.dim=oops", f"--trainer_dir={run}"], "model.dim"
    )
    fails_in_one_line(capsys, ["train", "--config=llama_100m", f"--trainer_dir={run}"], "holds a run of experiment")
    bad_cfg = ["train", "--config=tiny", "--set", "input.global_batch_size=12", f"--trainer_dir={run}"]
    fails_in_one_line(capsys, bad_cfg, "input.global_batch_size=12 must be a multiple")
    assert snapshot(run) == before


def test_sample_without_a_checkpoint_fails_and_writes_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text('{"config": "tiny", "overrides": []}\n')
    before = snapshot(run)
    fails_in_one_line(capsys, ["sample", f"--trainer_dir={run}", "--prompt=x"], "has no checkpoint yet")
    assert snapshot(run) == before


def test_a_value_a_layer_refuses_is_a_one_line_error_naming_its_path(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "--config=tiny", "--set=model.stack.layer.self_attention.num_heads=3", f"--trainer_dir={run}"]
    fails_in_one_line(capsys, argv, "model.stack.layer.self_attention.num_heads=3 is not divisible by")
    assert not run.exists()


def test_a_bug_during_setup_raises_with_its_traceback_and_writes_nothing(tmp_path, capsys, monkeypatch):
    def bug(self, cfg, *, rngs):
        raise ValueError("injected bug")  # Not a config check: a ValueError from a layer's own code.

    monkeypatch.setattr(Embedding, "__init__", bug)
    run = tmp_path / "run"
    with pytest.raises(ValueError, match="injected bug"):
        main(["train", "--config=tiny", f"--trainer_dir={run}"])
    assert "error" not in capsys.readouterr().err and not run.exists()


def test_a_bug_during_setup_exits_with_code_1_and_its_traceback():
    program = (
        "import sys\n"
        "import axmini.layers.rattention as rattention\n"
        "def bug(*args, **kwargs):\n"
        "    raise RuntimeError('injected bug')\n"
        "rattention.to_rattention = bug\n"
        "from axmini.cli import main\n"
        "sys.exit(main(['configs', 'show', 'tiny_rattention']))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(pathlib.Path(__file__).resolve().parents[1]), JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert "Traceback (most recent call last)" in result.stderr, result.stderr
    assert result.stderr.strip().endswith("RuntimeError: injected bug"), result.stderr
    assert "axmini configs: error" not in result.stderr


def test_usage_errors_are_one_line(capsys):
    fails_in_one_line(capsys, ["train"], "--config")
    fails_in_one_line(capsys, ["bogus"], "invalid choice")
    fails_in_one_line(capsys, ["configs", "show"], "one experiment name")
    fails_in_one_line(capsys, ["sample", "--trainer_dir=/nonexistent/run", "--prompt=x"], "run.json is missing")


@pytest.mark.parametrize(
    "argv", [["--help"], ["train", "--help"], ["sample", "--help"], ["configs", "--help"], ["launch", "--help"]]
)
def test_help_everywhere(argv, capsys):
    assert main(argv) == 0
    assert "usage:" in capsys.readouterr().out


def test_report_modularity_reaches_the_report_tool(capsys):
    assert main(["report", "modularity", "--help"]) == 0
    assert "modularity" in capsys.readouterr().out


def test_configs_list_show_diff(capsys):
    assert main(["configs", "list"]) == 0
    names = capsys.readouterr().out.split()
    assert "tiny" in names and "llama_100m" in names
    assert main(["configs", "show", "tiny", "--set", "max_step=7"]) == 0
    assert "\nmax_step: 7\n" in capsys.readouterr().out
    assert main(["configs", "diff", "tiny", "llama_100m"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "- model.dim: 128" in out and "+ model.dim: 768" in out
    assert not any(line.startswith(("- klass", "+ klass")) for line in out)
    assert main(["configs", "diff", "tiny", "tiny"]) == 0
    assert "identical" in capsys.readouterr().out


def test_train_then_sample_end_to_end(tmp_path, capsys):
    run = tmp_path / "run"
    small = [
        "max_step=2",
        "model.dim=32",
        "model.stack.num_layers=1",
        "input.sequence_length=32",
        "evaluator.input.sequence_length=32",
        "evaluator.num_batches=1",
        "progress_bar=False",
    ]
    argv = ["train", "--config=tiny", f"--trainer_dir={run}", *(f"--set={s}" for s in small)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "trained to step 2" in out and "validation loss" in out and "unigram entropy" in out
    assert "sample (temperature 0.7" in out
    assert (run / "run.json").exists() and (run / "checkpoints" / "2").is_dir()
    show = ["configs", "show", "tiny", f"--trainer_dir={run}", "--mesh_selector=cpu", *(f"--set={s}" for s in small)]
    assert main(show) == 0
    assert capsys.readouterr().out == (run / "config.txt").read_text()  # What trained, byte for byte.

    assert main(["sample", f"--trainer_dir={run}", "--prompt=The module", "--max_new_tokens=4", "--num_samples=2"]) == 0
    samples = capsys.readouterr().out.strip().splitlines()
    assert len(samples) == 2 and all(s.startswith("The module") for s in samples)
    fails_in_one_line(capsys, ["sample", f"--trainer_dir={run}", "--prompt=x", "--temperature=-1"], "--temperature")


# A `axmini train` run in a subprocess (real signal handling), with hooks that make the timing deterministic:
# argv[1] = "crash": the process dies (os._exit) right after logging step 3, before any checkpoint of step 3;
# argv[1] = "sigterm": SIGTERM arrives during the final checkpoint save (every step has run) and again when the
# closing sample starts.
RUN_WITH_HOOKS = """
import os, signal, sys
import axmini.decoding
import axmini.cli
from axmini.trainer.checkpointer import Checkpointer
from axmini.trainer.summary import SummaryWriter

mode, trainer_dir = sys.argv[1], sys.argv[2]
write, save = SummaryWriter.write, Checkpointer.save

def write_then_crash(self, step, metrics, prefix="train"):
    write(self, step, metrics, prefix)
    if step == 3:
        os._exit(1)

def sigterm_then_save(self, step, state, metadata=None, *, force=False):
    if force:
        os.kill(os.getpid(), signal.SIGTERM)
    return save(self, step, state, metadata, force=force)

def sigterm_then_generate(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    return generate(*args, **kwargs)

if mode == "crash":
    SummaryWriter.write = write_then_crash
else:
    Checkpointer.save = sigterm_then_save
    generate = axmini.decoding.generate
    axmini.decoding.generate = sigterm_then_generate
small = ["max_step=5", "log_every_n_steps=1", "checkpointer.save_every_n_steps=2", "checkpointer.async_save=False",
         "model.dim=32", "model.stack.num_layers=1", "input.sequence_length=32", "evaluator.input.sequence_length=32",
         "evaluator.num_batches=1", "evaluator.every_n_steps=100", "progress_bar=False"]
argv = ["train", "--config=tiny", f"--trainer_dir={trainer_dir}", *(f"--set={s}" for s in small)]
sys.exit(axmini.cli.main(argv))
"""


def test_resumed_run_logs_each_step_once_and_late_sigterm_still_exits_0(tmp_path):
    run_dir = tmp_path / "run"

    def run(mode):
        return subprocess.run(
            [sys.executable, "-c", RUN_WITH_HOOKS, mode, str(run_dir)], capture_output=True, text=True, timeout=600
        )

    crashed = run("crash")
    assert crashed.returncode == 1, crashed.stderr[-2000:]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["2"]

    finished = run("sigterm")
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert "trained to step 5" in finished.stdout
    assert "training finished; sample skipped (SIGTERM)" in finished.stderr
    assert "5" in [p.name for p in (run_dir / "checkpoints").iterdir()]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2, 3, 4, 5]  # Step 3 of the crashed run: once.
