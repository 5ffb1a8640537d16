"""The weight-transform slot: one mechanism by which QAT and LoRA reach every linear weight of every model.

Each layer lists its linear weights in `weight_names` and reads them with `Layer.read_weight` (axmini/module.py). A
layer whose config has a `weight_transform` gives each of those weights its own `WeightTransform` module, built from
the weight (shape, logical axes, which dims are inputs), and computes with `transform(weight)` instead of the weight.
So a transform written once (fake quantization, a low-rank adapter) reaches the QKV projections, the output
projection, the feed-forward and MoE experts, a Linear and an embedding table without any of them knowing it, and
`WeightTransformModifier` gives it to the layers whose config path matches a pattern: its size does not grow with the
number of models or layers.

A weight's dims have roles: its *inputs* are the fan-in dims (`Layer.param(fan_in_axes=...)`, the dims an einsum
contracts with the activations), its *batch* dims index independent matrices (MoE experts, logical axis `expert`),
and the rest are *outputs*. Per-output-channel quantization scales keep the batch and output dims; a LoRA adapter is
A [batch, inputs, r] @ B [batch, r, outputs].
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.nnx as nnx
import jax

from axmini.config import C, ConfigBase, ConfigModifier, ConfigValueError, config_path, find_configs
from axmini.module import Layer

Array = jax.Array

# Weights stacked along these logical axes are independent matrices: each gets its own scales or adapter.
BATCH_AXES = ("expert",)
# Excluded by default from a WeightTransformModifier: the embedding table and the output head.
DEFAULT_EXCLUDE = r"(^|\.)(embedding|lm_head)(\.|$)"


class WeightRoles(NamedTuple):
    """The dims of a weight by role (indices into its shape), with the weight's shape and logical axes."""

    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    batch: tuple[int, ...]
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]

    @classmethod
    def of(cls, weight: nnx.Param) -> WeightRoles:
        value, metadata = weight.get_value(), weight.get_metadata()
        axes = tuple(metadata.get("axes") or (None,) * value.ndim)
        inputs = tuple(metadata.get("fan_in_axes", (0,)))
        batch = tuple(i for i, name in enumerate(axes) if name in BATCH_AXES and i not in inputs)
        outputs = tuple(i for i in range(value.ndim) if i not in inputs and i not in batch)
        if not inputs or not outputs:
            raise ValueError(f"a weight of shape {value.shape} with input dims {inputs} has no input or no output dim")
        return cls(tuple(value.shape), axes, batch, inputs, outputs)


