"""Parameters in and out of Hugging Face safetensors, one tensor at a time, straight into (sharded) arrays.

Import: every tensor's name, shape and dtype is checked against the model from the file headers alone, before a
byte of data is read. Then each tensor is read, laid out as axmini's parameter (`Transform`), cast to the
parameter dtype and placed with the parameter's sharding; a scanned stack's parameter [layers, ...] is allocated
once and filled layer by layer by an in-place (donated) update. Host memory therefore holds the model's parameters
plus about one tensor, never two copies of the model.

Export: each parameter (or one layer of a stacked one) is fetched, laid out as Hugging Face's and written, so
memory beyond the model is again about one tensor. (Both keep freed tensors out of the heap: `_release_freed_buffers`.)
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, Sharding, SingleDeviceSharding
from tqdm import tqdm

from axmini.interop.errors import ConversionError
from axmini.interop.hf import HFModel, TensorMap, ignored_tensor, tensor_maps
from axmini.interop.safetensors import TensorIndex, TensorSpec, write_safetensors
from axmini.layers.decoder import Decoder
from axmini.module import LogicalAxisRules, build_abstract, logical_to_spec

ParamState = nnx.State  # The model's nnx.Param state, as `nnx.split(model, nnx.Param, ...)` gives it.


def _path(path: tuple[Any, ...]) -> str:
    return "/".join(str(getattr(p, "key", p)) for p in path)


def abstract_params(cfg: Decoder.Config) -> ParamState:
    """The parameters of `cfg`'s model as ShapeDtypeStructs (nothing allocated)."""
    return nnx.split(build_abstract(cfg), nnx.Param, ...)[1]


def check_tensors(index: TensorIndex, model: HFModel, params: ParamState) -> list[TensorMap]:
    """The tensor maps of `model`, after checking the checkpoint holds exactly those tensors with the right shapes
    (from the headers); a one-line error names the first missing, extra or misshapen tensor and its file."""
    shapes = {_path(path): tuple(v.get_value().shape) for path, v in nnx.to_flat_state(params)}
    maps = tensor_maps(model)
    for m in maps:
        shape = shapes[m.path] if m.layer is None else shapes[m.path][1:]
        want = m.transform.hf_shape(shape)
        if m.hf_name not in index.entries:
            raise ConversionError(f"{index.source}: tensor {m.hf_name!r} is missing (expected shape {list(want)})")
        entry = index.entries[m.hf_name]
        if entry.shape != want:
            raise ConversionError(
                f"{entry.file}: tensor {m.hf_name!r} has shape {list(entry.shape)}, expected {list(want)} "
                f"(from {model.family.architecture} config.json)"
            )
        if not np.issubdtype(entry.dtype, np.floating) and entry.dtype.name != "bfloat16":
            raise ConversionError(f"{entry.file}: tensor {m.hf_name!r} has dtype {entry.dtype}, not a float type")
    expected = {m.hf_name for m in maps}
    for name in index.entries:
        if name not in expected and not ignored_tensor(name, model):
            raise ConversionError(
                f"{index.where(name)}: unexpected tensor {name!r} (not part of the {model.family.architecture} "
                "that config.json describes)"
            )
    return maps


def param_shardings(params: ParamState, mesh: Mesh | None, rules: LogicalAxisRules) -> dict[str, Sharding]:
    """{path: sharding} of every parameter: from its logical axes on `mesh`, or on the first device without one."""
    result = {}
    for path, variable in nnx.to_flat_state(params):
        value = variable.get_value()
        if mesh is None:
            result[_path(path)] = SingleDeviceSharding(jax.devices()[0])
        else:
            axes = variable.get_metadata().get("axes") or (None,) * value.ndim
            result[_path(path)] = NamedSharding(mesh, logical_to_spec(axes, rules, value.shape, mesh))
    return result


@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(stacked: jax.Array, value: jax.Array, layer: jax.Array) -> jax.Array:
    """stacked[layer] = value, in place (the stacked buffer is donated)."""
    return jax.lax.dynamic_update_index_in_dim(stacked, value.astype(stacked.dtype), layer, 0)


