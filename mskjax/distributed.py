"""Device meshes and multi-host start-up.

Data parallelism is `jax.jit` over a 1-D ('data',) mesh: batches are sharded on their leading axis,
parameters replicated. The same code runs on 1 CPU, 8 GPUs or a TPU pod slice; several processes
join with `jax.distributed.initialize` first.
"""
from __future__ import annotations

import os

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


# Seconds after which a process that stopped sending heartbeats is declared dead (jax's default is
# 100 s). Read by `initialize` when no timeout is passed, so a launcher can lower it without a config
# change; the test of a dying process sets it to a few seconds.
HEARTBEAT_ENV = "MSKJAX_HEARTBEAT_TIMEOUT_S"


def initialize(coordinator: str = "", num_processes: int = 0, process_id: int = -1,
               cpu_collectives: str = "gloo", heartbeat_timeout_s: int | None = None) -> None:
    """Joins a multi-process run. With no arguments, does nothing unless the environment names a
    cluster (JAX_COORDINATOR_ADDRESS or a TPU/SLURM environment jax recognises), in which case
    `jax.distributed.initialize()` discovers it. On CPU, cross-process collectives use gloo.

    heartbeat_timeout_s: when a process dies (SIGKILL, lost host), the others stop with an error
    naming it once it has missed heartbeats for this many seconds; until then a survivor blocked in
    a collective waits. None reads $MSKJAX_HEARTBEAT_TIMEOUT_S, else jax's default (100 s).
    """
    heartbeat = _heartbeat_timeout(heartbeat_timeout_s)
    timeouts = {} if heartbeat is None else {"heartbeat_timeout_seconds": heartbeat}
    if coordinator:
        if num_processes <= 0 or process_id < 0:
            raise ValueError("a coordinator address needs num_processes > 0 and process_id >= 0")
        if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS", "") == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id, **timeouts)
    elif os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("TPU_WORKER_HOSTNAMES"):
        jax.distributed.initialize(**timeouts)


def _heartbeat_timeout(value: int | None) -> int | None:
    source = "heartbeat_timeout_s"
    if value is None:
        text = os.environ.get(HEARTBEAT_ENV, "").strip()
        if not text:
            return None
        source = f"${HEARTBEAT_ENV}"
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"{source} must be a whole number of seconds, got {text!r}") from None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{source} must be a positive whole number of seconds, got {value!r}")
    return value


def data_mesh() -> Mesh:
    """A ('data',) mesh over every device of every process."""
    return Mesh(np.asarray(jax.devices()), ("data",))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def is_main_process() -> bool:
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier `name` (a no-op in a single-process run)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
