"""Expert pruning for MoE models (after MC-Suite, arXiv 2504.05586): score each expert's importance on
calibration batches, drop the least important experts of every MoE layer, return a smaller model.

Criteria (`ImportanceCriterion`): how often the router sends tokens to the expert, the norm of its
router column, the norm of its weights, the mean norm of its outputs, and the norm of the loss gradient
with respect to its weights. Pruning is one-shot (`rounds=1`) or iterative: importance is re-estimated
on the pruned model between rounds. MC-Suite's two corrections are options of `prune`:

- `lottery`: task-agnostic fine-tuning of the pruned model between rounds ("MoE Lottery Subnetworks"), so
  each re-estimation sees a model that has recovered from the previous drop;
- `recovery`: fine-tuning after the last round on instruction-following data (supervised fine-tuning; its
  batches' `target_weights` select the response tokens), which expert dropping hurts most.

The result is a config (every MoE's `num_experts` lowered) and the matching parameters: the kept
experts' weights and router columns, every other parameter unchanged. A stacked MoE layer (scanned
layers, parallel tracks) prunes each of its stacked layers separately, so shapes stay rectangular.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import flax.nnx as nnx
import jax.numpy as jnp
import numpy as np

from axmini.config import ConfigBase, find_configs, map_configs
from axmini.layers.moe import MoE
from axmini.module import build_abstract
from axmini.pruning.calibration import (
    Batch,
    LossFn,
    accumulate_gradients,
    decoder_loss,
    evaluate,
    flat,
    mean_summaries,
)
from axmini.pruning.fine_tune import FineTuning, fine_tune
from axmini.pruning.slicing import build, check_plain_weights, per_unit_sum, take_along

_EXPERT_WEIGHTS = ("wi_0", "wi_1", "wi", "wo")


class ImportanceCriterion(enum.Enum):
    """How an expert's importance is measured; a higher score means more important."""

    FREQUENCY = "frequency"  # Share of the routed (token, expert) pairs the expert processed.
    ROUTER_NORM = "router_norm"  # L2 norm of the expert's router column.
    WEIGHT_NORM = "weight_norm"  # L2 norm of all the expert's FFN weights.
    ACTIVATION_NORM = "activation_norm"  # Mean L2 norm of the expert's outputs on the tokens it processed.
    GRADIENT_NORM = "gradient_norm"  # L2 norm of d(loss)/d(expert weights), over all calibration batches.


def moe_layers(model: nnx.Module) -> dict[str, MoE]:
    """Every MoE module of `model`, by its path ("stack/layers/feed_forward")."""
    return {"/".join(map(str, path)): m for path, m in nnx.iter_modules(model) if isinstance(m, MoE)}


def _expert_axis(param: nnx.Param) -> int:
    return list(param.get_metadata()["axes"]).index("expert")


def _join(path: str, name: str) -> str:
    return f"{path}/{name}" if path else name


def _per_expert_sum_of_squares(values: Iterable[tuple[Any, int]]) -> np.ndarray:
    """Sum of squares of each expert's slice, over (array, expert axis) pairs: [..., E]. The dims before
    the expert axis are stacked layers (or tracks) and are kept."""
    return np.asarray(sum(per_unit_sum(np.square(value, dtype=np.float64), axis, axis) for value, axis in values))


def _expert_weights(layer: MoE) -> dict[str, nnx.Param]:
    return {name: getattr(layer, name) for name in _EXPERT_WEIGHTS if isinstance(getattr(layer, name, None), nnx.Param)}


def expert_importance(
    model: nnx.Module,
    batches: Iterable[Batch],
    criterion: ImportanceCriterion,
    *,
    loss_fn: LossFn = decoder_loss,
) -> dict[str, np.ndarray]:
    """{MoE path: scores [..., E]}: one score per expert of each (stacked) MoE layer."""
    layers = moe_layers(model)
    if not layers:
        raise ValueError("expert_importance: the model has no MoE layer; apply MoEModifier first")
    if criterion is ImportanceCriterion.ROUTER_NORM:
        return {path: np.linalg.norm(np.asarray(m.router[...]), axis=-2) for path, m in layers.items()}
    if criterion is ImportanceCriterion.WEIGHT_NORM:
        return {
            path: np.sqrt(_per_expert_sum_of_squares((w[...], _expert_axis(w)) for w in _expert_weights(m).values()))
            for path, m in layers.items()
        }
    if criterion is ImportanceCriterion.GRADIENT_NORM:
        return _gradient_norms(model, layers, batches, loss_fn)
    summary = "expert_load" if criterion is ImportanceCriterion.FREQUENCY else "expert_output_norm"
    return _mean_summaries(model, layers, batches, loss_fn, summary)


def _mean_summaries(
    model: nnx.Module, layers: dict[str, MoE], batches: Iterable[Batch], loss_fn: LossFn, name: str
) -> dict[str, np.ndarray]:
    summaries = mean_summaries(model, batches, loss_fn=loss_fn)
    return {path: summaries[_join(path, name)] for path in layers}


def _gradient_norms(
    model: nnx.Module, layers: dict[str, MoE], batches: Iterable[Batch], loss_fn: LossFn
) -> dict[str, np.ndarray]:
    squares: dict[str, np.ndarray] = {}

    def add(grads: dict[str, nnx.Variable]) -> None:
        for path, layer in layers.items():
            values = (
                (grads[_join(path, name)].get_value(), _expert_axis(w)) for name, w in _expert_weights(layer).items()
            )
            squares[path] = squares.get(path, 0.0) + _per_expert_sum_of_squares(values)

    accumulate_gradients(model, batches, add, loss_fn=loss_fn)
    return {path: np.sqrt(total) for path, total in squares.items()}


