"""Mixture of Experts: a filler of the transformer layer's `feed_forward` slot.

`MoE` keeps the feed-forward call contract (`input_dim`, `hidden_dim`, `activation`, `x -> y`), so any
experiment turns its FFNs into MoE with one `MoEModifier`. Three concerns are separate:

- gating (a config slot): `TopKGating` (token choice: each token picks its top-k experts, with a
  capacity per expert and token dropping, or dropless) or `ExpertChoiceGating` (each expert picks its
  top-C tokens of a sequence). Either returns a `Routing`: dense [G, S, E] tensors saying which
  (token, expert) pairs are kept, with which combine weight and at which slot of the expert's buffer.
- dispatch (an enum): `EINSUM` builds one-hot dispatch/combine tensors (static shapes, partitions
  cleanly under GSPMD: the expert axis becomes an all-to-all); `GATHER` fills the same capacity-padded
  expert buffers by gathering token rows and combines by a scatter-add, without the one-hot matmuls
  (whose cost, S * E * C * D per group, grows with the sequence); `GROUPED` gathers the kept pairs sorted
  by expert and runs grouped matmuls (`jax.lax.ragged_dot`), with no capacity padding.
- experts: gated FFNs with stacked parameters, e.g. `wi_0` [E, D, F] with axes (expert, embed, mlp).

Groups are sequences: G = batch, S = length. The layer sows the weighted load-balance loss and router
z-loss (`AuxLoss`) and summaries of expert load, output norm, dropped tokens and router entropy.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from typing import ClassVar, NamedTuple

import flax.nnx as nnx
import jax
import jax.numpy as jnp

from axmini.config import (
    REQUIRED,
    ConfigBase,
    ConfigModifier,
    Configurable,
    ConfigValueError,
    FunctionConfigBase,
    Required,
    check_non_negative,
    check_positive,
    config_path,
    fill_child,
    map_configs,
    maybe_instantiate,
    replace_config,
)
from axmini.layers.feed_forward import FeedForward, FeedForwardActivation
from axmini.layers.transformer import BaseStack, to_pattern_stack
from axmini.module import Layer, shard_activation

Array = jax.Array


# ----------------------------------------------------------------------------------------------------
# Gating.


class Routing(NamedTuple):
    """Routing of G groups of S tokens over E experts, as dense [G, S, E] tensors.

    `kept[g, s, e]` says expert e processes token s of group g, in slot `slots[g, s, e]` of its buffer of
    `capacity` slots; the expert's output is scaled by `weights[g, s, e]` (0 where not kept). `routed`
    is what the gate chose before capacity dropping (for load statistics).
    """

    weights: Array
    slots: Array
    kept: Array
    routed: Array
    capacity: int  # Static buffer size per expert and group (einsum dispatch).
    max_assignments: int  # Static bound on the kept pairs per group (grouped dispatch).
    load_balance_loss: Array | None


def _top_k(x: Array, k: int) -> tuple[Array, Array]:
    """`jax.lax.top_k` over the last dim, via a stable sort: the top_k op's partitioner gathers its whole
    operand onto every device, while a sort stays sharded along the other dims (batch, experts)."""
    iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    _, order = jax.lax.sort((-x, iota), dimension=x.ndim - 1, num_keys=1, is_stable=True)
    indices = order[..., :k]
    return jnp.take_along_axis(x, indices, axis=-1), indices


class RouterScore(enum.Enum):
    """How router logits become expert scores."""

    SOFTMAX = "softmax"  # Over experts.
    SIGMOID = "sigmoid"  # Per expert, independent of the others.


class BaseGating(Configurable, nnx.Module):
    """Maps router logits [G, S, E] (float32) to a `Routing`. No parameters: the router is the MoE's.

    `causal`: whether a token's routing depends only on itself and earlier tokens. A causal decoder refuses
    a non-causal gating (see `Decoder`).
    """

    causal: ClassVar[bool] = True

    class Config(Configurable.Config):
        num_experts: Required[int] = REQUIRED  # Filled by the MoE layer.

    def __call__(self, logits: Array, *, deterministic: bool) -> Routing:
        raise NotImplementedError(type(self))


def _load_balance_loss(logits: Array, routed: Array) -> Array:
    """Switch/GShard loss E * sum_e f_e * P_e: f_e is the fraction of routed pairs that go to expert e,
    P_e the mean softmax probability of e; per group, averaged. It equals 1 when routing is uniform and
    grows to E when every token goes to one expert."""
    num_experts = logits.shape[-1]
    probs = jax.nn.softmax(logits, axis=-1)
    fraction = routed.astype(jnp.float32).sum(axis=1) / jnp.maximum(routed.sum(axis=(1, 2))[:, None], 1)
    return num_experts * jnp.mean(jnp.sum(fraction * probs.mean(axis=1), axis=-1))


class TopKGating(BaseGating):
    """Token choice: each token picks its top-k experts; each expert takes at most `capacity` of them.

    Capacity per group of S tokens is C = ceil(k * S * capacity_factor / E) (at most S); a capacity
    factor of None is dropless. Pairs past capacity are dropped in priority order: all tokens' first
    choices before any second choice, and within one rank, earlier tokens first. Since capacity is
    shared by the tokens of a sequence, decoding (a few tokens per call) routes like the full forward
    only when dropless.
    """

    class Config(BaseGating.Config):
        top_k: int = 2
        score: RouterScore = RouterScore.SOFTMAX
        # Rescale the top-k scores of each token to sum to 1 (before dropping).
        renormalize: bool = True
        train_capacity_factor: float | None = 2.0
        eval_capacity_factor: float | None = 2.0

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        cfg = self.config
        if not 1 <= cfg.top_k <= cfg.num_experts:
            raise ConfigValueError(
                f"{config_path(cfg, 'top_k')}={cfg.top_k} must be in [1, num_experts={cfg.num_experts}]; "
                "lower top_k or add experts"
            )
        check_positive(cfg, "train_capacity_factor", "eval_capacity_factor")  # None: dropless.

    def capacity(self, group_size: int, *, deterministic: bool) -> int:
        cfg = self.config
        factor = cfg.eval_capacity_factor if deterministic else cfg.train_capacity_factor
        if factor is None:
            return group_size
        return max(1, min(group_size, math.ceil(cfg.top_k * group_size * factor / cfg.num_experts)))

    def __call__(self, logits: Array, *, deterministic: bool) -> Routing:
        cfg = self.config
        _, group_size, num_experts = logits.shape
        scores = jax.nn.softmax(logits, axis=-1) if cfg.score is RouterScore.SOFTMAX else jax.nn.sigmoid(logits)
        top_scores, top_experts = _top_k(scores, cfg.top_k)  # [G, S, k]
        if cfg.renormalize:
            top_scores = top_scores / jnp.sum(top_scores, axis=-1, keepdims=True)
        choice = jax.nn.one_hot(top_experts, num_experts, dtype=jnp.int32)  # [G, S, k, E]
        # Slot of each pair in its expert's buffer, counting rank-major (all first choices first).
        rank_major = jnp.swapaxes(choice, 1, 2).reshape(choice.shape[0], -1, num_experts)
        position = (jnp.cumsum(rank_major, axis=1) - 1).reshape(choice.shape[0], cfg.top_k, group_size, num_experts)
        position = jnp.swapaxes(position, 1, 2)  # [G, S, k, E]
        capacity = self.capacity(group_size, deterministic=deterministic)
        kept_k = (choice == 1) & (position < capacity)
        kept = kept_k.any(axis=2)
        slots = jnp.sum(jnp.where(kept_k, position, 0), axis=2)
        weights = jnp.sum(jnp.where(kept_k, top_scores[..., None], 0.0), axis=2)
        routed = choice.sum(axis=2) > 0
        return Routing(
            weights=weights,
            slots=slots,
            kept=kept,
            routed=routed,
            capacity=capacity,
            max_assignments=min(group_size * cfg.top_k, num_experts * capacity),
            load_balance_loss=_load_balance_loss(logits, routed),
        )


class ExpertChoiceGating(BaseGating):
    """Expert choice (EC-DIT, arXiv 2410.02098): each expert takes its top-C tokens of a group by softmax
    score, C = ceil(S * capacity_factor / E) (at most S). Every expert is full by construction, so no
    load-balance loss is needed. A token's routing depends on the whole sequence, so it is not causal: a
    causal decoder refuses it (training would see the future, and one-token decoding would give every token
    to every expert). It suits non-causal models (encoders, diffusion transformers as in EC-DIT).
    """

    causal: ClassVar[bool] = False

    class Config(BaseGating.Config):
        train_capacity_factor: float = 2.0
        eval_capacity_factor: float = 2.0

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        check_positive(self.config, "train_capacity_factor", "eval_capacity_factor")

    def capacity(self, group_size: int, *, deterministic: bool) -> int:
        cfg = self.config
        factor = cfg.eval_capacity_factor if deterministic else cfg.train_capacity_factor
        return max(1, min(group_size, math.ceil(group_size * factor / cfg.num_experts)))

    def __call__(self, logits: Array, *, deterministic: bool) -> Routing:
        _, group_size, num_experts = logits.shape
        capacity = self.capacity(group_size, deterministic=deterministic)
        scores = jax.nn.softmax(logits, axis=-1)
        top_scores, top_tokens = _top_k(jnp.swapaxes(scores, 1, 2), capacity)  # [G, E, C]
        picked = jax.nn.one_hot(top_tokens, group_size, dtype=jnp.int32)  # [G, E, C, S]
        kept = jnp.swapaxes(picked.sum(axis=2), 1, 2) > 0  # [G, S, E]
        slots = jnp.einsum("gecs,c->gse", picked, jnp.arange(capacity, dtype=jnp.int32))
        weights = jnp.einsum("gecs,gec->gse", picked.astype(top_scores.dtype), top_scores)
        return Routing(
            weights=weights,
            slots=slots,
            kept=kept,
            routed=kept,
            capacity=capacity,
            max_assignments=num_experts * capacity,
            load_balance_loss=None,
        )


# ----------------------------------------------------------------------------------------------------
# The MoE layer.


class MoEDispatch(enum.Enum):
    """How tokens reach their experts (all exact; they differ in cost and in how they shard)."""

    EINSUM = "einsum"  # One-hot dispatch/combine tensors [G, S, E, C]; capacity-padded; GSPMD-friendly.
    # Capacity-padded buffers [E, G, C, D] filled by a gather and emptied by a scatter-add: the expert matmuls
    # are dense batched matmuls (capacity_factor x the routed work) with no one-hot matmul around them.
    GATHER = "gather"
    GROUPED = "grouped"  # Gather pairs sorted by expert, grouped matmuls (ragged_dot); no padding.


class MoE(Layer):
    """A sparse feed-forward layer: a router, a gating rule, and `num_experts` gated FFNs.

    Parameters, named as in FeedForward with a leading expert dim: `router` [D, E] (axes embed, None:
    small, replicated), `wi_0`, `wi_1` (gated) or `wi` (plain) [E, D, F] (expert, embed, mlp), `wo`
    [E, F, D] (expert, mlp, embed).
    `deterministic` (set by `model.eval()` / `model.train()`) selects the eval or train capacity factor.

    Sown per call: AuxLoss `load_balance_loss` (token choice only) and `router_z_loss` (mean squared
    logsumexp of the router logits), each already multiplied by its weight; Summary `expert_load` [E]
    (share of the kept pairs per expert), `expert_output_norm` [E] (mean L2 norm of an expert's output
    over the tokens it processed), `dropped_token_fraction` (tokens that no expert processed) and
    `router_entropy` (mean entropy of the router's softmax).
    """

    class Config(Layer.Config):
        input_dim: Required[int] = REQUIRED
        # An int, or a deferred value called with input_dim= (as in FeedForward).
        hidden_dim: Required[int | FunctionConfigBase] = REQUIRED
        activation: FeedForwardActivation = FeedForwardActivation.SWIGLU
        num_experts: int = 8
        gating: BaseGating.Config = TopKGating.default_config()
        dispatch: MoEDispatch = MoEDispatch.EINSUM
        load_balance_loss_weight: float = 0.01
        router_z_loss_weight: float = 0.001

    # The router stays as it is: a weight transform (QAT, LoRA) rewrites the experts.
    weight_names = ("wi_0", "wi_1", "wi", "wo")

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        cfg = self.config
        check_positive(cfg, "num_experts")
        check_non_negative(cfg, "load_balance_loss_weight", "router_z_loss_weight")
        hidden_dim = int(maybe_instantiate(cfg.hidden_dim, input_dim=cfg.input_dim))
        if hidden_dim <= 0:
            raise ConfigValueError(
                f"{config_path(cfg, 'hidden_dim')} resolved to {hidden_dim}; set a positive hidden_dim"
            )
        num_experts, dim = cfg.num_experts, cfg.input_dim
        self.hidden_dim = hidden_dim
        self.router = self.param((dim, num_experts), axes=("embed", None), rngs=rngs)
        shape_in, axes_in = (num_experts, dim, self.hidden_dim), ("expert", "embed", "mlp")
        if cfg.activation.gated:
            self.wi_0 = self.param(shape_in, axes=axes_in, rngs=rngs, fan_in_axes=(1,))
            self.wi_1 = self.param(shape_in, axes=axes_in, rngs=rngs, fan_in_axes=(1,))
        else:
            self.wi = self.param(shape_in, axes=axes_in, rngs=rngs, fan_in_axes=(1,))
        self.wo = self.param(
            (num_experts, self.hidden_dim, dim), axes=("expert", "mlp", "embed"), rngs=rngs, fan_in_axes=(1,)
        )
        self.gating = fill_child(cfg.gating, parent=cfg, num_experts=num_experts).instantiate()
        self.deterministic = False

    def __call__(self, x: Array) -> Array:
        cfg = self.config
        x = shard_activation(x, ("batch", "length", "embed"))
        logits = jnp.einsum("gsd,de->gse", x.astype(jnp.float32), self.router[...].astype(jnp.float32))
        routing = self.gating(logits, deterministic=self.deterministic)
        dispatch = {
            MoEDispatch.EINSUM: self._einsum_dispatch,
            MoEDispatch.GATHER: self._gather_dispatch,
            MoEDispatch.GROUPED: self._grouped_dispatch,
        }[cfg.dispatch]
        y, output_norm = dispatch(x, routing)
        self._sow_aux(logits, routing, output_norm)
        return shard_activation(y, ("batch", "length", "embed"))

    def _experts(self, x: Array, matmul: Callable[[Array, Array], Array], hint: Callable[[Array], Array]) -> Array:
        """The expert FFNs, given the batched matmul of inputs with [E, in, out] weights."""
        act = self.config.activation
        project = lambda w: hint(matmul(x, self.read_weight(w).astype(x.dtype)))
        h = act(project(self.wi_0)) * project(self.wi_1) if act.gated else act(project(self.wi))
        return matmul(h, self.read_weight(self.wo).astype(x.dtype))

    def _einsum_dispatch(self, x: Array, routing: Routing) -> tuple[Array, Array]:
        capacity_range = jnp.arange(routing.capacity, dtype=routing.slots.dtype)
        dispatch = (routing.slots[..., None] == capacity_range) & routing.kept[..., None]  # [G, S, E, C]
        combine = dispatch * routing.weights[..., None].astype(x.dtype)
        expert_in = jnp.einsum("gsec,gsd->egcd", dispatch.astype(x.dtype), x)
        expert_out, output_norm = self._buffered_experts(expert_in, occupied=dispatch.any(axis=1))
        return jnp.einsum("gsec,egcd->gsd", combine, expert_out), output_norm

    def _buffered_experts(self, expert_in: Array, *, occupied: Array) -> tuple[Array, Array]:
        """The experts on capacity-padded buffers [E, G, C, D], and the summed output norm of each expert over its
        `occupied` [G, E, C] slots. Buffers are filled per group; moving the expert dim onto the `expert` mesh axis
        (and the groups off it) is then one all-to-all each way."""
        expert_in = shard_activation(expert_in, (None, "batch", None, "embed"))
        expert_in = shard_activation(expert_in, ("expert", "batch", None, "embed"))
        hint = lambda h: shard_activation(h, ("expert", "batch", None, "mlp"))
        expert_out = self._experts(expert_in, lambda a, w: jnp.einsum("egci,eio->egco", a, w), hint)
        expert_out = shard_activation(expert_out, ("expert", "batch", None, "embed"))
        expert_out = shard_activation(expert_out, (None, "batch", None, "embed"))
        norms = jnp.linalg.norm(expert_out.astype(jnp.float32), axis=-1)  # [E, G, C]
        return expert_out, jnp.einsum("egc,gec->e", norms, occupied.astype(jnp.float32))

    def _gather_dispatch(self, x: Array, routing: Routing) -> tuple[Array, Array]:
        groups, group_size, num_experts = routing.kept.shape
        capacity = routing.capacity
        # index[g, e, c]: the token in slot c of expert e's buffer for group g (group_size: an empty slot).
        g, s, e = (jnp.broadcast_to(a, routing.kept.shape) for a in jnp.ix_(*map(jnp.arange, routing.kept.shape)))
        slot = jnp.where(routing.kept, routing.slots, capacity)  # Dropped pairs go out of range: not written.
        index = jnp.full((groups, num_experts, capacity), group_size, jnp.int32).at[g, e, slot].set(s, mode="drop")
        pair_weights = routing.weights.astype(x.dtype)  # Cast first: a scatter does not cast float32 into bfloat16.
        weight = jnp.zeros((groups, num_experts, capacity), x.dtype).at[g, e, slot].set(pair_weights, mode="drop")
        rows = jnp.concatenate([x, jnp.zeros_like(x[:, :1])], axis=1)  # Row group_size: zeros for empty slots.
        expert_in = jnp.take_along_axis(rows, index.reshape(groups, -1)[..., None], axis=1)
        expert_in = jnp.swapaxes(expert_in.reshape(groups, num_experts, capacity, -1), 0, 1)  # [E, G, C, D]
        expert_out, output_norm = self._buffered_experts(expert_in, occupied=index < group_size)
        weighted = jnp.swapaxes(expert_out, 0, 1) * weight[..., None]  # [G, E, C, D]
        rows = jnp.zeros_like(rows).at[jnp.arange(groups)[:, None, None], index].add(weighted, mode="drop")
        return rows[:, :group_size], output_norm

    def _grouped_dispatch(self, x: Array, routing: Routing) -> tuple[Array, Array]:
        groups, group_size, num_experts = routing.kept.shape
        tokens = groups * group_size
        # Kept pairs in (expert, token) order: the pairs of expert e form the e-th contiguous group.
        kept = jnp.transpose(routing.kept, (2, 0, 1)).reshape(-1)
        (pair,) = jnp.nonzero(kept, size=groups * routing.max_assignments, fill_value=num_experts * tokens)
        valid = pair < num_experts * tokens
        pair = jnp.where(valid, pair, 0)
        expert, token = pair // tokens, pair % tokens
        group_sizes = routing.kept.sum(axis=(0, 1)).astype(jnp.int32)
        matmul = lambda a, w: jax.lax.ragged_dot(a, w, group_sizes)
        expert_out = self._experts(x.reshape(tokens, -1)[token], matmul, lambda h: h)
        expert_out = jnp.where(valid[:, None], expert_out, 0)  # Rows past the groups are unspecified.
        weights = jnp.transpose(routing.weights, (2, 0, 1)).reshape(-1)[pair].astype(x.dtype)
        y = jnp.zeros((tokens, x.shape[-1]), x.dtype).at[token].add(expert_out * weights[:, None])
        norms = jnp.linalg.norm(expert_out.astype(jnp.float32), axis=-1)
        output_norm = jax.ops.segment_sum(norms, expert, num_segments=num_experts)
        return y.reshape(x.shape), output_norm

    def _sow_aux(self, logits: Array, routing: Routing, output_norm_sum: Array) -> None:
        cfg = self.config
        if routing.load_balance_loss is not None:
            self.add_aux_loss("load_balance_loss", cfg.load_balance_loss_weight * routing.load_balance_loss)
        z = jax.nn.logsumexp(logits, axis=-1)
        self.add_aux_loss("router_z_loss", cfg.router_z_loss_weight * jnp.mean(jnp.square(z)))
        per_expert = routing.kept.sum(axis=(0, 1)).astype(jnp.float32)  # [E]
        self.add_summary("expert_load", per_expert / jnp.maximum(per_expert.sum(), 1.0))
        self.add_summary("expert_output_norm", output_norm_sum / jnp.maximum(per_expert, 1.0))
        self.add_summary("dropped_token_fraction", jnp.mean(~routing.kept.any(axis=-1)))
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        self.add_summary("router_entropy", -jnp.mean(jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)))


# ----------------------------------------------------------------------------------------------------
# The feature patch.


class MoEModifier(ConfigModifier):
    """Turns dense FeedForward slots into MoE, in any config tree, keeping each slot's input_dim,
    hidden_dim, activation and param_dtype.

    `every=1` converts every FeedForward. `every=n > 1` converts the feed-forward of every n-th layer
    of each stack (layers n-1, 2n-1, ...: "dense, MoE, dense, MoE" for n=2): a stack with one layer
    config becomes a `PatternStack` of period n, and a pattern of length p is tiled to lcm(p, n).
    """

    class Config(ConfigModifier.Config):
        moe: MoE.Config = MoE.default_config()
        every: int = 1

    _KEPT_FIELDS = ("input_dim", "hidden_dim", "activation", "param_dtype")

    def __call__(self, cfg: ConfigBase) -> ConfigBase:
        check_positive(self.config, "every")
        if self.config.every == 1:
            return self._to_moe(cfg)
        return map_configs(cfg, BaseStack.matches, self._interleave)

    def _to_moe(self, cfg: ConfigBase) -> ConfigBase:
        return replace_config(cfg, target=FeedForward, new=self.config.moe, keep_fields=self._KEPT_FIELDS)

    def _interleave(self, stack: ConfigBase) -> ConfigBase:
        every = self.config.every
        stack = to_pattern_stack(stack)
        layers = stack.pattern
        period = math.lcm(len(layers), every)
        pattern = [layers[i % len(layers)].clone() for i in range(period)]
        return stack.set(pattern=[self._to_moe(c) if (i + 1) % every == 0 else c for i, c in enumerate(pattern)])
