"""The report's ResNet50 on MURA-v1.1 at 224 x 224, pixels scaled to [0, 1].

    python -m mskjax.train --config configs/mura_resnet50.py --workdir runs/mura_r50 \
        --config.data.root=/path/to/MURA-v1.1

ImageNet start: `python -m mskjax.convert --source torchvision --arch resnet50 resnet50-11ad3fa6.pth ckpt/r50`,
then `--config.init_from=ckpt/r50 --config.data.normalization=imagenet`.
Result: not measured here (MURA cannot be downloaded on the project's machines).
"""
from mskjax.train.config import base_config


def get_config():
    c = base_config()
    c.model.arch = "resnet50"
    c.model.in_channels = 3
    c.data.dataset = "mura"
    c.data.root = "MURA-v1.1"
    c.data.image_size = 224
    c.train.batch_size = 32
    c.train.epochs = 20
    c.train.learning_rate = 1e-3
    c.eval.bootstrap = 1000
    return c
