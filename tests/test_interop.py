"""Hugging Face interop against `transformers` itself: logits and greedy decoding of every family, the sliding-window
mapping at its boundary, bit-exact round trips, sharded import, export of axmini's own models, and bad input."""

import json
import shutil

import flax.nnx as nnx
import jax
import numpy as np
import pytest
import torch
from hf_models import FAMILIES, VOCAB, WINDOW, greedy, logits, make_model, save_model
from transformers import AutoModelForCausalLM
from transformers.masking_utils import causal_mask_function, sliding_window_overlay

from axmini.decoding import generate
from axmini.interop import ConversionError, export_hf, hf_model_config, import_hf
from axmini.interop.safetensors import INDEX_FILE, TensorIndex, TensorSpec, write_safetensors
from axmini.layers.kernels import AttentionMask
from axmini.mesh_rules import default_mesh_rules, make_mesh, select_mesh_rule
from axmini.module import build_abstract

IDS = np.random.default_rng(0).integers(0, VOCAB, (2, 9))


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """{family: (directory, transformers model)} of tiny random float32 models, saved once for the module."""
    root = tmp_path_factory.mktemp("hf")
    return {family: (root / family, save_model(family, root / family)) for family in FAMILIES}


def _model(imported):
    """The axmini Decoder of an import."""
    graphdef = nnx.split(build_abstract(imported.config), nnx.Param, ...)[0]
    return nnx.merge(graphdef, imported.params)


