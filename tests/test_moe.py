"""MoE layer: gating, capacity, every dispatch path against a per-token loop, weight transforms, aux losses,
sharding."""

import math

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from axmini.config import find_configs
from axmini.layers.attention import Attention
from axmini.layers.decoder import Decoder
from axmini.layers.feed_forward import FeedForward, FeedForwardActivation
from axmini.layers.moe import (
    ExpertChoiceGating,
    MoE,
    MoEDispatch,
    MoEModifier,
    RouterScore,
    TopKGating,
)
from axmini.layers.transformer import GlobalLocalModifier, PatternStack, RepeatedStack, TransformerLayer
from axmini.layers.weight_transform import transformed_weights
from axmini.lora import LoRA
from axmini.mesh_rules import DEFAULT_LOGICAL_AXIS_RULES
from axmini.module import build_abstract, build_sharded, capture_aux, sharding_context

D, F, E = 8, 12, 4


def moe_config(gating=None, *, num_experts=E, dispatch=MoEDispatch.EINSUM, activation=FeedForwardActivation.SWIGLU):
    return MoE.default_config().set(
        input_dim=D,
        hidden_dim=F,
        num_experts=num_experts,
        activation=activation,
        dispatch=dispatch,
        gating=gating if gating is not None else TopKGating.default_config(),
    )


def params_of(model: MoE) -> dict[str, np.ndarray]:
    return {
        name: np.asarray(getattr(model, name)[...])
        for name in ("router", "wi_0", "wi_1", "wi", "wo")
        if hasattr(model, name)
    }


# ----------------------------------------------------------------------------------------------------
# An independent reference: routing decided in numpy by a per-token loop, outputs summed token by token.


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    return np.exp(z) / np.exp(z).sum(-1, keepdims=True)


def reference_routing(logits: np.ndarray, gating, *, deterministic=False):
    """Per group, a list of (token, expert, chosen experts of that token) for every processed pair."""
    groups, size, experts = logits.shape
    pairs = []
    for g in range(groups):
        kept = []
        if isinstance(gating, ExpertChoiceGating.Config):
            factor = gating.eval_capacity_factor if deterministic else gating.train_capacity_factor
            capacity = min(size, math.ceil(size * factor / experts))
            probs = softmax(logits[g])
            for e in range(experts):
                for s in np.argsort(-probs[:, e], kind="stable")[:capacity]:
                    kept.append((int(s), e, None))
        else:
            factor = gating.eval_capacity_factor if deterministic else gating.train_capacity_factor
            k = gating.top_k
            capacity = size if factor is None else min(size, math.ceil(k * size * factor / experts))
            scores = softmax(logits[g]) if gating.score is RouterScore.SOFTMAX else 1 / (1 + np.exp(-logits[g]))
            choices = [list(np.argsort(-scores[s], kind="stable")[:k]) for s in range(size)]
            count = [0] * experts
            for rank in range(k):  # First choices of all tokens before any second choice.
                for s in range(size):
                    e = int(choices[s][rank])
                    if count[e] < capacity:
                        count[e] += 1
                        kept.append((s, e, tuple(int(c) for c in choices[s])))
        pairs.append(kept)
    return pairs


def reference_forward(params, x, pairs, gating, activation=FeedForwardActivation.SWIGLU):
    """y[g, s] = sum over the processed pairs (s, e) of weight * expert_e(x[g, s]); differentiable in params
    and x, with the discrete routing decisions `pairs` given."""
    flat = [(g, s, e, chosen) for g, kept in enumerate(pairs) for s, e, chosen in kept]
    g, s, e = (np.array([p[i] for p in flat]) for i in range(3))
    logits = jnp.einsum("gsd,de->gse", x, params["router"])
    if isinstance(gating, ExpertChoiceGating.Config):
        weight = jax.nn.softmax(logits, axis=-1)[g, s, e]
    else:
        scores = jax.nn.softmax(logits, axis=-1) if gating.score is RouterScore.SOFTMAX else jax.nn.sigmoid(logits)
        weight = scores[g, s, e]
        if gating.renormalize:
            chosen = np.array([p[3] for p in flat])
            weight = weight / scores[g[:, None], s[:, None], chosen].sum(-1)
    xs = x[g, s]
    if activation.gated:
        h = activation(jnp.einsum("pd,pdf->pf", xs, params["wi_0"][e])) * jnp.einsum(
            "pd,pdf->pf", xs, params["wi_1"][e]
        )
    else:
        h = activation(jnp.einsum("pd,pdf->pf", xs, params["wi"][e]))
    out = jnp.einsum("pf,pfd->pd", h, params["wo"][e])
    return jnp.zeros_like(x).at[g, s].add(weight[:, None] * out)


