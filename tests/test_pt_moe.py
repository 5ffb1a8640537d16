"""Parallel-Track MoE: one track is a plain stack, tracks meet only at block boundaries (in the math and in
the compiled program), aux outputs per track, decoding, sharding over a track mesh axis, model configs."""

import re

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from axmini.experiments.decoders import pt_moe_large, pt_moe_tiny
from axmini.layers.attention import Attention
from axmini.layers.feed_forward import FeedForward
from axmini.layers.moe import MoE, MoEModifier, TopKGating
from axmini.layers.pt_moe import ParallelTrackStack, TrackReduction
from axmini.layers.transformer import PatternStack, RepeatedStack, TransformerLayer
from axmini.module import build_abstract, build_sharded, capture_aux, count_params, sharding_context

D, F, E = 8, 16, 4


def block_config():
    """A track block: dense layer then dropless top-2 MoE layer (decoding then matches the forward)."""
    layer = TransformerLayer.default_config().set(
        self_attention=Attention.default_config().set(num_heads=2, num_kv_heads=1),
        feed_forward=FeedForward.default_config().set(hidden_dim=F),
    )
    gating = TopKGating.default_config().set(train_capacity_factor=None, eval_capacity_factor=None)
    moe = MoEModifier.default_config().set(moe=MoE.default_config().set(num_experts=E, gating=gating), every=2)
    return moe.instantiate()(RepeatedStack.default_config().set(layer=layer))  # A PatternStack [dense, MoE].


def pt_config(num_tracks, num_layers=4, block_depth=2, reduction=TrackReduction.MEAN):
    return ParallelTrackStack.default_config().set(
        input_dim=D,
        num_layers=num_layers,
        num_tracks=num_tracks,
        block_depth=block_depth,
        block=block_config(),
        reduction=reduction,
    )


def inputs(batch=2, length=6):
    x = jax.random.normal(jax.random.key(7), (batch, length, D))
    positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
    return x, positions


def run(model, x, positions):
    fn = nnx.jit(lambda m, x, p: capture_aux(lambda m, x, p: m(x, positions=p).x, m, x, p))
    return fn(model, x, positions)


