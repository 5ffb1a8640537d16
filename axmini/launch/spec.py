"""LaunchSpec: what to run where on a cluster, checked before anything is rendered or submitted.

One spec renders to a GKE JobSet, an `xpk` command or a gcloud script (`axmini.launch.render`). `validate` returns
every problem as one line naming the field, the value and the fix; the launcher prints them and exits with code 2.
The experiment's own mesh rules decide whether the hardware fits: the mesh they select for the instance type must
cover exactly chips per slice x slices devices, so a run never starts on hardware its mesh cannot use.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal, get_args

from axmini.config import REQUIRED, ConfigBase, ConfigError, Required, apply_overrides
from axmini.mesh_rules import (
    InstanceType,
    MeshRule,
    MeshRuleError,
    default_mesh_rules,
    instance_type,
    resolve_mesh_shape,
    select_mesh_rule,
)

RENDERERS: tuple[str, ...] = ("jobset", "xpk", "gcloud")
Priority = Literal["very-low", "low", "medium", "high", "very-high"]  # the priority classes xpk creates
Provisioning = Literal["on-demand", "spot", "reserved"]
PRIORITIES: tuple[str, ...] = get_args(Priority)
PROVISIONINGS: tuple[str, ...] = get_args(Provisioning)
TRAIN_PREFIX: tuple[str, ...] = ("axmini", "train")
MESH_SELECTOR_FLAG = "--mesh_selector"
EXPERIMENT_FLAGS: tuple[str, ...] = ("--config", "--experiment")  # `axmini train` spells it either way
SET_FLAG = "--set"
JAX_COORDINATOR_PORT = 8476  # jax.distributed's default coordinator port on Cloud TPU

_DNS_1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_IMAGE = re.compile(r"[a-z0-9][\w.\-/:@]*")  # registry/path:tag or @sha256:digest, no spaces or shell syntax
_ZONE = re.compile(r"[a-z]+-[a-z]+[0-9]+-[a-z]")
_PROJECT = re.compile(r"[a-z][-a-z0-9]{4,28}[a-z0-9]")
_MAX_POD_HOSTNAME = 63  # a JobSet pod's hostname `<name>-slice-<slice>-<host>` is a DNS label


class LaunchSpec(ConfigBase):
    """A training job on `num_slices` slices (TPU) or hosts (GPU) of `instance_type`."""

    name: Required[str] = REQUIRED  # JobSet / xpk workload / queued resource name (DNS-1035)
    instance_type: Required[str] = REQUIRED  # e.g. tpu-v5p-256, tpu-v6e-8, gpu-h100-8
    num_slices: int = 1  # TPU slices joined over DCN, or GPU hosts
    image: str = ""  # container image with axmini installed (JobSet, xpk; optional for gcloud)
    command: Required[list[str]] = REQUIRED  # ["axmini", "train", ...]; --mesh_selector is added
    env: dict[str, str] = {}
    priority: Priority = "medium"
    queue: str = ""  # Kueue LocalQueue (JobSet label kueue.x-k8s.io/queue-name)
    max_restarts: int = 0  # restarts of the whole job after a failure
    provisioning: Provisioning = "on-demand"
    reservation: str = ""  # reservation name, with provisioning="reserved" (JobSet, xpk)
    project: str = ""  # GCP project (xpk, gcloud; default: gcloud's configured project)
    zone: str = ""  # GCP zone (required by gcloud)
    cluster: str = ""  # GKE cluster (required by xpk)
    namespace: str = "default"  # Kubernetes namespace of the JobSet
    runtime_version: str = ""  # TPU VM software version (gcloud); default per TPU generation
    coordinator_port: int = JAX_COORDINATOR_PORT


class LaunchSpecError(ValueError):
    """A spec that cannot be launched; `errors` holds one line per problem."""

    def __init__(self, errors: Sequence[str]):
        super().__init__("\n".join(errors))
        self.errors = list(errors)


def train_command(spec: LaunchSpec) -> list[str]:
    """The command each host runs: the spec's command with `--mesh_selector=<instance type>` added."""
    if _flag_value(spec.command, MESH_SELECTOR_FLAG) is not None:
        return list(spec.command)
    return [*spec.command, f"{MESH_SELECTOR_FLAG}={spec.instance_type}"]


