"""Starting a run from other weights: the base model of a fine-tune (plain, LoRA or QAT).

`Trainer.Config.init_from` names them: a trainer dir (a finished run, or one `axmini convert hf` wrote; or its
`checkpoints` dir) or `hf:DIR`, a Hugging Face model dir imported as the run starts (the run's model must then be
DIR's: `axmini train --init_from=hf:DIR` makes it so). A run with no checkpoint of its own starts from them: every
parameter of the base model (the run's model without weight transforms) is read onto this run's mesh (from a trainer
dir by an orbax partial restore, so its optimizer state, if any, is not read; from a Hugging Face dir streamed tensor
by tensor), the parameters the base lacks keep their fresh values (LoRA adapters: A random, B zero), weight
transforms restart from the loaded weights (quantization scales from their statistics), and the optimizer starts
afresh. The trainer then saves this state as the run's step-0 checkpoint, so resuming never reads the source again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import flax.nnx as nnx
import jax

from axmini.config import ConfigValueError
from axmini.layers.weight_transform import refresh_weight_transforms, without_weight_transforms
from axmini.module import build_abstract, state_shardings

HF_PREFIX = "hf:"  # init_from=hf:DIR: a Hugging Face model dir.


class InitSource(NamedTuple):
    path: Path  # The Hugging Face model dir, or the orbax checkpoints dir of a trainer dir.
    is_hf: bool


def has_checkpoint(directory: str | Path) -> bool:
    """Whether `directory` (an orbax checkpoints dir) holds a complete checkpoint (a step-numbered subdir)."""
    path = Path(directory)
    return path.is_dir() and any(p.name.isdigit() for p in path.iterdir())


def init_source(source: str) -> InitSource:
    """Where `source` (an `init_from` value) keeps its weights; refuses, in one line, one that holds none."""
    if source.startswith(HF_PREFIX):
        path = Path(source.removeprefix(HF_PREFIX)).absolute()
        if not (path / "config.json").is_file():
            raise ConfigValueError(
                f"init_from={source}: {path / 'config.json'} not found (hf:DIR names a Hugging Face model dir)"
            )
        return InitSource(path, True)
    path = Path(source).absolute()
    for candidate in (path / "checkpoints", path):
        if has_checkpoint(candidate):
            return InitSource(candidate, False)
    raise ConfigValueError(
        f"init_from={source} holds no checkpoint; give the trainer dir of a finished (or converted) run, or hf:DIR"
    )


def check_init_from(source: str, model_cfg: Any) -> None:
    """Refuses a source without weights, or (from the file headers alone) a Hugging Face dir whose tensors do not fit
    the base of `model_cfg`."""
    found = init_source(source)
    if not found.is_hf:
        return
    from axmini.interop import ConversionError
    from axmini.interop.hf import read_hf_config
    from axmini.interop.params import abstract_params, check_tensors
    from axmini.interop.safetensors import TensorIndex

    try:
        base = abstract_params(without_weight_transforms(model_cfg))
        check_tensors(TensorIndex.open(found.path), read_hf_config(found.path), base)
    except (ConversionError, KeyError) as e:
        first = " ".join(str(e).split())[:300]
        raise ConfigValueError(
            f"init_from={source}: its weights do not fit this run's model ({first}); start with "
            f"`axmini train --init_from={source}`, which takes the model from that dir"
        ) from None


def base_params(source: str, trainer: Any) -> nnx.State:
    """The parameters of the trainer's model without weight transforms, read from `source` onto its mesh."""
    base_cfg = without_weight_transforms(trainer.config.model)
    found = init_source(source)
    if found.is_hf:
        from axmini.interop.hf import read_hf_config
        from axmini.interop.params import abstract_params, load_params

        abstract = abstract_params(base_cfg)
        return load_params(found.path, read_hf_config(found.path), abstract, mesh=trainer.mesh, rules=trainer.rules)
    params = nnx.state(build_abstract(base_cfg), nnx.Param)
    target = jax.tree.map(
        lambda v, s: v.replace(jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype, sharding=s)),
        params,
        state_shardings(params, trainer.mesh, trainer.rules),
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
    checkpointer = trainer.config.checkpointer.clone(dir=str(found.path)).instantiate(read_only=True)
    step = checkpointer.all_steps()[-1]
    try:
        return checkpointer.restore_subtree(step, {"params": target})["params"]
    except (ValueError, KeyError, TypeError) as e:  # Orbax's errors for a checkpoint of another model.
        raise ConfigValueError(
            f"init_from={source}: its checkpoint at step {step} does not hold this model's base parameters "
            f"({' '.join(str(e).split())[:200]}); start from a run of the same model"
        ) from None


def warm_started(trainer: Any, state: dict[str, Any]) -> dict[str, Any]:
    """`state` (fresh) with the base parameters of `trainer.config.init_from`, transforms restarted from them, and a
    fresh optimizer state."""
    base = base_params(trainer.config.init_from, trainer)

    def start(state: dict[str, Any], base: nnx.State) -> dict[str, Any]:
        model = nnx.merge(trainer._graphdef, state["params"], state["rest"])
        nnx.update(model, base)
        refresh_weight_transforms(model)
        _, params, rest = nnx.split(model, nnx.Param, ...)
        return {**state, "params": params, "rest": rest, "opt_state": trainer.learner.init(params)}

    return jax.jit(start, out_shardings=trainer.state_shardings, donate_argnums=(0,))(state, base)
