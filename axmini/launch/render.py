"""Renders a LaunchSpec into what a TPU/GPU user submits: a GKE JobSet, an `xpk` command or a gcloud script.

Each rendering is the real artifact, printed verbatim by `--dry_run` and submitted as is otherwise. The JobSet runs
the command as an exec list (no shell); the xpk and gcloud renderings pass it through a shell, so every user value
there is quoted with `shlex` (twice where a command travels inside another command's argument). Kubernetes expands
`$(VAR)` in a container's command and env values (`$$` is a `$`), so every user value that reaches a pod spec, ours
or the one xpk writes, has its `$` doubled and arrives verbatim.

An experiment given by file (`--config=my/exps.py:fn`) travels with the job, and each rendering says how in a
comment: in a ConfigMap mounted into the JobSet's pods; written from base64 by the xpk command, and by each TPU VM's
command in the gcloud script (then mounted into its container). One given by module must be installed in the image.
"""

from __future__ import annotations

import base64
import os
import shlex
from typing import Any

import yaml

from axmini.launch import distributed
from axmini.launch.spec import (
    JOB_EXPERIMENT_DIR,
    REPLICATED_JOB,
    XPK_GPU_DEVICES,
    LaunchSpec,
    check,
    experiment_ref,
    job_experiment_file,
    jobset_layout,
    num_processes,
    train_command,
    xpk_tpu_type,
)
from axmini.mesh_rules import InstanceType, instance_type

JOBSET_API_VERSION = "jobset.x-k8s.io/v1alpha2"
# Each TPU slice on a node pool of its own (a multi-slice run needs that; GPU hosts share a pool).
EXCLUSIVE_TOPOLOGY = {"alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"}
# Downward-API path to a pod's completion index within its job: the host of a TPU slice, the process of a GPU job.
_COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
# What xpk's GPU pods define before the env it is given (xpk's get_gpu_env): Kubernetes expands these references.
_XPK_GPU_ENV = {
    distributed.ENV_COORDINATOR: "$(JAX_COORDINATOR_ADDRESS):$(JAX_COORDINATOR_PORT)",
    distributed.ENV_PROCESS_ID: "$(NODE_RANK)",
}
_RUNTIME_VERSIONS = {  # default TPU VM software, per generation
    "v4": "tpu-ubuntu2204-base",
    "v5p": "v2-alpha-tpuv5",
    "v5e": "v2-alpha-tpuv5-lite",
    "v6e": "v2-alpha-tpuv6e",
}


def _experiment_file(spec: LaunchSpec) -> str | None:
    """The local experiment file that travels with the job (None: the experiment is built in or in the image)."""
    ref = experiment_ref(spec)
    return ref.file if ref is not None else None


def _experiment_note(spec: LaunchSpec, how: str) -> str:
    """Comment lines saying how the experiment reaches the job ('' for a built-in one)."""
    ref = experiment_ref(spec)
    if ref is None or ref.is_builtin:
        return ""
    if ref.file is None:
        return f"# The experiment {ref} is imported in the job: the image must have module {ref.module} installed.\n"
    return f"# The experiment file {ref.file} travels with the job: {how} {job_experiment_file(ref.file)}.\n"


def _write_experiment_file(spec: LaunchSpec) -> str:
    """Shell text that writes the experiment file at its path in the job (from base64: no quoting to get wrong)."""
    local = _experiment_file(spec)
    assert local is not None
    with open(local, "rb") as f:
        encoded = base64.b64encode(f.read()).decode()
    mkdir = shlex.join(["mkdir", "-p", JOB_EXPERIMENT_DIR])
    return f"{mkdir} && printf %s {encoded} | base64 -d > {shlex.quote(job_experiment_file(local))}"


def experiment_configmap(spec: LaunchSpec) -> dict[str, Any] | None:
    """The ConfigMap that carries an experiment file into a JobSet's pods (None when no file travels)."""
    local = _experiment_file(spec)
    if local is None:
        return None
    with open(local, encoding="utf-8") as f:
        data = {os.path.basename(local): f.read()}
    metadata = {"name": f"{spec.name}-experiment", "namespace": spec.namespace}
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data}


def kubernetes_literal(text: str) -> str:
    """`text` as a container command or env value that Kubernetes leaves as it is (`$(VAR)` would be expanded)."""
    return text.replace("$", "$$")


