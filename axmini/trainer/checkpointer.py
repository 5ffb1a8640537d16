"""Checkpoints with orbax: asynchronous sharded saves every K steps, keep the last N, restore onto any mesh.

A checkpoint holds the train state (a pytree of sharded arrays: model, optimizer, step) and a small JSON
record (`step`, `input_position`, ...). Orbax writes each step into a temporary directory and renames it
only when complete, so a half-written checkpoint is never listed. Restoring targets an abstract state
whose leaves carry the *current* mesh's shardings, so a checkpoint saved on 8 devices restores on 4.
When the latest checkpoint cannot be read, the checkpointer warns, moves it aside and falls back to the
one before.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, NamedTuple

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from axmini.config import REQUIRED, Configurable, Required, check_positive

logger = logging.getLogger(__name__)


class Restored(NamedTuple):
    step: int
    state: Any
    metadata: dict[str, Any]


class CheckpointError(RuntimeError):
    """No checkpoint in the directory could be restored."""


class Checkpointer(Configurable):
    """Saves and restores the train state under `dir` (one subdirectory per step)."""

    class Config(Configurable.Config):
        dir: Required[str] = REQUIRED  # Filled by the trainer: <trainer dir>/checkpoints.
        save_every_n_steps: int = 1000
        keep_last_n: int = 3
        async_save: bool = True

    def __init__(self, cfg: Config, *, read_only: bool = False):
        """`read_only`: for readers beside a running trainer (sampling): nothing is created, cleaned or saved."""
        super().__init__(cfg)
        cfg = self.config
        check_positive(cfg, "save_every_n_steps", "keep_last_n")
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
        returns whether it did. The write continues in the background (see `wait`)."""
        if not force and step % self.config.save_every_n_steps:
            return False
        if step in self._manager.all_steps():
            return False
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), metadata=ocp.args.JsonSave({"step": step, **(metadata or {})})
        )
        return self._manager.save(step, args=args, force=True)

    def restore(self, step: int, abstract_state: Any) -> Restored:
        """The checkpoint at `step`, placed as `abstract_state`'s leaves say (ShapeDtypeStructs with shardings)."""
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), metadata=ocp.args.JsonRestore())
        restored = self._manager.restore(step, args=args)
        return Restored(step, restored["state"], dict(restored["metadata"]))

    def restore_subtree(self, step: int, abstract: Any) -> Any:
        """Only the entries of the state saved at `step` that `abstract` names (e.g. {"params", "rest"} to sample or
        to start a fine-tune, without reading the optimizer state), placed as `abstract`'s leaves say."""
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
        args = ocp.args.PyTreeRestore(abstract, restore_args=restore_args, partial_restore=True)
        return ocp.PyTreeCheckpointer().restore(self._dir / str(step) / "state", args=args)

    def restore_latest(self, abstract_state: Any) -> Restored | None:
        """The newest readable checkpoint (None when there is none). An unreadable one is moved aside with a
        warning, and the one before it is tried."""
        steps = self.all_steps()
        failures = []
        for step in reversed(steps):
            try:
                return self.restore(step, abstract_state)
            except Exception as e:  # Any read failure: a truncated or corrupted file, a missing array...
                failures.append(f"step {step}: {type(e).__name__}: {e}")
                logger.warning("checkpoint at step %d is unreadable (%s); falling back to the previous one", step, e)
                self._move_aside(step)
        if failures:
            raise CheckpointError(f"no checkpoint in {self.config.dir} could be restored: {'; '.join(failures)}")
        return None

    def _move_aside(self, step: int) -> None:
        """Renames an unreadable checkpoint so that a new save at its step does not collide with it."""
        self._manager.wait_until_finished()
        if jax.process_index() == 0:
            path = self._dir / str(step)
            if path.exists():
                path.rename(path.parent / f"{step}.unreadable-{int(time.time())}")
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"axmini_checkpoint_move_aside_{step}")
        self._manager.reload()

    def wait(self) -> None:
        """Blocks until every started save is complete on storage."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
