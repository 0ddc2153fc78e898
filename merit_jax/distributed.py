"""Multi-process JAX from the environment: `initialize()` once, before anything touches a device.

    from merit_jax import distributed
    distributed.initialize()          # no-op on one process; SLURM (srun), TPU pods, or an explicit coordinator

How the processes find each other (MERIT_DISTRIBUTED picks one explicitly; default `auto`, in this order):
  explicit  MERIT_COORDINATOR=host:port, MERIT_NUM_PROCESSES=N, MERIT_PROCESS_ID=i
            (or JAX's own JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID)
  slurm     a task of `srun` with SLURM_NTASKS > 1 (JAX reads SLURM_* itself; coordinator = first node)
  tpu       a multi-host Cloud TPU slice: on GKE found by TPU_WORKER_HOSTNAMES listing several hosts; on TPU VMs
            set MERIT_DISTRIBUTED=tpu (launch/tpu_vm.sh does), JAX then asks the metadata server
  none      one process
Other settings: MERIT_LOCAL_DEVICE_IDS=0,1 (devices of this process), MERIT_CPU_COLLECTIVES=gloo|mpi|none
(collectives of the CPU backend across processes; default gloo, needed for multi-process CPU runs),
MERIT_INIT_TIMEOUT=seconds (300).
"""

from __future__ import annotations

import logging
import os
from typing import Mapping, Sequence

import jax

log = logging.getLogger(__name__)

MODES = ("auto", "explicit", "slurm", "tpu", "none")


def _int(env: Mapping[str, str], key: str) -> int | None:
    value = env.get(key)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {key}={value!r} is not an integer") from None


def detect(env: Mapping[str, str] | None = None) -> str:
    """Which way of starting applies: explicit | slurm | tpu | none (see the module docstring)."""
    env = os.environ if env is None else env
    mode = env.get("MERIT_DISTRIBUTED", "auto")
    if mode not in MODES:
        raise ValueError(f"MERIT_DISTRIBUTED={mode!r}: expected one of {MODES}")
    if mode != "auto":
        return mode
    if env.get("MERIT_COORDINATOR") or env.get("JAX_COORDINATOR_ADDRESS"):
        return "explicit"
    if env.get("SLURM_STEP_NODELIST") and (_int(env, "SLURM_NTASKS") or 1) > 1:
        return "slurm"
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    if len(hosts) > 1:
        return "tpu"
    return "none"


def init_kwargs(env: Mapping[str, str] | None = None) -> dict | None:
    """Arguments for jax.distributed.initialize, or None for a single process. Pure: reads only `env`."""
    env = os.environ if env is None else env
    mode = detect(env)
    if mode == "none":
        return None
    kwargs: dict = {"initialization_timeout": _int(env, "MERIT_INIT_TIMEOUT") or 300}
    ids = env.get("MERIT_LOCAL_DEVICE_IDS")
    if ids:
        kwargs["local_device_ids"] = [int(i) for i in ids.split(",")]
    if mode == "explicit":
        coordinator = env.get("MERIT_COORDINATOR") or env.get("JAX_COORDINATOR_ADDRESS")
        n = _int(env, "MERIT_NUM_PROCESSES") or _int(env, "JAX_NUM_PROCESSES")
        i = _int(env, "MERIT_PROCESS_ID")
        i = _int(env, "JAX_PROCESS_ID") if i is None else i
        if not coordinator or n is None or i is None:
            raise ValueError("explicit multi-process start needs MERIT_COORDINATOR=host:port, "
                             f"MERIT_NUM_PROCESSES and MERIT_PROCESS_ID (got {coordinator!r}, {n!r}, {i!r})")
        if not 0 <= i < n:
            raise ValueError(f"MERIT_PROCESS_ID={i} is outside [0, MERIT_NUM_PROCESSES={n})")
        kwargs.update(coordinator_address=coordinator, num_processes=n, process_id=i)
    elif mode == "slurm":  # JAX reads SLURM_* itself
        kwargs["cluster_detection_method"] = "slurm"
    else:  # TPU: the worker list from GKE's environment, or from a TPU VM's metadata server
        kwargs["cluster_detection_method"] = "gketpu" if env.get("TPU_WORKER_HOSTNAMES") else "gcetpu"
    return kwargs


def initialize(*, coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               local_device_ids: Sequence[int] | None = None, cpu_collectives: str | None = None,
               env: Mapping[str, str] | None = None) -> bool:
    """Starts multi-process JAX (explicit arguments win over the environment); True if several processes.

    Must run before any JAX computation or device query. Calling it again is a no-op.
    """
    env = dict(os.environ if env is None else env)
    if coordinator is not None:
        env.update(MERIT_DISTRIBUTED="explicit", MERIT_COORDINATOR=coordinator,
                   MERIT_NUM_PROCESSES=str(num_processes), MERIT_PROCESS_ID=str(process_id))
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    kwargs = init_kwargs(env)
    if kwargs is None:
        return False
    if local_device_ids is not None:
        kwargs["local_device_ids"] = list(local_device_ids)
    collectives = cpu_collectives or env.get("MERIT_CPU_COLLECTIVES", "gloo")
    if collectives != "none":
        # Only the CPU backend uses this; on GPU/TPU hosts it is harmless. It must precede backend start-up.
        jax.config.update("jax_cpu_collectives_implementation", collectives)
    log.info("jax.distributed.initialize(%s)", ", ".join(f"{k}={v}" for k, v in kwargs.items()))
    jax.distributed.initialize(**kwargs)
    log.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())
    return jax.process_count() > 1
