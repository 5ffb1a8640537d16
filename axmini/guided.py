"""Guided generation: decoding constrained so that the output always matches a regular expression or a JSON schema.

A constraint is a finite automaton over *token ids* of the model's vocabulary, precomputed once per schema and used
inside the jitted decoding loop (axmini/decoding.py) as two device arrays: `next_state` [S, V] (the state after
emitting token v in state s, -1 when v would leave the valid prefixes) and `distance` [S] (the fewest tokens from s to
an accepting state). At each step the loop masks the logits to the tokens whose next state can still reach an
accepting state within the tokens left (`distance[next] <= max_new_tokens - step - 1`), samples, and moves each row's
state: one gather per step, no Python callback and no re-tokenization. So every output matches, also when
`max_new_tokens` cuts it short, and EOS is allowed exactly in accepting states.

The regex -> automaton step is `outlines-core` (Rust, the engine of the Outlines library): it builds the
character-level DFA of the regex and walks every token's bytes through it, which is what "the set of token ids that
keep the output a valid prefix" needs, and it turns JSON schemas into regexes (objects with required and optional
keys, arrays, strings, integers, numbers, booleans, null, enums, const, anyOf, nested). We did not write a regex
engine; `interegular` alone gives a character FSM without the token walk. `jsonschema` checks that a schema is a
valid JSON Schema first (one clear error instead of a confusing one from the regex builder), and tests validate
outputs with it.

Tokens are SentencePiece pieces read as text, with the word-start marker (U+2581) as a space; control and unknown
pieces are never produced. The text a constraint matches is the concatenation of the generated pieces
(`constrained_text`), which for SentencePiece is what `decode` gives except for one leading space it would drop.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

WORD_START = "\u2581"  # SentencePiece's marker of a word's leading space.
WHITESPACE = r"[ ]?"  # Between JSON tokens: at most one space (small vocabularies spell JSON more reliably).
UNREACHABLE = np.iinfo(np.int32).max


class GuidedGenerationError(ValueError):
    """A schema or regex that is invalid or that no token sequence of the vocabulary can match."""


class TokenConstraint(NamedTuple):
    """The device arrays of a constraint; a pytree, passed into the jitted decoding loop."""

    next_state: jax.Array  # [S, V] int32: the state after token v in state s; -1: not allowed. Row S-1: the end.
    distance: jax.Array  # [S] int32: fewest tokens from s to an accepting state (0: accepting).
    initial: jax.Array  # [] int32: the start state.

    @property
    def min_tokens(self) -> int:
        """The fewest tokens any matching output has."""
        return int(self.distance[int(self.initial)])


def token_strings(vocabulary: Any) -> dict[int, str]:
    """The text of every token a constrained output may contain: SentencePiece pieces with the word-start marker as
    a space; control (pad, EOS) and unknown pieces left out. `vocabulary` is a seqio SentencePieceVocabulary or a
    SentencePieceProcessor."""
    processor = getattr(vocabulary, "tokenizer", vocabulary)
    if not hasattr(processor, "id_to_piece"):  # E.g. an imported model's tokenizer.json (byte-level BPE).
        raise GuidedGenerationError(
            f"guided generation reads SentencePiece vocabularies; this model's is a {type(vocabulary).__name__}"
        )
    return {
        i: processor.id_to_piece(i).replace(WORD_START, " ")
        for i in range(processor.get_piece_size())
        if not (processor.is_control(i) or processor.is_unknown(i) or processor.is_unused(i))
    }


def constrained_text(vocabulary: Any, ids: Sequence[int]) -> str:
    """The text of generated `ids` as a constraint matched it (EOS and ids outside the vocabulary left out)."""
    strings = token_strings(vocabulary)
    return "".join(strings.get(int(i), "") for i in ids)


def regex_constraint(regex: str, vocabulary: Any, *, vocab_size: int, eos_id: int) -> TokenConstraint:
    """The constraint that outputs match `regex` (fully), over the model's `vocab_size` token ids."""
    import outlines_core

    strings = token_strings(vocabulary)
    pieces: dict[str, list[int]] = collections.defaultdict(list)
    for i, text in strings.items():
        if i < vocab_size and i != eos_id:
            pieces[text].append(i)
    try:
        index = outlines_core.Index(regex, outlines_core.Vocabulary(eos_id, dict(pieces)))
    except ValueError as e:
        raise GuidedGenerationError(f"no output of this vocabulary can match: {' '.join(str(e).split())}") from None
    return _tables(index, vocab_size=vocab_size, eos_id=eos_id)


