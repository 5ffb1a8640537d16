"""Checkpointer: save cadence and retention, restore onto another mesh, half-written and corrupted checkpoints."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from axmini.trainer.checkpointer import Checkpointer, CheckpointError


def mesh(shape, names, devices):
    return jax.sharding.Mesh(np.array(devices).reshape(shape), names, axis_types=(jax.sharding.AxisType.Auto,) * 2)


def state_on(m, spec_w=("fsdp", "model")):
    """A small train-state-like tree, sharded on mesh `m`."""
    w = jnp.arange(64 * 8, dtype=jnp.float32).reshape(64, 8)
    return {
        "step": jax.device_put(jnp.int32(7), NamedSharding(m, PartitionSpec())),
        "params": {"w": jax.device_put(w, NamedSharding(m, PartitionSpec(*spec_w)))},
        "opt_state": (jax.device_put(w * 2, NamedSharding(m, PartitionSpec(spec_w[0]))),),
    }


def abstract_on(m):
    def leaf(x, spec):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(m, spec))

    s = state_on(m)
    return {
        "step": leaf(s["step"], PartitionSpec()),
        "params": {"w": leaf(s["params"]["w"], PartitionSpec("fsdp", "model"))},
        "opt_state": (leaf(s["opt_state"][0], PartitionSpec(None, "model")),),
    }


def checkpointer(tmp_path, **kw):
    return Checkpointer.default_config().set(dir=str(tmp_path / "ckpt"), **kw).instantiate()


def test_saves_every_k_steps_and_keeps_the_last_n(tmp_path):
    m = mesh((4, 2), ("fsdp", "model"), jax.devices())
    ckpt = checkpointer(tmp_path, save_every_n_steps=2, keep_last_n=2)
    saved = [step for step in range(1, 8) if ckpt.save(step, state_on(m))]
    assert saved == [2, 4, 6]
    assert ckpt.save(7, state_on(m), force=True)
    ckpt.wait()
    assert ckpt.all_steps() == [6, 7]
    ckpt.close()


def test_a_relative_dir_is_taken_from_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    m = mesh((4, 2), ("fsdp", "model"), jax.devices())
    ckpt = Checkpointer.default_config().set(dir="runs/ckpt", save_every_n_steps=1).instantiate()
    assert ckpt.save(1, state_on(m))
    ckpt.wait()
    assert ckpt.all_steps() == [1] and (tmp_path / "runs" / "ckpt" / "1").is_dir()
    ckpt.close()


def test_restore_onto_a_different_mesh(tmp_path):
    """Saved on 8 devices (fsdp=4 x model=2), restored on 4 (fsdp=2 x model=2) with other specs too."""
    big = mesh((4, 2), ("fsdp", "model"), jax.devices())
    ckpt = checkpointer(tmp_path)
    saved = state_on(big)
    ckpt.save(3, saved, {"input_position": 3}, force=True)
    ckpt.close()

    small = mesh((2, 2), ("fsdp", "model"), jax.devices()[:4])
    restored = checkpointer(tmp_path).restore_latest(abstract_on(small))
    assert restored.step == 3 and restored.metadata == {"step": 3, "input_position": 3}
    w, opt = restored.state["params"]["w"], restored.state["opt_state"][0]
    np.testing.assert_array_equal(np.asarray(w), np.asarray(saved["params"]["w"]))
    np.testing.assert_array_equal(np.asarray(opt), np.asarray(saved["opt_state"][0]))
    assert w.sharding.mesh.devices.size == 4 and w.sharding.spec == PartitionSpec("fsdp", "model")
    assert opt.sharding.spec == PartitionSpec(None, "model")
    assert int(restored.state["step"]) == 7


def test_half_written_checkpoint_is_never_picked_up(tmp_path):
    m = mesh((4, 2), ("fsdp", "model"), jax.devices())
    ckpt = checkpointer(tmp_path)
    ckpt.save(1, state_on(m), force=True)
    ckpt.close()
    partial = tmp_path / "ckpt" / "2.orbax-checkpoint-tmp-1700000000"  # What orbax writes before it commits.
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "_METADATA").write_text("{")
    reopened = checkpointer(tmp_path)
    assert reopened.all_steps() == [1]
    assert reopened.restore_latest(abstract_on(m)).step == 1


def test_a_read_only_checkpointer_leaves_a_running_save_alone(tmp_path):
    m = mesh((4, 2), ("fsdp", "model"), jax.devices())
    ckpt = checkpointer(tmp_path)
    ckpt.save(1, state_on(m), force=True)
    ckpt.close()
    in_progress = tmp_path / "ckpt" / "2.orbax-checkpoint-tmp-1700000000"  # A trainer's save, not committed yet.
    (in_progress / "state").mkdir(parents=True)
    reader = Checkpointer.default_config().set(dir=str(tmp_path / "ckpt")).instantiate(read_only=True)
    assert reader.restore_latest(abstract_on(m)).step == 1
    assert in_progress.exists()


def corrupt(step_dir):
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file()]
    assert files
    for path in files:
        path.write_bytes(b"\x00garbage")


def test_corrupted_latest_falls_back_to_the_previous_with_a_warning(tmp_path, caplog):
    m = mesh((4, 2), ("fsdp", "model"), jax.devices())
    ckpt = checkpointer(tmp_path)
    first = state_on(m)
    ckpt.save(1, first, force=True)
    ckpt.save(2, jax.tree.map(lambda x: x + 1, state_on(m)), force=True)
    ckpt.close()
    corrupt(tmp_path / "ckpt" / "2")

    reopened = checkpointer(tmp_path)
    with caplog.at_level(logging.WARNING, logger="axmini.trainer.checkpointer"):
        restored = reopened.restore_latest(abstract_on(m))
    assert restored.step == 1
    np.testing.assert_array_equal(np.asarray(restored.state["params"]["w"]), np.asarray(first["params"]["w"]))
    assert any("step 2 is unreadable" in r.getMessage() for r in caplog.records)
    assert [p.name.split(".")[0] for p in (tmp_path / "ckpt").glob("2.unreadable-*")] == ["2"]
    assert reopened.save(2, first, force=True)  # The step can be saved again after the fallback.
    reopened.close()


def test_no_readable_checkpoint_raises_and_none_returns_none(tmp_path):
    m = mesh((4, 2), ("fsdp", "model"), jax.devices())
    assert checkpointer(tmp_path).restore_latest(abstract_on(m)) is None
    ckpt = checkpointer(tmp_path)
    ckpt.save(1, state_on(m), force=True)
    ckpt.close()
    corrupt(tmp_path / "ckpt" / "1")
    with pytest.raises(CheckpointError, match="step 1"):
        checkpointer(tmp_path).restore_latest(abstract_on(m))


def test_bad_config_is_refused(tmp_path):
    with pytest.raises(ValueError, match="save_every_n_steps=0"):
        checkpointer(tmp_path, save_every_n_steps=0)
