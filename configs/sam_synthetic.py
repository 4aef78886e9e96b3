"""A tiny SAM (vit_tiny, 256 px) trained from scratch on synthetic radiographs with box prompts.

    python -m mskjax.train --config configs/sam_synthetic.py --workdir runs/sam_synthetic

Generates `data/synthetic` (700 studies, seed 0: the set configs/synthetic.py uses) if absent and
trains every part but the prompt encoder (frozen, as in MedSAM) on one box prompt per lesion
(fracture, hardware, lytic lesion), boxes jittered outward by up to 5 px (MedSAM's 20 px at
1024 px, scaled to 256), Dice + BCE on the upscaled single-mask logits. The best checkpoint by
validation Dice goes to runs/sam_synthetic/best (kind "sam"; `mskjax.segment --sam` and
`mskjax.train_sam.load_sam` read it); the test split is scored once, with ground-truth boxes, in
the original image frame, per lesion type (results.json).

Target: mean test Dice >= 0.75 in at most 15 minutes on 2 CPU cores. Measured result: see the
README ("Results") / the final report of the issue that added this file.
"""
from mskjax.config_sam import sam_base_config


def get_config():
    c = sam_base_config()
    c.model.arch = "vit_tiny"
    c.model.img_size = 256
    c.data.dataset = "synthetic"
    c.data.root = "data/synthetic"
    c.data.synthetic_studies = 700
    c.data.synthetic_seed = 0
    c.data.max_prompts = 2  # 2 is the most lesions an image of this set has
    c.data.hflip = True
    c.train.train_image_encoder = True  # from scratch: the encoder must learn too
    c.train.batch_size = 4
    c.train.epochs = 3
    c.train.learning_rate = 8e-4  # from scratch; MedSAM's 1e-4 is for fine-tuning
    c.train.weight_decay = 0.01
    c.train.warmup_epochs = 0.3
    c.train.log_every = 10
    c.eval.batch_size = 16
    return c
