"""Running a model over calibration batches: the loss contract, mean summaries, summed gradients, mean loss.

Every pruning criterion that looks at data reads it through here: a model's sown summaries (expert load, unit
activations...) averaged over the batches, or its loss gradients accumulated over them. `loss_fn(model, batch)`
returns the scalar loss; the default is the Decoder contract `model(batch) -> (loss, metrics)`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import flax.nnx as nnx
import jax
import numpy as np

from axmini.module import capture_aux

Batch = Mapping[str, jax.Array]
LossFn = Callable[[nnx.Module, Batch], jax.Array]


def decoder_loss(model: nnx.Module, batch: Batch) -> jax.Array:
    """The loss of a model with the Decoder contract: `model(batch) -> (loss, metrics)`."""
    return model(batch)[0]


def flat(state: nnx.State) -> dict[str, nnx.Variable]:
    """{"stack/layers/feed_forward/wo": variable} of a state."""
    return {"/".join(map(str, path)): v for path, v in nnx.to_flat_state(state)}


def _none_left(count: int, who: str) -> None:
    if not count:
        raise ValueError(f"{who}: no calibration batches")


def mean_summaries(
    model: nnx.Module, batches: Iterable[Batch], *, loss_fn: LossFn = decoder_loss
) -> dict[str, np.ndarray]:
    """{module path/name: value} of every Summary the model sows, averaged over `batches` (float64)."""

    @nnx.jit
    def summaries(model: nnx.Module, batch: Batch) -> dict[str, jax.Array]:
        return capture_aux(loss_fn, model, batch).summaries

    totals: dict[str, np.ndarray] = {}
    count = 0
    for batch in batches:
        for name, value in summaries(model, batch).items():
            totals[name] = totals.get(name, 0.0) + np.asarray(value, np.float64)
        count += 1
    _none_left(count, "mean_summaries")
    return {name: total / count for name, total in totals.items()}


def accumulate_gradients(
    model: nnx.Module,
    batches: Iterable[Batch],
    accumulate: Callable[[dict[str, nnx.Variable]], None],
    *,
    loss_fn: LossFn = decoder_loss,
) -> None:
    """Calls `accumulate({param path: gradient})` with each batch's d(loss)/d(params)."""

    @nnx.jit
    def grads(model: nnx.Module, batch: Batch) -> nnx.State:
        return nnx.grad(lambda m: capture_aux(loss_fn, m, batch).output)(model)

    count = 0
    for batch in batches:
        accumulate(flat(grads(model, batch)))
        count += 1
    _none_left(count, "accumulate_gradients")


def evaluate(model: nnx.Module, batches: Iterable[Batch], *, loss_fn: LossFn = decoder_loss) -> float:
    """The mean loss over `batches` (compare a model before and after pruning)."""
    loss = nnx.jit(lambda m, b: capture_aux(loss_fn, m, b).output)
    values = [float(loss(model, batch)) for batch in batches]
    _none_left(len(values), "evaluate")
    return float(np.mean(values))
