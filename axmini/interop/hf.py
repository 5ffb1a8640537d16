"""Hugging Face decoder families (Llama, Qwen3, Mistral, Gemma 3 text) as axmini `Decoder` configs, and back.

Everything a family means is here, in three parts:

- `read_hf_config(config.json)` -> `HFModel`: the family-independent description of the model (dims, per-layer
  windows and RoPE thetas, biases, norms...), with each family's defaults for keys a file may leave out, and a
  one-line error naming the file and key for anything axmini cannot reproduce exactly.
- `decoder_config(HFModel)` -> `Decoder.Config`, and `describe(Decoder.Config)` -> `HFModel` for the way back.
  Export is checked by a round trip: a config is exportable to a family when describing it and building it again
  gives the same model (`check_exportable`), so no feature is dropped silently.
- `tensor_maps(HFModel)`: which Hugging Face tensor fills which axmini parameter (and layer of a stacked one), and
  how the layout changes (`Transform`).

Conventions mapped exactly (see docs/interop.md): HF's `sliding_window=W` lets query i see keys i-W < j <= i
(W keys); axmini's `sliding_window=w` sees i-w <= j <= i (w + 1 keys), so w = W - 1, in training and decoding.
Gemma's norms compute x * (1 + w) (`RMSNorm.scale_offset=1`), its embeddings are multiplied by sqrt(hidden) cast to
the weight dtype (`Embedding.scale`), its query scale is query_pre_attn_scalar^-0.5 (`Attention.query_scale`), its
feed-forward is GeGLU with tanh-approximated GELU, and `head_dim` is independent of hidden / heads. Gemma 3 applies
`final_logit_softcapping` (`Decoder.logit_softcap`; null in the released configs) but, unlike Gemma 2, not
`attn_logit_softcapping`: transformers' Gemma3Attention never passes it to its kernels, so it is not mapped either
(the value is kept for an export). RoPE is
"rotate half" in every family (`RoPELayout.ROTATE_HALF`), with a theta per layer type (Gemma 3: local 10k,
global 1M).
"""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from axmini.config import ConfigBase, maybe_instantiate, visit
from axmini.interop.errors import ConversionError
from axmini.layers.attention import Attention, QKVProjection
from axmini.layers.decoder import Decoder
from axmini.layers.feed_forward import FeedForward, FeedForwardActivation
from axmini.layers.linear import Linear
from axmini.layers.norm import RMSNorm
from axmini.layers.position import RoPEProjection
from axmini.layers.transformer import PatternStack, RepeatedStack, TransformerLayer
from axmini.module import Layer

CONFIG_FILE = "config.json"


class Family(NamedTuple):
    """What distinguishes one Hugging Face decoder family from another."""

    architecture: str  # config.json's `architectures` entry.
    model_type: str
    defaults: Mapping[str, Any]  # The family's config-class defaults for keys a config.json may omit.
    qk_norm: bool = False  # RMSNorm of q and k over head_dim (Qwen3, Gemma 3).
    gemma: bool = False  # Gemma's norms (1 + w), sandwich norms, embedding scale, query_pre_attn_scalar, GeGLU.
    windows: bool = False  # Sliding-window layers are possible.


_COMMON = {"tie_word_embeddings": False, "attention_bias": False, "rms_norm_eps": 1e-6, "rope_theta": 10000.0}
FAMILIES: dict[str, Family] = {
    family.architecture: family
    for family in (
        Family("LlamaForCausalLM", "llama", {**_COMMON, "hidden_act": "silu"}),
        Family(
            "MistralForCausalLM", "mistral", {**_COMMON, "hidden_act": "silu", "sliding_window": 4096}, windows=True
        ),
        Family(
            "Qwen3ForCausalLM", "qwen3", {**_COMMON, "hidden_act": "silu", "head_dim": 128}, qk_norm=True, windows=True
        ),
        Family(
            "Gemma3ForCausalLM",
            "gemma3_text",
            {
                **_COMMON,
                "tie_word_embeddings": True,
                "hidden_activation": "gelu_pytorch_tanh",
                "head_dim": 256,
                "query_pre_attn_scalar": 256,
                "sliding_window": 4096,
                "rope_theta": 1_000_000.0,
                "rope_local_base_freq": 10_000.0,
            },
            qk_norm=True,
            gemma=True,
            windows=True,
        ),
    )
}
_ACTIVATIONS = {
    "silu": FeedForwardActivation.SWIGLU,
    "swish": FeedForwardActivation.SWIGLU,
    "gelu_pytorch_tanh": FeedForwardActivation.GEGLU,
    "gelu_new": FeedForwardActivation.GEGLU,
}
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
SLIDING, FULL = "sliding_attention", "full_attention"


