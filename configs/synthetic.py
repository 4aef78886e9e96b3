"""The built-in default: a ResNet18 at 128 px on synthetic radiographs (no downloads).

    python -m mskjax.train --config configs/synthetic.py --workdir runs/synthetic

Generates `data/synthetic` (700 studies, seed 0) if absent, trains a one-channel ResNet18 from
scratch, keeps the best checkpoint by validation study kappa (runs/synthetic/best) and reports the
test split. Result on this project's 2-core CPU machine: see README ("Results"); the target is
study-level AUROC >= 0.95 on the test split in at most 10 minutes.
"""
from mskjax.config_base import base_config


def get_config():
    c = base_config()
    c.model.arch = "resnet18"
    c.model.in_channels = 1
    c.data.dataset = "synthetic"
    c.data.root = "data/synthetic"
    c.data.image_size = 128
    c.data.synthetic_studies = 700
    c.train.batch_size = 32
    c.train.epochs = 8
    c.train.learning_rate = 2e-3
    c.train.weight_decay = 1e-4
    c.train.warmup_epochs = 0.5
    c.eval.batch_size = 64
    return c
