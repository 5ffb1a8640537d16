"""`axmini convert hf`, `axmini export hf` and `axmini train --init_from`: a Hugging Face model becomes a trainer dir
that sample, fine-tune and export use; the model's own tokenizer comes along; bad input fails in one line (exit 2)
and writes nothing."""

import json
import re
import shutil

import flax.nnx as nnx
import numpy as np
import pytest
import tokenizers
import transformers
from hf_models import logits, make_model
from test_cli import fails_in_one_line, snapshot
from test_interop import BAD_INPUTS

from axmini.cli import main
from axmini.cli.common import read_run_file, run_config
from axmini.interop.runs import restore_params
from axmini.interop.safetensors import TensorIndex
from axmini.lora import ADAPTER_PATTERN
from axmini.trainer import corpus

SMALL = ["input.sequence_length=32", "evaluator.input.sequence_length=32", "evaluator.num_batches=1"]
SMALL += ["progress_bar=False", "input.global_batch_size=8"]


def _llama(directory, vocab_size):
    torch_model = make_model("llama")
    config = torch_model.config
    config.vocab_size = vocab_size
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(directory)
    return model


@pytest.fixture(scope="module")
def sentencepiece_dir(tmp_path_factory):
    """A tiny Llama with the embedded corpus's SentencePiece model as its tokenizer.model."""
    directory = tmp_path_factory.mktemp("hf") / "llama_sp"
    _llama(directory, 2048)
    shutil.copyfile(corpus.prepare_vocab(2048), directory / "tokenizer.model")
    return directory


@pytest.fixture(scope="module")
def tokenizer_json_dir(tmp_path_factory):
    """A tiny Llama with a BPE tokenizer.json (trained on the corpus with the `tokenizers` package)."""
    directory = tmp_path_factory.mktemp("hf") / "llama_tj"
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel()
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "</s>", "<unk>"])
    lines = corpus.prepare_corpus().train.read_text().splitlines()[:2000]
    tokenizer.train_from_iterator(lines, trainer)
    tokenizer.save(str(directory.parent / "tokenizer.json"))
    model = _llama(directory, 320)
    model.config.eos_token_id = 1
    model.config.save_pretrained(directory)
    shutil.copyfile(directory.parent / "tokenizer.json", directory / "tokenizer.json")
    return directory


