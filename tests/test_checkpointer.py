"""Checkpointer: save cadence and retention, restore onto another mesh, half-written and corrupted checkpoints."""

import logging
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from axmini.trainer.checkpointer import (
    Checkpointer,
    CheckpointMismatchError,
    NoRestorableCheckpointError,
    array_records,
    config_record,
)


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
    assert restored.step == 3 and restored.metadata["step"] == 3 and restored.metadata["input_position"] == 3
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


def snapshot(root):
    """{relative path: bytes} of every file under `root`, and its directories."""
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def warnings_of(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "axmini.trainer.checkpointer"]


def test_corrupted_latest_falls_back_to_the_previous_with_a_one_line_warning(tmp_path, caplog):
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
    [warning] = warnings_of(caplog)
    assert warning.startswith("checkpoint step 2: corrupt, unreadable") and "restoring step 1 instead" in warning
    assert "\n" not in warning and len(warning) < 400
    assert [p.name.split(".")[0] for p in (tmp_path / "ckpt").glob("2.corrupt-*")] == ["2"]
    assert reopened.save(2, first, force=True)  # The step can be saved again after the fallback.
    reopened.close()


def flip_bytes_inside_the_arrays(step_dir):
    """Inverts 16 bytes in the middle of the checkpoint's largest array data file (orbax keeps them, compressed, in
    `d/` directories): the decoder then fails, or, worse, returns other values."""
    data = max((p for p in (step_dir / "state").rglob("*") if p.parent.name == "d"), key=lambda p: p.stat().st_size)
    content = bytearray(data.read_bytes())
    middle = len(content) // 2
    content[middle : middle + 16] = bytes(b ^ 0xFF for b in content[middle : middle + 16])
    data.write_bytes(bytes(content))


def abstract_state_of(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def random_state(m, scale=1.0):
    """A state of incompressible values: the checkpoint stores their bytes as they are (no compression)."""
    w = jax.random.normal(jax.random.key(0), (64, 64)) * scale
    return {"params": {"w": jax.device_put(w, NamedSharding(m, PartitionSpec("fsdp", "model")))}}


def test_a_byte_flip_inside_an_array_file_is_detected_and_the_previous_checkpoint_restored(tmp_path, caplog):
    m = mesh((4, 2), ("fsdp", "model"), jax.devices())
    ckpt = checkpointer(tmp_path)
    ckpt.save(1, random_state(m), force=True)
    ckpt.save(2, random_state(m, 2.0), force=True)
    ckpt.close()
    flip_bytes_inside_the_arrays(tmp_path / "ckpt" / "2")
    with caplog.at_level(logging.WARNING, logger="axmini.trainer.checkpointer"):
        restored = checkpointer(tmp_path).restore_latest(abstract_state_of(random_state(m)))
    assert restored.step == 1
    np.testing.assert_array_equal(np.asarray(restored.state["params"]["w"]), np.asarray(random_state(m)["params"]["w"]))
    [warning] = warnings_of(caplog)
    assert warning.startswith("checkpoint step 2: corrupt, ")


def test_arrays_that_read_back_other_values_fail_their_fingerprint(tmp_path, caplog):
    """Silent corruption: every file decodes, to values other than those saved (here: step 1's, under step 2's
    record). Nothing but the fingerprints can see it."""
    m = mesh((4, 2), ("fsdp", "model"), jax.devices())
    ckpt = checkpointer(tmp_path)
    ckpt.save(1, random_state(m), force=True)
    ckpt.save(2, random_state(m, 2.0), force=True)
    ckpt.close()
    shutil.rmtree(tmp_path / "ckpt" / "2" / "state")
    shutil.copytree(tmp_path / "ckpt" / "1" / "state", tmp_path / "ckpt" / "2" / "state")
    with caplog.at_level(logging.WARNING, logger="axmini.trainer.checkpointer"):
        assert checkpointer(tmp_path).restore_latest(abstract_state_of(random_state(m))).step == 1
    [warning] = warnings_of(caplog)
    assert warning.startswith("checkpoint step 2: corrupt, 1 array(s) fail their fingerprint, first params/w;")


def test_non_finite_values_count_as_corruption(tmp_path, caplog):
    m = mesh((4, 2), ("fsdp", "model"), jax.devices())
    ckpt = checkpointer(tmp_path)
    ckpt.save(1, state_on(m), force=True)
    ckpt.save(2, jax.tree.map(lambda x: x / 0 if x.dtype == jnp.float32 else x, state_on(m)), force=True)
    ckpt.close()
    with caplog.at_level(logging.WARNING, logger="axmini.trainer.checkpointer"):
        assert checkpointer(tmp_path).restore_latest(abstract_on(m)).step == 1
    [warning] = warnings_of(caplog)
    assert "hold NaN or infinity, first opt_state/0" in warning


def test_a_checkpoint_of_another_model_is_refused_naming_the_first_difference_and_touching_nothing(tmp_path):
    m = mesh((4, 2), ("fsdp", "model"), jax.devices())
    ckpt = checkpointer(tmp_path)
    ckpt.save(1, state_on(m), {**config_record("dim: 8\nlr: 0.1")}, force=True)
    ckpt.close()
    before = snapshot(tmp_path)
    other = abstract_on(m)
    other["params"]["w"] = jax.ShapeDtypeStruct((64, 16), jnp.float32, sharding=other["params"]["w"].sharding)
    with pytest.raises(CheckpointMismatchError) as info:
        checkpointer(tmp_path).restore_latest(other, config="dim: 16\nlr: 0.1")
    message = str(info.value)
    assert "checkpoint step 1" in message and "written by a different model or config" in message
    assert "params/w has shape (64, 8) float32 in the checkpoint, (64, 16) float32 here" in message
    assert "(config: dim: 8 -> 16)" in message and "\n" not in message
    missing = {"params": {}, "opt_state": other["opt_state"], "step": other["step"]}
    with pytest.raises(CheckpointMismatchError, match=r"params/w .* is in the checkpoint only"):
        checkpointer(tmp_path).restore_latest(missing)
    assert snapshot(tmp_path) == before


def test_a_changed_config_that_keeps_the_arrays_restores_with_a_one_line_warning(tmp_path, caplog):
    m = mesh((4, 2), ("fsdp", "model"), jax.devices())
    ckpt = checkpointer(tmp_path)
    ckpt.save(1, state_on(m), {**config_record("max_step: 10\nlr: 0.1")}, force=True)
    ckpt.close()
    with caplog.at_level(logging.WARNING, logger="axmini.trainer.checkpointer"):
        restored = checkpointer(tmp_path).restore_latest(abstract_on(m), config="max_step: 20\nlr: 0.1")
    assert (
        restored.step == 1 and restored.metadata["config_hash"] == config_record("max_step: 10\nlr: 0.1")["config_hash"]
    )
    assert warnings_of(caplog) == ["resuming checkpoint step 1 with a changed config: max_step: 10 -> 20"]


def test_no_restorable_checkpoint_raises_touching_nothing_until_set_aside(tmp_path):
    m = mesh((4, 2), ("fsdp", "model"), jax.devices())
    assert checkpointer(tmp_path).restore_latest(abstract_on(m)) is None
    ckpt = checkpointer(tmp_path)
    ckpt.save(1, state_on(m), force=True)
    ckpt.save(2, state_on(m), force=True)
    ckpt.close()
    corrupt(tmp_path / "ckpt" / "1")
    corrupt(tmp_path / "ckpt" / "2")
    before = snapshot(tmp_path)
    with pytest.raises(
        NoRestorableCheckpointError, match=r"none of the 2 checkpoint\(s\) .* \(step 2: unreadable.*; step 1"
    ):
        checkpointer(tmp_path).restore_latest(abstract_on(m))
    assert snapshot(tmp_path) == before
    reopened = checkpointer(tmp_path)
    assert list(reopened.set_aside_all("starting over")) == [1, 2] and reopened.all_steps() == []
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "ckpt").iterdir()) == ["1.set", "2.set"]


