"""Transformer layer and stacks: scan == unrolled, decode == forward, patterns, KV sharing, remat, aux outputs."""

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from axmini.config import REQUIRED, ConfigBase, ConfigValueError, Required
from axmini.layers.attention import Attention, QueryOnlyProjection
from axmini.layers.norm import RMSNorm
from axmini.layers.position import RoPEModifier, RoPEProjection
from axmini.layers.transformer import (
    GlobalLocalModifier,
    KVSharingModifier,
    PatternStack,
    RematModifier,
    RematPolicy,
    RepeatedStack,
    TransformerLayer,
)
from axmini.layers.weight_transform import transformed_weights, without_weight_transforms
from axmini.lora import LoRAModifier
from axmini.module import Layer, build_abstract, capture_aux, param_infos
from axmini.qat import QATModifier

DIM, B, T = 16, 2, 9


def _layer(window=None) -> TransformerLayer.Config:
    cfg = TransformerLayer.default_config()
    cfg.self_attention.set(num_heads=4, num_kv_heads=2, sliding_window=window)
    cfg.feed_forward.set(hidden_dim=32)
    return RoPEModifier.default_config().instantiate()(cfg)


def _repeated(num_layers=4, **kw) -> RepeatedStack.Config:
    return RepeatedStack.default_config().set(input_dim=DIM, num_layers=num_layers, layer=_layer(), **kw)


def _inputs(seed=0):
    x = jax.random.normal(jax.random.key(seed), (B, T, DIM))
    return x, jnp.broadcast_to(jnp.arange(T), (B, T))


@nnx.jit
def _run(stack, x, positions, cache=None):
    """One jitted stack call (eager calls would compile every scan anew)."""
    return stack(x, positions=positions, cache=cache)


def _global_local(num_layers=4, kv_sharing=None):
    cfg = _repeated(num_layers, kv_sharing=kv_sharing)
    return (
        GlobalLocalModifier.default_config().set(local_layers=1, global_layers=1, sliding_window=3).instantiate()(cfg)
    )


def _split_mid_pattern():
    """L G G L | L G : G L (8 layers, KV split 3:1): the first block ends two layers into the second repeat, on a
    global provider; the groups are L G G L (x1), L G (x1) and the consumers G L (x1)."""
    local, global_ = _layer(window=3), _layer()
    return PatternStack.default_config().set(
        input_dim=DIM, num_layers=8, kv_sharing=(3, 1), pattern=[local, global_, global_, local]
    )


STACKS = {
    "repeated_full": lambda: _repeated(),
    "repeated_sliding_window": lambda: _repeated().set(layer=_layer(window=3)),
    "repeated_kv_shared": lambda: _repeated(kv_sharing=(1, 1)),
    "pattern_global_local_kv_shared": lambda: _global_local(kv_sharing=(1, 1)),
    "pattern_kv_split_mid_pattern": _split_mid_pattern,
}


@pytest.mark.parametrize("name", list(STACKS))
def test_prefill_then_extend_matches_forward(name):
    stack = STACKS[name]().instantiate(rngs=nnx.Rngs(0))
    x, positions = _inputs()
    expected = _run(stack, x, positions).x

    prefill = 4
    out = _run(stack, x[:, :prefill], positions[:, :prefill], stack.init_cache(B, T))
    outputs, cache = [out.x], out.cache
    for t in range(prefill, T):  # T > window + prefill: the sliding-window ring wraps around.
        out = _run(stack, x[:, t : t + 1], positions[:, t : t + 1], cache)
        outputs.append(out.x)
        cache = out.cache
    np.testing.assert_allclose(jnp.concatenate(outputs, axis=1), expected, rtol=1e-5, atol=1e-5)


