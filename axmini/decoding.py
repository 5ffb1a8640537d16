"""Text generation with a KV cache, on the decoder's one code path: prefill the prompt, then extend by one
token per step inside a jitted `jax.lax.while_loop`.

Prompts are RIGHT-padded: row b holds its prompt in `prompt_ids[b, :prompt_lengths[b]]`; what follows is
ignored (prefilled as padding, segment 0, so it never enters the cache). Each row then continues at its
own positions, prompt_lengths[b], prompt_lengths[b] + 1, ... Sampling is greedy at temperature 0, else
softmax(logits / temperature) restricted to the top-k tokens and/or the top-p nucleus. A row stops after
emitting one of `stop_ids`; the loop ends when every row has stopped or `max_new_tokens` are out.

With a `constraint` (axmini/guided.py: a regex or JSON schema as token tables on device), the logits are masked at
every step to the tokens that keep each row's output a prefix of a match that can still end within the tokens left;
each row carries its automaton state, and stops after the EOS its accepting state allows.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np

from axmini.guided import GuidedGenerationError, TokenConstraint, constrain_logits
from axmini.layers.decoder import Decoder

Array = jax.Array


class GenerateOutput(NamedTuple):
    tokens: Array  # [B, max_new_tokens] int32; pad_id after a row's stop token.
    lengths: Array  # [B] int32: tokens generated per row, its stop token included.


def sample_logits(
    logits: Array,
    rng: Array,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> Array:
    """Token ids [B] drawn from `logits` [B,V]: argmax at temperature 0, else a top-k / top-p sample."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits >= kth, logits, -jnp.inf)
    if top_p is not None:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep the most likely tokens until their mass reaches top_p (the first one always).
        keep = jnp.cumsum(probs, axis=-1) - probs < top_p
        threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits >= threshold, logits, -jnp.inf)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _check_sampling(temperature: float, top_k: int | None, top_p: float | None, vocab_size: int) -> None:
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    if top_k is not None and not 1 <= top_k <= vocab_size:
        raise ValueError(f"top_k={top_k} must be in [1, vocab_size={vocab_size}] (or None: off)")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1] (or None: off)")


def generate(
    model: Decoder,
    prompt_ids: Array,
    *,
    max_new_tokens: int,
    prompt_lengths: Array | None = None,
    max_length: int | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_ids: Sequence[int] = (),
    rng: Array | None = None,
    cache_dtype: Any = jnp.float32,
    constraint: TokenConstraint | None = None,
) -> GenerateOutput:
    """Continues each right-padded prompt in `prompt_ids` [B,P] by up to `max_new_tokens` tokens.

    `max_length` is the number of positions the KV cache holds (default P + max_new_tokens); generating
    past it is refused. `prompt_lengths` [B] defaults to P for every row and must be >= 1. With a `constraint`
    every row's output matches it (refused before decoding when no match fits in `max_new_tokens`).
    """
    batch, prompt_len = prompt_ids.shape
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    _check_sampling(temperature, top_k, top_p, model.config.vocab_size)
    if prompt_lengths is None:
        prompt_lengths = jnp.full((batch,), prompt_len, jnp.int32)
    elif not isinstance(prompt_lengths, jax.core.Tracer):
        lengths = np.asarray(prompt_lengths)
        if lengths.shape != (batch,) or lengths.min() < 1 or lengths.max() > prompt_len:
            raise ValueError(f"prompt_lengths={lengths.tolist()} must be [B={batch}] values in [1, P={prompt_len}]")
    # The last token fed back sits at position <= P + max_new_tokens - 2; prefill fills up to P - 1.
    needed = prompt_len + max_new_tokens - 1
    max_length = max_length if max_length is not None else prompt_len + max_new_tokens
    if needed > max_length:
        raise ValueError(
            f"decoding {max_new_tokens} new tokens after prompts of length {prompt_len} needs {needed} cache "
            f"positions, past the cache length max_length={max_length}; raise max_length or lower max_new_tokens"
        )
    if constraint is not None:
        if constraint.next_state.shape[1] != model.config.vocab_size:
            raise ValueError(
                f"the constraint covers {constraint.next_state.shape[1]} token ids, the model has "
                f"vocab_size={model.config.vocab_size}; build it with vocab_size={model.config.vocab_size}"
            )
        if constraint.min_tokens > max_new_tokens:
            raise GuidedGenerationError(
                f"the shortest output matching the constraint has {constraint.min_tokens} tokens, more than "
                f"max_new_tokens={max_new_tokens}; raise max_new_tokens"
            )
    return _generate(
        model,
        jnp.asarray(prompt_ids, jnp.int32),
        jnp.asarray(prompt_lengths, jnp.int32),
        rng if rng is not None else jax.random.key(0),
        max_new_tokens=max_new_tokens,
        max_length=max_length,
        temperature=float(temperature),
        top_k=top_k,
        top_p=top_p,
        stop_ids=tuple(int(s) for s in stop_ids),
        cache_dtype=cache_dtype,
        constraint=constraint,
    )


