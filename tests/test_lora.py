"""LoRA: a numpy reference, B = 0 is the identity, only adapters train, merge/unmerge, adapters apart from the base."""

import re

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from axmini.layers.linear import Linear
from axmini.layers.weight_transform import transformed_weights
from axmini.lora import (
    ADAPTER_PATTERN,
    LoRA,
    LoRAModifier,
    adapter_state,
    attach_adapter,
    load_adapter,
    merge,
    save_adapter,
    unmerge,
)
from axmini.trainer.input import SyntheticInput
from axmini.trainer.trainer import Trainer
from experiments.decoders import DecoderShape, decoder_config, tiny_decoder

IDS = jnp.asarray(np.arange(24).reshape(3, 8) % 61)


def _randomize_adapters(model, seed):
    """Adapters as after training: B no longer zero."""
    rng = np.random.default_rng(seed)
    state = jax.tree.map(lambda x: jnp.asarray(0.05 * rng.standard_normal(x.shape), x.dtype), adapter_state(model))
    nnx.update(model, state)
    return model


def test_lora_linear_matches_a_numpy_reference():
    cfg = Linear.default_config().set(
        input_dim=6, output_dim=5, weight_transform=LoRA.default_config().set(rank=2, alpha=3.0)
    )
    layer = _randomize_adapters(cfg.instantiate(rngs=nnx.Rngs(0)), 1)
    x = np.random.default_rng(2).standard_normal((4, 6)).astype(np.float32)
    w, a, b = (np.asarray(p[...]) for p in (layer.weight, layer.weight_lora.a, layer.weight_lora.b))
    np.testing.assert_allclose(np.asarray(layer(jnp.asarray(x))), x @ w + 1.5 * (x @ a) @ b, rtol=1e-5, atol=1e-5)


def test_zero_b_leaves_the_output_unchanged():
    plain = tiny_decoder().instantiate(rngs=nnx.Rngs(0))
    model = LoRAModifier.default_config().instantiate()(tiny_decoder()).instantiate(rngs=nnx.Rngs(1))
    nnx.update(model, nnx.state(plain, nnx.Param))  # The same base weights; the adapters as initialized (B = 0).
    assert all(float(jnp.max(jnp.abs(item.transform.b[...]))) == 0 for item in transformed_weights(model, LoRA))
    np.testing.assert_array_equal(np.asarray(model.forward(IDS).logits), np.asarray(plain.forward(IDS).logits))


def test_moe_experts_get_one_adapter_each():
    from axmini.features import FEATURES

    cfg = LoRAModifier.default_config().set(rank=4).instantiate()(FEATURES["moe_token_choice"].apply(tiny_decoder()))
    model = cfg.instantiate(rngs=nnx.Rngs(0))
    lora = model.stack.layers.feed_forward.wi_0_lora
    assert lora.a.shape == (cfg.stack.num_layers, 8, cfg.dim, 4) and lora.b.shape[:3] == (cfg.stack.num_layers, 8, 4)


