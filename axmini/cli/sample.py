"""`axmini sample --trainer_dir=DIR [--prompt TEXT | --prompt_file FILE | < prompts]`: text from the latest
checkpoint of a run. Only the model and the vocabulary are built (no input pipeline, no learner), and nothing in the
trainer dir is written: a trainer may be running there."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from axmini.cli.common import Runner, UsageError, read_only_checkpointer, read_run

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

    def run() -> int:
        import jax

        from axmini.trainer.inference import load_model

        model = load_model(cfg, checkpointer).model
        samples = sample_texts(
            model,
            vocabulary,
            prompts,
            num_samples=args.num_samples,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            seed=args.seed,
        )
        if jax.process_index() == 0:
            for texts in samples:
                print("\n".join(texts))
        return 0

    return run


def sample_texts(
    model: Any,
    vocabulary: Any,
    prompts: list[str],
    *,
    num_samples: int = 1,
    max_new_tokens: int = 64,
    temperature: float,
    seed: int,
) -> list[list[str]]:
    """`num_samples` continuations of each prompt (top-k 40; greedy at temperature 0), decoded: [prompt][sample].

    Every sequence starts with id 0, as in training (seqio shifts the targets right behind a 0). The rows are
    generated SAMPLE_ROWS at a time, all padded alike (one compilation). Every process must call it (the model is
    sharded over all of them).
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental import multihost_utils

    from axmini.decoding import generate

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
        )
        tokens, lengths = multihost_utils.process_allgather((out.tokens, out.lengths), tiled=True)
        for row, generated, length in zip(chunk, np.asarray(tokens), np.asarray(lengths)):
            new_ids = [int(t) for t in generated[: int(length)] if t != vocabulary.eos_id]
            decoded.append(vocabulary.decode(row[1:] + new_ids))
    decoded = decoded[: len(rows)]
    return [decoded[i : i + num_samples] for i in range(0, len(decoded), num_samples)]
