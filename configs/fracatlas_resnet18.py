"""ResNet18 from scratch on FracAtlas (real radiographs, `../shared/data/fracatlas`), 224 px.

    python -m mskjax.train --config configs/fracatlas_resnet18.py --workdir runs/fracatlas_r18

"valid" is a stratified tuning split carved from FracAtlas' train split (thresholds and the best
checkpoint are chosen there); FracAtlas' official valid split is reported as "test".
Result, measured 2026-11-26 on this project's 2-core CPU (47.5 min wall, partly shared with
other runs): official valid split (269 images) AUROC 0.763 (bootstrap 95% CI 0.708-0.823), kappa
0.370 at threshold 0.5; tuning split AUROC 0.795, Youden threshold 0.469. From-scratch training on
1,589 images on a CPU is modest; its CAMs do not find the fractures (README, "Results").
"""
from mskjax.train.config import base_config


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
