"""Decoder speed: axmini's Decoder vs a hand-written plain-JAX model with the same weights, and decoding speed
with and without KV-cache sharing.

For each model (`tiny_decoder`, `llama_100m`) it times one jitted forward+backward step of the loss, for
the axmini model (nnx.split/merge around the pure step, as a trainer does) and for the plain-JAX reference
(the same math written directly on a dict of arrays, also scanned over layers), checks that both give the
same loss, and prints compile time, step time and their ratio. Then it times greedy generation (prefill +
while_loop extend) of the same model shape with and without KV sharing, reporting tokens/s and cache bytes.

    python benchmarks/decoder_benchmark.py [--steps 3] [--out benchmarks/results/decoder.json]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np

from axmini.decoding import generate
from axmini.experiments.decoders import DecoderShape, decoder_config, llama_decoder, tiny_decoder
from axmini.layers.decoder import Decoder
from axmini.module import count_params

# ----------------------------------------------------------------------------------------------------
# The plain-JAX reference: Llama-style decoder (RMSNorm, RoPE, GQA causal attention, SwiGLU).


def _rms(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    half = x.shape[-1] // 2
    freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) * 2 / x.shape[-1])
    angles = positions[:, :, None, None].astype(jnp.float32) * freqs
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def reference_loss(params: dict, input_ids: jax.Array, target_ids: jax.Array, *, theta: float, eps: float) -> jax.Array:
    """Mean next-token cross-entropy of the plain model."""
    b, t = input_ids.shape
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    causal = jnp.tril(jnp.ones((t, t), bool))
    x = params["embed"][input_ids]

    def layer(x: jax.Array, w: dict) -> tuple[jax.Array, None]:
        h = _rms(x, w["attn_norm"], eps)
        q = _rope(jnp.einsum("btd,dhk->bthk", h, w["q"]), positions, theta)
        k = _rope(jnp.einsum("btd,dhk->bthk", h, w["k"]), positions, theta)
        v = jnp.einsum("btd,dhk->bthk", h, w["v"])
        group = q.shape[2] // k.shape[2]
        q = q.reshape(b, t, k.shape[2], group, q.shape[-1])
        logits = jnp.einsum("bqkgd,bskd->bkgqs", q, k) / math.sqrt(q.shape[-1])
        probs = jax.nn.softmax(jnp.where(causal, logits, -1e30), axis=-1)
        attn = jnp.einsum("bkgqs,bskd->bqkgd", probs, v).reshape(b, t, -1, q.shape[-1])
        x = x + jnp.einsum("bthk,hkd->btd", attn, w["o"])
        h = _rms(x, w["ffn_norm"], eps)
        return x + (jax.nn.silu(h @ w["wi_0"]) * (h @ w["wi_1"])) @ w["wo"], None

    x, _ = jax.lax.scan(layer, x, params["layers"])
    x = _rms(x, params["out_norm"], eps)
    logits = x @ (params["embed"].T if params["lm_head"] is None else params["lm_head"])
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(log_probs, target_ids[..., None], axis=-1))


def reference_params(model: Decoder) -> dict:
    """The axmini model's weights as the plain model's dict (the same arrays)."""
    layers = model.stack.layers
    proj = layers.self_attention.input_linear.inner
    return {
        "embed": model.embedding.weight[...],
        "out_norm": model.output_norm.scale[...],
        "lm_head": model.lm_head.weight[...] if model.lm_head is not None else None,
        "layers": {
            "attn_norm": layers.attention_norm.scale[...],
            "q": proj.q[...],
            "k": proj.k[...],
            "v": proj.v[...],
            "o": layers.self_attention.output_linear.weight[...],
            "ffn_norm": layers.feed_forward_norm.scale[...],
            "wi_0": layers.feed_forward.wi_0[...],
            "wi_1": layers.feed_forward.wi_1[...],
            "wo": layers.feed_forward.wo[...],
        },
    }


# ----------------------------------------------------------------------------------------------------
# Timing.


def _time_step(step: Any, args: tuple, steps: int) -> tuple[float, float, Any]:
    """(compile seconds, median step seconds, first result) of a jitted function."""
    start = time.perf_counter()
    compiled = step.lower(*args).compile()
    compile_s = time.perf_counter() - start
    result = jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return compile_s, statistics.median(times), result


def bench_train_step(name: str, cfg: Decoder.Config, batch: int, length: int, steps: int) -> dict:
    model = cfg.instantiate(rngs=nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(1), (batch, length + 1), 1, cfg.vocab_size)
    data = {"input_ids": ids[:, :-1], "target_ids": ids[:, 1:]}
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def axmini_loss(params: Any, data: dict) -> jax.Array:
        return nnx.merge(graphdef, params, rest)(data)[0]

    attention = cfg.stack.layer.self_attention
    theta, eps = attention.input_linear.theta, cfg.stack.layer.norm.eps

    def plain_loss(params: dict, data: dict) -> jax.Array:
        return reference_loss(params, data["input_ids"], data["target_ids"], theta=theta, eps=eps)

    ours = _time_step(jax.jit(jax.value_and_grad(axmini_loss)), (params, data), steps)
    plain = _time_step(jax.jit(jax.value_and_grad(plain_loss)), (reference_params(model), data), steps)
    loss_diff = abs(float(ours[2][0]) - float(plain[2][0]))
    return {
        "model": name,
        "params": count_params(model),
        "batch": batch,
        "length": length,
        "axmini_compile_s": ours[0],
        "plain_compile_s": plain[0],
        "axmini_step_s": ours[1],
        "plain_step_s": plain[1],
        "step_ratio": ours[1] / plain[1],
        "loss": float(ours[2][0]),
        "loss_abs_diff": loss_diff,
    }


def bench_decode(kv_sharing: tuple[int, int] | None, batch: int, prompt: int, new_tokens: int, steps: int) -> dict:
    shape = DecoderShape(2048, 256, 8, 8, 2, 768, tied_embeddings=True, kv_sharing=kv_sharing)
    model = decoder_config(shape).instantiate(rngs=nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(2), (batch, prompt), 1, shape.vocab_size)
    start = time.perf_counter()
    jax.block_until_ready(generate(model, ids, max_new_tokens=new_tokens))
    first_s = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(generate(model, ids, max_new_tokens=new_tokens))
        times.append(time.perf_counter() - start)
    cache = model.init_cache(batch, prompt + new_tokens)
    seconds = statistics.median(times)
    return {
        "kv_sharing": list(kv_sharing) if kv_sharing else None,
        "layers": shape.num_layers,
        "batch": batch,
        "prompt": prompt,
        "new_tokens": new_tokens,
        "compile_and_first_s": first_s,
        "generate_s": seconds,
        "tokens_per_s": batch * new_tokens / seconds,
        "cache_bytes": int(sum(np.asarray(a).nbytes for a in jax.tree.leaves(cache))),
    }


def _table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    cells = [columns] + [[fmt(r[c]) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per measurement (median)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "decoder.json")
    args = parser.parse_args()

    train = [
        bench_train_step("tiny_decoder", tiny_decoder(), batch=8, length=128, steps=args.steps),
        bench_train_step("llama_100m", llama_decoder("100m"), batch=2, length=128, steps=args.steps),
    ]
    print("forward+backward step, axmini vs plain JAX (same weights)")
    print(
        _table(
            train,
            ["model", "params", "batch", "length", "axmini_compile_s", "plain_compile_s", "axmini_step_s"]
            + ["plain_step_s", "step_ratio", "loss_abs_diff"],
        )
    )
    decode = [bench_decode(split, batch=4, prompt=32, new_tokens=64, steps=args.steps) for split in (None, (5, 3))]
    print("\ngreedy generation (8 layers, dim 256), with and without KV sharing")
    print(_table(decode, ["kv_sharing", "batch", "prompt", "new_tokens", "generate_s", "tokens_per_s", "cache_bytes"]))

    result = {
        "device": str(jax.devices()[0].device_kind),
        "platform": platform.platform(),
        "jax": jax.__version__,
        "train_step": train,
        "decode": decode,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
