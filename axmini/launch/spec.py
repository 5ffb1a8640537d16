"""LaunchSpec: what to run where on a cluster, checked before anything is rendered or submitted.

One spec renders to a GKE JobSet, an `xpk` command or a gcloud script (`axmini.launch.render`). `validate` returns
every problem as one line naming the field, the value and the fix; the launcher prints them and exits with code 2.
The experiment decides whether the hardware fits: the mesh rule of its config (with the command's `--set`
overrides) finalized for the instance type, as `axmini train` will finalize it, must cover exactly chips per slice x
slices devices, so a run never starts on hardware its mesh cannot use. An experiment given by file
(`--config=my/exps.py:fn`) must exist here: it travels with the job to `JOB_EXPERIMENT_DIR` (`render` says how).

Each renderer's tool has limits of its own, checked here so that a rendering is never refused after submission:
the JobSet webhook's pod-name length, xpk's 40-character names, its `--tpu-type` / `--device-type` vocabulary and
the characters its manifests can carry.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Literal, get_args

from axmini import experiment_loader
from axmini.config import REQUIRED, ConfigBase, ConfigError, Required, apply_overrides
from axmini.experiment_loader import ExperimentError, ExperimentRef
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
JOB_EXPERIMENT_DIR = "/tmp/axmini/experiment"  # where an experiment file given by path is in the job
MAX_EXPERIMENT_FILE_BYTES = 512 * 1024  # a ConfigMap holds at most 1 MiB; the base64 in a command takes 4/3

_DNS_1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_IMAGE = re.compile(r"[a-z0-9][\w.\-/:@]*")  # registry/path:tag or @sha256:digest, no spaces or shell syntax
_ZONE = re.compile(r"[a-z]+-[a-z]+[0-9]+-[a-z]")
_PROJECT = re.compile(r"[a-z][-a-z0-9]{4,28}[a-z0-9]")
_MAX_NAME = 63  # a DNS label: names of JobSets, jobs, pods, services, queued resources and TPU nodes
# A JobSet's pods are named <name>-<replicated job>-<job index>-<pod index>-<5 random characters>; the JobSet webhook
# refuses a JobSet whose longest pod name would not be a DNS label.
REPLICATED_JOB = "slice"  # the one replicated job of our JobSets
XPK_REPLICATED_JOB = "slice-job"  # the one replicated job of xpk's JobSets
_POD_NAME_SUFFIX = "-abcde"  # the webhook counts the random suffix with this stand-in
XPK_MAX_NAME = 40  # xpk refuses longer --workload and --cluster names
XPK_MISSING_TPU_TYPES = ("v5litepod-1x1", "v5litepod-2x2")  # slices xpk has no --tpu-type for
XPK_GPU_DEVICES = {"nvidia-h100-80gb": "h100-80gb-8", "nvidia-h200-141gb": "h200-141gb-8"}  # xpk --device-type
# xpk writes env values (and a GPU job's command) into double-quoted YAML strings as they are, and the command into
# a YAML block: these characters would end the string or the block.
_XPK_UNQUOTABLE = re.compile(r'["\\\x00-\x08\x0a-\x1f\x7f]')
_XPK_UNBLOCKABLE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


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
    reservation: str = ""  # reservation name, with provisioning="reserved" (optional for gcloud: any matching one)
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


def experiment_ref(spec: LaunchSpec) -> ExperimentRef | None:
    """The experiment the command trains (None when it names none or names it wrongly: `validate` says so)."""
    text = _flag_value(spec.command, *EXPERIMENT_FLAGS)
    try:
        return experiment_loader.parse(text) if text is not None else None
    except ExperimentError:
        return None


def job_experiment_file(local: str) -> str:
    """Where an experiment file given by path is in the job (`render` says how it gets there)."""
    return f"{JOB_EXPERIMENT_DIR}/{os.path.basename(local)}"


def train_command(spec: LaunchSpec) -> list[str]:
    """The command each host runs: the spec's command with `--mesh_selector=<instance type>` added, and an
    experiment file's local path replaced by its path in the job."""
    command = list(spec.command)
    ref = experiment_ref(spec)
    if ref is not None and ref.file is not None:
        in_job = f"{job_experiment_file(ref.file)}:{ref.name}"
        for i, arg in enumerate(command):
            for flag in EXPERIMENT_FLAGS:
                if arg.startswith(flag + "="):
                    command[i] = f"{flag}={in_job}"
                elif arg == flag and i + 1 < len(command):
                    command[i + 1] = in_job
    if _flag_value(spec.command, MESH_SELECTOR_FLAG) is not None:
        return command
    return [*command, f"{MESH_SELECTOR_FLAG}={spec.instance_type}"]