@nnx.jit
def _logits(model, ids):
    return model.forward(ids).logits


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_transformers(hf_dirs, family):
    directory, hf_model = hf_dirs[family]
    got = np.asarray(_logits(_model(import_hf(directory)), IDS))
    np.testing.assert_allclose(got, logits(hf_model, IDS), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_kv_cache_greedy_decoding_matches_transformers_generate(hf_dirs, family):
    directory, hf_model = hf_dirs[family]
    prompt = IDS[:, : WINDOW + 2]  # Decoding runs past the sliding window.
    out = generate(_model(import_hf(directory)), prompt, max_new_tokens=8)
    np.testing.assert_array_equal(np.asarray(out.tokens), greedy(hf_model, prompt, 8))


@pytest.mark.parametrize("query", [WINDOW - 1, WINDOW, WINDOW + 1])
def test_sliding_window_maps_to_the_same_keys_as_transformers(hf_dirs, query):
    """HF's sliding_window=W (keys i-W < j <= i) is axmini's window W - 1 (keys i-(W-1) <= j <= i)."""
    hf_window = sliding_window_overlay(WINDOW)
    hf_keys = [j for j in range(query + 3) if causal_mask_function(0, 0, query, j) and hf_window(0, 0, query, j)]
    _, cfg = hf_model_config(hf_dirs["mistral"][0])
    window = cfg.stack.layer.self_attention.sliding_window
    mask = AttentionMask(np.array([[query]]), np.arange(query + 3)[None], sliding_window=window).dense()
    assert list(np.flatnonzero(np.asarray(mask)[0, 0])) == hf_keys
    assert len(hf_keys) == min(query + 1, WINDOW)


@pytest.fixture(scope="module")
def mistral_one_layer(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf") / "mistral"
    model = make_model("mistral")
    model.model.layers = model.model.layers[:1]
    model.config.num_hidden_layers = 1
    model.save_pretrained(directory)
    return directory, model


def test_sliding_window_decoding_matches_transformers_at_the_boundary(mistral_one_layer):
    """Prompts of W - 1, W and W + 1 tokens (one batch, right-padded), then decoding across the window's edge."""
    directory, hf_model = mistral_one_layer
    lengths = np.array([WINDOW - 1, WINDOW, WINDOW + 1])
    prompts = np.where(np.arange(WINDOW + 1) < lengths[:, None], IDS[:1, : WINDOW + 1], 0)
    out = generate(_model(import_hf(directory)), prompts, prompt_lengths=lengths, max_new_tokens=4)
    for row, length in enumerate(lengths):
        np.testing.assert_array_equal(
            np.asarray(out.tokens[row]), greedy(hf_model, prompts[row : row + 1, :length], 4)[0]
        )


def _tensors(directory):
    index = TensorIndex.open(directory)
    return {name: index.read(name) for name in index.entries}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_round_trip_is_bit_exact_and_loads_in_transformers(hf_dirs, tmp_path, family):
    directory, hf_model = hf_dirs[family]
    imported = import_hf(directory)
    export_hf(imported.config, imported.params, tmp_path / "out", like=imported.model)
    before, after = _tensors(directory), _tensors(tmp_path / "out")
    assert sorted(after) == sorted(before)
    for name in before:
        assert after[name].dtype == before[name].dtype and after[name].tobytes() == before[name].tobytes(), name
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    np.testing.assert_array_equal(logits(reloaded, IDS), logits(hf_model, IDS))


def test_bfloat16_round_trip_keeps_dtype_and_bits(tmp_path):
    save_model("gemma3", tmp_path / "hf", dtype=torch.bfloat16)
    imported = import_hf(tmp_path / "hf")
    assert imported.config.param_dtype == jax.numpy.bfloat16
    export_hf(imported.config, imported.params, tmp_path / "out", like=imported.model)
    before, after = _tensors(tmp_path / "hf"), _tensors(tmp_path / "out")
    assert all(after[n].dtype.name == "bfloat16" and after[n].tobytes() == before[n].tobytes() for n in before)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"


def test_sharded_export_writes_an_index_that_both_sides_read(hf_dirs, tmp_path):
    directory, hf_model = hf_dirs["llama"]
    imported = import_hf(directory)
    export_hf(imported.config, imported.params, tmp_path / "out", like=imported.model, max_shard_bytes=20_000)
    index = json.loads((tmp_path / "out" / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 2
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    np.testing.assert_array_equal(logits(reloaded, IDS), logits(hf_model, IDS))
    again = import_hf(tmp_path / "out")
    np.testing.assert_allclose(np.asarray(_logits(_model(again), IDS)), logits(hf_model, IDS), rtol=1e-4, atol=1e-4)


def test_import_onto_a_mesh_shards_parameters_and_keeps_logits(hf_dirs):
    directory, _ = hf_dirs["qwen3"]
    rule = select_mesh_rule("cpu", default_mesh_rules())
    mesh = make_mesh(rule, jax.devices(), 1)
    sharded = import_hf(directory, mesh=mesh, rules=rule.logical_axis_rules)
    single = import_hf(directory)
    specs = [v.get_value().sharding.spec for _, v in nnx.to_flat_state(sharded.params)]
    assert any(any(axis is not None for axis in spec) for spec in specs)  # Something really is sharded.
    np.testing.assert_allclose(
        np.asarray(_logits(_model(sharded), IDS)), np.asarray(_logits(_model(single), IDS)), rtol=1e-5, atol=1e-5
    )


def test_axmini_model_exports_as_llama_with_the_same_logits(tmp_path):
    from axmini import experiments
    from axmini.interop.params import abstract_params

    cfg = experiments.get("tiny_decoder").model
    model = cfg.instantiate(rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    assert jax.tree.structure(params) == jax.tree.structure(abstract_params(cfg))
    exported = export_hf(cfg, params, tmp_path / "out")
    assert exported.family.architecture == "LlamaForCausalLM"
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 7))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    np.testing.assert_allclose(logits(reloaded, ids), np.asarray(_logits(model, ids)), rtol=1e-4, atol=1e-4)


def test_export_refuses_a_model_no_family_expresses_naming_the_config_path(tmp_path):
    from axmini import experiments

    cfg = experiments.get("tiny_rattention").model
    message = r"model\.stack\.layer\.self_attention\.klass=axmini\.layers\.rattention\.RAttention cannot be expressed"
    with pytest.raises(ConversionError, match=message):
        export_hf(cfg, None, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _rewrite(directory, target, change):
    """A copy of an HF dir whose tensors pass through `change(dict) -> dict`."""
    shutil.copytree(directory, target)
    tensors = change(_tensors(directory))
    (target / "model.safetensors").unlink()
    specs = [TensorSpec(name, value.shape, value.dtype) for name, value in tensors.items()]
    write_safetensors(target, specs, tensors.__getitem__)
    return target


def _with_config(directory, target, **changes):
    shutil.copytree(directory, target)
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, **changes}))
    return target


BAD_INPUTS = {
    "missing config": (
        lambda d, t: (shutil.copytree(d, t), (t / "config.json").unlink()) and t,
        r"config\.json: file not found",
    ),
    "missing weights": (
        lambda d, t: (shutil.copytree(d, t), (t / "model.safetensors").unlink()) and t,
        r"neither model\.safetensors nor model\.safetensors\.index\.json found",
    ),
    "unsupported architecture": (
        lambda d, t: _with_config(d, t, architectures=["GPT2LMHeadModel"]),
        r"config\.json: architectures=\['GPT2LMHeadModel'\] is not supported; supported: LlamaForCausalLM",
    ),
    "wrong shape": (
        lambda d, t: _rewrite(d, t, lambda x: {**x, "model.norm.weight": np.zeros(31, np.float32)}),
        r"model\.safetensors: tensor 'model\.norm\.weight' has shape \[31\], expected \[32\]",
    ),
    "missing tensor": (
        lambda d, t: _rewrite(d, t, lambda x: {k: v for k, v in x.items() if "layers.1.mlp.up_proj" not in k}),
        r"model\.safetensors: tensor 'model\.layers\.1\.mlp\.up_proj\.weight' is missing \(expected shape \[48, 32\]\)",
    ),
    "extra tensor": (
        lambda d, t: _rewrite(d, t, lambda x: {**x, "model.layers.2.mlp.up_proj.weight": np.zeros((48, 32), "f4")}),
        r"model\.safetensors: unexpected tensor 'model\.layers\.2\.mlp\.up_proj\.weight'",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_naming_the_file_or_tensor(hf_dirs, tmp_path, case):
    make, message = BAD_INPUTS[case]
    directory = make(hf_dirs["llama"][0], tmp_path / "bad")
    with pytest.raises(ConversionError, match=message) as error:
        import_hf(directory)
    assert "\n" not in str(error.value)
