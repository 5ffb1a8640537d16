"""A short fine-tune of a pruned model: the correction steps of pruning recipes (MC-Suite's lottery fine-tuning
between rounds, its instruction-following recovery after the last one).

`fine_tune(model, FineTuning(batches, steps, optimizer))` trains the model in place with optax, cycling over the
batches; the loss is the model's plus every aux loss it sows (MoE load balance...), as in the trainer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import optax

from axmini.module import capture_aux
from axmini.pruning.calibration import Batch, LossFn, decoder_loss


class FineTuning(NamedTuple):
    """`steps` optimizer steps over `batches` (cycled: step i uses batch i mod len(batches))."""

    batches: Sequence[Batch]
    steps: int
    optimizer: optax.GradientTransformation = optax.adamw(1e-4, weight_decay=0.0)


def fine_tune(model: nnx.Module, tuning: FineTuning, *, loss_fn: LossFn = decoder_loss) -> list[float]:
    """Trains `model`'s parameters in place; returns the loss of each step (before its update)."""
    if tuning.steps < 0 or (tuning.steps and not tuning.batches):
        raise ValueError(f"fine_tune: steps={tuning.steps} must be >= 0, with batches to train on")
    optimizer = nnx.Optimizer(model, tuning.optimizer, wrt=nnx.Param)

    @nnx.jit
    def step(model: nnx.Module, optimizer: nnx.Optimizer, batch: Batch) -> jax.Array:
        def total(model: nnx.Module) -> jax.Array:
            captured = capture_aux(loss_fn, model, batch)
            return captured.output + sum(captured.losses.values(), jnp.zeros((), jnp.float32))

        loss, grads = nnx.value_and_grad(total)(model)
        optimizer.update(model, grads)
        return loss

    return [float(step(model, optimizer, tuning.batches[i % len(tuning.batches)])) for i in range(tuning.steps)]