def _unstacked_layers(stack: RepeatedStack) -> list[TransformerLayer]:
    """The scanned stack's layers as separate modules with the same weights (slices of the stacked ones)."""
    layers = []
    for i in range(stack.config.num_layers):
        layer = build_abstract(stack.config.layer.clone(input_dim=DIM))
        nnx.update(layer, jax.tree.map(lambda a, i=i: a[i], nnx.state(stack.layers, nnx.Param)))
        layers.append(layer)
    return layers


def test_scanned_stack_matches_layers_applied_in_turn():
    stack = _repeated(num_layers=3).instantiate(rngs=nnx.Rngs(0))
    x, positions = _inputs()
    expected = x
    for layer in _unstacked_layers(stack):
        expected = _run(layer, expected, positions).x
    np.testing.assert_allclose(_run(stack, x, positions).x, expected, rtol=1e-5, atol=1e-5)


def _unscanned_layers(stack: PatternStack) -> list[TransformerLayer]:
    """Every layer of a scanned PatternStack as its own module, in order, holding its slice of the stacked parameters
    (sliced under tracing too, so gradients reach the stacked parameters)."""
    layers = []
    groups = [stack.groups[str(g)] for g in range(len(stack.repeats))]
    for group, repeats in zip(groups, stack.repeats):
        for r in range(repeats):
            for layer in (group.layers[str(i)] for i in range(len(group.config.layers))):
                graphdef, state = nnx.split(layer)
                layers.append(nnx.merge(graphdef, jax.tree.map(lambda a, r=r: a[r], state)))
    return layers


def _unscanned_forward(stack: PatternStack, x, positions):
    """The unscanned stack: layers applied in turn, second-block layers reading the last first-block layer's k/v."""
    kv = None
    for i, layer in enumerate(_unscanned_layers(stack)):
        out = layer(x, positions=positions, shared_kv=kv if i >= stack.num_kv_layers else None)
        x, kv = out.x, out.kv if i < stack.num_kv_layers else kv
    return x


@pytest.mark.parametrize("name", ["pattern_global_local_kv_shared", "pattern_kv_split_mid_pattern"])
def test_scanned_pattern_stack_matches_unscanned_forward_and_gradients(name):
    stack = STACKS[name]().instantiate(rngs=nnx.Rngs(0))
    x, positions = _inputs()

    def loss(stack, forward):
        return jnp.sum(forward(stack) ** 2)

    scanned = nnx.jit(nnx.value_and_grad(lambda m: loss(m, lambda s: s(x, positions=positions).x)))
    unscanned = nnx.jit(nnx.value_and_grad(lambda m: loss(m, lambda s: _unscanned_forward(s, x, positions))))
    (want, want_grads), (got, got_grads) = unscanned(stack), scanned(stack)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), got_grads, want_grads)
    assert len(jax.tree.leaves(got_grads)) > 20  # Every group's parameters got a gradient.


@pytest.mark.parametrize("name", ["pattern_global_local_kv_shared", "pattern_kv_split_mid_pattern"])
def test_layer_location_points_at_each_layers_parameters(name):
    cfg = STACKS[name]()
    stack = cfg.instantiate(rngs=nnx.Rngs(0))
    params = {"/".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(stack, nnx.Param))}
    layers = _unscanned_layers(stack)
    assert len(layers) == cfg.num_layers
    for i, layer in enumerate(layers):
        prefix, repeat = PatternStack.layer_location(cfg, i)
        for path, variable in nnx.to_flat_state(nnx.state(layer, nnx.Param)):
            stacked = params[f"{prefix}/{'/'.join(map(str, path))}"]
            np.testing.assert_array_equal(stacked[repeat], variable.get_value())
    with pytest.raises(IndexError, match="has no layer 8"):
        PatternStack.layer_location(cfg, 8)


def test_repeated_stack_layer_location_splits_the_kv_sharing_blocks():
    cfg = STACKS["repeated_kv_shared"]()
    locations = [RepeatedStack.layer_location(cfg, i) for i in range(4)]
    assert locations == [("layers", 0), ("layers", 1), ("shared_kv_layers", 0), ("shared_kv_layers", 1)]