@pytest.fixture(scope="module")
def converted(sentencepiece_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "converted"
    assert main(["convert", "hf", str(sentencepiece_dir), f"--out={run}", *(f"--set={s}" for s in SMALL)]) == 0
    return run


def test_convert_writes_a_trainer_dir_with_the_model_its_tokenizer_and_the_weights(converted):
    record = json.loads((converted / "run.json").read_text())
    assert record["config"] == "finetune" and record["params_only"] and record["model_dir"] == "model"
    assert (converted / "model" / "config.json").exists() and (converted / "model" / "tokenizer.model").exists()
    assert (converted / "checkpoints" / "0").is_dir()
    assert not list(converted.parent.glob(".converted.partial-*"))


def test_sample_reads_the_converted_weights_with_the_models_tokenizer(converted, capsys):
    argv = ["sample", f"--trainer_dir={converted}", "--prompt=The module", "--max_new_tokens=4", "--temperature=0"]
    assert main(argv) == 0
    assert capsys.readouterr().out.startswith("The module")


def test_export_of_the_converted_dir_is_bit_exact_and_loads_in_transformers(converted, sentencepiece_dir, tmp_path):
    assert main(["export", "hf", str(converted), f"--out={tmp_path / 'out'}"]) == 0
    before, after = TensorIndex.open(sentencepiece_dir), TensorIndex.open(tmp_path / "out")
    assert sorted(before.entries) == sorted(after.entries)
    assert all(before.read(n).tobytes() == after.read(n).tobytes() for n in before.entries)
    assert (tmp_path / "out" / "tokenizer.model").read_bytes() == (sentencepiece_dir / "tokenizer.model").read_bytes()
    ids = np.arange(12).reshape(2, 6)
    original = transformers.AutoModelForCausalLM.from_pretrained(sentencepiece_dir).eval()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    np.testing.assert_array_equal(logits(reloaded, ids), logits(original, ids))


def _losses(run):
    records = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return [r["train/loss"] for r in records if "train/loss" in r]


def test_finetune_from_a_hugging_face_dir_lowers_the_loss_with_its_tokenizer_json(tokenizer_json_dir, tmp_path, capsys):
    run = tmp_path / "run"
    sets = [*SMALL, "max_step=20", "log_every_n_steps=1", "learner.learning_rate.peak_lr=3e-3"]
    argv = ["train", "--config=finetune", f"--init_from=hf:{tokenizer_json_dir}", f"--trainer_dir={run}"]
    assert main([*argv, "--sample_prompt=", *(f"--set={s}" for s in sets)]) == 0
    assert "trained to step 20" in capsys.readouterr().out
    record = json.loads((run / "run.json").read_text())
    assert record["model_dir"] == "model" and (run / "model" / "tokenizer.json").exists()
    losses = _losses(run)
    assert len(losses) == 20 and np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.1, losses
    assert main(["sample", f"--trainer_dir={run}", "--prompt=The", "--max_new_tokens=3", "--temperature=0"]) == 0
    fails_in_one_line(capsys, ["sample", f"--trainer_dir={run}", "--prompt=x", "--regex=[0-9]"], "SentencePiece")


def test_init_from_a_converted_dir_starts_from_its_weights(converted, sentencepiece_dir, tmp_path):
    run = tmp_path / "run"
    argv = ["train", "--config=finetune", f"--init_from={converted}", f"--trainer_dir={run}", "--sample_prompt="]
    assert main([*argv, *(f"--set={s}" for s in [*SMALL, "max_step=0"])]) == 0
    assert json.loads((run / "run.json").read_text())["init_from"] == str(converted)
    assert (run / "model" / "tokenizer.model").exists()
    assert main(["export", "hf", str(run), f"--out={tmp_path / 'out'}"]) == 0  # The step-0 weights, as imported.
    before, after = TensorIndex.open(sentencepiece_dir), TensorIndex.open(tmp_path / "out")
    assert all(before.read(n).tobytes() == after.read(n).tobytes() for n in before.entries)


def _params(trainer_dir):
    """{path: array} of the parameters in the latest checkpoint of `trainer_dir`."""
    trainer = run_config(str(trainer_dir), read_run_file(str(trainer_dir))).set(progress_bar=False).instantiate()
    params = restore_params(trainer, trainer.config.checkpointer.dir)["params"]
    return {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(params)}


@pytest.mark.parametrize("source", ["converted", "hf"])
def test_lora_fine_tune_of_an_imported_model_trains_adapters_on_its_frozen_weights(
    source, converted, sentencepiece_dir, tmp_path, capsys
):
    run = tmp_path / "lora"
    init_from = str(converted) if source == "converted" else f"hf:{sentencepiece_dir}"
    argv = ["train", "--config=finetune", f"--init_from={init_from}", "--feature=lora", f"--trainer_dir={run}"]
    assert main([*argv, "--sample_prompt=", *(f"--set={s}" for s in [*SMALL, "max_step=2"])]) == 0
    record = json.loads((run / "run.json").read_text())
    assert record["features"] == ["lora"] and record["init_from"] == init_from and record["model_dir"] == "model"
    assert (run / "checkpoints" / "0").is_dir()  # The starting point, saved before the first step.
    base, tuned = _params(converted), _params(run)
    assert all(np.array_equal(tuned[path], base[path]) for path in base)  # Frozen: bit-identical to the import.
    adapters = sorted(set(tuned) - set(base))
    assert adapters and all(re.search(ADAPTER_PATTERN, path) for path in adapters)
    assert any(np.abs(tuned[path]).max() > 0 for path in adapters if path.endswith("lora/b"))  # B left zero: trained.
    capsys.readouterr()
    adapter = run / "adapter"
    sample = ["sample", f"--trainer_dir={converted}", "--prompt=The", "--max_new_tokens=3", f"--adapter={adapter}"]
    assert main(sample) == 0
    assert capsys.readouterr().out.startswith(f"[adapter {adapter}] The")


def test_init_from_a_hugging_face_dir_without_its_model_is_a_one_line_error(sentencepiece_dir, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "--config=tiny", f"--trainer_dir={run}", f"--set=init_from=hf:{sentencepiece_dir}"]
    fails_in_one_line(capsys, argv, f"init_from=hf:{sentencepiece_dir}", "do not fit", "--init_from=")
    fails_in_one_line(capsys, [*argv[:3], f"--init_from=hf:{tmp_path}"], "config.json not found")
    assert not run.exists()


def test_training_in_place_of_a_converted_dir_is_refused(converted, capsys):
    before = snapshot(converted)
    fails_in_one_line(capsys, ["train", "--config=finetune", f"--trainer_dir={converted}"], "--init_from=")
    assert snapshot(converted) == before


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_convert_of_bad_input_fails_in_one_line_and_writes_nothing(tmp_path, capsys, case):
    make, _ = BAD_INPUTS[case]
    source = tmp_path / "good"
    make_model("llama").save_pretrained(source)
    bad = make(source, tmp_path / "bad")
    capsys.readouterr()  # transformers' own progress output.
    fails_in_one_line(capsys, ["convert", "hf", str(bad), f"--out={tmp_path / 'out'}"], str(bad))
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "good"]
