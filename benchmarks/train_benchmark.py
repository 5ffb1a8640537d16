"""Train-step speed: the axmini Trainer against a hand-written jax + optax loop of the identical model.

Cases: `tiny` (the README's experiment, 2 layers, width 128, vocab 2k, batch 16 x 128) and `mid` (4 layers, width
256, vocab 32k, batch 8 x 256). For each it builds the Trainer on one device, and a plain loop doing the same work:
the same model and loss (nnx.merge + Decoder.__call__; the metrics it drops are dead code to XLA), the same optax
chain (global-norm clipping + AdamW with the same weight-decay mask and schedule), a jitted
`value_and_grad -> tx.update -> apply_updates` step with donated buffers, fetching the loss every step as the
trainer fetches its metrics. Both get the same batches (synthetic tokens, already in memory, so input speed is not
measured), start from the same parameters, and are timed alternately, step by step, so that load from other
processes hits both alike; the load average is recorded, and the ratio of CPU times is reported beside the wall-time
ratio. Side by side: median step times, the ratio trainer / plain (goal
<= 1.02), and XLA's cost analysis of both compiled steps (FLOPs, bytes accessed); the losses must agree.

    python benchmarks/train_benchmark.py [--steps 20] [--rounds 5] [--out benchmarks/results/train.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from axmini import experiments
from axmini.experiments.decoders import DecoderShape, decoder_config
from axmini.trainer.finalize import finalize
from axmini.trainer.input import SyntheticInput
from axmini.trainer.trainer import Trainer

# case -> (model shape, global batch, sequence length); a shape of None keeps the `tiny` experiment's model.
CASES: dict[str, tuple[DecoderShape | None, int, int]] = {
    "tiny": (None, 16, 128),
    "mid": (DecoderShape(32000, 256, 4, 4, 4, 704, tied_embeddings=True), 8, 256),
}


def trainer_config(name: str, tmp: str) -> Trainer.Config:
    shape, batch, length = CASES[name]
    cfg = experiments.get("tiny").set(dir=tmp, progress_bar=False)
    if shape is not None:
        cfg.model = decoder_config(shape)
    cfg.input = SyntheticInput.default_config().set(
        vocab_size=cfg.model.vocab_size, global_batch_size=batch, sequence_length=length
    )
    cfg.evaluator.input = None
    return finalize(cfg)


def cost(compiled: Any) -> dict[str, float]:
    """XLA's cost analysis of a compiled step: FLOPs and bytes accessed."""
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    return {"flops": analysis["flops"], "bytes_accessed": analysis["bytes accessed"]}


def plain_step_fn(trainer: Trainer, graphdef: Any, rest: Any) -> Any:
    """The hand-written step: same model, same optax chain, nothing else."""
    learner = trainer.learner
    tx = optax.chain(
        optax.clip_by_global_norm(learner.config.max_grad_norm),
        learner.config.optimizer.instantiate(learning_rate=learner.schedule, mask=learner.decay_mask),
    )

    def loss_fn(params: Any, batch: dict[str, jax.Array]) -> jax.Array:
        return nnx.merge(graphdef, params, rest)(batch)[0]

    def step(params: Any, opt_state: Any, batch: dict[str, jax.Array]) -> tuple[Any, Any, jax.Array]:
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return tx, jax.jit(step, donate_argnums=(0, 1))


