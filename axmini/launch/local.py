"""`launch local`: N processes on this machine, joined by jax.distributed over loopback.

Each process gets the AXMINI_* variables that `axmini.launch.distributed.initialize_from_env` reads (coordinator on
a free loopback port, its process id, K simulated CPU devices), so N processes x K devices run the same program as
one process with N*K devices. Output is streamed line by line with a `[p<i>]` prefix. When a process fails, the
others are stopped: SIGTERM to each process group, then SIGKILL after a grace period (a JAX process blocked in a
collective catches SIGTERM and would otherwise hang forever waiting for its dead peer). The launcher stops them the
same way when it gets SIGTERM or SIGHUP; when it is killed outright (SIGKILL), Linux kills them: each asks for
SIGKILL on its parent's death (prctl PR_SET_PDEATHSIG) before its command starts (`dies_with_launcher`).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO

from axmini.launch import distributed

_POLL_S = 0.05


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def process_env(
    process_id: int, num_processes: int, devices_per_process: int, port: int, base: Mapping[str, str]
) -> dict[str, str]:
    """The environment of process `process_id`: `base` plus what initialize_from_env needs, CPU only."""
    env = dict(base)
    # Our device count must win over a forced host-platform count inherited from the parent (e.g. pytest's).
    xla_flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join(xla_flags)
    env["JAX_PLATFORMS"] = "cpu"
    env[distributed.ENV_COORDINATOR] = f"127.0.0.1:{port}"
    env[distributed.ENV_NUM_PROCESSES] = str(num_processes)
    env[distributed.ENV_PROCESS_ID] = str(process_id)
    env[distributed.ENV_LOCAL_DEVICES] = str(devices_per_process)
    # `python -m axmini...` must import this checkout even when axmini is not installed.
    repo_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo_root, env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


# Run before each process's command (Linux): ask for SIGKILL when the launcher dies, even by SIGKILL
# (prctl(PR_SET_PDEATHSIG = 1), kept across exec), then become the command. A stub rather than a preexec_fn, which
# would fork a launcher that may be multithreaded (JAX) and run Python in the child.
_DIE_WITH_LAUNCHER = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)\n"
    "if os.getppid() != int(sys.argv[1]):\n"  # The launcher died before the call: nobody is left to signal us.
    "    os._exit(1)\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


def dies_with_launcher(command: Sequence[str]) -> list[str]:
    """`command`, started so that Linux kills it when this process (the launcher) dies; unchanged elsewhere."""
    if not sys.platform.startswith("linux"):
        return list(command)
    return [sys.executable, "-c", _DIE_WITH_LAUNCHER, str(os.getpid()), *command]


def _stream(prefix: str, source: IO[bytes], sink: IO[str], lock: threading.Lock) -> None:
    for raw in iter(source.readline, b""):
        line = raw.decode(errors="replace").rstrip("\n")
        with lock:
            sink.write(f"{prefix} {line}\n")
            sink.flush()
    source.close()


def _stop(procs: Sequence[subprocess.Popen], grace_s: float) -> None:
    """SIGTERM every live process group, then SIGKILL whatever is left after `grace_s` seconds."""
    for proc in procs:
        if proc.poll() is None:
            _signal_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        time.sleep(_POLL_S)
    for proc in procs:  # Also the groups of processes that exited: their children may live on.
        _signal_group(proc, signal.SIGKILL)
        proc.wait()


def _signal_group(proc: subprocess.Popen, sig: signal.Signals) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


class _Terminated(Exception):
    """The launcher itself received SIGTERM or SIGHUP."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum: int, frame: object) -> None:
    raise _Terminated(signum)


def _say(output: IO[str], lock: threading.Lock, message: str) -> None:
    with lock:
        output.write(f"[launch] {message}\n")
        output.flush()


def _wait(procs: Sequence[subprocess.Popen], deadline: float | None, say: Callable[[str], None]) -> int:
    """Waits until all processes succeed (0), one fails (its code; 128+N if killed by signal N) or time is up (124)."""
    while True:
        codes = [p.poll() for p in procs]
        failed = [(i, code) for i, code in enumerate(codes) if code not in (None, 0)]
        if failed:
            i, code = failed[0]
            say(f"process {i} exited with code {code}; stopping the others")
            return 128 - code if code < 0 else code
        if all(code == 0 for code in codes):
            return 0
        if deadline is not None and time.monotonic() > deadline:
            say("timed out; stopping all processes")
            return 124
        time.sleep(_POLL_S)


def run_local(
    command: Sequence[str],
    *,
    num_processes: int,
    devices_per_process: int = 1,
    grace_s: float = 5.0,
    timeout_s: float | None = None,
    output: IO[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> int:
    """Runs `command` as `num_processes` jax.distributed processes; returns 0 iff every one succeeded.

    On the first failure (or after `timeout_s`, or when the launcher gets SIGTERM/SIGHUP), the others are stopped
    and the failing exit code is returned (124 on timeout, 128+N for a process or launcher killed by signal N).
    """
    if num_processes < 1 or devices_per_process < 1:
        raise ValueError(f"num_processes={num_processes}, devices_per_process={devices_per_process}: both must be >= 1")
    output = output if output is not None else sys.stdout
    base = os.environ if env is None else env
    port = free_port()
    lock = threading.Lock()
    procs: list[subprocess.Popen] = []
    threads: list[threading.Thread] = []
    previous_handlers = {}
    if threading.current_thread() is threading.main_thread():  # a killed launcher must not orphan its processes
        previous_handlers = {sig: signal.signal(sig, _raise_terminated) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        for i in range(num_processes):
            proc = subprocess.Popen(
                dies_with_launcher(command),
                env=process_env(i, num_processes, devices_per_process, port, base),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, so stopping it reaches its children too
            )
            procs.append(proc)
            thread = threading.Thread(target=_stream, args=(f"[p{i}]", proc.stdout, output, lock), daemon=True)
            thread.start()
            threads.append(thread)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        result = _wait(procs, deadline, lambda message: _say(output, lock, message))
    except _Terminated as e:
        result = 128 + e.signum
        _say(output, lock, f"received signal {e.signum}; stopping all processes")
    finally:
        for sig in previous_handlers:  # a second signal must not interrupt the cleanup
            signal.signal(sig, signal.SIG_IGN)
        _stop(procs, grace_s)
        for thread in threads:
            thread.join(timeout=grace_s)
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
    return result
