"""The commands on experiments and data of the user's own: an experiment file outside sys.path and an experiment
module train on a folder of .txt files and on a .jsonl file (validation loss goes down), show, diff, sample and
evaluate; `configs show --mesh_selector` prints the run's config.txt byte for byte; the vocabulary is trained once
and reused on resume; bad input is one line, exit 2, and nothing written."""

import json
import math
import uuid

import numpy as np
import pytest
from test_cli import fails_in_one_line, snapshot

from axmini.cli import main
from axmini.trainer import data as data_lib
from axmini.trainer.checkpointer import Checkpointer

NUMBERS = "one two three four five six seven eight nine ten eleven twelve".split()
# An experiment file as a user writes one: a small `tiny` that learns in a few dozen steps.
EXPERIMENT = """
from axmini.experiments.lm import tiny


def small():
    cfg = tiny()
    cfg.model.set(dim=32, vocab_size=128)
    cfg.model.stack.num_layers = 1
    cfg.input.set(global_batch_size=8, sequence_length=32)
    cfg.evaluator.input.set(global_batch_size=8, sequence_length=32)
    cfg.evaluator.set(every_n_steps=10, num_batches=2)
    cfg.learner.learning_rate.set(peak_lr=1e-2, warmup_steps=5)
    cfg.checkpointer.set(save_every_n_steps=10, async_save=False)
    return cfg.set(max_step=30, log_every_n_steps=10, progress_bar=False)


def not_a_config():
    return 42
"""


def counting_lines(count: int, seed: int) -> list[str]:
    """Runs of consecutive number words (`five six seven ...`): each word is predictable from the one before."""
    rng = np.random.default_rng(seed)
    starts, lengths = rng.integers(0, len(NUMBERS), count), rng.integers(4, 16, count)
    return [" ".join(NUMBERS[(s + k) % len(NUMBERS)] for k in range(n)) for s, n in zip(starts, lengths)]


def write_module(directory, name: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.py").write_text(EXPERIMENT)


def eval_losses(run) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["eval/loss"] for r in records if "eval/loss" in r]


def lowered_validation_loss(out: str, run) -> None:
    losses = eval_losses(run)
    assert len(losses) >= 3 and losses[-1] < losses[0] - 0.2, losses
    assert "below the unigram entropy" in out, out  # It learned what follows what, not only word frequencies.


