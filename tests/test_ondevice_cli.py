"""The on-device features from the command line: --feature qat / lora fine-tunes of a base run, their exports, and
`axmini sample` with adapters, quantized weights, schemas, regexes and tools; bad input in one line (exit 2)."""

import json
import re

import jsonschema
import pytest

from axmini.cli import main

SMALL = [
    "model.dim=32",
    "model.stack.num_layers=1",
    "input.sequence_length=32",
    "evaluator.input.sequence_length=32",
    "evaluator.num_batches=1",
    "progress_bar=False",
    "checkpointer.async_save=False",
]
SCHEMA = {
    "type": "object",
    "properties": {"n": {"type": "integer"}, "ok": {"type": "boolean"}},
    "required": ["n", "ok"],
}
TOOLS = [{"name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}]


def train(run, *extra):
    argv = ["train", "--config=tiny", f"--trainer_dir={run}", "--sample_prompt=", *extra]
    return main([*argv, *(f"--set={s}" for s in SMALL)])


def one_line_error(capsys, argv, *patterns):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and all(p in err for p in patterns), err


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A base run and a LoRA and a QAT fine-tune of it (2 steps each)."""
    root = tmp_path_factory.mktemp("ondevice")
    assert train(root / "base", "--set=max_step=2") == 0
    for feature in ("lora", "qat"):
        assert train(root / feature, f"--feature={feature}", "--set=max_step=2", f"--init_from={root / 'base'}") == 0
    return root


def test_fine_tunes_write_their_exports_and_report_the_quantized_loss(runs, capsys):
    assert (runs / "lora" / "adapter" / "adapter.json").is_file() and (runs / "qat" / "quantized.npz").is_file()
    assert json.loads((runs / "lora" / "run.json").read_text())["features"] == ["lora"]
    assert train(runs / "qat", "--feature=qat", "--set=max_step=2") == 0
    assert "validation loss" in capsys.readouterr().out  # Resumed at max_step: evaluates again...
    assert main(["configs", "show", "tiny", "--feature=qat"]) == 0
    assert "weight_transform.bits: 2" in capsys.readouterr().out


def test_sample_with_several_adapters_and_with_quantized_weights(runs, capsys):
    adapter = runs / "lora" / "adapter"
    argv = ["sample", f"--trainer_dir={runs / 'base'}", "--prompt=The", "--max_new_tokens=4"]
    assert main([*argv, f"--adapter={adapter}", f"--adapter={adapter}"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith(f"[adapter {adapter}] The") for line in lines)
    assert main(["sample", f"--trainer_dir={runs / 'qat'}", "--prompt=The", "--max_new_tokens=4", "--quantized"]) == 0
    assert capsys.readouterr().out.startswith("The")


def test_sample_with_a_schema_a_regex_and_tools(runs, tmp_path, capsys):
    (tmp_path / "schema.json").write_text(json.dumps(SCHEMA))
    (tmp_path / "tools.json").write_text(json.dumps(TOOLS))
    argv = ["sample", f"--trainer_dir={runs / 'base'}", "--prompt=Answer:", "--max_new_tokens=24", "--num_samples=3"]
    assert main([*argv, f"--schema={tmp_path / 'schema.json'}"]) == 0
    for line in capsys.readouterr().out.strip().splitlines():
        jsonschema.validate(json.loads(line), SCHEMA)
    assert main([*argv, "--regex=(yes|no), [0-9]{2}"]) == 0
    assert all(re.fullmatch(r"(yes|no), [0-9]{2}", line) for line in capsys.readouterr().out.strip().splitlines())
    assert main([*argv, f"--tools={tmp_path / 'tools.json'}"]) == 0
    for line in capsys.readouterr().out.strip().splitlines():
        assert json.loads(line)["name"] == "add"


def test_bad_on_device_input_is_a_one_line_error(runs, tmp_path, capsys):
    base = f"--trainer_dir={runs / 'base'}"
    one_line_error(capsys, ["sample", base, "--prompt=x", "--regex=\u00e6+"], "--regex", "no output of this vocabulary")
    one_line_error(capsys, ["sample", base, "--prompt=x", "--regex=[0-9]{30}", "--max_new_tokens=3"], "too short")
    one_line_error(capsys, ["sample", base, "--prompt=x", f"--schema={tmp_path / 'none.json'}"], "cannot read")
    one_line_error(capsys, ["sample", base, "--prompt=x", "--quantized"], "quantized.npz is missing")
    one_line_error(capsys, ["sample", base, "--prompt=x", f"--adapter={tmp_path}"], "holds no adapter")
    one_line_error(
        capsys, ["train", "--config=tiny", f"--trainer_dir={tmp_path / 'r'}", "--feature=qatt"], "unknown feature"
    )
    one_line_error(
        capsys,
        ["train", "--config=tiny", f"--trainer_dir={tmp_path / 'r'}", f"--init_from={tmp_path}"],
        "holds no checkpoint",
    )
    one_line_error(capsys, ["train", "--config=tiny", f"--trainer_dir={runs / 'lora'}"], "features ['lora']")
    assert not (tmp_path / "r").exists()
