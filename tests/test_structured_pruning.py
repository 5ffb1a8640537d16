"""Structured pruning of dense decoders: removing units equals zeroing them (numpy reference), nothing removed is
the identity, GQA groups stay whole, criteria against numpy formulas, gradual rounds, the pruned model trains."""

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from axmini.config import ConfigValueError, map_configs
from axmini.experiments.decoders import DecoderShape, decoder_config
from axmini.layers.feed_forward import FeedForward
from axmini.layers.norm import LayerNorm
from axmini.layers.transformer import GlobalLocalModifier, TransformerLayer
from axmini.lora import LoRAModifier
from axmini.module import count_params
from axmini.pruning import structured
from axmini.pruning.calibration import flat
from axmini.pruning.structured import Criterion, TargetShape, Unit, importance, model_shape, prune
from axmini.qat import QATModifier

V, D, L, H, K, F = 64, 32, 3, 4, 2, 48
DH = D // H


def small_decoder():
    """3 layers, width 32, 4 heads over 2 kv heads (GQA), SwiGLU 48, qk-norm (an RMSNorm that must not change)."""
    return decoder_config(DecoderShape(V, D, L, H, K, F, qk_norm=True))


def batches(count=1, length=8):
    ids = jax.random.randint(jax.random.key(7), (count, 2, length + 1), 1, V)
    return [{"input_ids": i[:, :-1], "target_ids": i[:, 1:]} for i in ids]


def logits(model, ids):
    return np.asarray(nnx.jit(lambda m, x: m.forward(x).logits)(model, ids))


@pytest.fixture(scope="module")
def model():
    return small_decoder().instantiate(rngs=nnx.Rngs(0))


def zeroed_logits(model, unit, kept, ids):
    """Logits of `model` with every unit not in `kept` zeroed, in plain numpy on its parameters."""
    params = {path: np.array(v.get_value()) for path, v in flat(nnx.state(model, nnx.Param)).items()}
    attention, ffn = "stack/layers/self_attention", "stack/layers/feed_forward"
    out = params[f"{attention}/output_linear/weight"]  # [L, H, Dh, D]
    if unit is Unit.FFN:
        for layer, units in enumerate(kept[(ffn, "mlp")]):
            params[f"{ffn}/wo"][layer, np.setdiff1d(np.arange(F), units)] = 0
    elif unit is Unit.HEADS:
        for layer, heads in enumerate(kept[(attention, "heads")]):
            out[layer, np.setdiff1d(np.arange(H), heads)] = 0
    elif unit is Unit.LAYERS:
        dropped = np.setdiff1d(np.arange(L), kept[("stack/layers", "layers")])
        out[dropped] = 0
        params[f"{ffn}/wo"][dropped] = 0
    else:
        dropped = np.setdiff1d(np.arange(D), kept[("", "embed")])
        params["embedding/weight"][:, dropped] = 0
        params["lm_head/weight"][dropped] = 0
        params["output_norm/scale"][dropped] = 0
        for name in (
            "attention_norm/scale",
            "feed_forward_norm/scale",
            "feed_forward/wo",
            "self_attention/output_linear/weight",
        ):
            params[f"stack/layers/{name}"][..., dropped] = 0
        for name in (
            "feed_forward/wi_0",
            "feed_forward/wi_1",
            *(f"self_attention/input_linear/inner/{w}" for w in "qkv"),
        ):
            params[f"stack/layers/{name}"][:, dropped] = 0
    zeroed = nnx.eval_shape(lambda: small_decoder().instantiate(rngs=nnx.Rngs(0)))
    nnx.update(zeroed, nnx.from_flat_state({tuple(p.split("/")): nnx.Param(jnp.asarray(v)) for p, v in params.items()}))
    return logits(zeroed, ids)


@pytest.mark.parametrize(
    "unit, target",
    [
        (Unit.FFN, TargetShape(hidden_dim=20)),
        (Unit.HEADS, TargetShape(num_heads=2, num_kv_heads=1)),  # A whole kv group goes, with its query heads.
        (Unit.HEADS, TargetShape(num_heads=2, num_kv_heads=2)),  # Each group keeps one of its two query heads.
        (Unit.CHANNELS, TargetShape(dim=20)),
        (Unit.LAYERS, TargetShape(num_layers=2)),
    ],
)
def test_removing_units_equals_zeroing_them_in_the_unpruned_model(model, unit, target):
    calibration = batches()
    result = prune(small_decoder(), model, calibration, target, criterion=Criterion.WEIGHT)
    (removal,) = result.removals
    pruned = result.build()
    assert model_shape(pruned) == target.resolve(model_shape(model))
    ids = calibration[0]["input_ids"]
    np.testing.assert_allclose(logits(pruned, ids), zeroed_logits(model, unit, removal.kept, ids), rtol=1e-5, atol=1e-5)
    fresh = result.config.instantiate(rngs=nnx.Rngs(1))  # The returned config builds on its own, to the same shapes.
    assert jax.tree.map(jnp.shape, nnx.state(fresh)) == jax.tree.map(jnp.shape, nnx.state(pruned))


