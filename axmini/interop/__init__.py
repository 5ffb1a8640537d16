"""Checkpoints in and out: Hugging Face Llama, Qwen3, Mistral and Gemma 3 (text) directories as axmini models.

    imported = import_hf("path/to/hf_dir")                # config.json + model.safetensors (or a sharded index)
    model = nnx.merge(nnx.split(build_abstract(imported.config), nnx.Param, ...)[0], imported.params)
    export_hf(imported.config, imported.params, "out_dir", like=imported.model)   # transformers loads out_dir

`hf.py` holds the family knowledge (configs, tensor names, conventions), `params.py` the streaming of tensors
into sharded parameters and back, `safetensors.py` the file format, `files.py` the output directories (written
whole or not at all) and the tokenizer files that travel with a model, `vocabulary.py` the tokenizer as a seqio
vocabulary. The command line (`axmini convert hf`, `axmini export hf`, `axmini train --init_from`) is in
axmini/cli/.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

from axmini.interop.errors import ConversionError
from axmini.interop.files import copy_model_files, output_dir
from axmini.interop.hf import (
    HFModel,
    choose_family,
    decoder_config,
    hf_config_dict,
    read_hf_config,
    set_param_dtype,
)
from axmini.interop.params import ParamState, abstract_params, load_params, save_hf_tensors
from axmini.layers.decoder import Decoder
from axmini.module import LogicalAxisRules

__all__ = ["ConversionError", "Imported", "export_hf", "hf_model_config", "import_hf"]


class Imported(NamedTuple):
    model: HFModel  # The Hugging Face description (family, dims, conventions).
    config: Decoder.Config  # The axmini model computing the same logits.
    params: ParamState  # Its parameters (nnx.Param state), placed as asked.


def hf_model_config(directory: str | Path, param_dtype: Any = None) -> tuple[HFModel, Decoder.Config]:
    """The model of a Hugging Face directory and its axmini config, from config.json alone (parameters in the
    checkpoint's dtype unless `param_dtype` is given)."""
    model = read_hf_config(directory)
    cfg = decoder_config(model)
    return model, cfg if param_dtype is None else set_param_dtype(cfg, param_dtype)


def import_hf(
    directory: str | Path,
    *,
    param_dtype: Any = None,
    mesh: Any = None,
    rules: LogicalAxisRules = (),
    progress: bool = False,
) -> Imported:
    """The model of a Hugging Face directory with its parameters, streamed tensor by tensor onto `mesh` (sharded by
    `rules`) or one device. Bad input (missing file, unsupported architecture, missing, extra or misshapen tensor)
    raises ConversionError naming the file or tensor before any tensor is read."""
    model, cfg = hf_model_config(directory, param_dtype)
    params = load_params(directory, model, abstract_params(cfg), mesh=mesh, rules=rules, progress=progress)
    return Imported(model, cfg, params)


def export_hf(
    cfg: Decoder.Config,
    params: ParamState,
    out: str | Path,
    *,
    like: HFModel | None = None,
    model_files_from: str | Path | None = None,
    max_shard_bytes: int | None = 5 * 2**30,
    progress: bool = False,
) -> HFModel:
    """Writes a directory that `transformers` loads with `from_pretrained` (config.json, safetensors, and the
    tokenizer files of `model_files_from`). The family is `like`'s when given (the model's origin), else the first
    that expresses `cfg` exactly; a config no family expresses is refused naming the config path. The directory
    appears whole or not at all."""
    model = choose_family(cfg, like.family.architecture if like is not None else None)
    if like is not None:
        model = model._replace(extra=like.extra)
    config_text = json.dumps(hf_config_dict(model), indent=2, sort_keys=True) + "\n"
    with output_dir(out) as tmp:
        if model_files_from is not None:
            copy_model_files(model_files_from, tmp)
        (tmp / "config.json").write_text(config_text)
        save_hf_tensors(tmp, model, params, max_shard_bytes=max_shard_bytes, progress=progress)
    return model
