"""Model FLOPs per token (the MFU numerator): weights and attention against hand counts and a brute-force mask."""

import numpy as np
import pytest

from axmini.experiments.decoders import DecoderShape, decoder_config
from axmini.layers.kernels import AttentionMask
from axmini.layers.moe import MoE, MoEModifier, TopKGating
from axmini.layers.transformer import GlobalLocalModifier
from axmini.module import build_abstract, count_params
from axmini.trainer.summary import flops_per_token, keys_per_query

VOCAB, DIM, LAYERS, HEADS, KV_HEADS, HIDDEN, T = 100, 32, 4, 4, 2, 64, 64
HEAD_DIM = DIM // HEADS


def shape(**kw) -> DecoderShape:
    return DecoderShape(VOCAB, DIM, LAYERS, HEADS, KV_HEADS, HIDDEN, **{"tied_embeddings": True, **kw})


@pytest.mark.parametrize("length, window", [(1, None), (7, None), (64, None), (64, 5), (64, 63), (64, 100), (6, 5)])
def test_keys_per_query_counts_the_visible_keys_of_the_mask(length, window):
    positions = np.arange(length, dtype=np.int32)[None]
    mask = AttentionMask(positions, positions, sliding_window=window).dense()
    assert keys_per_query(length, window) == pytest.approx(float(np.asarray(mask).sum()) / length)


def attention_flops(windows):
    return sum(12 * HEADS * HEAD_DIM * keys_per_query(T, w) for w in windows)


@pytest.mark.parametrize("tied", [True, False])
def test_dense_decoder_counts_six_per_weight_and_causal_attention(tied):
    model = build_abstract(decoder_config(shape(tied_embeddings=tied)))
    weights = count_params(model) - (0 if tied else VOCAB * DIM)  # An untied table is only looked up.
    assert flops_per_token(model, T) == pytest.approx(6 * weights + attention_flops([None] * LAYERS))


def test_global_local_stack_with_kv_sharing_counts_each_layer_by_its_window():
    cfg = decoder_config(shape(kv_sharing=(1, 1)))
    cfg = GlobalLocalModifier.default_config().set(local_layers=1, global_layers=1, sliding_window=9).instantiate()(cfg)
    model = build_abstract(cfg)  # Layers L G | L G, the second block reading the first block's keys.
    expected = 6 * count_params(model) + attention_flops([9, None, 9, None])
    assert flops_per_token(model, T) == pytest.approx(expected)


def test_routed_experts_count_for_the_share_of_tokens_they_see():
    moe = MoE.default_config().set(num_experts=4, gating=TopKGating.default_config().set(top_k=2))
    model = build_abstract(MoEModifier.default_config().set(moe=moe).instantiate()(decoder_config(shape())))
    experts = LAYERS * 4 * 3 * DIM * HIDDEN  # wi_0, wi_1, wo of 4 experts in every layer.
    weights = count_params(model) - experts + experts * 2 / 4
    assert flops_per_token(model, T) == pytest.approx(6 * weights + attention_flops([None] * LAYERS))
