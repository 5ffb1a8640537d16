"""`axmini convert hf DIR --out TRAINER_DIR [--config NAME] [--set ...]`: a Hugging Face model as a trainer dir.

The trainer dir gets the run record of experiment NAME (default `finetune`: its input, schedule and learner) around
the imported model, the model's config.json and tokenizer in `model/`, and a step-0 checkpoint in the trainer's
layout holding the weights (no optimizer state). `axmini sample --trainer_dir=TRAINER_DIR` samples from it,
`axmini train --init_from=TRAINER_DIR` fine-tunes it, `axmini export hf` writes it back. Everything is checked
before anything is written, and the trainer dir appears whole or not at all.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from axmini.cli.common import RUN_FILE, Runner, experiment_config

DTYPES = ("float32", "bfloat16", "float16")


def add_parser(commands: Any) -> None:
    parser = commands.add_parser("convert", help="a Hugging Face model dir as a trainer dir (orbax checkpoint)")
    parser.add_argument("format", choices=("hf",), help="the source format: hf (Hugging Face)")
    parser.add_argument("source", metavar="DIR", help="config.json + model.safetensors (or a sharded index)")
    parser.add_argument("--out", required=True, metavar="TRAINER_DIR", help="a new (or empty) directory")
    parser.add_argument("--config", default="finetune", help="the experiment around the model (default: finetune)")
    parser.add_argument("--set", action="append", default=[], metavar="PATH=VALUE", help="override a config field")
    parser.add_argument("--param_dtype", choices=DTYPES, help="keep the parameters in this dtype (default: as stored)")
    parser.add_argument("--mesh_selector", help="instance type whose mesh the weights are placed on; default: detected")
    parser.set_defaults(prepare=prepare)


def prepare(args: argparse.Namespace) -> Runner:
    import jax.numpy as jnp

    from axmini.interop.files import check_output_dir
    from axmini.interop.hf import read_hf_config
    from axmini.interop.params import abstract_params, check_tensors
    from axmini.interop.safetensors import TensorIndex

    source = Path(args.source)
    model = read_hf_config(source)
    check_output_dir(args.out)
    cfg = experiment_config(args.config, args.set, args.out, model_dir=source)
    if args.param_dtype:
        from axmini.interop.hf import set_param_dtype

        cfg.model = set_param_dtype(cfg.model, getattr(jnp, args.param_dtype))
    if args.mesh_selector:
        cfg.set(mesh_selector=args.mesh_selector)
    check_tensors(TensorIndex.open(source), model, abstract_params(cfg.model))  # Headers only.
    trainer = cfg.instantiate()

    def run() -> int:
        from axmini.interop import import_hf
        from axmini.interop.files import output_dir
        from axmini.interop.runs import MODEL_DIR, params_only_state, save_model_dir

        with output_dir(args.out) as tmp:
            save_model_dir(source, tmp, cfg.model.param_dtype)
            record = {"config": args.config, "overrides": list(args.set), "model_dir": MODEL_DIR, "params_only": True}
            record["converted_from"] = str(source.absolute())
            (tmp / RUN_FILE).write_text(json.dumps(record, indent=2) + "\n")
            imported = import_hf(
                source, param_dtype=cfg.model.param_dtype, mesh=trainer.mesh, rules=trainer.rules, progress=True
            )
            checkpointer = trainer.config.checkpointer.clone(dir=str(tmp / "checkpoints")).instantiate()
            state = params_only_state(trainer, imported.params)
            checkpointer.save(0, state, {"converted_from": str(source.absolute())}, force=True)
            checkpointer.close()
        print(
            f"axmini convert: {model.family.architecture} ({trainer.num_params:,} parameters) -> {args.out}; "
            f"sample with `axmini sample --trainer_dir={args.out}`, fine-tune with "
            f"`axmini train --config={args.config} --init_from={args.out} --trainer_dir=NEW_DIR`"
        )
        return 0

    return run