def call(model, x):
    return model(x)


@nnx.jit
def captured(model, x):
    """(output, aux losses, summaries) of a jitted call (eager op-by-op compiles dominate CPU test time)."""
    return capture_aux(call, model, x)


def model_forward_and_grads(model: MoE, x: jax.Array, cotangent: jax.Array):
    graphdef, state = nnx.split(model)

    def loss(state, x):
        y = nnx.merge(graphdef, state)(x)
        return jnp.sum(y * cotangent), y

    (_, y), (grad_state, grad_x) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(state, x)
    grads = {str(path[0]): np.asarray(v.get_value()) for path, v in nnx.to_flat_state(grad_state)}
    return np.asarray(y), grads, np.asarray(grad_x)


GATINGS = {
    "top2_softmax_capacity1": TopKGating.default_config().set(top_k=2, train_capacity_factor=1.0),
    "top2_sigmoid_dropless": TopKGating.default_config().set(
        top_k=2, score=RouterScore.SIGMOID, renormalize=False, train_capacity_factor=None
    ),
    "top1_softmax_tight_capacity": TopKGating.default_config().set(top_k=1, train_capacity_factor=0.5),
    "expert_choice": ExpertChoiceGating.default_config().set(train_capacity_factor=1.5),
}


@pytest.mark.parametrize("name", list(GATINGS))
def test_dispatch_paths_match_per_token_reference_outputs_and_gradients(name):
    gating = GATINGS[name]
    x = jax.random.normal(jax.random.key(1), (2, 8, D))
    cotangent = jax.random.normal(jax.random.key(2), (2, 8, D))
    results = {}
    for dispatch in MoEDispatch:
        model = moe_config(gating, dispatch=dispatch).instantiate(rngs=nnx.Rngs(0))
        results[dispatch] = model_forward_and_grads(model, x, cotangent)
    params = {k: jnp.asarray(v) for k, v in params_of(model).items()}
    logits = np.einsum("gsd,de->gse", np.asarray(x), np.asarray(params["router"]))
    pairs = reference_routing(logits, gating)

    def ref_loss(params, x):
        y = reference_forward(params, x, pairs, gating)
        return jnp.sum(y * cotangent), y

    (_, y_ref), (g_params, g_x) = jax.jit(jax.value_and_grad(ref_loss, argnums=(0, 1), has_aux=True))(params, x)
    for dispatch, (y, grads, grad_x) in results.items():
        np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5, err_msg=str(dispatch))
        np.testing.assert_allclose(grad_x, g_x, rtol=1e-4, atol=1e-5, err_msg=str(dispatch))
        assert set(grads) == set(g_params)
        for key in grads:
            np.testing.assert_allclose(grads[key], g_params[key], rtol=1e-4, atol=1e-5, err_msg=f"{dispatch} {key}")


def test_dispatch_paths_give_the_same_summaries():
    gating = TopKGating.default_config().set(top_k=2, train_capacity_factor=0.75)  # Some pairs dropped.
    x = jax.random.normal(jax.random.key(1), (2, 8, D))
    results = [captured(moe_config(gating, dispatch=d).instantiate(rngs=nnx.Rngs(0)), x) for d in MoEDispatch]
    for result in results[1:]:
        assert set(result.summaries) == set(results[0].summaries)
        for name, value in result.summaries.items():
            np.testing.assert_allclose(value, results[0].summaries[name], rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("dispatch", list(MoEDispatch))
@pytest.mark.parametrize("activation", [FeedForwardActivation.SWIGLU, FeedForwardActivation.GELU])
def test_one_expert_top1_dropless_equals_dense_ffn(dispatch, activation):
    gating = TopKGating.default_config().set(top_k=1, train_capacity_factor=None)
    model = moe_config(gating, num_experts=1, dispatch=dispatch, activation=activation).instantiate(rngs=nnx.Rngs(3))
    x = np.asarray(jax.random.normal(jax.random.key(4), (2, 5, D)))
    p = params_of(model)

    def gelu(z):  # tanh approximation, as the dense FeedForward uses
        return 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))

    if activation.gated:
        a = x @ p["wi_0"][0]
        dense = ((a / (1 + np.exp(-a))) * (x @ p["wi_1"][0])) @ p["wo"][0]
    else:
        dense = gelu(x @ p["wi"][0]) @ p["wo"][0]
    np.testing.assert_allclose(np.asarray(nnx.jit(call)(model, jnp.asarray(x))), dense, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("error::FutureWarning")  # jax warns before it refuses a float32 -> bfloat16 scatter.
@pytest.mark.parametrize("dispatch", list(MoEDispatch))
def test_every_dispatch_runs_in_bfloat16_without_an_implicit_downcast(dispatch):
    model = moe_config(dispatch=dispatch).set(param_dtype=jnp.bfloat16).instantiate(rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 5, D), jnp.bfloat16)
    y = nnx.jit(call)(model, x)
    assert y.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(y)))


