"""Build and compile time of a scanned PatternStack against depth: the 56-layer global-local model and its 8-layer
version (same widths, 3 local : 1 global, KV sharing), on the local device (CPU here).

Build: `build_abstract` (shapes only, no memory), the best of --reps. Compile: the jitted gradient of the training
loss at batch 1 x --length, lowered from abstract parameters (nothing is allocated) and compiled, once per model.
Goals (issue 18): build <= 0.5 s; compile(56 layers) <= 2 x compile(8 layers).

    python benchmarks/pattern_stack_benchmark.py [--length 256] [--out benchmarks/results/pattern_stack.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import flax.nnx as nnx
import jax
import jax.numpy as jnp

from axmini.experiments.decoders import afm_on_device_global_local
from axmini.layers.decoder import Decoder
from axmini.module import build_abstract


def models() -> dict[str, Decoder.Config]:
    deep = afm_on_device_global_local()
    shallow = deep.clone()
    shallow.stack.set(num_layers=8, kv_sharing=(1, 1))  # 4 + 4 layers: the provider (layer 3) is global.
    return {"56 layers": deep, "8 layers": shallow}


def build_seconds(cfg: Decoder.Config, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        build_abstract(cfg)
        times.append(time.perf_counter() - start)
    return min(times)


def compile_seconds(cfg: Decoder.Config, length: int) -> float:
    graphdef, params = nnx.split(build_abstract(cfg))
    ids = jax.ShapeDtypeStruct((1, length), jnp.int32)

    def loss(params: Any, ids: jax.Array) -> jax.Array:
        return nnx.merge(graphdef, params)({"input_ids": ids, "target_ids": ids})[0]

    start = time.perf_counter()
    jax.jit(jax.grad(loss)).lower(params, ids).compile()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "pattern_stack.json")
    args = parser.parse_args()

    rows = []
    for name, cfg in models().items():
        build_abstract(cfg)  # Warm the config and tracing caches, as any second build would be.
        row = {"model": name, "build_s": build_seconds(cfg, args.reps), "compile_s": compile_seconds(cfg, args.length)}
        rows.append(row)
        print(f"{name}: build {row['build_s']:.3f} s, compile {row['compile_s']:.1f} s", flush=True)
    ratio = rows[0]["compile_s"] / rows[1]["compile_s"]
    print(f"\n{'model':<10}{'build s':>10}{'compile s':>11}")
    for r in rows:
        print(f"{r['model']:<10}{r['build_s']:>10.3f}{r['compile_s']:>11.1f}")
    build = rows[0]["build_s"]
    print(f"compile 56 / 8 layers: {ratio:.2f} (goal <= 2); build of 56 layers {build:.3f} s (goal <= 0.5)")
    meta = {"device": str(jax.devices()[0]), "jax": jax.__version__, "platform": platform.platform()}
    meta["load_average_1min"] = os.getloadavg()[0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results = {"setup": vars(args) | {"out": str(args.out)}, "meta": meta, "rows": rows, "compile_ratio": ratio}
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
