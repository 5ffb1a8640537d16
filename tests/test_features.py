"""Every named feature: the code the report counts is the code that runs, it changes the model, the model runs."""

import ast
import inspect
import sys

import flax.nnx as nnx
import jax.numpy as jnp
import numpy as np
import pytest

import axmini.features
from axmini.config import find_configs, map_configs
from axmini.features import FEATURES
from axmini.layers.attention import Attention
from axmini.layers.position import RoPEProjection
from experiments.decoders import tiny_decoder

# Expert-choice routing sees the whole sequence: every causal decoder refuses it (a correct refusal).
REFUSED_BY_CAUSAL_DECODERS = {"moe_expert_choice"}


def _plain_tiny():
    """The tiny decoder with 8 layers and no positional encoding, so every feature has something to change."""
    cfg = tiny_decoder()
    cfg.stack.num_layers = 8
    return map_configs(cfg, RoPEProjection, lambda rope: rope.inner)


@pytest.mark.parametrize("name", sorted(FEATURES))
def test_feature_changes_the_model_and_the_patched_model_runs(name):
    feature = FEATURES[name]
    base = _plain_tiny()
    patched = feature.apply(base)
    assert patched.debug_string() != base.debug_string()
    assert base == _plain_tiny()  # the original config is untouched
    if name in REFUSED_BY_CAUSAL_DECODERS:
        with pytest.raises(ValueError, match="is not causal"):
            patched.instantiate(rngs=nnx.Rngs(0))
        return
    model = patched.instantiate(rngs=nnx.Rngs(0))
    ids = jnp.asarray(np.arange(16).reshape(2, 8) % patched.vocab_size)
    logits = nnx.jit(lambda model, ids: model.forward(ids).logits)(model, ids)
    assert logits.shape == (2, 8, patched.vocab_size) and bool(jnp.all(jnp.isfinite(logits)))


@pytest.mark.parametrize("name", sorted(FEATURES))
def test_the_counted_user_code_is_the_body_that_runs_after_the_imports_it_uses(name):
    feature = FEATURES[name]
    (*imports,) = (line for line in feature.user_code.splitlines() if line.startswith("from "))
    body = feature.user_code.splitlines()[len(imports) :]
    source = inspect.getsource(feature.patch)
    assert all(f"    {line}" in source for line in body if line)  # Every counted body line is in the function.
    assert '"""' not in feature.user_code and "def " not in feature.user_code  # Nor its signature or docstring.
    for line in imports:  # Each import binds, in the module the patch runs in, the object it names.
        node = ast.parse(line).body[0]
        module = sys.modules[node.module]
        assert all(getattr(module, a.name) is feature.patch.__globals__[a.name] for a in node.names)
    names = {n.id for n in ast.walk(ast.parse("\n".join(body))) if isinstance(n, ast.Name)}
    assert all(a.name in names for line in imports for a in ast.parse(line).body[0].names)  # Only used imports.
    assert feature.description and feature.description[0].isupper()


def test_features_hold_no_second_copy_of_their_code():
    tree = ast.parse(inspect.getsource(axmini.features))
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id in ("exec", "eval")]
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.Constant) and "instantiate()(cfg)" in str(n.value)]


def test_modifiers_are_the_config_modifier_classes_the_patch_names():
    assert [k.__name__ for k in FEATURES["rope"].modifiers] == ["RoPEModifier"]
    assert [k.__name__ for k in FEATURES["moe_token_choice"].modifiers] == ["MoEModifier"]
    assert FEATURES["qk_norm"].modifiers == []  # An existing knob of the attention slot: no new modifier.


def test_rope_feature_reaches_every_attention():
    patched = FEATURES["rope"].apply(_plain_tiny())
    assert len(find_configs(patched, RoPEProjection)) == len(find_configs(_plain_tiny(), Attention.matches))
