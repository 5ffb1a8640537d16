"""Every named feature: its user code is what its modifier does, it changes the model, and the model still runs."""

import flax.nnx as nnx
import jax.numpy as jnp
import numpy as np
import pytest

from axmini.config import find_configs, map_configs
from axmini.features import FEATURES
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
def test_user_code_matches_modifier_and_patched_model_runs(name):
    feature = FEATURES[name]
    base = _plain_tiny()
    patched = feature.apply(base)
    assert patched == feature.modifier().instantiate()(base)
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


def test_rope_feature_reaches_every_attention():
    patched = FEATURES["rope"].apply(_plain_tiny())
    assert len(find_configs(patched, RoPEProjection)) == len(
        find_configs(_plain_tiny(), lambda c: "input_linear" in c.field_names())
    )
