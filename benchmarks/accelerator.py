"""Accelerator benchmark: one script, one run, everything side by side on the local accelerator (a GPU).

Sections (each isolated: a failure is recorded in the JSON and the next section runs):

1. `machine`: versions, the device, and the measured bf16 matmul rate (8192^3), the ceiling for MFU.
2. `llama_1b`: a training step of `llama_1b` (bf16 compute, float32 parameters and optimizer, sequence 2048) at the
   largest batch that fits, three ways: the axmini Trainer; the same nnx model in a hand-written
   `jit(value_and_grad -> optax)` loop (trainer overhead only); and a plain-JAX Llama written here from scratch
   over the same parameters (RMSNorm, rotate-half RoPE, grouped-query causal attention through
   `jax.nn.dot_product_attention`, SwiGLU, layers under `lax.scan`, tied head, float32 loss) with the same
   optax chain. Reported: step time, tokens/s, MFU (6 x matmul parameters + causal attention FLOPs, over the
   datasheet peak and over the measured matmul rate), peak device memory, and that the first losses agree.
3. `attention`: forward + backward of causal attention (16 heads x 128, 8 kv heads, bf16, 32k tokens per call) at
   2k / 8k / 32k: the reference einsum kernel, `jax.nn.dot_product_attention` with XLA and with cuDNN
   (`is_causal`), and cuDNN with a 512 local window.
4. `moe`: forward + backward of a top-2-of-8 MoE (d 2048, expert hidden 4096) with einsum and grouped
   (`ragged_dot`) dispatch against a dense SwiGLU of the same active parameters (hidden 8192).

    python benchmarks/accelerator.py [--out benchmarks/results/accelerator.json] [--smoke]

`--smoke` runs every section at toy sizes (CPU-friendly) to check the script itself.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax
import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from axmini import experiments
from axmini.layers.attention import AttentionKernel, attention_mask, reference_attention
from axmini.layers.feed_forward import FeedForward
from axmini.layers.moe import MoE, MoEDispatch, TopKGating
from axmini.mesh_rules import detect_instance_type, instance_type
from axmini.trainer.finalize import finalize
from axmini.trainer.input import SyntheticInput
from axmini.trainer.trainer import Trainer

GPU_PEAK_BF16 = {"h100": 989e12, "h200": 989e12, "a100": 312e12}


def median_time(fn: Callable[[], Any], reps: int) -> float:
    jax.block_until_ready(fn())  # Warm-up.
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_memory() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def datasheet_peak() -> float | None:
    kind = jax.devices()[0].device_kind.lower()
    return next((peak for name, peak in GPU_PEAK_BF16.items() if name in kind), None)


# ----------------------------------------------------------------------------------------------------
# 1. The machine.


def machine(args: argparse.Namespace) -> dict[str, Any]:
    n = 512 if args.smoke else 8192
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    matmul = jax.jit(lambda a, b: a @ b)
    seconds = median_time(lambda: matmul(a, b), 10)
    return {
        "platform": platform.platform(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "device": str(jax.devices()[0]),
        "device_kind": jax.devices()[0].device_kind,
        "num_devices": jax.device_count(),
        "datasheet_peak_bf16_flops": datasheet_peak(),
        "measured_matmul_bf16_flops": 2 * n**3 / seconds,
    }


# ----------------------------------------------------------------------------------------------------
# 2. llama_1b: axmini Trainer vs the same nnx model in a plain loop vs a plain-JAX Llama.


def llama_trainer(batch: int, length: int, tmp: str, smoke: bool) -> Trainer:
    cfg = experiments.get("llama_tiny" if smoke else "llama_1b").set(dir=tmp, progress_bar=False)
    cfg.model.dtype = jnp.bfloat16
    cfg.model.lm_head = None  # Tied, as llama_1b is (llama_tiny is not).
    cfg.model.stack.layer.self_attention.kernel = AttentionKernel.XLA
    cfg.input = SyntheticInput.default_config().set(
        vocab_size=cfg.model.vocab_size, global_batch_size=batch, sequence_length=length
    )
    cfg.evaluator.input = None
    return finalize(cfg, detect_instance_type()).instantiate(devices=jax.devices()[:1])


def _rope(x: jax.Array, theta: float) -> jax.Array:
    t, dh = x.shape[1], x.shape[-1]
    freqs = theta ** (-jnp.arange(0, dh, 2, dtype=jnp.float32) / dh)
    angles = jnp.arange(t, dtype=jnp.float32)[:, None] * freqs  # [T, Dh/2]
    cos, sin = jnp.cos(angles)[None, :, None], jnp.sin(angles)[None, :, None]
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., : dh // 2], x32[..., dh // 2 :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


def _rms(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + eps) * scale).astype(x.dtype)


def plain_llama_loss(params: dict[str, Any], batch: dict[str, jax.Array], *, theta: float, eps: float) -> jax.Array:
    """A Llama written directly in JAX over axmini's parameter layout (tied embedding, scanned layers)."""
    dtype = jnp.bfloat16
    table = params["embedding"]["weight"]
    x = jnp.take(table, batch["input_ids"], axis=0).astype(dtype)

    def layer(x: jax.Array, p: dict[str, Any]) -> tuple[jax.Array, None]:
        h = _rms(x, p["attention_norm"]["scale"], eps)
        proj = p["self_attention"]["input_linear"]["inner"]
        q, k, v = (jnp.einsum("btd,dnh->btnh", h, proj[w].astype(dtype)) for w in ("q", "k", "v"))
        out = jax.nn.dot_product_attention(_rope(q, theta), _rope(k, theta), v, is_causal=True)
        x = x + jnp.einsum("btnh,nhd->btd", out, p["self_attention"]["output_linear"]["weight"].astype(dtype))
        h = _rms(x, p["feed_forward_norm"]["scale"], eps)
        ffn = p["feed_forward"]
        gate = jax.nn.silu(h @ ffn["wi_0"].astype(dtype)) * (h @ ffn["wi_1"].astype(dtype))
        return x + gate @ ffn["wo"].astype(dtype), None

    x, _ = jax.lax.scan(layer, x, params["stack"]["layers"])
    x = _rms(x, params["output_norm"]["scale"], eps)
    logits = jnp.einsum("btd,vd->btv", x, table.astype(dtype)).astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, -1)
    target = jnp.take_along_axis(logits, batch["target_ids"][..., None], -1)[..., 0]
    weights = batch["target_weights"]
    return jnp.sum((log_z - target) * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def _flops_per_token(trainer: Trainer, length: int) -> float:
    """6 x (every parameter that multiplies activations: all but the embedding lookup, plus the tied head) plus
    causal attention (6 x layers x T x heads x head_dim, half of the full T x T score and value matmuls)."""
    model = trainer.config.model
    attention = model.stack.layer.self_attention
    head_dim = attention.head_dim or model.dim // attention.num_heads
    matmul_params = trainer.num_params  # The tied table is both the lookup and the head: counted once, as the head.
    return 6 * matmul_params + 6 * model.stack.num_layers * length * attention.num_heads * head_dim


def llama(args: argparse.Namespace) -> dict[str, Any]:
    length = 128 if args.smoke else 2048
    batches = [2] if args.smoke else args.batches
    results: dict[str, Any] = {"length": length, "attempts": []}
    for batch in batches:
        try:
            row = _llama_at(batch, length, args)
        except Exception as e:  # Out of memory at this batch: try a smaller one.
            results["attempts"].append({"batch": batch, "error": f"{type(e).__name__}: {str(e)[:300]}"})
            print(f"llama batch {batch}: {type(e).__name__}", flush=True)
            continue
        results.update(row)
        break
    return results


def _llama_at(batch: int, length: int, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        trainer = llama_trainer(batch, length, tmp, args.smoke)
        data = [trainer.global_batch(b) for b, _ in zip(trainer.input.batches(0), range(2))]
        t0 = time.perf_counter()
        state = trainer.init_state()
        step = trainer.compiled_train_step()
        compile_s = time.perf_counter() - t0
        params_copy = jax.tree.map(jnp.copy, state["params"])
        rest = state["rest"]

        def trainer_step() -> Any:
            nonlocal state
            state, metrics = step(state, data[0])
            return metrics["loss"]

        trainer_loss = float(trainer_step())
        trainer_s = median_time(trainer_step, args.reps)
        trainer_peak = peak_memory()
        del state

        learner = trainer.learner
        tx = optax.chain(
            optax.clip_by_global_norm(learner.config.max_grad_norm),
            learner.config.optimizer.instantiate(learning_rate=learner.schedule, mask=learner.decay_mask),
        )
        graphdef = trainer._graphdef

        def nnx_loss(params: Any, batch: Any) -> jax.Array:
            return nnx.merge(graphdef, params, rest)(batch)[0]

        plain_dict = nnx.to_pure_dict(params_copy)
        model_cfg = trainer.config.model
        rope = model_cfg.stack.layer.self_attention.input_linear
        eps = model_cfg.stack.layer.norm.eps

        def jax_loss(params: Any, batch: Any) -> jax.Array:
            return plain_llama_loss(params, batch, theta=rope.theta, eps=eps)

        rows = {"trainer": {"step_s": trainer_s, "first_loss": trainer_loss, "peak_bytes": trainer_peak}}
        for name, loss_fn, params in (("nnx_plain_loop", nnx_loss, params_copy), ("plain_jax", jax_loss, plain_dict)):

            def update(params: Any, opt_state: Any, batch: Any, loss_fn: Callable = loss_fn) -> Any:
                loss, grads = jax.value_and_grad(loss_fn)(params, batch)
                updates, opt_state = tx.update(grads, opt_state, params)
                return optax.apply_updates(params, updates), opt_state, loss

            params = jax.tree.map(jnp.copy, params)
            opt_state = tx.init(params)
            compiled = jax.jit(update, donate_argnums=(0, 1)).lower(params, opt_state, data[0]).compile()
            holder = {"params": params, "opt_state": opt_state}

            def plain_step(compiled: Any = compiled, holder: dict = holder) -> Any:
                holder["params"], holder["opt_state"], loss = compiled(holder["params"], holder["opt_state"], data[0])
                return loss

            first = float(plain_step())
            rows[name] = {
                "step_s": median_time(plain_step, args.reps),
                "first_loss": first,
                "peak_bytes": peak_memory(),
            }
            del holder

        tokens = batch * length
        flops = _flops_per_token(trainer, length) * tokens
        peaks = {"datasheet": datasheet_peak(), "measured": args.measured_peak}
        for row in rows.values():
            row["tokens_per_s"] = tokens / row["step_s"]
            for label, peak in peaks.items():
                row[f"mfu_{label}"] = flops / row["step_s"] / peak if peak else None
        return {
            "batch": batch,
            "params": trainer.num_params,
            "trainer_compile_s": compile_s,
            "flops_per_step": flops,
            "rows": rows,
            "ratio_trainer_vs_nnx_plain": rows["trainer"]["step_s"] / rows["nnx_plain_loop"]["step_s"],
            "ratio_trainer_vs_plain_jax": rows["trainer"]["step_s"] / rows["plain_jax"]["step_s"],
            "losses_agree": bool(
                np.allclose([r["first_loss"] for r in rows.values()], trainer_loss, rtol=2e-2, atol=1e-2)
            ),
        }


# ----------------------------------------------------------------------------------------------------
# 3. Attention kernels.


def attention(args: argparse.Namespace) -> list[dict[str, Any]]:
    lengths = [128, 256] if args.smoke else [2048, 8192, 32768]
    return [row for length in lengths for row in _attention_at(length, args)]


def _attention_at(length: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    heads, kv_heads, head_dim = (4, 2, 32) if args.smoke else (16, 8, 128)
    batch = max(1, (512 if args.smoke else 32768) // length)
    keys = jax.random.split(jax.random.key(length), 3)
    q = jax.random.normal(keys[0], (batch, length, heads, head_dim), jnp.bfloat16)
    k, v = (jax.random.normal(key, (batch, length, kv_heads, head_dim), jnp.bfloat16) for key in keys[1:])
    positions = jnp.broadcast_to(jnp.arange(length), (batch, length))

    def reference(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        return reference_attention(q, k, v, attention_mask(positions, positions))

    kernels: dict[str, Callable[..., jax.Array]] = {
        "reference_einsum": reference,
        "xla": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla"),
    }
    if jax.devices()[0].platform == "gpu":
        kernels["cudnn"] = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
        kernels["cudnn_window_512"] = lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, local_window_size=(512, 0), implementation="cudnn"
        )
    rows = []
    for name, kernel in kernels.items():
        # Score and value matmuls over the keys each query sees (causal: T/2 on average; a window w: about w),
        # forward (2 matmuls) + backward (5): x3.5.
        seen = min(512, length) if "window" in name else length / 2
        flops = 4 * batch * heads * head_dim * length * seen * 3.5
        row: dict[str, Any] = {"length": length, "batch": batch, "kernel": name}
        try:
            loss = lambda q, k, v, kernel=kernel: jnp.sum(kernel(q, k, v).astype(jnp.float32))
            grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
            seconds = median_time(lambda grad=grad: grad(q, k, v), args.reps)
            row.update(fwd_bwd_s=seconds, tflops=flops / seconds / 1e12)
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        rows.append(row)
        print(f"attention {length} {name}: {row.get('fwd_bwd_s', row.get('error'))}", flush=True)
    return rows


# ----------------------------------------------------------------------------------------------------
# 4. MoE vs dense.


def moe(args: argparse.Namespace) -> list[dict[str, Any]]:
    dim, hidden, experts, top_k = (64, 128, 8, 2) if args.smoke else (2048, 4096, 8, 2)
    batch, length = (2, 64) if args.smoke else (8, 2048)
    gating = TopKGating.default_config().set(top_k=top_k, train_capacity_factor=2.0)
    moe_cfg = MoE.default_config().set(input_dim=dim, hidden_dim=hidden, num_experts=experts, gating=gating)
    configs = {
        "dense": FeedForward.default_config().set(input_dim=dim, hidden_dim=top_k * hidden),
        "moe_einsum": moe_cfg.clone(dispatch=MoEDispatch.EINSUM),
        "moe_grouped": moe_cfg.clone(dispatch=MoEDispatch.GROUPED),
    }
    x = jax.random.normal(jax.random.key(1), (batch, length, dim), jnp.bfloat16)
    rows = []
    for name, cfg in configs.items():
        row: dict[str, Any] = {"layer": name, "tokens": batch * length}
        try:
            graphdef, params = nnx.split(cfg.set(param_dtype=jnp.bfloat16).instantiate(rngs=nnx.Rngs(0)))

            def loss(params: Any, x: jax.Array, graphdef: Any = graphdef) -> jax.Array:
                return jnp.sum(jnp.square(nnx.merge(graphdef, params)(x).astype(jnp.float32)))

            grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
            row["fwd_bwd_s"] = median_time(lambda grad=grad, params=params: grad(params, x), args.reps)
            row["tokens_per_s"] = batch * length / row["fwd_bwd_s"]
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        rows.append(row)
    dense = next((r["fwd_bwd_s"] for r in rows if r["layer"] == "dense" and "fwd_bwd_s" in r), None)
    for row in rows:
        if dense and "fwd_bwd_s" in row:
            row["ratio_to_dense"] = row["fwd_bwd_s"] / dense
    return rows


# ----------------------------------------------------------------------------------------------------


def _table(results: dict[str, Any]) -> str:
    lines = []
    m = results.get("machine", {})
    if "device_kind" in m:
        lines.append(
            f"{m['device_kind']}: jax {m['jax']}, measured bf16 matmul {m['measured_matmul_bf16_flops'] / 1e12:.0f} "
            "TFLOP/s"
        )
    ll = results.get("llama_1b", {})
    if "rows" in ll:
        lines.append(f"llama_1b, batch {ll['batch']} x {ll['length']}, {ll['params']:,} params:")
        lines.append(
            f"  {'step':<16}{'ms':>9}{'tokens/s':>12}{'MFU (datasheet)':>17}{'MFU (measured)':>16}{'peak GiB':>10}"
        )
        for name, r in ll["rows"].items():
            mfu_d = f"{r['mfu_datasheet']:.1%}" if r.get("mfu_datasheet") else "-"
            mfu_m = f"{r['mfu_measured']:.1%}" if r.get("mfu_measured") else "-"
            peak = f"{r['peak_bytes'] / 2**30:.1f}" if r.get("peak_bytes") else "-"
            lines.append(
                f"  {name:<16}{r['step_s'] * 1e3:>9.1f}{r['tokens_per_s']:>12,.0f}{mfu_d:>17}{mfu_m:>16}{peak:>10}"
            )
        lines.append(
            f"  trainer / nnx plain loop {ll['ratio_trainer_vs_nnx_plain']:.3f}; trainer / plain JAX "
            f"{ll['ratio_trainer_vs_plain_jax']:.3f}; first losses agree: {ll['losses_agree']}"
        )
    elif ll:
        lines.append(f"llama_1b: {ll.get('error') or ll.get('attempts')}")
    for r in results.get("attention", []):
        value = f"{r['fwd_bwd_s'] * 1e3:9.2f} ms {r['tflops']:7.1f} TFLOP/s" if "fwd_bwd_s" in r else r["error"][:80]
        lines.append(f"attention T={r['length']:<6} {r['kernel']:<18} {value}")
    for r in results.get("moe", []):
        value = (
            f"{r['fwd_bwd_s'] * 1e3:9.2f} ms {r['tokens_per_s']:>12,.0f} tok/s x{r.get('ratio_to_dense', 0):.2f} dense"
            if "fwd_bwd_s" in r
            else r["error"][:80]
        )
        lines.append(f"moe {r['layer']:<12} {value}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/accelerator.json")
    parser.add_argument("--sections", default="machine,llama_1b,attention,moe")
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 8, 4], help="llama_1b batches, tried in order")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="toy sizes, to check the script on CPU")
    args = parser.parse_args()
    args.measured_peak = None
    sections: dict[str, Callable[[argparse.Namespace], Any]] = {
        "machine": machine,
        "llama_1b": llama,
        "attention": attention,
        "moe": moe,
    }
    results: dict[str, Any] = {"instance_type": instance_type(detect_instance_type()).name}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.sections.split(","):
        start = time.perf_counter()
        try:
            results[name] = sections[name](args)
        except Exception as e:
            results[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        print(f"== {name}: {time.perf_counter() - start:.1f} s", flush=True)
        if name == "machine" and "measured_matmul_bf16_flops" in results[name]:
            args.measured_peak = results[name]["measured_matmul_bf16_flops"]
        out.write_text(json.dumps(results, indent=2, default=str))  # After every section: partial runs still count.
    print(_table(results))
    print(f"wrote {out}; peak memory {math.nan if peak_memory() is None else peak_memory() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
