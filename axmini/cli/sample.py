"""`axmini sample --trainer_dir=DIR --prompt "..."`: text from the latest checkpoint of a run.

`--schema FILE.json`, `--regex R` or `--tools FILE.json` constrain the output (guided generation, axmini/guided.py):
it is then a JSON text the schema accepts, a full match of the regex, or one call of one of the tools. `--adapter DIR`
(repeatable) samples the run's model with a LoRA adapter written by a LoRA run (`<its trainer dir>/adapter`), once
per adapter; `--quantized` samples the weights a QAT run exported (`<trainer dir>/quantized.npz`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from axmini.cli.common import QUANTIZED_FILE, Runner, UsageError, read_run_file, run_config


def add_parser(commands: Any) -> None:
    parser = commands.add_parser("sample", help="generate text from a run's latest checkpoint")
    parser.add_argument("--trainer_dir", required=True)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    parser.add_argument("--num_samples", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    constrained = parser.add_mutually_exclusive_group()
    constrained.add_argument("--schema", metavar="FILE.json", help="output a JSON text this JSON schema accepts")
    constrained.add_argument("--regex", help="output a full match of this regular expression")
    constrained.add_argument("--tools", metavar="FILE.json", help="output one call of one of these tools (a list)")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--adapter", action="append", default=[], metavar="DIR", help="a LoRA adapter (repeatable)")
    weights.add_argument("--quantized", action="store_true", help=f"use the run's exported {QUANTIZED_FILE}")
    parser.set_defaults(prepare=prepare)


def prepare(args: argparse.Namespace) -> Runner:
    from axmini.launch.distributed import initialize_from_env

    initialize_from_env()
    if args.max_new_tokens < 1 or args.temperature < 0 or args.num_samples < 1:
        raise UsageError(
            f"--max_new_tokens={args.max_new_tokens} and --num_samples={args.num_samples} must be >= 1, "
            f"--temperature={args.temperature} >= 0"
        )
    run_record = read_run_file(args.trainer_dir)
    cfg = run_config(args.trainer_dir, run_record)
    cfg.set(progress_bar=False)
    trainer = cfg.instantiate()
    vocabulary = trainer.input.vocabulary()
    if vocabulary is None:
        raise UsageError(f"experiment {run_record['config']!r} has synthetic input: no vocabulary to decode with")
    if not Path(trainer.config.checkpointer.dir).is_dir():
        raise UsageError(f"--trainer_dir={args.trainer_dir} has no checkpoint yet")
    checkpointer = trainer.config.checkpointer.instantiate(read_only=True)  # A trainer may be writing beside us.
    if not checkpointer.all_steps():
        raise UsageError(f"--trainer_dir={args.trainer_dir} has no checkpoint yet")
    constraint = _constraint(args, vocabulary, trainer.config.model.vocab_size)
    quantized = Path(args.trainer_dir) / QUANTIZED_FILE
    if args.quantized and not quantized.is_file():
        raise UsageError(f"--quantized: {quantized} is missing; train with --feature qat to write it")
    adapters = [_adapter(path) for path in args.adapter]

    def run() -> int:
        import jax

        from axmini.interop.runs import restore_params
        from axmini.lora import attach_adapter
        from axmini.qat import load_quantized

        state = restore_params(trainer, trainer.config.checkpointer.dir)  # The weights only: no optimizer state.
        if args.quantized:
            models = [("", load_quantized(trainer.config.model, quantized))]
        elif adapters:
            base = trainer.model(state)
            models = [(f"[adapter {path}] ", attach_adapter(base, adapter)) for path, adapter in adapters]
        else:
            models = [("", trainer.model(state))]
        for label, model in models:
            for i in range(args.num_samples):
                text = sample_text(
                    trainer,
                    state,
                    args.prompt,
                    max_new_tokens=args.max_new_tokens,
                    temperature=args.temperature,
                    seed=args.seed + i,
                    model=model,
                    constraint=constraint,
                )
                if jax.process_index() == 0:
                    print(f"{label}{text}")
        return 0

    return run


def _constraint(args: argparse.Namespace, vocabulary: Any, vocab_size: int) -> Any:
    """The guided-generation constraint the flags ask for (None: free text); bad input is a usage error."""
    if not (args.schema or args.regex or args.tools):
        return None
    from axmini import guided

    try:
        if args.regex:
            regex = args.regex
        else:
            flag, path = ("--schema", args.schema) if args.schema else ("--tools", args.tools)
            try:
                document = json.loads(Path(path).read_text())
            except (OSError, ValueError) as e:
                raise UsageError(f"{flag}={path}: cannot read a JSON document ({e})") from None
            regex = guided.schema_regex(document if args.schema else guided.tool_call_schema(document))
        constraint = guided.regex_constraint(regex, vocabulary, vocab_size=vocab_size, eos_id=vocabulary.eos_id)
    except guided.GuidedGenerationError as e:
        flag = "--regex" if args.regex else "--schema" if args.schema else "--tools"
        raise UsageError(f"{flag}: {e}") from None
    if constraint.min_tokens > args.max_new_tokens:
        raise UsageError(
            f"--max_new_tokens={args.max_new_tokens} is too short: the shortest output matching the constraint has "
            f"{constraint.min_tokens} tokens; raise it"
        )
    return constraint


def _adapter(path: str) -> tuple[str, Any]:
    from axmini.lora import load_adapter

    try:
        return path, load_adapter(path)
    except ValueError as e:
        raise UsageError(f"--adapter={path}: {e}") from None


def sample_text(
    trainer: Any,
    state: Any,
    prompt: str,
    *,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    model: Any = None,
    constraint: Any = None,
) -> str:
    """`prompt` continued by `model` (default: the model of `state`), decoded with the input's vocabulary; with a
    guided-generation `constraint`, only the constrained continuation. Every sequence starts with id 0, as in
    training (seqio shifts the targets right behind a 0). Every process must call it (the model is sharded over all
    of them)."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import multihost_utils

    from axmini.decoding import generate
    from axmini.guided import constrained_text

    vocabulary = trainer.input.vocabulary()
    prompt_ids = [int(i) for i in vocabulary.encode(prompt)]
    out = generate(
        model if model is not None else trainer.model(state),
        jnp.asarray([[0, *prompt_ids]], jnp.int32),
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=40 if temperature > 0 else None,
        stop_ids=(vocabulary.eos_id,),
        rng=jax.random.key(seed),
        constraint=constraint,
    )
    tokens, lengths = multihost_utils.process_allgather((out.tokens, out.lengths), tiled=True)
    new_ids = [int(t) for t in tokens[0, : int(lengths[0])] if t != vocabulary.eos_id]
    if constraint is not None:
        return constrained_text(vocabulary, new_ids)
    return vocabulary.decode(prompt_ids + new_ids)
