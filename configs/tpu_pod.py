"""Multi-host data-parallel training (a TPU pod slice, or several GPU hosts).

Run the same command on every host; `jax.distributed.initialize()` discovers a TPU pod from its
environment. Elsewhere name the coordinator and ranks:

    python -m mskjax.train --config configs/tpu_pod.py --workdir gs://bucket/runs/pod \
        --config.data.root=/data/MURA-v1.1 \
        [--config.distributed.coordinator=host0:1234 --config.distributed.num_processes=4 \
         --config.distributed.process_id=$RANK]

Each process reads its own rows of every global batch; checkpoints are written collectively; only
process 0 writes logs. The same code path is tested here with two CPU processes (gloo collectives).
Result: not measured here (no pod on the project's machines).
"""
from mskjax.train.config import base_config


def get_config():
    c = base_config()
    c.model.arch = "efficientnet_b3"
    c.model.in_channels = 3
    c.model.dtype = "bfloat16"
    c.data.dataset = "mura"
    c.data.root = "MURA-v1.1"
    c.data.image_size = 300
    c.data.normalization = "imagenet"
    c.train.batch_size = 1024
    c.train.epochs = 30
    c.train.learning_rate = 4e-3
    c.eval.batch_size = 1024
    return c