@pytest.mark.parametrize("transform", ["lora", "qat"])
def test_weight_transforms_reach_every_layer_of_a_scanned_pattern_stack(transform):
    """LoRA (adapters made nonzero) and QAT on L G L G (one group scanned twice): the stack
    computes what a plain stack does with every transformed weight in place of its weight, the unscanned layers
    agree, and every adapter gets a gradient through the scan."""
    modifier = LoRAModifier.default_config().set(rank=2) if transform == "lora" else QATModifier.default_config()
    cfg = modifier.instantiate()(_global_local(num_layers=4))
    stack = cfg.instantiate(rngs=nnx.Rngs(0))
    assert stack.repeats == (2,)
    for path, variable in nnx.to_flat_state(nnx.state(stack, nnx.Param)):
        if str(path[-2]).endswith("_lora") and path[-1] == "b":  # B starts at zero: the adapter would be a no-op.
            variable.set_value(0.01 * jax.random.normal(jax.random.key(len(path)), variable.get_value().shape))
    transformed = {f"{t.path}/{t.name}": t.value() for t in transformed_weights(stack)}
    weights = {f"{t.path}/{t.name}": t.weight[...] for t in transformed_weights(stack)}
    assert not any(np.allclose(transformed[k], weights[k], rtol=1e-4, atol=1e-6) for k in weights)  # Not identities.
    assert len(transformed) == 2 * 7  # Per group layer: q, k, v, o, wi_0, wi_1, wo.
    plain = build_abstract(without_weight_transforms(cfg))
    plain_params = {"/".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(stack, nnx.Param))}
    state = nnx.state(plain, nnx.Param)
    for path, variable in nnx.to_flat_state(state):
        key = "/".join(map(str, path))
        variable.set_value(transformed.get(key, plain_params[key].get_value()))
    nnx.update(plain, state)
    x, positions = _inputs()
    got = _run(stack, x, positions).x
    np.testing.assert_allclose(got, _run(plain, x, positions).x, rtol=1e-5, atol=1e-5)

    def loss(stack, forward):
        return jnp.sum(forward(stack) ** 2)

    scanned = nnx.jit(nnx.value_and_grad(lambda m: loss(m, lambda s: s(x, positions=positions).x)))
    unscanned = nnx.jit(nnx.value_and_grad(lambda m: loss(m, lambda s: _unscanned_forward(s, x, positions))))
    (want, want_grads), (got_loss, got_grads) = unscanned(stack), scanned(stack)
    np.testing.assert_allclose(got_loss, want, rtol=1e-5, atol=1e-5)
    # Gradients span orders of magnitude within an array: elements agree to 1e-5 of the array's largest.
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(b))))
    jax.tree.map(close, got_grads, want_grads)
    suffix = "_lora" if transform == "lora" else "_qat"
    own = [g for p, g in nnx.to_flat_state(got_grads) if any(str(n).endswith(suffix) for n in p)]
    assert own and all(float(jnp.max(jnp.abs(g.get_value()))) > 0 for g in own)


def test_stacked_parameters_have_leading_layers_axis():
    stack = _repeated(num_layers=3).instantiate(rngs=nnx.Rngs(0))
    infos = {i.path: i for i in param_infos(stack)}
    wi = infos["layers/feed_forward/wi_0"]
    assert wi.shape == (3, DIM, 32) and wi.axes == ("layers", "embed", "mlp")
    q = infos["layers/self_attention/input_linear/inner/q"]
    assert q.shape[0] == 3 and q.axes[0] == "layers"
    # Each layer is initialized from its own key.
    w = np.asarray(stack.layers.feed_forward.wi_0[...])
    assert not np.allclose(w[0], w[1], rtol=1e-3, atol=1e-3)


