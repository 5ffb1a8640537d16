"""Renders a LaunchSpec into what a TPU/GPU user submits: a GKE JobSet, an `xpk` command or a gcloud script.

Each rendering is the real artifact, printed verbatim by `--dry_run` and submitted as is otherwise. The JobSet runs
the command as an exec list (no shell); the xpk and gcloud renderings pass it through a shell, so every user value
there is quoted with `shlex` (twice where a command travels inside another command's argument).
"""

from __future__ import annotations

import shlex
from typing import Any

import yaml

from axmini.launch import distributed
from axmini.launch.spec import LaunchSpec, check, num_processes, train_command
from axmini.mesh_rules import InstanceType, instance_type

JOBSET_API_VERSION = "jobset.x-k8s.io/v1alpha2"
REPLICATED_JOB = "slice"
EXCLUSIVE_TOPOLOGY = {"alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"}
# Downward-API paths to a JobSet pod's slice (child job index) and host (completion index within its job).
_JOB_INDEX = "metadata.annotations['jobset.sigs.k8s.io/job-index']"
_COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
# Cloud TPU accelerator-type prefix and default TPU VM software, per generation.
_CLOUD_TPU = {
    "v4": ("v4", "tpu-ubuntu2204-base"),
    "v5p": ("v5p", "v2-alpha-tpuv5"),
    "v5e": ("v5litepod", "v2-alpha-tpuv5-lite"),
    "v6e": ("v6e", "v2-alpha-tpuv6e"),
}


def cloud_tpu_type(instance: str) -> str:
    """The Cloud TPU accelerator type (gcloud, xpk) of a TPU instance type: tpu-v5e-256 -> v5litepod-256."""
    _, generation, size = instance.split("-")
    return f"{_CLOUD_TPU[generation][0]}-{size}"


def coordinator_address(spec: LaunchSpec) -> str:
    """host:port of process 0: the JobSet's first pod, reached through the JobSet's headless service."""
    return f"{spec.name}-{REPLICATED_JOB}-0-0.{spec.name}:{spec.coordinator_port}"


def _pod_env(spec: LaunchSpec, instance: InstanceType) -> list[dict[str, Any]]:
    if instance.platform == "tpu":  # GKE gives TPU pods their worker/slice ids; jax detects the rest.
        axmini_env = [
            {"name": distributed.ENV_DISTRIBUTED, "value": "auto"},
            {"name": "JAX_COORDINATOR_ADDRESS", "value": coordinator_address(spec)},
        ]
    else:
        axmini_env = [
            {"name": distributed.ENV_COORDINATOR, "value": coordinator_address(spec)},
            {"name": distributed.ENV_NUM_PROCESSES, "value": str(num_processes(spec))},
            {"name": distributed.ENV_NUM_SLICES, "value": str(spec.num_slices)},
            {"name": distributed.ENV_SLICE_ID, "valueFrom": {"fieldRef": {"fieldPath": _JOB_INDEX}}},
            {"name": distributed.ENV_HOST_ID, "valueFrom": {"fieldRef": {"fieldPath": _COMPLETION_INDEX}}},
        ]
    return axmini_env + [{"name": key, "value": value} for key, value in sorted(spec.env.items())]