@pytest.mark.parametrize("dispatch", list(MoEDispatch))
def test_every_dispatch_computes_with_the_weight_transformed_experts(dispatch):
    """LoRA on the experts (adapters made nonzero): each dispatch path equals the same MoE without a transform whose
    expert weights are the transformed ones (the router is not a transformed weight)."""
    cfg = moe_config(dispatch=dispatch).set(weight_transform=LoRA.default_config().set(rank=2))
    model = cfg.instantiate(rngs=nnx.Rngs(0))
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if path[-1] == "b":  # B starts at zero: the adapter would be a no-op.
            variable.set_value(0.1 * jax.random.normal(jax.random.key(len(path)), variable.get_value().shape))
    plain = moe_config(dispatch=dispatch).instantiate(rngs=nnx.Rngs(0))
    plain.router.set_value(model.router[...])
    for transformed in transformed_weights(model):
        assert not np.allclose(transformed.value(), transformed.weight[...], rtol=1e-3, atol=1e-3)
        getattr(plain, transformed.name).set_value(transformed.value())
    x = jax.random.normal(jax.random.key(1), (2, 5, D))
    got, want = nnx.jit(call)(model, x), nnx.jit(call)(plain, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# Capacity and expert choice, on the gating alone.


def gate(cfg, logits, *, deterministic=False):
    gating = cfg.clone(num_experts=logits.shape[-1]).instantiate()
    return jax.jit(lambda z: gating(z, deterministic=deterministic))(jnp.asarray(logits, jnp.float32))


def test_tokens_past_capacity_are_dropped_in_priority_order():
    # 6 tokens all prefer expert 0 first and expert 1 second; C = ceil(2 * 6 * 0.5 / 3) = 2.
    logits = np.tile(np.array([3.0, 2.0, 0.0]), (1, 6, 1))
    routing = gate(TopKGating.default_config().set(top_k=2, train_capacity_factor=0.5), logits)
    assert routing.capacity == 2
    kept = np.asarray(routing.kept[0])
    # First choices (expert 0) of tokens 0, 1 fill expert 0; second choices (expert 1) of tokens 0, 1 fill expert 1.
    expected = np.zeros((6, 3), bool)
    expected[[0, 1], 0] = True
    expected[[0, 1], 1] = True
    np.testing.assert_array_equal(kept, expected)
    np.testing.assert_array_equal(np.asarray(routing.slots[0])[kept], [0, 0, 1, 1])
    assert np.asarray(routing.routed[0])[:, :2].all()


def test_first_choices_take_priority_over_earlier_tokens_second_choices():
    # Token 0 wants experts (1, 0); tokens 1, 2 want expert 0 first. C = 2 (top-2, S=3, E=2, factor 2/3).
    logits = np.array([[[1.0, 2.0], [2.0, 1.0], [2.0, 1.0]]])
    routing = gate(TopKGating.default_config().set(top_k=2, train_capacity_factor=2 / 3), logits)
    assert routing.capacity == 2
    # Expert 0 takes the first choices of tokens 1, 2; token 0's second choice (expert 0) is dropped.
    np.testing.assert_array_equal(np.asarray(routing.kept[0]), [[False, True], [True, True], [True, False]])


@pytest.mark.parametrize("top_k,factor", [(1, 0.75), (2, 0.5), (3, 1.0), (2, None)])
def test_kept_pairs_match_per_token_loop(top_k, factor):
    cfg = TopKGating.default_config().set(top_k=top_k, train_capacity_factor=factor)
    for seed in range(3):
        logits = np.random.default_rng(seed).normal(size=(3, 10, E))
        routing = gate(cfg, logits)
        expected = np.zeros(logits.shape, bool)
        for g, kept in enumerate(reference_routing(logits, cfg)):
            for s, e, _ in kept:
                expected[g, s, e] = True
        np.testing.assert_array_equal(np.asarray(routing.kept), expected)
        if factor is None:
            assert np.array_equal(np.asarray(routing.kept), np.asarray(routing.routed))


def test_dropless_drops_nothing_even_when_all_tokens_pick_one_expert():
    logits = np.tile(np.array([5.0, 0.0, 0.0, 0.0]), (2, 16, 1))
    model = moe_config(TopKGating.default_config().set(top_k=1, train_capacity_factor=None)).instantiate(
        rngs=nnx.Rngs(0)
    )
    routing = gate(model.config.gating, logits)
    assert np.asarray(routing.kept[..., 0]).all()
    summaries = captured(model, jnp.ones((2, 16, D))).summaries
    assert float(summaries["dropped_token_fraction"]) == 0.0


def test_dropped_token_fraction_summary_counts_tokens_no_expert_processed():
    model = moe_config(TopKGating.default_config().set(top_k=1, train_capacity_factor=0.5)).instantiate(
        rngs=nnx.Rngs(0)
    )
    x = jax.random.normal(jax.random.key(0), (2, 8, D))
    summaries = captured(model, x).summaries
    logits = np.einsum("gsd,de->gse", np.asarray(x), params_of(model)["router"])
    processed = {(g, s) for g, kept in enumerate(reference_routing(logits, model.config.gating)) for s, _, _ in kept}
    np.testing.assert_allclose(
        float(summaries["dropped_token_fraction"]), 1 - len(processed) / 16, rtol=1e-6, atol=1e-7
    )
    np.testing.assert_allclose(float(np.sum(summaries["expert_load"])), 1.0, rtol=1e-6, atol=1e-7)


def test_eval_mode_uses_eval_capacity_factor():
    gating = TopKGating.default_config().set(top_k=1, train_capacity_factor=0.5, eval_capacity_factor=None)
    model = moe_config(gating).instantiate(rngs=nnx.Rngs(0))
    x = jnp.ones((1, 8, D))  # Identical tokens: all pick one expert, so only capacity decides the drops.
    assert float(captured(model, x).summaries["dropped_token_fraction"]) == pytest.approx(1 - 1 / 8)
    model.eval()
    assert float(captured(model, x).summaries["dropped_token_fraction"]) == 0.0


@pytest.mark.parametrize("factor", [1.0, 2.0, 0.3])
def test_expert_choice_each_expert_processes_exactly_capacity_tokens(factor):
    logits = np.asarray(jax.random.normal(jax.random.key(5), (2, 12, 4)))
    routing = gate(ExpertChoiceGating.default_config().set(train_capacity_factor=factor), logits)
    capacity = math.ceil(12 * factor / 4)
    assert routing.capacity == capacity
    np.testing.assert_array_equal(np.asarray(routing.kept).sum(axis=1), np.full((2, 4), capacity))
    probs = softmax(logits)
    for g in range(2):
        for e in range(4):
            expected = set(np.argsort(-probs[g, :, e])[:capacity].tolist())
            assert set(np.flatnonzero(np.asarray(routing.kept[g, :, e])).tolist()) == expected
    assert routing.load_balance_loss is None


# ----------------------------------------------------------------------------------------------------
# Aux losses.


def test_load_balance_loss_is_one_when_uniform_and_near_num_experts_when_collapsed():
    cfg = TopKGating.default_config().set(top_k=1, train_capacity_factor=None)
    balanced = np.eye(E)[np.arange(16) % E][None] * 0.5  # Token s prefers expert s % E, mildly.
    collapsed = np.tile(np.eye(E)[0] * 20.0, (1, 16, 1))
    loss_balanced = float(gate(cfg, balanced).load_balance_loss)
    loss_collapsed = float(gate(cfg, collapsed).load_balance_loss)
    assert loss_balanced == pytest.approx(1.0, rel=1e-6, abs=1e-7)
    assert loss_collapsed == pytest.approx(E, rel=1e-3, abs=1e-7)
    random_logits = np.asarray(jax.random.normal(jax.random.key(0), (2, 16, E)))
    assert loss_balanced < float(gate(cfg, random_logits).load_balance_loss) < loss_collapsed


class Parent(nnx.Module):
    """A container, so the sown values carry a module path."""

    def __init__(self, cfg, rngs):
        self.feed_forward = cfg.instantiate(rngs=rngs)

    def __call__(self, x):
        return self.feed_forward(x)


def test_aux_losses_match_formulas_at_their_exact_paths():
    cfg = moe_config().set(load_balance_loss_weight=0.3, router_z_loss_weight=0.7)
    parent = Parent(cfg, nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 8, D))
    _, losses, summaries = captured(parent, x)
    assert set(losses) == {"feed_forward/load_balance_loss", "feed_forward/router_z_loss"}
    logits = np.einsum("gsd,de->gse", np.asarray(x), np.asarray(parent.feed_forward.router[...]))
    z = np.log(np.exp(logits).sum(-1))
    np.testing.assert_allclose(float(losses["feed_forward/router_z_loss"]), 0.7 * np.mean(z**2), rtol=1e-5, atol=1e-7)
    # Load balance: E * sum_e (share of routed pairs to e) * (mean prob of e), averaged over groups.
    probs = softmax(logits)
    top2 = np.argsort(-probs, axis=-1)[..., :2]
    share = np.stack([np.bincount(top2[g].ravel(), minlength=E) / top2[g].size for g in range(2)])
    expected = E * np.mean(np.sum(share * probs.mean(axis=1), axis=-1))
    np.testing.assert_allclose(float(losses["feed_forward/load_balance_loss"]), 0.3 * expected, rtol=1e-5, atol=1e-7)
    assert set(summaries) == {
        f"feed_forward/{n}" for n in ("expert_load", "expert_output_norm", "dropped_token_fraction", "router_entropy")
    }