def _place(value: np.ndarray, sharding: Sharding) -> jax.Array:
    """`value` as a jax array with `sharding`; each device receives only its shard."""
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def _zeros(shape: tuple[int, ...], dtype: Any, sharding: Sharding) -> jax.Array:
    """Zeros with `sharding`, built shard by shard."""

    def shard(index: tuple[slice, ...]) -> np.ndarray:
        return np.zeros([len(range(*s.indices(n))) for s, n in zip(index, shape)], dtype)

    return jax.make_array_from_callback(shape, sharding, shard)


def _release_freed_buffers() -> None:
    """Makes glibc give every buffer of 1 MiB or more back to the OS when it is freed.

    A streamed import allocates and frees one tensor after another. glibc raises its mmap threshold to the largest
    block freed so far (up to 32 MiB), after which such tensors come from the heap, and freed heap memory mostly stays
    in the process: a 1.1B-parameter import then peaked at 1.43x its size instead of 1.26x. A fixed threshold keeps
    every large buffer mmap-backed. Process-wide and harmless elsewhere; a no-op without glibc.
    """
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def load_params(
    directory: str | Path,
    model: HFModel,
    params: ParamState,
    *,
    mesh: Mesh | None = None,
    rules: LogicalAxisRules = (),
    progress: bool = False,
) -> ParamState:
    """The parameters of the Hugging Face checkpoint in `directory`, streamed into `params` (the abstract state
    of `decoder_config(model)`, with any param dtype), placed on `mesh` by `rules` (or on one device)."""
    index = TensorIndex.open(directory)
    maps = check_tensors(index, model, params)
    _release_freed_buffers()
    shardings = param_shardings(params, mesh, rules)
    variables = {_path(path): v for path, v in nnx.to_flat_state(params)}
    by_path: dict[str, list[TensorMap]] = {}
    for m in maps:
        by_path.setdefault(m.path, []).append(m)
    missing = sorted(set(variables) - set(by_path))
    if missing:  # A bug in the family table, not bad input.
        raise RuntimeError(f"no Hugging Face tensor maps to parameter {missing[0]}")
    bar = tqdm(total=len(maps), desc="import", unit="tensor", disable=not progress)
    for path, path_maps in by_path.items():
        variable = variables[path]
        shape, dtype = tuple(variable.get_value().shape), variable.get_value().dtype
        if path_maps[0].layer is None:
            (m,) = path_maps
            value = m.transform.to_axmini(index.read(m.hf_name), shape).astype(dtype, copy=False)
            variable.set_value(_place(value, shardings[path]))
            bar.update()
            continue
        stacked = _zeros(shape, dtype, shardings[path])
        for m in path_maps:
            value = m.transform.to_axmini(index.read(m.hf_name), shape[1:]).astype(dtype, copy=False)
            stacked = _set_layer(stacked, value, np.int32(m.layer))
            bar.update()
        variable.set_value(stacked)
    bar.close()
    return params


def export_specs(model: HFModel, params: ParamState) -> tuple[list[TensorSpec], Callable[[str], np.ndarray]]:
    """What `write_safetensors` needs to write `params` as `model`'s tensors: their specs, and a producer that
    fetches and lays out one tensor at a time."""
    variables = {_path(path): v for path, v in nnx.to_flat_state(params)}
    dtype = np.dtype(jnp.dtype(model.dtype))
    maps = {m.hf_name: m for m in tensor_maps(model)}
    specs = []
    for m in maps.values():
        shape = tuple(variables[m.path].get_value().shape)
        specs.append(TensorSpec(m.hf_name, m.transform.hf_shape(shape if m.layer is None else shape[1:]), dtype))

    def produce(name: str) -> np.ndarray:
        m = maps[name]
        value = variables[m.path].get_value()
        value = np.asarray(value if m.layer is None else value[m.layer])
        return m.transform.to_hf(value).astype(dtype, copy=False)

    return specs, produce


def save_hf_tensors(
    directory: str | Path,
    model: HFModel,
    params: ParamState,
    *,
    max_shard_bytes: int | None = None,
    progress: bool = False,
) -> list[Path]:
    """Writes `params` into `directory` as `model`'s safetensors file(s)."""
    specs, produce = export_specs(model, params)
    _release_freed_buffers()
    bar = tqdm(total=len(specs), desc="export", unit="tensor", disable=not progress)
    files = write_safetensors(
        directory, specs, produce, max_shard_bytes=max_shard_bytes, on_tensor=lambda _: bar.update()
    )
    bar.close()
    return files