def _jaxpr_text(fn, module) -> str:
    graphdef, state = nnx.split(module)
    return str(jax.make_jaxpr(lambda s: fn(nnx.merge(graphdef, s)))(state))


@pytest.mark.parametrize(
    ("klass", "policies"),
    [
        (RepeatedStack, [RematPolicy.NOTHING_SAVEABLE, RematPolicy.DOTS_WITH_NO_BATCH_DIMS_SAVEABLE]),
        (PatternStack, [RematPolicy.DOTS_SAVEABLE, RematPolicy.OFFLOAD_DOTS_WITH_NO_BATCH_DIMS]),
    ],
)
def test_remat_keeps_outputs_and_gradients(klass, policies):
    def build(remat):
        cfg = klass.default_config().set(input_dim=DIM, num_layers=2, remat=remat)
        cfg.set(**({"layer": _layer()} if klass is RepeatedStack else {"pattern": [_layer()]}))
        return cfg.instantiate(rngs=nnx.Rngs(0))

    x, positions = _inputs()

    def loss(stack):
        return jnp.sum(stack(x, positions=positions).x ** 2)

    base = build(RematPolicy.NONE)
    assert "remat" not in _jaxpr_text(loss, base)
    base_loss, base_grads = nnx.jit(nnx.value_and_grad(loss))(base)
    for policy in policies:
        stack = build(policy)
        assert "remat" in _jaxpr_text(loss, stack)  # jax.checkpoint's primitive.
        remat_loss, remat_grads = nnx.jit(nnx.value_and_grad(loss))(stack)
        np.testing.assert_allclose(remat_loss, base_loss, rtol=1e-5, atol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), remat_grads, base_grads)


# ------------------------------------------------------------------------------------------------------
# Patterns.


def test_global_local_modifier_builds_the_pattern():
    cfg = _repeated(num_layers=8)
    cfg = GlobalLocalModifier.default_config().set(local_layers=3, global_layers=1, sliding_window=5).instantiate()(cfg)
    assert isinstance(cfg, PatternStack.Config)
    stack = build_abstract(cfg)
    windows = [layer.self_attention.sliding_window for layer in stack.layer_configs()]
    assert windows == [5, 5, 5, None, 5, 5, 5, None]
    has_rope = [RoPEProjection.matches(layer.self_attention.input_linear) for layer in stack.layer_configs()]
    assert has_rope == [True, True, True, False] * 2
    assert stack.repeats == (2,)  # One group of the four pattern layers, scanned twice.


def test_global_local_modifier_can_keep_rope_on_global_layers():
    modifier = GlobalLocalModifier.default_config().set(sliding_window=5, strip_global_rope=False).instantiate()
    stack = build_abstract(modifier(_repeated(num_layers=4)))
    assert all(RoPEProjection.matches(layer.self_attention.input_linear) for layer in stack.layer_configs())


def test_pattern_stack_tiles_heterogeneous_layers():
    dense = _layer()
    wide = _layer().set(feed_forward=dense.feed_forward.clone(hidden_dim=48))
    stack = PatternStack.default_config().set(input_dim=DIM, num_layers=4, pattern=[dense, wide])
    stack = build_abstract(stack)
    assert [layer.feed_forward.hidden_dim for layer in stack.layer_configs()] == [32, 48, 32, 48]
    assert stack.groups["0"].layers["1"].feed_forward.wi_0.shape == (2, DIM, 48)  # [repeats, D, F]


def test_pattern_not_dividing_num_layers_is_refused():
    cfg = PatternStack.default_config().set(input_dim=DIM, num_layers=5, pattern=[_layer(), _layer(window=2)])
    with pytest.raises(ValueError, match=r"num_layers=5 is not a multiple of the pattern length len\(.*pattern\)=2"):
        build_abstract(cfg)