def test_aux_losses_reach_the_gradient_of_the_router():
    model = moe_config().instantiate(rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    x = jax.random.normal(jax.random.key(1), (2, 8, D))

    def aux_total(state):
        return sum(capture_aux(call, nnx.merge(graphdef, state), x).losses.values())

    grads = jax.jit(jax.grad(aux_total))(state)
    assert float(jnp.abs(grads["router"].get_value()).sum()) > 0
    assert float(jnp.abs(grads["wo"].get_value()).sum()) == 0


# ----------------------------------------------------------------------------------------------------
# Expert parallelism.


@pytest.mark.parametrize("dispatch", list(MoEDispatch))
def test_sharded_over_expert_and_fsdp_matches_single_device(dispatch):
    mesh = jax.make_mesh((2, 4), ("expert", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    rules = DEFAULT_LOGICAL_AXIS_RULES
    cfg = moe_config(TopKGating.default_config().set(train_capacity_factor=1.0), dispatch=dispatch).set(num_experts=4)
    x = jax.random.normal(jax.random.key(1), (8, 8, D))
    cotangent = jax.random.normal(jax.random.key(2), (8, 8, D))
    y_ref, grads_ref, gx_ref = model_forward_and_grads(cfg.instantiate(rngs=nnx.Rngs(0)), x, cotangent)

    model = build_sharded(cfg, mesh, rules)
    assert model.wi_0[...].sharding.spec[0] == "expert"
    graphdef, state = nnx.split(model)

    def loss(state, x):
        y = nnx.merge(graphdef, state)(x)
        return jnp.sum(y * cotangent), y

    with sharding_context(mesh, rules):
        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
        (_, y), (grad_state, gx) = step(state, x)
        y.block_until_ready()
        hlo = step.lower(state, x).compile().as_text()
    np.testing.assert_allclose(np.asarray(y), y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gx), gx_ref, rtol=1e-4, atol=1e-5)
    for path, v in nnx.to_flat_state(grad_state):
        np.testing.assert_allclose(np.asarray(v.get_value()), grads_ref[str(path[0])], rtol=1e-4, atol=1e-5)
    if dispatch is not MoEDispatch.GROUPED:  # Capacity-padded buffers move to the expert axis by all-to-all.
        assert "all-to-all" in hlo


# ----------------------------------------------------------------------------------------------------
# Error paths: refused at build time, naming the field.


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda c: c.gating.set(top_k=5), "gating.top_k=5"),
        (lambda c: c.gating.set(train_capacity_factor=0.0), "train_capacity_factor=0.0"),
        (lambda c: c.set(num_experts=0), "num_experts=0"),
        (lambda c: c.set(hidden_dim=0), "hidden_dim resolved to 0"),
        (lambda c: c.set(router_z_loss_weight=-1.0), "router_z_loss_weight=-1.0"),
    ],
)
def test_bad_config_is_refused_at_build_time(change, message):
    cfg = moe_config()
    change(cfg)
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        cfg.instantiate(rngs=nnx.Rngs(0))


