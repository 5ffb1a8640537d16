"""`axmini export hf TRAINER_DIR --out DIR`: a run's model (latest checkpoint) as a Hugging Face model dir.

The family is the one the model was imported from, or the first of Llama, Mistral, Qwen3, Gemma 3 that expresses
the model exactly (so a model trained from scratch with axmini exports too); a model no family expresses is refused
naming the config path. The tokenizer files of an imported model travel along. DIR appears whole or not at all.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from axmini.cli.common import Runner, UsageError, read_run_file, run_config


def add_parser(commands: Any) -> None:
    parser = commands.add_parser("export", help="a run's model as a Hugging Face model dir")
    parser.add_argument("format", choices=("hf",), help="the target format: hf (Hugging Face)")
    parser.add_argument("trainer_dir", metavar="TRAINER_DIR", help="a trainer dir (trained or converted)")
    parser.add_argument("--out", required=True, metavar="DIR", help="a new (or empty) directory")
    parser.add_argument("--max_shard_gb", type=float, default=5.0, help="split the weights into files of this size")
    parser.set_defaults(prepare=prepare)


def prepare(args: argparse.Namespace) -> Runner:
    from axmini.interop.files import check_output_dir
    from axmini.interop.hf import choose_family, read_hf_config

    if args.max_shard_gb <= 0:
        raise UsageError(f"--max_shard_gb={args.max_shard_gb} must be positive")
    record = read_run_file(args.trainer_dir)
    check_output_dir(args.out)
    cfg = run_config(args.trainer_dir, record)
    cfg.set(progress_bar=False)
    model_dir = Path(args.trainer_dir) / record["model_dir"] if record.get("model_dir") else None
    like = read_hf_config(model_dir) if model_dir is not None else None
    choose_family(cfg.model, like.family.architecture if like else None)  # Refuses a model no family expresses.
    trainer = cfg.instantiate()

    def run() -> int:
        from axmini.interop import export_hf
        from axmini.interop.runs import restore_params

        params = restore_params(trainer, trainer.config.checkpointer.dir)["params"]
        model = export_hf(
            cfg.model,
            params,
            args.out,
            like=like,
            model_files_from=model_dir,
            max_shard_bytes=int(args.max_shard_gb * 2**30),
            progress=True,
        )
        print(f"axmini export: {args.trainer_dir} -> {args.out} ({model.family.architecture}, {model.dtype})")
        return 0

    return run
