"""LaunchSpec validation and the JobSet / xpk / gcloud renderings (golden files in tests/golden/launch/)."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from golden_files import check_golden

from axmini import experiments
from axmini.config import ConfigTypeError
from axmini.experiments.lm import tiny
from axmini.launch import launcher
from axmini.launch.render import gcloud_script, jobset, jobset_yaml, render, xpk_argv, xpk_command
from axmini.launch.spec import LaunchSpec, LaunchSpecError, check, train_command, validate
from axmini.mesh_rules import MeshRule
from axmini.trainer.trainer import Trainer

GOLDEN = Path(__file__).parent / "golden" / "launch"
IMAGE = "us-docker.pkg.dev/my-proj/axmini/axmini:2026.11"
# Shell syntax a user might put in a value; if any of it ran, the canary file would appear.
NASTY = "--set=run_name=$(touch {canary}); echo 'it''s' \"x\" `touch {canary}` | cat > /dev/null &"
BASH = shutil.which("bash")


def _spec(**kw) -> LaunchSpec:
    base = dict(
        name="llm-run",
        instance_type="tpu-v5p-256",
        image=IMAGE,
        command=["axmini", "train", "--trainer.max_step=100"],
        cluster="tpu-cluster",
        project="my-proj",
        zone="us-east5-a",
    )
    return LaunchSpec(**{**base, **kw})


# The instance types the brief names, each with the features it exercises.
CASES = {
    "tpu_v5p_256_x2": dict(num_slices=2, provisioning="spot", queue="team-a", max_restarts=3, env={"RUN": "a b"}),
    "tpu_v5e_256": dict(instance_type="tpu-v5e-256", priority="high"),
    "tpu_v6e_8": dict(instance_type="tpu-v6e-8", provisioning="reserved", reservation="my-res", namespace="ml"),
    "gpu_h100_8_x2": dict(instance_type="gpu-h100-8", num_slices=2, max_restarts=1),
    # Kubernetes expands $(VAR) in commands and env values; `$` and shell quotes must arrive as written.
    "tpu_v4_16_dollars": dict(
        instance_type="tpu-v4-16",
        command=["axmini", "train", "--set=run_name=run-$(RUN_ID)-$$-it's", "--trainer.max_step=100"],
        env={"NOTE": "$(HOME) costs $5; $$ too"},
    ),
}
RENDERINGS = [
    (case, r) for case in CASES for r in ("jobset", "xpk", "gcloud") if not case.startswith("gpu") or r != "gcloud"
]
SUFFIX = {"jobset": "jobset.yaml", "xpk": "xpk.sh", "gcloud": "gcloud.sh"}


@pytest.mark.parametrize(("case", "renderer"), RENDERINGS)
def test_rendering_matches_golden(case: str, renderer: str, update_golden: bool) -> None:
    text = render(_spec(**CASES[case]), renderer)
    check_golden(GOLDEN / f"{case}.{SUFFIX[renderer]}", text, update=update_golden)


def _pod(manifest: dict) -> dict:
    (rjob,) = manifest["spec"]["replicatedJobs"]
    return rjob["template"]["spec"]["template"]["spec"]


def _env(container: dict) -> dict[str, object]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def kubernetes_expand(text: str, env: dict[str, str]) -> str:
    """What Kubernetes makes of a container's command word or env value: `$(VAR)` is replaced by an earlier
    variable's value (left as is when there is none), `$$` becomes `$` (its third_party/forked/golang/expansion)."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "$" and i + 1 < len(text):
            end = text.find(")", i + 2) if text[i + 1] == "(" else -1
            if text[i + 1] == "$":
                out.append("$")
            elif end != -1:
                out.append(env.get(text[i + 2 : end], text[i : end + 1]))
                i = end + 1
                continue
            else:
                out.append(text[i : i + 2])
            i += 2
            continue
        out.append(text[i])
        i += 1
    return "".join(out)


def test_kubernetes_expand_follows_the_kubernetes_rules() -> None:
    env = {"A": "1"}
    assert kubernetes_expand("$(A)-$(B)-$$(A)-$$$(A)-$x-$(-$", env) == "1-$(B)-$(A)-$1-$x-$(-$"


