"""The report's setup: EfficientNet-B3 on MURA-v1.1 at 224 x 224, pixels scaled to [0, 1].

    python -m mskjax.train --config configs/mura_efficientnet_b3.py --workdir runs/mura_b3 \
        --config.data.root=/path/to/MURA-v1.1

Variant at B3's native 300 px with ImageNet normalisation and ImageNet weights converted by
`python -m mskjax.convert --source torchvision --arch efficientnet_b3 efficientnet_b3_rwightman-b3899882.pth ckpt/b3`:
    --config.data.image_size=300 --config.data.normalization=imagenet --config.init_from=ckpt/b3

"valid" is carved from MURA's train split (patient-disjoint); MURA's official valid split is the
reported "test". Result: not measured here (MURA cannot be downloaded on the project's machines).
"""
from mskjax.train.config import base_config


def get_config():
    c = base_config()
    c.model.arch = "efficientnet_b3"
    c.model.in_channels = 3
    c.data.dataset = "mura"
    c.data.root = "MURA-v1.1"
    c.data.image_size = 224
    c.data.normalization = "none"
    c.train.batch_size = 32
    c.train.epochs = 20
    c.train.learning_rate = 1e-3
    c.eval.bootstrap = 1000
    return c
