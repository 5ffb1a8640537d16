"""Accelerator benchmark: one script, one run, everything side by side on the local accelerator (a GPU).

Sections, in order (each isolated: a failure is recorded in the JSON and the next section runs; the JSON is rewritten
after every section, so a run cut short keeps what it measured):

1. `machine`: versions, the device, and the measured bf16 matmul rate (8192^3), the ceiling for MFU.
2. `kernels_agree`: every attention kernel through axmini's kernel slot (the one the mesh rules pick on this backend,
   with its fallback reason if any, also with a query scale; XLA; the blocked window; cuDNN's packed layout for 4
   segments a row) against the reference kernel at 2k tokens, bf16: the largest difference of the loss and its
   gradients, relative.
3. `llama_1b`: a training step of `llama_1b` (bfloat16 compute and logits, float32 parameters and AdamW, sequence
   2048), two ways in one process: the axmini Trainer (its mesh rule gives GPUs cuDNN flash attention), and a
   plain-JAX Llama written here from scratch over the same parameters (RMSNorm, rotate-half RoPE, grouped-query
   causal cuDNN attention, SwiGLU, layers under `lax.scan`, tied head, float32 loss) with the same optax chain. The
   batch is the largest of --batches whose compiled memory fits the device (checked from the compiled program
   before running, so at most two compiles). Reported: step time, tokens/s, MFU (6 x weights + attention FLOPs,
   `axmini.trainer.summary.flops_per_token`, over the datasheet peak and over the measured matmul rate), compiled
   and runtime peak memory, and whether the first losses agree.
4. `attention`: forward + backward of causal attention (16 heads x 128, 8 kv heads, bf16, 32k tokens per call) at
   2k / 8k / 32k through axmini's kernels: reference (2k), XLA (2k, 8k), cuDNN, cuDNN with a 512 window, and the
   blocked 512 window of the XLA kernel; kernels whose [B,H,T,T] logits would not fit are skipped, not tried.
5. `moe`: forward + backward of a top-2-of-8 MoE (d 2048, expert hidden 4096, 16k tokens) with the einsum, gather
   (capacity factors 2 and 1.25) and grouped (`ragged_dot`) dispatches against a dense SwiGLU of the same active
   parameters (hidden 8192).

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
from axmini.config import find_configs
from axmini.layers.attention import Attention
from axmini.layers.decoder import MixedPrecisionModifier
from axmini.layers.feed_forward import FeedForward
from axmini.layers.kernels import AttentionMask, CudnnKernel, ReferenceKernel, XLAKernel
from axmini.layers.moe import MoE, MoEDispatch, TopKGating
from axmini.mesh_rules import default_mesh_rules, detect_instance_type, instance_type, select_mesh_rule
from axmini.trainer.finalize import finalize
from axmini.trainer.input import SyntheticInput
from axmini.trainer.summary import keys_per_query
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


def memory_stats() -> dict[str, Any]:
    return jax.devices()[0].memory_stats() or {}


def compiled_bytes(compiled: Any) -> int:
    """What a compiled program needs on the device: arguments + outputs + temporaries - donated (aliased)."""
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


def datasheet_peak() -> float | None:
    kind = jax.devices()[0].device_kind.lower()
    return next((peak for name, peak in GPU_PEAK_BF16.items() if name in kind), None)


def relative_difference(got: Any, want: Any) -> float:
    """The largest |got - want| over each array's largest |want|, across arrays (NaN anywhere: NaN)."""
    ratios = []
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
        ratios.append(float(np.max(np.abs(x - y))) / max(float(np.max(np.abs(y))), 1e-30))
    return max(ratios)


def backend_kernel() -> Any:
    """The attention kernel config the mesh rules give this backend (cuDNN on GPU, splash on TPU, none on CPU)."""
    cfg = Attention.default_config()
    for modifier in select_mesh_rule(detect_instance_type(), default_mesh_rules()).modifiers:
        cfg = modifier.instantiate()(cfg)
    return cfg.kernel


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
        "memory_bytes_limit": memory_stats().get("bytes_limit"),
        "datasheet_peak_bf16_flops": datasheet_peak(),
        "measured_matmul_bf16_flops": 2 * n**3 / seconds,
    }


# ----------------------------------------------------------------------------------------------------
# 2. Kernels agree with the reference.


