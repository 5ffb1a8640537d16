"""Guided generation: every output of a random tiny model parses and validates; regexes; tool calls; refusals."""

import json
import re

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import jsonschema
import numpy as np
import pytest
import sentencepiece as spm

from axmini import guided
from axmini.decoding import generate
from axmini.trainer import corpus
from experiments.lm import tiny

SCHEMAS = {
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer"},
            "email": {"type": "string", "maxLength": 10},
        },
        "required": ["name", "age"],
    },
    "nested": {
        "type": "object",
        "properties": {
            "id": {"type": "integer"},
            "owner": {
                "type": "object",
                "properties": {"name": {"type": "string", "maxLength": 8}, "admin": {"type": "boolean"}},
                "required": ["name", "admin"],
            },
        },
        "required": ["id", "owner"],
    },
    "array": {"type": "array", "items": {"type": "number"}, "minItems": 1, "maxItems": 4},
    "enum": {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}, "size": {"enum": [1, 2, 3]}},
        "required": ["color", "size"],
    },
    "mixed": {
        "type": "object",
        "properties": {
            "score": {"type": "number"},
            "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
            "note": {"type": ["string", "null"], "maxLength": 6},
        },
        "required": ["score", "tags", "note"],
    },
}
ROWS = 40  # Per schema: 5 x 40 = 200 outputs.


@pytest.fixture(scope="module")
def vocab():
    return spm.SentencePieceProcessor(model_file=str(corpus.prepare_vocab()))


@pytest.fixture(scope="module")
def model():
    """`tiny`'s model, untrained: guided decoding must give valid outputs whatever the model."""
    return tiny().model.instantiate(rngs=nnx.Rngs(0))


def _sample(model, constraint, rows, max_new_tokens, seed, temperature=1.0):
    prompts = jnp.zeros((rows, 1), jnp.int32)
    out = generate(
        model,
        prompts,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        rng=jax.random.key(seed),
        constraint=constraint,
        stop_ids=(1,),
    )
    return [row[:n].tolist() for row, n in zip(np.asarray(out.tokens), np.asarray(out.lengths))]


def test_two_hundred_samples_across_five_schemas_all_parse_and_validate(model, vocab):
    texts = []
    for i, schema in enumerate(SCHEMAS.values()):
        constraint = guided.schema_constraint(schema, vocab, vocab_size=model.config.vocab_size, eos_id=1)
        for ids in _sample(model, constraint, ROWS, 48, i):
            text = guided.constrained_text(vocab, ids)
            jsonschema.validate(json.loads(text), schema)
            texts.append(text)
    assert len(texts) == 200
    assert len(set(texts)) > 150  # Sampled, not one output repeated.


def test_regex_outputs_match_fully(model, vocab):
    regex = r"(19|20)[0-9]{2}-(0[1-9]|1[0-2])-[0-3][0-9] (ok|error: [a-z ]{1,10})"
    constraint = guided.regex_constraint(regex, vocab, vocab_size=model.config.vocab_size, eos_id=1)
    texts = [guided.constrained_text(vocab, ids) for ids in _sample(model, constraint, 16, 40, 0)]
    assert all(re.fullmatch(regex, text) for text in texts), texts


def test_tool_calling_outputs_one_valid_call(model, vocab):
    tools = [
        {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["c", "f"]}},
                "required": ["city", "unit"],
            },
        },
        {
            "name": "add",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                "required": ["a", "b"],
            },
        },
    ]
    schema = guided.tool_call_schema(tools)
    constraint = guided.schema_constraint(schema, vocab, vocab_size=model.config.vocab_size, eos_id=1)
    calls = [json.loads(guided.constrained_text(vocab, ids)) for ids in _sample(model, constraint, 16, 48, 5)]
    for call in calls:
        tool = next(t for t in tools if t["name"] == call["name"])
        jsonschema.validate(call["arguments"], tool["parameters"])
    assert {call["name"] for call in calls} == {"get_weather", "add"}


def test_outputs_match_even_when_max_new_tokens_cuts_them_short(model, vocab):
    schema = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}  # Unbounded.
    constraint = guided.schema_constraint(schema, vocab, vocab_size=model.config.vocab_size, eos_id=1)
    budget = constraint.min_tokens + 3
    for ids in _sample(model, constraint, 8, budget, 2, temperature=2.0):
        assert len(ids) <= budget
        jsonschema.validate(json.loads(guided.constrained_text(vocab, ids)), schema)
    with pytest.raises(guided.GuidedGenerationError, match="raise max_new_tokens"):
        _sample(model, constraint, 1, constraint.min_tokens - 1, 0)


def test_greedy_constrained_decoding_picks_the_best_allowed_token_at_every_step(model, vocab):
    constraint = guided.regex_constraint(r"(yes|no|maybe)\.", vocab, vocab_size=model.config.vocab_size, eos_id=1)
    (ids,) = _sample(model, constraint, 1, 8, 0, temperature=0.0)
    prefix, state = [0], int(constraint.initial)
    for token in ids:
        logits = np.asarray(model.forward(jnp.asarray([prefix])).logits[0, -1])
        allowed = np.asarray(constraint.next_state[state]) >= 0
        assert token == int(np.argmax(np.where(allowed, logits, -np.inf)))
        state, prefix = int(constraint.next_state[state, token]), [*prefix, token]
    assert re.fullmatch(r"(yes|no|maybe)\.", guided.constrained_text(vocab, ids))


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda v: guided.schema_constraint({"enum": ["\u20ac\u20ac"]}, v, vocab_size=2048, eos_id=1),
            "no output of this vocabulary can match",
        ),
        (
            lambda v: guided.regex_constraint("\u00e6+", v, vocab_size=2048, eos_id=1),
            "no output of this vocabulary can match",
        ),
        (
            lambda v: guided.schema_constraint({"type": "objekt"}, v, vocab_size=2048, eos_id=1),
            "not a valid JSON schema",
        ),
        (lambda v: guided.tool_call_schema([]), "at least one tool"),
    ],
)
def test_unsatisfiable_or_invalid_constraints_are_refused_before_decoding(vocab, make, message):
    with pytest.raises(guided.GuidedGenerationError, match=message) as error:
        make(vocab)
    assert "\n" not in str(error.value)


def test_tables_allow_exactly_the_tokens_that_keep_a_valid_prefix(vocab):
    """Checked against Python's `re` on a small regex: a token is allowed in a state iff the text so far plus the
    token is a prefix of some match (every match here is one of a few strings)."""
    words = ["cat", "cart", "dog", "do"]
    constraint = guided.regex_constraint("|".join(words), vocab, vocab_size=2048, eos_id=1)
    strings = guided.token_strings(vocab)
    frontier = [("", int(constraint.initial))]
    while frontier:
        text, state = frontier.pop()
        row = np.asarray(constraint.next_state[state])
        for token, piece in strings.items():
            valid = any(word.startswith(text + piece) for word in words) and piece != ""
            assert (row[token] >= 0) == valid, (text, piece)
            if valid:
                frontier.append((text + piece, int(row[token])))
        assert (row[1] >= 0) == (text in words)  # EOS exactly when the text is a match.
