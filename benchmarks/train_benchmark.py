"""Train-step speed: the axmini Trainer against a hand-written jax + optax loop of the identical model.

For each experiment (the default `tiny`, and `llama_100m`, ~100M parameters, at a CPU-sized batch) it builds the
Trainer on one device, and a plain loop over the same model: nnx.split once, a jitted
`value_and_grad -> optax (clip + AdamW with the same mask and schedule) -> apply_updates` step with donated
buffers, fetching the loss every step as the trainer does with its metrics. Both get the same batches (synthetic
tokens, already in memory, so input speed is not measured) and start from the same parameters, and their step
times are measured alternately, in rounds, so that load from other processes hits both alike. The table gives
median step times, tokens/s and the ratio trainer / plain (goal: within 5%); the first losses must agree.

    python benchmarks/train_benchmark.py [--steps 20] [--rounds 3] [--out benchmarks/results/train.json]
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
from axmini.trainer.finalize import finalize
from axmini.trainer.input import SyntheticInput
from axmini.trainer.trainer import Trainer

# experiment -> (global batch, sequence length) used here; None keeps the experiment's own.
CASES: dict[str, tuple[int, int] | None] = {"tiny": None, "llama_100m": (2, 256)}


def trainer_config(name: str, shape: tuple[int, int] | None, tmp: str) -> Trainer.Config:
    cfg = experiments.get(name).set(dir=tmp, progress_bar=False)
    batch, length = shape or (cfg.input.global_batch_size, cfg.input.sequence_length)
    cfg.input = SyntheticInput.default_config().set(
        vocab_size=cfg.model.vocab_size, global_batch_size=batch, sequence_length=length
    )
    cfg.evaluator.input = None
    return finalize(cfg)


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


def bench(name: str, shape: tuple[int, int] | None, steps: int, rounds: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        trainer = trainer_config(name, shape, tmp).instantiate(devices=jax.devices()[:1])
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
        plain_step.lower(params, opt_state, batches[0]).compile()
        plain_compile = time.perf_counter() - t0

        trainer_times: list[float] = []
        plain_times: list[float] = []
        trainer_losses: list[float] = []
        plain_losses: list[float] = []
        for _ in range(rounds):
            for batch in batches:
                t = time.perf_counter()
                state, metrics = trainer.train_step(state, batch)
                trainer_losses.append(float(jax.device_get(metrics)["loss"]))
                trainer_times.append(time.perf_counter() - t)
            for batch in batches:
                t = time.perf_counter()
                params, opt_state, loss = plain_step(params, opt_state, batch)
                plain_losses.append(float(loss))
                plain_times.append(time.perf_counter() - t)
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
            "first_loss_trainer": trainer_losses[0],
            "first_loss_plain": plain_losses[0],
            "losses_agree": bool(np.allclose(trainer_losses[:steps], plain_losses[:steps], rtol=1e-4, atol=1e-5)),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="steps per round for each loop")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated experiment names")
    parser.add_argument("--out", default="benchmarks/results/train.json")
    args = parser.parse_args()

    rows = []
    for name in args.cases.split(","):
        steps = args.steps if CASES.get(name) is None else max(2, args.steps // 5)
        rows.append(bench(name, CASES.get(name), steps, args.rounds))
        r = rows[-1]
        print(f"{name}: trainer {r['trainer_step_s'] * 1e3:.1f} ms, plain {r['plain_step_s'] * 1e3:.1f} ms", flush=True)

    header = f"{'experiment':<12}{'params':>12}{'tokens/step':>13}{'trainer ms':>12}{'plain ms':>10}"
    header += f"{'trainer tok/s':>15}{'plain tok/s':>13}{'ratio':>8}  losses agree"
    print(header)
    for r in rows:
        print(
            f"{r['experiment']:<12}{r['params']:>12,}{r['batch'] * r['length']:>13,}{r['trainer_step_s'] * 1e3:>12.1f}"
            f"{r['plain_step_s'] * 1e3:>10.1f}{r['trainer_tokens_per_s']:>15,.0f}{r['plain_tokens_per_s']:>13,.0f}"
            f"{r['ratio']:>8.3f}  {r['losses_agree']}"
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
