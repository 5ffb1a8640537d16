"""Periodic evaluation: the weighted mean loss over the evaluation input, and the unigram baseline.

The evaluation batches are read once and kept in memory (evaluation sets are small), so every evaluation
sees the same tokens. With several processes, each pads its list of batches to the longest one (padding
rows have weight 0), so every process runs the same number of steps. The unigram entropy of the
evaluation targets, -sum p(t) log p(t) in nats, is the loss of the best context-free model: a trained
model's evaluation loss must be clearly below it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from axmini.config import Configurable, ConfigValueError, check_positive, config_path
from axmini.module import capture_aux
from axmini.trainer.input import BATCH_KEYS, Batch, Input


def unigram_entropy(batches: list[Batch]) -> float:
    """Entropy in nats of the empirical distribution of the weighted target tokens of `batches` (all processes)."""
    counts: dict[int, float] = {}
    for batch in batches:
        ids, weights = batch["target_ids"].ravel(), batch["target_weights"].ravel()
        for token, weight in zip(*np.unique(ids[weights > 0], return_counts=True)):
            counts[int(token)] = counts.get(int(token), 0.0) + float(weight)
    size = max(counts, default=0) + 1
    local = np.zeros(size, np.float64)
    for token, count in counts.items():
        local[token] = count
    if jax.process_count() > 1:
        sizes = multihost_utils.process_allgather(np.array(size))
        local = np.pad(local, (0, int(sizes.max()) - size))
        local = multihost_utils.process_allgather(local).sum(axis=0)
    total = local.sum()
    if total == 0:
        return math.nan
    p = local[local > 0] / total
    return float(-(p * np.log(p)).sum())


def loss_sums(model: Any, batch: Batch) -> dict[str, jax.Array]:
    """The model's weighted loss summed over `batch` and the sum of the weights (traceable: inside a jitted step)."""
    (loss, _), _, _ = capture_aux(lambda m, b: m(b), model, batch)
    weight_sum = batch["target_weights"].astype(jnp.float32).sum()
    return {"loss_sum": loss * weight_sum, "weight_sum": weight_sum}


class Evaluator(Configurable):
    """Every `every_n_steps` steps (and at the end), the mean loss over `num_batches` batches of `input`."""

    class Config(Configurable.Config):
        input: Input.Config | None = None  # None: no evaluation.
        every_n_steps: int = 100
        num_batches: int | None = None  # None: the whole input (it must be finite: num_epochs=1).

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        cfg = self.config
        check_positive(cfg, "every_n_steps", "num_batches")  # num_batches None: the whole input.
        if cfg.input is not None and cfg.num_batches is None and getattr(cfg.input, "num_epochs", 1) is None:
            raise ConfigValueError(
                f"{config_path(cfg.input, 'num_epochs')}=None repeats forever; set "
                f"{config_path(cfg, 'num_batches')} or {config_path(cfg.input, 'num_epochs')}=1"
            )
        self.input: Input | None = cfg.input.instantiate() if cfg.input is not None else None
        self._batches: list[Batch] | None = None
        self._unigram_entropy: float | None = None

    @property
    def enabled(self) -> bool:
        return self.input is not None

    def is_due(self, step: int) -> bool:
        return self.enabled and step % self.config.every_n_steps == 0

    def batches(self) -> list[Batch]:
        """The evaluation batches of this process (read on first use)."""
        if self._batches is None:
            assert self.input is not None
            batches = []
            for batch in self.input.batches(0):
                batches.append(batch)
                if len(batches) == self.config.num_batches:
                    break
            count = len(batches)
            if jax.process_count() > 1:
                count = int(multihost_utils.process_allgather(np.array(count)).max())
            if count == 0:
                raise ValueError("evaluator.input yielded no batch")
            self._batches = batches + [self._empty_batch()] * (count - len(batches))
        return self._batches

    def _empty_batch(self) -> Batch:
        assert self.input is not None
        shape = (self.input.local_batch_size, self.input.config.sequence_length)
        return {k: np.zeros(shape, np.float32 if k == "target_weights" else np.int32) for k in BATCH_KEYS}

    def unigram_entropy(self) -> float:
        if self._unigram_entropy is None:
            self._unigram_entropy = unigram_entropy(self.batches())
        return self._unigram_entropy

    def evaluate(self, eval_step: Callable[[Batch], dict[str, float]]) -> dict[str, float]:
        """Runs `eval_step(batch) -> {"loss_sum", "weight_sum", ...}` over the batches; the weighted mean loss."""
        loss_sum = weight_sum = 0.0
        for batch in self.batches():
            out = eval_step(batch)
            loss_sum += float(out["loss_sum"])
            weight_sum += float(out["weight_sum"])
        loss = loss_sum / weight_sum if weight_sum else math.nan
        return {"loss": loss, "num_tokens": weight_sum, "unigram_entropy": self.unigram_entropy()}
