"""The layer base: parameters with logical axes, sharded and abstract building, aux outputs; first layers vs numpy."""

import warnings

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from golden_files import GoldenMismatchError, check_golden, param_shapes_text
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from axmini.config import config_for_function
from axmini.layers.embedding import Embedding
from axmini.layers.linear import Linear
from axmini.layers.norm import LayerNorm, RMSNorm
from axmini.module import (
    Layer,
    build_abstract,
    build_sharded,
    capture_aux,
    count_params,
    fan_in_normal,
    logical_to_spec,
    param_infos,
    param_table,
    shard_activation,
    sharding_context,
)

RULES = (("embed", "fsdp"), ("mlp", "model"), ("vocab", "model"), ("batch", ("data", "fsdp")))


def _mesh(shape=(2, 4), names=("fsdp", "model")):
    return jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


def _x(shape, dtype=np.float32, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def test_linear_matches_numpy():
    layer = Linear.default_config().set(input_dim=5, output_dim=3, bias=True).instantiate(rngs=nnx.Rngs(1))
    layer.bias[...] = jnp.asarray(_x((3,), seed=2))
    x = _x((2, 4, 5))
    expected = x @ np.asarray(layer.weight[...]) + np.asarray(layer.bias[...])
    np.testing.assert_allclose(layer(jnp.asarray(x)), expected, rtol=1e-5, atol=1e-5)


def test_rmsnorm_matches_numpy():
    layer = RMSNorm.default_config().set(input_dim=6, eps=1e-5).instantiate(rngs=nnx.Rngs(0))
    layer.scale[...] = jnp.asarray(_x((6,), seed=3))
    x = _x((3, 6))
    expected = x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + 1e-5) * np.asarray(layer.scale[...])
    np.testing.assert_allclose(layer(jnp.asarray(x)), expected, rtol=1e-5, atol=1e-5)


def test_layernorm_matches_numpy():
    layer = LayerNorm.default_config().set(input_dim=6).instantiate(rngs=nnx.Rngs(0))
    layer.scale[...] = jnp.asarray(_x((6,), seed=3))
    layer.bias[...] = jnp.asarray(_x((6,), seed=4))
    x = _x((3, 6))
    normalized = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
    expected = normalized * np.asarray(layer.scale[...]) + np.asarray(layer.bias[...])
    np.testing.assert_allclose(layer(jnp.asarray(x)), expected, rtol=1e-5, atol=1e-5)


def test_embedding_lookup_and_attend_match_numpy():
    layer = Embedding.default_config().set(num_embeddings=11, dim=4).instantiate(rngs=nnx.Rngs(0))
    table = np.asarray(layer.weight[...])
    ids = np.array([[0, 3, 10], [5, 5, 1]])
    np.testing.assert_array_equal(layer(jnp.asarray(ids)), table[ids])  # A gather: exact.
    x = _x((2, 4))
    np.testing.assert_allclose(layer.attend(jnp.asarray(x)), x @ table.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "cfg,x_shape",
    [
        (Linear.default_config().set(input_dim=8, output_dim=4, bias=True), (2, 8)),
        (RMSNorm.default_config().set(input_dim=8), (2, 8)),
        (LayerNorm.default_config().set(input_dim=8), (2, 8)),
    ],
)
def test_layers_run_in_bfloat16_close_to_float32(cfg, x_shape):
    layer = cfg.instantiate(rngs=nnx.Rngs(0))
    x = jnp.asarray(_x(x_shape))
    y32, y16 = layer(x), layer(x.astype(jnp.bfloat16))
    assert y16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y16, np.float32), y32, rtol=5e-2, atol=5e-2)


def test_param_dtype_and_initializer_are_configurable():
    cfg = Linear.default_config().set(input_dim=400, output_dim=300, param_dtype=jnp.bfloat16)
    cfg.param_init = config_for_function(fan_in_normal).set(scale=2.0)
    weight = np.asarray(cfg.instantiate(rngs=nnx.Rngs(0)).weight[...], np.float32)
    assert cfg.instantiate(rngs=nnx.Rngs(0)).weight[...].dtype == jnp.bfloat16
    assert weight.std() == pytest.approx(2.0 / np.sqrt(400), rel=0.05)


def test_param_rank_mismatch_is_refused():
    class Bad(Layer):
        def __init__(self, cfg, *, rngs):
            super().__init__(cfg, rngs=rngs)
            self.w = self.param((2, 3), axes=("embed",), rngs=rngs)

    with pytest.raises(ValueError, match=r"Bad: shape \(2, 3\) and axes \('embed',\) differ in rank"):
        Bad.default_config().instantiate(rngs=nnx.Rngs(0))


def test_logical_to_spec_uses_each_mesh_axis_once_and_replicates_indivisible_dims():
    mesh = _mesh()
    assert logical_to_spec(("embed", "mlp"), RULES) == P("fsdp", "model")
    assert logical_to_spec(("batch", "embed"), RULES) == P(("data", "fsdp"), None)
    assert logical_to_spec(("batch", "embed"), RULES, (4, 6), mesh) == P("fsdp", None)  # no data axis in this mesh
    assert logical_to_spec(("vocab", "embed"), RULES, (10, 8), mesh) == P(None, "fsdp")  # 10 % 4 != 0
    assert logical_to_spec((None, "unknown"), RULES) == P(None, None)


