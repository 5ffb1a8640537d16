"""Run integrity: a corrupt checkpoint is found and the one before used (losses equal to an uninterrupted run), a
non-finite loss never reaches the parameters (stop or skip), and a run killed with SIGKILL at random moments, during
asynchronous saves too, ends with the losses of an uninterrupted run."""

import json
import logging
import os
import pathlib
import random
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_checkpointer import flip_bytes_inside_the_arrays

from axmini.config import config_for_function
from axmini.experiments.decoders import DecoderShape, decoder_config
from axmini.trainer.checkpointer import NoRestorableCheckpointError
from axmini.trainer.finalize import finalize
from axmini.trainer.input import SyntheticInput
from axmini.trainer.trainer import NonFiniteLoss, Trainer

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = DecoderShape(vocab_size=64, dim=32, num_layers=1, num_heads=4, num_kv_heads=2, hidden_dim=64)


def trainer(run_dir, max_step, **kw):
    """A trainer on one device (compiles fastest; sharded checkpoints are tested in test_checkpointer)."""
    return finalize(trainer_cfg(run_dir, max_step, **kw)).instantiate(devices=jax.devices()[:1])


def trainer_cfg(run_dir, max_step, **kw):
    cfg = Trainer.default_config().set(
        dir=str(run_dir),
        model=decoder_config(TINY),
        input=SyntheticInput.default_config().set(vocab_size=64, global_batch_size=8, sequence_length=16),
        max_step=max_step,
        log_every_n_steps=1,
        progress_bar=False,
        **kw,
    )
    cfg.checkpointer.set(save_every_n_steps=2, keep_last_n=3)
    cfg.learner.learning_rate.set(peak_lr=1e-2, warmup_steps=2)
    return cfg


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The losses of an uninterrupted 6-step run."""
    return trainer(tmp_path_factory.mktemp("straight"), 6).run().losses


def checkpoint_dirs(run_dir):
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def messages(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("axmini")]


def test_a_byte_flip_inside_a_tensor_falls_back_to_the_previous_checkpoint_with_equal_losses(
    tmp_path, straight, caplog
):
    run_dir = tmp_path / "run"
    trainer(run_dir, 4).run()  # Checkpoints 2 and 4.
    flip_bytes_inside_the_arrays(run_dir / "checkpoints" / "4")

    with caplog.at_level(logging.WARNING):
        resumed = trainer(run_dir, 6).run()
    assert list(resumed.losses) == [3, 4, 5, 6]
    assert resumed.losses == {step: straight[step] for step in (3, 4, 5, 6)}  # Bit-identical.
    warning = messages(caplog)[0]
    assert warning.startswith("checkpoint step 4: corrupt, ") and "restoring step 2 instead" in warning
    assert any(name.startswith("4.corrupt-") for name in checkpoint_dirs(run_dir))


def overflow_checkpoint(run_dir, max_step):
    """Trains to `max_step`, then replaces its last checkpoint by a well-formed one (its fingerprints match) whose
    parameters make the loss overflow."""
    first = trainer(run_dir, max_step)
    first.run()
    checkpointer = first.config.checkpointer.instantiate()
    state = checkpointer.restore(max_step, first._placed_abstract_state()).state
    state["params"] = jax.tree.map(lambda p: p * 1e37, state["params"])
    checkpointer.set_aside(max_step, "replaced by the test", label="original")
    checkpointer.save(max_step, state, force=True)
    checkpointer.close()


def test_a_non_finite_first_loss_after_a_restore_counts_as_corruption(tmp_path, straight, caplog):
    run_dir = tmp_path / "run"
    overflow_checkpoint(run_dir, 4)
    with caplog.at_level(logging.WARNING):
        resumed = trainer(run_dir, 6).run()
    assert resumed.losses == {step: straight[step] for step in (3, 4, 5, 6)}
    fallback = [m for m in messages(caplog) if m.startswith("checkpoint step 4: corrupt, total_loss")]
    assert len(fallback) == 1 and "at the first step after it" in fallback[0] and "restoring step 2" in fallback[0]

    # With no older checkpoint to fall back to, the run is refused and the checkpoint stays where it is.
    only = tmp_path / "only"
    overflow_checkpoint(only, 2)
    with pytest.raises(NoRestorableCheckpointError, match=r"checkpoint step 2 .* no older checkpoint restores"):
        trainer(only, 4).run()
    assert "2" in checkpoint_dirs(only)


def nan_at_step_3(peak_lr: float = 1e-2) -> object:
    """A constant learning rate that is NaN for the update of step 3 (the optimizer's step index 2)."""
    return lambda step: jnp.where(step == 2, jnp.nan, peak_lr)


def test_a_non_finite_loss_stops_with_a_checkpoint_of_the_last_good_state_or_skips_the_update(tmp_path, caplog):
    def cfg(run_dir, max_step, policy):
        cfg = trainer_cfg(run_dir, max_step, non_finite_loss=policy)
        cfg.learner.learning_rate = config_for_function(nan_at_step_3)
        return finalize(cfg).instantiate(devices=jax.devices()[:1])

    with caplog.at_level(logging.WARNING):
        stopped = cfg(tmp_path / "stop", 5, NonFiniteLoss.STOP).run()
    assert stopped.non_finite_step == 3 and stopped.step == 2 and list(stopped.losses) == [1, 2]
    assert int(stopped.state["step"]) == 2
    [warning] = messages(caplog)
    assert warning.startswith("step 3: the loss or its update is not finite (total_loss ")
    assert "learning_rate nan, grad_norm " in warning
    assert "); stopped with a checkpoint of step 2, the last good state" in warning
    assert checkpoint_dirs(tmp_path / "stop") == ["2"]

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        skipped = cfg(tmp_path / "skip", 3, NonFiniteLoss.SKIP_UPDATE).run()
    assert skipped.non_finite_step is None and skipped.step == 3 and int(skipped.state["step"]) == 3
    assert skipped.losses[1] == stopped.losses[1] and skipped.losses[2] == stopped.losses[2]
    [warning] = messages(caplog)
    assert warning.startswith("step 3: the loss or its update is not finite (total_loss ")
    assert "learning_rate nan, grad_norm " in warning
    assert warning.endswith("); update skipped (non_finite_loss=SKIP_UPDATE)")
    # The skipped step left parameters and optimizer state as the stopped run's last good state.
    for a, b in zip(jax.tree.leaves(skipped.state["params"]), jax.tree.leaves(stopped.state["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(skipped.state["opt_state"]), jax.tree.leaves(stopped.state["opt_state"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# A training process for the kill loop: the tiny decoder on synthetic data, a checkpoint every step (async), and a
# line on stdout when each step ends and when each save starts.
KILL_SCRIPT = """
import sys
import jax
jax.config.update("jax_disable_most_optimizations", True)
from axmini.trainer.checkpointer import Checkpointer
from axmini.trainer.input import SyntheticInput
from axmini.trainer.finalize import finalize
from axmini.trainer.trainer import Trainer
from axmini.experiments.decoders import DecoderShape, decoder_config

save = Checkpointer.save
def announced_save(self, step, state, metadata=None, *, force=False):
    print(f"SAVE {step}", flush=True)
    return save(self, step, state, metadata, force=force)
Checkpointer.save = announced_save

cfg = Trainer.default_config().set(
    dir=sys.argv[1],
    model=decoder_config(DecoderShape(vocab_size=32, dim=16, num_layers=1, num_heads=2, num_kv_heads=2, hidden_dim=32)),
    input=SyntheticInput.default_config().set(vocab_size=32, global_batch_size=8, sequence_length=8),
    max_step=int(sys.argv[2]),
    log_every_n_steps=1,
    progress_bar=False,
)
cfg.checkpointer.set(save_every_n_steps=1, keep_last_n=2)
cfg.learner.learning_rate.set(peak_lr=1e-2, warmup_steps=2)
print("DONE", finalize(cfg).instantiate().run().step, flush=True)
"""


def train_process(script, run_dir, max_step):
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}  # One device.
    return subprocess.Popen(
        [sys.executable, str(script), str(run_dir), str(max_step)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def logged_losses(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train/loss"]) for r in records if "train/loss" in r]


def test_sigkill_at_random_moments_ends_with_the_losses_of_an_uninterrupted_run(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(KILL_SCRIPT))
    max_step = 8
    reference = train_process(script, tmp_path / "reference", max_step)
    assert reference.wait(timeout=600) == 0, reference.stdout.read()

    run_dir = tmp_path / "killed"
    rng = random.Random(13)
    kills = []
    for _ in range(3):
        proc = train_process(script, run_dir, max_step)
        # Kill as the n-th save of this process starts (its write still in flight), or a random moment after.
        nth, delay = rng.randint(1, 3), rng.choice([0.0, rng.uniform(0.05, 0.5)])
        saves = 0
        for line in proc.stdout:
            saves += line.startswith("SAVE")
            if saves == nth or line.startswith("DONE"):
                time.sleep(delay)
                proc.send_signal(signal.SIGKILL)
                kills.append(f"{line.strip()} +{delay:.2f}s")
                break
        proc.wait(timeout=600)
    assert sum("SAVE" in kill for kill in kills) >= 2, kills  # Killed mid-run, more than once.
    finished = train_process(script, run_dir, max_step)
    output = finished.communicate(timeout=600)[0]
    assert finished.returncode == 0 and f"DONE {max_step}" in output, output
    assert logged_losses(run_dir) == logged_losses(tmp_path / "reference"), kills  # Each step once, bit-identical.