def test_expert_choice_bad_capacity_is_refused():
    cfg = moe_config(ExpertChoiceGating.default_config().set(eval_capacity_factor=-1.0))
    with pytest.raises(ValueError, match="eval_capacity_factor"):
        cfg.instantiate(rngs=nnx.Rngs(0))


# ----------------------------------------------------------------------------------------------------
# The feature patch.


def small_decoder(num_layers=2):
    layer = TransformerLayer.default_config().set(
        self_attention=Attention.default_config().set(num_heads=2, num_kv_heads=1),
        feed_forward=FeedForward.default_config().set(hidden_dim=F, activation=FeedForwardActivation.GEGLU),
    )
    return Decoder.default_config().set(
        vocab_size=32, dim=D, stack=RepeatedStack.default_config().set(num_layers=num_layers, layer=layer)
    )


def moe_modifier(**kw):
    return MoEModifier.default_config().set(moe=MoE.default_config().set(num_experts=E), **kw).instantiate()


def test_modifier_turns_every_feed_forward_into_moe_keeping_its_dims():
    cfg = moe_modifier()(small_decoder())
    assert not find_configs(cfg, FeedForward)
    (path, moe), *others = find_configs(cfg, MoE)
    assert not others and path == "stack.layer.feed_forward"
    assert (moe.hidden_dim, moe.activation, moe.num_experts) == (F, FeedForwardActivation.GEGLU, E)
    model = build_abstract(cfg)
    assert model.stack.layers.feed_forward.wi_0.get_value().shape == (2, E, D, F)  # 2 scanned layers.


