"""`axmini train --config=EXPERIMENT [--data=GLOB ...] [--feature=NAME ...] [--set path=value ...]
[--trainer_dir=DIR] [--mesh_selector=TYPE] [--init_from=SRC]`: trains an experiment (built in, or FILE.py:FUNCTION,
or MODULE:FUNCTION), resuming from the latest checkpoint in the trainer dir.

`--init_from=hf:DIR` (a Hugging Face model dir) or `--init_from=TRAINER_DIR` (a finished or converted run) starts a
new run from those weights: it sets the trainer's `init_from` (axmini/trainer/warm_start.py; the step-0 checkpoint
holds them with a fresh optimizer state). A source that carries its own model (an HF dir, or a trainer dir made from
one) replaces the experiment's model, and its tokenizer the corpus's (axmini.interop.runs; with --data, the files'
vocabulary); `--feature` (lora, qat...) then applies to that model, so a LoRA or QAT fine-tune of a converted model
is `--init_from=DIR --feature=lora`.
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
    EXPERIMENT_HELP,
    QUANTIZED_FILE,
    RUN_FILE,
    Runner,
    UsageError,
    add_config_args,
    check_writable_dir,
    default_trainer_dir,
    new_run_record,
    run_config,
)
from axmini.cli.sample import sample_texts


def add_parser(commands: Any) -> None:
    parser = commands.add_parser("train", help="train an experiment", description="Train an experiment.")
    parser.add_argument("--config", "--experiment", required=True, help=EXPERIMENT_HELP)
    add_config_args(parser)
    parser.add_argument("--sample_prompt", default="The", help="print a sample for this prompt at the end ('': none)")
    parser.add_argument(
        "--init_from", help="start a new run from these weights: hf:DIR (a Hugging Face model dir) or a trainer dir"
    )
    parser.set_defaults(prepare=prepare)


def prepare(args: argparse.Namespace) -> Runner:
    from axmini.launch.distributed import initialize_from_env

    initialize_from_env()  # Before anything touches jax devices.
    import jax

    from axmini.trainer.finalize import finalize

    record = new_run_record(args.config, args)
    trainer_dir = args.trainer_dir or default_trainer_dir(args.config)
    check_writable_dir(trainer_dir)
    previous = _previous_record(trainer_dir, record)
    init_from, model_dir = _init_from(args, trainer_dir, previous)
    cfg = run_config(record, trainer_dir, model_dir=model_dir)
    if init_from is not None:
        cfg.set(init_from=init_from)
    cfg = finalize(cfg, args.mesh_selector)
    trainer = cfg.instantiate()  # Validates everything (init_from included); writes nothing in the trainer dir.
    # The last check, and the first write: data from disk without a vocabulary has one trained (or reused).
    vocabulary = trainer.input.vocabulary()

    def run() -> int:
        if jax.process_index() == 0:
            Path(trainer_dir).mkdir(parents=True, exist_ok=True)
            new_record = {**previous, **record}
            if init_from is not None and init_from != previous.get("init_from"):
                from axmini.interop.runs import MODEL_DIR, copy_model_dir

                has_model = copy_model_dir(init_from, trainer_dir, cfg.model.param_dtype)
                new_record.update(init_from=init_from, **({"model_dir": MODEL_DIR} if has_model else {}))
            (Path(trainer_dir) / RUN_FILE).write_text(json.dumps(new_record, indent=2) + "\n")
            print(
                f"axmini train: experiment {record['config']!r} -> {trainer_dir}; {trainer.num_params:,} parameters; "
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
        if args.sample_prompt and vocabulary is not None:  # Every process runs the sharded model.
            try:
                with _sigterm_raises():
                    (text,) = sample_texts(
                        trainer.model(result.state), vocabulary, [args.sample_prompt], temperature=0.7, seed=0
                    )[0]
            except _Terminated:
                print("axmini train: training finished; sample skipped (SIGTERM)", file=sys.stderr)
                return 0
            if jax.process_index() == 0:
                print(f"sample (temperature 0.7, top-k 40, seed 0): {text}")
        return 0

    return run


def _previous_record(trainer_dir: str, record: dict[str, Any]) -> dict[str, Any]:
    """The run record already in `trainer_dir` ({} for a new run), refused when this invocation cannot resume it."""
    path = Path(trainer_dir) / RUN_FILE
    previous = json.loads(path.read_text()) if path.exists() else {}
    if previous and previous.get("config") != record["config"]:
        raise UsageError(
            f"--trainer_dir={trainer_dir} holds a run of experiment {previous.get('config')!r}; use another dir"
        )
    if previous.get("params_only"):
        raise UsageError(
            f"--trainer_dir={trainer_dir} holds converted weights without optimizer state; fine-tune them in a new dir "
            f"with --init_from={trainer_dir} --trainer_dir=NEW_DIR"
        )
    if previous and previous.get("features", []) != record["features"]:
        raise UsageError(
            f"--trainer_dir={trainer_dir} holds a run with features {previous.get('features', [])}, not "
            f"{record['features']}; resume it with the same --feature flags or use another dir"
        )
    return previous


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
