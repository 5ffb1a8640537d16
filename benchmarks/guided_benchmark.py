"""Constrained vs unconstrained decoding on the tiny model: the per-token cost of guided generation.

The same model (`tiny`'s, random weights), batch and sampling (temperature 1, top-k 40) decode `--tokens` new tokens
three ways in one run: unconstrained (no stop token, so every step runs), constrained by a JSON schema with an
unbounded string field, and by a regex of words. Time per decoding step is the fastest of `--reps` calls after
compiling (interleaved with the other two), divided by the loop steps the call ran (the longest row: rows stop when
their output is complete). The goal is at most 1.3x the unconstrained time per token.

    python benchmarks/guided_benchmark.py
    python benchmarks/guided_benchmark.py --batch 1 --tokens 64 --reps 3

Results go to benchmarks/results/guided.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import sentencepiece as spm
from timing import time_call

from axmini import guided
from axmini.decoding import generate
from axmini.trainer import corpus
from experiments.lm import tiny

SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "year": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["title", "year", "tags"],
}
REGEX = r"([a-z]+ ){4,}[a-z]+\."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "guided.json")
    args = parser.parse_args()

    model = tiny().model.instantiate(rngs=nnx.Rngs(0))
    vocab = spm.SentencePieceProcessor(model_file=str(corpus.prepare_vocab()))
    size = model.config.vocab_size
    constraints = {
        "unconstrained": None,
        "json_schema": guided.schema_constraint(SCHEMA, vocab, vocab_size=size, eos_id=1),
        "regex": guided.regex_constraint(REGEX, vocab, vocab_size=size, eos_id=1),
    }
    prompts = jnp.zeros((args.batch, 1), jnp.int32)

    def decode(constraint: guided.TokenConstraint | None) -> object:
        return generate(
            model,
            prompts,
            max_new_tokens=args.tokens,
            temperature=1.0,
            top_k=40,
            rng=jax.random.key(0),
            constraint=constraint,
        )

    steps = {name: int(np.max(np.asarray(decode(c).lengths))) for name, c in constraints.items()}  # Also compiles.
    # Interleaved rounds (one call of each per round), so a busy machine slows all of them alike; the fastest call.
    seconds = {name: [] for name in constraints}
    for _ in range(args.reps):
        for name, constraint in constraints.items():
            seconds[name].append(time_call(lambda c=constraint: decode(c), 1))
    rows = []
    for name, constraint in constraints.items():
        states = 0 if constraint is None else int(constraint.next_state.shape[0])
        best = min(seconds[name])
        rows.append(
            {
                "decoding": name,
                "automaton_states": states,
                "steps": steps[name],
                "call_s": best,
                "step_ms": 1e3 * best / steps[name],
            }
        )
    for row in rows:
        row["per_token_vs_unconstrained"] = row["step_ms"] / rows[0]["step_ms"]

    print(f"{'decoding':<14} {'states':>7} {'steps':>6} {'ms/step':>8} {'x unconstrained':>16}")
    for r in rows:
        print(
            f"{r['decoding']:<14} {r['automaton_states']:>7} {r['steps']:>6} {r['step_ms']:>8.2f} "
            f"{r['per_token_vs_unconstrained']:>16.2f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    setup = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    machine = {"devices": str(jax.devices()), "cpus": os.cpu_count(), "platform": platform.platform()}
    payload = {"setup": setup, "machine": machine, "goal": "per_token_vs_unconstrained <= 1.3", "rows": rows}
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