# ----------------------------------------------------------------------------------------------------
# Dropping experts.


class PruneResult(NamedTuple):
    config: ConfigBase  # The model config with every MoE's num_experts lowered.
    state: nnx.State  # Parameters matching `config` (the kept experts' weights).
    kept: dict[str, np.ndarray]  # {MoE path: [..., E_new] original indices of the kept experts}

    def build(self) -> nnx.Module:
        """The pruned model."""
        return build(self.config, self.state)


def drop_experts(cfg: ConfigBase, model: nnx.Module, scores: Mapping[str, np.ndarray], num: int) -> PruneResult:
    """Drops the `num` lowest-scoring experts of every MoE layer (ties: the lower index goes first)."""
    layers = moe_layers(model)
    _check_prunable(cfg, num)
    kept = {}
    for path, layer in layers.items():
        score = np.asarray(scores[path])
        if score.shape[-1] != layer.config.num_experts:
            raise ValueError(f"drop_experts: scores of {path} have shape {score.shape}, not [..., num_experts]")
        order = np.argsort(score, axis=-1, kind="stable")
        kept[path] = np.sort(order[..., num:], axis=-1)
    new_cfg = map_configs(cfg, MoE, lambda c: c.set(num_experts=c.num_experts - num))
    return PruneResult(new_cfg, _select_experts(model, new_cfg, layers, kept), kept)


def _check_prunable(cfg: ConfigBase, num: int) -> None:
    check_plain_weights(cfg)
    if num < 0:
        raise ValueError(f"prune: num_to_prune={num} must be >= 0")
    for path, moe in find_configs(cfg, MoE):
        left = moe.num_experts - num
        top_k = getattr(moe.gating, "top_k", 1)
        if left < max(1, top_k):
            raise ValueError(
                f"prune: {path or 'moe'}.num_experts={moe.num_experts} minus num_to_prune={num} leaves {left} "
                f"experts, fewer than {path + '.' if path else ''}gating.top_k={top_k}; prune fewer experts"
            )


def _select_experts(
    model: nnx.Module, new_cfg: ConfigBase, layers: dict[str, MoE], kept: dict[str, np.ndarray]
) -> nnx.State:
    _, abstract_state = nnx.split(build_abstract(new_cfg))
    old = flat(nnx.state(model, nnx.Not(nnx.Intermediate)))
    selected = []
    for path, variable in nnx.to_flat_state(abstract_state):
        key = "/".join(map(str, path))
        layer_path, _, name = key.rpartition("/")
        value = old[key].get_value()
        if layer_path in layers and name == "router":
            value = take_along(value, kept[layer_path], np.ndim(value) - 1)
        elif layer_path in layers and name in _EXPERT_WEIGHTS:
            value = take_along(value, kept[layer_path], _expert_axis(old[key]))
        expected = tuple(variable.get_value().shape)
        if tuple(np.shape(value)) != expected:
            raise ValueError(f"prune: {key} has shape {np.shape(value)}; the pruned config expects {expected}")
        selected.append((path, old[key].replace(jnp.asarray(value))))
    return nnx.from_flat_state(selected)


def prune(
    cfg: ConfigBase,
    model: nnx.Module,
    batches: Iterable[Batch],
    *,
    num_to_prune: int,
    criterion: ImportanceCriterion = ImportanceCriterion.FREQUENCY,
    rounds: int = 1,
    lottery: FineTuning | None = None,
    recovery: FineTuning | None = None,
    loss_fn: LossFn = decoder_loss,
) -> PruneResult:
    """Drops `num_to_prune` experts from every MoE layer of `model` (built from `cfg`).

    With `rounds > 1` it drops them in that many steps (as evenly as possible), re-estimating importance
    on the pruned model before each step. `batches` is re-iterated every round: pass a list. `lottery`
    fine-tunes the pruned model after every round but the last; `recovery` fine-tunes it after the last.
    """
    if rounds < 1 or rounds > max(num_to_prune, 1):
        raise ValueError(f"prune: rounds={rounds} must be in [1, num_to_prune={num_to_prune}]")
    _check_prunable(cfg, num_to_prune)
    batches = list(batches)
    steps = [num_to_prune // rounds + (i < num_to_prune % rounds) for i in range(rounds)]
    result = None
    for i, step in enumerate(steps):
        scores = expert_importance(model, batches, criterion, loss_fn=loss_fn)
        step_result = drop_experts(cfg, model, scores, step)
        if result is not None:  # Map this round's indices back to the original experts.
            kept = {p: np.take_along_axis(result.kept[p], k, axis=-1) for p, k in step_result.kept.items()}
            step_result = step_result._replace(kept=kept)
        cfg, model = step_result.config, step_result.build()
        tuning = lottery if i < rounds - 1 else recovery
        if tuning is not None:
            fine_tune(model, tuning, loss_fn=loss_fn)
        result = step_result._replace(state=nnx.state(model, nnx.Not(nnx.Intermediate)))
    return result


def evaluate_pruning(
    model: nnx.Module, result: PruneResult, batches: Iterable[Batch], *, loss_fn: LossFn = decoder_loss
) -> dict[str, Any]:
    """{"loss_before", "loss_after", "experts_kept"}: the mean loss of `model` and of the pruned model."""
    batches = list(batches)
    return {
        "loss_before": evaluate(model, batches, loss_fn=loss_fn),
        "loss_after": evaluate(result.build(), batches, loss_fn=loss_fn),
        "experts_kept": {path: kept.shape[-1] for path, kept in result.kept.items()},
    }
