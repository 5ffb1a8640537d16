"""RAttention vs full causal attention vs sliding-window attention, one layer, on the local devices (CPU here).

Training: forward + backward time (the best of --reps runs after compiling: the one least disturbed by
other load) and peak memory from the compiled step's `memory_analysis()` (arguments + outputs +
temporaries - aliased), per sequence length. Decoding: time per one-token extend step and the bytes of
the cache it reads, at each context length.

    python benchmarks/rattention_benchmark.py                    # 1k, 4k, 16k, 32k; decode at 4k and 32k
    python benchmarks/rattention_benchmark.py --lengths 1024 4096 --reps 2

A step whose compiled peak memory exceeds --max-gb is not run: its memory is still reported, its time is
"skipped". Results go to benchmarks/results/rattention.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
from timing import time_call

from axmini.layers.attention import Attention, KVCache
from axmini.layers.linear_attention import LinearState
from axmini.layers.position import RoPEModifier
from axmini.layers.rattention import RAttention, RAttentionCache

KINDS = ("full", "sliding_window", "rattention", "rattention_remat")


def layer_config(kind: str, args: argparse.Namespace) -> Any:
    dims = dict(input_dim=args.dim, num_heads=args.heads, num_kv_heads=args.kv_heads, head_dim=args.head_dim)
    if kind == "full":
        cfg = Attention.default_config().set(**dims)
    elif kind == "sliding_window":
        cfg = Attention.default_config().set(sliding_window=args.window, **dims)
    else:
        every = args.remat_every if kind == "rattention_remat" else None
        cfg = RAttention.default_config().set(
            sliding_window=args.window, chunk_size=args.chunk, state_checkpoint_every=every, **dims
        )
    return RoPEModifier.default_config().instantiate()(cfg)


def peak_bytes(compiled: Any) -> int:
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


def bench_train(kind: str, length: int, args: argparse.Namespace) -> dict[str, Any]:
    layer = layer_config(kind, args).instantiate(rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(layer)
    x = jax.random.normal(jax.random.key(1), (args.batch, length, args.dim), jnp.float32)
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (args.batch, length))

    def loss(state: Any, x: jax.Array) -> jax.Array:
        return jnp.sum(nnx.merge(graphdef, state)(x, positions=positions).output)

    start = time.perf_counter()
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(state, x).compile()
    result = {"kind": kind, "length": length, "peak_bytes": peak_bytes(compiled)}
    result["compile_s"] = time.perf_counter() - start
    if result["peak_bytes"] > args.max_gb * 2**30:
        result["step_s"] = None
    else:
        jax.block_until_ready(compiled(state, x))  # warm-up
        result["step_s"] = time_call(lambda: compiled(state, x), args.reps, reduce=min)
    return result


def filled_cache(layer: Any, context: int, args: argparse.Namespace) -> Any:
    """A cache as after `context - 1` tokens (contents random: the step's cost does not depend on them)."""
    cache = layer.init_cache(args.batch, context)
    rng = np.random.default_rng(0)

    def fill(a: jax.Array) -> jax.Array:
        return jnp.asarray(rng.normal(size=a.shape), a.dtype)

    seen = context - 1
    if isinstance(cache, RAttentionCache):
        span = cache.window.k.shape[1]
        positions = jnp.broadcast_to(jnp.arange(seen - span, seen, dtype=jnp.int32), cache.window.positions.shape)
        window = KVCache(fill(cache.window.k), fill(cache.window.v), positions)
        state = LinearState(jnp.abs(fill(cache.state.state)), jnp.ones_like(cache.state.segment_ids))
        return RAttentionCache(window, fill(cache.keys), state)
    slots = cache.k.shape[1]
    if layer.config.sliding_window is None:  # Full cache: slot p holds position p.
        positions = jnp.where(jnp.arange(slots) < seen, jnp.arange(slots), -1)
    else:  # Ring: slot s holds the latest position p < seen with p % slots == s.
        last = seen - 1
        positions = last - (last - jnp.arange(slots)) % slots
    positions = jnp.broadcast_to(positions.astype(jnp.int32), cache.positions.shape)
    return KVCache(fill(cache.k), fill(cache.v), positions)


def bench_decode(kind: str, context: int, args: argparse.Namespace) -> dict[str, Any]:
    layer = layer_config(kind, args).instantiate(rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(layer)
    cache = filled_cache(layer, context, args)
    x = jax.random.normal(jax.random.key(2), (args.batch, 1, args.dim), jnp.float32)
    positions = jnp.full((args.batch, 1), context - 1, jnp.int32)

    def step(state: Any, x: jax.Array, cache: Any) -> Any:
        return nnx.merge(graphdef, state)(x, positions=positions, cache=cache)

    compiled = jax.jit(step).lower(state, x, cache).compile()
    jax.block_until_ready(compiled(state, x, cache))
    cache_bytes = sum(int(a.nbytes) for a in jax.tree.leaves(cache))
    per_token = time_call(lambda: compiled(state, x, cache), args.decode_reps, reduce=min)
    return {"kind": kind, "context": context, "cache_bytes": cache_bytes, "step_s": per_token}


def _fmt_bytes(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f} MiB"


def _fmt_s(s: float | None) -> str:
    return "skipped" if s is None else f"{s * 1e3:,.1f} ms"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}"


def print_tables(train: list[dict[str, Any]], decode: list[dict[str, Any]]) -> None:
    full = {r["length"]: r for r in train if r["kind"] == "full"}
    print("\nTraining step (forward + backward of one layer); ratios are vs full attention")
    header = f"{'kind':<18}{'length':>8}{'time':>14}{'peak memory':>16}{'time ratio':>12}{'mem ratio':>11}"
    print(header + "\n" + "-" * len(header))
    for r in train:
        base = full.get(r["length"], {})
        print(
            f"{r['kind']:<18}{r['length']:>8}{_fmt_s(r['step_s']):>14}{_fmt_bytes(r['peak_bytes']):>16}"
            f"{_ratio(r['step_s'], base.get('step_s')):>12}{_ratio(r['peak_bytes'], base.get('peak_bytes')):>11}"
        )
    full_decode = {r["context"]: r for r in decode if r["kind"] == "full"}
    print("\nDecoding (one-token extend step); ratios are vs full attention")
    header = f"{'kind':<18}{'context':>8}{'time/token':>14}{'cache':>16}{'time ratio':>12}{'cache ratio':>12}"
    print(header + "\n" + "-" * len(header))
    for r in decode:
        base = full_decode.get(r["context"], {})
        print(
            f"{r['kind']:<18}{r['context']:>8}{_fmt_s(r['step_s']):>14}{_fmt_bytes(r['cache_bytes']):>16}"
            f"{_ratio(r['step_s'], base.get('step_s')):>12}{_ratio(r['cache_bytes'], base.get('cache_bytes')):>12}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    parser.add_argument("--decode-contexts", type=int, nargs="+", default=[4096, 32768])
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--remat-every", type=int, default=4, help="state_checkpoint_every of rattention_remat")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--decode-reps", type=int, default=20)
    parser.add_argument("--max-gb", type=float, default=6.0, help="do not run steps whose compiled peak exceeds this")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "rattention.json")
    args = parser.parse_args()

    train, decode = [], []
    for length in args.lengths:
        for kind in args.kinds:
            train.append(bench_train(kind, length, args))
            print(f"train {kind} T={length}: {_fmt_s(train[-1]['step_s'])}, {_fmt_bytes(train[-1]['peak_bytes'])}")
    for context in args.decode_contexts:
        for kind in args.kinds:
            decode.append(bench_decode(kind, context, args))
            print(f"decode {kind} context={context}: {_fmt_s(decode[-1]['step_s'])}")
    print_tables(train, decode)

    setup = {k: v for k, v in vars(args).items() if k != "out"}
    device = jax.devices()[0]
    meta = {"device": f"{device.platform}:{device.device_kind}", "device_count": jax.device_count()}
    meta |= {"jax": jax.__version__, "machine": platform.machine(), "processor": platform.processor()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"setup": setup, "meta": meta, "train": train, "decode": decode}, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