class HFModel(NamedTuple):
    """A Hugging Face decoder, whatever its family: what both directions of the conversion read and write."""

    family: Family
    vocab_size: int
    dim: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_dim: int
    activation: FeedForwardActivation
    norm_eps: float
    tied_embeddings: bool
    attention_bias: bool
    windows: tuple[int | None, ...]  # Per layer: HF's sliding_window W (W keys), or None for full attention.
    rope_thetas: tuple[float, ...]  # Per layer.
    query_pre_attn_scalar: float | None  # Gemma: the query scale is its inverse square root.
    final_logit_softcap: float | None
    pad_id: int
    dtype: str  # float32, bfloat16 or float16.
    extra: Mapping[str, Any] = {}  # The rest of config.json (token ids, max positions...), carried to an export.


# ----------------------------------------------------------------------------------------------------
# config.json -> HFModel.


def _fail(where: str, message: str) -> ConversionError:
    return ConversionError(f"{where}: {message}")


def read_hf_config(directory: str | Path) -> HFModel:
    """The model described by `directory/config.json`; refuses (one line, naming the file and key) what axmini
    cannot reproduce exactly."""
    path = Path(directory) / CONFIG_FILE
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise _fail(str(path), "file not found (a Hugging Face model directory has config.json)") from None
    except (OSError, ValueError) as e:
        raise _fail(str(path), f"not readable JSON ({e})") from None
    return parse_hf_config(raw, str(path))


