"""Quantization-aware training: weights fake-quantized in the forward pass, learnable scales, integer export.

`FakeQuantization` is a weight transform (axmini/layers/weight_transform.py), so `QATModifier` gives it to every
linear weight of any model whose config path a pattern selects (the embedding and the output head are left out by
default). With b bits a weight is snapped, per output channel, to the 2^b *balanced* levels (k + 1/2) * scale for
k = -2^(b-1) .. 2^(b-1) - 1: {-1.5, -0.5, 0.5, 1.5} * scale at 2 bits, as in Apple's on-device model, so every code
is used and the grid is symmetric. The forward value is exactly level * scale (what the exported model computes with,
so export -> load is bit-identical); the backward pass is the straight-through estimator: the gradient passes to the
weight inside the clip range |w| <= 2^(b-1) * scale and is zero outside, and the scale gets LSQ's gradient
(level - w / scale inside, the clipped level outside), so it learns where to clip; it is learned as its log.

Scales start from the weight's statistics: per output channel, the scale among 32 clip ratios of max|w| / 2^(b-1)
with the smallest squared quantization error (at 2 bits that clips the tails; at 8 it is nearly min-max).
`export_quantized` writes the integer codes (packed: 4 per byte at 2 bits, 2 at 4, 1 at 8) and scales with every
other parameter; `load_quantized` builds the plain model from them for evaluation and decoding.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np

from axmini.config import ConfigBase, ConfigModifier, ConfigValueError, config_path, find_configs, map_configs
from axmini.layers.weight_transform import (
    DEFAULT_EXCLUDE,
    WeightTransform,
    WeightTransformModifier,
    transformed_weights,
    without_weight_transforms,
)
from axmini.module import Layer
from axmini.trainer.learner import Learner

Array = jax.Array
SUPPORTED_BITS = (2, 4, 8)
CLIP_RATIOS = 32  # Candidate clip ratios searched for each channel's initial scale.
FORMAT = "axmini-quantized-v1"


def effective_scale(log_scale: Array) -> Array:
    """The scale a `log_scale` parameter stands for. Learning the log keeps each optimizer step a relative change of
    the scale (an Adam step of 1e-3 moves a 0.05 scale by 2% if learned directly, by 0.1% as a log)."""
    return jnp.exp(log_scale.astype(jnp.float32))


def quantize_codes(weight: Array, scale: Array, bits: int) -> Array:
    """The integer codes 0 .. 2^b - 1 of `weight` (float32) under `scale` (broadcast against it)."""
    half = 2 ** (bits - 1)
    levels = jnp.clip(jnp.floor(weight / scale), -half, half - 1)
    return (levels + half).astype(jnp.uint8)


def dequantize(codes: Array, scale: Array, bits: int) -> Array:
    """The weight values of integer `codes`: (code - 2^(b-1) + 1/2) * scale."""
    return (codes.astype(jnp.float32) - (2 ** (bits - 1) - 0.5)) * scale


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def fake_quantize(weight: Array, scale: Array, bits: int) -> Array:
    """`weight` snapped to its nearest balanced level times `scale` (float32; `scale` broadcasts against it)."""
    return dequantize(quantize_codes(weight, scale, bits), scale, bits)


def _fake_quantize_fwd(weight: Array, scale: Array, bits: int) -> tuple[Array, tuple]:
    codes = quantize_codes(weight, scale, bits)
    return dequantize(codes, scale, bits), (weight, scale, codes)


def _fake_quantize_bwd(bits: int, residuals: tuple, g: Array) -> tuple[Array, Array]:
    weight, scale, codes = residuals
    half = 2 ** (bits - 1)
    ratio = weight / scale
    inside = jnp.abs(ratio) <= half
    level = codes.astype(jnp.float32) - (half - 0.5)
    grad_weight = jnp.where(inside, g, 0.0)
    grad_scale = g * jnp.where(inside, level - ratio, level)
    summed = tuple(i for i, (s, w) in enumerate(zip(scale.shape, weight.shape)) if s == 1 and w != 1)
    return grad_weight, jnp.sum(grad_scale, axis=summed, keepdims=True).reshape(scale.shape)


fake_quantize.defvjp(_fake_quantize_fwd, _fake_quantize_bwd)


def initial_scale(weight: Array, inputs: tuple[int, ...], bits: int) -> Array:
    """Per output channel (every dim but `inputs` kept, those set to 1), the scale with the least squared error
    among `CLIP_RATIOS` clip ratios of max|w| / 2^(b-1), searched one ratio at a time (memory of one weight)."""
    weight = weight.astype(jnp.float32)
    top = jnp.max(jnp.abs(weight), axis=inputs, keepdims=True) / 2 ** (bits - 1)
    top = jnp.maximum(top, 1e-12)

    def better(best: tuple[Array, Array], ratio: Array) -> tuple[tuple[Array, Array], None]:
        scale = top * ratio
        error = jnp.sum(jnp.square(fake_quantize(weight, scale, bits) - weight), axis=inputs, keepdims=True)
        keep = error < best[1]
        return (jnp.where(keep, scale, best[0]), jnp.where(keep, error, best[1])), None

    ratios = jnp.linspace(1.0 / CLIP_RATIOS, 1.0, CLIP_RATIOS)
    (scale, _), _ = jax.lax.scan(better, (top, jnp.full(top.shape, jnp.inf)), ratios)
    return scale


class FakeQuantization(WeightTransform):
    """Fake-quantizes one weight to `bits` bits with a learnable per-output-channel scale (see the module doc),
    stored as its log."""

    suffix = "qat"

    class Config(WeightTransform.Config):
        bits: int = 2

    def __init__(self, cfg: Config, *, weight: nnx.Param, rngs: nnx.Rngs):
        super().__init__(cfg, weight=weight, rngs=rngs)
        check_bits(self.config)
        roles = self.roles
        axes = tuple(None if i in roles.inputs else name for i, name in enumerate(roles.axes))
        self.log_scale = nnx.Param(jnp.log(initial_scale(weight[...], roles.inputs, self.config.bits)), axes=axes)

    def __call__(self, weight: Array) -> Array:
        scale = effective_scale(self.log_scale[...])
        return fake_quantize(weight.astype(jnp.float32), scale, self.config.bits).astype(weight.dtype)

    def refresh(self, weight: Array) -> None:
        self.log_scale[...] = jnp.log(initial_scale(weight, self.roles.inputs, self.config.bits))


def check_bits(cfg: ConfigBase) -> None:
    if cfg.bits not in SUPPORTED_BITS:
        raise ConfigValueError(f"{config_path(cfg, 'bits')}={cfg.bits} is not supported; use one of {SUPPORTED_BITS}")


class QATModifier(ConfigModifier):
    """Quantization-aware training of the weights of every layer whose config path `pattern` matches (`re.search`;
    default: all) and `exclude` does not (default: the embedding and the head). In a trainer config the scales are
    also kept out of weight decay."""

    class Config(ConfigModifier.Config):
        bits: int = 2
        pattern: str = ""
        exclude: str | None = DEFAULT_EXCLUDE

    def __call__(self, cfg: ConfigBase) -> ConfigBase:
        own = self.config
        check_bits(own)
        transform = FakeQuantization.default_config().set(bits=own.bits)
        modifier = WeightTransformModifier.default_config().set(
            transform=transform, pattern=own.pattern, exclude=own.exclude
        )
        cfg = modifier.instantiate()(cfg)
        no_decay = rf"_{FakeQuantization.suffix}/log_scale$"
        return map_configs(
            cfg, Learner, lambda learner: learner.set(no_decay_patterns=[*learner.no_decay_patterns, no_decay])
        )


def quantized_bits(model_cfg: ConfigBase) -> list[int]:
    """The bit widths of the fake-quantized layers of a model config (empty: no QAT)."""
    return sorted(
        {
            layer.weight_transform.bits
            for _, layer in find_configs(model_cfg, lambda c: Layer.matches(c) and c.weight_transform is not None)
            if FakeQuantization.matches(layer.weight_transform)
        }
    )


# ----------------------------------------------------------------------------------------------------
# Export: integer codes and scales, and the model loaded back from them.


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes (each < 2^bits) packed 8 / bits per byte, first code in the lowest bits; zero-padded."""
    per_byte = 8 // bits
    flat = np.asarray(codes, np.uint8).reshape(-1)
    flat = np.pad(flat, (0, -flat.size % per_byte)).reshape(-1, per_byte)
    shifts = np.arange(per_byte, dtype=np.uint8) * bits
    return np.bitwise_or.reduce(flat << shifts, axis=1).astype(np.uint8)


