"""Starting a run from another run's parameters: the base model of a LoRA or QAT fine-tune.

`Trainer.Config.init_from` names a trainer dir (or its `checkpoints` dir). A run with no checkpoint of its own starts
from the latest checkpoint there: every parameter of the base model (the run's model without weight transforms) is
restored onto this run's mesh (orbax partial restore: the base's optimizer state is not read), the parameters the base
lacks keep their fresh values (LoRA adapters: A random, B zero), weight transforms restart from the loaded weights
(quantization scales from their statistics), and the optimizer starts afresh.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import flax.nnx as nnx
import jax
import orbax.checkpoint as ocp

from axmini.config import ConfigValueError
from axmini.layers.weight_transform import refresh_weight_transforms, without_weight_transforms
from axmini.module import build_abstract, state_shardings


def checkpoints_dir(source: str) -> Path:
    """The orbax checkpoints dir of `source` (a trainer dir or the dir itself); refuses one without a checkpoint."""
    path = Path(source).absolute()
    for candidate in (path / "checkpoints", path):
        if candidate.is_dir() and any(p.name.isdigit() for p in candidate.iterdir()):
            return candidate
    raise ConfigValueError(f"init_from={source} holds no checkpoint; give the trainer dir of a finished run")


def restore_base_params(source: str, model_cfg: Any, mesh: Any, rules: Any) -> nnx.State:
    """The parameters of `model_cfg` without weight transforms, from the latest checkpoint of `source`."""
    params = nnx.state(build_abstract(without_weight_transforms(model_cfg)), nnx.Param)
    shardings = state_shardings(params, mesh, rules)
    target = jax.tree.map(
        lambda v, s: v.replace(jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype, sharding=s)),
        params,
        shardings,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
    directory = checkpoints_dir(source)
    step = max(int(p.name) for p in directory.iterdir() if p.name.isdigit())
    item = {"params": target}
    args = ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True
    )
    try:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
            restored = checkpointer.restore(directory / str(step), args=ocp.args.Composite(state=args))
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigValueError(
            f"init_from={source}: its checkpoint at step {step} does not hold this model's base parameters "
            f"({' '.join(str(e).split())[:200]}); start from a run of the same model"
        ) from None
    return restored["state"]["params"]


def warm_started(trainer: Any, state: dict[str, Any]) -> dict[str, Any]:
    """`state` (fresh) with the base parameters of `trainer.config.init_from`, transforms restarted from them, and a
    fresh optimizer state."""
    cfg = trainer.config
    base = restore_base_params(cfg.init_from, cfg.model, trainer.mesh, trainer.rules)

    def start(state: dict[str, Any], base: nnx.State) -> dict[str, Any]:
        model = nnx.merge(trainer._graphdef, state["params"], state["rest"])
        nnx.update(model, base)
        refresh_weight_transforms(model)
        _, params, rest = nnx.split(model, nnx.Param, ...)
        return {**state, "params": params, "rest": rest, "opt_state": trainer.learner.init(params)}

    return jax.jit(start, out_shardings=trainer.state_shardings, donate_argnums=(0,))(state, base)
