"""Families of targets a feature is given to: every named experiment, and a synthetic grid of N models x M
attention variants (the AXLearn paper's setting, at tiny size); with the checks that a patched target works.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np

import experiments
from axmini.config import ConfigBase, map_configs, replace_config
from axmini.layers.attention import Attention, FusedQKVProjection
from axmini.layers.feed_forward import FeedForward, FeedForwardActivation
from axmini.layers.norm import LayerNorm, RMSNorm
from axmini.layers.position import RoPEProjection
from axmini.layers.transformer import BaseStack
from axmini.module import build_abstract
from axmini.tools.metrics import is_subclass, model_configs
from experiments.decoders import tiny_decoder

ConfigFn = Callable[[], ConfigBase]
Rewrite = Callable[[ConfigBase], ConfigBase]
Slot = type | Callable[[ConfigBase], bool]


def _identity(cfg: ConfigBase) -> ConfigBase:
    return cfg


@dataclass(frozen=True)
class Family:
    """Targets built as `variants[j](models[i]())`: N models x M variants of one slot.

    `variant_slot` (a class or predicate for `find_configs`) names the slot the variants rewrite; a family that
    has one gets a generated copy-per-class baseline. `build_check(cfg)` and `forward_check(cfg)` raise on
    failure; the default build check builds every outermost layer config abstractly.
    """

    name: str
    models: Sequence[tuple[str, ConfigFn]]
    variants: Sequence[tuple[str, Rewrite]] = (("base", _identity),)
    variant_slot: Slot | None = None
    build_check: Callable[[ConfigBase], None] | None = None
    forward_check: Callable[[ConfigBase], None] | None = None
    note: str = ""

    def target(self, i: int, j: int) -> ConfigBase:
        return self.variants[j][1](self.models[i][1]())

    def target_name(self, i: int, j: int) -> str:
        return self.models[i][0] if len(self.variants) == 1 else f"{self.models[i][0]}/{self.variants[j][0]}"


def build_abstract_check(cfg: ConfigBase) -> None:
    """Builds every model of `cfg` abstractly (shapes only); raises what building raises."""
    models = model_configs(cfg)
    if not models:
        raise ValueError("no layer config found to build")
    for _, model in models:
        build_abstract(model.clone())


def powers_of_two(limit: int) -> list[int]:
    """1, 2, 4, ... below `limit`, then `limit` itself."""
    if limit < 1:
        raise ValueError(f"a target count must be >= 1, got {limit}")
    sizes = [2**k for k in range(int(math.log2(limit)) + 1) if 2**k < limit]
    return [*sizes, limit]


def grid_sizes(max_n: int, max_m: int) -> list[tuple[int, int]]:
    """(n, m) for n, m in powers_of_two(max_n) x powers_of_two(max_m)."""
    return [(n, m) for n in powers_of_two(max_n) for m in powers_of_two(max_m)]


def experiment_family() -> Family:
    """Every registered named experiment, as N models with one variant each, smallest config first.

    (The order makes the first N the cheapest to build, which matters when checks run out of time.)
    """
    sizes = {name: len(experiments.get(name).debug_string()) for name in experiments.names()}
    return Family(
        "experiments",
        [(name, functools.partial(experiments.get, name)) for name in sorted(sizes, key=lambda n: (sizes[n], n))],
        note="every registered named experiment, smallest config first (the first N are the N smallest)",
    )


def materialize(cfg: ConfigBase, seed: int = 0) -> nnx.Module:
    """The model of `cfg` with small random parameters drawn by numpy into its abstract shapes.

    Building a model for real compiles its initializers (seconds per config on CPU); a forward check only
    needs parameters of the right shapes and dtypes, so the abstract model is filled instead.
    """
    graphdef, state = nnx.split(build_abstract(cfg.clone()))
    rng = np.random.default_rng(seed)

    def fill(leaf: Any) -> Any:
        if not isinstance(leaf, jax.ShapeDtypeStruct):
            return leaf
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            return jax.random.split(jax.random.key(seed), leaf.shape) if leaf.shape else jax.random.key(seed)
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            return jnp.asarray(0.1 * rng.standard_normal(leaf.shape), leaf.dtype)
        return jnp.zeros(leaf.shape, leaf.dtype)

    return nnx.merge(graphdef, jax.tree.map(fill, state))


def decoder_forward_check(cfg: ConfigBase) -> None:
    """Runs `forward` of the (materialized) decoder on 8 tokens; raises unless the logits are finite."""
    output = materialize(cfg).forward(jnp.ones((1, 8), jnp.int32))
    logits = getattr(output, "logits", output)
    if not np.isfinite(np.asarray(logits)).all():
        raise ValueError("non-finite logits")


ATTENTION_KNOBS = ("multi-query", "window", "qk-norm", "softcap", "fused-qkv")


def synthetic_family(num_models: int = 20, num_variants: int = 10) -> Family:
    """The paper's setting at tiny size: `num_models` decoders x `num_variants` attention variants.

    Model i is `experiments.decoders.tiny_decoder()` with 8 layers (so 3:1 layer patterns and 5:3 KV-sharing
    splits fit) and without positional encoding (so adding RoPE changes something), with feed-forward activation
    i mod 5, LayerNorm instead of RMSNorm when (i // 5) is odd, and hidden width 32 * (1 + i // 10). Variant j
    sets the attention knobs of the bits of j, in the order of `ATTENTION_KNOBS` (multi-query, sliding window 4,
    qk RMSNorm, logit softcap 30, fused QKV weight).
    """
    if num_variants > 2 ** len(ATTENTION_KNOBS):
        raise ValueError(f"at most {2 ** len(ATTENTION_KNOBS)} attention variants, got {num_variants}")
    activations = list(FeedForwardActivation)

    def is_a(base: type) -> Callable[[ConfigBase], bool]:
        return lambda c: is_subclass(getattr(c, "klass", None), base)

    base = map_configs(tiny_decoder(), is_a(RoPEProjection), lambda c: c.inner)
    base = map_configs(base, is_a(BaseStack), lambda c: c.set(num_layers=8))

    @functools.cache
    def build_model(i: int) -> ConfigBase:
        ff = dict(activation=activations[i % len(activations)], hidden_dim=32 * (1 + i // 10))
        cfg = map_configs(base, is_a(FeedForward), lambda c: c.set(**ff))
        if (i // 5) % 2:
            cfg = replace_config(cfg, target=RMSNorm, new=LayerNorm.default_config())
        return cfg

    def model(i: int) -> ConfigBase:
        return build_model(i).clone()  # Built once; every target gets its own copy.

    knobs = {
        "multi-query": dict(num_kv_heads=1),
        "window": dict(sliding_window=4),
        "qk-norm": dict(qk_norm=RMSNorm.default_config()),
        "softcap": dict(logit_softcap=30.0),
        "fused-qkv": dict(input_linear=FusedQKVProjection.default_config()),
    }

    def chosen(j: int) -> list[str]:
        return [name for bit, name in enumerate(ATTENTION_KNOBS) if j >> bit & 1]

    def variant(j: int) -> Rewrite:
        values = {k: v for name in chosen(j) for k, v in knobs[name].items()}
        return lambda cfg: map_configs(cfg, is_a(Attention), lambda c: c.set(**values))

    return Family(
        "synthetic",
        [(f"model{i}", functools.partial(model, i)) for i in range(num_models)],
        [("+".join(chosen(j)) or "full", variant(j)) for j in range(num_variants)],
        variant_slot=is_a(Attention),
        forward_check=decoder_forward_check,
        note=inspect.getdoc(synthetic_family).split("\n\n", 1)[1].replace("\n", " "),
    )
