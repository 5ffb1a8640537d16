"""Residual linear attention math, against independent numpy references (quadratic and token-by-token)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from axmini.layers import linear_attention
from axmini.layers.linear_attention import (
    FeatureMap,
    LinearState,
    apply_feature_map,
    causal_linear_attention,
    empty_state,
    feature_dim,
)

# Jitted once per shape: far cheaper than running op by op on a busy 2-core machine.
residual_linear_attention = jax.jit(
    linear_attention.residual_linear_attention,
    static_argnames=("window", "feature_map", "chunk_size", "checkpoint_every"),
)

B, H, K, D = 2, 4, 2, 8


def np_phi(x: np.ndarray, kind: FeatureMap) -> np.ndarray:
    x = x.astype(np.float64)
    if kind is FeatureMap.RELU:
        return np.maximum(x, 0.0)
    if kind is FeatureMap.RELU_PAIR:
        return np.concatenate([np.maximum(x, 0.0), np.maximum(-x, 0.0)], axis=-1)

    def softmax(z):
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    return np.concatenate([softmax(x), softmax(-x)], axis=-1)


def quadratic_reference(q, k, v, window, seg, kind=FeatureMap.SOFTMAX_PAIR):
    """o_i = sum over j <= i - window - 1 in i's segment of phi(q_i).phi(k_j) v_j, as one masked matmul."""
    fq, fk = np_phi(q, kind), np_phi(k, kind)
    group = q.shape[2] // k.shape[2]
    fk, v = np.repeat(fk, group, axis=2), np.repeat(v.astype(np.float64), group, axis=2)
    t = np.arange(q.shape[1])
    mask = (t[None, :] <= t[:, None] - window - 1)[None] & (seg[:, :, None] == seg[:, None, :])  # [B, i, j]
    scores = np.einsum("bihf,bjhf->bhij", fq, fk) * mask[:, None]
    return np.einsum("bhij,bjhd->bihd", scores, v)


def scan_reference(q, k, v, window, seg, kind=FeatureMap.SOFTMAX_PAIR):
    """Token by token: S_t = S_{t-1} + phi(k_t)^T v_t (reset at a new segment); o_i = phi(q_i) S_{i-w-1}."""
    fq, fk = np_phi(q, kind), np_phi(k, kind)
    batch, length, heads, _ = q.shape
    group = heads // k.shape[2]
    out = np.zeros((batch, length, heads, v.shape[-1]))
    for b in range(batch):
        state = np.zeros((k.shape[2], fk.shape[-1], v.shape[-1]))
        states = []  # states[t] = S_t of the run that token t belongs to
        for t in range(length):
            if t > 0 and seg[b, t] != seg[b, t - 1]:
                state = np.zeros_like(state)
            state = state + np.einsum("kf,kd->kfd", fk[b, t], v[b, t])
            states.append(state)
        for i in range(length):
            j = i - window - 1
            if j >= 0 and seg[b, j] == seg[b, i]:
                for h in range(heads):
                    out[b, i, h] = fq[b, i, h] @ states[j][h // group]
    return out


def make_inputs(length, seed=0, packed=True):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(B, length, H, D)).astype(np.float32)
    k = rng.normal(size=(B, length, K, D)).astype(np.float32)
    v = rng.normal(size=(B, length, K, D)).astype(np.float32)
    seg = np.ones((B, length), np.int32)
    if packed and length >= 5:  # Row 0: three packed sequences then padding (0); row 1: one sequence.
        cuts = sorted(rng.choice(np.arange(1, length - 1), size=3, replace=False))
        seg[0] = np.searchsorted(cuts, np.arange(length), side="right") + 1
        seg[0, cuts[2] :] = 0
    return q, k, v, seg


# Lengths not divisible by the chunk; windows smaller and larger than the chunk; a chunk longer than the sequence.
@pytest.mark.parametrize(
    ("length", "window", "chunk_size"),
    [(1, 0, 4), (13, 3, 1), (40, 3, 16), (40, 9, 4), (40, 20, 7), (33, 5, 64)],
)
def test_chunked_matches_quadratic_reference(length, window, chunk_size):
    q, k, v, seg = make_inputs(length, seed=length + window)
    expected = quadratic_reference(q, k, v, window, seg)
    out = residual_linear_attention(q, k, v, window=window, segment_ids=jnp.asarray(seg), chunk_size=chunk_size)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("length", "window", "chunk_size", "checkpoint_every", "kind"),
    [
        (29, 2, 4, None, FeatureMap.SOFTMAX_PAIR),
        (29, 7, 5, 3, FeatureMap.RELU),
        (50, 16, 8, 2, FeatureMap.SOFTMAX_PAIR),
        (50, 3, 8, None, FeatureMap.RELU),
    ],
)
def test_chunked_matches_scan(length, window, chunk_size, checkpoint_every, kind):
    q, k, v, seg = make_inputs(length, seed=7)
    expected = scan_reference(q, k, v, window, seg, kind)
    out = residual_linear_attention(
        q,
        k,
        v,
        window=window,
        segment_ids=jnp.asarray(seg),
        feature_map=kind,
        chunk_size=chunk_size,
        checkpoint_every=checkpoint_every,
    )
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)


def test_references_agree_with_each_other():
    q, k, v, seg = make_inputs(31, seed=3)
    np.testing.assert_allclose(quadratic_reference(q, k, v, 5, seg), scan_reference(q, k, v, 5, seg), atol=1e-9)


