"""A run's model without its trainer, for `axmini sample`, `axmini eval` and `axmini export`: no input pipeline, no
learner. The one way a model is read back from a checkpoint for use.

The model is built abstractly from a finalized config, placed on this machine's mesh by its logical axes, and filled
with the model variables of a checkpoint (`params` and `rest`); the optimizer state is never read (a checkpoint
`axmini convert hf` wrote has none). The checkpointer is the caller's (read-only beside a running trainer).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.nnx as nnx
import jax
from jax.sharding import Mesh, NamedSharding

from axmini.mesh_rules import make_mesh
from axmini.module import build_abstract, logical_to_spec
from axmini.trainer.checkpointer import Checkpointer, CheckpointError
from axmini.trainer.trainer import BATCH_AXES, Trainer, state_shardings


class RunModel(NamedTuple):
    model: nnx.Module  # With the checkpoint's parameters, sharded on `mesh`.
    step: int  # The checkpoint's step.
    mesh: Mesh
    rules: tuple[tuple[str, Any], ...]  # The logical-axis rules of the run's mesh rule.

    def batch_sharding(self, shape: tuple[int, int]) -> NamedSharding:
        """How a [batch, length] batch is laid out on the mesh (as the trainer lays out its batches)."""
        return NamedSharding(self.mesh, logical_to_spec(BATCH_AXES, self.rules, shape, self.mesh))


def load_model(cfg: Trainer.Config, checkpointer: Checkpointer, *, devices: list[jax.Device] | None = None) -> RunModel:
    """The model of the finalized `cfg` with the variables of `checkpointer`'s latest checkpoint."""
    mesh = make_mesh(cfg.mesh_rule, devices)
    rules = tuple(tuple(rule) for rule in cfg.mesh_rule.logical_axis_rules)
    graphdef, params, rest = nnx.split(build_abstract(cfg.model, cfg.seed), nnx.Param, ...)
    variables = {"params": params, "rest": rest}
    shardings = state_shardings(variables, mesh, rules)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), variables, shardings)
    step = checkpointer.all_steps()[-1]
    try:
        restored = checkpointer.restore_subtree(step, target)
    except Exception as e:  # Orbax's errors for a checkpoint of another model: shape or tree mismatch.
        first = " ".join(str(e).split())[:200] or type(e).__name__
        raise CheckpointError(
            f"{checkpointer.config.dir}/{step}: its weights do not fit this run's model ({first})"
        ) from None
    return RunModel(nnx.merge(graphdef, restored["params"], restored["rest"]), step, mesh, rules)