def test_pruning_to_the_models_own_shape_is_the_identity(model):
    cfg = small_decoder()
    own = TargetShape(dim=D, num_layers=L, num_heads=H, num_kv_heads=K, hidden_dim=F)
    for target in (TargetShape(), own):
        result = prune(cfg, model, batches(), target)
        assert result.config == cfg and result.removals == []
        expected = nnx.state(model, nnx.Param)
        jax.tree.map(np.testing.assert_array_equal, nnx.state(result.build(), nnx.Param), expected)


def test_head_pruning_keeps_kv_groups_whole_and_picks_the_top_groups_and_heads():
    rng = np.random.default_rng(0)
    heads, kv_heads = rng.random((L, 8)), rng.random((L, 4))  # 4 groups of 2 query heads; keep 2 groups of 1.
    key = "stack/layers/self_attention"
    scores = {(key, "heads"): heads, (key, "kv_heads"): kv_heads}
    target = structured.ModelShape(dim=D, num_layers=L, num_heads=2, num_kv_heads=2, hidden_dim=F, head_dim=DH)
    kept = structured.select(scores, Unit.HEADS, target)
    for layer in range(L):
        group_scores = kv_heads[layer] + heads[layer].reshape(4, 2).sum(-1)
        groups = sorted(np.argsort(group_scores)[-2:])
        assert list(kept[(key, "kv_heads")][layer]) == groups
        expected = sorted(2 * g + int(np.argmax(heads[layer, 2 * g : 2 * g + 2])) for g in groups)
        assert list(kept[(key, "heads")][layer]) == expected
        # Query head j of the pruned layer reads kv head j // (H'/K'): the group its original head belonged to.
        assert [h // 2 for h in kept[(key, "heads")][layer]] == groups


def test_importance_criteria_match_numpy_formulas(model):
    calibration = batches(2)
    ffn = model.stack.layers.feed_forward
    wi_0, wi_1, wo = (np.asarray(w[...], np.float64) for w in (ffn.wi_0, ffn.wi_1, ffn.wo))
    key = ("stack/layers/feed_forward", "mlp")
    weight = importance(model, [], Unit.FFN, Criterion.WEIGHT)[key]
    expected = np.sqrt((wi_0**2).sum(1) + (wi_1**2).sum(1) + (wo**2).sum(2))
    np.testing.assert_allclose(weight, expected, rtol=1e-6, atol=1e-6)

    graphdef, state = nnx.split(model)
    gradient = jax.jit(jax.grad(lambda s, b: nnx.merge(graphdef, s)(b)[0]))
    taylor = np.zeros((L, F))
    for b in calibration:
        grads = gradient(state, b)["stack"]["layers"]["feed_forward"]
        for name, w in (("wi_0", wi_0), ("wi_1", wi_1), ("wo", wo)):
            g = np.asarray(grads[name].get_value(), np.float64)
            taylor += np.abs(g * w).sum(1 if name != "wo" else 2)
    np.testing.assert_allclose(importance(model, calibration, Unit.FFN)[key], taylor, rtol=1e-4, atol=1e-8)

    # Activation: the mean |hidden unit| of a bare feed-forward whose inputs we know.
    layer = FeedForward.default_config().set(input_dim=D, hidden_dim=F).instantiate(rngs=nnx.Rngs(2))
    xs = [np.asarray(jax.random.normal(jax.random.key(s), (2, 5, D))) for s in (1, 2)]
    a, b, _ = (np.asarray(w[...], np.float64) for w in (layer.wi_0, layer.wi_1, layer.wo))
    hidden = [(x @ a) / (1 + np.exp(-(x @ a))) * (x @ b) for x in xs]
    expected = np.mean([np.abs(h).mean((0, 1)) for h in hidden], axis=0)
    scores = importance(
        layer, [{"x": jnp.asarray(x)} for x in xs], Unit.FFN, Criterion.ACTIVATION, loss_fn=lambda m, b: m(b["x"]).sum()
    )
    np.testing.assert_allclose(scores[("", "mlp")], expected, rtol=1e-5, atol=1e-6)


def test_gradual_pruning_reestimates_importance_on_each_interpolated_shape(model, monkeypatch):
    seen = []
    original = structured.importance

    def recording(model, batches, units, criterion, **kw):
        seen.append((units, model_shape(model)))
        return original(model, batches, units, criterion, **kw)

    monkeypatch.setattr(structured, "importance", recording)
    target = TargetShape(hidden_dim=16, num_layers=1)
    result = prune(small_decoder(), model, batches(), target, criterion=Criterion.WEIGHT, rounds=2)
    shapes = [(units, shape.num_layers, shape.hidden_dim) for units, shape in seen]
    assert shapes == [([Unit.LAYERS, Unit.FFN], 3, 48), ([Unit.LAYERS, Unit.FFN], 2, 32)]  # One pass per round.
    assert model_shape(result.build()) == model_shape(model)._replace(hidden_dim=16, num_layers=1)
    assert [list(r.kept) for r in result.removals] == [
        [("stack/layers", "layers")],
        [("stack/layers/feed_forward", "mlp")],
    ] * 2


def test_pruned_model_trains_and_has_the_analytic_parameter_count(model):
    target = TargetShape(dim=24, num_layers=2, num_heads=2, num_kv_heads=1, hidden_dim=32)
    result = prune(small_decoder(), model, batches(), target, criterion=Criterion.ACTIVATION, rounds=2)
    pruned = result.build()
    dh, per_layer = DH, 2 * 24 * 2 * DH + 2 * 24 * 1 * DH + 3 * 24 * 32 + 2 * 24 + 2 * DH
    assert count_params(pruned) == 2 * V * 24 + 2 * per_layer + 24 and dh == 8
    optimizer = nnx.Optimizer(pruned, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, batch):
        loss, grads = nnx.value_and_grad(lambda m: m(batch)[0])(model)
        optimizer.update(model, grads)
        return loss

    batch = batches()[0]
    losses = [float(step(pruned, optimizer, batch)) for _ in range(8)]
    assert losses[-1] < losses[0] - 0.5


def test_pruning_works_on_every_layer_of_a_pattern_stack():
    cfg = (
        GlobalLocalModifier.default_config()
        .set(local_layers=2, global_layers=1, sliding_window=4)
        .instantiate()(small_decoder())
    )
    model = cfg.instantiate(rngs=nnx.Rngs(0))
    result = prune(cfg, model, batches(), TargetShape(hidden_dim=24, num_heads=2, num_kv_heads=1, dim=16))
    pruned = result.build()
    layers = pruned.stack.layer_configs()  # The scanned stack's layers, in order.
    assert [layer.feed_forward.hidden_dim for layer in layers] == [24] * L
    assert [layer.self_attention.num_heads for layer in layers] == [2] * L
    assert np.all(np.isfinite(logits(pruned, batches()[0]["input_ids"])))


@pytest.mark.parametrize(
    "target, message",
    [
        (TargetShape(hidden_dim=64), r"hidden_dim=64 must be in \[1, 48\]"),
        (TargetShape(num_heads=3, num_kv_heads=2), r"num_heads=3 must be a multiple of num_kv_heads=2"),
        (TargetShape(num_heads=4, num_kv_heads=1), r"at most 2 query heads per key/value head"),
    ],
)
def test_targets_the_model_cannot_reach_are_refused(model, target, message):
    with pytest.raises(ConfigValueError, match=message):
        prune(small_decoder(), model, batches(), target)


def test_layer_pruning_of_a_pattern_stack_and_channel_pruning_through_layernorm_are_refused():
    pattern = GlobalLocalModifier.default_config().set(local_layers=2, global_layers=1).instantiate()(small_decoder())
    with pytest.raises(ConfigValueError, match=r"num_layers: layer pruning needs a RepeatedStack"):
        prune(pattern, pattern.instantiate(rngs=nnx.Rngs(0)), batches(), TargetShape(num_layers=2))
    layernorm = map_configs(small_decoder(), TransformerLayer, lambda c: c.set(norm=LayerNorm.default_config()))
    with pytest.raises(ConfigValueError, match=r"dim: channel pruning keeps outputs exact through RMSNorm only"):
        prune(layernorm, layernorm.instantiate(rngs=nnx.Rngs(0)), batches(), TargetShape(dim=16))


def test_scores_of_the_wrong_shape_are_refused(model):
    target = model_shape(model)._replace(hidden_dim=8)
    with pytest.raises(ValueError, match=r"not \[\.\.\., 48\]"):
        structured.remove(
            small_decoder(), model, Unit.FFN, target, {("stack/layers/feed_forward", "mlp"): np.ones((L, 40))}
        )


@pytest.mark.parametrize("modifier", [LoRAModifier, QATModifier])
def test_a_model_with_weight_transforms_is_refused_naming_the_layer(modifier):
    """Pruning scores and slices plain weights (a LoRA base gets no gradient): refused before any work."""
    cfg = modifier.default_config().set(pattern="feed_forward").instantiate()(small_decoder())
    with pytest.raises(ConfigValueError, match=r"^stack\.layer\.feed_forward\.weight_transform is a .*merge LoRA"):
        prune(cfg, cfg.instantiate(rngs=nnx.Rngs(0)), batches(), TargetShape(hidden_dim=24))