def coordinator_address(spec: LaunchSpec) -> str:
    """host:port of process 0: the JobSet's first pod, reached through the JobSet's headless service."""
    return f"{spec.name}-{REPLICATED_JOB}-0-0.{spec.name}:{spec.coordinator_port}"


def _pod_env(spec: LaunchSpec, instance: InstanceType) -> list[dict[str, Any]]:
    if instance.platform == "tpu":  # GKE gives TPU pods their worker/slice ids; jax detects the rest.
        axmini_env = [
            {"name": distributed.ENV_DISTRIBUTED, "value": "auto"},
            {"name": "JAX_COORDINATOR_ADDRESS", "value": coordinator_address(spec)},
        ]
    else:  # one job: the pod's completion index is its process id
        axmini_env = [
            {"name": distributed.ENV_COORDINATOR, "value": coordinator_address(spec)},
            {"name": distributed.ENV_NUM_PROCESSES, "value": str(num_processes(spec))},
            {"name": distributed.ENV_PROCESS_ID, "valueFrom": {"fieldRef": {"fieldPath": _COMPLETION_INDEX}}},
        ]
    user_env = [{"name": key, "value": kubernetes_literal(value)} for key, value in sorted(spec.env.items())]
    return axmini_env + user_env


def jobset(spec: LaunchSpec) -> dict[str, Any]:
    """The JobSet manifest: TPU: `num_slices` replicas of a job whose pods are the hosts of a slice; GPU: one job of
    `num_slices` pods, one per host."""
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
    tolerations = [] if instance.platform == "tpu" else [{"key": "nvidia.com/gpu", "operator": "Exists"}]
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
    container = {
        "name": "train",
        "image": spec.image,
        "command": [kubernetes_literal(arg) for arg in train_command(spec)],
        "env": _pod_env(spec, instance),
        "resources": {"limits": limits},
    }
    configmap = experiment_configmap(spec)
    if configmap is not None:
        pod_spec["volumes"] = [{"name": "experiment", "configMap": {"name": configmap["metadata"]["name"]}}]
        container["volumeMounts"] = [{"name": "experiment", "mountPath": JOB_EXPERIMENT_DIR, "readOnly": True}]
    pod_spec["containers"] = [container]
    metadata: dict[str, Any] = {"name": spec.name, "namespace": spec.namespace}
    if spec.queue:
        metadata["labels"] = {"kueue.x-k8s.io/queue-name": spec.queue}
    if instance.platform == "tpu":
        metadata["annotations"] = dict(EXCLUSIVE_TOPOLOGY)
    jobs, pods = jobset_layout(spec)
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
                    "replicas": jobs,
                    "template": {
                        "spec": {
                            "parallelism": pods,
                            "completions": pods,
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
    """The JobSet as YAML, for `kubectl apply -f -` (after the ConfigMap of an experiment file, if one travels)."""
    documents = [d for d in (experiment_configmap(spec), jobset(spec)) if d is not None]
    text = "---\n".join(yaml.safe_dump(d, sort_keys=False, default_flow_style=False, width=1000) for d in documents)
    configmap = f"in the ConfigMap {spec.name}-experiment, mounted read-only at"
    return _experiment_note(spec, configmap) + text


def xpk_argv(spec: LaunchSpec) -> list[str]:
    """`xpk workload create ...` as an argument list (the container command is one shell string)."""
    check(spec, "xpk")
    instance = instance_type(spec.instance_type)
    argv = ["xpk", "workload", "create", f"--cluster={spec.cluster}", f"--workload={spec.name}"]
    if instance.platform == "tpu":
        argv += [f"--tpu-type={xpk_tpu_type(instance)}", f"--num-slices={spec.num_slices}"]
        env = {distributed.ENV_DISTRIBUTED: "auto"}
    else:
        argv += [f"--device-type={XPK_GPU_DEVICES[instance.accelerator]}", f"--num-nodes={spec.num_slices}"]
        env = {**_XPK_GPU_ENV, distributed.ENV_NUM_PROCESSES: str(num_processes(spec))}
    command = shlex.join(train_command(spec))
    if _experiment_file(spec) is not None:
        command = f"{_write_experiment_file(spec)} && {command}"
    command = kubernetes_literal(command)  # xpk puts it in the pod spec as it is
    argv += [f"--docker-image={spec.image}", f"--command={command}"]
    argv += [f"--priority={spec.priority}", f"--max-restarts={spec.max_restarts}"]
    argv += [f"--project={spec.project}"] if spec.project else []
    argv += [f"--zone={spec.zone}"] if spec.zone else []
    argv += {"spot": ["--spot"], "reserved": [f"--reservation={spec.reservation}"]}.get(spec.provisioning, [])
    env.update((key, kubernetes_literal(value)) for key, value in sorted(spec.env.items()))
    for key, value in env.items():
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
    return _experiment_note(spec, "--command writes it (from base64) to") + _multiline(head, options)


def _host_command(spec: LaunchSpec) -> list[str]:
    """What each TPU VM runs: the train command, in the image if there is one, with the spec's env."""
    env = {
        distributed.ENV_DISTRIBUTED: "auto",
        **dict(sorted(spec.env.items())),
    }  # jax reads slice/worker ids from the VM metadata
    if spec.image:
        docker = ["sudo", "docker", "run", "--rm", "--privileged", "--network=host"]
        if _experiment_file(spec) is not None:
            docker += ["-v", f"{JOB_EXPERIMENT_DIR}:{JOB_EXPERIMENT_DIR}:ro"]
        for key, value in env.items():
            docker += ["-e", f"{key}={value}"]
        return [*docker, spec.image, *train_command(spec)]
    return ["env", *(f"{key}={value}" for key, value in env.items()), *train_command(spec)]


def _host_script(spec: LaunchSpec) -> str:
    """Shell text each TPU VM runs; with an image on a Google registry, docker is first given credentials."""
    run = shlex.join(_host_command(spec))
    if _experiment_file(spec) is not None:
        run = f"{_write_experiment_file(spec)} && {run}"
    registry = spec.image.split("/")[0]
    if spec.image and registry.endswith(("pkg.dev", "gcr.io")):
        return f"{shlex.join(['sudo', 'gcloud', 'auth', 'configure-docker', registry, '--quiet'])} && {run}"
    return run


def gcloud_script(spec: LaunchSpec) -> str:
    """A bash script: queue the TPU slices, wait until they are ACTIVE, run the command on every worker."""
    check(spec, "gcloud")
    instance = instance_type(spec.instance_type)
    runtime = spec.runtime_version or _RUNTIME_VERSIONS[spec.instance_type.split("-")[1]]
    where = [f"--zone={spec.zone}"] + ([f"--project={spec.project}"] if spec.project else [])
    nodes = [spec.name] if spec.num_slices == 1 else [f"{spec.name}-{i}" for i in range(spec.num_slices)]
    # A named reservation is taken only by the alpha track's --reservation; --reserved takes any matching one.
    track = ["alpha"] if spec.reservation else []
    create = ["gcloud", *track, "compute", "tpus", "queued-resources", "create", spec.name, *where]
    create += [f"--accelerator-type={instance.cloud_tpu_type}", f"--runtime-version={runtime}"]
    if spec.num_slices == 1:
        create.append(f"--node-id={spec.name}")
    else:
        create += [f"--node-count={spec.num_slices}", f"--node-prefix={spec.name}"]
    reserved = [f"--reservation={spec.reservation}"] if spec.reservation else ["--reserved"]
    create += {"spot": ["--spot"], "reserved": reserved}.get(spec.provisioning, [])
    describe = ["gcloud", "compute", "tpus", "queued-resources", "describe", spec.name, *where]
    describe.append("--format=value(state.state)")
    remote = _host_script(spec)
    ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", '"$node"', *where, "--worker=all", f"--command={remote}"]
    ssh_text = " ".join(arg if arg == '"$node"' else shlex.quote(arg) for arg in ssh)
    return "\n".join(
        [
            "#!/usr/bin/env bash",
            f"# {spec.name}: {spec.num_slices} x {spec.instance_type} (per slice: {instance.hosts_per_slice} x "
            f"{instance.chips_per_host}-chip hosts) on Cloud TPU queued resources.",
            *_experiment_note(spec, "each host's command writes it (from base64) to").splitlines(),
            "set -euo pipefail",
            "",
            _multiline(create[: 6 + len(track)], [[arg] for arg in create[6 + len(track) :]]),
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
