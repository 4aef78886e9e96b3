"""ResNet18 from scratch on FracAtlas (real radiographs, `../shared/data/fracatlas`), 224 px.

    python -m mskjax.train --config configs/fracatlas_resnet18.py --workdir runs/fracatlas_r18

"valid" is a stratified tuning split carved from FracAtlas' train split (thresholds and the best
checkpoint are chosen there); FracAtlas' official valid split is reported as "test".
Result: see README ("Results"); from-scratch training on 1,869 images on a CPU is modest.
"""
from mskjax.config_base import base_config


def get_config():
    c = base_config()
    c.model.arch = "resnet18"
    c.model.in_channels = 1
    c.data.dataset = "fracatlas"
    c.data.root = "../shared/data/fracatlas"
    c.data.image_size = 224
    c.data.mode = "letterbox"
    c.train.batch_size = 32
    c.train.epochs = 10
    c.train.learning_rate = 1e-3
    c.eval.test_split = "test"
    return c
