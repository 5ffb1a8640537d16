"""Expert pruning: importance criteria against numpy formulas, smaller config and parameters, exactness
when the dropped experts were never used, iterative re-estimation, lottery and recovery fine-tuning, refusals."""

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from axmini.config import ConfigValueError
from axmini.layers.attention import Attention
from axmini.layers.decoder import Decoder
from axmini.layers.feed_forward import FeedForward
from axmini.layers.moe import MoE, MoEModifier, TopKGating
from axmini.layers.transformer import RepeatedStack, TransformerLayer
from axmini.lora import LoRAModifier
from axmini.module import count_params
from axmini.pruning import experts
from axmini.pruning.calibration import evaluate
from axmini.pruning.experts import ImportanceCriterion, evaluate_pruning, expert_importance, prune
from axmini.pruning.fine_tune import FineTuning

V, D, F, L, E = 32, 8, 16, 2, 8


def moe_decoder(*, every=1, top_k=1):
    """A 2-layer decoder whose FFNs are dropless top-k-of-8 MoE (renormalized scores)."""
    layer = TransformerLayer.default_config().set(
        self_attention=Attention.default_config().set(num_heads=2, num_kv_heads=1),
        feed_forward=FeedForward.default_config().set(hidden_dim=F),
    )
    cfg = Decoder.default_config().set(
        vocab_size=V, dim=D, stack=RepeatedStack.default_config().set(num_layers=L, layer=layer)
    )
    gating = TopKGating.default_config().set(top_k=top_k, train_capacity_factor=None, eval_capacity_factor=None)
    moe = MoE.default_config().set(num_experts=E, gating=gating)
    return MoEModifier.default_config().set(moe=moe, every=every).instantiate()(cfg)


def batch(length=3, seed=0):
    ids = jax.random.randint(jax.random.key(seed), (1, length + 1), 1, V)
    return {"input_ids": ids[:, :-1], "target_ids": ids[:, 1:]}


def logits(model, b):
    return np.asarray(nnx.jit(lambda m, ids: m.forward(ids).logits)(model, b["input_ids"]))


@pytest.mark.parametrize("every", [1, 2])
def test_pruning_unused_experts_keeps_outputs_and_gives_the_expected_smaller_model(every):
    cfg = moe_decoder(every=every)
    model = cfg.instantiate(rngs=nnx.Rngs(0))
    calibration = [batch(3)]  # 3 tokens, top-1: each layer routes to at most 3 of its 8 experts.
    result = prune(cfg, model, calibration, num_to_prune=4, criterion=ImportanceCriterion.FREQUENCY)

    frequency = expert_importance(model, calibration, ImportanceCriterion.FREQUENCY)
    for path, kept in result.kept.items():
        dropped = np.ones(frequency[path].shape, bool)
        np.put_along_axis(dropped, kept, False, axis=-1)
        assert np.all(frequency[path][dropped] == 0), path  # Only never-used experts were dropped.
    fresh = result.config.instantiate(rngs=nnx.Rngs(1))  # The returned config builds on its own.
    assert all(m.config.num_experts == E - 4 for m in experts.moe_layers(fresh).values())
    pruned = result.build()
    num_moe_layers = L // every
    assert count_params(pruned) == count_params(fresh)
    assert count_params(pruned) == count_params(model) - num_moe_layers * 4 * (3 * D * F + D)
    np.testing.assert_allclose(logits(pruned, calibration[0]), logits(model, calibration[0]), rtol=1e-6, atol=1e-6)
    report = evaluate_pruning(model, result, calibration)
    assert report["loss_after"] == pytest.approx(report["loss_before"], rel=1e-6, abs=1e-7)


def test_pruned_parameters_are_the_kept_experts_slices():
    cfg = moe_decoder()
    model = cfg.instantiate(rngs=nnx.Rngs(0))
    result = prune(cfg, model, [batch()], num_to_prune=3, criterion=ImportanceCriterion.WEIGHT_NORM)
    old, new = model.stack.layers.feed_forward, result.build().stack.layers.feed_forward
    kept = result.kept["stack/layers/feed_forward"]  # [L, E - 3]
    for layer in range(L):
        np.testing.assert_array_equal(new.wi_0[...][layer], old.wi_0[...][layer][kept[layer]])
        np.testing.assert_array_equal(new.wo[...][layer], old.wo[...][layer][kept[layer]])
        np.testing.assert_array_equal(new.router[...][layer], old.router[...][layer][:, kept[layer]])
    np.testing.assert_array_equal(
        result.build().embedding.weight[...], model.embedding.weight[...]
    )  # Non-MoE parameters are unchanged.


