"""`launch local`: N processes joined by jax.distributed on loopback, output streaming, fail-fast cleanup."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from axmini.launch import launcher
from axmini.launch.distributed import initialize_from_env, process_id_from_env
from axmini.launch.local import process_env, run_local

# Joins the run, then checks a psum and an all_gather over all 8 devices of the 2 processes.
COLLECTIVE_PROGRAM = """
import json
from axmini.launch.distributed import initialize_from_env, process_id_from_env

setup = initialize_from_env()
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

mesh = jax.make_mesh((jax.device_count(),), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
k = jax.local_device_count()
local = np.arange(k, dtype=np.float32) + k * jax.process_index()  # global device i holds i
x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("x")), local)
f = jax.shard_map(lambda b: (jax.lax.psum(b, "x"), jax.lax.all_gather(b, "x", tiled=True)),
                  mesh=mesh, in_specs=P("x"), out_specs=(P(), P()), check_vma=False)
total, gathered = jax.block_until_ready(jax.jit(f)(x))
print("RESULT " + json.dumps({"setup": list(setup), "devices": jax.device_count(),
      "psum": np.asarray(total).tolist(), "gathered": np.asarray(gathered).tolist()}))
"""

# Process 0 ignores SIGTERM (as a hung JAX process does) and has a child of its own; process 1 then fails.
FAILING_PROGRAM = """
import os, signal, subprocess, sys, time
pid_id = int(os.environ["AXMINI_PROCESS_ID"])
out = sys.argv[1]
if pid_id == 0:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = subprocess.Popen(["sleep", "300"])
    with open(out + "/pids.tmp", "w") as f:
        f.write(f"{os.getpid()} {child.pid}")
    os.rename(out + "/pids.tmp", out + "/pids")
    print("p0 waiting forever", flush=True)
    time.sleep(300)
else:
    while not os.path.exists(out + "/pids"):
        time.sleep(0.05)
    print("p1 failing", flush=True)
    sys.exit(3)
"""


def _results(text: str) -> dict[str, dict]:
    """The RESULT line of each process, keyed by its [p<i>] prefix."""
    results = {}
    for line in text.splitlines():
        prefix, _, rest = line.partition(" ")
        if rest.startswith("RESULT "):
            results[prefix] = json.loads(rest.removeprefix("RESULT "))
    return results


def test_two_processes_of_four_devices_run_a_collective(tmp_path: Path) -> None:
    program = tmp_path / "collective.py"
    program.write_text(COLLECTIVE_PROGRAM)
    out = io.StringIO()
    code = run_local([sys.executable, str(program)], num_processes=2, devices_per_process=4, output=out, timeout_s=120)
    assert code == 0, out.getvalue()
    results = _results(out.getvalue())
    assert set(results) == {"[p0]", "[p1]"}, out.getvalue()
    for i in range(2):
        result = results[f"[p{i}]"]
        assert result["setup"] == [i, 2, 4]  # process id, processes, local devices
        assert result["devices"] == 8
        assert result["psum"] == [float(sum(range(8)))]  # the one-element blocks of the 8 devices, summed
        assert result["gathered"] == [float(d) for d in range(8)]


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead, only not yet reaped


def test_failing_process_stops_the_others_without_orphans(tmp_path: Path) -> None:
    program = tmp_path / "failing.py"
    program.write_text(FAILING_PROGRAM)
    out = io.StringIO()
    start = time.monotonic()
    code = run_local(
        [sys.executable, str(program), str(tmp_path)], num_processes=2, grace_s=1.0, output=out, timeout_s=60
    )
    elapsed = time.monotonic() - start
    assert code == 3, out.getvalue()
    assert elapsed < 20, f"took {elapsed:.1f} s to stop"  # not the 300 s process 0 would sleep, nor the timeout
    text = out.getvalue()
    assert "[p0] p0 waiting forever" in text and "[p1] p1 failing" in text
    assert "[launch] process 1 exited with code 3" in text
    worker, grandchild = map(int, (tmp_path / "pids").read_text().split())
    deadline = time.monotonic() + 5  # the orphaned grandchild is reaped by init asynchronously
    while (_alive(worker) or _alive(grandchild)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(worker) and not _alive(grandchild)


# A launcher (this test's child) whose two processes each start a child and sleep; SIGTERM goes to the launcher.
LAUNCHER_PROGRAM = """
import sys
from axmini.launch.local import run_local
worker = "import os, subprocess, sys, time; c = subprocess.Popen(['sleep', '300']); "
worker += "open(sys.argv[1] + '/pids' + os.environ['AXMINI_PROCESS_ID'], 'w').write(f'{os.getpid()} {c.pid}'); "
worker += "time.sleep(300)"
sys.exit(run_local([sys.executable, "-c", worker, sys.argv[1]], num_processes=2, grace_s=1.0))
"""


def started_launcher(tmp_path: Path) -> tuple[subprocess.Popen, list[Path]]:
    """The launcher program, once both its workers have written their pid files (worker pid, its child's pid)."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    launcher_proc = subprocess.Popen([sys.executable, "-c", LAUNCHER_PROGRAM, str(tmp_path)], env=env)
    pid_files = [tmp_path / "pids0", tmp_path / "pids1"]
    deadline = time.monotonic() + 60
    while not all(f.exists() and f.read_text() for f in pid_files) and time.monotonic() < deadline:
        time.sleep(0.05)
    return launcher_proc, pid_files


def test_terminated_launcher_stops_its_processes(tmp_path: Path) -> None:
    launcher_proc, pid_files = started_launcher(tmp_path)
    launcher_proc.send_signal(signal.SIGTERM)
    assert launcher_proc.wait(timeout=30) == 128 + signal.SIGTERM
    pids = [int(pid) for f in pid_files for pid in f.read_text().split()]
    deadline = time.monotonic() + 5
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in pids)


