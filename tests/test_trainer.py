"""Trainer: resume == uninterrupted, sharded == single device, aux losses reach the gradient, gradient accumulation,
summaries, SIGTERM saves, mesh-rule modifiers, and build-time refusals."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from axmini.config import REQUIRED, ConfigModifier, Required, config_for_function
from axmini.experiments.decoders import DecoderShape, decoder_config
from axmini.layers.embedding import Embedding
from axmini.layers.linear import Linear
from axmini.mesh_rules import MeshRule
from axmini.module import Layer
from axmini.trainer.data import register_text_task
from axmini.trainer.evaluator import unigram_entropy
from axmini.trainer.finalize import finalize
from axmini.trainer.input import SeqioInput, SyntheticInput
from axmini.trainer.trainer import Trainer

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = DecoderShape(
    vocab_size=64, dim=32, num_layers=1, num_heads=4, num_kv_heads=2, hidden_dim=64, tied_embeddings=True
)


@pytest.fixture(scope="module")
def docs_task(tmp_path_factory):
    """A small seqio text task with seqio's 26-piece test vocabulary."""
    import seqio

    rng = np.random.default_rng(0)
    words = "the cat sat on a mat while dogs ran far away from home".split()
    path = tmp_path_factory.mktemp("docs") / "docs.txt"
    path.write_text("\n".join(" ".join(rng.choice(words, size=int(rng.integers(2, 30)))) for _ in range(300)))
    vocab = pathlib.Path(seqio.__file__).parent / "test_data/sentencepiece/sentencepiece.model"
    register_text_task(
        "axmini_trainer_docs", {"train": str(path), "validation": str(path)}, seqio.SentencePieceVocabulary(str(vocab))
    )
    return "axmini_trainer_docs"


def build(cfg, **kw):
    """The Trainer of `cfg` finalized for the hardware here (what `axmini train` builds)."""
    return finalize(cfg).instantiate(**kw)


def decoder_trainer(tmp_path, max_step, *, input_cfg=None, mesh_shape=None, **kw):
    cfg = Trainer.default_config().set(
        dir=str(tmp_path),
        model=decoder_config(TINY),
        input=input_cfg or SyntheticInput.default_config().set(vocab_size=64, global_batch_size=8, sequence_length=16),
        max_step=max_step,
        log_every_n_steps=1,
        progress_bar=False,
        **kw,
    )
    cfg.learner.learning_rate.set(peak_lr=1e-2, warmup_steps=2)
    if mesh_shape is not None:
        cfg.mesh_rules = [MeshRule(pattern=".*", mesh_shape=mesh_shape)]
    return cfg