def test_global_local_modifier_refuses_bad_window_and_patterned_stacks():
    bad = GlobalLocalModifier.default_config().set(sliding_window=0).instantiate()
    with pytest.raises(ValueError, match="sliding_window=0 must be positive"):
        bad(_repeated())
    patterned = PatternStack.default_config().set(input_dim=DIM, num_layers=4, pattern=[_layer(), _layer()])
    with pytest.raises(ValueError, match="already has a pattern of 2 layer configs"):
        GlobalLocalModifier.default_config().instantiate()(patterned)


def test_nonpositive_num_layers_is_refused():
    with pytest.raises(ValueError, match="num_layers=0 must be positive"):
        build_abstract(_repeated(num_layers=0))


@pytest.mark.parametrize(
    "conflict, message",
    [
        (
            lambda s: s.layer.norm.set(input_dim=8),
            r"^layer\.norm\.input_dim=8 conflicts with layer\.input_dim=16, which",
        ),
        (
            lambda s: s.layer.self_attention.set(input_dim=8),
            r"^layer\.self_attention\.input_dim=8 conflicts with layer\.input_dim",
        ),
        (
            lambda s: s.layer.feed_forward.set(input_dim=8),
            r"^layer\.feed_forward\.input_dim=8 conflicts with layer\.input_dim",
        ),
        (lambda s: s.layer.set(input_dim=8), r"^layer\.input_dim=8 conflicts with input_dim=16, which sets it;"),
    ],
)
def test_a_child_dim_that_conflicts_with_its_parent_is_refused_not_overwritten(conflict, message):
    stack = _repeated(num_layers=2)
    conflict(stack)
    with pytest.raises(ConfigValueError, match=message):
        build_abstract(stack)


# ------------------------------------------------------------------------------------------------------
# KV-cache sharing.


def _kv_params(layer_state) -> list[str]:
    return [p for p, _ in _flat_paths(layer_state) if p.endswith(("inner/k", "inner/v", "k_norm/scale"))]


def _flat_paths(state):
    return [("/".join(map(str, path)), v) for path, v in nnx.to_flat_state(state)]


@pytest.mark.parametrize("split", [(5, 3), (35, 21)])
def test_kv_sharing_second_block_has_no_kv_projections(split):
    cfg = _repeated(num_layers=8, kv_sharing=split)
    cfg.layer.self_attention.qk_norm = RMSNorm.default_config()
    stack = build_abstract(cfg)
    assert stack.num_kv_layers == 5
    assert isinstance(stack.shared_kv_layers.self_attention.input_linear.inner, QueryOnlyProjection)
    assert _kv_params(nnx.state(stack.shared_kv_layers, nnx.Param)) == []
    first = {i.path: i.shape for i in param_infos(stack.layers)}
    assert first["self_attention/input_linear/inner/k"][0] == 5
    assert "self_attention/k_norm/scale" in first


def _cache_bytes(cache) -> int:
    return sum(a.nbytes for a in jax.tree.leaves(cache))


@pytest.mark.parametrize("klass", ["repeated", "pattern"])
def test_kv_sharing_cache_holds_first_block_only_and_shrinks_by_split(klass):
    def build(kv_sharing):
        cfg = _repeated(num_layers=8, kv_sharing=kv_sharing)
        if klass == "pattern":
            cfg = PatternStack.default_config().set(
                input_dim=DIM, num_layers=8, kv_sharing=kv_sharing, pattern=[_layer()]
            )
        return build_abstract(cfg)

    full, shared = build(None).init_cache(B, 12), build((5, 3)).init_cache(B, 12)
    if klass == "repeated":
        assert shared.k.shape[0] == 5 and full.k.shape[0] == 8
    else:  # One group per block, its cache stacked over repeats.
        assert shared[0][0].k.shape[0] == 5 and full[0][0].k.shape[0] == 8
    assert _cache_bytes(shared) / _cache_bytes(full) == 5 / 8