def test_importance_criteria_match_numpy_formulas():
    cfg = moe_decoder(top_k=2)
    model = cfg.instantiate(rngs=nnx.Rngs(0))
    moe = model.stack.layers.feed_forward
    wi_0, wi_1, wo, router = (np.asarray(w[...], np.float64) for w in (moe.wi_0, moe.wi_1, moe.wo, moe.router))
    path = "stack/layers/feed_forward"

    norms = expert_importance(model, [], ImportanceCriterion.WEIGHT_NORM)[path]
    expected = np.sqrt((wi_0**2).sum((2, 3)) + (wi_1**2).sum((2, 3)) + (wo**2).sum((2, 3)))
    np.testing.assert_allclose(norms, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        expert_importance(model, [], ImportanceCriterion.ROUTER_NORM)[path],
        np.linalg.norm(router, axis=1),
        rtol=1e-6,
        atol=1e-6,
    )

    # Frequency and activation norm, on a bare MoE layer whose inputs we know.
    dropless = TopKGating.default_config().set(train_capacity_factor=None)
    layer_cfg = MoE.default_config().set(input_dim=D, hidden_dim=F, num_experts=E, gating=dropless)
    layer = layer_cfg.instantiate(rngs=nnx.Rngs(2))
    l_wi_0, l_wi_1, l_wo, l_router = (
        np.asarray(w[...], np.float64) for w in (layer.wi_0, layer.wi_1, layer.wo, layer.router)
    )
    calibration_x = [np.asarray(jax.random.normal(jax.random.key(s), (2, 6, D))) for s in (1, 2)]
    frequency, activation = np.zeros(E), np.zeros(E)
    for x in calibration_x:
        tokens = x.reshape(-1, D).astype(np.float64)
        top = np.argsort(-(tokens @ l_router), axis=-1)[:, :2]
        counts = np.bincount(top.ravel(), minlength=E)
        frequency += counts / counts.sum() / 2
        for e in range(E):
            xs = tokens[(top == e).any(-1)]
            a = xs @ l_wi_0[e]
            out = (a / (1 + np.exp(-a)) * (xs @ l_wi_1[e])) @ l_wo[e]
            activation[e] += (np.linalg.norm(out, axis=-1).mean() if len(xs) else 0.0) / 2
    layer_batches = [{"x": jnp.asarray(x)} for x in calibration_x]
    layer_loss = lambda m, b: jnp.sum(m(b["x"]))
    for criterion, expected in (
        (ImportanceCriterion.FREQUENCY, frequency),
        (ImportanceCriterion.ACTIVATION_NORM, activation),
    ):
        scores = expert_importance(layer, layer_batches, criterion, loss_fn=layer_loss)
        np.testing.assert_allclose(scores[""], expected, rtol=1e-4, atol=1e-6, err_msg=str(criterion))

    # Gradient norm: per expert, sqrt of the summed squared gradients of its weights over the batches.
    graphdef, state = nnx.split(model)
    calibration = [batch(6, seed=1), batch(6, seed=2)]
    squares = np.zeros((L, E))
    loss = lambda s, b: nnx.merge(graphdef, s)(b)[0]
    for b in calibration:
        grads = jax.grad(loss)(state, b)["stack"]["layers"]["feed_forward"]
        for name in ("wi_0", "wi_1", "wo"):
            squares += (np.asarray(grads[name].get_value(), np.float64) ** 2).sum((2, 3))
    np.testing.assert_allclose(
        expert_importance(model, calibration, ImportanceCriterion.GRADIENT_NORM)[path],
        np.sqrt(squares),
        rtol=1e-4,
        atol=1e-7,
    )