@functools.partial(
    nnx.jit,
    static_argnames=("max_new_tokens", "max_length", "temperature", "top_k", "top_p", "stop_ids", "cache_dtype"),
)
def _generate(
    model: Decoder,
    prompt_ids: Array,
    prompt_lengths: Array,
    rng: Array,
    *,
    max_new_tokens: int,
    max_length: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    stop_ids: tuple[int, ...],
    cache_dtype: Any,
    constraint: TokenConstraint | None,
) -> GenerateOutput:
    batch, prompt_len = prompt_ids.shape
    pad_id = model.config.pad_id
    sample_fn = functools.partial(sample_logits, temperature=temperature, top_k=top_k, top_p=top_p)
    stops = jnp.asarray(stop_ids, jnp.int32)

    def is_stop(token: Array) -> Array:
        return jnp.isin(token, stops) if stop_ids else jnp.zeros(token.shape, bool)

    def sample(logits: Array, key: Array, state: Array, step: Array) -> tuple[Array, Array, Array]:
        """The next token of each row, its automaton state and whether the row stops with it."""
        if constraint is None:
            token = sample_fn(logits, key)
            return token, state, is_stop(token)
        logits, following = constrain_logits(constraint, logits, state, max_new_tokens - step - 1)
        token = sample_fn(logits, key)
        state = jnp.take_along_axis(following, token[:, None], axis=1)[:, 0]
        return token, state, is_stop(token) | (state == constraint.next_state.shape[0] - 1)

    # Prefill: the whole padded prompt at once; padding (segment 0) is neither cached nor attended.
    positions = jnp.broadcast_to(jnp.arange(prompt_len, dtype=jnp.int32), (batch, prompt_len))
    segment_ids = (positions < prompt_lengths[:, None]).astype(jnp.int32)
    graphdef, state = nnx.split(model)  # Each call runs on a merged copy: nothing it sows leaks out.
    cache = model.init_cache(batch, max_length, cache_dtype)
    out = nnx.merge(graphdef, state).forward(prompt_ids, positions=positions, segment_ids=segment_ids, cache=cache)
    last_logits = jnp.take_along_axis(out.logits, (prompt_lengths - 1)[:, None, None], axis=1)[:, 0]
    rng, key = jax.random.split(rng)
    automaton = (
        jnp.broadcast_to(constraint.initial, (batch,)) if constraint is not None else jnp.zeros((batch,), jnp.int32)
    )
    token, automaton, done = sample(last_logits, key, automaton, jnp.int32(0))
    tokens = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(token)
    lengths = jnp.where(done, 1, max_new_tokens)

    def cond(carry: tuple) -> Array:
        step, _, _, done, *_ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry: tuple) -> tuple:
        step, token, cache, done, tokens, lengths, automaton, rng = carry
        step_model = nnx.merge(graphdef, state)
        positions = (prompt_lengths + step - 1)[:, None]
        out = step_model.forward(token[:, None], positions=positions, cache=cache)
        rng, key = jax.random.split(rng)
        sampled, next_automaton, stops = sample(out.logits[:, 0], key, automaton, step)
        token = jnp.where(done, pad_id, sampled)
        tokens = tokens.at[:, step].set(token)
        lengths = jnp.where(~done & stops, step + 1, lengths)
        automaton = jnp.where(done, automaton, next_automaton)
        return step + 1, token, out.cache, done | stops, tokens, lengths, automaton, rng

    carry = (jnp.int32(1), token, out.cache, done, tokens, lengths, automaton, rng)
    _, _, _, _, tokens, lengths, _, _ = jax.lax.while_loop(cond, body, carry)
    return GenerateOutput(tokens, lengths.astype(jnp.int32))