def num_processes(spec: LaunchSpec) -> int:
    """One JAX process per host: hosts per slice x slices."""
    return instance_type(spec.instance_type).hosts_per_slice * spec.num_slices


def _flag_values(args: Sequence[str], *flags: str) -> list[str]:
    """The values of `--flag=value` and `--flag value` in `args`, in order, for any of `flags`."""
    values = []
    for i, arg in enumerate(args):
        for flag in flags:
            if arg.startswith(flag + "="):
                values.append(arg[len(flag) + 1 :])
            elif arg == flag and i + 1 < len(args):
                values.append(args[i + 1])
    return values


def _flag_value(args: Sequence[str], *flags: str) -> str | None:
    """The last value given to any of `flags` (as argparse keeps it), else None."""
    values = _flag_values(args, *flags)
    return values[-1] if values else None


def experiment_mesh_rules(experiment: str, overrides: Sequence[str] = ()) -> list[MeshRule]:
    """The mesh rules of the named experiment's config with `--set` overrides applied (default rules if none)."""
    import experiments  # Imported here: loading every experiment is only needed to check a named one.

    rules = getattr(apply_overrides(experiments.get(experiment), list(overrides)), "mesh_rules", None)
    return list(rules) if rules else default_mesh_rules()


def _check_name(field: str, value: str, errors: list[str], *, max_len: int = 63) -> None:
    if not _DNS_1035.fullmatch(value) or len(value) > max_len:
        fixed = re.sub(r"[^a-z0-9-]+", "-", value.lower()).strip("-")[:max_len].strip("-")
        fixed = fixed if fixed[:1].isalpha() else f"x-{fixed}".strip("-")
        errors.append(
            f"spec.{field}={value!r} is not a valid name: use at most {max_len} lowercase letters, digits and '-', "
            f"starting with a letter and ending with a letter or digit (e.g. {fixed!r})"
        )


def _check_mesh(spec: LaunchSpec, instance: InstanceType, rules: Sequence[MeshRule] | None, errors: list[str]) -> None:
    experiment = _flag_value(spec.command, *EXPERIMENT_FLAGS)
    if rules is None:
        try:
            overrides = _flag_values(spec.command, SET_FLAG)
            rules = experiment_mesh_rules(experiment, overrides) if experiment else default_mesh_rules()
        except (KeyError, ValueError, ConfigError) as e:  # an unknown experiment or a bad --set: fail before submitting
            errors.append(f"spec.command (experiment {experiment!r}): {' '.join(str(e).split())}")
            return
    devices = instance.chips_per_slice * spec.num_slices
    try:
        rule = select_mesh_rule(spec.instance_type, rules)
        resolve_mesh_shape(rule, devices, spec.num_slices)
    except MeshRuleError as e:
        source = f"experiment {experiment!r}" if experiment else "the default mesh rules"
        errors.append(
            f"spec.instance_type={spec.instance_type!r} x spec.num_slices={spec.num_slices} "
            f"({instance.chips_per_slice} chips per slice, {devices} in all) does not fit the mesh of {source}: {e}"
        )