def test_iterative_pruning_reestimates_importance_on_the_pruned_model(monkeypatch):
    cfg = moe_decoder()
    model = cfg.instantiate(rngs=nnx.Rngs(0))
    seen = []
    original = experts.expert_importance

    def recording(model, batches, criterion, **kw):
        scores = original(model, batches, criterion, **kw)
        seen.append({p: s.shape for p, s in scores.items()})
        return scores

    monkeypatch.setattr(experts, "expert_importance", recording)
    calibration = [batch(3)]
    result = prune(cfg, model, calibration, num_to_prune=3, rounds=2, criterion=ImportanceCriterion.FREQUENCY)
    assert seen == [{"stack/layers/feed_forward": (L, E)}, {"stack/layers/feed_forward": (L, E - 2)}]
    kept = result.kept["stack/layers/feed_forward"]
    assert kept.shape == (L, E - 3)
    assert all(len(set(row)) == E - 3 and row.max() < E and list(row) == sorted(row) for row in kept)
    np.testing.assert_allclose(logits(result.build(), calibration[0]), logits(model, calibration[0]), atol=1e-6)


def test_lottery_fine_tunes_between_rounds_and_recovery_after_the_last(monkeypatch):
    cfg = moe_decoder()
    model = cfg.instantiate(rngs=nnx.Rngs(0))
    events = []
    importance = experts.expert_importance

    def scoring(model, *args, **kw):
        events.append(("score", model.config.stack.layer.feed_forward.num_experts))
        return importance(model, *args, **kw)

    def tuning(model, tuning, **kw):  # The real fine-tune is checked below; here only when it runs, on what.
        events.append(("tune", tuning.steps, model.config.stack.layer.feed_forward.num_experts))

    monkeypatch.setattr(experts, "expert_importance", scoring)
    monkeypatch.setattr(experts, "fine_tune", tuning)
    lottery, recovery = FineTuning([batch()], steps=2), FineTuning([batch()], steps=3)
    prune(cfg, model, [batch()], num_to_prune=3, rounds=2, lottery=lottery, recovery=recovery)
    assert events == [("score", 8), ("tune", 2, 6), ("score", 6), ("tune", 3, 5)]


def test_recovery_fine_tuning_lowers_the_loss_on_its_data_and_is_in_the_result():
    cfg = moe_decoder(top_k=2)
    model = cfg.instantiate(rngs=nnx.Rngs(0))
    sft = [batch(6, seed=s) for s in (5, 6)]
    plain = prune(cfg, model, [batch()], num_to_prune=4, rounds=2)
    recovery = FineTuning(sft, steps=20, optimizer=optax.adam(1e-2))
    recovered = prune(cfg, model, [batch()], num_to_prune=4, rounds=2, recovery=recovery)
    assert recovered.config == plain.config
    np.testing.assert_array_equal(recovered.kept["stack/layers/feed_forward"], plain.kept["stack/layers/feed_forward"])
    assert evaluate(recovered.build(), sft) < evaluate(plain.build(), sft) - 0.5


def test_pruning_below_top_k_is_refused_naming_the_field():
    cfg = moe_decoder(top_k=2)
    model = cfg.instantiate(rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"stack\.layer\.feed_forward\.num_experts=8 minus num_to_prune=7"):
        prune(cfg, model, [batch()], num_to_prune=7)
    with pytest.raises(ValueError, match="rounds=3"):
        prune(cfg, model, [batch()], num_to_prune=2, rounds=3)


def test_a_model_with_weight_transforms_is_refused_naming_the_layer():
    cfg = LoRAModifier.default_config().set(pattern="feed_forward").instantiate()(moe_decoder())
    with pytest.raises(ConfigValueError, match=r"^stack\.layer\.feed_forward\.weight_transform is a LoRA: pruning"):
        prune(cfg, cfg.instantiate(rngs=nnx.Rngs(0)), [batch()], num_to_prune=2)


def test_importance_of_a_model_without_moe_is_refused():
    model = moe_decoder().clone().instantiate(rngs=nnx.Rngs(0)).embedding
    with pytest.raises(ValueError, match="no MoE layer"):
        expert_importance(model, [], ImportanceCriterion.WEIGHT_NORM)


def test_scores_of_the_wrong_shape_are_refused():
    cfg = moe_decoder()
    model = cfg.instantiate(rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"not \[\.\.\., num_experts\]"):
        experts.drop_experts(cfg, model, {"stack/layers/feed_forward": jnp.zeros((L, E + 1))}, 1)