def bench(name: str, steps: int, rounds: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        trainer = trainer_config(name, tmp).instantiate(devices=jax.devices()[:1])
        batches = [trainer.global_batch(b) for b, _ in zip(trainer.input.batches(0), range(steps))]

        t0 = time.perf_counter()
        state = trainer.init_state()
        trainer.compiled_train_step()
        trainer_compile = time.perf_counter() - t0

        graphdef, params, rest = nnx.split(trainer.model(state), nnx.Param, ...)
        params = jax.tree.map(jnp.copy, params)  # Own buffers: the trainer's state is donated.
        t0 = time.perf_counter()
        tx, plain_step = plain_step_fn(trainer, graphdef, rest)
        opt_state = tx.init(params)
        plain_compiled = plain_step.lower(params, opt_state, batches[0]).compile()
        plain_compile = time.perf_counter() - t0
        load = [os.getloadavg()[0]]

        trainer_times: list[float] = []
        plain_times: list[float] = []
        trainer_losses: list[float] = []
        plain_losses: list[float] = []
        trainer_cpu: list[float] = []
        plain_cpu: list[float] = []
        for _ in range(rounds):  # Steps alternate one by one, so that both meet the same load.
            for batch in batches:
                t, c = time.perf_counter(), time.process_time()
                state, metrics = trainer.train_step(state, batch)
                trainer_losses.append(float(jax.device_get(metrics)["loss"]))
                trainer_times.append(time.perf_counter() - t)
                trainer_cpu.append(time.process_time() - c)
                t, c = time.perf_counter(), time.process_time()
                params, opt_state, loss = plain_step(params, opt_state, batch)
                plain_losses.append(float(loss))
                plain_times.append(time.perf_counter() - t)
                plain_cpu.append(time.process_time() - c)
            load.append(os.getloadavg()[0])
        batch_size, length = batches[0]["input_ids"].shape
        trainer_s, plain_s = statistics.median(trainer_times), statistics.median(plain_times)
        return {
            "experiment": name,
            "params": trainer.num_params,
            "batch": batch_size,
            "length": length,
            "trainer_compile_s": trainer_compile,
            "plain_compile_s": plain_compile,
            "trainer_step_s": trainer_s,
            "plain_step_s": plain_s,
            "trainer_tokens_per_s": batch_size * length / trainer_s,
            "plain_tokens_per_s": batch_size * length / plain_s,
            "ratio": trainer_s / plain_s,
            # CPU time of this process (all its threads) per step: less sensitive to other processes' load.
            "ratio_cpu_time": statistics.median(trainer_cpu) / statistics.median(plain_cpu),
            "trainer_cost": cost(trainer.compiled_train_step()),
            "plain_cost": cost(plain_compiled),
            "load_average_1min": load,
            "first_loss_trainer": trainer_losses[0],
            "first_loss_plain": plain_losses[0],
            "losses_agree": bool(np.allclose(trainer_losses[:steps], plain_losses[:steps], rtol=1e-4, atol=1e-5)),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="steps per round for each loop")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated experiment names")
    parser.add_argument("--out", default="benchmarks/results/train.json")
    args = parser.parse_args()

    rows = []
    for name in args.cases.split(","):
        rows.append(bench(name, args.steps, args.rounds))
        r = rows[-1]
        print(f"{name}: trainer {r['trainer_step_s'] * 1e3:.1f} ms, plain {r['plain_step_s'] * 1e3:.1f} ms", flush=True)

    header = f"{'case':<6}{'params':>12}{'tokens/step':>13}{'trainer ms':>12}{'plain ms':>10}{'ratio':>8}{'CPU':>7}"
    header += f"{'FLOPs ratio':>13}{'bytes ratio':>13}{'load':>12}  losses agree"
    print(header)
    for r in rows:
        flops = r["trainer_cost"]["flops"] / r["plain_cost"]["flops"]
        bytes_ = r["trainer_cost"]["bytes_accessed"] / r["plain_cost"]["bytes_accessed"]
        load = f"{min(r['load_average_1min']):.1f}-{max(r['load_average_1min']):.1f}"
        print(
            f"{r['experiment']:<6}{r['params']:>12,}{r['batch'] * r['length']:>13,}{r['trainer_step_s'] * 1e3:>12.1f}"
            f"{r['plain_step_s'] * 1e3:>10.1f}{r['ratio']:>8.3f}{r['ratio_cpu_time']:>7.3f}{flops:>13.4f}"
            f"{bytes_:>13.4f}{load:>12}  {r['losses_agree']}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = {"platform": platform.platform(), "device": str(jax.devices()[0]), "cpu_count": os.cpu_count()}
    out.write_text(
        json.dumps({"machine": machine, "steps": args.steps, "rounds": args.rounds, "results": rows}, indent=2)
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
