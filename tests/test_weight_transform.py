"""The weight-transform slot: one config reaches every linear weight of every layer kind, selected by config path."""

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from axmini.config import ConfigValueError, find_configs, map_configs
from axmini.features import FEATURES
from axmini.layers.attention import Attention, FusedQKVProjection
from axmini.layers.linear import Linear
from axmini.layers.weight_transform import has_weights, transformed_weights, without_weight_transforms
from axmini.lora import LoRA, LoRAModifier
from axmini.qat import QATModifier
from experiments.decoders import tiny_decoder


def _every_layer_kind():
    """A tiny decoder with an untied head, a fused QKV projection in a KV-sharing stack (so query-only projections
    too) and MoE feed-forwards: every layer class that has weights."""
    cfg = tiny_decoder()
    cfg.stack.num_layers = 8
    cfg.lm_head = Linear.default_config()
    cfg = map_configs(
        cfg,
        Attention.matches,
        lambda a: a.set(input_linear=a.input_linear.set(inner=FusedQKVProjection.default_config())),
    )
    cfg = FEATURES["kv_sharing"].apply(cfg)
    return FEATURES["moe_token_choice"].apply(cfg)


def _transform_params(model, suffix):
    return {
        "/".join(map(str, path)): v.get_value()
        for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
        if any(str(p).endswith(f"_{suffix}") for p in path)
    }


def test_lora_reaches_every_weight_of_every_layer_kind_including_embedding_and_head():
    cfg = LoRAModifier.default_config().set(rank=2, exclude=None).instantiate()(_every_layer_kind())
    model = cfg.instantiate(rngs=nnx.Rngs(0))
    kinds = {type(item.layer).__name__ for item in transformed_weights(model)}
    assert kinds == {"Embedding", "Linear", "FusedQKVProjection", "QueryOnlyProjection", "OutputProjection", "MoE"}
    ids = jnp.asarray(np.arange(16).reshape(2, 8) % 97)

    def loss(model):
        return jnp.sum(jnp.square(model.forward(ids).logits))

    grads = nnx.grad(loss)(model)
    b_grads = _transform_params(grads, "lora")
    b_grads = {path: g for path, g in b_grads.items() if path.endswith("/b")}
    assert len(b_grads) == len(transformed_weights(model))
    # B starts at zero, so its gradient is A^T x^T dL/dy: nonzero exactly when the layer computes with the adapter.
    assert all(float(jnp.max(jnp.abs(g))) > 0 for g in b_grads.values()), [p for p, g in b_grads.items() if not g.any()]


def test_the_router_and_biases_are_not_weights_a_transform_rewrites():
    cfg = QATModifier.default_config().instantiate()(FEATURES["moe_token_choice"].apply(tiny_decoder()))
    model = cfg.instantiate(rngs=nnx.Rngs(0))
    names = {(type(item.layer).__name__, item.name) for item in transformed_weights(model)}
    assert ("MoE", "router") not in names and ("MoE", "wi_0") in names


def test_default_selection_excludes_the_embedding_and_the_head_and_a_pattern_selects_by_path():
    cfg = tiny_decoder()
    cfg.lm_head = Linear.default_config()
    everything = QATModifier.default_config().instantiate()(cfg)
    selected = [p for p, layer in find_configs(everything, has_weights) if layer.weight_transform is not None]
    assert selected == [
        "stack.layer.self_attention.input_linear.inner",
        "stack.layer.self_attention.output_linear",
        "stack.layer.feed_forward",
    ]
    ffn_only = QATModifier.default_config().set(pattern=r"feed_forward$").instantiate()(cfg)
    selected = [p for p, layer in find_configs(ffn_only, has_weights) if layer.weight_transform is not None]
    assert selected == ["stack.layer.feed_forward"]
    assert without_weight_transforms(everything) == cfg
    assert cfg == tiny_decoder().set(lm_head=Linear.default_config())  # The modifier left its input alone.


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(pattern="nothing_has_this_path"), "selects no layer with weights"),
        (dict(pattern="(unclosed"), "is not a valid regex"),
        (dict(bits=3), "bits=3 is not supported"),
    ],
)
def test_bad_modifier_settings_are_one_line_errors_naming_the_field(settings, message):
    with pytest.raises(ConfigValueError, match=message) as error:
        QATModifier.default_config().set(**settings).instantiate()(tiny_decoder())
    assert "\n" not in str(error.value)


def test_a_layer_takes_one_transform():
    quantized = QATModifier.default_config().instantiate()(tiny_decoder())
    with pytest.raises(ConfigValueError, match="already a FakeQuantization; a layer takes one weight transform"):
        LoRAModifier.default_config().instantiate()(quantized)


def test_each_layer_of_a_scanned_stack_gets_its_own_transform_state():
    cfg = LoRAModifier.default_config().set(rank=3).instantiate()(tiny_decoder())
    model = cfg.instantiate(rngs=nnx.Rngs(0))
    a = model.stack.layers.feed_forward.wi_0_lora.a[...]
    assert a.shape == (cfg.stack.num_layers, cfg.dim, 3)
    assert not np.allclose(np.asarray(a[0]), np.asarray(a[1]), rtol=0, atol=1e-6)
    assert model.stack.layers.feed_forward.wi_0_lora.a.get_metadata()["axes"] == ("layers", "embed", None)


def test_transformed_models_run_under_jit_and_match_eager():
    cfg = FEATURES["qat"].apply(tiny_decoder())
    model = cfg.instantiate(rngs=nnx.Rngs(0))
    ids = jnp.asarray(np.arange(16).reshape(2, 8))
    eager = model.forward(ids).logits
    jitted = nnx.jit(lambda m, i: m.forward(i).logits)(model, ids)
    np.testing.assert_allclose(np.asarray(eager), np.asarray(jitted), rtol=1e-5, atol=1e-5)
    assert LoRA.suffix == "lora" and jax.tree.leaves(_transform_params(model, "qat"))
