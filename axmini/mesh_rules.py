"""Mesh rules: one experiment, any hardware.

An *instance type* names hardware (`cpu`, `gpu-h100-8`, `tpu-v5p-256`, ...); the table below says how many chips a
host has and how many hosts a slice has, which is what `axmini launch` needs. A *mesh rule* maps instance types (a
full-match regex; the first matching rule wins) to a mesh shape over the axes `data, fsdp, expert, seq, model`
(one entry may be -1: inferred from the device count), the logical-axis rules that place parameters and activations
on that mesh, and config modifiers (remat, batch size...) that suit the hardware. The experiment itself never changes.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

from axmini.config import ConfigBase, ConfigModifier, ConfigValueError
from axmini.layers.attention import AttentionKernelModifier
from axmini.layers.kernels import BaseAttentionKernel, CudnnKernel, SplashKernel

MESH_AXES = ("data", "fsdp", "expert", "seq", "model")

# Parameters: embed over fsdp (ZeRO-3 style), heads/mlp/vocab over model (tensor parallel), experts over expert,
# Parallel-Track MoE tracks over model (a track's weights and activations stay on its devices).
# Activations: batch over every data-parallel axis; the first dim to claim a mesh axis gets it.
DEFAULT_LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp", "expert")),
    ("length", "seq"),
    ("embed", "fsdp"),
    ("mlp", "model"),
    ("heads", "model"),
    ("kv_heads", "model"),
    ("vocab", "model"),
    ("expert", "expert"),
    ("track", "model"),
    ("head_dim", None),
    ("layers", None),
)


class MeshRuleError(ConfigValueError):
    """A mesh rule that does not fit the hardware or the instance type."""


@dataclasses.dataclass(frozen=True)
class InstanceType:
    """What `launch` and MFU need to know about a kind of machine."""

    name: str
    platform: str  # cpu, gpu or tpu
    accelerator: str  # GKE accelerator label (or "" for cpu)
    chips_per_host: int
    hosts_per_slice: int
    topology: str = ""  # TPU topology, e.g. "4x4x8"
    machine_type: str = ""  # GCE machine type of one host
    peak_flops_per_chip: float | None = None  # dense bf16 FLOP/s
    cloud_tpu_type: str = ""  # Cloud TPU accelerator type (gcloud, xpk), e.g. "v5litepod-256"

    @property
    def chips_per_slice(self) -> int:
        return self.chips_per_host * self.hosts_per_slice


@dataclasses.dataclass(frozen=True)
class TpuGeneration:
    """A TPU generation as GKE and Cloud TPU name it, with the slice shapes its documentation lists."""

    accelerator: str  # GKE node label cloud.google.com/gke-tpu-accelerator
    cloud_prefix: str  # Cloud TPU accelerator type prefix: v5litepod-256
    machine_prefix: str  # GCE machine type of a host with K chips: <prefix>-<K>t
    cores_per_chip: int  # what the N of tpu-<generation>-N counts: TensorCores (2 a chip) or chips (1)
    peak_flops_per_chip: float  # dense bf16 FLOP/s
    topologies: tuple[str, ...]  # the documented slice shapes, smallest first
    max_chips_per_host: int  # a slice up to this size is one host; larger slices are made of 4-chip hosts


# The shapes of the Cloud TPU docs (tpu/docs/v4, v5p, v5e, v6e): 2D slices of 1 to 256 chips (v5e, v6e; no 1x2,
# nothing above 16x16), 3D slices of 4 to 4096 chips (v4, v5p; the power-of-two ones: v5p's larger 16x16x24 and the
# non-power-of-two shapes such as 4x4x12 are not in the table).
_SHAPES_2D = ("1x1", "2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16")
_SHAPES_3D = ("2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8", "8x8x8", "8x8x16", "8x16x16", "16x16x16")
TPU_GENERATIONS = {
    "v4": TpuGeneration("tpu-v4-podslice", "v4", "ct4p-hightpu", 2, 275e12, _SHAPES_3D, 4),
    "v5p": TpuGeneration("tpu-v5p-slice", "v5p", "ct5p-hightpu", 2, 459e12, _SHAPES_3D, 4),
    "v5e": TpuGeneration("tpu-v5-lite-podslice", "v5litepod", "ct5lp-hightpu", 1, 197e12, _SHAPES_2D, 8),
    "v6e": TpuGeneration("tpu-v6e-slice", "v6e", "ct6e-standard", 1, 918e12, _SHAPES_2D, 8),
}
# GPU kind -> (GKE accelerator label, GCE machine type of an 8-GPU host, peak bf16 FLOP/s a GPU)
_GPUS = {
    "h100": ("nvidia-h100-80gb", "a3-highgpu-8g", 989e12),
    "h200": ("nvidia-h200-141gb", "a3-ultragpu-8g", 989e12),
    "a100": ("nvidia-a100-80gb", "a2-ultragpu-8g", 312e12),
}


def _slice_sizes(tpu: TpuGeneration) -> dict[int, str]:
    """The N of tpu-<generation>-N -> the slice's topology, for every documented shape."""
    return {math.prod(int(d) for d in shape.split("x")) * tpu.cores_per_chip: shape for shape in tpu.topologies}


