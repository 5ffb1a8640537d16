"""LoRA: low-rank adapters on the linear weights of any model, trained while the base model stays frozen.

`LoRA` is a weight transform (axmini/layers/weight_transform.py): a weight W of the selected layers is read as
W + (alpha / r) * A @ B, with A [inputs, r] drawn like a weight of fan-in `inputs` and B [r, outputs] zero, so an
adapter starts as the identity (per MoE expert, an adapter each). The base weight enters through `stop_gradient`
(no gradient is computed for it), and `LoRAModifier` also sets the learner of a trainer config to train only the
adapters (`Learner.trainable_patterns`, an optax mask: the optimizer holds state for nothing else).

An adapter lives apart from its base model: `save_adapter` writes only the adapter parameters (a small orbax item)
with the LoRA settings, `load_adapter` reads them back, and `attach_adapter` builds the base model with an adapter,
sharing the base weights, so several adapters of one base model are chosen at sampling time.
`merge` folds the adapters into the base weights (a plain model computing the same function); `unmerge` takes
them out again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import flax.nnx as nnx
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from axmini.config import ConfigBase, ConfigModifier, check_positive, find_configs, get_path, map_configs
from axmini.layers.weight_transform import (
    DEFAULT_EXCLUDE,
    WeightTransform,
    WeightTransformModifier,
    transformed_weights,
    without_weight_transforms,
)
from axmini.module import Layer, constant_init
from axmini.trainer.learner import Learner

Array = jax.Array
# Parameter paths of the adapters (`.../wi_0_lora/a`): what a LoRA run trains and an adapter item holds.
ADAPTER_PATTERN = r"_lora/[ab]$"
FORMAT = "axmini-lora-adapter-v1"


def _letters(roles: Any) -> tuple[str, str, str]:
    """einsum subscripts of A, B and the weight, from the weight's dim roles (r is the rank)."""
    names = "abcdefghijklmnopq"
    weight = "".join(names[i] for i in range(len(roles.shape)))
    batch = "".join(weight[i] for i in roles.batch)
    a = batch + "".join(weight[i] for i in roles.inputs) + "r"
    b = batch + "r" + "".join(weight[i] for i in roles.outputs)
    return a, b, weight


class LoRA(WeightTransform):
    """W -> stop_gradient(W) + (alpha / rank) * A @ B, with B zero at the start (see the module doc)."""

    suffix = "lora"

    class Config(WeightTransform.Config):
        rank: int = 8
        alpha: float = 16.0

    def __init__(self, cfg: Config, *, weight: nnx.Param, rngs: nnx.Rngs):
        super().__init__(cfg, weight=weight, rngs=rngs)
        cfg = self.config
        check_positive(cfg, "rank", "alpha")
        roles = self.roles
        pick = lambda dims: [roles.shape[i] for i in dims]
        axes = lambda dims: [roles.axes[i] for i in dims]
        batch, inputs = len(roles.batch), len(roles.inputs)
        self.a = self.param(
            (*pick(roles.batch), *pick(roles.inputs), cfg.rank),
            axes=(*axes(roles.batch), *axes(roles.inputs), None),
            rngs=rngs,
            fan_in_axes=tuple(range(batch, batch + inputs)),
        )
        self.b = self.param(
            (*pick(roles.batch), cfg.rank, *pick(roles.outputs)),
            axes=(*axes(roles.batch), None, *axes(roles.outputs)),
            rngs=rngs,
            init=constant_init(0.0),
        )

    def delta(self) -> Array:
        """(alpha / rank) * A @ B, laid out like the weight."""
        a, b, weight = _letters(self.roles)
        product = jnp.einsum(f"{a},{b}->{weight}", self.a[...], self.b[...])
        return (self.config.alpha / self.config.rank) * product

    def __call__(self, weight: Array) -> Array:
        return (jax.lax.stop_gradient(weight) + self.delta().astype(weight.dtype)).astype(weight.dtype)


class LoRAModifier(ConfigModifier):
    """Rank-`rank` adapters on the weights of every layer whose config path `pattern` matches (`re.search`; default:
    all) and `exclude` does not (default: the embedding and the head). In a trainer config the learner then trains
    the adapters only."""

    class Config(ConfigModifier.Config):
        rank: int = 8
        alpha: float = 16.0
        pattern: str = ""
        exclude: str | None = DEFAULT_EXCLUDE

    def __call__(self, cfg: ConfigBase) -> ConfigBase:
        own = self.config
        check_positive(own, "rank", "alpha")
        transform = LoRA.default_config().set(rank=own.rank, alpha=own.alpha)
        modifier = WeightTransformModifier.default_config().set(
            transform=transform, pattern=own.pattern, exclude=own.exclude
        )
        cfg = modifier.instantiate()(cfg)
        return map_configs(cfg, Learner, lambda learner: learner.set(trainable_patterns=[ADAPTER_PATTERN]))


# ----------------------------------------------------------------------------------------------------
# Adapters apart from the base model.


def _is_adapter(path: tuple[Any, ...]) -> bool:
    return len(path) >= 2 and str(path[-2]).endswith(f"_{LoRA.suffix}") and path[-1] in ("a", "b")


def adapter_state(model: nnx.Module) -> nnx.State:
    """The adapter parameters (A and B of every LoRA weight) of `model`."""
    return nnx.state(model, lambda path, value: isinstance(value, nnx.Param) and _is_adapter(path))


