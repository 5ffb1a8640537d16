"""Enlarge-and-prune: the run reaches the target shape under one learning-rate schedule, optimizer statistics are
sliced like their parameters, distillation reaches the loss after the first round, a run resumes in the stage it
stopped in with the same result, and bad pruning settings are refused before anything is written."""

import json
import shutil

import flax.nnx as nnx
import jax
import numpy as np
import pytest

from axmini.config import ConfigValueError, replace_config
from axmini.experiments.decoders import DecoderShape, decoder_config
from axmini.layers.decoder import Decoder
from axmini.module import capture_aux
from axmini.pruning.distillation import Distillation, TeacherWeight, distilled
from axmini.pruning.enlarge_and_prune import EnlargeAndPruneTrainer
from axmini.pruning.structured import ModelShape, TargetShape, model_shape
from axmini.qat import QATModifier
from axmini.trainer.evaluator import Evaluator
from axmini.trainer.finalize import finalize
from axmini.trainer.input import SyntheticInput
from axmini.trainer.learner import warmup_decay_schedule
from axmini.trainer.trainer import Trainer

ENLARGED = DecoderShape(vocab_size=64, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, hidden_dim=64)


def plain(tmp_path, *, max_step):
    """A plain trainer of the enlarged model."""
    data = SyntheticInput.default_config().set(vocab_size=64, global_batch_size=8, sequence_length=16)
    cfg = Trainer.default_config().set(
        dir=str(tmp_path),
        model=decoder_config(ENLARGED),
        input=data,
        evaluator=Evaluator.default_config().set(input=data.clone(seed=1), num_batches=1, every_n_steps=100),
        max_step=max_step,
        log_every_n_steps=1,
        progress_bar=False,
    )
    cfg.learner.learning_rate.set(peak_lr=1e-2, warmup_steps=2)
    return cfg


def pipeline(tmp_path, *, target, prune_steps, max_step, distillation=None):
    cfg = plain(tmp_path, max_step=max_step)
    cfg = replace_config(cfg, target=Trainer, new=EnlargeAndPruneTrainer.default_config())
    return cfg.set(target=target, prune_steps=prune_steps, calibration_batches=2, distillation=distillation)


def metrics(tmp_path):
    return [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def test_run_reaches_the_target_under_one_schedule_with_distillation_and_resumes_identically(tmp_path):
    target = TargetShape(dim=24, num_layers=1, num_heads=2, num_kv_heads=1, hidden_dim=32)
    distillation = Distillation(weight=0.5, temperature=2.0)
    cfg = pipeline(tmp_path, target=target, prune_steps=[3, 5], max_step=7, distillation=distillation)
    one_device = jax.devices()[:1]  # Sharded training is the trainer's tests' business; this one is about stages.
    trainer = finalize(cfg).instantiate(devices=one_device)
    result = trainer.run()

    assert [(s.start, s.end) for s in trainer.stages] == [(0, 3), (3, 5), (5, 7)]
    middle = ModelShape(dim=28, num_layers=2, num_heads=4, num_kv_heads=2, hidden_dim=48, head_dim=8)
    assert trainer.stages[1].shape == middle  # Halfway from the enlarged shape (K and H/K interpolated apart).
    assert sorted(result.losses) == list(range(1, 8))
    final = trainer.model(trainer.restore_or_init())
    assert isinstance(final, Decoder) and model_shape(final) == target.resolve(model_shape(final))
    records = metrics(tmp_path)
    schedule = warmup_decay_schedule(peak_lr=1e-2, warmup_steps=2, total_steps=7)
    learning_rates = {r["step"]: r["train/learning_rate"] for r in records if "train/learning_rate" in r}
    assert learning_rates == pytest.approx({s: float(schedule(s - 1)) for s in range(1, 8)}, rel=1e-6, abs=1e-9)
    assert [r["step"] for r in records if "pruned/loss" in r] == [3, 5]
    distill_steps = [r["step"] for r in records if "train/aux/distillation" in r]
    assert distill_steps == [4, 5, 6, 7]  # After the first round only.
    teacher = nnx.state(final.teacher, TeacherWeight)  # The enlarged model at the first pruning step.
    enlarged = trainer.stages[0].trainer.restore_or_init()["params"]
    jax.tree.map(np.testing.assert_array_equal, jax.tree.leaves(teacher), jax.tree.leaves(enlarged))

    # A run that stopped right after pruning into the last stage resumes there, to the same result.
    for checkpoint in (tmp_path / "checkpoints").iterdir():
        if checkpoint.is_dir() and checkpoint.name != "5":
            shutil.rmtree(checkpoint)
    resumed = finalize(cfg).instantiate(devices=one_device).run()
    assert sorted(resumed.losses) == [6, 7] and {s: result.losses[s] for s in (6, 7)} == resumed.losses
    jax.tree.map(np.testing.assert_array_equal, resumed.state["params"], result.state["params"])


def test_pruning_slices_the_optimizer_statistics_like_the_parameters(tmp_path):
    trainer = finalize(pipeline(tmp_path, target=TargetShape(hidden_dim=40), prune_steps=[3], max_step=4)).instantiate()
    trainer.run()
    before = trainer.stages[0].trainer.restore_or_init()  # Step 3, the enlarged model.
    pruned = trainer.stages[1].trainer
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), pruned.abstract_state, pruned.state_shardings
    )
    after = pruned.config.checkpointer.instantiate(read_only=True).restore(3, abstract).state  # Step 3, just pruned.
    old_w, new_w = (
        np.asarray(s["params"]["stack"]["layers"]["feed_forward"]["wi_0"].get_value()) for s in (before, after)
    )
    for layer in range(2):  # Which hidden units were kept: the old columns the new ones equal.
        kept = [int(np.flatnonzero((old_w[layer].T == column).all(-1))[0]) for column in new_w[layer].T]
        assert len(set(kept)) == 40
        for state in (before, after):
            assert int(state["opt_state"][1][0].count) == 3
        for moment in ("mu", "nu"):
            old_m, new_m = (
                np.asarray(getattr(s["opt_state"][1][0], moment)["stack"]["layers"]["feed_forward"]["wo"].get_value())
                for s in (before, after)
            )
            np.testing.assert_array_equal(new_m[layer], old_m[layer][kept])


