"""The launch renderings checked against the real tools' own schemas and code, without a cluster.

- JobSets: the `jobset.x-k8s.io/v1alpha2` and Kubernetes API models of the `kubeflow-trainer-api` package (pydantic
  models generated from the JobSet and Kubernetes OpenAPI specs, the sources the JobSet CRD's schema is generated
  from too). A manifest fits when the models parse it (types, required fields) and give it back unchanged: a field
  the models do not know is dropped by that round trip, so unknown fields are rejected at any depth. The JobSet
  webhook's pod-name rule is ported from its Go source (`pkg/webhooks/jobset_webhook.go`).
- xpk: xpk 1.16's own argument parser, `--tpu-type` / `--device-type` vocabulary and container writer, run from its
  PyPI wheel by tests/xpk_probe.py (the wheel is fetched with pip on first use and kept in pytest's cache).
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pydantic
import pytest
import yaml
from kubeflow_trainer_api.models.io_k8s_api_core_v1_config_map import IoK8sApiCoreV1ConfigMap
from kubeflow_trainer_api.models.jobset_v1alpha2_job_set import JobsetV1alpha2JobSet
from test_launch_render import CASES, GOLDEN, NASTY, _spec, kubernetes_expand

from axmini.launch.render import experiment_configmap, jobset, xpk_argv
from axmini.launch.spec import train_command, validate, xpk_tpu_type
from axmini.mesh_rules import TPU_GENERATIONS, instance_type, tpu_instance_types

XPK_VERSION = "1.16.0"
XPK_WHEEL = f"xpk-{XPK_VERSION}-py3-none-any.whl"
XPK_SHA256 = "28aaa77721007885e51f4fcb10a52d917c81716f41e8d58d925a0847a0b9a386"
INSTANCE_TYPES = [
    *(name for g in TPU_GENERATIONS for name in tpu_instance_types(g)),
    "gpu-h100-8",
    "gpu-h200-8",
    "gpu-a100-8",
]
GOLDEN_JOBSETS = sorted(GOLDEN.glob("*.jobset.yaml"))
GOLDEN_XPK = sorted(GOLDEN.glob("*.xpk.sh"))
# Stand-ins for the downward-API fields a pod's env reads.
FIELDS = {
    "metadata.annotations['jobset.sigs.k8s.io/jobset-name']": "llm-run",
    "metadata.annotations['jobset.sigs.k8s.io/replicatedjob-name']": "slice-job",
    "metadata.annotations['batch.kubernetes.io/job-completion-index']": "1",
}


# ----------------------------------------------------------------------------------------------------
# JobSets against the API models and the webhook's name rule.


def _first_difference(sent: Any, kept: Any, path: str = "") -> str | None:
    """Where the models' round trip changed `sent`: a dropped key is unknown to them, an added one a required field
    they filled in."""
    if isinstance(sent, dict) and isinstance(kept, dict):
        for key in sorted(sent.keys() | kept.keys()):
            if key not in kept:
                return f"{path}.{key} is not a field of the API"
            if key not in sent:
                return f"{path}.{key} is required"
            difference = _first_difference(sent[key], kept[key], f"{path}.{key}")
            if difference:
                return difference
        return None
    if isinstance(sent, list) and isinstance(kept, list) and len(sent) == len(kept):
        return next(
            (d for i, (a, b) in enumerate(zip(sent, kept)) if (d := _first_difference(a, b, f"{path}[{i}]"))), None
        )
    return None if sent == kept else f"{path}: {sent!r} comes back as {kept!r}"


def jobset_api_violation(manifest: dict[str, Any]) -> str | None:
    """Why `manifest` is not a valid JobSet of the API models (None when it is)."""
    if (manifest.get("apiVersion"), manifest.get("kind")) != ("jobset.x-k8s.io/v1alpha2", "JobSet"):
        return f"not a jobset.x-k8s.io/v1alpha2 JobSet: {manifest.get('apiVersion')} {manifest.get('kind')}"
    try:
        kept = JobsetV1alpha2JobSet.from_dict(manifest).to_dict()
    except pydantic.ValidationError as e:
        return " ".join(str(e).split())
    return _first_difference(manifest, kept)


def webhook_name_errors(manifest: dict[str, Any]) -> list[str]:
    """The JobSet webhook's name checks: each replicated job's longest job name and, for indexed jobs, its longest
    pod name with the 5-character random suffix counted, must be DNS-1035 labels (at most 63 characters)."""
    name, errors = manifest["metadata"]["name"], []
    for rjob in manifest["spec"]["replicatedJobs"]:
        job = rjob["template"]["spec"]
        longest_job = f"{name}-{rjob['name']}-{rjob['replicas'] - 1}"
        names = [longest_job]
        if job.get("completionMode") == "Indexed" and "completions" in job:
            names.append(f"{longest_job}-{job['completions'] - 1}-abcde")
        errors += [f"{n!r} has {len(n)} characters" for n in names if len(n) > 63]
    return errors


def test_the_api_model_check_rejects_unknown_fields_and_wrong_types() -> None:
    manifest = jobset(_spec())
    assert jobset_api_violation(manifest) is None
    manifest["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"][0]["bogus"] = 1
    assert "containers[0].bogus is not a field" in jobset_api_violation(manifest)
    manifest = jobset(_spec())
    manifest["spec"]["replicatedJobs"][0]["replicas"] = "2"
    assert "replicas" in jobset_api_violation(manifest)
    manifest = jobset(_spec())
    del manifest["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"][0]["name"]
    assert "containers[0].name is required" in jobset_api_violation(manifest)


def test_every_golden_jobset_fits_the_api_models_and_the_webhook() -> None:
    assert len(GOLDEN_JOBSETS) == len(CASES)
    for path in GOLDEN_JOBSETS:
        manifest = yaml.safe_load(path.read_text())
        assert jobset_api_violation(manifest) is None, path.name
        assert webhook_name_errors(manifest) == [], path.name


def _longest_accepted_name(renderer: str, **fields: Any) -> str:
    return next(
        n for n in ("a" * length for length in range(63, 0, -1)) if not validate(_spec(name=n, **fields), renderer)
    )


@pytest.mark.parametrize("num_slices", [1, 2, 11])
def test_jobsets_of_every_instance_type_fit_and_the_name_limit_is_the_webhooks(num_slices: int) -> None:
    for name in INSTANCE_TYPES:
        longest = _longest_accepted_name("jobset", instance_type=name, num_slices=num_slices)
        manifest = jobset(_spec(name=longest, instance_type=name, num_slices=num_slices))
        assert jobset_api_violation(manifest) is None, name
        assert webhook_name_errors(manifest) == [], name
        if len(longest) < 63:  # one more character is what the webhook would refuse
            manifest["metadata"]["name"] = longest + "a"
            assert webhook_name_errors(manifest), name


def test_jobset_command_and_env_reach_the_container_verbatim_through_kubernetes() -> None:
    spec = _spec(**CASES["tpu_v4_16_dollars"])
    (container,) = jobset(spec)["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"]
    env = {"HOME": "/root", "RUN_ID": "7"}
    for var in container["env"]:  # Kubernetes expands each value with the variables before it
        if "value" in var:
            env[var["name"]] = kubernetes_expand(var["value"], env)
    assert env["NOTE"] == spec.env["NOTE"]
    assert [kubernetes_expand(arg, env) for arg in container["command"]] == train_command(spec)


# ----------------------------------------------------------------------------------------------------
# xpk commands against xpk's own parser, vocabulary and container writer.


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def xpk_wheel(request: pytest.FixtureRequest) -> Path:
    """xpk's wheel, without its dependencies (fetched with pip, hash-checked, kept in pytest's cache)."""
    cache = request.config.cache.mkdir(f"xpk-{XPK_VERSION}")
    wheel = cache / XPK_WHEEL
    if not wheel.exists() or _sha256(wheel) != XPK_SHA256:
        with tempfile.TemporaryDirectory(dir=cache) as tmp:  # then renamed: xdist workers may race here
            requirement = Path(tmp) / "requirements.txt"
            requirement.write_text(f"xpk=={XPK_VERSION} --hash=sha256:{XPK_SHA256}\n")
            pip = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--require-hashes", "-d", tmp]
            subprocess.run([*pip, "-r", str(requirement)], check=True)
            os.replace(Path(tmp) / XPK_WHEEL, wheel)
    return wheel


def run_xpk(wheel: Path, argvs: list[list[str]]) -> dict[str, Any]:
    """xpk's answer to each `xpk ...` argument list (tests/xpk_probe.py), and its TPU and GPU systems."""
    probe = Path(__file__).parent / "xpk_probe.py"
    commands = [argv[1:] for argv in argvs]  # without the program name
    out = subprocess.run([sys.executable, probe, wheel], input=json.dumps(commands), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _golden_xpk_argv(path: Path) -> list[str]:
    return shlex.split(path.read_text().replace("\\\n", " "))


def _container_env(container: dict[str, Any]) -> dict[str, str]:
    """The environment the container's process sees: each value expanded by Kubernetes with the ones before it."""
    env: dict[str, str] = {}
    for var in container.get("env") or []:
        if "valueFrom" in var:
            env[var["name"]] = FIELDS[var["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            env[var["name"]] = kubernetes_expand(str(var.get("value", "")), env)
    return env


def test_xpk_accepts_every_golden_command(xpk_wheel: Path) -> None:
    argvs = [_golden_xpk_argv(path) for path in GOLDEN_XPK]
    assert len(argvs) == len(CASES)
    for path, argv, result in zip(GOLDEN_XPK, argvs, run_xpk(xpk_wheel, argvs)["results"]):
        assert "error" not in result, (path.name, result)
        args, flags = result["args"], dict(a.split("=", 1) for a in argv if a.startswith("--") and "=" in a)
        assert args["workload"] == flags["--workload"] and args["docker_image"] == flags["--docker-image"]
        assert args["command"] == flags["--command"] and args["tpu_type"] == flags.get("--tpu-type")
        assert args["env"] == [argv[i + 1] for i, arg in enumerate(argv) if arg == "--env"]
        assert yaml.safe_load(result["container"])  # xpk's own container YAML parses


def test_xpk_vocabulary_and_slice_shapes_match_the_instance_table(xpk_wheel: Path) -> None:
    accepted = [name for name in INSTANCE_TYPES if not validate(_spec(instance_type=name), "xpk")]
    answer = run_xpk(xpk_wheel, [xpk_argv(_spec(instance_type=name)) for name in accepted])
    systems = answer["systems"]
    for name, result in zip(accepted, answer["results"]):
        assert "error" not in result, (name, result)
        ours, theirs = instance_type(name), systems[result["args"]["tpu_type"] or result["args"]["device_type"]]
        assert theirs["gke_accelerator"] == ours.accelerator, name
        assert theirs["chips_per_vm"] * theirs["vms_per_slice"] == ours.chips_per_slice, name
        assert theirs["topology"] == (ours.topology or "N/A"), name
    refused = [instance_type(name) for name in INSTANCE_TYPES if name not in accepted]
    assert {i.name for i in refused} == {"tpu-v5e-1", "tpu-v5e-4", "gpu-a100-8"}
    xpk_gpus = {system["gke_accelerator"] for system in systems.values() if system["kind"] == "GPU"}
    for instance in refused:  # xpk really has no such type, under either of its names
        if instance.platform == "tpu":
            assert instance.cloud_tpu_type not in systems and xpk_tpu_type(instance) not in systems
        else:
            assert instance.accelerator not in xpk_gpus


def test_values_reach_the_container_verbatim_through_xpk(xpk_wheel: Path) -> None:
    command = ["axmini", "train", NASTY.format(canary="/tmp/never"), "--set=tag=$(RUN_ID)-$$-$"]
    env = {"NOTE": "it's $(HOME) & 50$; $$ `x`", "EMPTY": ""}
    specs = [_spec(command=command, env=env), _spec(instance_type="gpu-h100-8", num_slices=2, env=env)]
    for spec, result in zip(specs, run_xpk(xpk_wheel, [xpk_argv(spec) for spec in specs])["results"]):
        (container,) = yaml.safe_load(result["container"])
        seen = _container_env(container)
        assert {key: seen[key] for key in env} == env
        script = kubernetes_expand(container["command"][2], seen)
        assert f"({shlex.join(train_command(spec))}) & PID=$!;" in script.splitlines()
    assert seen["AXMINI_COORDINATOR"] == "llm-run-slice-job-0-0.llm-run:6002"  # the GPU job's pod 0
    assert seen["AXMINI_PROCESS_ID"] == FIELDS["metadata.annotations['batch.kubernetes.io/job-completion-index']"]
    assert seen["AXMINI_NUM_PROCESSES"] == "2"


def test_what_axmini_refuses_for_xpk_would_break_xpks_manifest(xpk_wheel: Path) -> None:
    unsafe = {"quote": 'say "hi"', "backslash": "a\\qb", "newline": "a\nb"}
    argv = xpk_argv(_spec(instance_type="tpu-v6e-8"))
    argvs = [[*argv, "--env", f"NOTE={value}"] for value in unsafe.values()]
    for (what, value), result in zip(unsafe.items(), run_xpk(xpk_wheel, argvs)["results"]):
        assert validate(_spec(instance_type="tpu-v6e-8", env={"NOTE": value}), "xpk"), what
        try:
            container = yaml.safe_load(result["container"])[0]
        except yaml.YAMLError:
            continue
        assert _container_env(container)["NOTE"] != value, what


def test_a_jobset_that_carries_an_experiment_file_fits_the_api_models(tmp_path: Path, user_modules: None) -> None:
    local = tmp_path / "my_exps.py"
    local.write_text("from axmini.experiments.lm import tiny\n\n\ndef small():\n    return tiny()\n")
    spec = _spec(instance_type="tpu-v6e-8", command=["axmini", "train", f"--config={local}:small"])
    configmap = experiment_configmap(spec)
    assert configmap is not None and jobset_api_violation(jobset(spec)) is None
    kept = IoK8sApiCoreV1ConfigMap.from_dict(configmap).to_dict()
    assert _first_difference(configmap, kept) is None