def test_modifier_every_other_layer_gives_a_dense_moe_pattern():
    cfg = moe_modifier(every=2)(small_decoder(num_layers=4))
    assert isinstance(cfg.stack, PatternStack.Config) and cfg.stack.num_layers == 4
    assert [type(c.feed_forward) for c in cfg.stack.pattern] == [FeedForward.Config, MoE.Config]
    model = build_abstract(cfg)
    assert [c.feed_forward.klass for c in model.stack.layer_configs()] == [FeedForward, MoE] * 2
    group = model.stack.groups["0"]  # The pattern [dense, MoE], scanned twice.
    assert [type(group.layers[str(i)].feed_forward).__name__ for i in range(2)] == ["FeedForward", "MoE"]
    assert group.layers["1"].feed_forward.wi_0.get_value().shape == (2, E, D, F)


def test_modifier_every_other_layer_tiles_an_existing_local_global_pattern():
    local_global = GlobalLocalModifier.default_config().set(local_layers=2, sliding_window=4).instantiate()
    cfg = moe_modifier(every=2)(local_global(small_decoder(num_layers=6)))
    # Pattern local, local, global tiled to lcm(3, 2) = 6 layers, MoE in every second one.
    assert [c.self_attention.sliding_window for c in cfg.stack.pattern] == [4, 4, None] * 2
    assert [type(c.feed_forward) for c in cfg.stack.pattern] == [FeedForward.Config, MoE.Config] * 3


def test_modifier_every_below_one_is_refused():
    with pytest.raises(ValueError, match=r"^every=0 must be positive"):
        moe_modifier(every=0)(small_decoder())


@pytest.mark.parametrize("every", [1, 2])
def test_aux_losses_reach_the_decoder_at_their_exact_paths(every):
    model = moe_modifier(every=every)(small_decoder()).instantiate(rngs=nnx.Rngs(0))
    ids = jnp.asarray(np.arange(12).reshape(2, 6) % 31 + 1)
    losses = nnx.jit(lambda m, b: capture_aux(lambda m, b: m(b), m, b).losses)(
        model, {"input_ids": ids, "target_ids": ids}
    )
    prefix = "stack/layers/feed_forward" if every == 1 else "stack/groups/0/layers/1/feed_forward"
    assert set(losses) == {f"{prefix}/load_balance_loss", f"{prefix}/router_z_loss"}
    assert all(float(v) > 0 for v in losses.values())
