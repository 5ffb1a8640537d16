"""FeedForward against a plain numpy MLP, for every activation, plus the deferred hidden width."""

import flax.nnx as nnx
import numpy as np
import pytest

from axmini.config import config_for_function
from axmini.layers.feed_forward import FeedForward, FeedForwardActivation, scale_hidden_dim
from axmini.module import param_infos


def _np_gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _np_silu(x):
    return x / (1 + np.exp(-x))


_NP_ACT = {
    FeedForwardActivation.SWIGLU: _np_silu,
    FeedForwardActivation.GEGLU: _np_gelu_tanh,
    FeedForwardActivation.GELU: _np_gelu_tanh,
    FeedForwardActivation.RELU: lambda x: np.maximum(x, 0),
    FeedForwardActivation.SILU: _np_silu,
}


@pytest.mark.parametrize("activation", list(FeedForwardActivation))
def test_feed_forward_matches_numpy_reference(activation):
    cfg = FeedForward.default_config().set(input_dim=8, hidden_dim=12, activation=activation)
    layer = cfg.instantiate(rngs=nnx.Rngs(0))
    x = np.random.default_rng(0).normal(size=(2, 3, 8)).astype(np.float32)
    y = np.asarray(layer(x))

    wo = np.asarray(layer.wo[...])
    act = _NP_ACT[activation]
    if activation in (FeedForwardActivation.SWIGLU, FeedForwardActivation.GEGLU):
        h = act(x @ np.asarray(layer.wi_0[...])) * (x @ np.asarray(layer.wi_1[...]))
    else:
        h = act(x @ np.asarray(layer.wi[...]))
    np.testing.assert_allclose(y, h @ wo, rtol=1e-5, atol=1e-5)


def test_gated_weights_have_interface_shapes_and_axes():
    layer = FeedForward.default_config().set(input_dim=8, hidden_dim=12).instantiate(rngs=nnx.Rngs(0))
    infos = {i.path: (i.shape, i.axes) for i in param_infos(layer)}
    assert infos == {
        "wi_0": ((8, 12), ("embed", "mlp")),
        "wi_1": ((8, 12), ("embed", "mlp")),
        "wo": ((12, 8), ("mlp", "embed")),
    }


def test_plain_mlp_has_one_input_projection():
    cfg = FeedForward.default_config().set(input_dim=8, hidden_dim=12, activation=FeedForwardActivation.RELU)
    infos = {i.path for i in param_infos(cfg.instantiate(rngs=nnx.Rngs(0)))}
    assert infos == {"wi", "wo"}


@pytest.mark.parametrize(("dim", "scale", "multiple", "expected"), [(768, 8 / 3, 256, 2048), (100, 4.0, 64, 448)])
def test_scale_hidden_dim_rounds_up_to_multiple(dim, scale, multiple, expected):
    assert scale_hidden_dim(dim, scale=scale, multiple_of=multiple) == expected


def test_deferred_hidden_dim_is_resolved_with_input_dim():
    hidden = config_for_function(scale_hidden_dim, scale=2.0, multiple_of=16)
    layer = FeedForward.default_config().set(input_dim=40, hidden_dim=hidden).instantiate(rngs=nnx.Rngs(0))
    assert layer.hidden_dim == 80
    assert layer.wi_0.shape == (40, 80)


def test_nonpositive_hidden_dim_is_refused_with_field_name():
    cfg = FeedForward.default_config().set(input_dim=8, hidden_dim=0)
    with pytest.raises(ValueError, match=r"hidden_dim resolved to 0"):
        cfg.instantiate(rngs=nnx.Rngs(0))


def test_missing_hidden_dim_is_refused():
    with pytest.raises(ValueError, match="hidden_dim"):
        FeedForward.default_config().set(input_dim=8).instantiate(rngs=nnx.Rngs(0))
