"""Imported models in trainer runs: experiment configs around them, their description and weights in trainer dirs.

A trainer dir that holds an imported model keeps its Hugging Face description in `<dir>/model/` (config.json and
the tokenizer files), so the run's config can always be rebuilt: the named experiment supplies input, schedule and
learner; `model/config.json` the model (`imported_trainer_config`). Its checkpoints have the trainer's layout;
`axmini convert hf` writes one holding only the parameters (`params_only_state`), which sampling and exporting read
with `restore_params`, and `--init_from` (the trainer's `init_from`, axmini/trainer/warm_start.py) with a partial
restore of its own: neither reads any optimizer state.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from axmini.config import find_configs, set_path
from axmini.interop import hf_model_config
from axmini.interop.errors import ConversionError
from axmini.interop.files import copy_model_files
from axmini.interop.hf import CONFIG_FILE, dtype_name
from axmini.trainer.input import DEFAULT_TASK, SeqioInput
from axmini.trainer.warm_start import init_source

MODEL_DIR = "model"  # In a trainer dir: the imported model's config.json and tokenizer files.


def imported_trainer_config(cfg: Any, model_dir: str | Path, param_dtype: Any = None) -> Any:
    """The trainer config `cfg` with the model of `model_dir` (a Hugging Face config.json) and, when the model came
    with a tokenizer, every input on the embedded corpus tokenized with it."""
    from axmini.interop.vocabulary import TokenizedCorpusInput, corpus_task_name, has_tokenizer

    cfg = cfg.clone()
    cfg.model = hf_model_config(model_dir, param_dtype)[1]
    if has_tokenizer(model_dir):
        task = corpus_task_name(model_dir)
        for path, input_cfg in find_configs(cfg, SeqioInput.matches):
            if input_cfg.task == DEFAULT_TASK:
                tokenized = TokenizedCorpusInput.default_config().set(model_dir=str(Path(model_dir).absolute()))
                for name in set(input_cfg.field_names()) - {"klass", "task"}:
                    setattr(tokenized, name, getattr(input_cfg, name))
                set_path(cfg, path, tokenized.set(task=task))
    return cfg


def save_model_dir(source: str | Path, trainer_dir: str | Path, param_dtype: Any) -> None:
    """Copies the Hugging Face description of `source` (config.json with the dtype the run keeps its parameters in,
    and the tokenizer files) into `<trainer_dir>/model/`."""
    target = Path(trainer_dir) / MODEL_DIR
    target.mkdir(parents=True, exist_ok=True)
    config = json.loads((Path(source) / CONFIG_FILE).read_text())
    config.pop("torch_dtype", None)
    (target / CONFIG_FILE).write_text(json.dumps({**config, "dtype": dtype_name(param_dtype)}, indent=2) + "\n")
    copy_model_files(source, target)


def source_model_dir(init_from: str) -> Path | None:
    """The Hugging Face description of the model an `init_from` source holds, when it carries its own: DIR of
    `hf:DIR`, or a trainer dir's `model/` (one `axmini convert hf` wrote, or a fine-tune of one). Checks the source."""
    source = init_source(init_from)
    model_dir = source.path if source.is_hf else source.path.parent / MODEL_DIR
    return model_dir if model_dir.is_dir() else None


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def restore_params(trainer: Any, checkpoints_dir: str | Path) -> dict[str, Any]:
    """{"params", "rest"} of the latest checkpoint in `checkpoints_dir`, placed on `trainer`'s mesh; any optimizer
    state in the checkpoint is not read."""
    checkpointer = trainer.config.checkpointer.clone(dir=str(checkpoints_dir)).instantiate(read_only=True)
    steps = checkpointer.all_steps()
    if not steps:
        raise ConversionError(f"{checkpoints_dir}: no checkpoint to read weights from")
    keys = ("params", "rest")
    abstract = {k: abstract_with_shardings(trainer.abstract_state[k], trainer.state_shardings[k]) for k in keys}
    try:
        return checkpointer.restore_subtree(steps[-1], abstract)
    except Exception as e:  # Orbax's errors for a checkpoint of another model: shape or tree mismatch.
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConversionError(f"{checkpoints_dir}/{steps[-1]}: its weights do not fit this model ({first})") from None


def _zeros_like(abstract: Any) -> Any:
    """The model's non-parameter variables at step 0 (no model here has any yet; zeros keep the tree whole)."""
    return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract)


def params_only_state(trainer: Any, params: Any) -> dict[str, Any]:
    """What `axmini convert hf` saves: the trainer's state without the optimizer's."""
    return {"step": jnp.zeros((), jnp.int32), "params": params, "rest": _zeros_like(trainer.abstract_state["rest"])}


def copy_model_dir(init_from: str, trainer_dir: str | Path, param_dtype: Any) -> bool:
    """Gives a new run the Hugging Face description of the model it starts from; returns whether the source has one."""
    model_dir = source_model_dir(init_from)
    if model_dir is None:
        return False
    if init_source(init_from).is_hf:
        save_model_dir(model_dir, trainer_dir, param_dtype)
    else:
        shutil.copytree(model_dir, Path(trainer_dir) / MODEL_DIR, dirs_exist_ok=True)
    return True