def test_a_read_only_checkpointer_moves_nothing(tmp_path, caplog):
    m = mesh((4, 2), ("fsdp", "model"), jax.devices())
    ckpt = checkpointer(tmp_path)
    ckpt.save(1, state_on(m), force=True)
    ckpt.save(2, state_on(m), force=True)
    ckpt.close()
    corrupt(tmp_path / "ckpt" / "2")
    before = snapshot(tmp_path)
    reader = Checkpointer.default_config().set(dir=str(tmp_path / "ckpt")).instantiate(read_only=True)
    with caplog.at_level(logging.WARNING, logger="axmini.trainer.checkpointer"):
        assert reader.restore_latest(abstract_on(m)).step == 1
    assert snapshot(tmp_path) == before
    assert "left in place (read-only); restoring step 1 instead" in warnings_of(caplog)[0]


def reference_fingerprint(x: np.ndarray) -> str:
    """Plain numpy: with w_i = (i * 0x9E3779B1) | 1 and x_i the bits of element i, (sum x_i w_i, sum
    lowbias32(x_i ^ w_i)) mod 2^32."""
    mask = np.uint64(2**32 - 1)
    words = x.view(np.uint32).astype(np.uint64).ravel()
    weights = np.arange(words.size, dtype=np.uint64) * np.uint64(0x9E3779B1) & mask | np.uint64(1)

    def lowbias32(v):
        v = (v ^ (v >> np.uint64(16))) * np.uint64(0x7FEB352D) & mask
        v = (v ^ (v >> np.uint64(15))) * np.uint64(0x846CA68B) & mask
        return v ^ (v >> np.uint64(16))

    sums = ((words * weights & mask).sum() & mask, lowbias32(words ^ weights).sum() & mask)
    return "".join(f"{int(s):08x}" for s in sums)


def test_fingerprints_match_a_numpy_reference_on_any_mesh_and_see_any_one_element_change():
    w = np.asarray(jax.random.normal(jax.random.key(1), (64, 8)))
    expected = reference_fingerprint(w)
    placements = [
        NamedSharding(mesh((4, 2), ("fsdp", "model"), jax.devices()), PartitionSpec("fsdp", "model")),
        NamedSharding(mesh((2, 2), ("fsdp", "model"), jax.devices()[:4]), PartitionSpec(None, "model")),
        jax.sharding.SingleDeviceSharding(jax.devices()[3]),
    ]
    for sharding in placements:
        records, non_finite = array_records({"w": jax.device_put(w, sharding)})
        assert records["w"] == {"shape": [64, 8], "dtype": "float32", "fingerprint": expected} and non_finite == []
    changed = w.copy()
    changed.view(np.uint32)[37, 5] ^= 1 << 31  # One bit of one element.
    changed_fingerprint = array_records({"w": jnp.asarray(changed)})[0]["w"]["fingerprint"]
    assert changed_fingerprint == reference_fingerprint(changed) != expected
    # Every element doubled (each exponent + 1) cancels in the linear sum here; the hashed sum sees it.
    doubled = array_records({"w": jnp.asarray(w * 2)})[0]["w"]["fingerprint"]
    assert doubled == reference_fingerprint(w * 2) and doubled[8:] != expected[8:]


def test_bad_config_is_refused(tmp_path):
    with pytest.raises(ValueError, match="save_every_n_steps=0"):
        checkpointer(tmp_path, save_every_n_steps=0)