def tpu_instance_types(generation: str) -> list[str]:
    """Every TPU instance type of `generation`, smallest first: tpu-v5e-1, tpu-v5e-4, ..."""
    return [f"tpu-{generation}-{size}" for size in _slice_sizes(TPU_GENERATIONS[generation])]


def _tpu_instance_type(name: str, generation: str, size: int) -> InstanceType:
    tpu = TPU_GENERATIONS[generation]
    shapes = _slice_sizes(tpu)
    if size not in shapes:
        known = ", ".join(tpu_instance_types(generation))
        raise MeshRuleError(
            f"instance type {name!r} is not a {generation} slice that exists: use one of {known} "
            "(more chips: several slices)"
        )
    topology = shapes[size]
    chips = size // tpu.cores_per_chip
    chips_per_host = chips if chips <= tpu.max_chips_per_host else 4
    return InstanceType(
        name,
        "tpu",
        tpu.accelerator,
        chips_per_host,
        chips // chips_per_host,
        topology,
        f"{tpu.machine_prefix}-{chips_per_host}t",
        tpu.peak_flops_per_chip,
        f"{tpu.cloud_prefix}-{size}",
    )


def instance_type(name: str) -> InstanceType:
    """Parses an instance type name: `cpu`, `gpu-<h100|h200|a100>-8`, `tpu-<v4|v5p|v5e|v6e>-<N>` (a documented
    slice: N counts TensorCores on v4 and v5p, chips on v5e and v6e, as Cloud TPU's accelerator types do)."""
    if name == "cpu":
        return InstanceType("cpu", "cpu", "", chips_per_host=jax.local_device_count(), hosts_per_slice=1)
    gpu = re.fullmatch(r"gpu-(h100|h200|a100)-(\d+)", name)
    if gpu:
        accelerator, machine, flops = _GPUS[gpu.group(1)]
        count = int(gpu.group(2))
        if count != 8:
            raise MeshRuleError(f"instance type {name!r}: GPU hosts have 8 GPUs (use gpu-{gpu.group(1)}-8)")
        return InstanceType(name, "gpu", accelerator, 8, 1, machine_type=machine, peak_flops_per_chip=flops)
    tpu = re.fullmatch(r"tpu-(v4|v5p|v5e|v6e)-(\d+)", name)
    if tpu:
        return _tpu_instance_type(name, tpu.group(1), int(tpu.group(2)))
    known = ["cpu", *(f"gpu-{g}-8" for g in _GPUS), *(f"tpu-{t}-256" for t in TPU_GENERATIONS)]
    close = difflib.get_close_matches(name, known, n=2, cutoff=0.5)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    forms = "cpu, gpu-<h100|h200|a100>-8, tpu-<v4|v5p|v5e|v6e>-<N>"
    raise MeshRuleError(f"unknown instance type {name!r}{hint} (known forms: {forms})")


class MeshRule(ConfigBase):
    """Instance types matching `pattern` get this mesh, these logical-axis rules and these modifiers."""

    pattern: str = ".*"
    # Per-slice mesh shape over MESH_AXES (missing axes are 1; one entry may be -1). Slices stack on `data`.
    mesh_shape: dict[str, int] = {"fsdp": -1}
    logical_axis_rules: list[tuple[str, Any]] = list(DEFAULT_LOGICAL_AXIS_RULES)
    modifiers: list[ConfigModifier.Config] = []


def attention_kernel(kernel: BaseAttentionKernel.Config) -> ConfigModifier.Config:
    """The modifier that gives every attention `kernel`."""
    return AttentionKernelModifier.default_config().set(kernel=kernel)


def default_mesh_rules() -> list[MeshRule]:
    """The rules every experiment starts with: FSDP within a host or slice, data parallel across slices; cuDNN flash
    attention on GPUs, splash attention on TPUs (each falls back to XLA where it cannot run, e.g. decoding)."""
    cudnn = [attention_kernel(CudnnKernel.default_config())]
    splash = [attention_kernel(SplashKernel.default_config())]
    return [
        MeshRule(pattern="cpu", mesh_shape={"fsdp": -1}),
        MeshRule(pattern="gpu-.*", mesh_shape={"fsdp": -1}, modifiers=cudnn),
        MeshRule(pattern="tpu-v5e-.*|tpu-v6e-.*", mesh_shape={"fsdp": -1, "model": 1}, modifiers=splash),
        MeshRule(pattern="tpu-.*", mesh_shape={"fsdp": -1}, modifiers=splash),
    ]


