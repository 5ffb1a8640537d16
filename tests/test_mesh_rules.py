"""Mesh rules: instance-type parsing, first-match selection, -1 inference, refusal of shapes that do not fit."""

import math

import jax
import pytest

from axmini.mesh_rules import (
    MESH_AXES,
    TPU_GENERATIONS,
    MeshRule,
    MeshRuleError,
    default_mesh_rules,
    detect_instance_type,
    instance_type,
    make_mesh,
    resolve_mesh_shape,
    select_mesh_rule,
    tpu_instance_types,
)


def test_first_matching_rule_wins():
    rules = [
        MeshRule(pattern="tpu-v5e-.*", mesh_shape={"fsdp": -1, "model": 4}),
        MeshRule(pattern="tpu-.*", mesh_shape={"fsdp": -1}),
        MeshRule(pattern=".*", mesh_shape={"data": -1}),
    ]
    assert select_mesh_rule("tpu-v5e-256", rules) is rules[0]
    assert select_mesh_rule("tpu-v5p-128", rules) is rules[1]
    assert select_mesh_rule("cpu", rules) is rules[2]


def test_pattern_must_match_the_whole_instance_type():
    rules = [MeshRule(pattern="tpu-v5p", mesh_shape={"fsdp": -1}), MeshRule(pattern="tpu-v5p-.*", mesh_shape={})]
    assert select_mesh_rule("tpu-v5p-64", rules) is rules[1]
    with pytest.raises(MeshRuleError, match="no mesh rule matches instance type 'gpu-h100-8'"):
        select_mesh_rule("gpu-h100-8", rules)


def test_minus_one_is_inferred_from_the_device_count():
    rule = MeshRule(pattern="cpu", mesh_shape={"fsdp": -1, "model": 2})
    shape = dict(zip(MESH_AXES, resolve_mesh_shape(rule, 8)))
    assert shape == {"data": 1, "fsdp": 4, "expert": 1, "seq": 1, "model": 2}
    shape = dict(zip(MESH_AXES, resolve_mesh_shape(MeshRule(mesh_shape={"data": -1, "fsdp": 4}), 64, num_slices=2)))
    assert shape["data"] == 8 and shape["fsdp"] == 4  # Per slice: 32 devices.


def test_shape_that_does_not_divide_the_devices_is_refused_naming_rule_and_counts():
    rule = MeshRule(pattern="cpu", mesh_shape={"fsdp": -1, "model": 3})
    with pytest.raises(MeshRuleError, match=r"'cpu'.*product 3.*8 devices per slice"):
        resolve_mesh_shape(rule, 8)
    fixed = MeshRule(pattern="cpu", mesh_shape={"fsdp": 2, "model": 2})
    with pytest.raises(MeshRuleError, match=r"product 4.*8 devices"):
        resolve_mesh_shape(fixed, 8)


@pytest.mark.parametrize(
    "shape, message",
    [({"fsdp": -1, "model": -1}, "at most one -1"), ({"fsdp": 0}, "sizes > 0"), ({"tensor": 2}, "unknown mesh axes")],
)
def test_malformed_shapes_are_refused(shape, message):
    with pytest.raises(MeshRuleError, match=message):
        resolve_mesh_shape(MeshRule(pattern="x", mesh_shape=shape), 8)


def test_make_mesh_on_simulated_devices():
    mesh = make_mesh(MeshRule(mesh_shape={"fsdp": -1, "model": 2}))
    assert mesh.axis_names == MESH_AXES
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "expert": 1, "seq": 1, "model": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    one = make_mesh(MeshRule(mesh_shape={"fsdp": -1}), devices=jax.devices()[:1])
    assert one.size == 1


def test_instance_type_parsing():
    cpu = instance_type("cpu")
    assert (cpu.platform, cpu.chips_per_host, cpu.hosts_per_slice, cpu.peak_flops_per_chip) == ("cpu", 8, 1, None)
    gpu = instance_type("gpu-h100-8")
    assert (gpu.platform, gpu.chips_per_slice, gpu.accelerator) == ("gpu", 8, "nvidia-h100-80gb")
    assert gpu.peak_flops_per_chip == pytest.approx(989e12)
    v5p = instance_type("tpu-v5p-256")  # v5p counts TensorCores: 256 cores = 128 chips, 4 per host.
    assert (v5p.chips_per_host, v5p.hosts_per_slice, v5p.topology) == (4, 32, "4x4x8")
    v5e = instance_type("tpu-v5e-8")  # v5e counts chips; 8 fit one host.
    assert (v5e.chips_per_host, v5e.hosts_per_slice, v5e.topology) == (8, 1, "2x4")
    v6e = instance_type("tpu-v6e-256")
    assert (v6e.chips_per_host, v6e.hosts_per_slice, v6e.topology) == (4, 64, "16x16")


@pytest.mark.parametrize(
    "name, message",
    [
        ("tpu-v5p-12", "not a v5p slice that exists"),
        ("gpu-h100-4", "8 GPUs"),
        ("tpu-v5p-25x", "did you mean"),
        ("quantum-9000", "unknown instance type"),
    ],
)
def test_bad_instance_types_are_refused(name, message):
    with pytest.raises(MeshRuleError, match=message):
        instance_type(name)


@pytest.mark.parametrize("generation", TPU_GENERATIONS)
def test_every_tpu_instance_type_is_a_consistent_slice(generation):
    names = tpu_instance_types(generation)
    assert len(set(names)) == len(names)
    for name in names:
        tpu = instance_type(name)
        dims = [int(d) for d in tpu.topology.split("x")]
        assert math.prod(dims) == tpu.chips_per_slice == tpu.chips_per_host * tpu.hosts_per_slice, name
        assert len(dims) == (3 if generation in ("v4", "v5p") else 2), name
        assert tpu.cloud_tpu_type == f"{TPU_GENERATIONS[generation].cloud_prefix}-{name.rsplit('-', 1)[1]}"
        assert tpu.hosts_per_slice == 1 or tpu.chips_per_host == 4, name  # multi-host slices: 4-chip hosts
        assert tpu.machine_type.endswith(f"-{tpu.chips_per_host}t"), name


@pytest.mark.parametrize(
    "name",
    ["tpu-v5e-2", "tpu-v6e-2", "tpu-v5p-2", "tpu-v5p-4", "tpu-v4-2", "tpu-v4-4", "tpu-v5e-512", "tpu-v6e-512"],
)
def test_slice_shapes_that_do_not_exist_are_refused(name):
    with pytest.raises(MeshRuleError, match=f"{name!r} is not a .* slice that exists: use one of"):
        instance_type(name)


def test_documented_size_limits():
    """The Cloud TPU docs: v5e and v6e slices of 1 to 256 chips, v4 and v5p slices from 4 chips (8 TensorCores)."""
    for generation, smallest, largest in (("v5e", 1, 256), ("v6e", 1, 256), ("v4", 8, 8192), ("v5p", 8, 8192)):
        sizes = [int(name.rsplit("-", 1)[1]) for name in tpu_instance_types(generation)]
        assert (min(sizes), max(sizes)) == (smallest, largest)


def test_detected_instance_type_on_cpu_selects_the_cpu_rule():
    assert detect_instance_type() == "cpu"
    assert select_mesh_rule("cpu", default_mesh_rules()).pattern == "cpu"
