"""configs/synthetic.py with fill augmentation: half of the training images get one random ellipse
filled in from its surroundings (`AugmentConfig.fill_prob`, `mskjax.fill`), label kept; no other
augmentation.

    python -m mskjax.train --config configs/synthetic_fill.py --workdir runs/synthetic_fill

Why: a classifier that has seen filled-in patches on normal and abnormal images alike cannot use a
patch's texture as evidence, so what it points at is more likely the abnormality itself. Measured
on the demo's data (runs/demo/data, the default job's data), README "Fill augmentation".
"""
from mskjax.train.config import config_beside


def get_config():
    c = config_beside(__file__, "synthetic.py")
    c.data.augment = True
    for name in ("flip_prob", "rotate_prob", "scale_prob", "translate_prob", "gamma_prob", "contrast_prob",
                 "brightness_prob"):
        c.data.augmentation[name] = 0.0
    c.data.augmentation.fill_prob = 0.5
    return c
