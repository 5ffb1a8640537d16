"""Patch mode: lines written stay flat while the configs a feature changes grow, and every patched model builds."""

from __future__ import annotations

import ast
import functools
from typing import Any

import flax.nnx as nnx
import jax.numpy as jnp
import numpy as np
import pytest

from axmini.config import REQUIRED, ConfigBase, ConfigModifier, Required, map_configs, replace_config
from axmini.features import FEATURES as REGISTERED
from axmini.features import Feature
from axmini.layers.linear import Linear
from axmini.module import Layer
from axmini.tools.baseline import baseline_complexity, baseline_files, baseline_sweep
from axmini.tools.families import Family, grid_sizes, powers_of_two, synthetic_family
from axmini.tools.metrics import config_paths_changed, layers_changed, layers_touched
from axmini.tools.patches import (
    APPLIES,
    FAILED,
    REFUSED,
    ForwardChecks,
    UnknownFeatureError,
    modifier_lines,
    patch_target,
    select_features,
    sweep,
    user_lines,
)

# ----------------------------------------------------------------------------------------------------
# Toy layers: a model of blocks, each with an attention slot (with a positional slot) and a feed-forward slot.


class ToyRotary(Layer):
    class Config(Layer.Config):
        dim: Required[int] = REQUIRED
        theta: float = 10000.0

    def __call__(self, x: Any) -> Any:
        angles = jnp.arange(x.shape[-1]) / self.config.theta
        return x * jnp.cos(angles)


class ToyAttention(Layer):
    class Config(Layer.Config):
        dim: Required[int] = REQUIRED
        scale: float = 1.0
        position: Layer.Config | None = None

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        cfg = self.config
        self.w = self.param((cfg.dim, cfg.dim), axes=("embed", "heads"), rngs=rngs)
        self.position = cfg.position.clone(dim=cfg.dim).instantiate(rngs=rngs) if cfg.position else None

    def __call__(self, x: Any) -> Any:
        x = self.position(x) if self.position is not None else x
        return (x @ self.w[...]) * self.config.scale


class ToyFeedForward(Layer):
    class Config(Layer.Config):
        dim: Required[int] = REQUIRED
        hidden: int = 16

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        self.w = self.param((self.config.dim, self.config.hidden), axes=("embed", "mlp"), rngs=rngs)

    def __call__(self, x: Any) -> Any:
        return jnp.tanh(x @ self.w[...]) @ self.w[...].T


class ToyMoE(Layer):
    class Config(Layer.Config):
        dim: Required[int] = REQUIRED
        hidden: int = 16
        num_experts: int = 4

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        cfg = self.config
        self.w = self.param((cfg.num_experts, cfg.dim, cfg.hidden), axes=("expert", "embed", "mlp"), rngs=rngs)

    def __call__(self, x: Any) -> Any:
        return jnp.mean(jnp.einsum("...d,edh,efh->...f", x, self.w[...], self.w[...]), axis=-1, keepdims=True)


class ToyBlock(Layer):
    class Config(Layer.Config):
        dim: Required[int] = REQUIRED
        attention: Layer.Config = ToyAttention.default_config()
        feed_forward: Layer.Config = ToyFeedForward.default_config()

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        self.attention = self.config.attention.clone(dim=self.config.dim).instantiate(rngs=rngs)
        self.feed_forward = self.config.feed_forward.clone(dim=self.config.dim).instantiate(rngs=rngs)

    def __call__(self, x: Any) -> Any:
        x = x + self.attention(x)
        return x + self.feed_forward(x)


class ToyModel(Layer):
    class Config(Layer.Config):
        dim: int = 8
        blocks: list[ToyBlock.Config] = []

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        self.blocks = nnx.List([b.clone(dim=self.config.dim).instantiate(rngs=rngs) for b in self.config.blocks])

    def __call__(self, x: Any) -> Any:
        for block in self.blocks:
            x = block(x)
        return x


# Toy features: each a patch function naming a ConfigModifier, as axmini/features.py registers the real ones.


