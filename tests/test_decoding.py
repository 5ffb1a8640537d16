"""Generation: greedy == argmax of the forward pass step by step, ragged prompts, stop tokens, sampling, errors."""

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from axmini.decoding import generate, sample_logits
from axmini.layers.decoder import Decoder
from axmini.layers.position import RoPEModifier

VOCAB, PROMPT, NEW = 32, 5, 6
LENGTHS = np.array([5, 2, 3])


def _model(*, window=None, kv_sharing=None) -> Decoder:
    cfg = Decoder.default_config().set(vocab_size=VOCAB, dim=16)
    cfg.stack.set(num_layers=2, kv_sharing=kv_sharing)
    cfg.stack.layer.self_attention.set(num_heads=4, num_kv_heads=2, sliding_window=window)
    cfg.stack.layer.feed_forward.set(hidden_dim=32)
    cfg.embedding.param_init.set(stddev=0.3)  # Peaked enough to vary the greedy tokens.
    return RoPEModifier.default_config().instantiate()(cfg).instantiate(rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def model():
    return _model()


@pytest.fixture(scope="module")
def prompts():
    ids = np.array(jax.random.randint(jax.random.key(7), (len(LENGTHS), PROMPT), 1, VOCAB))
    for row, length in enumerate(LENGTHS):
        ids[row, length:] = VOCAB - 1  # Right padding: ignored, whatever it holds.
    return ids


@nnx.jit
def _forward(model, ids):
    return model.forward(ids).logits


def _greedy_reference(model, prompts, lengths, steps):
    """Re-runs the full forward pass after each token and takes the argmax at each row's last token."""
    seqs = np.zeros((len(lengths), PROMPT + steps), np.int32)
    seqs[:, :PROMPT] = prompts
    current = np.array(lengths)
    out = []
    for _ in range(steps):
        logits = np.asarray(_forward(model, jnp.asarray(seqs)))
        token = logits[np.arange(len(lengths)), current - 1].argmax(-1)
        seqs[np.arange(len(lengths)), current] = token
        current += 1
        out.append(token)
    return np.stack(out, axis=1)


def test_greedy_matches_argmax_of_forward_step_by_step_with_ragged_prompts(model, prompts):
    out = generate(model, jnp.asarray(prompts), prompt_lengths=jnp.asarray(LENGTHS), max_new_tokens=NEW)
    expected = _greedy_reference(model, prompts, LENGTHS, NEW)
    np.testing.assert_array_equal(out.tokens, expected)
    np.testing.assert_array_equal(out.lengths, [NEW] * len(LENGTHS))
    assert len({tuple(r) for r in expected.tolist()}) > 1  # The check is not vacuous.


def test_ragged_batch_rows_equal_rows_generated_alone(model, prompts):
    batch = generate(model, jnp.asarray(prompts), prompt_lengths=jnp.asarray(LENGTHS), max_new_tokens=NEW)
    row, length = 1, LENGTHS[1]  # The shortest prompt, alone and unpadded.
    alone = generate(model, jnp.asarray(prompts[row : row + 1, :length]), max_new_tokens=NEW)
    np.testing.assert_array_equal(alone.tokens[0], batch.tokens[row])


def test_stop_token_ends_its_row_and_pads_the_rest(model, prompts):
    free = generate(model, jnp.asarray(prompts), prompt_lengths=jnp.asarray(LENGTHS), max_new_tokens=NEW)
    free = np.asarray(free.tokens)
    stop = int(free[0, 2])
    out = generate(
        model, jnp.asarray(prompts), prompt_lengths=jnp.asarray(LENGTHS), max_new_tokens=NEW, stop_ids=(stop,)
    )
    for row in range(len(LENGTHS)):
        hits = np.flatnonzero(free[row] == stop)
        length = hits[0] + 1 if len(hits) else NEW
        assert out.lengths[row] == length
        np.testing.assert_array_equal(out.tokens[row, :length], free[row, :length])
        assert (np.asarray(out.tokens[row, length:]) == model.config.pad_id).all()


def test_generation_past_the_window_with_kv_sharing_matches_forward(prompts):
    model = _model(window=2, kv_sharing=(1, 1))
    out = generate(model, jnp.asarray(prompts), prompt_lengths=jnp.asarray(LENGTHS), max_new_tokens=NEW)
    np.testing.assert_array_equal(out.tokens, _greedy_reference(model, prompts, LENGTHS, NEW))


# ------------------------------------------------------------------------------------------------------
# Sampling.


def test_top_k_one_and_tiny_top_p_are_greedy(model, prompts):
    kw = dict(prompt_lengths=jnp.asarray(LENGTHS), max_new_tokens=NEW)
    greedy = generate(model, jnp.asarray(prompts), **kw).tokens
    top_k = generate(model, jnp.asarray(prompts), temperature=1.0, top_k=1, rng=jax.random.key(3), **kw).tokens
    top_p = generate(model, jnp.asarray(prompts), temperature=1.0, top_p=1e-6, rng=jax.random.key(3), **kw).tokens
    np.testing.assert_array_equal(top_k, greedy)
    np.testing.assert_array_equal(top_p, greedy)


def _sample_counts(logits, n=4000, **kw):
    keys = jax.random.split(jax.random.key(0), n)
    draws = jax.jit(jax.vmap(lambda key: sample_logits(logits[None], key, **kw)[0]))(keys)
    return np.bincount(np.asarray(draws), minlength=logits.shape[-1]) / n


def test_temperature_sampling_follows_the_softmax():
    logits = jnp.array([2.0, 1.0, 0.0, -1.0, 0.5])
    for temperature in (0.5, 2.0):
        expected = np.exp(np.asarray(logits) / temperature)
        np.testing.assert_allclose(
            _sample_counts(logits, temperature=temperature), expected / expected.sum(), atol=0.03
        )


def test_top_k_and_top_p_restrict_the_support():
    logits = jnp.array([2.0, 1.0, 0.0, -1.0, 1.5])
    counts = _sample_counts(logits, temperature=1.0, top_k=2)
    assert set(np.flatnonzero(counts)) == {0, 4}
    probs = np.exp(np.asarray(logits)) / np.exp(np.asarray(logits)).sum()  # sorted: 0.43, 0.26, 0.16, ...
    counts = _sample_counts(logits, temperature=1.0, top_p=0.6)
    assert set(np.flatnonzero(counts)) == {0, 4}  # 0.43 < 0.6 <= 0.43 + 0.26
    kept = probs[[0, 4]] / probs[[0, 4]].sum()
    np.testing.assert_allclose(counts[[0, 4]], kept, atol=0.03)


# ------------------------------------------------------------------------------------------------------
# Bad input.


def test_decoding_past_the_cache_length_is_refused(model, prompts):
    with pytest.raises(ValueError, match=r"needs 10 cache positions, past the cache length max_length=8"):
        generate(model, jnp.asarray(prompts), max_new_tokens=NEW, max_length=8)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"max_new_tokens": 0}, r"max_new_tokens=0 must be >= 1"),
        ({"temperature": -1.0}, r"temperature=-1.0 must be >= 0"),
        ({"temperature": 1.0, "top_k": 0}, r"top_k=0 must be in \[1, vocab_size=32\]"),
        ({"temperature": 1.0, "top_p": 1.5}, r"top_p=1.5 must be in \(0, 1\]"),
        ({"prompt_lengths": np.array([0, 2, 3])}, r"prompt_lengths=\[0, 2, 3\] must be \[B=3\] values in \[1, P=5\]"),
    ],
)
def test_bad_generation_arguments_are_refused(model, prompts, kw, message):
    kw = {"max_new_tokens": NEW, **kw}
    with pytest.raises(ValueError, match=message):
        generate(model, jnp.asarray(prompts), **kw)