def test_tpu_multislice_jobset_fields() -> None:
    spec = _spec(**CASES["tpu_v5p_256_x2"])
    manifest = yaml.safe_load(jobset_yaml(spec))
    assert manifest["apiVersion"] == "jobset.x-k8s.io/v1alpha2" and manifest["kind"] == "JobSet"
    assert manifest["metadata"]["name"] == "llm-run"
    assert manifest["metadata"]["labels"] == {"kueue.x-k8s.io/queue-name": "team-a"}
    assert manifest["metadata"]["annotations"]["alpha.jobset.sigs.k8s.io/exclusive-topology"] == (
        "cloud.google.com/gke-nodepool"
    )
    assert manifest["spec"]["failurePolicy"]["maxRestarts"] == 3
    (rjob,) = manifest["spec"]["replicatedJobs"]
    assert rjob["replicas"] == 2  # one job per slice
    job = rjob["template"]["spec"]
    # v5p-256 = 128 chips = 32 hosts of 4 chips: one pod per host.
    assert job["parallelism"] == job["completions"] == 32
    assert job["backoffLimit"] == 0
    pod = _pod(manifest)
    assert pod["nodeSelector"]["cloud.google.com/gke-tpu-accelerator"] == "tpu-v5p-slice"
    assert pod["nodeSelector"]["cloud.google.com/gke-tpu-topology"] == "4x4x8"
    assert pod["nodeSelector"]["cloud.google.com/gke-spot"] == "true"
    assert pod["priorityClassName"] == "medium"
    (container,) = pod["containers"]
    assert container["image"] == IMAGE
    assert container["resources"]["limits"] == {"google.com/tpu": 4}
    assert container["command"] == ["axmini", "train", "--trainer.max_step=100", "--mesh_selector=tpu-v5p-256"]
    env = _env(container)
    assert env["JAX_COORDINATOR_ADDRESS"] == "llm-run-slice-0-0.llm-run:8476"  # the first pod's DNS name
    assert env["AXMINI_DISTRIBUTED"] == "auto"
    assert env["RUN"] == "a b"


def test_single_host_tpu_jobset_requests_all_chips_of_the_host() -> None:
    pod = _pod(jobset(_spec(**CASES["tpu_v6e_8"])))
    assert pod["nodeSelector"]["cloud.google.com/gke-tpu-topology"] == "2x4"
    assert pod["nodeSelector"]["cloud.google.com/reservation-name"] == "my-res"
    assert "cloud.google.com/gke-spot" not in pod["nodeSelector"]
    assert pod["containers"][0]["resources"]["limits"] == {"google.com/tpu": 8}


def test_gpu_hosts_are_one_job_of_one_pod_each_on_a_shared_node_pool() -> None:
    manifest = jobset(_spec(**{**CASES["gpu_h100_8_x2"], "num_slices": 3}))
    assert "annotations" not in manifest["metadata"]  # no exclusive node pool per job: all hosts in one job
    (rjob,) = manifest["spec"]["replicatedJobs"]
    assert rjob["replicas"] == 1
    assert rjob["template"]["spec"]["parallelism"] == rjob["template"]["spec"]["completions"] == 3
    pod = _pod(manifest)
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists"}]
    assert pod["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": 8}
    env = _env(pod["containers"][0])
    assert env["AXMINI_COORDINATOR"] == "llm-run-slice-0-0.llm-run:8476"  # pod 0 of job 0
    assert env["AXMINI_NUM_PROCESSES"] == "3"
    completion_index = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    assert env["AXMINI_PROCESS_ID"] == {"fieldRef": {"fieldPath": completion_index}}


def _flags(argv: list[str]) -> dict[str, str]:
    return dict(a.split("=", 1) for a in argv if a.startswith("--") and "=" in a)


def _xpk_env(argv: list[str]) -> dict[str, str]:
    return dict(argv[i + 1].split("=", 1) for i, arg in enumerate(argv) if arg == "--env")