def test_an_experiment_file_outside_sys_path_trains_on_txt_files_shows_diffs_samples_and_evaluates(
    tmp_path, capsys, monkeypatch, user_modules
):
    stem = f"exps_{uuid.uuid4().hex[:8]}"
    write_module(tmp_path / "project", stem)
    experiment = f"{tmp_path / 'project' / stem}.py:small"
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"part{i}.txt").write_text("\n".join(counting_lines(100, i)) + "\n")
    run = tmp_path / "run"
    flags = [f"--data={corpus}", "--validation_fraction=0.2", f"--trainer_dir={run}"]

    assert main(["train", f"--config={experiment}", *flags, "--sample_prompt=three four"]) == 0
    out = capsys.readouterr().out
    assert "trained to step 30" in out and "sample (temperature 0.7" in out
    lowered_validation_loss(out, run)
    assert (run / "vocab.model").is_file()  # Trained on the data, next to the run.

    assert main(["configs", "show", experiment, *flags, "--mesh_selector=cpu"]) == 0
    assert capsys.readouterr().out == (run / "config.txt").read_text()  # Byte for byte what trained.
    assert main(["configs", "diff", experiment, "tiny"]) == 0
    diff = capsys.readouterr().out.splitlines()
    assert "- model.dim: 32" in diff and "+ model.dim: 128" in diff and "- max_step: 30" in diff

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one two\n\nseven eight\n")
    restored = []

    def recording(name):
        original = getattr(Checkpointer, name)

        def restore(self, step, abstract):
            restored.append((name, sorted(abstract)))
            return original(self, step, abstract)

        return restore

    for name in ("restore", "restore_subtree"):  # The whole state, or only the entries asked for.
        monkeypatch.setattr(Checkpointer, name, recording(name))
    assert main(["sample", f"--trainer_dir={run}", f"--prompt_file={prompts}", "--num_samples=2"]) == 0
    assert restored == [("restore_subtree", ["params", "rest"])]  # The model's variables only: no optimizer state.
    samples = capsys.readouterr().out.splitlines()
    assert len(samples) == 4 and all(s.startswith("one two") for s in samples[:2])
    assert all(s.startswith("seven eight") for s in samples[2:])

    assert main(["eval", f"--trainer_dir={run}", "--num_batches=2"]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    # The same checkpoint on the same two validation batches as the trainer's last evaluation.
    assert result["step"] == 30 and result["batches"] == 2
    np.testing.assert_allclose(result["loss"], eval_losses(run)[-1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result["perplexity"], math.exp(result["loss"]), rtol=1e-9, atol=0)
    assert result["tokens"] > 0 and result["tokens_per_second"] > 0


def test_an_experiment_module_trains_on_a_jsonl_file_and_reuses_its_vocabulary_on_resume(
    tmp_path, capsys, monkeypatch, user_modules
):
    package = f"project_{uuid.uuid4().hex[:8]}"
    write_module(tmp_path / package, "exps")
    (tmp_path / package / "__init__.py").write_text("")
    monkeypatch.chdir(tmp_path)  # Module paths resolve from the current directory, as with `python -m`.
    with open(tmp_path / "docs.jsonl", "w") as f:
        f.writelines(json.dumps({"id": i, "body": line}) + "\n" for i, line in enumerate(counting_lines(300, 7)))
    run = tmp_path / "run"
    flags = ["--data=docs.jsonl", "--data_field=body", "--validation_fraction=0.2", f"--trainer_dir={run}"]

    assert main(["train", f"--config={package}.exps:small", *flags, "--sample_prompt="]) == 0
    out = capsys.readouterr().out
    lowered_validation_loss(out, run)
    assert main(["configs", "show", f"{package}.exps:small", *flags, "--mesh_selector=cpu"]) == 0
    assert capsys.readouterr().out == (run / "config.txt").read_text()

    vocab = (run / "vocab.model").stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("the vocabulary was trained again")

    monkeypatch.setattr(data_lib, "train_sentencepiece", no_training)
    resumed = ["train", f"--config={package}.exps:small", *flags, "--set=max_step=40", "--sample_prompt="]
    assert main(resumed) == 0
    assert "trained to step 40" in capsys.readouterr().out
    assert (run / "vocab.model").stat().st_mtime_ns == vocab

    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("five six\n"))
    assert main(["sample", f"--trainer_dir={run}", "--max_new_tokens=4"]) == 0
    assert capsys.readouterr().out.startswith("five six")
    assert main(["eval", f"--trainer_dir={run}", "--data=docs.jsonl", "--data_field=body"]) == 0
    table = capsys.readouterr().out
    assert "on the files docs.jsonl" in table and json.loads(table.splitlines()[-1])["step"] == 40


@pytest.fixture
def bad_inputs(tmp_path):
    """What a user can get wrong: files and data that exist, but not as the commands need them."""
    stem = f"exps_{uuid.uuid4().hex[:8]}"
    write_module(tmp_path, stem)
    (tmp_path / "empty").mkdir()
    (tmp_path / "docs.txt").write_text("\n".join(counting_lines(20, 0)) + "\n")
    (tmp_path / "no_field.jsonl").write_text('{"title": "one two"}\n')
    (tmp_path / "bad.model").write_text("this is not a sentencepiece model")
    return {"file": tmp_path / f"{stem}.py", "dir": tmp_path}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--config={dir}/missing.py:small"], "no such file {dir}/missing.py"),
        (["--config={file}:nope"], "{file} has no function 'nope'"),
        (["--config={file}:not_a_config"], "not_a_config() returned int 42, not a trainer config"),
        (["--config=tiny", "--data={dir}/empty/*.txt"], "input.task.train='{dir}/empty/*.txt' matches no file"),
        (["--config=tiny", "--data={dir}/no_field.jsonl"], "no_field.jsonl (its first record) has no string field"),
        (["--config=tiny", "--data={dir}/docs.txt", "--vocab={dir}/bad.model"], "{dir}/bad.model' is not a Sentence"),
        (["--config=tiny", "--vocab={dir}/bad.model"], "--vocab needs --data"),
    ],
)
def test_bad_experiments_and_data_are_one_line_exit_2_and_write_nothing(
    bad_inputs, user_modules, capsys, args, message
):
    args = [a.format(**bad_inputs) for a in args]

    def files() -> dict[str, str]:  # Python's own bytecode cache of an imported experiment file aside.
        return {path: h for path, h in snapshot(bad_inputs["dir"]).items() if "__pycache__" not in path}

    before = files()
    run = bad_inputs["dir"] / "run"
    fails_in_one_line(capsys, ["train", *args, f"--trainer_dir={run}"], message.format(**bad_inputs))
    if args[0].startswith("--config=") and "tiny" not in args[0]:  # The other commands take experiments alike.
        fails_in_one_line(capsys, ["configs", "show", args[0].split("=", 1)[1]], message.format(**bad_inputs))
    assert files() == before and not run.exists()
