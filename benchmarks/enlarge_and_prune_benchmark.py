"""Enlarge-and-prune against the same model trained from scratch on the same tokens (the embedded corpus, on CPU).

Runs the experiments `enlarge_and_prune_tiny` (a model twice as wide trained for half the run, pruned to
`tiny_decoder`'s shape in three rounds, recovered with distillation from the enlarged model) and
`enlarge_and_prune_tiny_scratch` (`tiny_decoder` from scratch: same batches, same schedule, same token budget),
each from a fresh run directory, and compares their validation losses in one table: the final loss of each, the
difference, the deployed parameters and the training FLOPs (6 x parameters per token trained, plus the teacher's
forward, 2 x its parameters per token, while distilling). Writes the table's data and both validation curves to
benchmarks/results/enlarge_and_prune.json and plots the curves (with the pruned model's loss right after each round)
to benchmarks/results/enlarge_and_prune.png.

    python benchmarks/enlarge_and_prune_benchmark.py
    python benchmarks/enlarge_and_prune_benchmark.py --max-step 300   # a shorter run, prune steps scaled alike
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from axmini import experiments
from axmini.module import build_abstract, count_params
from axmini.pruning.enlarge_and_prune import EnlargeAndPruneTrainer
from axmini.trainer.finalize import finalize

PIPELINE, SCRATCH = "enlarge_and_prune_tiny", "enlarge_and_prune_tiny_scratch"
RESULTS = Path(__file__).parent / "results"


def config(name: str, run_dir: Path, max_step: int | None) -> Any:
    cfg = experiments.get(name).set(dir=str(run_dir))
    if max_step is not None:
        scale = max_step / cfg.max_step
        if isinstance(cfg, EnlargeAndPruneTrainer.Config):
            cfg.prune_steps = [round(step * scale) for step in cfg.prune_steps]
        cfg.set(max_step=max_step)
        cfg.evaluator.every_n_steps = max(1, round(cfg.evaluator.every_n_steps * scale))
    return cfg


def train_flops(trainer: Any) -> float:
    """6N per trained token of each stage's model, plus 2N per token for a distilling stage's teacher forward."""
    tokens_per_step = trainer.config.input.global_batch_size * trainer.config.input.sequence_length
    stages = getattr(trainer, "stages", None)
    if stages is None:
        return 6.0 * trainer.num_params * trainer.config.max_step * tokens_per_step
    flops = 0.0
    for stage in stages:
        model = stage.trainer.config.model
        per_token = 6.0 * count_params(build_abstract(stage.student))
        if hasattr(model, "teacher"):
            per_token += 2.0 * count_params(build_abstract(model.teacher))
        flops += per_token * (stage.end - stage.start) * tokens_per_step
    return flops


def run(name: str, args: argparse.Namespace) -> dict[str, Any]:
    run_dir = args.runs / name
    shutil.rmtree(run_dir, ignore_errors=True)  # A fresh run: the comparison is between whole runs.
    trainer = finalize(config(name, run_dir, args.max_step)).instantiate()
    start = time.perf_counter()
    result = trainer.run()
    seconds = time.perf_counter() - start
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final_model = trainer.model(result.state)
    return {
        "experiment": name,
        "final_eval_loss": result.eval_metrics["loss"],
        "unigram_entropy": result.eval_metrics["unigram_entropy"],
        "deployed_params": count_params(final_model),
        "train_flops": train_flops(trainer),
        "tokens": trainer.config.max_step
        * trainer.config.input.global_batch_size
        * trainer.config.input.sequence_length,
        "wall_s": seconds,
        "eval_curve": [(r["step"], r["eval/loss"]) for r in records if "eval/loss" in r],
        "pruned_loss": [(r["step"], r["pruned/loss"]) for r in records if "pruned/loss" in r],
        "prune_steps": list(getattr(trainer.config, "prune_steps", [])),
    }


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 5))
    for row, color in zip(rows, ("tab:red", "tab:blue")):
        steps, losses = zip(*row["eval_curve"])
        ax.plot(steps, losses, "o-", color=color, markersize=3, label=f"{row['experiment']} (validation loss)")
        if row["pruned_loss"]:
            p_steps, p_losses = zip(*row["pruned_loss"])
            ax.plot(p_steps, p_losses, "x", color=color, markersize=8, label="right after a pruning round")
        for step in row["prune_steps"]:
            ax.axvline(step, color=color, alpha=0.2, linestyle="--")
    ax.set_xlabel("step (same batches for both)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("enlarge-and-prune vs the target model from scratch, same tokens")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-step", type=int, default=None, help="shorter (or longer) runs; prune steps scale")
    parser.add_argument("--runs", type=Path, default=Path("runs/enlarge_and_prune_benchmark"))
    parser.add_argument("--out", type=Path, default=RESULTS / "enlarge_and_prune.json")
    args = parser.parse_args()

    rows = [run(PIPELINE, args), run(SCRATCH, args)]
    pruned, scratch = rows
    print(f"{'run':<32} {'final val loss':>14} {'params':>9} {'train GFLOP':>12} {'tokens':>9} {'wall s':>7}")
    for r in rows:
        print(
            f"{r['experiment']:<32} {r['final_eval_loss']:>14.4f} {r['deployed_params']:>9,} "
            f"{r['train_flops'] / 1e9:>12.1f} {r['tokens']:>9,} {r['wall_s']:>7.0f}"
        )
    difference = pruned["final_eval_loss"] - scratch["final_eval_loss"]
    verdict = "beats" if difference < 0 else "does NOT beat"
    print(
        f"the pruned model {verdict} the same-size model from scratch: {difference:+.4f} nats/token "
        f"({pruned['train_flops'] / scratch['train_flops']:.2f}x the training FLOPs, same tokens)"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    setup = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    machine = {"devices": str(jax.devices()), "cpus": os.cpu_count(), "platform": platform.platform()}
    summary = {"loss_difference": difference, "flops_ratio": pruned["train_flops"] / scratch["train_flops"]}
    args.out.write_text(json.dumps({"setup": setup, "machine": machine, "summary": summary, "rows": rows}, indent=2))
    plot(rows, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