def qkv(batch: int, length: int, heads: int, kv_heads: int, head_dim: int) -> tuple[jax.Array, ...]:
    keys = jax.random.split(jax.random.key(length), 3)
    q = jax.random.normal(keys[0], (batch, length, heads, head_dim), jnp.bfloat16)
    k, v = (jax.random.normal(key, (batch, length, kv_heads, head_dim), jnp.bfloat16) for key in keys[1:])
    return q, k, v


def causal_mask(batch: int, length: int, window: int | None = None, segments: int = 0) -> AttentionMask:
    """An aligned mask; with `segments`, each row packs that many equal sequences."""
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    if not segments:
        return AttentionMask(positions, positions, None, None, window, aligned=True)
    size = length // segments
    ids = jnp.broadcast_to(1 + jnp.arange(length, dtype=jnp.int32) // size, (batch, length))
    positions = positions % size
    return AttentionMask(positions, positions, ids, ids, window, aligned=True)


def kernels_agree(args: argparse.Namespace) -> list[dict[str, Any]]:
    batch, length, heads, kv_heads, head_dim = (2, 128, 4, 2, 32) if args.smoke else (2, 2048, 16, 8, 128)
    q, k, v = qkv(batch, length, heads, kv_heads, head_dim)
    selected, window = backend_kernel(), length // 4
    blocked = XLAKernel.default_config().set(window_block_size=window // 2)
    scale = 0.05  # A query scale other than 1 / sqrt(head_dim) (Gemma's query_pre_attn_scalar).
    cases = {  # name: (kernel, mask, query scale)
        "mesh_rule_kernel": (selected, causal_mask(batch, length), None),
        f"mesh_rule_kernel_window_{window}": (selected, causal_mask(batch, length, window), None),
        "mesh_rule_kernel_1_segment": (selected, causal_mask(batch, length, segments=1), None),
        f"mesh_rule_kernel_query_scale_{scale}": (selected, causal_mask(batch, length), scale),
        "cudnn_packed_4_segments": (
            CudnnKernel.default_config().set(max_segments_per_row=4),
            causal_mask(batch, length, segments=4),
            None,
        ),
        "xla": (XLAKernel.default_config(), causal_mask(batch, length), None),
        f"xla_blocked_window_{window}": (blocked, causal_mask(batch, length, window), None),
    }
    reference = ReferenceKernel.default_config().set(window_block_size=None).instantiate()
    rows = []
    for name, (kernel_cfg, mask, query_scale) in cases.items():
        row: dict[str, Any] = {"case": name, "kernel": kernel_cfg.klass.__name__}
        try:
            kernel = kernel_cfg.instantiate()
            reason = getattr(kernel, "unsupported_reason", lambda *a, **k: None)(q, k, v, mask)
            row["falls_back_because"] = reason

            def run(kernel: Any = kernel, mask: AttentionMask = mask, scale: float | None = query_scale) -> Any:
                loss = lambda q, k, v: jnp.sum(kernel(q, k, v, mask, query_scale=scale).astype(jnp.float32) ** 2)
                return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)

            row["relative_difference"] = relative_difference(run(), run(reference))
            row["agrees"] = bool(row["relative_difference"] < 2e-2)  # bfloat16 inputs; float32 softmax in both.
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        rows.append(row)
        print(f"kernels_agree {name}: {row.get('relative_difference', row.get('error'))}", flush=True)
    return rows


# ----------------------------------------------------------------------------------------------------
# 3. llama_1b: the axmini Trainer vs a plain-JAX Llama.


def llama_trainer(batch: int, length: int, tmp: str, smoke: bool) -> Trainer:
    cfg = experiments.get("llama_tiny" if smoke else "llama_1b").set(dir=tmp, progress_bar=False)
    cfg.model.lm_head = None  # Tied, as llama_1b is (llama_tiny is not).
    mixed = MixedPrecisionModifier.default_config().set(compute_dtype=jnp.bfloat16, output_dtype=jnp.bfloat16)
    cfg.model = mixed.instantiate()(cfg.model)
    cfg.input = SyntheticInput.default_config().set(
        vocab_size=cfg.model.vocab_size, global_batch_size=batch, sequence_length=length
    )
    cfg.evaluator.input = None
    # finalize applies the mesh rule of this machine, which picks the attention kernel (cuDNN on GPU).
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


def plain_llama_loss(
    params: dict[str, Any], batch: dict[str, jax.Array], *, theta: float, eps: float, implementation: str | None
) -> jax.Array:
    """A Llama written directly in JAX over axmini's parameter layout (tied embedding, scanned layers)."""
    dtype = jnp.bfloat16
    table = params["embedding"]["weight"]
    x = jnp.take(table, batch["input_ids"], axis=0).astype(dtype)

    def layer(x: jax.Array, p: dict[str, Any]) -> tuple[jax.Array, None]:
        h = _rms(x, p["attention_norm"]["scale"], eps)
        proj = p["self_attention"]["input_linear"]["inner"]
        q, k, v = (jnp.einsum("btd,dnh->btnh", h, proj[w].astype(dtype)) for w in ("q", "k", "v"))
        out = jax.nn.dot_product_attention(
            _rope(q, theta), _rope(k, theta), v, is_causal=True, implementation=implementation
        )
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


def llama(args: argparse.Namespace) -> dict[str, Any]:
    """The largest of --batches whose compiled step fits the device (checked before running it), then both steps."""
    length = 128 if args.smoke else 2048
    batches = [2] if args.smoke else args.batches[:2]
    limit = memory_stats().get("bytes_limit")
    results: dict[str, Any] = {"length": length, "device_bytes_limit": limit, "attempts": []}
    with tempfile.TemporaryDirectory() as tmp:
        for batch in batches:
            t0 = time.perf_counter()
            trainer = llama_trainer(batch, length, tmp, args.smoke)
            step = trainer.compiled_train_step()
            need = compiled_bytes(step)
            results["attempts"].append({"batch": batch, "compiled_bytes": need, "compile_s": time.perf_counter() - t0})
            print(f"llama batch {batch}: compiled step needs {need / 2**30:.1f} GiB", flush=True)
            if limit is None or need < 0.9 * limit or batch == batches[-1]:
                results.update(_llama_at(trainer, step, batch, length, args))
                break
    return results


def _llama_at(trainer: Trainer, step: Any, batch: int, length: int, args: argparse.Namespace) -> dict[str, Any]:
    kernel = find_configs(trainer.config.model, Attention.matches)[0][1].kernel.klass.__name__
    data = trainer.global_batch(next(trainer.input.batches(0)))
    state = trainer.init_state()
    params = jax.tree.map(jnp.copy, nnx.to_pure_dict(state["params"]))  # The plain step's own copy.

    def trainer_step() -> Any:
        nonlocal state
        state, metrics = step(state, data)
        return metrics

    trainer_loss = float(jax.device_get(trainer_step())[trainer._metric_names.index("loss")])
    rows = {
        "axmini_trainer": {
            "step_s": median_time(trainer_step, args.reps),
            "first_loss": trainer_loss,
            "compiled_bytes": compiled_bytes(step),
            "runtime_peak_bytes_so_far": memory_stats().get("peak_bytes_in_use"),
            "attention_kernel": kernel,
        }
    }
    del state

    learner = trainer.learner
    tx = optax.chain(
        optax.clip_by_global_norm(learner.config.max_grad_norm),
        learner.config.optimizer.instantiate(learning_rate=learner.schedule, mask=learner.decay_mask),
    )
    model_cfg = trainer.config.model
    rope = model_cfg.stack.layer.self_attention.input_linear
    implementation = "cudnn" if jax.devices()[0].platform == "gpu" else None

    def update(params: Any, opt_state: Any, batch: Any) -> Any:
        loss_fn = lambda p: plain_llama_loss(
            p, batch, theta=rope.theta, eps=model_cfg.stack.layer.norm.eps, implementation=implementation
        )
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    holder = {"params": params, "opt_state": tx.init(params)}
    plain = jax.jit(update, donate_argnums=(0, 1)).lower(holder["params"], holder["opt_state"], data).compile()

    def plain_step() -> Any:
        holder["params"], holder["opt_state"], loss = plain(holder["params"], holder["opt_state"], data)
        return loss

    first = float(plain_step())
    rows["plain_jax"] = {
        "step_s": median_time(plain_step, args.reps),
        "first_loss": first,
        "compiled_bytes": compiled_bytes(plain),
        "runtime_peak_bytes_so_far": memory_stats().get("peak_bytes_in_use"),
        "attention_kernel": f"jax.nn.dot_product_attention(implementation={implementation!r})",
    }
    tokens = batch * length
    flops = trainer.flops_per_token * tokens
    peaks = {"datasheet": datasheet_peak(), "measured": args.measured_peak}
    for row in rows.values():
        row["tokens_per_s"] = tokens / row["step_s"]
        for label, peak in peaks.items():
            row[f"mfu_{label}"] = flops / row["step_s"] / peak if peak else None
    return {
        "batch": batch,
        "params": trainer.num_params,
        "flops_per_token": trainer.flops_per_token,
        "flops_per_step": flops,
        "rows": rows,
        "ratio_axmini_vs_plain_jax": rows["axmini_trainer"]["step_s"] / rows["plain_jax"]["step_s"],
        "losses_agree": bool(np.isclose(first, trainer_loss, rtol=2e-2, atol=1e-2)),
    }


# ----------------------------------------------------------------------------------------------------
# 4. Attention kernels.


def attention(args: argparse.Namespace) -> list[dict[str, Any]]:
    lengths = [128, 256, 512] if args.smoke else [2048, 8192, 32768]
    return [row for length in lengths for row in _attention_at(length, args)]


def _attention_at(length: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    heads, kv_heads, head_dim = (4, 2, 32) if args.smoke else (16, 8, 128)
    tokens = 512 if args.smoke else 32768
    batch = max(1, tokens // length)
    q, k, v = qkv(batch, length, heads, kv_heads, head_dim)
    limit = memory_stats().get("bytes_limit") or 2**40
    full_logits = batch * heads * length * length * 4  # The [B,H,T,T] float32 logits of the full-mask kernels.
    window = 64 if args.smoke else 512
    cudnn = CudnnKernel.default_config()
    kernels = {
        "reference": (ReferenceKernel.default_config(), None, length <= 2048),
        "xla": (XLAKernel.default_config(), None, length <= 8192),
        "cudnn": (cudnn, None, True),
        f"cudnn_window_{window}": (cudnn, window, True),
        f"xla_blocked_window_{window}": (XLAKernel.default_config().set(window_block_size=window), window, True),
    }
    rows = []
    for name, (kernel_cfg, w, wanted) in kernels.items():
        row: dict[str, Any] = {"length": length, "batch": batch, "kernel": name}
        kernel = kernel_cfg.instantiate()
        mask = causal_mask(batch, length, w)
        reason = getattr(kernel, "unsupported_reason", lambda *a, **k: None)(q, k, v, mask)
        if reason is not None:
            row["skipped"] = reason
        elif not wanted or (w is None and "cudnn" not in name and 3 * full_logits > limit):
            row["skipped"] = "its [B,H,T,T] logits would not fit, or a faster kernel covers this length"
        else:
            try:
                loss = lambda q, k, v, kernel=kernel, mask=mask: jnp.sum(kernel(q, k, v, mask).astype(jnp.float32))
                grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()
                seconds = median_time(lambda grad=grad: grad(q, k, v), args.reps)
                # Score and value matmuls over the keys each query sees; forward (2 matmuls) + backward (5): x 3.5.
                flops = 4 * batch * heads * head_dim * length * keys_per_query(length, w) * 3.5
                row.update(fwd_bwd_s=seconds, tflops=flops / seconds / 1e12, compiled_bytes=compiled_bytes(grad))
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        rows.append(row)
        print(f"attention {length} {name}: {row.get('fwd_bwd_s', row.get('error', row.get('skipped')))}", flush=True)
    return rows


# ----------------------------------------------------------------------------------------------------
# 5. MoE vs dense.


def moe(args: argparse.Namespace) -> list[dict[str, Any]]:
    dim, hidden, experts, top_k = (64, 128, 8, 2) if args.smoke else (2048, 4096, 8, 2)
    batch, length = (2, 64) if args.smoke else (8, 2048)
    moe_cfg = MoE.default_config().set(input_dim=dim, hidden_dim=hidden, num_experts=experts)

    def gating(factor: float) -> TopKGating.Config:
        return TopKGating.default_config().set(top_k=top_k, train_capacity_factor=factor)

    configs = {
        "dense": FeedForward.default_config().set(input_dim=dim, hidden_dim=top_k * hidden),
        "moe_einsum_cf2": moe_cfg.clone(dispatch=MoEDispatch.EINSUM, gating=gating(2.0)),
        "moe_gather_cf2": moe_cfg.clone(dispatch=MoEDispatch.GATHER, gating=gating(2.0)),
        "moe_gather_cf1.25": moe_cfg.clone(dispatch=MoEDispatch.GATHER, gating=gating(1.25)),
        "moe_grouped": moe_cfg.clone(dispatch=MoEDispatch.GROUPED, gating=gating(2.0)),
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
        print(f"moe {name}: {row.get('fwd_bwd_s', row.get('error'))}", flush=True)
    dense = next((r["fwd_bwd_s"] for r in rows if r["layer"] == "dense" and "fwd_bwd_s" in r), None)
    for row in rows:
        if dense and "fwd_bwd_s" in row:
            row["ratio_to_dense"] = row["fwd_bwd_s"] / dense
    return rows


# ----------------------------------------------------------------------------------------------------


def _gib(value: int | None) -> str:
    return f"{value / 2**30:.1f}" if value else "-"


def _table(results: dict[str, Any]) -> str:
    lines = []
    m = results.get("machine", {})
    if "device_kind" in m:
        lines.append(
            f"{m['device_kind']}: jax {m['jax']}, measured bf16 matmul {m['measured_matmul_bf16_flops'] / 1e12:.0f} "
            "TFLOP/s"
        )
    for r in results.get("kernels_agree", []) if isinstance(results.get("kernels_agree"), list) else []:
        value = f"relative difference {r['relative_difference']:.2g}" if "agrees" in r else r.get("error", "")[:80]
        fallback = f" (falls back: {r['falls_back_because']})" if r.get("falls_back_because") else ""
        lines.append(f"kernels agree {r['case']:<34} {r['kernel']:<16} {value}{fallback}")
    ll = results.get("llama_1b", {})
    if "rows" in ll:
        lines.append(f"llama_1b, batch {ll['batch']} x {ll['length']}, {ll['params']:,} params:")
        header = f"  {'step':<16}{'ms':>9}{'tokens/s':>12}{'MFU (datasheet)':>17}{'MFU (measured)':>16}"
        lines.append(header + f"{'compiled GiB':>14}  attention")
        for name, r in ll["rows"].items():
            mfu_d = f"{r['mfu_datasheet']:.1%}" if r.get("mfu_datasheet") else "-"
            mfu_m = f"{r['mfu_measured']:.1%}" if r.get("mfu_measured") else "-"
            lines.append(
                f"  {name:<16}{r['step_s'] * 1e3:>9.1f}{r['tokens_per_s']:>12,.0f}{mfu_d:>17}{mfu_m:>16}"
                f"{_gib(r['compiled_bytes']):>14}  {r['attention_kernel']}"
            )
        lines.append(
            f"  axmini / plain JAX {ll['ratio_axmini_vs_plain_jax']:.3f}; first losses agree: {ll['losses_agree']}"
        )
    elif ll:
        lines.append(f"llama_1b: {ll.get('error') or ll.get('attempts')}")
    for r in results.get("attention", []) if isinstance(results.get("attention"), list) else []:
        if "fwd_bwd_s" in r:
            value = f"{r['fwd_bwd_s'] * 1e3:9.2f} ms {r['tflops']:7.1f} TFLOP/s {_gib(r['compiled_bytes']):>6} GiB"
        else:
            value = (r.get("error") or f"skipped: {r.get('skipped')}")[:90]
        lines.append(f"attention T={r['length']:<6} {r['kernel']:<24} {value}")
    for r in results.get("moe", []) if isinstance(results.get("moe"), list) else []:
        value = (
            f"{r['fwd_bwd_s'] * 1e3:9.2f} ms {r['tokens_per_s']:>12,.0f} tok/s x{r.get('ratio_to_dense', 0):.2f} dense"
            if "fwd_bwd_s" in r
            else r["error"][:80]
        )
        lines.append(f"moe {r['layer']:<18} {value}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/accelerator.json")
    parser.add_argument("--sections", default="machine,kernels_agree,llama_1b,attention,moe")
    parser.add_argument(
        "--batches", type=int, nargs="+", default=[16, 8], help="llama_1b batches, largest first (two at most)"
    )
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="toy sizes, to check the script on CPU")
    args = parser.parse_args()
    args.measured_peak = None
    sections: dict[str, Callable[[argparse.Namespace], Any]] = {
        "machine": machine,
        "kernels_agree": kernels_agree,
        "llama_1b": llama,
        "attention": attention,
        "moe": moe,
    }
    results: dict[str, Any] = {"instance_type": instance_type(detect_instance_type()).name, "seconds": {}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.sections.split(","):
        start = time.perf_counter()
        try:
            results[name] = sections[name](args)
        except Exception as e:
            results[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        results["seconds"][name] = time.perf_counter() - start
        print(f"== {name}: {results['seconds'][name]:.1f} s", flush=True)
        if name == "machine" and "measured_matmul_bf16_flops" in results[name]:
            args.measured_peak = results[name]["measured_matmul_bf16_flops"]
        out.write_text(json.dumps(results, indent=2, default=str))  # After every section: partial runs still count.
    print(_table(results))
    peak = memory_stats().get("peak_bytes_in_use")
    print(f"wrote {out}; peak memory {math.nan if peak is None else peak / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
