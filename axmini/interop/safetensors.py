"""The safetensors format, read and written one tensor at a time (no torch, no whole-file loads).

A file is an 8-byte little-endian header length, a JSON header `{name: {"dtype", "shape", "data_offsets"}}`
(offsets relative to the end of the header) and the raw row-major bytes. A model larger than one file is split
into several, listed by `model.safetensors.index.json` (`{"weight_map": {name: file}}`), as Hugging Face does.

`TensorIndex.open(dir)` reads only the headers, so every name, shape and dtype is checked before any tensor is
read; `read(name)` then reads that one tensor. `write_safetensors` writes the header from shapes alone and then
each tensor as a producer yields it, so an export holds one tensor at a time.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import NamedTuple

import ml_dtypes
import numpy as np

from axmini.interop.errors import ConversionError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_CODES = {dtype: code for code, dtype in DTYPES.items()}


class TensorEntry(NamedTuple):
    file: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  # From the start of the file.
    nbytes: int


def _read_header(path: Path) -> dict[str, TensorEntry]:
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
    except FileNotFoundError:
        raise ConversionError(f"{path}: file not found") from None
    except (OSError, struct.error, ValueError) as e:
        raise ConversionError(f"{path}: not a readable safetensors file ({e})") from None
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info.get("dtype") not in DTYPES:
            raise ConversionError(f"{path}: tensor {name!r} has dtype {info.get('dtype')!r}, not one of {list(DTYPES)}")
        dtype, shape = DTYPES[info["dtype"]], tuple(int(d) for d in info["shape"])
        start, end = info["data_offsets"]
        if end - start != math.prod(shape) * dtype.itemsize:
            raise ConversionError(f"{path}: tensor {name!r} holds {end - start} bytes, not those of {shape} {dtype}")
        entries[name] = TensorEntry(path, dtype, shape, 8 + length + start, end - start)
    return entries


class TensorIndex:
    """The tensors of a checkpoint directory (one file or an index of shards), from the headers alone."""

    def __init__(self, entries: Mapping[str, TensorEntry], source: str):
        self.entries = dict(entries)
        self.source = source  # What error messages name: the single file or the index file.

    @classmethod
    def open(cls, directory: str | Path) -> TensorIndex:
        directory = Path(directory)
        index_path = directory / INDEX_FILE
        if index_path.exists():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise ConversionError(f"{index_path}: not a safetensors index ({type(e).__name__}: {e})") from None
            entries: dict[str, TensorEntry] = {}
            for file in sorted(set(weight_map.values())):
                for name, entry in _read_header(directory / file).items():
                    if weight_map.get(name) != file:
                        raise ConversionError(
                            f"{directory / file}: tensor {name!r} is not listed for it in {index_path}"
                        )
                    entries[name] = entry
            missing = sorted(set(weight_map) - set(entries))
            if missing:
                raise ConversionError(
                    f"{index_path}: tensor {missing[0]!r} is listed but not in {weight_map[missing[0]]}"
                )
            return cls(entries, str(index_path))
        single = directory / SINGLE_FILE
        if not single.exists():
            raise ConversionError(f"{directory}: neither {SINGLE_FILE} nor {INDEX_FILE} found")
        return cls(_read_header(single), str(single))

    def where(self, name: str) -> str:
        """The file that holds `name` (for error messages)."""
        return str(self.entries[name].file)

    def read(self, name: str) -> np.ndarray:
        """One tensor, read from its file into a fresh array."""
        entry = self.entries[name]
        count = math.prod(entry.shape)
        with open(entry.file, "rb") as f:
            f.seek(entry.offset)
            array = np.fromfile(f, dtype=entry.dtype, count=count)
        if array.size != count:
            raise ConversionError(f"{entry.file}: tensor {name!r} is truncated")
        return array.reshape(entry.shape)


class TensorSpec(NamedTuple):
    """What a writer needs to know of a tensor before it has it."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype


def _header(specs: Iterable[TensorSpec]) -> tuple[bytes, list[TensorSpec]]:
    header, offset, ordered = {"__metadata__": {"format": "pt"}}, 0, []
    for spec in specs:
        nbytes = math.prod(spec.shape) * np.dtype(spec.dtype).itemsize
        header[spec.name] = {"dtype": _CODES[np.dtype(spec.dtype)], "shape": list(spec.shape)}
        header[spec.name]["data_offsets"] = [offset, offset + nbytes]
        offset += nbytes
        ordered.append(spec)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # Keeps the data 8-byte aligned, as the reference writer does.
    return struct.pack("<Q", len(text)) + text, ordered


def plan_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Tensors grouped in order into files of at most `max_shard_bytes` (a larger tensor gets a file of its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        nbytes = math.prod(spec.shape) * np.dtype(spec.dtype).itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    return shards


def write_safetensors(
    directory: str | Path,
    specs: list[TensorSpec],
    produce: Callable[[str], np.ndarray],
    *,
    max_shard_bytes: int | None = None,
    on_tensor: Callable[[str], None] | None = None,
) -> list[Path]:
    """Writes the tensors of `specs` (in order), calling `produce(name)` for each one as it is written: one file
    `model.safetensors`, or shards plus `model.safetensors.index.json` when they exceed `max_shard_bytes`."""
    directory = Path(directory)
    shards = plan_shards(specs, max_shard_bytes) if max_shard_bytes else [specs]
    if len(shards) == 1:
        names = [SINGLE_FILE]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for file, shard in zip(names, shards):
        header, ordered = _header(shard)
        with open(directory / file, "wb") as f:
            f.write(header)
            for spec in ordered:
                array = np.ascontiguousarray(produce(spec.name), dtype=spec.dtype)
                if array.shape != tuple(spec.shape):
                    raise ValueError(f"tensor {spec.name!r}: produced shape {array.shape}, expected {spec.shape}")
                f.write(memoryview(array.reshape(-1).view(np.uint8)))
                if on_tensor is not None:
                    on_tensor(spec.name)
    if len(shards) > 1:
        total = sum(math.prod(s.shape) * np.dtype(s.dtype).itemsize for s in specs)
        weight_map = {spec.name: file for file, shard in zip(names, shards) for spec in shard}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return [directory / name for name in names]