class ToyRoPEModifier(ConfigModifier):
    class Config(ConfigModifier.Config):
        theta: float = 10000.0

    def __call__(self, cfg: ConfigBase) -> ConfigBase:
        if isinstance(cfg, ToyModel.Config) and not cfg.blocks:
            raise ValueError("ToyRoPEModifier: the model has no blocks to give RoPE to")
        rotary = ToyRotary.default_config().set(theta=self.config.theta)
        return map_configs(cfg, ToyAttention, lambda c: c.set(position=rotary))


class ToyMoEModifier(ConfigModifier):
    class Config(ConfigModifier.Config):
        num_experts: int = 4

    def __call__(self, cfg: ConfigBase) -> ConfigBase:
        new = ToyMoE.default_config().set(num_experts=self.config.num_experts)
        return replace_config(cfg, target=ToyFeedForward, new=new)


class BrokenModifier(ConfigModifier):
    def __call__(self, cfg: ConfigBase) -> ConfigBase:
        # The attention fills `dim` into its position config, which a Linear does not have: building fails.
        return map_configs(cfg, ToyAttention, lambda c: c.set(position=Linear.default_config()))


def rope(cfg: ConfigBase) -> ConfigBase:
    """RoPE everywhere (toy)."""
    # A comment is not code.
    return ToyRoPEModifier.default_config().set(theta=1e4).instantiate()(cfg)


def moe(cfg: ConfigBase) -> ConfigBase:
    """Every feed-forward a MoE (toy)."""
    return ToyMoEModifier.default_config().instantiate()(cfg)


def broken(cfg: ConfigBase) -> ConfigBase:
    """A patch whose models do not build."""
    return BrokenModifier.default_config().instantiate()(cfg)


def crashing(cfg: ConfigBase) -> ConfigBase:
    """A patch with a bug (not a refusal)."""
    return cfg.no_such_method()


FEATURES = {"rope": Feature("rope", rope), "moe": Feature("moe", moe)}


