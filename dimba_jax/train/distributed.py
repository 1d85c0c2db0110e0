"""Multi-process start-up: `jax.distributed.initialize` when (and only when) it is needed.

Three ways a run becomes multi-process, checked in this order:
1. explicit flags: ``--config.mesh.coordinator_address=HOST:PORT --config.mesh.num_processes=N
   --config.mesh.process_id=I`` (what ``launch/local.sh`` passes);
2. a cluster environment that jax can read by itself: SLURM inside ``srun`` with more than one
   task (``launch/slurm_gpu.sbatch``), a multi-host Cloud TPU slice (``launch/tpu_pod.sh``), or
   ``JAX_COORDINATOR_ADDRESS`` set by the user;
3. otherwise a single process: nothing to do.
"""

from __future__ import annotations

import logging
import os

import jax

_log = logging.getLogger(__name__)


def cluster_environment() -> str | None:
    """Names the multi-process cluster environment this process runs in, or None.

    Returns "slurm" (inside ``srun`` with SLURM_NTASKS > 1), "tpu" (a multi-host TPU slice:
    TPU_WORKER_HOSTNAMES lists several hosts), "env" (JAX_COORDINATOR_ADDRESS is set) or None.
    """
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return "env"
    if os.environ.get("SLURM_STEP_ID") is not None and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return "slurm"
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if "," in hosts:
        return "tpu"
    return None


def initialize_distributed(mesh_config) -> None:
    """Calls `jax.distributed.initialize` for a multi-process run; a no-op for one process.

    Args:
      mesh_config: `config.mesh` (fields coordinator_address, num_processes, process_id).

    Raises:
      ValueError: num_processes / process_id inconsistent with a coordinator address.
    """
    if jax.distributed.is_initialized():
        return
    address = mesh_config.coordinator_address
    if address:
        n, i = int(mesh_config.num_processes), int(mesh_config.process_id)
        if n < 1 or not 0 <= i < n:
            raise ValueError(
                f"mesh.num_processes={n}, mesh.process_id={i}: need num_processes >= 1 and "
                "0 <= process_id < num_processes")
        if ":" not in address:
            raise ValueError(f"mesh.coordinator_address={address!r} must be 'host:port'")
        _log.info("jax.distributed.initialize(%s, num_processes=%d, process_id=%d)", address, n, i)
        jax.distributed.initialize(coordinator_address=address, num_processes=n, process_id=i)
        return
    env = cluster_environment()
    if env is not None:
        _log.info("jax.distributed.initialize() from the %s environment", env)
        jax.distributed.initialize()


def is_main_process() -> bool:
    """True on process 0 (the one that writes logs, progress bars and samples)."""
    return jax.process_index() == 0
