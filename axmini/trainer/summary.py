"""Summaries: TensorBoard event files, a `metrics.jsonl` log, a progress bar, and the model FLOPs behind MFU.

`SummaryWriter.write(step, metrics)` records scalars under a prefix (`train/loss`, `eval/loss`, ...) to
TensorBoard (tensorboardX) and appends one JSON line per call to `metrics.jsonl`, which tests and scripts
read without TensorBoard. Only process 0 writes. `ProgressBar` shows step, loss and tokens/s (tqdm).
`flops_per_token` counts a model's training FLOPs, attention included; `mfu` turns a token rate into utilization.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import flax.nnx as nnx
import jax
import numpy as np

from axmini.config import REQUIRED, Configurable, Required
from axmini.layers.attention import Attention
from axmini.layers.decoder import Decoder
from axmini.layers.moe import MoE


def _size(variable: nnx.Variable) -> int:
    return math.prod(np.shape(variable.get_value()))


def keys_per_query(length: int, window: int | None) -> float:
    """The mean number of keys a query sees in causal attention over `length` tokens (a window of w: at most w + 1)."""
    span = length if window is None else min(window + 1, length)
    return (span * (span + 1) / 2 + (length - span) * span) / length


def flops_per_token(model: nnx.Module, sequence_length: int) -> float:
    """Training FLOPs per token of `model` (abstract or built) on sequences of `sequence_length`: forward plus
    backward, 3 x the forward's 2 FLOPs per multiply-add.

    - weights: 6 per parameter, except an embedding table that is only looked up (a decoder with its own lm_head),
      and a routed expert's weights count for the share of tokens each expert processes (top_k / num_experts);
    - attention: 12 x heads x head_dim x the keys a query sees on average (`keys_per_query`: about T/2 when causal,
      the window when local), for every attention layer (stacked layers counted by their leading dims). RAttention's
      linear branch is not counted.
    """
    weights = sum(_size(v) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    attention = 0.0
    for _, module in nnx.iter_modules(model):
        if isinstance(module, Decoder) and module.lm_head is not None:
            weights -= _size(module.embedding.weight)
        elif isinstance(module, MoE):
            gating = module.gating.config
            active = getattr(gating, "top_k", None) or gating.train_capacity_factor
            experts = sum(_size(getattr(module, w)) for w in ("wi_0", "wi_1", "wi", "wo") if hasattr(module, w))
            weights -= experts * (1 - active / gating.num_experts)
        elif isinstance(module, Attention):
            layers = math.prod(np.shape(module.output_linear.weight.get_value())[:-3])
            keys = keys_per_query(sequence_length, module.config.sliding_window)
            attention += 12 * module.config.num_heads * module.head_dim * keys * layers
    return 6.0 * weights + attention


def mfu(
    tokens_per_second: float, flops_per_token: float, num_chips: int, peak_flops_per_chip: float | None
) -> float | None:
    """Model FLOPs utilization: achieved model FLOP/s over the chips' peak (None when the peak is unknown)."""
    if not peak_flops_per_chip:
        return None
    return tokens_per_second * flops_per_token / (num_chips * peak_flops_per_chip)


def _step(line: str) -> float:
    """The step of a metrics.jsonl line (a line cut short by a crash counts as after every step)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


class SummaryWriter(Configurable):
    """Writes scalar metrics to TensorBoard and to `<dir>/metrics.jsonl`."""

    class Config(Configurable.Config):
        dir: Required[str] = REQUIRED  # Filled by the trainer: the trainer dir.
        tensorboard: bool = True

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self._is_writer = jax.process_index() == 0
        self._tensorboard: Any = None
        self._jsonl: Any = None
        self._start_step = 0

    def start_at(self, step: int) -> None:
        """Declares that training (re)starts after `step`: records of later steps, left by a run that crashed
        after its last checkpoint, are dropped when the files are opened, so each step is logged once and a plot
        of the logs is a single curve. Call before the first `write`."""
        self._start_step = step

    def _open(self) -> None:
        path = Path(self.config.dir)
        path.mkdir(parents=True, exist_ok=True)
        jsonl = path / "metrics.jsonl"
        if jsonl.exists():
            kept = [line for line in jsonl.read_text(encoding="utf-8").splitlines() if _step(line) <= self._start_step]
            jsonl.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
        self._jsonl = open(jsonl, "a", encoding="utf-8")
        if self.config.tensorboard:
            from tensorboardX import SummaryWriter as TensorBoardWriter

            # TensorBoard hides events at or after purge_step from earlier files of the same run.
            self._tensorboard = TensorBoardWriter(str(path / "tensorboard"), purge_step=self._start_step + 1)

    def write(self, step: int, metrics: dict[str, float], prefix: str = "train") -> None:
        """Records `metrics` at `step` as `<prefix>/<name>` (non-finite values are kept as strings in JSON)."""
        if not self._is_writer:
            return
        if self._jsonl is None:
            self._open()
        record: dict[str, Any] = {"step": step}
        for name, value in metrics.items():
            value = float(value)
            record[f"{prefix}/{name}"] = value if math.isfinite(value) else str(value)
            if self._tensorboard is not None:
                self._tensorboard.add_scalar(f"{prefix}/{name}", value, step)
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None


class ProgressBar:
    """A tqdm bar over steps showing loss and tokens/s (process 0 only; silent when disabled)."""

    def __init__(self, start: int, total: int, *, enabled: bool = True):
        from tqdm import tqdm

        self._bar = tqdm(
            initial=start,
            total=total,
            unit="step",
            dynamic_ncols=True,
            mininterval=0.5,
            disable=not enabled or jax.process_index() != 0,
        )

    def update(self, step: int, loss: float, tokens_per_second: float) -> None:
        self._bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_second:,.0f}", refresh=False)
        self._bar.update(step - self._bar.n)

    def close(self) -> None:
        self._bar.close()