def jobset(spec: LaunchSpec) -> dict[str, Any]:
    """The JobSet manifest: `num_slices` replicas of one job whose pods are the hosts of a slice."""
    check(spec, "jobset")
    instance = instance_type(spec.instance_type)
    if instance.platform == "tpu":
        node_selector = {
            "cloud.google.com/gke-tpu-accelerator": instance.accelerator,
            "cloud.google.com/gke-tpu-topology": instance.topology,
        }
        limits = {"google.com/tpu": instance.chips_per_host}
    else:
        node_selector = {"cloud.google.com/gke-accelerator": instance.accelerator}
        limits = {"nvidia.com/gpu": instance.chips_per_host}
    tolerations = []
    if spec.provisioning == "spot":
        node_selector["cloud.google.com/gke-spot"] = "true"
        tolerations.append(
            {"key": "cloud.google.com/gke-spot", "operator": "Equal", "value": "true", "effect": "NoSchedule"}
        )
    elif spec.provisioning == "reserved":
        node_selector["cloud.google.com/reservation-name"] = spec.reservation
        node_selector["cloud.google.com/reservation-affinity"] = "specific"
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "priorityClassName": spec.priority,
        "nodeSelector": node_selector,
    }
    if tolerations:
        pod_spec["tolerations"] = tolerations
    if instance.platform == "tpu":  # DCN traffic between slices goes over the host network.
        pod_spec.update(hostNetwork=True, dnsPolicy="ClusterFirstWithHostNet")
    pod_spec["containers"] = [
        {
            "name": "train",
            "image": spec.image,
            "command": train_command(spec),
            "env": _pod_env(spec, instance),
            "resources": {"limits": limits},
        }
    ]
    metadata: dict[str, Any] = {"name": spec.name, "namespace": spec.namespace}
    if spec.queue:
        metadata["labels"] = {"kueue.x-k8s.io/queue-name": spec.queue}
    metadata["annotations"] = dict(EXCLUSIVE_TOPOLOGY)
    hosts = instance.hosts_per_slice
    return {
        "apiVersion": JOBSET_API_VERSION,
        "kind": "JobSet",
        "metadata": metadata,
        "spec": {
            "failurePolicy": {"maxRestarts": spec.max_restarts},
            "network": {"enableDNSHostnames": True},
            "replicatedJobs": [
                {
                    "name": REPLICATED_JOB,
                    "replicas": spec.num_slices,
                    "template": {
                        "spec": {
                            "parallelism": hosts,
                            "completions": hosts,
                            "completionMode": "Indexed",
                            "backoffLimit": 0,  # any failed pod fails the slice; the JobSet restarts everything
                            "template": {"spec": pod_spec},
                        }
                    },
                }
            ],
        },
    }


def jobset_yaml(spec: LaunchSpec) -> str:
    """The JobSet as YAML, for `kubectl apply -f -`."""
    return yaml.safe_dump(jobset(spec), sort_keys=False, default_flow_style=False, width=1000)


def xpk_argv(spec: LaunchSpec) -> list[str]:
    """`xpk workload create ...` as an argument list (the container command is one shell string)."""
    check(spec, "xpk")
    instance = instance_type(spec.instance_type)
    argv = ["xpk", "workload", "create", f"--cluster={spec.cluster}", f"--workload={spec.name}"]
    if instance.platform == "tpu":
        argv += [f"--tpu-type={cloud_tpu_type(spec.instance_type)}", f"--num-slices={spec.num_slices}"]
    else:  # xpk names GPU hosts by their accelerator: nvidia-h100-80gb -> h100-80gb-8.
        device = f"{instance.accelerator.removeprefix('nvidia-')}-{instance.chips_per_host}"
        argv += [f"--device-type={device}", f"--num-nodes={spec.num_slices}"]
    argv += [f"--docker-image={spec.image}", f"--command={shlex.join(train_command(spec))}"]
    argv += [f"--priority={spec.priority}", f"--max-restarts={spec.max_restarts}"]
    argv += [f"--project={spec.project}"] if spec.project else []
    argv += [f"--zone={spec.zone}"] if spec.zone else []
    argv += {"spot": ["--spot"], "reserved": [f"--reservation={spec.reservation}"]}.get(spec.provisioning, [])
    env = {distributed.ENV_DISTRIBUTED: "auto"} if instance.platform == "tpu" else {}
    for key, value in {**env, **dict(sorted(spec.env.items()))}.items():
        argv += ["--env", f"{key}={value}"]
    return argv


def _multiline(head: list[str], options: list[list[str]]) -> str:
    """Shell text of `head` followed by one option group per line (continued with backslashes), all quoted."""
    return " \\\n  ".join(shlex.join(part) for part in [head, *options])


def xpk_command(spec: LaunchSpec) -> str:
    """The xpk command line as shell text."""
    argv = xpk_argv(spec)
    head, options = argv[:3], []
    for arg in argv[3:]:  # `--env` and its KEY=VALUE on one line
        if options and options[-1] == ["--env"]:
            options[-1].append(arg)
        else:
            options.append([arg])
    return _multiline(head, options)


