"""`axmini sample --trainer_dir=DIR [--prompt TEXT | --prompt_file FILE | < prompts]`: text from the latest
checkpoint of a run. Only the model and the vocabulary are built (no input pipeline, no learner), and nothing in the
trainer dir is written: a trainer may be running there.

`--schema FILE.json`, `--regex R` or `--tools FILE.json` constrain the output (guided generation, axmini/guided.py):
it is then a JSON text the schema accepts, a full match of the regex, or one call of one of the tools. `--adapter DIR`
(repeatable) samples the run's model with a LoRA adapter written by a LoRA run (`<its trainer dir>/adapter`), once
per adapter; `--quantized` samples the weights a QAT run exported (`<trainer dir>/quantized.npz`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from axmini.cli.common import QUANTIZED_FILE, Runner, UsageError, read_only_checkpointer, read_run

SAMPLE_ROWS = 16  # Rows generated at once (prompts x samples are cut into batches of this many: one compilation).


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "sample",
        help="generate text from a run's latest checkpoint",
        description="Continue prompts with the model of a run's latest checkpoint. Prompts: --prompt, or one per "
        "line of --prompt_file (- for stdin), or one per line of stdin.",
    )
    parser.add_argument("--trainer_dir", required=True)
    prompts = parser.add_mutually_exclusive_group()
    prompts.add_argument("--prompt", help="one prompt")
    prompts.add_argument("--prompt_file", metavar="FILE", help="one prompt per line ('-': stdin)")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    parser.add_argument("--num_samples", type=int, default=1, help="samples per prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mesh_selector", help="instance type to sample on (default: detected)")
    constrained = parser.add_mutually_exclusive_group()
    constrained.add_argument("--schema", metavar="FILE.json", help="output a JSON text this JSON schema accepts")
    constrained.add_argument("--regex", help="output a full match of this regular expression")
    constrained.add_argument("--tools", metavar="FILE.json", help="output one call of one of these tools (a list)")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--adapter", action="append", default=[], metavar="DIR", help="a LoRA adapter (repeatable)")
    weights.add_argument("--quantized", action="store_true", help=f"use the run's exported {QUANTIZED_FILE}")
    parser.set_defaults(prepare=prepare)


def read_prompts(args: argparse.Namespace) -> list[str]:
    """The prompts of --prompt, --prompt_file (one a line; '-' is stdin) or stdin; refused when there are none."""
    if args.prompt is not None:
        return [args.prompt]
    if args.prompt_file is None and sys.stdin.isatty():
        raise UsageError("no prompt: give --prompt TEXT, --prompt_file FILE, or prompts on stdin (one a line)")
    source = "stdin" if args.prompt_file in (None, "-") else f"--prompt_file={args.prompt_file}"
    try:
        if source == "stdin":
            text = sys.stdin.read()
        else:
            with open(args.prompt_file, encoding="utf-8") as f:
                text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{source}: cannot read it ({e.strerror if isinstance(e, OSError) else e.reason})") from None
    prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UsageError(f"{source} holds no prompt (one per non-empty line)")
    return prompts


def prepare(args: argparse.Namespace) -> Runner:
    from axmini.launch.distributed import initialize_from_env

    initialize_from_env()
    if args.max_new_tokens < 1 or args.temperature < 0 or args.num_samples < 1:
        raise UsageError(
            f"--max_new_tokens={args.max_new_tokens} and --num_samples={args.num_samples} must be >= 1, "
            f"--temperature={args.temperature} >= 0"
        )
    from axmini.trainer.input import input_vocabulary

    prompts = read_prompts(args)
    cfg = read_run(args.trainer_dir, (), args.mesh_selector)
    vocabulary = input_vocabulary(cfg.input)
    if vocabulary is None:
        raise UsageError(f"the run in --trainer_dir={args.trainer_dir} has synthetic input: no vocabulary to decode")
    checkpointer = read_only_checkpointer(cfg, args.trainer_dir)
    constraint = _constraint(args, vocabulary, cfg.model.vocab_size)
    quantized = Path(args.trainer_dir) / QUANTIZED_FILE
    if args.quantized and not quantized.is_file():
        raise UsageError(f"--quantized: {quantized} is missing; train with --feature qat to write it")
    adapters = [_adapter(path) for path in args.adapter]

    def run() -> int:
        import jax

        from axmini.lora import attach_adapter
        from axmini.qat import load_quantized
        from axmini.trainer.inference import load_model

        if args.quantized:
            models = [("", load_quantized(cfg.model, quantized))]
        else:
            model = load_model(cfg, checkpointer).model  # The weights only: no optimizer state.
            models = [(f"[adapter {path}] ", attach_adapter(model, a)) for path, a in adapters] or [("", model)]
        for label, model in models:
            samples = sample_texts(
                model,
                vocabulary,
                prompts,
                num_samples=args.num_samples,
                max_new_tokens=args.max_new_tokens,
                temperature=args.temperature,
                seed=args.seed,
                constraint=constraint,
            )
            if jax.process_index() == 0:
                for texts in samples:
                    print("\n".join(f"{label}{text}" for text in texts))
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


def sample_texts(
    model: Any,
    vocabulary: Any,
    prompts: list[str],
    *,
    num_samples: int = 1,
    max_new_tokens: int = 64,
    temperature: float,
    seed: int,
    constraint: Any = None,
) -> list[list[str]]:
    """`num_samples` continuations of each prompt (top-k 40; greedy at temperature 0), decoded: [prompt][sample].
    With a guided-generation `constraint`, only the constrained continuation is returned.

    Every sequence starts with id 0, as in training (seqio shifts the targets right behind a 0). The rows are
    generated SAMPLE_ROWS at a time, all padded alike (one compilation). Every process must call it (the model is
    sharded over all of them).
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental import multihost_utils

    from axmini.decoding import generate
    from axmini.guided import constrained_text

    rows = [[0, *(int(i) for i in vocabulary.encode(p))] for p in prompts for _ in range(num_samples)]
    width, batch = max(len(r) for r in rows), min(len(rows), SAMPLE_ROWS)
    decoded = []
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        chunk += [chunk[0]] * (batch - len(chunk))  # The last batch filled up with copies (dropped below).
        out = generate(
            model,
            jnp.asarray([r + [0] * (width - len(r)) for r in chunk], jnp.int32),
            prompt_lengths=jnp.asarray([len(r) for r in chunk], jnp.int32),
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=40 if temperature > 0 else None,
            stop_ids=(vocabulary.eos_id,),
            rng=jax.random.fold_in(jax.random.key(seed), start),
            constraint=constraint,
        )
        tokens, lengths = multihost_utils.process_allgather((out.tokens, out.lengths), tiled=True)
        for row, generated, length in zip(chunk, np.asarray(tokens), np.asarray(lengths)):
            new_ids = [int(t) for t in generated[: int(length)] if t != vocabulary.eos_id]
            if constraint is not None:
                decoded.append(constrained_text(vocabulary, new_ids))
            else:
                decoded.append(vocabulary.decode(row[1:] + new_ids))
    decoded = decoded[: len(rows)]
    return [decoded[i : i + num_samples] for i in range(0, len(decoded), num_samples)]
