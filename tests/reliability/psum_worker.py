"""One process of a two-process CPU run that sums across processes in a loop, for the dying-process test.

    python tests/reliability/psum_worker.py PORT PROCESS_ID HEARTBEAT_S

Joins through `mskjax.distributed.initialize` (gloo collectives, the heartbeat timeout given),
prints "initialised", then "step N" every 20 steps of a jitted global sum over a ('data',) mesh with
one device per process. It runs until it is killed or a collective fails; the test kills one of the
two processes and watches the other.
"""
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.pop("XLA_FLAGS", None)  # one device per process

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mskjax import distributed  # noqa: E402

port, process_id, heartbeat = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
distributed.initialize(f"127.0.0.1:{port}", 2, process_id, heartbeat_timeout_s=heartbeat)
print("initialised", flush=True)
mesh = distributed.data_mesh()
total = jax.jit(jnp.sum, out_shardings=distributed.replicated(mesh))
for step in range(10**9):
    x = jax.make_array_from_process_local_data(distributed.batch_sharding(mesh), np.full((1,), float(step)))
    value = float(total(x))
    if value != 2.0 * step:
        raise SystemExit(f"wrong global sum at step {step}: {value}")
    if step % 20 == 0:
        print(f"step {step}", flush=True)