def flat_params(model):
    return {path: v.get_value() for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def plain_block(track_model, block, track, depth):
    """A PatternStack of `depth` layers holding track `track`'s parameters of block `block`."""
    plain = PatternStack.default_config().set(input_dim=D, num_layers=depth, pattern=block_config().pattern)
    plain = plain.instantiate(rngs=nnx.Rngs(99))
    state = nnx.state(plain, nnx.Param)
    source = flat_params(track_model)
    for path, variable in nnx.to_flat_state(state):
        variable.set_value(source[("blocks", block, *path)][track])
    nnx.update(plain, state)
    return plain


@pytest.mark.parametrize("reduction", list(TrackReduction))
def test_one_track_equals_a_plain_stack_of_all_its_layers(reduction):
    model = pt_config(1, num_layers=4, block_depth=2, reduction=reduction).instantiate(rngs=nnx.Rngs(0))
    plain = PatternStack.default_config().set(input_dim=D, num_layers=4, pattern=block_config().pattern)
    plain = plain.instantiate(rngs=nnx.Rngs(1))
    state = nnx.state(plain, nnx.Param)
    source = flat_params(model)
    # The plain stack scans its pattern [dense, MoE] twice; block b of the track model holds repeat b (once).
    for path, variable in nnx.to_flat_state(state):
        variable.set_value(jnp.stack([source[("blocks", b, *path)][0, 0] for b in range(2)]))
    nnx.update(plain, state)
    x, positions = inputs()
    np.testing.assert_allclose(run(model, x, positions).output, run(plain, x, positions).output, rtol=1e-5, atol=1e-5)


def test_tracks_meet_only_at_block_boundaries():
    """Reference: each track's block is run alone (a plain stack with that track's weights), and the
    block outputs are averaged over tracks before the next block. Aux losses add up over tracks."""
    model = pt_config(3, num_layers=4, block_depth=2).instantiate(rngs=nnx.Rngs(0))
    x, positions = inputs()
    result = run(model, x, positions)
    h = x
    expected_losses: dict[str, float] = {}
    for block in range(2):
        outs = []
        for track in range(3):
            out = run(plain_block(model, block, track, 2), h, positions)
            outs.append(out.output)
            for name, value in out.losses.items():
                key = f"blocks/{block}/{name}"
                expected_losses[key] = expected_losses.get(key, 0.0) + float(value)
        h = sum(outs) / 3
    np.testing.assert_allclose(result.output, h, rtol=1e-5, atol=1e-5)
    assert (
        set(result.losses)
        == set(expected_losses)
        == {
            f"blocks/{b}/groups/0/layers/1/feed_forward/{n}"
            for b in range(2)
            for n in ("load_balance_loss", "router_z_loss")
        }
    )
    for key, value in expected_losses.items():
        np.testing.assert_allclose(float(result.losses[key]), value, rtol=1e-5, atol=1e-7)
    # Stacked over tracks and over the block's repeats of its pattern (one here).
    assert result.summaries["blocks/0/groups/0/layers/1/feed_forward/expert_load"].shape == (3, 1, E)


def collectives(hlo: str) -> dict[str, int]:
    ops = re.findall(r"= \S+ (all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter)(?:-start)?\(", hlo)
    return {op: ops.count(op) for op in set(ops)}


@pytest.mark.parametrize("num_layers,block_depth", [(4, 2), (4, 4)])
def test_sharded_over_tracks_communicates_once_per_block_and_matches_one_device(num_layers, block_depth):
    mesh = jax.make_mesh((2,), ("track",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:2])
    rules = [("track", "track")]
    cfg = pt_config(2, num_layers=num_layers, block_depth=block_depth)
    x, positions = inputs()
    expected = run(cfg.instantiate(rngs=nnx.Rngs(0)), x, positions).output
    model = build_sharded(cfg, mesh, rules)
    assert model.blocks[0].groups["0"].layers["1"].feed_forward.wi_0[...].sharding.spec[0] == "track"
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, x, p: nnx.merge(graphdef, state)(x, positions=p).x)
    with sharding_context(mesh, rules):
        y = forward(state, x, positions).block_until_ready()
        hlo = forward.lower(state, x, positions).compile().as_text()
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    # One all-reduce (the mean over tracks) per block boundary; nothing else crosses devices.
    assert collectives(hlo) == {"all-reduce": num_layers // block_depth}


def test_decode_matches_forward():
    model = pt_config(2).instantiate(rngs=nnx.Rngs(0))
    x, positions = inputs(batch=2, length=5)
    full = run(model, x, positions).output

    @nnx.jit
    def step(model, x, positions, cache):
        out = model(x, positions=positions, cache=cache)
        return out.x, out.cache

    cache = model.init_cache(2, 8)
    prefill, cache = step(model, x[:, :3], positions[:, :3], cache)
    outputs = [prefill]
    for t in range(3, 5):
        out, cache = step(model, x[:, t : t + 1], positions[:, t : t + 1], cache)
        outputs.append(out)
    np.testing.assert_allclose(jnp.concatenate(outputs, axis=1), full, rtol=1e-5, atol=1e-5)


def test_sum_reduction_adds_the_tracks():
    mean = pt_config(2, num_layers=2, block_depth=2).instantiate(rngs=nnx.Rngs(0))
    total = pt_config(2, num_layers=2, block_depth=2, reduction=TrackReduction.SUM).instantiate(rngs=nnx.Rngs(0))
    x, positions = inputs()
    np.testing.assert_allclose(
        run(total, x, positions).output, 2 * run(mean, x, positions).output, rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(num_layers=6, block_depth=4), "^num_layers=6 is not a multiple of block_depth=4"),
        (dict(num_tracks=0), "^num_tracks=0 must be positive"),
    ],
)
def test_bad_track_config_is_refused(change, message):
    cfg = pt_config(2).set(**change)
    with pytest.raises(ValueError, match=message):
        cfg.instantiate(rngs=nnx.Rngs(0))


def test_model_configs_build_with_expected_structure():
    tiny = pt_moe_tiny()
    model = build_abstract(tiny)
    block = model.stack.blocks[0]
    layers = [block.groups["0"].layers[str(i)] for i in range(4)]  # The block's 4 layers are one pattern, scanned once.
    assert [type(layer.feed_forward).__name__ for layer in layers] == ["FeedForward", "MoE"] * 2
    assert [layer.self_attention.config.sliding_window for layer in layers] == [64, 64, 64, None]
    wi_0 = layers[1].feed_forward.wi_0
    assert wi_0.get_value().shape == (2, 1, 4, 64, 128)  # [track, repeat, expert, D, F]
    assert wi_0.get_metadata()["axes"] == ("track", "layers", "expert", "embed", "mlp")

    # Large: per track 24 layers; attention q, o [2048, 2048] and k, v [2048, 256]; 12 dense SwiGLU FFNs
    # and 12 MoE layers of 16 experts (+ a [2048, 16] router); two norm scales per layer; tied embedding.
    dim, hidden, heads_dim, kv_dim = 2048, 6144, 2048, 256
    attention = 2 * dim * heads_dim + 2 * dim * kv_dim
    ffn = 3 * dim * hidden
    per_track = 24 * (attention + 2 * dim) + 12 * ffn + 12 * (16 * ffn + dim * 16)
    assert count_params(build_abstract(pt_moe_large())) == 4 * per_track + 153600 * dim + dim
