"""MoE vs dense feed-forward, one layer, on the local devices (CPU here).

Forward + backward time (median of --reps runs after compiling) of a top-2-of-8 MoE with the einsum, gather
and grouped (ragged_dot) dispatches, each capacity-padded path at every --capacity-factors value, and of a dense
SwiGLU FFN with the same active parameters (hidden width top_k * F, so each token does the same expert matmul
work), at several token counts (batch x length; groups are sequences). Tokens/s and the ratio to the dense layer
in one table, from one run.

The capacity-padded paths (einsum, gather) run capacity_factor x the routed expert work: at factor 2 they cannot
beat 2x dense, at 1.25 they can approach 1.25x. The einsum path adds one-hot dispatch/combine matmuls (S * E * C * D
per group, growing with the sequence); the gather path replaces them by a gather and a scatter-add. XLA lowers
`jax.lax.ragged_dot` (grouped) to work proportional to every group for every row (about E times a dense matmul of
the same rows) on CPU, and on GPU as measured (benchmarks/accelerator.py); it pays off only with a grouped-GEMM
kernel (TPU megablox).

    python benchmarks/moe_benchmark.py
    python benchmarks/moe_benchmark.py --batches 1 4 --reps 3

Results go to benchmarks/results/moe.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path
from typing import Any

import flax.nnx as nnx
import jax
import jax.numpy as jnp
from timing import time_call

from axmini.config import Configurable
from axmini.layers.feed_forward import FeedForward
from axmini.layers.moe import MoE, MoEDispatch, TopKGating


def configs(args: argparse.Namespace) -> dict[str, Configurable.Config]:
    moe = MoE.default_config().set(input_dim=args.dim, hidden_dim=args.hidden, num_experts=args.experts)
    result = {"dense": FeedForward.default_config().set(input_dim=args.dim, hidden_dim=args.top_k * args.hidden)}
    for factor in args.capacity_factors:
        gating = TopKGating.default_config().set(top_k=args.top_k, train_capacity_factor=factor)
        for dispatch in (MoEDispatch.EINSUM, MoEDispatch.GATHER):
            result[f"moe_{dispatch.value}_cf{factor:g}"] = moe.clone(dispatch=dispatch, gating=gating)
    gating = TopKGating.default_config().set(top_k=args.top_k, train_capacity_factor=args.capacity_factors[0])
    result["moe_grouped"] = moe.clone(dispatch=MoEDispatch.GROUPED, gating=gating)
    return result


def bench(cfg: Configurable.Config, batch: int, args: argparse.Namespace) -> float:
    graphdef, state = nnx.split(cfg.instantiate(rngs=nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(1), (batch, args.length, args.dim), jnp.float32)

    def loss(state: Any, x: jax.Array) -> jax.Array:
        return jnp.sum(jnp.square(nnx.merge(graphdef, state)(x)))

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(state, x).compile()
    jax.block_until_ready(compiled(state, x))
    return time_call(lambda: compiled(state, x), args.reps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=512, help="hidden width of one expert")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--capacity-factors", type=float, nargs="+", default=[2.0, 1.25])
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--batches", type=int, nargs="+", default=[2, 8, 32])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "moe.json")
    args = parser.parse_args()

    rows = []
    for batch in args.batches:
        tokens = batch * args.length
        times = {name: bench(cfg, batch, args) for name, cfg in configs(args).items()}
        for name, step_s in times.items():
            rows.append(
                {
                    "layer": name,
                    "tokens": tokens,
                    "step_s": step_s,
                    "tokens_per_s": tokens / step_s,
                    "time_vs_dense": step_s / times["dense"],
                }
            )

    print(f"{'layer':<20} {'tokens':>7} {'fwd+bwd ms':>11} {'tokens/s':>10} {'x dense':>8}")
    for r in rows:
        print(
            f"{r['layer']:<20} {r['tokens']:>7} {1e3 * r['step_s']:>11.2f} {r['tokens_per_s']:>10.0f} "
            f"{r['time_vs_dense']:>8.2f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    setup = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    machine = {"devices": str(jax.devices()), "cpus": os.cpu_count(), "platform": platform.platform()}
    args.out.write_text(json.dumps({"setup": setup, "machine": machine, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
