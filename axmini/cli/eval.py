"""`axmini eval --trainer_dir=DIR [--data=GLOB] [--split=validation|train] [--num_batches=N] [--set path=value]`:
the loss, perplexity and speed of a run's latest checkpoint on a split, as a table and then one line of JSON.

The split is the run's validation split (what its evaluator reads) or its training split (one pass, unshuffled), or
every example of the files of --data, read with the run's vocabulary. Only the model, the vocabulary and that input
are built (no learner, no optimizer state), and nothing is written: a trainer may be running in the dir.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Any

from axmini.cli.common import USAGE_ERROR, Runner, UsageError, absolute_path, read_only_checkpointer, read_run


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "eval", help="loss, perplexity and tokens/s of a run's latest checkpoint", description=__doc__.split("\n\n")[1]
    )
    parser.add_argument("--trainer_dir", required=True)
    parser.add_argument("--split", choices=("validation", "train"), default="validation")
    parser.add_argument("--data", metavar="GLOB", help="evaluate on these .txt / .jsonl / .tfrecord files instead")
    parser.add_argument("--data_field", help="the text field of .jsonl records / .tfrecord examples (default: text)")
    parser.add_argument("--num_batches", type=int, help="stop after this many batches (default: the whole split)")
    parser.add_argument("--set", action="append", default=[], metavar="PATH=VALUE", help="override (e.g. the batch)")
    parser.add_argument("--mesh_selector", help="instance type to evaluate on (default: detected)")
    parser.set_defaults(prepare=prepare)


def _eval_input(cfg: Any, args: argparse.Namespace, vocabulary: Any) -> Any:
    """The input config of the evaluated split: one unshuffled pass over it."""
    from axmini.trainer.data import TextFiles
    from axmini.trainer.input import SeqioInput

    own = cfg.evaluator.input if args.split == "validation" and cfg.evaluator.input is not None else cfg.input
    if not SeqioInput.matches(own):
        raise UsageError(f"the run's input is a {type(own).__qualname__}, not text that can be evaluated on")
    input_cfg = own.clone(split=args.split, shuffle=False, num_epochs=1)
    if args.data is None:
        if args.data_field is not None:
            raise UsageError("--data_field needs --data")
        return input_cfg
    vocab = getattr(vocabulary, "sentencepiece_model_file", None)
    if vocab is None:
        raise UsageError(f"--data needs a SentencePiece vocabulary; the run's is a {type(vocabulary).__name__}")
    data = absolute_path(args.data)
    files = TextFiles.default_config().set(train=data, validation=data, vocab=vocab)
    if args.data_field is not None:
        files.field = args.data_field
    return input_cfg.set(task=files, split="validation")


def prepare(args: argparse.Namespace) -> Runner:
    from axmini.launch.distributed import initialize_from_env

    initialize_from_env()
    if args.num_batches is not None and args.num_batches < 1:
        raise UsageError(f"--num_batches={args.num_batches} must be >= 1")
    from axmini.trainer.input import input_vocabulary

    cfg = read_run(args.trainer_dir, args.set, args.mesh_selector)
    vocabulary = input_vocabulary(cfg.input)
    if vocabulary is None:
        raise UsageError(f"the run in --trainer_dir={args.trainer_dir} has synthetic input: nothing to evaluate on")
    input_cfg = _eval_input(cfg, args, vocabulary)
    checkpointer = read_only_checkpointer(cfg, args.trainer_dir)
    eval_input = input_cfg.instantiate()  # Checks the data (files, fields); reads no batch yet.

    def run() -> int:
        import jax

        result = evaluate(cfg, checkpointer, eval_input, args.num_batches)
        if not result["tokens"]:
            print(f"axmini eval: error: the {result['split']} split has no tokens", file=sys.stderr)
            return USAGE_ERROR
        result = {"trainer_dir": args.trainer_dir, "data": args.data, **result}
        if jax.process_index() == 0:
            print(_table(result))
            print(json.dumps(result))
        return 0

    return run


def evaluate(cfg: Any, checkpointer: Any, eval_input: Any, num_batches: int | None) -> dict[str, Any]:
    """The weighted mean loss of the latest checkpoint's model over `eval_input`'s batches (at most `num_batches`),
    its perplexity, and the target tokens evaluated per second (input included, compilation not)."""
    import flax.nnx as nnx
    import jax
    import jax.numpy as jnp
    import numpy as np

    from axmini.module import sharding_context
    from axmini.trainer.evaluator import loss_sums
    from axmini.trainer.inference import load_model
    from axmini.trainer.input import BATCH_KEYS

    run_model = load_model(cfg, checkpointer)
    graphdef, state = nnx.split(run_model.model)
    shape = (eval_input.config.global_batch_size, eval_input.config.sequence_length)
    sharding = run_model.batch_sharding(shape)
    abstract = {
        k: jax.ShapeDtypeStruct(shape, jnp.float32 if k == "target_weights" else jnp.int32, sharding=sharding)
        for k in BATCH_KEYS
    }
    with sharding_context(run_model.mesh, run_model.rules):
        step = jax.jit(lambda s, b: loss_sums(nnx.merge(graphdef, s), b)).lower(state, abstract).compile()
    loss_sum = tokens = 0.0
    batches, start = 0, None
    for local in eval_input.batches(0):
        if batches == num_batches:
            break
        start = start or time.perf_counter()  # From the first batch on: the pipeline's start-up is not counted.
        batch = {k: jax.make_array_from_process_local_data(sharding, np.asarray(local[k]), shape) for k in BATCH_KEYS}
        sums = jax.device_get(step(state, batch))  # Blocks on each step (the CPU collective hang hazard).
        loss_sum, tokens, batches = loss_sum + float(sums["loss_sum"]), tokens + float(sums["weight_sum"]), batches + 1
    seconds = time.perf_counter() - start if start else 0.0
    loss = loss_sum / tokens if tokens else math.nan
    return {
        "step": run_model.step,
        "split": eval_input.config.split,
        "batches": batches,
        "tokens": int(tokens),
        "loss": loss,
        "perplexity": math.exp(loss) if tokens else math.nan,
        "tokens_per_second": tokens / seconds if seconds > 0 else math.nan,
    }


def _table(result: dict[str, Any]) -> str:
    where = f"the files {result['data']}" if result["data"] else f"the {result['split']} split"
    rows = [
        ("loss (nats/token)", f"{result['loss']:.4f}"),
        ("perplexity", f"{result['perplexity']:.2f}"),
        ("tokens", f"{result['tokens']:,}"),
        ("batches", f"{result['batches']:,}"),
        ("tokens/s", f"{result['tokens_per_second']:,.0f}"),
    ]
    lines = [f"{result['trainer_dir']} at step {result['step']} on {where}:", "| metric | value |", "| --- | ---: |"]
    return "\n".join(lines + [f"| {name} | {value} |" for name, value in rows])