def test_sharded_init_places_each_param_on_expected_spec_and_matches_unsharded():
    class Model(Layer):
        def __init__(self, cfg, *, rngs):
            super().__init__(cfg, rngs=rngs)
            self.embed = Embedding.default_config().set(num_embeddings=16, dim=8).instantiate(rngs=rngs)
            self.up = Linear.default_config().set(input_dim=8, output_dim=32, bias=True).instantiate(rngs=rngs)
            self.norm = RMSNorm.default_config().set(input_dim=8).instantiate(rngs=rngs)

    cfg = Model.default_config()
    mesh = _mesh()
    sharded = build_sharded(cfg, mesh, RULES, seed=3)
    expected = {
        "embed/weight": P("model", "fsdp"),
        "up/weight": P("fsdp", "model"),
        "up/bias": P("model"),
        "norm/scale": P("fsdp"),
    }
    for info in param_infos(sharded, mesh, RULES):
        assert info.spec == expected[info.path], info.path
    for path, v in nnx.to_flat_state(nnx.state(sharded, nnx.Param)):
        name = "/".join(map(str, path))
        assert v[...].sharding.spec == expected[name], name
    single = cfg.instantiate(rngs=nnx.Rngs(3))
    for (_, a), (_, b) in zip(nnx.to_flat_state(nnx.state(sharded)), nnx.to_flat_state(nnx.state(single))):
        np.testing.assert_allclose(np.asarray(a[...]), np.asarray(b[...]), rtol=1e-6, atol=1e-7)


def test_abstract_build_inspects_a_10b_parameter_model_without_memory():
    cfg = Linear.default_config().set(input_dim=100_000, output_dim=100_000)
    model = build_abstract(cfg)
    assert isinstance(model.weight.get_value(), jax.ShapeDtypeStruct)
    assert count_params(model) == 10**10
    mesh = _mesh()
    table = param_table(model, mesh, RULES)
    assert "total: 10,000,000,000 parameters (10G), 40GB, 5GB per device" in table


class _Inner(Layer):
    def __call__(self, x):
        self.add_aux_loss("penalty", jnp.sum(x))
        self.add_summary("mean", jnp.mean(x))
        return x


class _Outer(Layer):
    def __init__(self, cfg, *, rngs):
        super().__init__(cfg, rngs=rngs)
        self.first = _Inner.default_config().instantiate(rngs=rngs)
        self.second = _Inner.default_config().instantiate(rngs=rngs)

    def __call__(self, x):
        return self.second(self.first(x) * 2)


def _sown(model):
    return nnx.to_flat_state(nnx.state(model, nnx.Intermediate))


def test_aux_outputs_are_read_back_by_exact_module_path():
    def twice(model, x):
        model(x)
        return model(x)  # a second call in the same step adds up

    model = _Outer.default_config().instantiate(rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, x):
        return capture_aux(twice, nnx.merge(graphdef, state), x)

    output, losses, summaries = step(state, jnp.ones(3))
    np.testing.assert_array_equal(output, 2 * np.ones(3))  # 1 + 1: exact.
    assert summaries == {"first/mean": 1.0, "second/mean": 2.0}
    assert losses == {"first/penalty": 6.0, "second/penalty": 12.0}
    assert len(_sown(model)) == 0  # nothing left behind in the model


def test_aux_outputs_outside_a_capture_are_dropped_without_deprecation_warnings():
    model = _Outer.default_config().instantiate(rngs=nnx.Rngs(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # flax 0.12: Module.sow outside nnx.capture
        np.testing.assert_array_equal(model(jnp.ones(3)), 2 * np.ones(3))
        assert capture_aux(lambda m, x: m(x), model, jnp.ones(3)).losses == {
            "first/penalty": 3.0,
            "second/penalty": 6.0,
        }
    assert len(_sown(model)) == 0


def test_shard_activation_constrains_inside_context_only():
    mesh = _mesh()
    x = jnp.ones((8, 6))

    @jax.jit
    def f(x):
        return shard_activation(x * 2, ("batch", "embed"))

    assert len(f(x).sharding.device_set) == 1
    with sharding_context(mesh, RULES):
        y = jax.jit(lambda x: shard_activation(x * 2, ("batch", "embed")))(x)
    assert y.sharding.is_equivalent_to(NamedSharding(mesh, P("fsdp", None)), 2)


def test_golden_helper_detects_changes_and_updates(tmp_path):
    model = build_abstract(Linear.default_config().set(input_dim=2, output_dim=3))
    text = param_shapes_text(model)
    assert text == "weight: (2, 3) float32 ('embed', 'mlp')"
    path = tmp_path / "golden.txt"
    with pytest.raises(GoldenMismatchError, match="does not exist"):
        check_golden(path, text, update=False)
    check_golden(path, text, update=True)
    check_golden(path, text, update=False)
    with pytest.raises(GoldenMismatchError, match=r"\+weight: \(2, 4\)"):
        check_golden(path, text.replace("3)", "4)"), update=False)