def unpack_codes(packed: np.ndarray, bits: int, shape: tuple[int, ...]) -> np.ndarray:
    """The inverse of `pack_codes`: codes of `shape`."""
    per_byte = 8 // bits
    shifts = np.arange(per_byte, dtype=np.uint8) * bits
    codes = (np.asarray(packed, np.uint8)[:, None] >> shifts) & np.uint8(2**bits - 1)
    return codes.reshape(-1)[: int(np.prod(shape))].reshape(shape)


def _flat_params(model: nnx.Module) -> dict[str, np.ndarray]:
    return {
        ".".join(map(str, path)): np.asarray(jax.device_get(v.get_value()))
        for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }


def export_quantized(model: nnx.Module, path: str | Path) -> dict[str, Any]:
    """Writes `model`'s fake-quantized weights as packed integer codes plus scales, with every other parameter as
    it is, into one `.npz` file; returns the manifest (format, and per weight: bits, shape, scale shape)."""
    quantized = transformed_weights(model, FakeQuantization)
    if not quantized:
        raise ValueError("export_quantized: the model has no quantized weight (apply QATModifier to its config)")
    params = _flat_params(model)
    arrays: dict[str, np.ndarray] = {}
    weights: dict[str, Any] = {}
    for item in quantized:
        key = f"{item.path.replace('/', '.')}.{item.name}" if item.path else item.name
        bits = item.transform.config.bits
        scale = effective_scale(item.transform.log_scale[...])
        codes = np.asarray(jax.device_get(quantize_codes(item.weight[...].astype(jnp.float32), scale, bits)))
        arrays[f"codes:{key}"] = pack_codes(codes, bits)
        arrays[f"scale:{key}"] = np.asarray(jax.device_get(scale))
        weights[key] = {"bits": bits, "shape": list(codes.shape)}
        del params[key], params[f"{key}_{FakeQuantization.suffix}.log_scale"]
    arrays.update({f"param:{key}": value for key, value in params.items()})
    manifest = {"format": FORMAT, "weights": weights}
    with open(path, "wb") as f:
        np.savez(f, manifest=np.frombuffer(json.dumps(manifest).encode(), np.uint8), **arrays)
    return manifest