def num_processes(spec: LaunchSpec) -> int:
    """One JAX process per host: hosts per slice x slices."""
    return instance_type(spec.instance_type).hosts_per_slice * spec.num_slices


def jobset_layout(spec: LaunchSpec) -> tuple[int, int]:
    """(jobs, pods per job) of the spec's JobSet. TPU: a job per slice, a pod per host, each slice on a node pool of
    its own. GPU: one job of a pod per host, as xpk and the JobSet docs lay out GPU node pools (a pool per host would
    be needed otherwise)."""
    instance = instance_type(spec.instance_type)
    if instance.platform == "tpu":
        return spec.num_slices, instance.hosts_per_slice
    return 1, spec.num_slices


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


def experiment_mesh_rule(experiment: str, overrides: Sequence[str], instance: str) -> MeshRule:
    """The mesh rule `axmini train` runs the experiment with on `instance`: that of its config with the `--set`
    overrides, finalized for the instance type (the one finalize step the trainer builds from)."""
    from axmini.trainer.finalize import finalize  # Imported here: only checking an experiment needs the trainer.

    return finalize(apply_overrides(experiment_loader.load(experiment), list(overrides)), instance).mesh_rule


def _name_suggestion(value: str, max_len: int) -> str:
    """`value` made a DNS label of at most `max_len` characters."""
    fixed = re.sub(r"[^a-z0-9-]+", "-", value.lower()).strip("-")
    fixed = fixed if fixed[:1].isalpha() else f"x-{fixed}"
    return fixed[:max_len].strip("-")


def _check_name(field: str, value: str, errors: list[str], *, max_len: int = _MAX_NAME, why: str = "") -> None:
    if _DNS_1035.fullmatch(value) and len(value) <= max_len:
        return
    if _DNS_1035.fullmatch(value) and why:
        errors.append(
            f"spec.{field}={value!r} is too long: {why}; use at most {max_len} characters "
            f"(e.g. {_name_suggestion(value, max_len)!r})"
        )
        return
    errors.append(
        f"spec.{field}={value!r} is not a valid name: use at most {max_len} lowercase letters, digits and '-', "
        f"starting with a letter and ending with a letter or digit (e.g. {_name_suggestion(value, max_len)!r})"
    )


def _name_limit(spec: LaunchSpec, renderer: str) -> tuple[int, str]:
    """The longest spec.name that `renderer`'s tool accepts for this spec, and the rule that sets it."""
    if renderer == "gcloud":  # the queued resource, and TPU nodes <name>-<slice> when there are several
        suffix = f"-{spec.num_slices - 1}" if spec.num_slices > 1 else ""
        return _MAX_NAME - len(suffix), f"the TPU node name {spec.name + suffix!r} is over {_MAX_NAME} characters"
    jobs, pods = jobset_layout(spec)  # xpk's JobSets have as many jobs, and pod indices of as many digits
    replicated_job = XPK_REPLICATED_JOB if renderer == "xpk" else REPLICATED_JOB
    suffix = f"-{replicated_job}-{jobs - 1}-{pods - 1}{_POD_NAME_SUFFIX}"
    if renderer == "xpk" and _MAX_NAME - len(suffix) > XPK_MAX_NAME:
        return XPK_MAX_NAME, f"xpk refuses workload names over {XPK_MAX_NAME} characters"
    longest_pod = spec.name + suffix
    return _MAX_NAME - len(
        suffix
    ), f"the JobSet webhook refuses pod names over {_MAX_NAME} characters ({longest_pod!r})"


def xpk_tpu_type(instance: InstanceType) -> str:
    """xpk's name for the slice shape: <Cloud TPU prefix>-<topology> (v5p-4x4x8). Its size-named types are not always
    the documented shape (xpk's v4-8192 is 4x4x256, not 16x16x16)."""
    return f"{instance.cloud_tpu_type.rsplit('-', 1)[0]}-{instance.topology}"


