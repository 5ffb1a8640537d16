"""`axmini sample --trainer_dir=DIR --prompt "..."`: text from the latest checkpoint of a run."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from axmini.cli.common import Runner, UsageError, read_run_file, run_config


def add_parser(commands: Any) -> None:
    parser = commands.add_parser("sample", help="generate text from a run's latest checkpoint")
    parser.add_argument("--trainer_dir", required=True)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    parser.add_argument("--num_samples", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
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
    if trainer.input.vocabulary() is None:
        raise UsageError(f"experiment {run_record['config']!r} has synthetic input: no vocabulary to decode with")
    if not Path(trainer.config.checkpointer.dir).is_dir():
        raise UsageError(f"--trainer_dir={args.trainer_dir} has no checkpoint yet")
    checkpointer = trainer.config.checkpointer.instantiate(read_only=True)  # A trainer may be writing beside us.
    if not checkpointer.all_steps():
        raise UsageError(f"--trainer_dir={args.trainer_dir} has no checkpoint yet")

    def run() -> int:
        import jax

        from axmini.interop.runs import restore_params

        state = restore_params(trainer, trainer.config.checkpointer.dir)  # The weights only: no optimizer state.
        for i in range(args.num_samples):
            text = sample_text(
                trainer,
                state,
                args.prompt,
                max_new_tokens=args.max_new_tokens,
                temperature=args.temperature,
                seed=args.seed + i,
            )
            if jax.process_index() == 0:
                print(text)
        return 0

    return run


def sample_text(trainer: Any, state: Any, prompt: str, *, max_new_tokens: int, temperature: float, seed: int) -> str:
    """`prompt` continued by the model of `state`, decoded with the input's vocabulary. Every sequence starts with
    id 0, as in training (seqio shifts the targets right behind a 0). Every process must call it (the model is
    sharded over all of them)."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import multihost_utils

    from axmini.decoding import generate

    vocabulary = trainer.input.vocabulary()
    prompt_ids = [int(i) for i in vocabulary.encode(prompt)]
    out = generate(
        trainer.model(state),
        jnp.asarray([[0, *prompt_ids]], jnp.int32),
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=40 if temperature > 0 else None,
        stop_ids=(vocabulary.eos_id,),
        rng=jax.random.key(seed),
    )
    tokens, lengths = multihost_utils.process_allgather((out.tokens, out.lengths), tiled=True)
    new_ids = [int(t) for t in tokens[0, : int(lengths[0])] if t != vocabulary.eos_id]
    return vocabulary.decode(prompt_ids + new_ids)