def lora_settings(model_cfg: ConfigBase) -> dict[str, Any]:
    """The LoRA settings of a model config, by layer config path (what an adapter needs of the model it fits)."""
    return {
        path: {"rank": layer.weight_transform.rank, "alpha": layer.weight_transform.alpha}
        for path, layer in find_configs(model_cfg, lambda c: Layer.matches(c) and LoRA.matches(c.weight_transform))
    }


class Adapter(NamedTuple):
    params: nnx.State  # The adapter parameters, as `adapter_state` returns them.
    metadata: dict[str, Any]  # What `save_adapter` was given, plus the format and the LoRA settings.


def save_adapter(directory: str | Path, model: nnx.Module, metadata: dict[str, Any] | None = None) -> Path:
    """Writes the adapter parameters of `model` (nothing of the base model) as an orbax item in `directory`, with
    a JSON record of the LoRA settings and `metadata` (e.g. the base run it was trained from)."""
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    settings = lora_settings(model.config)
    if not settings:
        raise ValueError("save_adapter: the model has no LoRA adapter (apply LoRAModifier to its config)")
    record = {"format": FORMAT, "lora": settings, **(metadata or {})}
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory / "params", nnx.to_pure_dict(adapter_state(model)))
    (directory / "adapter.json").write_text(json.dumps(record, indent=2) + "\n")
    return directory


def load_adapter(directory: str | Path, model: nnx.Module | None = None) -> Adapter:
    """An adapter written by `save_adapter`; given `model` (built with the same LoRA settings), its arrays are
    restored with the shapes, dtypes and shardings of the model's adapters (and checked against them)."""
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    record_path = directory / "adapter.json"
    if not record_path.is_file():
        raise ValueError(f"{directory} holds no adapter ({record_path.name} is missing); write one with save_adapter")
    record = json.loads(record_path.read_text())
    target = None
    if model is not None:
        settings = lora_settings(model.config)
        if settings != record["lora"]:
            raise ValueError(f"{directory}: adapter LoRA settings {record['lora']} differ from the model's {settings}")
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
            nnx.to_pure_dict(adapter_state(model)),
        )
    with ocp.StandardCheckpointer() as checkpointer:
        params = checkpointer.restore(directory / "params", target)
    return Adapter(params, record)


def attach_adapter(base: nnx.Module, adapter: Adapter) -> nnx.Module:
    """The model of `base` (a model without adapters) with `adapter`: built with the adapter's LoRA settings, sharing
    the base weights, holding the adapter's parameters. One base model takes any number of adapters this way."""
    lora_cfg = without_weight_transforms(base.config)
    for path, settings in adapter.metadata["lora"].items():
        layer = get_path(lora_cfg, path) if path else lora_cfg
        layer.weight_transform = LoRA.default_config().set(**settings)
    model = nnx.eval_shape(lambda: lora_cfg.instantiate(rngs=nnx.Rngs(0)))
    base_values = nnx.to_pure_dict(nnx.state(base))
    # The adapters (small) are replicated on the devices the base weights are on.
    sharding = getattr(jax.tree.leaves(base_values)[0], "sharding", None)
    placement = NamedSharding(sharding.mesh, PartitionSpec()) if isinstance(sharding, NamedSharding) else None
    params = jax.tree.map(lambda x: jax.device_put(x, placement), adapter.params) if placement else adapter.params
    attached = _with_values(model, lambda pure: _merged(_merged(pure, base_values), params))
    if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(nnx.state(attached))):
        raise ValueError("the adapter does not fit this base model (other layers or shapes); attach it to its base")
    return attached


def merge(model: nnx.Module) -> nnx.Module:
    """The plain model (no weight transforms) whose weights are W + (alpha / r) A @ B: the same function as `model`,
    with the adapters folded into the base weights."""
    plain_cfg = without_weight_transforms(model.config)
    plain = nnx.eval_shape(lambda: plain_cfg.instantiate(rngs=nnx.Rngs(0)))
    pure = nnx.to_pure_dict(nnx.state(model))
    for item in transformed_weights(model, LoRA):
        layer = _at(pure, item.path)
        layer[item.name] = item.value()
        del layer[f"{item.name}_{LoRA.suffix}"]
    return _with_values(plain, lambda _: pure)


def unmerge(merged: nnx.Module, like: nnx.Module) -> nnx.Module:
    """The base model with its adapters back from a `merge`d one: `like` (a model with the LoRA adapters that were
    merged) with base weights W - (alpha / r) A @ B of the merged weights W."""
    model = _with_values(like, lambda pure: _merged(pure, nnx.to_pure_dict(nnx.state(merged))))
    for item in transformed_weights(model, LoRA):
        delta = item.per_copy(lambda transform, weight: transform.delta().astype(weight.dtype))
        item.weight.set_value(item.weight[...] - delta)
    return model


def _with_values(model: nnx.Module, change: Any) -> nnx.Module:
    """A new model of `model`'s graph whose state is `change(pure dict of model's state)` (model is unchanged)."""
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda x: x, state)  # New variables: the result shares no variable with `model`.
    nnx.replace_by_pure_dict(state, change(nnx.to_pure_dict(state)))
    return nnx.merge(graphdef, state)


def _merged(base: Any, update: Any) -> Any:
    """`base` (a nested dict) with the leaves of `update` (a nested dict of some of its keys) put in."""
    if not isinstance(update, dict):
        return update
    return {key: _merged(value, update[key]) if key in update else value for key, value in base.items()}


def _at(pure: dict, path: str) -> dict:
    """The sub-dict of a pure state dict at a module path (`decoder/stack/layer`; "" is the root)."""
    for key in path.split("/") if path else ():
        pure = pure[int(key) if key not in pure and key.isdigit() else key]
    return pure
