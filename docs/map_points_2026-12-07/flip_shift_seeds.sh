#!/usr/bin/env bash
# The default job with flips and translation only (issue 18 part 3: a recipe against absolute position), three seeds.
cd "$(dirname "$0")/../.."  # the repository root; runs/demo9/data is the demo's data
for s in 0 1 2; do
  /usr/bin/time -f "%e s wall" .venv/bin/python -m mskjax.train --config configs/synthetic.py --workdir runs/cls_aug_seed$s \
    --config.data.root=runs/demo9/data --config.seed=$s --config.data.augment=True \
    --config.data.augmentation.flip_prob=0.5 --config.data.augmentation.rotate_prob=0.0 \
    --config.data.augmentation.scale_prob=0.0 --config.data.augmentation.translate_prob=1.0 \
    --config.data.augmentation.max_translate=0.08 --config.data.augmentation.gamma_prob=0.0 \
    --config.data.augmentation.contrast_prob=0.0 --config.data.augmentation.brightness_prob=0.0 \
    > runs/cls_aug_seed$s.log 2>&1
done