@pytest.mark.parametrize("window", [0, 4, 11])
def test_linear_branch_sees_exactly_the_tokens_left_of_the_window(window):
    """With v = one-hot(token index) the output tells which keys reached each query."""
    length = 24
    q, k, _, seg = make_inputs(length, seed=5)
    v = np.broadcast_to(np.eye(length, dtype=np.float32)[None, :, None, :], (B, length, K, length))
    out = np.asarray(residual_linear_attention(q, k, v, window=window, segment_ids=jnp.asarray(seg), chunk_size=5))
    seen = out[:, :, 0, :] > 0  # softmax features are positive, so every seen key has a positive weight
    i, j = np.arange(length)[:, None], np.arange(length)[None, :]
    expected = (j <= i - window - 1)[None] & (seg[:, :, None] == seg[:, None, :])
    np.testing.assert_array_equal(seen, expected)
    # The boundary: key i - window - 1 is seen, key i - window is not (row 1 is one segment).
    for query in range(window + 1, length):
        assert seen[1, query, query - window - 1] and not seen[1, query, query - window]


@pytest.mark.parametrize("window", [40, 41, 100])
def test_window_covering_sequence_leaves_linear_branch_silent(window):
    q, k, v, seg = make_inputs(41, seed=2)
    out = residual_linear_attention(q, k, v, window=window, segment_ids=jnp.asarray(seg), chunk_size=8)
    assert np.all(np.asarray(out) == 0.0)


@pytest.mark.parametrize("checkpoint_every", [None, 2])
def test_gradients_match_reference(checkpoint_every):
    q, k, v, seg = make_inputs(21, seed=11)
    window = 3
    cot = np.random.default_rng(1).normal(size=(B, 21, H, D)).astype(np.float32)
    seg_j = jnp.asarray(seg)

    def chunked(q, k, v):
        out = residual_linear_attention(
            q, k, v, window=window, segment_ids=seg_j, chunk_size=4, checkpoint_every=checkpoint_every
        )
        return jnp.sum(out * cot)

    def reference(q, k, v):  # A dense jax transcription of the quadratic reference, for jax.grad.
        fq, fk = apply_feature_map(q, FeatureMap.SOFTMAX_PAIR), apply_feature_map(k, FeatureMap.SOFTMAX_PAIR)
        fk, vv = jnp.repeat(fk, H // K, axis=2), jnp.repeat(v, H // K, axis=2)
        t = jnp.arange(q.shape[1])
        mask = (t[None, :] <= t[:, None] - window - 1)[None] & (seg_j[:, :, None] == seg_j[:, None, :])
        scores = jnp.einsum("bihf,bjhf->bhij", fq, fk) * mask[:, None]
        return jnp.sum(jnp.einsum("bhij,bjhd->bihd", scores, vv) * cot)

    # The jax reference itself is checked against the numpy one, so the gradients compare two sound values.
    np.testing.assert_allclose(
        float(reference(q, k, v)), float(np.sum(quadratic_reference(q, k, v, window, seg) * cot)), rtol=1e-5, atol=1e-5
    )
    got = jax.jit(jax.grad(chunked, argnums=(0, 1, 2)))(q, k, v)
    want = jax.jit(jax.grad(reference, argnums=(0, 1, 2)))(q, k, v)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5)


def test_state_checkpointing_uses_remat():
    q, k, v, _ = make_inputs(16)

    def uses_remat(every):
        jaxpr = jax.make_jaxpr(
            lambda q: linear_attention.residual_linear_attention(
                q, k, v, window=2, chunk_size=4, checkpoint_every=every
            )
        )(q)
        return "remat" in str(jaxpr)

    assert uses_remat(2) and not uses_remat(None)


def test_state_carries_over_between_calls():
    """Two calls chained through the returned state equal one call: what decoding relies on."""
    length, cut = 30, 17
    q, k, v, seg = make_inputs(length, seed=4)
    fq, fk = apply_feature_map(q, FeatureMap.RELU), apply_feature_map(k, FeatureMap.RELU)
    seg = jnp.asarray(seg)
    causal = jax.jit(causal_linear_attention, static_argnames=("chunk_size",))
    whole, final = causal(fq, fk, v, q_segment_ids=seg, k_segment_ids=seg, chunk_size=8)
    first, mid = causal(
        fq[:, :cut], fk[:, :cut], v[:, :cut], q_segment_ids=seg[:, :cut], k_segment_ids=seg[:, :cut], chunk_size=8
    )
    second, end = causal(
        fq[:, cut:], fk[:, cut:], v[:, cut:], q_segment_ids=seg[:, cut:], k_segment_ids=seg[:, cut:], initial=mid
    )
    np.testing.assert_allclose(np.concatenate([first, second], axis=1), whole, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(end.state, final.state, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(end.segment_ids, final.segment_ids)
    assert end.state.shape == (B, K, D, D) == empty_state(B, K, D, D).state.shape


def test_feature_maps_match_definition():
    x = np.random.default_rng(0).normal(size=(3, 6)).astype(np.float32)
    for kind in FeatureMap:
        phi = np.asarray(apply_feature_map(x, kind))
        np.testing.assert_allclose(phi, np_phi(x, kind), rtol=1e-6, atol=1e-7)
        assert phi.shape[-1] == feature_dim(6, kind)


def test_bad_arguments_are_refused():
    q, k, v, _ = make_inputs(8)
    with pytest.raises(ValueError, match="window must be >= 0"):
        residual_linear_attention(q, k, v, window=-1)
    with pytest.raises(ValueError, match="not a multiple"):
        causal_linear_attention(q[:, :, :3], k, v)
    with pytest.raises(ValueError, match="chunk_size"):
        causal_linear_attention(q, k, v, chunk_size=0)
    with pytest.raises(ValueError, match="checkpoint_every"):
        causal_linear_attention(q, k, v, checkpoint_every=0)
    assert isinstance(empty_state(1, 1, 2, 2), LinearState)