def toy_model(i: int) -> ConfigBase:
    """Model i has 1 + i % 3 blocks and feed-forward width 16 + (i // 3) (shapes repeat: eager ops stay cached)."""
    block = ToyBlock.default_config()
    block.feed_forward.set(hidden=16 + i // 3)
    return ToyModel.default_config().set(blocks=[block.clone() for _ in range(1 + i % 3)])


def toy_variant(j: int) -> Any:
    return lambda cfg: map_configs(cfg, ToyAttention, lambda c: c.set(scale=1.0 / (1 + j)))


def toy_forward(cfg: ConfigBase) -> None:
    y = cfg.instantiate(rngs=nnx.Rngs(0))(jnp.ones((2, 8)))
    assert np.isfinite(np.asarray(y)).all()


def toy_family(num_models: int = 4, num_variants: int = 4, forward: bool = True) -> Family:
    return Family(
        "toy",
        [(f"model{i}", functools.partial(toy_model, i)) for i in range(num_models)],
        [(f"scale{j}", toy_variant(j)) for j in range(num_variants)],
        variant_slot=ToyAttention,
        forward_check=toy_forward if forward else None,
    )


def toy_experiments() -> Family:
    """Three named toy models, the second without blocks (the toy RoPE refuses it): as the experiments family."""
    empty = ToyModel.default_config
    models = [("one", functools.partial(toy_model, 0)), ("empty", empty), ("two", functools.partial(toy_model, 1))]
    return Family("experiments", models)


def _blocks(n: int, m: int) -> int:
    """Attention (and feed-forward) configs in the first n models x m variants: model i has 1 + i % 3 blocks."""
    return m * sum(1 + i % 3 for i in range(n))


# ----------------------------------------------------------------------------------------------------


def test_rope_patch_changes_each_attention_by_the_rotary_config_leaves() -> None:
    before = toy_model(2)  # 3 blocks
    after = FEATURES["rope"].apply(before.clone())
    leaves = len(ToyRotary.default_config().to_flat_dict())
    paths = config_paths_changed(before, after)
    # Per block: `position: None` goes, the rotary config's leaves appear.
    assert len(paths) == 3 * (1 + leaves)
    assert "blocks[0].attention.position" in paths and "blocks[2].attention.position.theta" in paths
    assert layers_changed(before, after) == [f"blocks[{k}].attention.position" for k in range(3)]
    # The new rotary configs own their leaves; each attention owns its old `position: None` line.
    touched = [f"blocks[{k}].attention{leaf}" for k in range(3) for leaf in ("", ".position")]
    assert layers_touched(before, after) == touched


def test_moe_patch_swaps_each_feed_forward_class() -> None:
    before = toy_model(1)  # 2 blocks
    after = FEATURES["moe"].apply(before.clone())
    assert config_paths_changed(before, after) == [
        f"blocks[{k}].feed_forward.{leaf}" for k in range(2) for leaf in ("klass", "num_experts")
    ]
    assert layers_changed(before, after) == ["blocks[0].feed_forward", "blocks[1].feed_forward"]
    assert layers_touched(before, after) == ["blocks[0].feed_forward", "blocks[1].feed_forward"]


def test_a_field_change_touches_layers_without_changing_any() -> None:
    before = toy_model(1)
    after = map_configs(before, ToyAttention, lambda c: c.set(scale=0.5))
    assert layers_changed(before, after) == []
    assert layers_touched(before, after) == ["blocks[0].attention", "blocks[1].attention"]


@pytest.mark.parametrize("name", sorted(FEATURES))
def test_lines_written_stay_constant_while_config_paths_grow(name: str) -> None:
    result = sweep(FEATURES[name], toy_family(), grid_sizes(4, 2), forward=ForwardChecks.ALL)
    per_block = {"rope": 1 + len(ToyRotary.default_config().to_flat_dict()), "moe": 2}[name]
    for point in result.points:
        assert point.user_lines == 1  # The comment line of rope's patch is not code.
        assert point.paths_changed == per_block * _blocks(point.n, point.m)
        assert point.layers_changed == _blocks(point.n, point.m)
        assert point.applies == point.forward_ok == point.forward_checked == point.targets
        assert point.refused == point.failed == point.not_checked == 0
    assert result.complexity("user_lines").label == "O(1)"
    assert result.complexity("paths_changed").label == "O(N*M)"
    by_size = {(p.n, p.m): p.paths_changed for p in result.points}
    assert by_size[1, 1] < by_size[2, 1] < by_size[4, 1] < by_size[4, 2]


def test_cover_forward_checks_every_model_and_every_variant_once() -> None:
    chosen = ForwardChecks.COVER.targets(4, 2)
    assert {i for i, _ in chosen} == set(range(4)) and {j for _, j in chosen} == {0, 1} and len(chosen) == 4
    point = sweep(FEATURES["rope"], toy_family(), [(4, 2)]).points[0]
    assert (point.applies, point.forward_checked, point.forward_ok) == (8, 4, 4)
    assert ForwardChecks.NONE.targets(4, 2) == set() and len(ForwardChecks.ALL.targets(4, 2)) == 8


def test_checks_stop_at_the_deadline_but_config_metrics_cover_every_target() -> None:
    point = sweep(FEATURES["moe"], toy_family(), [(2, 2)], deadline=0.0).points[0]
    assert (point.not_checked, point.applies, point.forward_checked) == (4, 0, 0)
    assert point.paths_changed == 2 * _blocks(2, 2) and point.layers_changed == _blocks(2, 2)


def test_slot_reach_decides_which_baseline_classes_are_edited() -> None:
    rope_sweep = sweep(FEATURES["rope"], toy_family(forward=False), [(2, 2)], build=False)
    moe_sweep = sweep(FEATURES["moe"], toy_family(forward=False), [(2, 2)], build=False)
    assert rope_sweep.reaches_slot and not rope_sweep.reaches_outside_slot
    assert moe_sweep.reaches_outside_slot and not moe_sweep.reaches_slot


def test_modifier_lines_count_the_source_of_the_modifiers_the_patch_names() -> None:
    # class, Config class, field, def __call__, if, raise, rotary = ..., return: 8 code lines.
    assert FEATURES["rope"].modifiers == [ToyRoPEModifier] and modifier_lines(FEATURES["rope"]) == 8
    assert user_lines(FEATURES["rope"]) == 1


def test_outcomes_tell_refusals_with_their_reason_from_failures_and_unchecked_targets() -> None:
    family = toy_experiments()
    point = sweep(FEATURES["rope"], family, [(3, 1)]).points[0]
    assert (point.applies, point.refused, point.failed, point.not_checked) == (2, 1, 0, 0)
    (reason,) = sweep(FEATURES["rope"], family, [(3, 1)]).reasons()
    assert reason == "patch: ValueError: ToyRoPEModifier: the model has no blocks to give RoPE to"
    built = patch_target(Feature("broken", broken), toy_family(), 0, 0)
    assert built.outcome in (REFUSED, FAILED) and built.reason.startswith("build: ")
    crashed = patch_target(Feature("crashing", crashing), toy_family(), 0, 0)
    assert crashed.outcome == FAILED and crashed.reason.startswith("patch: AttributeError")
    assert patch_target(FEATURES["rope"], toy_family(), 1, 1, build=False).outcome == "not checked"
    assert patch_target(FEATURES["rope"], toy_family(), 1, 1, forward=False).outcome == APPLIES


def test_baseline_costs_n_times_m_class_edits_for_a_variant_feature(tmp_path: Any) -> None:
    sizes = grid_sizes(4, 4)
    points = baseline_sweep("rope", sizes, variants=True, models=False, workdir=tmp_path)
    for p in points:
        # One config field, then per model file one import and two lines in each of its m attention classes.
        assert p.integration_loc == 1 + p.n * (1 + 2 * p.m)
        assert p.classes_touched == p.n * p.m + 1  # + the shared config class
        assert p.functions_touched == 2 * p.n * p.m
        assert p.modules_affected == p.n + 1
        assert p.implementation_loc == 4
    fit = baseline_complexity(points)
    assert fit.label == "O(N*M)"


def test_baseline_costs_n_model_edits_for_a_model_feature(tmp_path: Any) -> None:
    points = baseline_sweep("moe", [(n, 4) for n in powers_of_two(8)], variants=False, models=True, workdir=tmp_path)
    assert [p.integration_loc for p in points] == [1 + 3 * n for n in (1, 2, 4, 8)]
    assert baseline_complexity(points).label == "O(N)"


def test_generated_baseline_is_valid_python() -> None:
    for text in baseline_files(2, 3, "rope", variants=True, models=True).values():
        ast.parse(text)


def test_unknown_feature_suggests_the_closest_name() -> None:
    with pytest.raises(UnknownFeatureError, match=r"unknown feature 'ropee'; did you mean 'rope'\?"):
        select_features(["ropee"], FEATURES)
    assert list(select_features(None, FEATURES)) == list(FEATURES)


def test_sizes_beyond_the_family_are_refused() -> None:
    with pytest.raises(ValueError, match="has 2 models x 2 variants; sizes ask for 4 x 1"):
        sweep(FEATURES["rope"], toy_family(2, 2), [(4, 1)])
    with pytest.raises(ValueError, match="must be >= 1"):
        powers_of_two(0)


def test_the_paper_grid_has_twenty_models_and_ten_distinct_attention_variants() -> None:
    family = synthetic_family(20, 10)
    assert len(family.models) == 20 and len({name for name, _ in family.variants}) == 10
    assert family.target(19, 9).debug_string() != family.target(19, 8).debug_string()


@pytest.mark.parametrize("name", sorted(REGISTERED))
def test_registered_feature_is_flat_in_lines_and_builds_on_the_synthetic_family(name: str) -> None:
    family = synthetic_family(2, 2)
    result = sweep(REGISTERED[name], family, grid_sizes(2, 2), forward=ForwardChecks.NONE)
    assert result.complexity("user_lines").label == "O(1)"
    largest = result.points[-1]
    assert largest.paths_changed > result.points[0].paths_changed > 0
    if name == "moe_expert_choice":  # Not causal: every decoder of the family refuses it, with the reason.
        (reason,) = result.reasons()
        assert largest.refused == largest.targets and "is not causal" in reason
        return
    assert largest.applies == largest.targets, result.reasons()
    # One tiny forward pass (a compilation: seconds on CPU) on the last model with the last variant.
    assert patch_target(REGISTERED[name], family, 1, 1).forward_ok