def test_xpk_command_flags() -> None:
    tpu = _flags(shlex.split(xpk_command(_spec(**CASES["tpu_v5p_256_x2"])).replace("\\\n", " ")))
    assert tpu["--cluster"] == "tpu-cluster" and tpu["--workload"] == "llm-run"
    assert tpu["--tpu-type"] == "v5p-4x4x8" and tpu["--num-slices"] == "2"
    assert tpu["--docker-image"] == IMAGE and tpu["--priority"] == "medium" and tpu["--max-restarts"] == "3"
    assert shlex.split(tpu["--command"]) == train_command(_spec())
    assert _flags(xpk_argv(_spec(instance_type="tpu-v5e-256")))["--tpu-type"] == "v5litepod-16x16"
    gpu_argv = xpk_argv(_spec(**CASES["gpu_h100_8_x2"]))
    gpu = _flags(gpu_argv)
    assert gpu["--device-type"] == "h100-80gb-8" and gpu["--num-nodes"] == "2" and "--tpu-type" not in gpu
    # xpk's GPU pods define JAX_COORDINATOR_* and NODE_RANK; axmini's process group is built from them.
    env = _xpk_env(gpu_argv)
    assert env["AXMINI_COORDINATOR"] == "$(JAX_COORDINATOR_ADDRESS):$(JAX_COORDINATOR_PORT)"
    assert env["AXMINI_PROCESS_ID"] == "$(NODE_RANK)" and env["AXMINI_NUM_PROCESSES"] == "2"


def test_gcloud_script_queues_waits_and_runs_on_all_workers() -> None:
    script = gcloud_script(_spec(**CASES["tpu_v5p_256_x2"]))
    create = shlex.split(
        script.split("gcloud compute tpus queued-resources create")[1].split("\n\n")[0].replace("\\\n", " ")
    )
    assert create[0] == "llm-run"
    assert {"--accelerator-type=v5p-256", "--node-count=2", "--node-prefix=llm-run", "--spot"} <= set(create)
    assert "ACTIVE) break" in script
    assert "for node in llm-run-0 llm-run-1; do" in script and "--worker=all" in script
    single = gcloud_script(_spec(instance_type="tpu-v6e-8"))
    assert "--node-id=llm-run" in single and "--runtime-version=v2-alpha-tpuv6e" in single
    if BASH:
        assert subprocess.run([BASH, "-n"], input=script, text=True).returncode == 0


def test_gcloud_takes_a_named_reservation_on_the_track_that_has_the_flag() -> None:
    named = gcloud_script(_spec(instance_type="tpu-v6e-8", provisioning="reserved", reservation="my-res"))
    assert "gcloud alpha compute tpus queued-resources create llm-run" in named
    assert "--reservation=my-res" in named and "--reserved" not in named
    any_matching = gcloud_script(_spec(instance_type="tpu-v6e-8", provisioning="reserved"))
    assert "gcloud compute tpus queued-resources create llm-run" in any_matching and "--reserved" in any_matching
    if BASH:
        assert subprocess.run([BASH, "-n"], input=named, text=True).returncode == 0


def _bash_words(shell_text: str) -> list[str]:
    """The words bash makes of `shell_text` (printed NUL-separated; nothing in it is executed but printf)."""
    out = subprocess.run([BASH, "-c", f"printf '%s\\0' {shell_text}"], capture_output=True, check=True)
    return out.stdout.decode().split("\0")[:-1]


@pytest.mark.skipif(BASH is None, reason="needs bash")
def test_shell_metacharacters_in_user_values_reach_the_program_verbatim(tmp_path: Path) -> None:
    canary = tmp_path / "pwned"
    nasty = NASTY.format(canary=canary)
    spec = _spec(command=["axmini", "train", nasty], env={"NOTE": "a;b $(x)"})
    expected = ["axmini", "train", nasty, "--mesh_selector=tpu-v5p-256"]
    # xpk: the whole command line goes through a shell, --command through Kubernetes and the container's shell.
    words = _bash_words(xpk_command(spec).replace("\\\n", " "))
    assert words[:3] == ["xpk", "workload", "create"]
    inner = kubernetes_expand(_flags(words)["--command"], {"x": "EXPANDED"})
    assert _bash_words(inner) == expected
    assert kubernetes_expand(_xpk_env(words)["NOTE"], {"x": "EXPANDED"}) == "a;b $(x)"
    # gcloud: the ssh line goes through the script's shell, --command through the TPU VM's shell.
    ssh_line = next(line for line in gcloud_script(spec).splitlines() if "tpu-vm ssh" in line)
    ssh_words = _bash_words(ssh_line.strip().removesuffix("&").replace('"$node"', "NODE"))
    auth, _, run = _flags(ssh_words)["--command"].partition(" && ")  # docker credentials, then the run
    assert auth == "sudo gcloud auth configure-docker us-docker.pkg.dev --quiet"
    remote = _bash_words(run)
    assert remote[-4:] == expected and "NOTE=a;b $(x)" in remote
    assert not canary.exists()
    # JobSet: an exec list, no shell at all; Kubernetes expands it.
    (container,) = _pod(jobset(spec))["containers"]
    assert [kubernetes_expand(arg, {"x": "EXPANDED"}) for arg in container["command"]] == expected
    assert kubernetes_expand(_env(container)["NOTE"], {"x": "EXPANDED"}) == "a;b $(x)"