class WeightTransform(Layer):
    """Rewrites one weight of a layer where the layer reads it; subclasses hold their state as parameters.

    Built by the layer (`Layer.Config.instantiate`) with the weight it transforms, after the layer's constructor, so
    the state can start from the weight's values (e.g. quantization scales from its statistics). The module is the
    layer's attribute `<weight name>_<suffix>`.
    """

    suffix = "transform"

    def __init__(self, cfg: Layer.Config, *, weight: nnx.Param, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        self.roles = WeightRoles.of(weight)

    def __call__(self, weight: Array) -> Array:
        raise NotImplementedError(type(self))

    def refresh(self, weight: Array) -> None:
        """Restarts whatever state depends on the weight's values (nothing here)."""
        del weight


def has_weights(cfg: ConfigBase) -> bool:
    """A layer config whose class reads weights through `read_weight` (a weight transform applies to it)."""
    return Layer.matches(cfg) and bool(cfg.klass.weight_names)


class WeightTransformModifier(ConfigModifier):
    """Sets `transform` as the weight transform of every layer with weights whose config path `pattern` matches
    (`re.search`, e.g. `feed_forward` or `self_attention`; the default matches all) and `exclude` does not (default:
    the embedding and the output head). A layer that already has another transform is refused: a layer takes one."""

    class Config(ConfigModifier.Config):
        transform: Layer.Config | None = None
        pattern: str = ""
        exclude: str | None = DEFAULT_EXCLUDE

    def __call__(self, cfg: ConfigBase) -> ConfigBase:
        own = self.config
        if own.transform is None or not WeightTransform.matches(own.transform):
            raise ConfigValueError(f"{config_path(own, 'transform')} must be a WeightTransform config")
        pattern, exclude = (_regex(own, name) for name in ("pattern", "exclude"))
        result = cfg.clone()
        selected = [
            (path, layer)
            for path, layer in find_configs(result, has_weights)
            if pattern.search(path) and not (exclude and exclude.search(path))
        ]
        if not selected:
            raise ConfigValueError(
                f"{config_path(own, 'pattern')}={own.pattern!r} selects no layer with weights (excluding "
                f"{own.exclude!r}); pick a regex that matches a config path such as stack.layer.feed_forward"
            )
        for path, layer in selected:
            if layer.weight_transform not in (None, own.transform):
                raise ConfigValueError(
                    f"{path or 'the root'}.weight_transform is already a {layer.weight_transform.klass.__name__}; a "
                    f"layer takes one weight transform (leave it out with {config_path(own, 'exclude')})"
                )
            layer.weight_transform = own.transform
        return result


def _regex(cfg: ConfigBase, name: str) -> re.Pattern | None:
    text = getattr(cfg, name)
    if text is None:
        return None
    try:
        return re.compile(text)
    except re.error as e:
        raise ConfigValueError(f"{config_path(cfg, name)}={text!r} is not a valid regex ({e}); fix it") from None


def without_weight_transforms(cfg: C) -> C:
    """A copy of the tree with every weight transform removed: the plain model that merged or exported weights
    load into."""
    result = cfg.clone()
    for _, layer in find_configs(result, lambda c: Layer.matches(c) and c.weight_transform is not None):
        layer.weight_transform = None
    return result


def transformed_weights(model: nnx.Module, kind: type[WeightTransform] = WeightTransform) -> list[TransformedWeight]:
    """Every weight of `model` with a transform of class `kind`, outermost layers first."""
    found = []
    for path, layer in nnx.iter_modules(model):
        transform_cfg = getattr(layer.config, "weight_transform", None) if isinstance(layer, Layer) else None
        if transform_cfg is None or not issubclass(transform_cfg.klass, kind):
            continue
        for name in layer.weight_names:
            transform = getattr(layer, f"{name}_{transform_cfg.klass.suffix}", None)
            if transform is not None:
                found.append(TransformedWeight("/".join(map(str, path)), layer, name, transform))
    return found


class TransformedWeight(NamedTuple):
    path: str  # The layer's module path, e.g. decoder/stack/layer/feed_forward.
    layer: Layer
    name: str  # The weight's attribute name in the layer (wi_0).
    transform: WeightTransform

    @property
    def weight(self) -> nnx.Param:
        return getattr(self.layer, self.name)

    @property
    def stacked_dims(self) -> int:
        """How many leading dims the stack this layer sits in added (a scanned stack: 1), beyond the weight's own."""
        return self.weight.get_value().ndim - len(self.transform.roles.shape)

    def value(self) -> Array:
        """The weight as the layer computes with it (the transform applied)."""
        return self.per_copy(lambda transform, weight: transform(weight))

    def refresh(self) -> None:
        """Restarts the transform's state from the weight's current value (`WeightTransform.refresh`)."""
        self.per_copy(lambda transform, weight: transform.refresh(weight))

    def per_copy(self, fn: Callable[[WeightTransform, Array], Any]) -> Any:
        """`fn(transform, weight)` on each copy of a stacked layer (vmapped over the stacked dims); keeps what `fn`
        changes in the transform's state."""
        graphdef, state = nnx.split(self.transform)

        def apply(state: nnx.State, weight: Array) -> tuple[Any, nnx.State]:
            transform = nnx.merge(graphdef, state)
            return fn(transform, weight), nnx.state(transform)

        for _ in range(self.stacked_dims):
            apply = jax.vmap(apply)
        out, state = apply(state, self.weight[...])
        nnx.update(self.transform, state)
        return out


def refresh_weight_transforms(model: nnx.Module) -> None:
    """Restarts every weight transform of `model` from the weights it holds now: after base weights are loaded into a
    freshly built model, quantization scales start from the loaded weights' statistics."""
    for transformed in transformed_weights(model):
        transformed.refresh()