def load_quantized(model_cfg: Layer.Config, path: str | Path) -> nnx.Module:
    """The model of `model_cfg` without weight transforms, with the weights of an `export_quantized` file
    (dequantized codes times scales, bit-identical to the fake-quantized forward) and its other parameters."""
    with np.load(path) as data:
        manifest = json.loads(bytes(data["manifest"]).decode())
        if manifest.get("format") != FORMAT:
            raise ValueError(f"{path}: not an axmini quantized export (format {manifest.get('format')!r})")
        values = {key[len("param:") :]: data[key] for key in data.files if key.startswith("param:")}
        for key, info in manifest["weights"].items():
            codes = unpack_codes(data[f"codes:{key}"], info["bits"], tuple(info["shape"]))
            values[key] = np.asarray(dequantize(jnp.asarray(codes), jnp.asarray(data[f"scale:{key}"]), info["bits"]))
    model = nnx.eval_shape(lambda: without_weight_transforms(model_cfg).instantiate(rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    flat = nnx.to_flat_state(params)
    keys = {".".join(map(str, p)): v for p, v in flat}
    mismatched = [k for k, v in keys.items() if k not in values or values[k].shape != v.get_value().shape]
    if mismatched:
        raise ValueError(
            f"{path} does not hold the parameters {mismatched[:3]} of this model's shapes; export it from this model"
        )
    for key, variable in keys.items():
        variable.set_value(jnp.asarray(values[key], variable.get_value().dtype))
    return nnx.merge(graphdef, nnx.from_flat_state(flat), rest)
