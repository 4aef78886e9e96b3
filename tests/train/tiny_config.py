"""A tiny configuration for trainer tests: ResNet18 at 32 px on a few synthetic studies."""
from mskjax.train.config import base_config


def get_config():
    c = base_config()
    c.model.arch = "resnet18"
    c.data.dataset = "synthetic"
    c.data.image_size = 32
    c.data.synthetic_studies = 16
    c.data.workers = 1
    c.train.batch_size = 8
    c.train.epochs = 2
    c.train.log_every = 1
    # SGD: Adam divides by sqrt(v), which turns float reduction-order noise in near-zero
    # gradients into full-size updates; SGD keeps 1-vs-many-device differences at rounding level.
    c.train.optimizer = "sgd"
    c.train.learning_rate = 0.01
    # Off here so that device-count comparisons see only the training step; the resume tests
    # switch it on (its random draws must resume exactly too).
    c.data.augment = False
    c.eval.batch_size = 8
    c.eval.bootstrap = 0
    c.eval.test_split = ""
    c.checkpoint.every_steps = 1
    c.checkpoint.keep = 3
    return c
