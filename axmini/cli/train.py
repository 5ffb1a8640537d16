"""`axmini train --config=NAME [--feature=NAME ...] [--set path=value ...] [--trainer_dir=DIR] [--mesh_selector=TYPE]
[--init_from=SRC]`: trains a named experiment, resuming from the latest checkpoint in the trainer dir.

`--init_from=hf:DIR` (a Hugging Face model dir) or `--init_from=TRAINER_DIR` (a finished or converted run) starts a
new run from those weights: it sets the trainer's `init_from` (axmini/trainer/warm_start.py; the step-0 checkpoint
holds them with a fresh optimizer state). A source that carries its own model (an HF dir, or a trainer dir made from
one) replaces the experiment's model, and its tokenizer the corpus's (axmini.interop.runs); `--feature` (lora, qat...)
then applies to that model, so a LoRA or QAT fine-tune of a converted model is `--init_from=DIR --feature=lora`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from axmini.cli.common import (
    ADAPTER_DIR,
    QUANTIZED_FILE,
    RUN_FILE,
    Runner,
    UsageError,
    add_feature_flag,
    check_writable_dir,
    experiment_config,
)
from axmini.cli.sample import sample_text


def add_parser(commands: Any) -> None:
    parser = commands.add_parser("train", help="train a named experiment", description="Train a named experiment.")
    parser.add_argument("--config", "--experiment", required=True, help="experiment name (see `axmini configs list`)")
    parser.add_argument("--set", action="append", default=[], metavar="PATH=VALUE", help="override a config field")
    add_feature_flag(parser)
    parser.add_argument("--trainer_dir", help="run directory (default: runs/<config>); resumes from its checkpoints")
    parser.add_argument("--mesh_selector", help="instance type (cpu, gpu-h100-8, tpu-v5p-256...); default: detected")
    parser.add_argument("--sample_prompt", default="The", help="print a sample for this prompt at the end ('': none)")
    parser.add_argument(
        "--init_from", help="start a new run from these weights: hf:DIR (a Hugging Face model dir) or a trainer dir"
    )
    parser.set_defaults(prepare=prepare)


def prepare(args: argparse.Namespace) -> Runner:
    from axmini.launch.distributed import initialize_from_env

    initialize_from_env()  # Before anything touches jax devices.
    import jax

    trainer_dir = args.trainer_dir or str(Path("runs") / args.config)
    check_writable_dir(trainer_dir)
    previous = Path(trainer_dir) / RUN_FILE
    record = json.loads(previous.read_text()) if previous.exists() else {}
    if record and record.get("config") != args.config:
        raise UsageError(
            f"--trainer_dir={trainer_dir} holds a run of experiment {record.get('config')!r}; use another dir"
        )
    if record.get("params_only"):
        raise UsageError(
            f"--trainer_dir={trainer_dir} holds converted weights without optimizer state; fine-tune them in a new dir "
            f"with --init_from={trainer_dir} --trainer_dir=NEW_DIR"
        )
    if record and record.get("features", []) != args.feature:
        raise UsageError(
            f"--trainer_dir={trainer_dir} holds a run with features {record.get('features', [])}, not {args.feature}; "
            "resume it with the same --feature flags or use another dir"
        )
    init_from, model_dir = _init_from(args, trainer_dir, record)
    cfg = experiment_config(args.config, args.set, trainer_dir, args.feature, model_dir)
    if init_from is not None:
        cfg.set(init_from=init_from)
    if args.mesh_selector:
        cfg.set(mesh_selector=args.mesh_selector)
    trainer = cfg.instantiate()  # Validates everything (init_from included); writes nothing in the trainer dir.

    def run() -> int:
        if jax.process_index() == 0:
            Path(trainer_dir).mkdir(parents=True, exist_ok=True)
            new_record = {"config": args.config, "overrides": list(args.set), "features": list(args.feature)}
            if init_from is not None and init_from != record.get("init_from"):
                from axmini.interop.runs import MODEL_DIR, copy_model_dir

                has_model = copy_model_dir(init_from, trainer_dir, cfg.model.param_dtype)
                new_record.update(init_from=init_from, **({"model_dir": MODEL_DIR} if has_model else {}))
            (Path(trainer_dir) / RUN_FILE).write_text(json.dumps({**record, **new_record}, indent=2) + "\n")
            print(
                f"axmini train: experiment {args.config!r} -> {trainer_dir}; {trainer.num_params:,} parameters; "
                f"instance {trainer.instance.name}, mesh {dict(trainer.mesh.shape)}",
                flush=True,
            )
        result = trainer.run()
        if jax.process_index() == 0:
            _print_result(result, trainer.config.model)
        if result.preempted:
            print(f"axmini train: stopped by SIGTERM at step {result.step}; checkpoint saved", file=sys.stderr)
            return 128 + signal.SIGTERM
        for line in write_exports(trainer, result.state, trainer_dir, base=init_from):
            if jax.process_index() == 0:
                print(line)
        if args.sample_prompt and trainer.input.vocabulary() is not None:  # Every process runs the sharded model.
            try:
                with _sigterm_raises():
                    text = sample_text(
                        trainer, result.state, args.sample_prompt, max_new_tokens=64, temperature=0.7, seed=0
                    )
            except _Terminated:
                print("axmini train: training finished; sample skipped (SIGTERM)", file=sys.stderr)
                return 0
            if jax.process_index() == 0:
                print(f"sample (temperature 0.7, top-k 40, seed 0): {text}")
        return 0

    return run


def _init_from(args: argparse.Namespace, trainer_dir: str, record: dict[str, Any]) -> tuple[str | None, Path | None]:
    """(where the run starts from: --init_from, or what the run was started from; the dir of the model the run
    trains when it is an imported one). A run with checkpoints resumes from them: a new --init_from is ignored."""
    from axmini.trainer.warm_start import has_checkpoint

    model_dir = Path(trainer_dir) / record["model_dir"] if record.get("model_dir") else None
    if has_checkpoint(Path(trainer_dir) / "checkpoints"):
        if args.init_from and args.init_from != record.get("init_from"):
            print(f"axmini train: {trainer_dir} has checkpoints: resuming, --init_from ignored", file=sys.stderr)
        return record.get("init_from"), model_dir
    init_from = args.init_from or record.get("init_from")
    if init_from is None:
        return None, model_dir
    from axmini.interop.runs import source_model_dir

    return init_from, source_model_dir(init_from)


def write_exports(trainer: Any, state: Any, trainer_dir: str, base: str | None = None) -> list[str]:
    """What a fine-tuned model leaves beside its checkpoints: its LoRA adapter (`adapter/`, a small orbax item, with
    `base`, where the run started from) and its quantized weights (`quantized.npz`: packed integer codes and scales).
    Returns a line per export."""
    from axmini.layers.weight_transform import transformed_weights
    from axmini.lora import LoRA, save_adapter
    from axmini.qat import FakeQuantization, export_quantized

    model, lines = trainer.model(state), []
    if transformed_weights(model, LoRA):
        record = {"base": base, "step": int(state["step"])}
        path = save_adapter(Path(trainer_dir) / ADAPTER_DIR, model, record)
        lines.append(f"LoRA adapter -> {path} (sample with: axmini sample --trainer_dir=BASE_DIR --adapter={path})")
    if transformed_weights(model, FakeQuantization):
        path = Path(trainer_dir) / QUANTIZED_FILE
        manifest = export_quantized(model, path)
        bits = sorted({w["bits"] for w in manifest["weights"].values()})
        lines.append(f"quantized weights ({bits} bits, {len(manifest['weights'])} weights) -> {path}")
    return lines


class _Terminated(Exception):
    """SIGTERM arrived while `_sigterm_raises` was active."""


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Within this block SIGTERM raises `_Terminated` (e.g. to skip the sample of a finished run and exit 0)."""

    def terminate(signum: int, frame: Any) -> None:
        raise _Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _print_result(result: Any, model_cfg: Any) -> None:
    from axmini.qat import quantized_bits

    print(f"trained to step {result.step}; last train loss {result.losses.get(result.step, float('nan')):.4f}")
    if result.eval_metrics:
        loss, entropy = result.eval_metrics["loss"], result.eval_metrics["unigram_entropy"]
        verdict = "below" if loss < entropy else "NOT below"
        bits = quantized_bits(model_cfg)
        weights = f" with {'/'.join(map(str, bits))}-bit weights (as exported)" if bits else ""
        print(
            f"validation loss {loss:.4f} nats/token{weights} ({verdict} the unigram entropy of the validation tokens, "
            f"{entropy:.4f} nats; {result.eval_metrics['num_tokens']:.0f} tokens)"
        )