def test_mesh_that_does_not_cover_the_chips_is_refused() -> None:
    rules = [MeshRule(pattern="tpu-.*", mesh_shape={"fsdp": 64, "model": 1})]
    errors = validate(_spec(num_slices=2), "jobset", mesh_rules=rules)  # a v5p-256 slice has 128 chips, not 64
    assert len(errors) == 1
    assert "spec.instance_type='tpu-v5p-256' x spec.num_slices=2" in errors[0] and "128" in errors[0]
    assert validate(_spec(instance_type="tpu-v5p-128"), "jobset", mesh_rules=rules) == []


def _model_16_experiment() -> Trainer.Config:
    return tiny().set(mesh_rules=[MeshRule(pattern="tpu-.*", mesh_shape={"fsdp": -1, "model": 16})])


def test_mesh_rules_come_from_the_named_experiment_and_its_overrides() -> None:
    experiments.register("launch-test-model-16")(_model_16_experiment)
    fits = _spec(instance_type="tpu-v5e-256", command=["axmini", "train", "--config=launch-test-model-16"])
    assert validate(fits, "jobset") == []
    too_small = fits.clone(instance_type="tpu-v6e-8")  # 8 chips cannot hold model=16
    (error,) = validate(too_small, "jobset")
    assert "experiment 'launch-test-model-16'" in error and "8 devices" in error
    overridden = fits.clone(command=[*fits.command, "--set", "mesh_rules[0].mesh_shape={'fsdp': -1, 'model': 512}"])
    (error,) = validate(overridden, "jobset")  # the --set the trainer will apply makes the mesh too big
    assert "256 devices" in error
    bad_set = fits.clone(command=[*fits.command, "--set=mesh_rulez=1"])
    (error,) = validate(bad_set, "jobset")
    assert "mesh_rulez" in error and "did you mean 'mesh_rule' or 'mesh_rules'" in error
    unknown = fits.clone(command=["axmini", "train", "--experiment", "no-such-experiment"])
    (error,) = validate(unknown, "jobset")
    assert "unknown experiment 'no-such-experiment'" in error


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("name", "My_Run", "e.g. 'my-run'"),
        ("name", "9lives", "starting with a letter"),
        ("name", "a" * 60, "too long"),
        ("cluster", "Bad.Cluster", "spec.cluster='Bad.Cluster' is not a valid name"),
        ("instance_type", "tpu-v7-256", "did you mean 'tpu-v4-256' or 'tpu-v6e-256'"),
        ("instance_type", "gpu-h10-8", "did you mean 'gpu-h100-8'"),
        ("instance_type", "cpu", "launch needs a TPU or GPU type"),
        ("image", "img; rm -rf /", "not a container image reference"),
        ("env", {"BAD-KEY": "1"}, "'BAD-KEY' is not an environment variable name"),
        ("command", ["python", "train.py"], "must start with 'axmini train'"),
        ("command", ["axmini", "train", "--mesh_selector=tpu-v4-8"], "drop the flag"),
        ("num_slices", 0, "spec.num_slices=0 must be >= 1"),
        ("zone", "east", "not a GCP zone"),
    ],
)
def test_bad_spec_values_are_refused_with_one_line_each(field: str, value: object, message: str) -> None:
    errors = validate(_spec(**{field: value}), "jobset")
    assert len(errors) == 1, errors
    assert message in errors[0] and "\n" not in errors[0]
    with pytest.raises(LaunchSpecError, match="spec"):
        check(_spec(**{field: value}), "jobset")
    with pytest.raises(LaunchSpecError):
        render(_spec(**{field: value}), "jobset")


