"""Joins this process to a multi-process JAX run, from environment variables that `axmini launch` sets.

`initialize_from_env()` must run before anything touches jax devices: the CPU device count and the
distributed client are fixed when the backend starts. What it does depends on the environment:

- nothing set: a single-process run; nothing happens.
- `AXMINI_COORDINATOR=host:port` with `AXMINI_NUM_PROCESSES` and a process id: an explicit multi-controller run
  (`launch local`, GPU JobSets). The process id is `AXMINI_PROCESS_ID`, or, on a JobSet where each pod knows only its
  slice (job index) and host (completion index), `AXMINI_SLICE_ID * (processes per slice) + AXMINI_HOST_ID` with
  processes per slice = `AXMINI_NUM_PROCESSES / AXMINI_NUM_SLICES`.
- `AXMINI_DISTRIBUTED=auto`: `jax.distributed.initialize()` detects the cluster itself (Cloud TPU VMs, GKE TPU pods,
  Slurm...); jax takes the coordinator from `JAX_COORDINATOR_ADDRESS` when set (our JobSets set it to the first pod).
- `AXMINI_LOCAL_DEVICES=K` (CPU only): this process gets K simulated CPU devices.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import NamedTuple

import jax

from axmini.config import ConfigValueError

ENV_COORDINATOR = "AXMINI_COORDINATOR"
ENV_NUM_PROCESSES = "AXMINI_NUM_PROCESSES"
ENV_PROCESS_ID = "AXMINI_PROCESS_ID"
ENV_NUM_SLICES = "AXMINI_NUM_SLICES"
ENV_SLICE_ID = "AXMINI_SLICE_ID"
ENV_HOST_ID = "AXMINI_HOST_ID"
ENV_LOCAL_DEVICES = "AXMINI_LOCAL_DEVICES"
ENV_DISTRIBUTED = "AXMINI_DISTRIBUTED"


class DistributedSetup(NamedTuple):
    """How this process joined the run (what jax reports after initialization)."""

    process_id: int
    num_processes: int
    local_device_count: int


def _int_env(env: Mapping[str, str], name: str, *, minimum: int) -> int:
    raw = env.get(name, "")
    try:
        value = int(raw)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise ConfigValueError(f"environment variable {name}={raw!r}: expected an integer >= {minimum}")
    return value


def process_id_from_env(env: Mapping[str, str], num_processes: int) -> int:
    """This process's id: AXMINI_PROCESS_ID, or slice id x processes per slice + host id."""
    if ENV_PROCESS_ID in env:
        process_id = _int_env(env, ENV_PROCESS_ID, minimum=0)
    elif ENV_SLICE_ID in env and ENV_HOST_ID in env:
        num_slices = _int_env(env, ENV_NUM_SLICES, minimum=1) if ENV_NUM_SLICES in env else 1
        if num_processes % num_slices:
            raise ConfigValueError(
                f"{ENV_NUM_PROCESSES}={num_processes} is not a multiple of {ENV_NUM_SLICES}={num_slices}; "
                "every slice must have the same number of processes"
            )
        per_slice = num_processes // num_slices
        slice_id = _int_env(env, ENV_SLICE_ID, minimum=0)
        host_id = _int_env(env, ENV_HOST_ID, minimum=0)
        if host_id >= per_slice:
            raise ConfigValueError(f"{ENV_HOST_ID}={host_id} must be < {per_slice} (processes per slice)")
        process_id = slice_id * per_slice + host_id
    else:
        raise ConfigValueError(
            f"{ENV_COORDINATOR} is set but the process id is not: set {ENV_PROCESS_ID}, "
            f"or {ENV_SLICE_ID} and {ENV_HOST_ID} (with {ENV_NUM_SLICES})"
        )
    if process_id >= num_processes:
        raise ConfigValueError(f"process id {process_id} must be < {ENV_NUM_PROCESSES}={num_processes}")
    return process_id


def initialize_from_env(environ: Mapping[str, str] | None = None) -> DistributedSetup | None:
    """Sets the simulated CPU device count and joins the distributed run the environment describes.

    Returns None for a single-process run (nothing set), else this process's place in the run. Raises ConfigValueError
    naming the variable when the environment is inconsistent. Safe to call twice (the second call only reports).
    """
    env = os.environ if environ is None else environ
    if ENV_LOCAL_DEVICES in env and not jax.distributed.is_initialized():
        jax.config.update("jax_num_cpu_devices", _int_env(env, ENV_LOCAL_DEVICES, minimum=1))
    mode = env.get(ENV_DISTRIBUTED, "")
    if mode not in ("", "auto"):
        raise ConfigValueError(f"environment variable {ENV_DISTRIBUTED}={mode!r}: the only value is 'auto' (or unset)")
    if ENV_COORDINATOR not in env and mode != "auto":
        return None
    if not jax.distributed.is_initialized():
        if mode == "auto":
            jax.distributed.initialize()
        else:
            coordinator = env[ENV_COORDINATOR]
            host, _, port = coordinator.rpartition(":")
            if not host or not port.isdigit():
                raise ConfigValueError(f"environment variable {ENV_COORDINATOR}={coordinator!r}: expected host:port")
            num_processes = _int_env(env, ENV_NUM_PROCESSES, minimum=1)
            jax.distributed.initialize(
                coordinator_address=coordinator,
                num_processes=num_processes,
                process_id=process_id_from_env(env, num_processes),
            )
    return DistributedSetup(jax.process_index(), jax.process_count(), jax.local_device_count())