def schema_regex(schema: Mapping[str, Any] | str) -> str:
    """The regex of the JSON texts that a JSON schema accepts (outlines-core), after checking the schema itself."""
    import jsonschema
    import outlines_core

    schema = json.loads(schema) if isinstance(schema, str) else dict(schema)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        raise GuidedGenerationError(f"not a valid JSON schema: {e.message}") from None
    try:
        return outlines_core.json_schema.build_regex_from_schema(json.dumps(schema), WHITESPACE)
    except (ValueError, TypeError) as e:
        raise GuidedGenerationError(f"unsupported JSON schema: {' '.join(str(e).split())}") from None


def schema_constraint(
    schema: Mapping[str, Any] | str, vocabulary: Any, *, vocab_size: int, eos_id: int
) -> TokenConstraint:
    """The constraint that outputs are JSON texts `schema` accepts."""
    return regex_constraint(schema_regex(schema), vocabulary, vocab_size=vocab_size, eos_id=eos_id)


def tool_call_schema(tools: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The schema of one call of one of `tools` (each `{"name": ..., "parameters": <JSON schema>}`, as in the usual
    function-calling format; `description` is ignored): `{"name": <a tool's name>, "arguments": <its parameters>}`."""
    if not tools:
        raise GuidedGenerationError("tool calling needs at least one tool")
    calls = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, Mapping) or not isinstance(tool.get("name"), str):
            raise GuidedGenerationError(f"tool [{i}] must be an object with a string 'name' and a 'parameters' schema")
        parameters = tool.get("parameters", {"type": "object", "properties": {}})
        calls.append(
            {
                "type": "object",
                "properties": {"name": {"const": tool["name"]}, "arguments": parameters},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    return calls[0] if len(calls) == 1 else {"anyOf": calls}


def _tables(index: Any, *, vocab_size: int, eos_id: int) -> TokenConstraint:
    """Dense device tables of an outlines-core index: states renumbered 0..S-1, EOS from accepting states to an
    absorbing end state, transitions into states that cannot reach an accepting state removed."""
    transitions = index.get_transitions()
    finals = set(index.get_final_states())
    ids = {state: i for i, state in enumerate(sorted(set(transitions) | finals))}
    # Rows padded to a power of two, so that schemas of similar size share one compiled decoding loop. The last row
    # is the end state, reached by EOS; only EOS again from there (the loop pads after a stop anyway).
    rows = 1 << len(ids).bit_length()
    end = rows - 1
    next_state = np.full((rows, vocab_size), -1, np.int32)
    for state, row in transitions.items():
        tokens = np.fromiter((t for t in row if t != eos_id and t < vocab_size), np.int64)
        next_state[ids[state], tokens] = [ids[row[t]] for t in tokens]
    for state in finals:
        next_state[ids[state], eos_id] = end
    next_state[end, eos_id] = end
    distance = _distances(next_state, accepting=[ids[s] for s in finals] + [end])
    next_state = np.where((next_state >= 0) & (distance[np.maximum(next_state, 0)] < UNREACHABLE), next_state, -1)
    initial = ids[index.get_initial_state()]
    if distance[initial] == UNREACHABLE:
        raise GuidedGenerationError("no output of this vocabulary can match (no accepting state is reachable)")
    return TokenConstraint(jnp.asarray(next_state), jnp.asarray(distance), jnp.asarray(initial, jnp.int32))


def _distances(next_state: np.ndarray, accepting: Sequence[int]) -> np.ndarray:
    """Fewest tokens from each state to an accepting one (breadth-first over reversed transitions)."""
    sources, _ = np.nonzero(next_state >= 0)
    targets = next_state[next_state >= 0]
    incoming: dict[int, list[int]] = collections.defaultdict(list)
    for source, target in zip(sources.tolist(), targets.tolist()):
        incoming[target].append(source)
    distance = np.full(len(next_state), UNREACHABLE, np.int32)
    frontier = list(dict.fromkeys(accepting))
    distance[frontier] = 0
    while frontier:
        following = []
        for state in frontier:
            for source in incoming[state]:
                if distance[source] == UNREACHABLE:
                    distance[source] = distance[state] + 1
                    following.append(source)
        frontier = following
    return distance


def constrain_logits(
    constraint: TokenConstraint, logits: jax.Array, state: jax.Array, tokens_left: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Logits [B, V] with every token that leaves the constraint (or cannot finish within `tokens_left` more tokens)
    at -inf, and the next state [B, V] of each token."""
    following = constraint.next_state[state]
    reachable = constraint.distance[jnp.maximum(following, 0)] <= tokens_left
    return jnp.where((following >= 0) & reachable, logits, -jnp.inf), following