def test_renderer_specific_requirements() -> None:
    assert validate(_spec(image=""), "gcloud") == []  # gcloud can run without a container
    assert "spec.image is required by the jobset renderer" in validate(_spec(image=""), "jobset")[0]
    assert "spec.cluster is required by the xpk renderer" in validate(_spec(cluster=""), "xpk")[0]
    assert "spec.zone is required by the gcloud renderer" in validate(_spec(zone=""), "gcloud")[0]
    assert "creates TPU VMs" in validate(_spec(instance_type="gpu-h100-8"), "gcloud")[0]
    assert "needs spec.reservation" in validate(_spec(provisioning="reserved"), "xpk")[0]
    assert validate(LaunchSpec(instance_type="tpu-v6e-8", command=[]), "xpk") == ["spec.name is required"]
    with pytest.raises(ConfigTypeError, match="priority"):
        _spec(priority="urgent")


def test_dry_run_prints_exactly_the_rendering(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["tpu", "--name=llm-run", "--instance_type=tpu-v5p-256", "--num_slices=2", f"--image={IMAGE}"]
    argv += ["--cluster=tpu-cluster", "--project=my-proj", "--zone=us-east5-a", "--provisioning=spot"]
    argv += ["--queue=team-a", "--max_restarts=3", "--env", "RUN=a b", "--", "--trainer.max_step=100"]
    for renderer in ("jobset", "xpk", "gcloud"):
        assert launcher.main([*argv[:1], f"--renderer={renderer}", "--dry_run", *argv[1:]]) == 0
        assert capsys.readouterr().out == render(_spec(**CASES["tpu_v5p_256_x2"]), renderer).rstrip("\n") + "\n"


def test_launcher_refuses_bad_specs_with_exit_code_2(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["tpu", "--name=Bad_Name", "--instance_type=tpu-v5p-256", "--renderer=xpk", "--dry_run"]
    assert launcher.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("error: spec.") for line in lines)  # name, image, cluster
    assert launcher.main(["gpu", "--name=a", "--instance_type=tpu-v6e-8", f"--image={IMAGE}", "--dry_run"]) == 2
    assert "use `launch tpu`" in capsys.readouterr().err
    assert launcher.main(["tpu", "--name=a", "--instance_type=tpu-v6e-8", "--priority=urgent"]) == 2


def test_submit_without_the_cluster_tool_fails_in_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no kubectl, xpk or gcloud here
    argv = ["tpu", "--name=a", "--instance_type=tpu-v6e-8", f"--image={IMAGE}", "--zone=us-east5-a"]
    for renderer, tool in (("jobset", "kubectl"), ("xpk", "xpk"), ("gcloud", "gcloud")):
        assert launcher.main([*argv, f"--renderer={renderer}", "--cluster=c"]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert f"`{tool}` is not installed" in line and "--dry_run" in line


def test_submit_pipes_the_jobset_to_kubectl_apply(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = tmp_path / "kubectl"
    fake.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/args\n{shutil.which("cat")} > {tmp_path}/stdin\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    argv = ["tpu", "--name=llm-run", "--instance_type=tpu-v6e-8", f"--image={IMAGE}", "--", "--x=1"]
    assert launcher.main(argv) == 0
    assert (tmp_path / "args").read_text().strip() == "apply -f -"
    spec = LaunchSpec(name="llm-run", instance_type="tpu-v6e-8", image=IMAGE, command=["axmini", "train", "--x=1"])
    assert (tmp_path / "stdin").read_text() == jobset_yaml(spec)


_CLUSTER_ARGS = [f"--image={IMAGE}", "--cluster=tpu-cluster", "--zone=us-east5-a", "--dry_run"]
_MISSING_SHAPES = [
    "tpu-v5e-2",
    "tpu-v6e-2",
    "tpu-v5p-2",
    "tpu-v5p-4",
    "tpu-v4-2",
    "tpu-v4-4",
    "tpu-v5e-512",
    "tpu-v6e-512",
]
REFUSED = {  # what the real tools would refuse or get wrong: (argv after `launch`, a phrase of the one-line error)
    "webhook_pod_name": (["tpu", "--name=" + "a" * 48, "--instance_type=tpu-v5p-64", "--num_slices=2"], "webhook"),
    "xpk_name_length": (["tpu", "--renderer=xpk", "--name=" + "a" * 41, "--instance_type=tpu-v6e-8"], "over 40"),
    **{
        f"{shape}_{renderer}": (
            ["tpu", f"--renderer={renderer}", "--name=a", f"--instance_type={shape}"],
            "slice that exists",
        )
        for shape in _MISSING_SHAPES
        for renderer in ("jobset", "xpk", "gcloud")
    },
    "xpk_v5litepod_1": (["tpu", "--renderer=xpk", "--name=a", "--instance_type=tpu-v5e-1"], "no --tpu-type"),
    "xpk_v5litepod_4": (["tpu", "--renderer=xpk", "--name=a", "--instance_type=tpu-v5e-4"], "no --tpu-type"),
    "xpk_a100": (["gpu", "--renderer=xpk", "--name=a", "--instance_type=gpu-a100-8"], "no --device-type"),
    "xpk_env_quote": (
        ["tpu", "--renderer=xpk", "--name=a", "--instance_type=tpu-v6e-8", "--env", 'NOTE=say "hi"'],
        "double-quoted YAML",
    ),
    "xpk_command_newline": (
        ["tpu", "--renderer=xpk", "--name=a", "--instance_type=tpu-v6e-8", "--", "--set=run_name=a\nb"],
        "has '\\n', which xpk cannot carry",
    ),
    "xpk_gpu_command_quote": (
        ["gpu", "--renderer=xpk", "--name=a", "--instance_type=gpu-h100-8", "--", '--set=run_name="x"'],
        "has '\"', which xpk cannot carry",
    ),
}


@pytest.mark.parametrize("case", REFUSED)
def test_what_the_real_tools_refuse_is_one_line_and_exit_2(case: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv, phrase = REFUSED[case]
    own, train = (argv[: argv.index("--")], argv[argv.index("--") :]) if "--" in argv else (argv, [])
    assert launcher.main([*own, *_CLUSTER_ARGS, *train]) == 2
    captured = capsys.readouterr()
    (line,) = captured.err.strip().splitlines()
    assert line.startswith("error: ") and phrase in line and captured.out == ""


_LAYOUTS = {  # renderer, spec fields
    "jobset_tpu": ("jobset", dict(instance_type="tpu-v5p-64", num_slices=2)),
    "jobset_gpu": ("jobset", dict(instance_type="gpu-h100-8", num_slices=16)),
    "xpk_tpu": ("xpk", dict(instance_type="tpu-v5p-8192", num_slices=12)),
    "xpk_gpu": ("xpk", dict(instance_type="gpu-h200-8", num_slices=4)),
    "gcloud": ("gcloud", dict(instance_type="tpu-v5e-256", num_slices=12)),
}


@pytest.mark.parametrize("layout", _LAYOUTS)
@pytest.mark.parametrize("name", ["a" * 64, "run-" * 16, "My_Very-Long_Run_Name_" * 3, "9" * 70])
def test_the_name_a_refusal_suggests_is_accepted(layout: str, name: str) -> None:
    renderer, fields = _LAYOUTS[layout]
    (error,) = validate(_spec(name=name, **fields), renderer)
    suggestion = error.split("(e.g. '")[1].split("'")[0]
    assert validate(_spec(name=suggestion, **fields), renderer) == []


@pytest.mark.parametrize("train_args", [["train"], ["axmini", "train"], []])
def test_train_subcommand_after_double_dash_is_not_doubled(
    train_args: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = ["tpu", "--name=a", "--instance_type=tpu-v6e-8", f"--image={IMAGE}", "--dry_run"]
    assert launcher.main([*argv, "--", *train_args, "--trainer.max_step=3"]) == 0
    (container,) = _pod(yaml.safe_load(capsys.readouterr().out))["containers"]
    assert container["command"] == ["axmini", "train", "--trainer.max_step=3", "--mesh_selector=tpu-v6e-8"]
    commands = []
    monkeypatch.setattr(launcher, "run_local", lambda command, **kw: commands.append(command) or 0)
    assert launcher.main(["local", "--", *train_args, "--trainer.max_step=3"]) == 0
    assert commands[0][-3:] == ["axmini.cli", "train", "--trainer.max_step=3"]


EXPERIMENT_FILE = '''"""A user's experiment: tiny, with $(NOT_EXPANDED), 'quotes' and "more" arriving verbatim."""
from axmini.experiments.lm import tiny


def small():
    return tiny().set(max_step=7)
'''


@pytest.mark.skipif(BASH is None, reason="needs bash")
def test_an_experiment_file_travels_with_the_job_in_every_rendering(tmp_path: Path, user_modules: None) -> None:
    local = tmp_path / "my_exps.py"
    local.write_text(EXPERIMENT_FILE)
    spec = _spec(instance_type="tpu-v6e-8", command=["axmini", "train", f"--config={local}:small"])
    assert validate(spec, "jobset") == []  # The mesh check loaded the experiment from the local file.
    in_job = "/tmp/axmini/experiment/my_exps.py"
    assert train_command(spec)[2] == f"--config={in_job}:small"

    def written_by(shell_text: str) -> str:
        """What running the part before `axmini train` writes, with the job's dir moved under tmp_path."""
        job = tmp_path / "job"
        setup = shell_text.split(" && axmini train")[0].split(" && sudo docker")[0]
        subprocess.run([BASH, "-c", setup.replace("/tmp/axmini/experiment", str(job))], check=True)
        return (job / "my_exps.py").read_text()

    # JobSet: a ConfigMap holding the file, mounted where the command reads it.
    text = jobset_yaml(spec)
    assert text.startswith(f"# The experiment file {local} travels with the job: in the ConfigMap llm-run-experiment")
    configmap, manifest = yaml.safe_load_all(text)
    assert configmap["kind"] == "ConfigMap" and configmap["data"] == {"my_exps.py": EXPERIMENT_FILE}
    pod = _pod(manifest)
    (container,) = pod["containers"]
    assert pod["volumes"] == [{"name": "experiment", "configMap": {"name": configmap["metadata"]["name"]}}]
    assert container["volumeMounts"] == [
        {"name": "experiment", "mountPath": "/tmp/axmini/experiment", "readOnly": True}
    ]
    assert container["command"][2] == f"--config={in_job}:small"
    # xpk: --command writes the file first (through Kubernetes' expansion and the container's shell).
    xpk = xpk_command(spec.clone(cluster="c"))
    assert xpk.startswith(f"# The experiment file {local} travels with the job: --command writes it")
    command = kubernetes_expand(_flags(_bash_words(xpk.split("\n", 1)[1].replace("\\\n", " ")))["--command"], {})
    assert written_by(command) == EXPERIMENT_FILE
    # gcloud: each TPU VM's command writes it, and the container gets it mounted.
    script = gcloud_script(spec)
    assert f"# The experiment file {local} travels with the job" in script
    ssh_line = next(line for line in script.splitlines() if "tpu-vm ssh" in line)
    remote = _flags(_bash_words(ssh_line.strip().removesuffix("&").replace('"$node"', "NODE")))["--command"]
    assert written_by(remote.split(" && ", 1)[1]) == EXPERIMENT_FILE  # After the docker credentials.
    assert "-v /tmp/axmini/experiment:/tmp/axmini/experiment:ro" in remote


def test_a_module_experiment_comes_from_the_image_and_a_missing_file_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, user_modules: None
) -> None:
    (tmp_path / "my_project_exps.py").write_text(EXPERIMENT_FILE)
    monkeypatch.chdir(tmp_path)  # Importable here, as it must be in the image.
    spec = _spec(instance_type="tpu-v6e-8", command=["axmini", "train", "--config=my_project_exps:small"])
    text = jobset_yaml(spec)
    assert text.startswith("# The experiment my_project_exps:small is imported in the job: the image must have")
    assert len(list(yaml.safe_load_all(text))) == 1 and train_command(spec)[2] == "--config=my_project_exps:small"
    missing = _spec(instance_type="tpu-v6e-8", command=["axmini", "train", f"--config={tmp_path}/gone.py:small"])
    assert validate(missing, "jobset") == [f"spec.command: the experiment file {tmp_path}/gone.py does not exist"]