def test_a_run_with_init_from_starts_the_enlarged_model_from_a_trained_run(tmp_path):
    """Trainer's init_from (the one warm-start mechanism) starts the first stage; pruned stages start from the
    pruned state, not from init_from."""
    base = finalize(plain(tmp_path / "base", max_step=2)).instantiate(devices=jax.devices()[:1])
    trained = base.run().state["params"]
    cfg = pipeline(tmp_path / "run", target=TargetShape(hidden_dim=40), prune_steps=[1], max_step=2)
    trainer = finalize(cfg.set(init_from=str(tmp_path / "base"))).instantiate(devices=jax.devices()[:1])
    trainer.run()
    first = trainer.stages[0].trainer
    start = first.config.checkpointer.instantiate(read_only=True).restore(0, first.abstract_state).state
    jax.tree.map(np.testing.assert_array_equal, jax.tree.leaves(start["params"]), jax.tree.leaves(trained))
    assert [stage.trainer.config.init_from for stage in trainer.stages] == [str(tmp_path / "base"), None]
    assert model_shape(trainer.model(trainer.restore_or_init())).hidden_dim == 40


def test_distillation_loss_is_the_softened_kl_and_the_teacher_is_not_trained():
    student, teacher = decoder_config(ENLARGED._replace(dim=16)), decoder_config(ENLARGED)
    model = distilled(student, teacher, Distillation(weight=0.5, temperature=2.0)).instantiate(rngs=nnx.Rngs(0))
    assert not any("teacher" in str(path) for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    ids = jax.random.randint(jax.random.key(0), (2, 9), 1, 64)
    batch = {"input_ids": ids[:, :-1], "target_ids": ids[:, 1:]}
    (loss, metrics), aux, _ = nnx.jit(lambda m, b: capture_aux(lambda m, b: m(b), m, b))(model, batch)
    forward = nnx.jit(lambda m, ids: m.forward(ids).logits)
    s = np.asarray(forward(model, batch["input_ids"]), np.float64) / 2.0
    t = np.asarray(forward(model.teacher, batch["input_ids"]), np.float64) / 2.0
    log_p = lambda x: x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(-1, keepdims=True)
    kl = (np.exp(log_p(t)) * (log_p(t) - log_p(s))).sum(-1).mean()
    np.testing.assert_allclose(metrics["distillation_kl"], kl, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(aux["distillation"], 0.5 * 4.0 * kl, rtol=1e-4, atol=1e-6)
    plain_loss, _ = nnx.jit(lambda m, b: Decoder.__call__(m, b))(model, batch)  # The student's own loss.
    np.testing.assert_allclose(loss, plain_loss, rtol=1e-6, atol=1e-6)
    distillation = lambda m: capture_aux(lambda m, b: m(b)[0], m, batch).losses["distillation"]
    grads = nnx.jit(nnx.grad(distillation))(model)
    assert np.abs(np.asarray(grads["embedding"]["weight"].get_value())).sum() > 0


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(prune_steps=[3, 3]), r"prune_steps=\[3, 3\] must be increasing steps in \(0, max_step=6\)"),
        (dict(prune_steps=[6]), r"prune_steps=\[6\] must be increasing"),
        (dict(target=TargetShape(hidden_dim=100)), r"target\.hidden_dim=100 must be in \[1, 64\]"),
        (dict(target=TargetShape(num_heads=3)), r"target\.num_heads=3 must be a multiple of target\.num_kv_heads=2"),
        (dict(distillation=Distillation(temperature=0.0)), r"distillation\.temperature=0\.0 must be positive"),
        (
            dict(model=QATModifier.default_config().instantiate()(decoder_config(ENLARGED))),
            r"^model\.stack\.layer\.self_attention\.\S+\.weight_transform is a FakeQuantization: pruning reads plain",
        ),
    ],
)
def test_bad_pruning_settings_are_refused_before_anything_is_written(tmp_path, change, message):
    cfg = pipeline(tmp_path / "run", target=TargetShape(hidden_dim=32), prune_steps=[3], max_step=6).set(**change)
    with pytest.raises(ConfigValueError, match=message):
        finalize(cfg).instantiate()
    assert not (tmp_path / "run").exists()


def test_a_teacher_with_another_vocabulary_is_refused():
    teacher = decoder_config(ENLARGED._replace(vocab_size=65))
    cfg = distilled(decoder_config(ENLARGED), teacher, Distillation())
    with pytest.raises(ConfigValueError, match=r"teacher\.vocab_size=65 differs from the student's vocab_size=64"):
        cfg.instantiate(rngs=nnx.Rngs(0))
