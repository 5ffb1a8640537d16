"""`axmini train --config=NAME [--set path=value ...] [--trainer_dir=DIR] [--mesh_selector=TYPE]`: trains a named
experiment, resuming from the latest checkpoint in the trainer dir."""

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
    parser.set_defaults(prepare=prepare)


def prepare(args: argparse.Namespace) -> Runner:
    from axmini.launch.distributed import initialize_from_env

    initialize_from_env()  # Before anything touches jax devices.
    import jax

    trainer_dir = args.trainer_dir or str(Path("runs") / args.config)
    check_writable_dir(trainer_dir)
    previous = Path(trainer_dir) / RUN_FILE
    if previous.exists() and json.loads(previous.read_text()).get("config") != args.config:
        other = json.loads(previous.read_text()).get("config")
        raise UsageError(f"--trainer_dir={trainer_dir} holds a run of experiment {other!r}; use another dir")
    previous_features = json.loads(previous.read_text()).get("features", []) if previous.exists() else args.feature
    if previous_features != args.feature:
        raise UsageError(
            f"--trainer_dir={trainer_dir} holds a run with features {previous_features}, not {args.feature}; "
            "resume it with the same --feature flags or use another dir"
        )
    cfg = experiment_config(args.config, args.set, trainer_dir, args.feature)
    if args.mesh_selector:
        cfg.set(mesh_selector=args.mesh_selector)
    trainer = cfg.instantiate()  # Validates everything; writes nothing in the trainer dir.

    def run() -> int:
        if jax.process_index() == 0:
            Path(trainer_dir).mkdir(parents=True, exist_ok=True)
            record = {"config": args.config, "overrides": list(args.set), "features": list(args.feature)}
            (Path(trainer_dir) / RUN_FILE).write_text(json.dumps(record, indent=2) + "\n")
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
        for line in write_exports(trainer, result.state, trainer_dir):
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


def write_exports(trainer: Any, state: Any, trainer_dir: str) -> list[str]:
    """What a fine-tuned model leaves beside its checkpoints: its LoRA adapter (`adapter/`, a small orbax item) and
    its quantized weights (`quantized.npz`: packed integer codes and scales). Returns a line per export."""
    from axmini.layers.weight_transform import transformed_weights
    from axmini.lora import LoRA, save_adapter
    from axmini.qat import FakeQuantization, export_quantized

    model, lines = trainer.model(state), []
    if transformed_weights(model, LoRA):
        record = {"base": trainer.config.init_from, "step": int(state["step"])}
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