def test_resume_matches_uninterrupted(tmp_path, docs_task):
    data = SeqioInput.default_config().set(task=docs_task, global_batch_size=8, sequence_length=16, seed=1)
    straight = build(decoder_trainer(tmp_path / "straight", 5, input_cfg=data)).run()

    interrupted = decoder_trainer(tmp_path / "resumed", 3, input_cfg=data)
    first = build(interrupted).run()  # Saves at its max_step (3), like a job stopped there.
    resumed = build(interrupted.clone(max_step=5)).run()  # A fresh trainer: restores step 3 and the data.

    assert list(first.losses) == [1, 2, 3] and list(resumed.losses) == [4, 5]
    assert {**first.losses, **resumed.losses} == straight.losses  # Bit-identical.
    for a, b in zip(jax.tree.leaves(straight.state["params"]), jax.tree.leaves(resumed.state["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sharded_matches_single_device(tmp_path):
    one = build(decoder_trainer(tmp_path / "one", 4, mesh_shape={"fsdp": -1}), devices=jax.devices()[:1])
    many = build(decoder_trainer(tmp_path / "many", 3, mesh_shape={"fsdp": 4, "model": 2}))
    assert one.mesh.size == 1 and dict(many.mesh.shape)["model"] == 2
    a, b = one.run(), many.run()
    np.testing.assert_allclose([a.losses[s] for s in (1, 2, 3)], list(b.losses.values()), rtol=2e-5, atol=1e-6)
    (wi,) = [v for path, v in jax.tree_util.tree_leaves_with_path(b.state["params"]) if "wi_0" in str(path)]
    # [layers, embed, mlp]: embed over fsdp, mlp over model.
    assert tuple(wi.sharding.spec)[-2:] == ("fsdp", "model") and len(wi.addressable_shards) == 8
    assert wi.addressable_shards[0].data.shape == (1, 32 // 4, 64 // 2)

    # The 8-device checkpoint of step 3 resumes on another mesh: 4 devices, fsdp=2 x model=2.
    four = decoder_trainer(tmp_path / "many", 4, mesh_shape={"fsdp": 2, "model": 2})
    c = build(four, devices=jax.devices()[:4]).run()
    assert list(c.losses) == [4]
    assert c.losses[4] == pytest.approx(a.losses[4], rel=2e-5, abs=1e-7)


class ToyLM(Layer):
    """Embedding + one hidden layer; sows `aux_weight * mean(hidden.weight^2)` as an aux loss."""

    class Config(Layer.Config):
        vocab_size: Required[int] = REQUIRED
        dim: int = 8
        aux_weight: float = 0.0

    def __init__(self, cfg, *, rngs):
        super().__init__(cfg, rngs=rngs)
        cfg = self.config
        self.embedding = (
            Embedding.default_config().set(num_embeddings=cfg.vocab_size, dim=cfg.dim).instantiate(rngs=rngs)
        )
        self.hidden = Linear.default_config().set(input_dim=cfg.dim, output_dim=cfg.dim).instantiate(rngs=rngs)

    def __call__(self, batch):
        logits = self.embedding.attend(jnp.tanh(self.hidden(self.embedding(batch["input_ids"]))))
        w = batch["target_weights"]
        ce = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, batch["target_ids"][..., None], -1)[..., 0]
        if self.config.aux_weight:
            self.add_aux_loss("l2", self.config.aux_weight * jnp.mean(self.hidden.weight[...] ** 2))
        return jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1.0), {"num_tokens": jnp.sum(w)}


def toy_trainer(tmp_path, **kw):
    cfg = Trainer.default_config().set(
        dir=str(tmp_path),
        model=ToyLM.default_config().set(vocab_size=32),
        input=SyntheticInput.default_config().set(vocab_size=32, global_batch_size=8, sequence_length=4),
        max_step=1,
        progress_bar=False,
    )
    cfg.learner.set(optimizer=config_for_function(optax.sgd), learning_rate=1.0, max_grad_norm=None)
    return cfg.set(**kw)


def first_step(cfg):
    trainer = build(cfg)
    state = trainer.init_state()
    before = jax.device_get(state["params"]["hidden"]["weight"][...])
    batch = trainer.global_batch(next(trainer.input.batches(0)))
    state, metrics = trainer.train_step(state, batch)
    return before, jax.device_get(state["params"]), jax.device_get(metrics)


def test_aux_loss_changes_the_gradient(tmp_path):
    plain = toy_trainer(tmp_path)
    with_aux = toy_trainer(tmp_path)
    with_aux.model.aux_weight = 3.0
    w0, p_plain, m_plain = first_step(plain)
    _, p_aux, m_aux = first_step(with_aux)
    # SGD at lr 1: the extra update is -d(3 * mean(w^2))/dw = -6 w / w.size on the hidden weight only.
    np.testing.assert_allclose(
        p_aux["hidden"]["weight"][...] - p_plain["hidden"]["weight"][...], -6.0 * w0 / w0.size, atol=1e-6
    )
    np.testing.assert_allclose(p_aux["embedding"]["weight"][...], p_plain["embedding"]["weight"][...], atol=1e-6)
    assert float(m_aux["aux/l2"]) == pytest.approx(3.0 * float(np.mean(w0**2)), rel=1e-5, abs=1e-7)
    assert float(m_aux["total_loss"]) == pytest.approx(float(m_aux["loss"] + m_aux["aux/l2"]), rel=1e-6, abs=1e-7)
    assert "aux/l2" not in m_plain


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
    """8 rows over fsdp=4 (x model=2): 2 microbatches of 4 rows, one row per batch shard each."""
    rules = [MeshRule(pattern=".*", mesh_shape={"fsdp": 4, "model": 2})]
    _, full, m_full = first_step(toy_trainer(tmp_path, mesh_rules=rules))
    _, accumulated, m_acc = first_step(toy_trainer(tmp_path, microbatches=2, mesh_rules=rules))
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(accumulated)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert float(m_acc["loss"]) == pytest.approx(float(m_full["loss"]), rel=1e-6, abs=1e-7)
    assert float(m_acc["num_tokens"]) == float(m_full["num_tokens"]) == 32  # 8 rows x 4 tokens.


def test_evaluation_and_summaries(tmp_path):
    eval_input = SyntheticInput.default_config().set(vocab_size=64, global_batch_size=8, sequence_length=16, seed=7)
    cfg = decoder_trainer(tmp_path, 2, mesh_selector="gpu-h100-8")  # Known peak FLOP/s: MFU is logged.
    cfg.evaluator.set(input=eval_input, num_batches=2, every_n_steps=2)
    cfg.learner.update_norm_summary = True
    trainer = build(cfg)
    result = trainer.run()

    batches = [next(eval_input.instantiate().batches(i)) for i in range(2)]
    model = trainer.model(result.state)
    losses = [float(model({k: jnp.asarray(v) for k, v in b.items()})[0]) for b in batches]
    weights = [b["target_weights"].sum() for b in batches]
    assert result.eval_metrics["loss"] == pytest.approx(np.average(losses, weights=weights), rel=1e-5, abs=1e-7)
    assert result.eval_metrics["unigram_entropy"] == pytest.approx(unigram_entropy(batches))

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train] == [1, 2]
    for key in ("learning_rate", "grad_norm", "update_norm", "tokens_per_second", "mfu", "accuracy"):
        assert f"train/{key}" in train[0], key
    assert train[0]["train/loss"] == pytest.approx(result.losses[1])
    assert any(r.get("eval/loss") == pytest.approx(result.eval_metrics["loss"]) for r in records)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert "model.dim: 32" in (tmp_path / "config.txt").read_text()


def test_unigram_entropy_reference():
    batch = {"target_ids": np.array([[1, 1, 2, 3, 9]]), "target_weights": np.array([[1, 1, 1, 1, 0]], np.float32)}
    assert unigram_entropy([batch]) == pytest.approx(-(0.5 * np.log(0.5) + 2 * 0.25 * np.log(0.25)))


class SetMicrobatches(ConfigModifier):
    class Config(ConfigModifier.Config):
        microbatches: int = 2

    def __call__(self, cfg):
        return cfg.clone(microbatches=self.config.microbatches)


def test_mesh_rule_modifiers_rewrite_the_config(tmp_path):
    cfg = toy_trainer(tmp_path)
    cfg.input.global_batch_size = 16  # 8 batch shards x 2 microbatches.
    cfg.mesh_rules = [
        MeshRule(pattern="tpu-.*", mesh_shape={"fsdp": -1}),
        MeshRule(pattern="cpu", mesh_shape={"fsdp": 2, "data": -1}, modifiers=[SetMicrobatches.default_config()]),
    ]
    trainer = build(cfg)
    assert trainer.config.microbatches == 2 and cfg.microbatches == 1
    assert dict(trainer.mesh.shape)["data"] == 4
    assert trainer.config.checkpointer.dir == str(tmp_path / "checkpoints")


def test_build_time_refusals_name_the_field(tmp_path):
    with pytest.raises(ValueError, match=r"input.global_batch_size=6 must be a multiple of.*8 batch shards.*'cpu'"):
        build(
            toy_trainer(
                tmp_path,
                input=SyntheticInput.default_config().set(vocab_size=32, global_batch_size=6, sequence_length=4),
            )
        )
    with pytest.raises(ValueError, match=r"model.vocab_size=32 is smaller than the input's vocabulary \(40 ids"):
        build(
            toy_trainer(
                tmp_path,
                input=SyntheticInput.default_config().set(vocab_size=40, global_batch_size=8, sequence_length=4),
            )
        )
    bad_eval = toy_trainer(tmp_path)
    bad_eval.evaluator.input = SyntheticInput.default_config().set(
        vocab_size=32, global_batch_size=4, sequence_length=4
    )
    with pytest.raises(ValueError, match=r"evaluator.input.global_batch_size=4 must be a multiple of 8"):
        build(bad_eval)
    with pytest.raises(Exception, match=r"required field.*dir"):
        build(toy_trainer(tmp_path).set(dir=REQUIRED))
    assert not (tmp_path / "checkpoints").exists()


def test_the_trainer_builds_a_finalized_config_only_and_keeps_it_as_is(tmp_path):
    cfg = toy_trainer(tmp_path)
    with pytest.raises(ValueError, match=r"mesh_rule=None: the Trainer builds a finalized config only.*finalize"):
        cfg.instantiate()
    finalized = finalize(cfg, "cpu")
    trainer = finalized.instantiate()
    assert trainer.config.debug_string() == finalized.debug_string()
    assert trainer.config.mesh_rule.pattern == "cpu" and trainer.config.mesh_selector == "cpu"
    with pytest.raises(ValueError, match=r"mesh_rule is set \(to the rule 'cpu'\): the config is finalized already"):
        finalize(finalized)


SIGTERM_SCRIPT = """
import sys
from axmini.trainer.input import SyntheticInput
from axmini.trainer.trainer import Trainer
from axmini.trainer.finalize import finalize
from axmini.experiments.decoders import DecoderShape, decoder_config

shape = DecoderShape(vocab_size=64, dim=32, num_layers=1, num_heads=4, num_kv_heads=2, hidden_dim=64)
cfg = Trainer.default_config().set(
    dir=sys.argv[1], model=decoder_config(shape), max_step=100_000, log_every_n_steps=1, progress_bar=False,
    input=SyntheticInput.default_config().set(vocab_size=64, global_batch_size=8, sequence_length=16),
)
cfg.checkpointer.save_every_n_steps = 1_000_000
result = finalize(cfg).instantiate().run()
print("preempted" if result.preempted else "finished", result.step, flush=True)
sys.exit(143 if result.preempted else 0)
"""


def test_sigterm_saves_a_checkpoint_and_exits(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(SIGTERM_SCRIPT))
    env = {**os.environ, "PYTHONPATH": str(REPO), "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        ["timeout", "-s", "KILL", "240", sys.executable, str(script), str(run_dir)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 200
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[0]
    proc.send_signal(signal.SIGTERM)  # `timeout` passes it on to the trainer.
    output = proc.communicate(timeout=200)[0]
    assert proc.returncode == 143, output
    step = int(output.split("preempted")[1].split()[0])
    assert step >= 2
    assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == [step]