def test_killed_launcher_leaves_no_worker(tmp_path: Path) -> None:
    """SIGKILL gives the launcher no chance to stop anything: the workers must die with it (parent-death signal)."""
    launcher_proc, pid_files = started_launcher(tmp_path)
    workers = [int(f.read_text().split()[0]) for f in pid_files]
    launcher_proc.kill()
    assert launcher_proc.wait(timeout=30) == -signal.SIGKILL
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in workers)
    for f in pid_files:  # The workers' own children are theirs to stop; clean up after the test.
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(f.read_text().split()[1]), signal.SIGKILL)


def test_timeout_stops_every_process(tmp_path: Path) -> None:
    out = io.StringIO()
    code = run_local(
        [sys.executable, "-c", "import time; time.sleep(300)"], num_processes=2, grace_s=0.5, timeout_s=1.0, output=out
    )
    assert code == 124 and "[launch] timed out" in out.getvalue()


def test_process_env_sets_distributed_variables_and_drops_forced_device_count() -> None:
    env = process_env(1, 2, 4, 1234, {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_foo=1"})
    assert env["AXMINI_COORDINATOR"] == "127.0.0.1:1234"
    assert (env["AXMINI_NUM_PROCESSES"], env["AXMINI_PROCESS_ID"], env["AXMINI_LOCAL_DEVICES"]) == ("2", "1", "4")
    assert env["XLA_FLAGS"] == "--xla_foo=1"
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(Path(__file__).resolve().parents[1])


def test_launch_local_refuses_bad_counts(capsys: pytest.CaptureFixture[str]) -> None:
    assert launcher.main(["local", "--num_processes=0", "--", "--x=1"]) == 2
    assert "num_processes=0" in capsys.readouterr().err


def test_initialize_from_env_is_a_noop_without_variables() -> None:
    assert initialize_from_env({}) is None


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"AXMINI_COORDINATOR": "127.0.0.1:1", "AXMINI_NUM_PROCESSES": "2"}, "process id is not"),
        ({"AXMINI_COORDINATOR": "nohost", "AXMINI_NUM_PROCESSES": "2", "AXMINI_PROCESS_ID": "0"}, "host:port"),
        ({"AXMINI_COORDINATOR": "h:1", "AXMINI_NUM_PROCESSES": "two", "AXMINI_PROCESS_ID": "0"}, "NUM_PROCESSES='two'"),
        ({"AXMINI_COORDINATOR": "h:1", "AXMINI_NUM_PROCESSES": "2", "AXMINI_PROCESS_ID": "2"}, "must be < "),
        (
            {
                "AXMINI_COORDINATOR": "h:1",
                "AXMINI_NUM_PROCESSES": "4",
                "AXMINI_NUM_SLICES": "2",
                "AXMINI_SLICE_ID": "0",
                "AXMINI_HOST_ID": "2",
            },
            "AXMINI_HOST_ID=2 must be < 2",
        ),
        ({"AXMINI_DISTRIBUTED": "yes"}, "the only value is 'auto'"),
    ],
)
def test_initialize_from_env_refuses_inconsistent_variables(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        initialize_from_env(env)


def test_process_id_from_slice_and_host_ids() -> None:
    env = {"AXMINI_NUM_SLICES": "2", "AXMINI_SLICE_ID": "1", "AXMINI_HOST_ID": "1"}
    assert process_id_from_env(env, 4) == 3  # slice 1 starts at process 2
    assert process_id_from_env({"AXMINI_PROCESS_ID": "5"}, 8) == 5


# The end-to-end check of `launch local`; the slowest test here (3 trainer processes, about 30 s of CPU each).
TRAIN_ARGS = ["--config=tiny", "--set=max_step=2", "--set=log_every_n_steps=1", "--set=evaluator.input=None"]
TRAIN_ARGS += ["--set=progress_bar=False", "--sample_prompt="]


class LossMismatchError(AssertionError):
    """The 2-process losses differ from the 1-process ones (the known input-sharding issue, see below)."""


def _train_losses(trainer_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (trainer_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in records if "train/loss" in r]


def test_train_on_2_processes_x_4_devices_matches_1_process_x_8_devices(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), AXMINI_LOCAL_DEVICES="8")
    single_run = [
        sys.executable,
        "-m",
        "axmini.cli",
        "train",
        *TRAIN_ARGS,
        f"--trainer_dir={tmp_path / 'single'}",
    ]
    assert subprocess.run(single_run, env=env, timeout=500).returncode == 0  # a plain process with 8 devices
    argv = ["local", "--num_processes=2", "--devices_per_process=4", "--timeout_s=500", "--"]
    code = launcher.main([*argv, *TRAIN_ARGS, f"--trainer_dir={tmp_path / 'multi'}"])
    out = capfd.readouterr().out
    assert code == 0, out
    assert "[p0] axmini train: experiment 'tiny'" in out and "'fsdp': 8" in out  # one mesh over both processes
    single, multi = _train_losses(tmp_path / "single"), _train_losses(tmp_path / "multi")
    assert len(single) == len(multi) == 2 and np.all(np.isfinite(multi))
    if not np.allclose(multi, single, rtol=1e-5, atol=0):
        raise LossMismatchError(f"2 x 4 devices: losses {multi}; 1 x 8 devices: {single}")
