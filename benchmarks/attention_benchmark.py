"""Attention kernels and head layouts, one layer, on the local devices (CPU here).

Training: forward + backward time (median of --reps runs after compiling) and compiled peak memory
(`memory_analysis()`: arguments + outputs + temporaries - aliased) of the reference and XLA kernels per
sequence length. Sliding window: at --window-length tokens (16k) and a --window of 512, one head group (4 query
heads sharing 1 key/value head), the full [T, T] mask against the blocked window (`blocked_window_attention`:
each block of queries against its own and the previous key blocks) of the same kernels; a step whose compiled
peak exceeds --max-gb is not run (its memory is still reported). Decoding: time of a one-token extend step and the
bytes of its KV cache, for multi-head, grouped-query and multi-query heads at one context length (sliding-window
decoding is compared with full attention in rattention_benchmark.py).

    python benchmarks/attention_benchmark.py
    python benchmarks/attention_benchmark.py --lengths 512 2048 --reps 2 --window-length 4096

Results go to benchmarks/results/attention.json.
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
from axmini.layers.attention import Attention
from axmini.layers.kernels import ReferenceKernel, XLAKernel
from axmini.layers.position import RoPEModifier

KERNELS = {"reference": ReferenceKernel.default_config(), "xla": XLAKernel.default_config()}


def layer(args: argparse.Namespace, **fields: Any) -> Attention:
    cfg = Attention.default_config().set(input_dim=args.dim, num_heads=args.heads, head_dim=args.head_dim)
    cfg = RoPEModifier.default_config().instantiate()(cfg.set(**fields))
    return cfg.instantiate(rngs=nnx.Rngs(0))


def peak_bytes(compiled: Any) -> int:
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


def bench_train(
    name: str, kernel: Configurable.Config, length: int, args: argparse.Namespace, *, batch: int, **fields: Any
) -> dict[str, Any]:
    graphdef, state = nnx.split(layer(args, kernel=kernel, **fields))
    x = jax.random.normal(jax.random.key(1), (batch, length, args.dim), jnp.float32)
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))

    def loss(state: Any, x: jax.Array) -> jax.Array:
        return jnp.sum(nnx.merge(graphdef, state)(x, positions=positions).output)

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(state, x).compile()
    row = {"kernel": name, "length": length, "peak_bytes": peak_bytes(compiled), **fields}
    if row["peak_bytes"] > args.max_gb * 2**30:
        return {**row, "step_s": None}
    jax.block_until_ready(compiled(state, x))
    return {**row, "step_s": time_call(lambda: compiled(state, x), args.reps)}


def bench_window(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One head group at --window-length tokens: the full mask against the blocked window, per kernel."""
    fields = dict(num_heads=4, num_kv_heads=1, sliding_window=args.window)
    rows = []
    for name, kernel in KERNELS.items():
        for mode, block in (("full mask", None), ("blocked", args.window_block)):
            label = f"{name}, {mode}"
            rows.append(
                bench_train(label, kernel.clone(window_block_size=block), args.window_length, args, batch=1, **fields)
            )
            print(f"{label}: {rows[-1]['peak_bytes'] / 2**30:.2f} GiB, {rows[-1]['step_s']} s", flush=True)
    return rows


def bench_decode(kv_heads: int, args: argparse.Namespace) -> dict[str, Any]:
    model = layer(args, num_kv_heads=kv_heads)
    graphdef, state = nnx.split(model)
    cache = model.init_cache(args.batch, args.context)
    x = jax.random.normal(jax.random.key(2), (args.batch, 1, args.dim), jnp.float32)
    positions = jnp.full((args.batch, 1), args.context - 1, jnp.int32)

    def step(state: Any, x: jax.Array, cache: Any) -> Any:
        return nnx.merge(graphdef, state)(x, positions=positions, cache=cache)

    cache_bytes = sum(int(a.nbytes) for a in jax.tree.leaves(cache))
    # The cache is donated, as a decode loop does, so the step updates it in place instead of copying it.
    compiled = jax.jit(step, donate_argnums=2).lower(state, x, cache).compile()
    caches = [compiled(state, x, cache).cache]

    def extend() -> jax.Array:
        result = compiled(state, x, caches.pop())
        caches.append(result.cache)
        return result.output

    jax.block_until_ready(extend())
    step_s = time_call(extend, args.decode_reps)
    return {"kv_heads": kv_heads, "context": args.context, "step_s": step_s, "cache_bytes": cache_bytes}


def _time(step_s: float | None) -> str:
    return f"{step_s * 1e3:>10.1f}ms" if step_s is not None else f"{'not run':>12}"


def print_tables(train: list[dict[str, Any]], window: list[dict[str, Any]], decode: list[dict[str, Any]]) -> None:
    print("\nTraining step (forward + backward of one layer)")
    header = f"{'kernel':<22}{'length':>8}{'time':>12}{'peak memory':>14}"
    print(header + "\n" + "-" * len(header))
    for r in train:
        print(f"{r['kernel']:<22}{r['length']:>8}{_time(r['step_s'])}{r['peak_bytes'] / 2**20:>10.1f} MiB")
    if window:
        print(f"\nSliding window {window[0]['sliding_window']}, one head group (4 query heads, 1 kv head)")
        print(header + "\n" + "-" * len(header))
        for r in window:
            print(f"{r['kernel']:<22}{r['length']:>8}{_time(r['step_s'])}{r['peak_bytes'] / 2**20:>10.1f} MiB")
    print("\nDecoding (one-token extend step, full cache)")
    header = f"{'kv heads':<10}{'context':>8}{'time/token':>12}{'cache':>14}"
    print(header + "\n" + "-" * len(header))
    for r in decode:
        print(f"{r['kv_heads']:<10}{r['context']:>8}{r['step_s'] * 1e3:>10.2f}ms{r['cache_bytes'] / 2**20:>10.1f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--context", type=int, default=4096, help="decode cache length")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2, help="kv heads of the training benchmark")
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--decode-reps", type=int, default=20)
    parser.add_argument("--window-length", type=int, default=16384, help="tokens of the sliding-window comparison")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--window-block", type=int, default=512, help="query block of the blocked window")
    parser.add_argument("--max-gb", type=float, default=12.0, help="steps whose compiled peak exceeds it are not run")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "attention.json")
    args = parser.parse_args()

    train = [
        bench_train(name, kernel, n, args, batch=args.batch, num_kv_heads=args.kv_heads)
        for n in args.lengths
        for name, kernel in KERNELS.items()
    ]
    window = bench_window(args) if args.window_length else []
    decode = [bench_decode(kv, args) for kv in sorted({args.heads, args.kv_heads, 1}, reverse=True)]
    print_tables(train, window, decode)

    device = jax.devices()[0]
    meta = {"device": f"{device.platform}:{device.device_kind}", "device_count": jax.device_count()}
    meta |= {"jax": jax.__version__, "machine": platform.machine(), "cpu_count": os.cpu_count()}
    meta["load_average_1min_at_end"] = os.getloadavg()[0]  # Other processes on the machine skew CPU timings.
    setup = {k: v for k, v in vars(args).items() if k != "out"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results = {"setup": setup, "meta": meta, "train": train, "sliding_window": window, "decode": decode}
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