def _host_command(spec: LaunchSpec) -> list[str]:
    """What each TPU VM runs: the train command, in the image if there is one, with the spec's env."""
    env = {
        distributed.ENV_DISTRIBUTED: "auto",
        **dict(sorted(spec.env.items())),
    }  # jax reads slice/worker ids from the VM metadata
    if spec.image:
        docker = ["sudo", "docker", "run", "--rm", "--privileged", "--network=host"]
        for key, value in env.items():
            docker += ["-e", f"{key}={value}"]
        return [*docker, spec.image, *train_command(spec)]
    return ["env", *(f"{key}={value}" for key, value in env.items()), *train_command(spec)]


def _host_script(spec: LaunchSpec) -> str:
    """Shell text each TPU VM runs; with an image on a Google registry, docker is first given credentials."""
    run = shlex.join(_host_command(spec))
    registry = spec.image.split("/")[0]
    if spec.image and registry.endswith(("pkg.dev", "gcr.io")):
        return f"{shlex.join(['sudo', 'gcloud', 'auth', 'configure-docker', registry, '--quiet'])} && {run}"
    return run


def gcloud_script(spec: LaunchSpec) -> str:
    """A bash script: queue the TPU slices, wait until they are ACTIVE, run the command on every worker."""
    check(spec, "gcloud")
    generation = spec.instance_type.split("-")[1]
    runtime = spec.runtime_version or _CLOUD_TPU[generation][1]
    where = [f"--zone={spec.zone}"] + ([f"--project={spec.project}"] if spec.project else [])
    nodes = [spec.name] if spec.num_slices == 1 else [f"{spec.name}-{i}" for i in range(spec.num_slices)]
    create = ["gcloud", "compute", "tpus", "queued-resources", "create", spec.name, *where]
    create += [f"--accelerator-type={cloud_tpu_type(spec.instance_type)}", f"--runtime-version={runtime}"]
    if spec.num_slices == 1:
        create.append(f"--node-id={spec.name}")
    else:
        create += [f"--node-count={spec.num_slices}", f"--node-prefix={spec.name}"]
    create += {"spot": ["--spot"], "reserved": ["--reserved"]}.get(spec.provisioning, [])
    describe = ["gcloud", "compute", "tpus", "queued-resources", "describe", spec.name, *where]
    describe.append("--format=value(state.state)")
    remote = _host_script(spec)
    ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", '"$node"', *where, "--worker=all", f"--command={remote}"]
    ssh_text = " ".join(arg if arg == '"$node"' else shlex.quote(arg) for arg in ssh)
    instance = instance_type(spec.instance_type)
    return "\n".join(
        [
            "#!/usr/bin/env bash",
            f"# {spec.name}: {spec.num_slices} x {spec.instance_type} (per slice: {instance.hosts_per_slice} x "
            f"{instance.chips_per_host}-chip hosts) on Cloud TPU queued resources.",
            "set -euo pipefail",
            "",
            _multiline(create[:6], [[arg] for arg in create[6:]]),
            "",
            "while true; do",
            f"  state=$({shlex.join(describe)})",
            '  case "$state" in',
            "    ACTIVE) break ;;",
            f'    FAILED|SUSPENDED) echo "queued resource {spec.name} is $state" >&2; exit 1 ;;',
            "  esac",
            '  echo "waiting for queued resource ' + spec.name + ' (state: ${state:-unknown})"',
            "  sleep 30",
            "done",
            "",
            "pids=()",
            f"for node in {' '.join(shlex.quote(n) for n in nodes)}; do",
            f"  {ssh_text} &",
            "  pids+=($!)",
            "done",
            'for pid in "${pids[@]}"; do wait "$pid"; done',
            "",
        ]
    )


def render(spec: LaunchSpec, renderer: str) -> str:
    """The text `renderer` (jobset, xpk or gcloud) would submit for `spec`."""
    renderings = {"jobset": jobset_yaml, "xpk": xpk_command, "gcloud": gcloud_script}
    if renderer not in renderings:
        raise ValueError(f"renderer={renderer!r} is unknown: use one of {', '.join(renderings)}")
    return renderings[renderer](spec)
