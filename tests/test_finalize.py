"""The one finalize step: the mesh rule of the instance type and its modifiers, the dirs and dims the trainer owns,
the vocabulary of data from disk; a copy, as `configs show --mesh_selector` prints it, without any hardware."""

import pytest

from axmini.cli import main
from axmini.config import ConfigModifier, ConfigValueError
from axmini.experiments.lm import tiny
from axmini.mesh_rules import MeshRule
from axmini.trainer.data import TextFiles
from axmini.trainer.finalize import finalize


class DoubleBatch(ConfigModifier):
    def __call__(self, cfg):
        return cfg.clone(microbatches=2 * cfg.microbatches)


def experiment():
    cfg = tiny().set(dir="runs/x")
    cfg.mesh_rules = [
        MeshRule(pattern="cpu", mesh_shape={"fsdp": -1}),
        MeshRule(pattern="tpu-v5p-.*", mesh_shape={"fsdp": -1, "model": 4}, modifiers=[DoubleBatch.default_config()]),
    ]
    return cfg


def test_finalize_applies_the_selected_rule_and_fills_what_the_trainer_owns():
    cfg = experiment()
    before = cfg.debug_string()
    final = finalize(cfg, "tpu-v5p-256")  # No TPU here: finalizing needs none.
    assert cfg.debug_string() == before  # A copy; the experiment's config is left as it was.
    assert final.mesh_selector == "tpu-v5p-256" and final.mesh_rule.pattern == "tpu-v5p-.*"
    assert final.microbatches == 2  # The rule's modifier ran, once.
    assert final.checkpointer.dir == "runs/x/checkpoints" and final.summary_writer.dir == "runs/x"
    assert final.learner.max_step == final.max_step == 1000
    assert finalize(experiment(), "cpu").microbatches == 1  # Another instance type, another rule.


def test_finalize_keeps_what_the_user_set_and_refuses_a_conflicting_dim():
    cfg = experiment()
    cfg.checkpointer.dir = "gs://bucket/ckpt"
    assert finalize(cfg, "cpu").checkpointer.dir == "gs://bucket/ckpt"
    cfg.learner.max_step = 10
    with pytest.raises(ConfigValueError, match=r"learner.max_step=10 conflicts with 1000"):
        finalize(cfg, "cpu")


def test_finalize_gives_data_from_disk_a_vocabulary_next_to_the_run_of_the_models_size():
    cfg = experiment()
    cfg.input.task = TextFiles.default_config().set(train="corpus/*.txt")
    cfg.evaluator.input.task = TextFiles.default_config().set(train="corpus/*.txt", vocab_size=512)
    final = finalize(cfg, "cpu")
    assert final.input.task.vocab_cache == "runs/x/vocab.model" and final.input.task.vocab_size == 2048
    assert final.evaluator.input.task.vocab_size == 512  # Set by the user: kept.
    given = experiment()
    given.input.task = TextFiles.default_config().set(train="corpus/*.txt", vocab="sp.model")
    assert finalize(given, "cpu").input.task.vocab_cache is None  # A given vocabulary is not cached.


def test_configs_show_prints_a_finalized_config_for_any_instance_type_and_refuses_unknown_ones(capsys):
    assert main(["configs", "show", "llama_7b", "--mesh_selector=tpu-v5p-256"]) == 0
    out = capsys.readouterr().out
    assert "\nmesh_selector: 'tpu-v5p-256'\n" in out and "\ndir: 'runs/llama_7b'\n" in out
    assert "\ncheckpointer.dir: 'runs/llama_7b/checkpoints'\n" in out
    assert main(["configs", "show", "tiny", "--mesh_selector=tpu-v7-256"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "unknown instance type 'tpu-v7-256'" in err