def _check_xpk(spec: LaunchSpec, instance: InstanceType, errors: list[str]) -> None:
    """xpk's own vocabulary, and the characters its manifests can carry."""
    if instance.platform == "tpu" and xpk_tpu_type(instance) in XPK_MISSING_TPU_TYPES:
        errors.append(
            f"spec.instance_type={spec.instance_type!r}: xpk has no --tpu-type for a {instance.topology} slice "
            "(its v5e slices start at 2x4, v5litepod-8); use the jobset or gcloud renderer"
        )
    if instance.platform == "gpu" and instance.accelerator not in XPK_GPU_DEVICES:
        errors.append(
            f"spec.instance_type={spec.instance_type!r}: xpk has no --device-type for {instance.accelerator} "
            "(its A100 type, a100-40gb-8, is the 40 GB one); use the jobset renderer"
        )
    for key, value in spec.env.items():
        if _XPK_UNQUOTABLE.search(value):
            errors.append(
                f"spec.env[{key!r}]={value!r}: xpk writes env values into double-quoted YAML unescaped, so '\"', "
                "'\\' and control characters break its manifest; drop them or use the jobset renderer"
            )
    command = " ".join(spec.command)
    unsafe = (_XPK_UNQUOTABLE if instance.platform == "gpu" else _XPK_UNBLOCKABLE).search(command)
    if unsafe:
        where = "a double-quoted YAML string and a YAML block" if instance.platform == "gpu" else "a YAML block"
        errors.append(
            f"spec.command has {unsafe.group()!r}, which xpk cannot carry: it writes the command into {where} "
            "unescaped; drop it or use the jobset renderer"
        )


def _check_mesh(spec: LaunchSpec, instance: InstanceType, rules: Sequence[MeshRule] | None, errors: list[str]) -> None:
    experiment = _flag_value(spec.command, *EXPERIMENT_FLAGS)
    devices = instance.chips_per_slice * spec.num_slices
    slices = spec.num_slices if instance.platform == "tpu" else 1  # jax sees GPU hosts as one slice
    try:
        if rules is None and experiment:
            rule = experiment_mesh_rule(experiment, _flag_values(spec.command, SET_FLAG), spec.instance_type)
        else:
            rule = select_mesh_rule(spec.instance_type, default_mesh_rules() if rules is None else rules)
        resolve_mesh_shape(rule, devices, slices)
    except MeshRuleError as e:
        source = f"experiment {experiment!r}" if experiment else "the default mesh rules"
        errors.append(
            f"spec.instance_type={spec.instance_type!r} x spec.num_slices={spec.num_slices} "
            f"({instance.chips_per_slice} chips per slice, {devices} in all) does not fit the mesh of {source}: {e}"
        )
    except ConfigError as e:  # an unknown experiment or a bad --set: fail before submitting
        errors.append(f"spec.command (experiment {experiment!r}): {' '.join(str(e).split())}")


def _check_experiment_file(spec: LaunchSpec, errors: list[str]) -> bool:
    """An experiment file travels inside the manifest: it must be there, and small enough for a ConfigMap. Returns
    whether it is (or none travels)."""
    ref = experiment_ref(spec)
    if ref is None or ref.file is None:
        return True
    if not os.path.isfile(ref.file):
        errors.append(f"spec.command: the experiment file {ref.file} does not exist")
    elif os.path.getsize(ref.file) > MAX_EXPERIMENT_FILE_BYTES:
        errors.append(
            f"spec.command: the experiment file {ref.file} has {os.path.getsize(ref.file):,} bytes; one travels with "
            f"the job up to {MAX_EXPERIMENT_FILE_BYTES:,}: install it in the image and give MODULE:FUNCTION"
        )
    else:
        return True
    return False


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

    if instance is not None and spec.num_slices >= 1 and renderer in RENDERERS:
        max_len, why = _name_limit(spec, renderer)
        _check_name("name", spec.name, errors, max_len=max_len, why=why)
    else:
        _check_name("name", spec.name, errors)
    for field in ("cluster", "queue", "reservation"):
        if getattr(spec, field):
            _check_name(field, getattr(spec, field), errors, max_len=XPK_MAX_NAME if field == "cluster" else _MAX_NAME)
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

    experiment_file_ok = _check_experiment_file(spec, errors)
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
        elif spec.num_slices >= 1 and experiment_file_ok:
            _check_mesh(spec, instance, mesh_rules, errors)
        if renderer == "xpk" and instance.platform in ("tpu", "gpu"):
            _check_xpk(spec, instance, errors)
    return errors


def check(spec: LaunchSpec, renderer: str, *, mesh_rules: Sequence[MeshRule] | None = None) -> None:
    """Raises LaunchSpecError listing every problem `validate` finds."""
    errors = validate(spec, renderer, mesh_rules=mesh_rules)
    if errors:
        raise LaunchSpecError(errors)