def test_merged_equals_unmerged_and_unmerge_gives_the_base_back():
    cfg = LoRAModifier.default_config().instantiate()(tiny_decoder())
    model = _randomize_adapters(cfg.instantiate(rngs=nnx.Rngs(0)), 3)
    merged = merge(model)
    assert not transformed_weights(merged)
    np.testing.assert_allclose(merged.forward(IDS).logits, model.forward(IDS).logits, rtol=1e-5, atol=1e-5)
    restored = unmerge(merged, model)
    for item, back in zip(transformed_weights(model, LoRA), transformed_weights(restored, LoRA)):
        np.testing.assert_allclose(back.weight[...], item.weight[...], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(restored.forward(IDS).logits, model.forward(IDS).logits, rtol=1e-5, atol=1e-5)


SMALL = DecoderShape(
    vocab_size=64, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, hidden_dim=64, tied_embeddings=True
)


def _trainer(tmp_path, name, max_step, **kw):
    cfg = Trainer.default_config().set(
        dir=str(tmp_path / name),
        model=decoder_config(SMALL),
        input=SyntheticInput.default_config().set(vocab_size=64, global_batch_size=8, sequence_length=16),
        max_step=max_step,
        progress_bar=False,
        **kw,
    )
    cfg.learner.learning_rate.set(peak_lr=1e-2, warmup_steps=1)
    cfg.checkpointer.set(async_save=False)
    return cfg


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A base run (3 steps), then a LoRA fine-tune of it (3 steps) started with `init_from`."""
    tmp_path = tmp_path_factory.mktemp("lora")
    base = _trainer(tmp_path, "base", 3).instantiate().run()
    cfg = (
        LoRAModifier.default_config()
        .set(rank=4)
        .instantiate()(_trainer(tmp_path, "lora", 3, init_from=str(tmp_path / "base")))
    )
    trainer = cfg.instantiate()
    return base, trainer, trainer.run()


def test_lora_training_changes_only_the_adapters(lora_run):
    base, trainer, result = lora_run
    assert trainer.config.learner.trainable_patterns == [ADAPTER_PATTERN]
    base_params = {p: v.get_value() for p, v in nnx.to_flat_state(base.state["params"])}
    added = []
    for path, variable in nnx.to_flat_state(result.state["params"]):
        if path in base_params:  # Every base tensor bit-identical to the base run's.
            np.testing.assert_array_equal(np.asarray(variable.get_value()), np.asarray(base_params[path]))
        else:
            added.append("/".join(map(str, path)))
    assert added and all(re.search(ADAPTER_PATTERN, path) for path in added)
    model = trainer.model(result.state)  # B started at zero: every adapter trained.
    assert all(float(jnp.max(jnp.abs(item.transform.b[...]))) > 0 for item in transformed_weights(model, LoRA))


def test_optimizer_state_holds_only_adapter_sized_tensors(lora_run):
    _, trainer, result = lora_run
    adapters = {tuple(v.get_value().shape) for _, v in nnx.to_flat_state(adapter_state(trainer.model(result.state)))}
    shapes = {tuple(np.shape(x)) for x in jax.tree.leaves(result.state["opt_state"])}
    assert shapes - {()} == adapters  # Adam's moments for the adapters; scalar counters; nothing for the base.


def test_adapters_save_apart_from_the_base_and_several_attach_to_one_base(lora_run, tmp_path):
    base, trainer, result = lora_run
    tuned = trainer.model(result.state)
    other = _randomize_adapters(nnx.clone(trainer.model(result.state)), 7)
    for name, model in (("a", tuned), ("b", other)):
        save_adapter(tmp_path / name, model, {"note": name})
    size = sum(f.stat().st_size for f in (tmp_path / "a").rglob("*") if f.is_file())
    base_size = sum(np.asarray(x).nbytes for x in jax.tree.leaves(base.state["params"]))
    assert size < base_size  # The item holds the adapters only.
    base_model = _trainer(tmp_path, "x", 1).instantiate().model(base.state)
    outputs = {}
    for name, model in (("a", tuned), ("b", other)):
        adapter = load_adapter(tmp_path / name)
        assert adapter.metadata["note"] == name
        attached = attach_adapter(base_model, adapter)
        outputs[name] = attached.forward(IDS).logits
        np.testing.assert_allclose(outputs[name], model.forward(IDS).logits, rtol=1e-5, atol=1e-5)
    assert not np.allclose(outputs["a"], outputs["b"], rtol=1e-3, atol=1e-3)


def test_loading_an_adapter_into_a_model_of_other_settings_is_refused(lora_run, tmp_path):
    _, trainer, result = lora_run
    save_adapter(tmp_path / "a", trainer.model(result.state))
    other = LoRAModifier.default_config().set(rank=2).instantiate()(decoder_config(SMALL)).instantiate(rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="differ from the model's"):
        load_adapter(tmp_path / "a", other)
    with pytest.raises(ValueError, match="holds no adapter"):
        load_adapter(tmp_path / "missing")