def validate(spec: LaunchSpec, renderer: str, *, mesh_rules: Sequence[MeshRule] | None = None) -> list[str]:
    """Every problem with launching `spec` through `renderer`, one line each (empty: ready to render).

    `mesh_rules` defaults to those of the experiment named by `--config` in the command, with its `--set` overrides
    (or the default rules when the command names no experiment).
    """
    errors: list[str] = []
    missing = [name for name, value in spec.items() if value is REQUIRED]
    for name in missing:
        errors.append(f"spec.{name} is required")
    if missing:
        return errors
    if renderer not in RENDERERS:
        errors.append(f"renderer={renderer!r} is unknown: use one of {', '.join(RENDERERS)}")
    try:
        instance = instance_type(spec.instance_type)
    except MeshRuleError as e:
        errors.append(f"spec.instance_type: {e}")
        instance = None
    if spec.num_slices < 1:
        errors.append(f"spec.num_slices={spec.num_slices} must be >= 1")
    if spec.max_restarts < 0:
        errors.append(f"spec.max_restarts={spec.max_restarts} must be >= 0")
    if not 0 < spec.coordinator_port < 65536:
        errors.append(f"spec.coordinator_port={spec.coordinator_port} must be a TCP port (1..65535)")

    _check_name("name", spec.name, errors)
    if instance is not None and spec.num_slices >= 1 and _DNS_1035.fullmatch(spec.name):
        longest = f"{spec.name}-slice-{spec.num_slices - 1}-{instance.hosts_per_slice - 1}"
        if len(longest) > _MAX_POD_HOSTNAME:
            keep = len(spec.name) - (len(longest) - _MAX_POD_HOSTNAME)
            errors.append(
                f"spec.name={spec.name!r} is too long: pod hostname {longest!r} exceeds {_MAX_POD_HOSTNAME} "
                f"characters; shorten the name to at most {keep} characters"
            )
    for field in ("cluster", "queue", "reservation"):
        if getattr(spec, field):
            _check_name(field, getattr(spec, field), errors, max_len=40 if field == "cluster" else 63)
    _check_name("namespace", spec.namespace, errors)
    if spec.project and not _PROJECT.fullmatch(spec.project):
        errors.append(f"spec.project={spec.project!r} is not a GCP project id (6-30 of a-z, 0-9, '-')")
    if spec.zone and not _ZONE.fullmatch(spec.zone):
        errors.append(f"spec.zone={spec.zone!r} is not a GCP zone (e.g. 'us-east5-a')")
    if spec.image and not _IMAGE.fullmatch(spec.image):
        errors.append(
            f"spec.image={spec.image!r} is not a container image reference (e.g. 'us-docker.pkg.dev/p/r/img:tag')"
        )
    for key in spec.env:
        if not _ENV_NAME.fullmatch(key):
            errors.append(f"spec.env key {key!r} is not an environment variable name (letters, digits, '_')")

    if tuple(spec.command[:2]) != TRAIN_PREFIX:
        errors.append(f"spec.command={spec.command!r} must start with {' '.join(TRAIN_PREFIX)!r}")
    selector = _flag_value(spec.command, MESH_SELECTOR_FLAG)
    if selector is not None and selector != spec.instance_type:
        errors.append(
            f"spec.command has {MESH_SELECTOR_FLAG}={selector!r} but spec.instance_type={spec.instance_type!r}; "
            f"drop the flag (it is added from the instance type)"
        )

    if spec.provisioning == "reserved" and not spec.reservation and renderer in ("jobset", "xpk"):
        errors.append("spec.provisioning='reserved' needs spec.reservation (the reservation name)")
    if spec.provisioning != "reserved" and spec.reservation:
        errors.append(f"spec.reservation={spec.reservation!r} is only used with provisioning='reserved'")
    if renderer in ("jobset", "xpk") and not spec.image:
        errors.append(f"spec.image is required by the {renderer} renderer (the container image to run)")
    if renderer == "xpk" and not spec.cluster:
        errors.append("spec.cluster is required by the xpk renderer (the GKE cluster to run on)")
    if renderer == "gcloud" and not spec.zone:
        errors.append("spec.zone is required by the gcloud renderer (the zone of the TPU VMs)")

    if instance is not None:
        if instance.platform not in ("tpu", "gpu"):
            errors.append(
                f"spec.instance_type={spec.instance_type!r}: launch needs a TPU or GPU type (cpu: `launch local`)"
            )
        elif renderer == "gcloud" and instance.platform != "tpu":
            errors.append(f"renderer='gcloud' creates TPU VMs; for {spec.instance_type!r} use jobset or xpk")
        elif spec.num_slices >= 1:
            _check_mesh(spec, instance, mesh_rules, errors)
    return errors


def check(spec: LaunchSpec, renderer: str, *, mesh_rules: Sequence[MeshRule] | None = None) -> None:
    """Raises LaunchSpecError listing every problem `validate` finds."""
    errors = validate(spec, renderer, mesh_rules=mesh_rules)
    if errors:
        raise LaunchSpecError(errors)
