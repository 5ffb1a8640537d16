"""Named model configs: golden config text and parameter shapes, analytic parameter counts, structure."""

from pathlib import Path

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import pytest
from golden_files import check_golden, param_shapes_text

from axmini.experiments.decoders import MODELS, afm_on_device, afm_on_device_global_local, llama_decoder, tiny_decoder
from axmini.layers.transformer import PatternStack
from axmini.module import build_abstract, count_params

GOLDEN = Path(__file__).parent / "golden" / "models"


@pytest.fixture(scope="module")
def abstract_models():
    return {name: build_abstract(fn()) for name, fn in MODELS.items()}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_config_and_parameter_shapes_match_golden(name, abstract_models, update_golden):
    check_golden(GOLDEN / f"{name}.txt", MODELS[name]().debug_string(), update=update_golden)
    check_golden(GOLDEN / f"{name}.params.txt", param_shapes_text(abstract_models[name]), update=update_golden)


def _count(vocab, dim, layers, heads, kv_heads, head_dim, hidden, *, tied, qk_norm=False, kv_layers=None):
    """Parameters of a pre-norm SwiGLU decoder; only the first `kv_layers` layers have k/v projections."""
    kv_layers = layers if kv_layers is None else kv_layers
    per_layer = 2 * dim * heads * head_dim + 3 * dim * hidden + 2 * dim + (head_dim if qk_norm else 0)
    per_kv_layer = 2 * dim * kv_heads * head_dim + (head_dim if qk_norm else 0)
    embeddings = vocab * dim * (1 if tied else 2)
    return embeddings + layers * per_layer + kv_layers * per_kv_layer + dim


EXPECTED_COUNTS = {
    "tiny_decoder": _count(2048, 64, 2, 4, 2, 16, 192, tied=True),
    "llama_tiny": _count(32000, 64, 2, 4, 2, 16, 192, tied=False),
    "llama_100m": _count(32000, 768, 12, 12, 12, 64, 2048, tied=True),
    "llama_1b": _count(128256, 2048, 16, 32, 8, 64, 8192, tied=True),
    "llama_7b": _count(32000, 4096, 32, 32, 32, 128, 11008, tied=False),
    "llama_70b": _count(32000, 8192, 80, 64, 8, 128, 28672, tied=False),
    "afm_on_device": _count(153600, 2048, 56, 16, 2, 128, 6656, tied=True, qk_norm=True, kv_layers=35),
    "afm_on_device_global_local": _count(153600, 2048, 56, 16, 2, 128, 6656, tied=True, qk_norm=True, kv_layers=36),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_parameter_count_matches_analytic_count(name, abstract_models):
    assert count_params(abstract_models[name]) == EXPECTED_COUNTS[name]


def test_llama_sizes_match_published_parameter_counts():
    # Llama 3.2 1B, Llama 2 7B and 70B, as reported by their model cards (exact counts).
    assert EXPECTED_COUNTS["llama_1b"] == 1_235_814_400
    assert EXPECTED_COUNTS["llama_7b"] == 6_738_415_616
    assert EXPECTED_COUNTS["llama_70b"] == 68_976_648_192
    assert 100e6 < EXPECTED_COUNTS["llama_100m"] < 120e6


def test_afm_on_device_shares_kv_35_plus_21(abstract_models):
    stack = abstract_models["afm_on_device"].stack
    assert stack.num_kv_layers == 35
    assert stack.layers.self_attention.input_linear.inner.k.shape == (35, 2048, 2, 128)
    assert stack.shared_kv_layers.self_attention.input_linear.inner.q.shape == (21, 2048, 16, 128)
    assert 2.9e9 < EXPECTED_COUNTS["afm_on_device"] < 3.2e9  # "~3B parameters"
    assert afm_on_device().vocab_size == 153600


def test_afm_global_local_is_three_local_one_global_with_a_global_kv_provider(abstract_models):
    assert isinstance(afm_on_device_global_local().stack, PatternStack.Config)
    stack = abstract_models["afm_on_device_global_local"].stack
    windows = [layer.self_attention.sliding_window for layer in stack.layer_configs()]
    assert windows == [4096, 4096, 4096, None] * 14
    assert windows[stack.num_kv_layers - 1] is None
    assert stack.repeats == (9, 5)  # 36 + 20 layers: the pattern scanned 9 times, then 5 times as KV consumers.


def test_unknown_llama_size_is_refused():
    with pytest.raises(ValueError, match=r"unknown size '3b'; choose one of"):
        llama_decoder("3b")


def test_tiny_decoder_trains_a_step_on_cpu():
    model = tiny_decoder().instantiate(rngs=nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(0), (2, 16), 1, 2048)
    batch = {"input_ids": ids, "target_ids": jnp.roll(ids, -1, axis=1)}
    (loss, _), grads = nnx.jit(nnx.value_and_grad(lambda m, b: m(b), has_aux=True))(model, batch)
    assert jnp.isfinite(loss) and 7.0 < loss < 8.5  # About log(2048) = 7.6 at initialization.
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