def test_kv_sharing_split_must_divide_num_layers():
    with pytest.raises(ValueError, match=r"kv_sharing=\(5, 3\) does not split .*num_layers=10"):
        build_abstract(_repeated(num_layers=10, kv_sharing=(5, 3)))
    with pytest.raises(ValueError, match=r"kv_sharing=\(4, 0\)"):
        build_abstract(_repeated(num_layers=4, kv_sharing=(4, 0)))


def test_global_consumer_of_a_local_provider_is_refused():
    # Layers L G L G with split 1:1: the provider (layer 1) is global: fine.
    build_abstract(_global_local(kv_sharing=(1, 1)))
    # Split 3:1: the provider is layer 2 (local, window 3) and layer 3 is global: refused.
    with pytest.raises(
        ValueError, match=r"layer 3 attends with sliding_window=None .* layer 2 \(sliding_window=\[3\]\)"
    ):
        build_abstract(_global_local(kv_sharing=(3, 1)))


def _np_layer(layer, x, positions, shared_kv):
    """One pre-norm layer of a PatternStack in float64 numpy: RMSNorm, optional RoPE, grouped-query attention within
    the layer's window (over its own k/v, or over `shared_kv` for a query-only consumer), SwiGLU.
    Returns (x, the k/v it attended over)."""
    attn = layer.self_attention
    proj = attn.input_linear
    rope = proj.config.theta if isinstance(proj, RoPEProjection) else None
    inner = proj.inner if rope is not None else proj

    def rms(v, scale):
        return v / np.sqrt(np.mean(v * v, -1, keepdims=True) + 1e-6) * np.asarray(scale[...], np.float64)

    def rotate(v):
        if rope is None:
            return v
        dh = v.shape[-1]
        angles = positions[:, :, None, None] * rope ** (-np.arange(0, dh, 2) / dh)
        v1, v2 = v[..., : dh // 2], v[..., dh // 2 :]
        return np.concatenate(
            [v1 * np.cos(angles) - v2 * np.sin(angles), v2 * np.cos(angles) + v1 * np.sin(angles)], -1
        )

    def project(h, w):
        return np.einsum("btd,dhk->bthk", h, np.asarray(w[...], np.float64))

    h = rms(x, layer.attention_norm.scale)
    q = rotate(project(h, inner.q))
    k, v = shared_kv if shared_kv is not None else (rotate(project(h, inner.k)), project(h, inner.v))
    group = q.shape[2] // k.shape[2]
    logits = np.einsum("bqhd,bkhd->bhqk", q, np.repeat(k, group, 2)) / np.sqrt(q.shape[-1])
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    window = attn.config.sliding_window
    visible = (j <= i) & ((i - j <= window) if window is not None else True)
    probs = np.exp(np.where(visible, logits, -np.inf) - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.einsum("bhqk,bkhd->bqhd", probs, np.repeat(v, group, 2))
    x = x + np.einsum("bthk,hkd->btd", out, np.asarray(attn.output_linear.weight[...], np.float64))
    h = rms(x, layer.feed_forward_norm.scale)
    ffn = layer.feed_forward
    gate, up = (h @ np.asarray(w[...], np.float64) for w in (ffn.wi_0, ffn.wi_1))
    return x + (gate / (1 + np.exp(-gate)) * up) @ np.asarray(ffn.wo[...], np.float64), (k, v)


def _np_pattern_stack(stack, x, positions):
    """PatternStack in numpy: every second-block layer reads the k/v of the LAST first-block layer."""
    x, positions = np.asarray(x, np.float64), np.asarray(positions, np.float64)
    provided = None
    for i, layer in enumerate(_unscanned_layers(stack)):
        consumer = i >= stack.num_kv_layers
        x, kv = _np_layer(layer, x, positions, provided if consumer else None)
        if not consumer:
            provided = kv
    return x


PROVIDERS = {
    # L G | L G: the provider (layer 1) is global without RoPE; consumers are local and global.
    "global_provider": lambda: _global_local(kv_sharing=(1, 1)),
    # G L | L L: the provider (layer 1) is local; consumers share its window.
    "local_provider": lambda: PatternStack.default_config().set(
        input_dim=DIM, num_layers=4, kv_sharing=(1, 1), pattern=[_layer(), _layer(3), _layer(3), _layer(3)]
    ),
}


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_pattern_stack_kv_sharing_matches_numpy_reference(provider):
    stack = PROVIDERS[provider]().instantiate(rngs=nnx.Rngs(0))
    layers = _unscanned_layers(stack)
    assert stack.num_kv_layers == 2 and all(not layer.self_attention.input_linear.has_kv for layer in layers[2:])
    x, positions = _inputs()
    want = _np_pattern_stack(stack, x, positions)
    np.testing.assert_allclose(np.asarray(_run(stack, x, positions).x), want, rtol=1e-4, atol=1e-5)


class _NoQKVAttention(Layer):
    class Config(Layer.Config):
        input_dim: Required[int] = REQUIRED


def test_kv_sharing_needs_a_qkv_projection_slot():
    cfg = _repeated(num_layers=2, kv_sharing=(1, 1))
    cfg.layer.self_attention = _NoQKVAttention.default_config()
    with pytest.raises(ValueError, match="KV sharing needs layers whose attention has a QKV projection slot"):
        build_abstract(cfg)


def test_remat_modifier_reaches_every_stack():
    class Tree(ConfigBase):
        stacks: list = [_repeated(), _global_local()]

    modifier = RematModifier.default_config().set(policy=RematPolicy.DOTS_SAVEABLE).instantiate()
    assert [stack.remat for stack in modifier(Tree()).stacks] == [RematPolicy.DOTS_SAVEABLE] * 2


def test_kv_sharing_modifier_reaches_every_stack():
    cfg = KVSharingModifier.default_config().set(split=(3, 1)).instantiate()(_global_local(num_layers=8))
    assert cfg.kv_sharing == (3, 1)
    assert _repeated().kv_sharing is None
    assert KVSharingModifier.default_config().instantiate()(_repeated()).kv_sharing == (5, 3)


# ------------------------------------------------------------------------------------------------------
# Aux outputs of scanned layers.


class _SowingFeedForward(Layer):
    """A feed-forward filler that sows an aux loss and a summary (like MoE)."""

    class Config(Layer.Config):
        input_dim: Required[int] = REQUIRED
        hidden_dim: Required[int] = REQUIRED

    def __init__(self, cfg, *, rngs):
        super().__init__(cfg, rngs=rngs)
        self.w = self.param((self.config.input_dim,), axes=("embed",), rngs=rngs)

    def __call__(self, x):
        self.add_aux_loss("l2", jnp.mean(x**2))
        self.add_summary("norm", jnp.sqrt(jnp.sum(x**2)))
        return x * self.w[...]


def test_scanned_aux_losses_sum_over_layers():
    cfg = _repeated(num_layers=3)
    cfg.layer.feed_forward = _SowingFeedForward.default_config().set(hidden_dim=1)
    stack = cfg.instantiate(rngs=nnx.Rngs(0))
    x, positions = _inputs()

    expected_loss, expected_norms, h = 0.0, [], x
    for layer in _unstacked_layers(stack):
        result = capture_aux(_run, layer, h, positions)
        expected_loss += result.losses["feed_forward/l2"]
        expected_norms.append(result.summaries["feed_forward/norm"])
        h = result.output.x

    result = capture_aux(_run, stack, x, positions)
    np.testing.assert_allclose(result.losses["layers/feed_forward/l2"], expected_loss, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(result.summaries["layers/feed_forward/norm"], expected_norms, rtol=1e-5, atol=1e-7)


def test_attention_is_the_default_self_attention():
    assert isinstance(TransformerLayer.default_config().self_attention, Attention.Config)