def select_mesh_rule(instance: str, rules: Sequence[MeshRule]) -> MeshRule:
    """The first rule whose pattern fully matches `instance`."""
    for i, rule in enumerate(rules):
        try:
            if re.fullmatch(rule.pattern, instance):
                return rule
        except re.error as e:
            raise MeshRuleError(f"mesh_rules[{i}].pattern={rule.pattern!r} is not a valid regex ({e})") from None
    patterns = ", ".join(repr(r.pattern) for r in rules)
    raise MeshRuleError(f"no mesh rule matches instance type {instance!r} (rules: {patterns}); add one to mesh_rules")


def resolve_mesh_shape(rule: MeshRule, num_devices: int, num_slices: int = 1) -> tuple[int, ...]:
    """The per-slice shape over MESH_AXES with -1 inferred; refused when it does not divide the devices."""
    unknown = set(rule.mesh_shape) - set(MESH_AXES)
    if unknown:
        raise MeshRuleError(f"mesh rule {rule.pattern!r}: unknown mesh axes {sorted(unknown)} (axes: {MESH_AXES})")
    shape = [rule.mesh_shape.get(axis, 1) for axis in MESH_AXES]
    if sum(d == -1 for d in shape) > 1 or any(d == 0 or d < -1 for d in shape):
        raise MeshRuleError(f"mesh rule {rule.pattern!r}: shape {rule.mesh_shape} needs sizes > 0 and at most one -1")
    if num_devices % num_slices:
        raise MeshRuleError(f"{num_devices} devices do not split into {num_slices} slices")
    per_slice = num_devices // num_slices
    known = math.prod(d for d in shape if d != -1)
    if per_slice % known or (-1 not in shape and known != per_slice):
        raise MeshRuleError(
            f"mesh rule {rule.pattern!r}: shape {rule.mesh_shape} (product {known}) does not fit "
            f"{per_slice} devices per slice ({num_devices} devices, {num_slices} slices)"
        )
    return tuple(per_slice // known if d == -1 else d for d in shape)


def make_mesh(rule: MeshRule, devices: Sequence[jax.Device] | None = None, num_slices: int | None = None) -> Mesh:
    """A mesh over MESH_AXES for `devices` (default: all); with several slices (default: as many as the devices are
    on, TPU multi-slice), `data` spans them (DCN)."""
    devices = list(devices if devices is not None else jax.devices())
    if num_slices is None:
        num_slices = len({getattr(d, "slice_index", 0) for d in devices})
    shape = resolve_mesh_shape(rule, len(devices), num_slices)
    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    if num_slices > 1:
        dcn = tuple(num_slices if axis == "data" else 1 for axis in MESH_AXES)
        grid = mesh_utils.create_hybrid_device_mesh(shape, dcn, devices, process_is_granule=True)
    elif devices[0].platform == "cpu":
        grid = np.array(devices).reshape(shape)
    else:
        grid = mesh_utils.create_device_mesh(shape, devices)
    return Mesh(grid, MESH_AXES, axis_types=axis_types)


def memory_bytes(devices: Sequence[jax.Device], *, free: bool = False) -> int:
    """The memory of `devices` (or what is free of it): accelerators' own, or the host's RAM for CPU devices
    (which share it)."""
    if devices[0].platform == "cpu":
        pages = os.sysconf("SC_AVPHYS_PAGES" if free else "SC_PHYS_PAGES")
        return pages * os.sysconf("SC_PAGE_SIZE")
    total = 0
    for device in devices:
        stats = device.memory_stats() or {}
        total += stats.get("bytes_limit", 0) - (stats.get("bytes_in_use", 0) if free else 0)
    return total


def detect_instance_type() -> str:
    """The instance type of the running backend (cpu, gpu-h100-8, tpu-v5p-256, ...)."""
    device = jax.devices()[0]
    if device.platform == "cpu":
        return "cpu"
    kind = device.device_kind.lower()
    if device.platform == "gpu":
        for gpu in _GPUS:
            if gpu in kind:
                return f"gpu-{gpu}-8"
        raise MeshRuleError(f"unknown GPU {device.device_kind!r}; pass --mesh_selector explicitly")
    for generation, tpu in TPU_GENERATIONS.items():
        if generation.replace("v5e", "v5 lite") in kind or generation in kind.replace(" ", ""):
            return f"tpu-{generation}-{jax.device_count() * tpu.cores_per_chip}"
    raise MeshRuleError(f"unknown accelerator {device.device_kind!r}; pass --mesh_selector explicitly")