def parse_hf_config(raw: Mapping[str, Any], where: str = CONFIG_FILE) -> HFModel:
    architectures = raw.get("architectures") or []
    supported = ", ".join(FAMILIES)
    if len(architectures) != 1 or architectures[0] not in FAMILIES:
        raise _fail(where, f"architectures={architectures} is not supported; supported: {supported}")
    family = FAMILIES[architectures[0]]
    cfg = {**family.defaults, **{k: v for k, v in raw.items() if v is not None or k in ("sliding_window",)}}

    def get(key: str) -> Any:
        if key not in cfg:
            raise _fail(where, f"{key} is missing")
        return cfg[key]

    for key, allowed in (("mlp_bias", False), ("use_bidirectional_attention", False), ("pretraining_tp", 1)):
        if cfg.get(key, allowed) != allowed:
            raise _fail(where, f"{key}={cfg[key]!r} is not supported (only {allowed!r})")
    act_key = "hidden_activation" if family.gemma else "hidden_act"
    if get(act_key) not in _ACTIVATIONS:
        raise _fail(where, f"{act_key}={cfg[act_key]!r} is not supported; supported: {', '.join(_ACTIVATIONS)}")
    dtype = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32").removeprefix("torch.")
    if dtype not in _DTYPES:
        raise _fail(where, f"dtype={dtype!r} is not supported; supported: {', '.join(_DTYPES)}")
    num_layers, num_heads = int(get("num_hidden_layers")), int(get("num_attention_heads"))
    dim = int(get("hidden_size"))
    layer_types = _layer_types(cfg, family, num_layers, where)
    window = cfg.get("sliding_window")
    if any(t == SLIDING for t in layer_types) and (not isinstance(window, int) or window < 2):
        raise _fail(where, f"sliding_window={window!r} must be an integer >= 2 (axmini's window is W - 1 >= 1)")
    thetas = _rope_thetas(cfg, family, layer_types, where)
    return HFModel(
        family=family,
        vocab_size=int(get("vocab_size")),
        dim=dim,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
        head_dim=int(cfg.get("head_dim") or dim // num_heads),
        hidden_dim=int(get("intermediate_size")),
        activation=_ACTIVATIONS[cfg[act_key]],
        norm_eps=float(get("rms_norm_eps")),
        tied_embeddings=bool(get("tie_word_embeddings")),
        attention_bias=bool(get("attention_bias")),
        windows=tuple(window if t == SLIDING else None for t in layer_types),
        rope_thetas=thetas,
        query_pre_attn_scalar=float(get("query_pre_attn_scalar")) if family.gemma else None,
        final_logit_softcap=_float_or_none(cfg.get("final_logit_softcapping")),
        pad_id=int(cfg.get("pad_token_id") or 0),
        dtype=dtype,
        extra=dict(raw),
    )


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


def _layer_types(cfg: Mapping[str, Any], family: Family, num_layers: int, where: str) -> list[str]:
    """Per layer: sliding_attention or full_attention, from `layer_types` or the family's older keys."""
    types = cfg.get("layer_types")
    if types is None:
        if not family.windows or cfg.get("sliding_window") is None:
            types = [FULL] * num_layers
        elif family.architecture == "Qwen3ForCausalLM":
            sliding = bool(cfg.get("use_sliding_window", False))
            first = int(cfg.get("max_window_layers", 28))
            types = [SLIDING if sliding and i >= first else FULL for i in range(num_layers)]
        elif family.gemma:
            period = int(cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or 6)
            types = [SLIDING if (i + 1) % period else FULL for i in range(num_layers)]
        else:
            types = [SLIDING] * num_layers
    if len(types) != num_layers or set(types) - {SLIDING, FULL}:
        raise _fail(where, f"layer_types={types} must list {SLIDING!r} or {FULL!r} for each of {num_layers} layers")
    if SLIDING in types and not family.windows:
        raise _fail(where, f"layer_types has {SLIDING!r} layers, which {family.architecture} does not have")
    return list(types)


def _rope_thetas(cfg: Mapping[str, Any], family: Family, layer_types: list[str], where: str) -> tuple[float, ...]:
    """Per layer RoPE theta, from `rope_parameters` (one dict, or one per layer type) or the older keys."""
    params = cfg.get("rope_parameters")
    if params is None:
        scaling = cfg.get("rope_scaling")
        params = {"rope_type": "default", **(scaling or {}), "rope_theta": cfg["rope_theta"]}
        if family.gemma:
            local = {"rope_type": "default", "rope_theta": cfg["rope_local_base_freq"]}
            params = {FULL: params, SLIDING: local}
    per_type = params if family.gemma or FULL in params else {FULL: params, SLIDING: params}
    thetas = []
    for layer_type in layer_types:
        entry = per_type.get(layer_type) or {}
        rope_type = entry.get("rope_type", entry.get("type", "default"))
        if rope_type != "default":
            raise _fail(where, f"RoPE type {rope_type!r} ({layer_type}) is not supported; supported: 'default'")
        if "rope_theta" not in entry:
            raise _fail(where, f"rope_theta of {layer_type} layers is missing")
        thetas.append(float(entry["rope_theta"]))
    return tuple(thetas)


# ----------------------------------------------------------------------------------------------------
# HFModel <-> Decoder.Config.


def _norm(model: HFModel) -> RMSNorm.Config:
    return RMSNorm.default_config().set(eps=model.norm_eps, scale_offset=1.0 if model.family.gemma else 0.0)


def _layer_config(model: HFModel, window: int | None, theta: float) -> TransformerLayer.Config:
    gemma = model.family.gemma
    head_dim = model.head_dim if model.head_dim != model.dim // model.num_heads else None
    attention = Attention.default_config().set(
        num_heads=model.num_heads,
        num_kv_heads=model.num_kv_heads,
        head_dim=head_dim,
        input_linear=RoPEProjection.default_config().set(
            theta=theta, inner=QKVProjection.default_config().set(bias=model.attention_bias)
        ),
        qk_norm=_norm(model) if model.family.qk_norm else None,
        sliding_window=None if window is None else window - 1,  # HF's W keys are axmini's window W - 1.
        query_scale=model.query_pre_attn_scalar**-0.5 if gemma else None,
    )
    attention.output_linear.bias = model.attention_bias
    return TransformerLayer.default_config().set(
        norm=_norm(model),
        self_attention=attention,
        feed_forward=FeedForward.default_config().set(hidden_dim=model.hidden_dim, activation=model.activation),
        post_attention_norm=_norm(model) if gemma else None,
        post_feed_forward_norm=_norm(model) if gemma else None,
    )


def layer_period(model: HFModel) -> int:
    """The shortest period of the per-layer (window, theta) sequence that divides the number of layers."""
    kinds = list(zip(model.windows, model.rope_thetas))
    n = model.num_layers
    return next(p for p in range(1, n + 1) if n % p == 0 and all(kinds[i] == kinds[i % p] for i in range(n)))


def decoder_config(model: HFModel) -> Decoder.Config:
    """The axmini Decoder computing what the Hugging Face model computes: a RepeatedStack when all layers are
    alike, else a PatternStack of the shortest repeating pattern (Gemma 3: 5 local : 1 global), scanned over its
    repeats."""
    period = layer_period(model)
    layers = [_layer_config(model, model.windows[i], model.rope_thetas[i]) for i in range(period)]
    if period == 1:
        stack = RepeatedStack.default_config().set(num_layers=model.num_layers, layer=layers[0])
    else:
        stack = PatternStack.default_config().set(num_layers=model.num_layers, pattern=layers)
    cfg = Decoder.default_config().set(
        vocab_size=model.vocab_size,
        dim=model.dim,
        stack=stack,
        output_norm=_norm(model),
        lm_head=None if model.tied_embeddings else Linear.default_config(),
        logit_softcap=model.final_logit_softcap,
        pad_id=model.pad_id if 0 <= model.pad_id < model.vocab_size else 0,
    )
    cfg.embedding.scale = math.sqrt(model.dim) if model.family.gemma else None
    return set_param_dtype(cfg, _DTYPES[model.dtype])


def set_param_dtype(cfg: Decoder.Config, dtype: Any) -> Decoder.Config:
    """`cfg` with every layer's parameters in `dtype` (activations stay in `cfg.dtype`)."""
    cfg = cfg.clone()
    cfg.param_dtype = dtype
    visit(cfg, lambda path, value: value.set(param_dtype=dtype) if Layer.matches(value) else None)
    return cfg


def dtype_name(dtype: Any) -> str:
    name = np.dtype(dtype).name
    if name not in _DTYPES:
        raise ConversionError(f"param_dtype {name} has no Hugging Face equivalent; use one of {', '.join(_DTYPES)}")
    return name


def _layers(cfg: Decoder.Config) -> list[ConfigBase]:
    stack = cfg.stack
    if RepeatedStack.matches(stack):
        return [stack.layer] * stack.num_layers
    if PatternStack.matches(stack):
        return [stack.pattern[i % len(stack.pattern)] for i in range(stack.num_layers)]
    raise ConversionError(f"stack: {type(stack).__qualname__} has no Hugging Face equivalent (only plain stacks)")


def describe(cfg: Decoder.Config, family: Family) -> HFModel:
    """The Hugging Face model of `family` closest to `cfg`; `check_exportable` tells whether it is exact."""
    layers = _layers(cfg)
    first = layers[0]
    for i, layer in enumerate(layers):
        attention, rope = layer.self_attention, layer.self_attention.input_linear
        if not (TransformerLayer.matches(layer) and Attention.matches(attention) and RoPEProjection.matches(rope)):
            raise ConversionError(
                f"stack layer {i}: only transformer layers with RoPE attention have a Hugging Face equivalent"
            )
    attention = first.self_attention
    heads = attention.num_heads
    windows = tuple(None if (w := layer.self_attention.sliding_window) is None else w + 1 for layer in layers)
    query_scale = attention.query_scale
    return HFModel(
        family=family,
        vocab_size=cfg.vocab_size,
        dim=cfg.dim,
        num_layers=len(layers),
        num_heads=heads,
        num_kv_heads=attention.num_kv_heads or heads,
        head_dim=attention.head_dim or cfg.dim // heads,
        hidden_dim=int(maybe_instantiate(first.feed_forward.hidden_dim, input_dim=cfg.dim)),
        activation=first.feed_forward.activation,
        norm_eps=first.norm.eps,
        tied_embeddings=cfg.lm_head is None,
        attention_bias=attention.input_linear.inner.bias,
        windows=windows,
        rope_thetas=tuple(layer.self_attention.input_linear.theta for layer in layers),
        query_pre_attn_scalar=(
            round(query_scale**-2, 6) if query_scale is not None else float(attention.head_dim or cfg.dim // heads)
        )
        if family.gemma
        else None,
        final_logit_softcap=cfg.logit_softcap,
        pad_id=cfg.pad_id,
        dtype=dtype_name(cfg.param_dtype),
    )


# Fields that do not change what a model computes from its parameters (initializers, numerics of the kernels,
# memory policies, loss options): ignored when checking that an export is exact.
_NOT_ARCHITECTURE = {"param_init", "param_dtype", "dtype", "kernel", "remat", "z_loss_weight", "pad_id"}


def _architecture_text(cfg: Decoder.Config) -> dict[str, Any]:
    """The config's leaves that define the computation, with a deferred hidden_dim resolved to its int."""
    cfg = cfg.clone()
    visit(
        cfg,
        lambda path, value: (
            value.set(hidden_dim=int(maybe_instantiate(value.hidden_dim, input_dim=cfg.dim)))
            if FeedForward.matches(value) and not isinstance(value.hidden_dim, int)
            else None
        ),
    )
    return {
        path: value
        for path, value in cfg.to_flat_dict().items()
        if not set(path.replace("[", ".").split(".")) & _NOT_ARCHITECTURE
    }


def check_exportable(cfg: Decoder.Config, family: Family) -> HFModel:
    """The Hugging Face model of `family` that computes exactly what `cfg` computes, or a one-line error naming the
    first config path it cannot express."""
    model = describe(cfg, family)
    want, got = _architecture_text(cfg), _architecture_text(decoder_config(model))
    for path in [*want, *(p for p in got if p not in want)]:
        if want.get(path, "<absent>") != got.get(path, "<absent>"):
            raise ConversionError(
                f"model.{path}={_show(want.get(path, '<absent>'))} cannot be expressed by a Hugging Face "
                f"{family.architecture} checkpoint (it would be {_show(got.get(path, '<absent>'))})"
            )
    return model


def _show(value: Any) -> str:
    return f"{value.__module__}.{value.__qualname__}" if isinstance(value, type) else repr(value)


def choose_family(cfg: Decoder.Config, preferred: str | None = None) -> HFModel:
    """The exact Hugging Face form of `cfg`: in the `preferred` family (where it came from) when given, else the
    first family that expresses it."""
    candidates = [FAMILIES[preferred]] if preferred else list(FAMILIES.values())
    errors = []
    for family in candidates:
        try:
            return check_exportable(cfg, family)
        except ConversionError as e:
            errors.append(str(e))
    raise ConversionError(errors[0] if len(errors) == 1 else f"no supported family expresses this model: {errors[0]}")


def hf_config_dict(model: HFModel) -> dict[str, Any]:
    """config.json of `model`, keeping the keys of the original file that axmini does not use (token ids...)."""
    family = model.family
    layer_types = [SLIDING if w is not None else FULL for w in model.windows]
    window = next((w for w in model.windows if w is not None), None)
    thetas = dict(zip(layer_types, model.rope_thetas))
    if family.gemma:
        rope = {t: {"rope_theta": thetas.get(t, 10_000.0), "rope_type": "default"} for t in (FULL, SLIDING)}
    else:
        if len(set(model.rope_thetas)) > 1:
            raise ConversionError(f"{family.architecture} has one RoPE theta; this model has {set(model.rope_thetas)}")
        rope = {"rope_theta": model.rope_thetas[0], "rope_type": "default"}
    if family.architecture == "MistralForCausalLM" and len(set(model.windows)) > 1:
        raise ConversionError("MistralForCausalLM has one window for every layer; this model's layers differ")
    out = {
        **{k: v for k, v in model.extra.items() if k not in ("rope_theta", "rope_scaling", "torch_dtype")},
        "architectures": [family.architecture],
        "model_type": family.model_type,
        "vocab_size": model.vocab_size,
        "hidden_size": model.dim,
        "intermediate_size": model.hidden_dim,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_heads,
        "num_key_value_heads": model.num_kv_heads,
        "head_dim": model.head_dim,
        "rms_norm_eps": model.norm_eps,
        "tie_word_embeddings": model.tied_embeddings,
        "attention_bias": model.attention_bias,
        "rope_parameters": rope,
        "dtype": model.dtype,
    }
    activation = {FeedForwardActivation.SWIGLU: "silu", FeedForwardActivation.GEGLU: "gelu_pytorch_tanh"}
    if model.activation not in activation:
        raise ConversionError(f"feed-forward activation {model.activation.name} has no Hugging Face equivalent")
    out["hidden_activation" if family.gemma else "hidden_act"] = activation[model.activation]
    if family.windows:
        out["sliding_window"] = window
    if family.architecture in ("Qwen3ForCausalLM", "Gemma3ForCausalLM"):
        out["layer_types"] = layer_types
    if family.architecture == "Qwen3ForCausalLM":
        out["use_sliding_window"] = window is not None
        out["max_window_layers"] = layer_types.index(SLIDING) if window is not None else model.num_layers
    if family.gemma:
        scalar = model.query_pre_attn_scalar
        out["query_pre_attn_scalar"] = int(scalar) if scalar == int(scalar) else scalar
        out["final_logit_softcapping"] = model.final_logit_softcap
    out.setdefault("pad_token_id", model.pad_id)
    return out


# ----------------------------------------------------------------------------------------------------
# Tensors.


class Transform(enum.Enum):
    """How a Hugging Face tensor's layout becomes an axmini parameter's (and back)."""

    COPY = "copy"
    TRANSPOSE = "transpose"  # HF Linear [out, in] <-> axmini [in, out].
    IN_HEADS = "in_heads"  # HF [heads * head_dim, D] <-> axmini [D, heads, head_dim] (q, k, v).
    OUT_HEADS = "out_heads"  # HF [D, heads * head_dim] <-> axmini [heads, head_dim, D] (o).
    HEAD_BIAS = "head_bias"  # HF [heads * head_dim] <-> axmini [heads, head_dim].

    def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The Hugging Face shape of an axmini parameter of `shape`."""
        if self is Transform.TRANSPOSE:
            return shape[::-1]
        if self is Transform.IN_HEADS:
            return (shape[1] * shape[2], shape[0])
        if self is Transform.OUT_HEADS:
            return (shape[2], shape[0] * shape[1])
        if self is Transform.HEAD_BIAS:
            return (shape[0] * shape[1],)
        return shape

    def to_axmini(self, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        if self in (Transform.TRANSPOSE, Transform.IN_HEADS, Transform.OUT_HEADS):
            x = x.T
        return x.reshape(shape)

    def to_hf(self, x: np.ndarray) -> np.ndarray:
        if self is Transform.IN_HEADS:
            x = x.reshape(x.shape[0], -1)
        elif self is Transform.OUT_HEADS:
            x = x.reshape(-1, x.shape[-1])
        elif self is Transform.HEAD_BIAS:
            x = x.reshape(-1)
        return x.T if self in (Transform.TRANSPOSE, Transform.IN_HEADS, Transform.OUT_HEADS) else x


class TensorMap(NamedTuple):
    """One Hugging Face tensor and the axmini parameter (and, in a scanned stack, the layer) it fills."""

    hf_name: str
    path: str  # The parameter's path in the model (`stack/layers/feed_forward/wi_0`).
    layer: int | None  # Index on the leading `layers` axis of a stacked layer parameter; None: the whole param.
    transform: Transform


def _layer_tensors(model: HFModel) -> list[tuple[str, str, Transform]]:
    """(HF name within a layer, axmini path within a layer, transform) of one transformer layer."""
    t = Transform
    attn = "self_attention/input_linear/inner"
    tensors = [
        ("input_layernorm.weight", "attention_norm/scale", t.COPY),
        ("self_attn.q_proj.weight", f"{attn}/q", t.IN_HEADS),
        ("self_attn.k_proj.weight", f"{attn}/k", t.IN_HEADS),
        ("self_attn.v_proj.weight", f"{attn}/v", t.IN_HEADS),
        ("self_attn.o_proj.weight", "self_attention/output_linear/weight", t.OUT_HEADS),
        ("mlp.gate_proj.weight", "feed_forward/wi_0", t.TRANSPOSE),
        ("mlp.up_proj.weight", "feed_forward/wi_1", t.TRANSPOSE),
        ("mlp.down_proj.weight", "feed_forward/wo", t.TRANSPOSE),
    ]
    if model.attention_bias:
        tensors += [(f"self_attn.{n}_proj.bias", f"{attn}/{n}_bias", t.HEAD_BIAS) for n in "qkv"]
        tensors.append(("self_attn.o_proj.bias", "self_attention/output_linear/bias", t.COPY))
    if model.family.qk_norm:
        tensors += [(f"self_attn.{n}_norm.weight", f"self_attention/{n}_norm/scale", t.COPY) for n in "qk"]
    if model.family.gemma:
        tensors += [
            ("post_attention_layernorm.weight", "post_attention_norm/scale", t.COPY),
            ("pre_feedforward_layernorm.weight", "feed_forward_norm/scale", t.COPY),
            ("post_feedforward_layernorm.weight", "post_feed_forward_norm/scale", t.COPY),
        ]
    else:  # Llama's "post attention" norm is the norm before the feed-forward.
        tensors.append(("post_attention_layernorm.weight", "feed_forward_norm/scale", t.COPY))
    return tensors


def tensor_maps(model: HFModel) -> list[TensorMap]:
    """Every Hugging Face tensor of `model` and the parameter of `decoder_config(model)` it fills."""
    maps = [TensorMap("model.embed_tokens.weight", "embedding/weight", None, Transform.COPY)]
    stack = decoder_config(model).stack
    for i in range(model.num_layers):
        prefix, layer = stack.klass.layer_location(stack, i)
        for hf_name, path, transform in _layer_tensors(model):
            maps.append(TensorMap(f"model.layers.{i}.{hf_name}", f"stack/{prefix}/{path}", layer, transform))
    maps.append(TensorMap("model.norm.weight", "output_norm/scale", None, Transform.COPY))
    if not model.tied_embeddings:
        maps.append(TensorMap("lm_head.weight", "lm_head/weight", None, Transform.TRANSPOSE))
    return maps


def ignored_tensor(name: str, model: HFModel) -> bool:
    """Tensors a checkpoint may hold that carry nothing axmini needs: RoPE tables of old Llama checkpoints, and
    the copy of a tied embedding some writers keep as lm_head.weight."""
    return name.endswith("rotary_emb.inv_freq") or (model.tied_embeddings and name == "lm_head.weight")
