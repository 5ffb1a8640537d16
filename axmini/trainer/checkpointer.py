"""Checkpoints with orbax: asynchronous sharded saves every K steps, keep the last N, restore onto any mesh, verified.

A checkpoint holds the train state (a pytree of sharded arrays: model, optimizer, step) and a JSON record: the step,
the input position, the finalized config of the run that wrote it (text and hash) and, for every array, its path,
shape, dtype and fingerprint. Orbax writes each step into a temporary directory and renames it only when complete,
so a half-written checkpoint is never listed. Restoring targets an abstract state whose leaves carry the *current*
mesh's shardings, so a checkpoint saved on 8 devices restores on 4.

Restoring tells two failures apart:
- a checkpoint whose arrays differ (path, shape or dtype) from the state asked for was written by another model
  or config: `CheckpointMismatchError` names the first difference, and nothing is touched;
- one that cannot be read, whose arrays fail their fingerprints, or that holds NaN or infinite values is corrupt:
  the one before is tried, and once one restores, each corrupt newer one is moved aside (`<step>.corrupt-<time>`)
  with a one-line warning. When none restores, `NoRestorableCheckpointError`, and nothing is touched: a run starts
  over only when asked to (`set_aside_all`). A read-only checkpointer (a sampler beside a trainer) moves nothing.

A fingerprint is two sums over the array's elements, modulo 2^32, of a function of each element's bits and its flat
index (see `_inspect`): computed on the devices in one pass over the state as the save starts, it is the same for
any sharding (integer sums do not depend on the order), so a checkpoint saved on one mesh is verified on another
without gathering any array; a change of any single element always changes it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from axmini.config import REQUIRED, ConfigError, Configurable, Required, check_positive

logger = logging.getLogger(__name__)


class Restored(NamedTuple):
    step: int
    state: Any
    metadata: dict[str, Any]


class CheckpointError(RuntimeError):
    """A run directory whose checkpoints cannot be resumed from: printed in one line by the command (exit 2)."""


class CheckpointMismatchError(CheckpointError, ConfigError):
    """The checkpoint was written by a different model or config than the one restoring it."""


class NoRestorableCheckpointError(CheckpointError):
    """The directory has checkpoints, and none of them can be restored."""


class CorruptCheckpointError(CheckpointError):
    """This checkpoint cannot be used: unreadable, failing its fingerprints, or holding non-finite values."""


def config_record(config_text: str) -> dict[str, str]:
    """What a checkpoint records of the config that wrote it: its text (`debug_string()`) and hash."""
    return {"config": config_text, "config_hash": hashlib.sha256(config_text.encode()).hexdigest()[:16]}


def _one_line(error: BaseException | str, limit: int = 160) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------------------------------------------
# Array records: path, shape, dtype, fingerprint.


def _key_name(key: Any) -> str:
    return str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key))))


def _leaves(tree: Any) -> list[tuple[str, Any]]:
    """(path, leaf) of every array of `tree`: `params/stack/layers/feed_forward/wo` (a Variable's `.value` dropped)."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [("/".join(_key_name(k) for k in path if _key_name(k) != "value"), leaf) for path, leaf in flat]


def _words(x: jax.Array) -> jax.Array:
    """The bits of `x` as uint32 words (a typed PRNG key by its key data; 8-byte items as two words)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _mix(x: jax.Array) -> jax.Array:
    """A 32-bit integer hash (lowbias32)."""
    x = (x ^ (x >> 16)) * jnp.uint32(0x7FEB352D)
    x = (x ^ (x >> 15)) * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


@jax.jit
def _inspect(leaves: list[jax.Array]) -> tuple[jax.Array, jax.Array]:
    """(fingerprints uint32[n, 2], all-finite bool[n]) of the arrays, each reduced where it lives.

    With w_i = (i * 0x9E3779B1) | 1 (odd) for flat index i and x_i the element's bits, the fingerprint is
    (sum x_i * w_i, sum mix(x_i ^ w_i)) mod 2^32: the first sum changes with any one element (an odd weight times a
    nonzero difference), the second with changes that cancel in a linear sum (every element doubled, say)."""
    fingerprints, finite = [], []
    for x in leaves:
        words = _words(x)
        weights = (jax.lax.iota(jnp.uint32, words.size).reshape(words.shape) * jnp.uint32(0x9E3779B1)) | 1
        sums = (jnp.sum(words * weights, dtype=jnp.uint32), jnp.sum(_mix(words ^ weights), dtype=jnp.uint32))
        fingerprints.append(jnp.stack(sums))
        finite.append(jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True))
    return jnp.stack(fingerprints), jnp.stack(finite)


def array_records(tree: Any) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """({path: {shape, dtype, fingerprint}} of the arrays of `tree`, paths of those holding NaN or infinity): what a
    checkpoint records of its arrays, and checks again when restored."""
    leaves = _leaves(tree)
    fingerprints, finite = (np.asarray(a) for a in jax.device_get(_inspect([leaf for _, leaf in leaves])))
    records = {
        path: {"shape": list(leaf.shape), "dtype": str(leaf.dtype), "fingerprint": f"{a:08x}{b:08x}"}
        for (path, leaf), (a, b) in zip(leaves, fingerprints)
    }
    return records, [path for (path, _), ok in zip(leaves, finite) if not ok]


def _first_difference(saved: dict[str, dict[str, Any]], abstract_state: Any, partial: bool = False) -> str | None:
    """How the saved arrays differ from those of `abstract_state` (the first difference, parameters first), or None.
    `partial`: arrays saved but not asked for are no difference."""
    expected = dict(sorted(_leaves(abstract_state), key=lambda item: not item[0].startswith("params/")))
    for path, leaf in expected.items():
        if path not in saved:
            return f"{path} {tuple(leaf.shape)} is not in the checkpoint"
        shape, dtype = tuple(saved[path]["shape"]), saved[path]["dtype"]
        if (shape, dtype) != (tuple(leaf.shape), str(leaf.dtype)):
            return f"{path} has shape {shape} {dtype} in the checkpoint, {tuple(leaf.shape)} {leaf.dtype} here"
    extra = None if partial else next((path for path in saved if path not in expected), None)
    return f"{extra} {tuple(saved[extra]['shape'])} is in the checkpoint only" if extra else None


def config_differences(saved: str, current: str, limit: int = 3) -> str:
    """`path: old -> new` for the first `limit` fields that differ between two config texts (the model's first; the
    directories, which move with the run, left out), and how many more."""
    old, new = (dict(line.split(": ", 1) for line in text.splitlines() if ": " in line) for text in (saved, current))
    paths = [p for p in {**old, **new} if old.get(p) != new.get(p) and p.rsplit(".", 1)[-1] != "dir"]
    paths.sort(key=lambda p: not p.startswith("model."))
    changed = [f"{p}: {old.get(p, '(none)')} -> {new.get(p, '(none)')}" for p in paths]
    more = f" and {len(changed) - limit} more" if len(changed) > limit else ""
    return ", ".join(changed[:limit]) + more


# ----------------------------------------------------------------------------------------------------
# The checkpointer.


class Checkpointer(Configurable):
    """Saves and restores the train state under `dir` (one subdirectory per step)."""

    class Config(Configurable.Config):
        dir: Required[str] = REQUIRED  # Filled by the trainer: <trainer dir>/checkpoints.
        save_every_n_steps: int = 1000
        keep_last_n: int = 3
        async_save: bool = True

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        super().check_config(cfg)
        check_positive(cfg, "save_every_n_steps", "keep_last_n")

    def __init__(self, cfg: Config, *, read_only: bool = False):
        """`read_only`: for readers beside a running trainer (sampling): nothing is created, moved, cleaned or saved."""
        super().__init__(cfg)
        cfg = self.config
        self.read_only = read_only
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep_last_n,
            enable_async_checkpointing=cfg.async_save,
            cleanup_tmp_directories=not read_only,  # Leftovers of a crashed save; a reader must not touch them.
            create=not read_only,
            read_only=read_only,
        )
        # Orbax needs an absolute path; a relative local dir (`--trainer_dir=runs/x`) is taken from the cwd.
        self._dir = epath.Path(cfg.dir if "://" in cfg.dir else os.path.abspath(cfg.dir))
        self._manager = ocp.CheckpointManager(self._dir, options=options)

    def all_steps(self) -> list[int]:
        """Steps of the complete checkpoints, oldest first."""
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, metadata: dict[str, Any] | None = None, *, force: bool = False) -> bool:
        """Starts saving `state` at `step` when `step` is a multiple of save_every_n_steps (or `force`);
        returns whether it did. The arrays' fingerprints are taken now; the write continues in the background."""
        if not force and step % self.config.save_every_n_steps:
            return False
        if step in self._manager.all_steps():
            return False
        arrays, _ = array_records(state)
        record = {"step": step, **(metadata or {}), "arrays": arrays}
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), metadata=ocp.args.JsonSave(record))
        return self._manager.save(step, args=args, force=True)

    def restore(self, step: int, abstract_state: Any, *, config: str | None = None, partial: bool = False) -> Restored:
        """The checkpoint at `step`, placed as `abstract_state`'s leaves say (ShapeDtypeStructs with shardings), and
        verified. `config`: the text of the config restoring it, named in a mismatch error.

        `partial`: `abstract_state` names only some of the saved arrays (e.g. {"params": ..., "rest": ...} to sample
        or to start a fine-tune without reading the optimizer state); the others are neither read nor compared.

        Raises CheckpointMismatchError when it holds other arrays, CorruptCheckpointError when it cannot be used."""
        try:
            args = ocp.args.Composite(metadata=ocp.args.JsonRestore())
            record = dict(self._manager.restore(step, args=args)["metadata"])
        except Exception as e:  # A missing or truncated record: the checkpoint is unusable.
            raise CorruptCheckpointError(f"unreadable record: {_one_line(e)}") from None
        saved = record.get("arrays", {})  # Empty: written before checkpoints recorded their arrays.
        difference = _first_difference(saved, abstract_state, partial=partial) if saved else None
        if difference:
            changed = config_differences(record["config"], config) if config and "config" in record else ""
            raise CheckpointMismatchError(
                f"checkpoint step {step} in {self.config.dir} was written by a different model or config: {difference}"
                + (f" (config: {changed})" if changed else "")
                + "; resume with the config it was written with, or train in another directory"
            )
        try:
            state = self._read(step, abstract_state, partial)
        except Exception as e:  # Any read failure: a truncated or corrupted file, a missing array...
            raise CorruptCheckpointError(f"unreadable: {_one_line(e)}") from None
        arrays, non_finite = array_records(state)
        bad = [path for path, a in arrays.items() if path in saved and a["fingerprint"] != saved[path]["fingerprint"]]
        if bad:
            raise CorruptCheckpointError(f"{len(bad)} array(s) fail their fingerprint, first {bad[0]}")
        if non_finite:
            raise CorruptCheckpointError(f"{len(non_finite)} array(s) hold NaN or infinity, first {non_finite[0]}")
        return Restored(step, state, record)

    def _read(self, step: int, abstract_state: Any, partial: bool) -> Any:
        if not partial:
            return self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))[
                "state"
            ]
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
        args = ocp.args.PyTreeRestore(abstract_state, restore_args=restore_args, partial_restore=True)
        return ocp.PyTreeCheckpointer().restore(self._dir / str(step) / "state", args=args)

    def restore_latest(
        self, abstract_state: Any, *, config: str | None = None, before: int | None = None, partial: bool = False
    ) -> Restored | None:
        """The newest checkpoint (older than `before`, if given) that restores and verifies; None when there is
        none. Corrupt newer ones are moved aside, each with a one-line warning, once an older one has restored.
        `partial`: as in `restore`.

        Raises CheckpointMismatchError (another model's checkpoint) or NoRestorableCheckpointError (checkpoints, none
        usable), touching nothing."""
        corrupt: list[tuple[int, str]] = []
        for step in reversed([s for s in self.all_steps() if before is None or s < before]):
            try:
                restored = self.restore(step, abstract_state, config=config, partial=partial)
            except CorruptCheckpointError as e:
                corrupt.append((step, str(e)))
                continue
            for bad_step, reason in corrupt:
                self.set_aside(bad_step, f"corrupt, {reason}", fallback=step)
            changed = (
                config_differences(restored.metadata["config"], config)
                if config and "config" in restored.metadata
                else ""
            )
            if changed:
                logger.warning("resuming checkpoint step %d with a changed config: %s", step, changed)
            return restored
        if corrupt:
            reasons = "; ".join(f"step {step}: {reason}" for step, reason in corrupt)
            raise NoRestorableCheckpointError(
                f"none of the {len(corrupt)} checkpoint(s) in {self.config.dir} can be restored ({reasons}); "
                "nothing was changed: start from scratch explicitly (axmini train --from_scratch), which moves them "
                "aside"
            )
        return None

    def set_aside(self, step: int, reason: str, *, fallback: int | None = None, label: str = "corrupt") -> None:
        """Moves the checkpoint at `step` aside (`<step>.<label>-<time>`, kept for inspection) with a one-line
        warning, so that a new save at its step does not collide with it. A read-only checkpointer only warns."""
        instead = f"; restoring step {fallback} instead" if fallback is not None else ""
        if self.read_only:
            logger.warning("checkpoint step %d: %s; left in place (read-only)%s", step, reason, instead)
            return
        self._manager.wait_until_finished()
        target = self._dir / f"{step}.{label}-{int(time.time())}"
        if jax.process_index() == 0:
            path = self._dir / str(step)
            if path.exists():
                path.rename(target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"axmini_checkpoint_set_aside_{step}")
        self._manager.reload()
        logger.warning("checkpoint step %d: %s; moved to %s%s", step, reason, target, instead)

    def set_aside_all(self, reason: str) -> Sequence[int]:
        """Moves every checkpoint aside (`<step>.set-aside-<time>`): a run that starts over keeps what it replaces."""
        steps = self.all_steps()
        for step in steps:
            self.set_aside(step, reason, label="set-aside")
        return steps

    def wait(self) -> None:
        """Blocks until every started save is complete on storage."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
