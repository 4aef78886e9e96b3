"""A tiny SAM (vit_tiny, 256 px) trained from scratch on synthetic radiographs with box prompts.

    python -m mskjax.train --config configs/sam_synthetic.py --workdir runs/sam_synthetic

Generates `data/synthetic` (700 studies, seed 0: the set configs/synthetic.py uses) if absent and
trains every part but the prompt encoder (frozen, as in MedSAM) on one box prompt per lesion
(fracture, hardware, lytic lesion), Dice + BCE on the upscaled single-mask logits. Two departures
from MedSAM's recipe, both measured (valid Dice, 2-core CPU shared with other jobs):
- each box also goes in as a dense mask prompt (train.box_mask_prompt, `train_sam.box_mask_prompt`).
  The lesions are ~14 px (fracture, lesion) to ~35x50 px (hardware) at 256 px, about one 16 px
  patch; from scratch the decoder learns to place a mask from the sparse box tokens alone very
  slowly (predictions stay blocky on the patch grid): frozen encoder + decoder only, 1e-3, 8
  epochs: 0.38; with the mask prompt 0.55 after 2 epochs, 0.60 after 3 (no jitter).
- boxes jittered outward by <= 2 px per side (box_jitter 8 at 1024) instead of MedSAM's 5 px at
  256: 5 px on a 14 px box is huge (decoder only, mask prompt, 3 epochs: 0.52 with 5 px, 0.60 with 0).
The grid is not what limits: the ground-truth mask averaged onto the 64 x 64 logit grid and
postprocessed like a prediction scores 0.86 (valid) / 0.88 (test).
The best checkpoint by validation Dice goes to runs/sam_synthetic/best (kind "sam", metadata
"box_mask_prompt": true; `mskjax.train_sam.load_sam` reads it; decode it with the same mask prompt);
the test split is scored once, with ground-truth boxes, in the original frame, per type (results.json).

Target: mean test Dice >= 0.75 in at most 15 minutes on 2 CPU cores. NOT reached. Measured with
these settings (2026-11-26, 2-core CPU shared with other training jobs, load average 5-6): 7 epochs
(1008 steps of 4 images, ~4.5-5 img/s), 15m34s wall, 930 s CPU; test mean Dice 0.666 over 170
lesions (fracture 0.724, hardware 0.447, lesion 0.779), valid 0.635 (0.706, 0.411, 0.808), still
rising slowly (0.56, 0.57, 0.63, 0.61, 0.63, 0.63, 0.63 after epochs 1-7). Before these changes:
test 0.343 (3 epochs, 19 min, heavier load). Simply filling the ground-truth box scores 0.697 on
test (fracture 0.745, hardware 0.425, lesion 0.866) and 0.655 on valid: the model is now at that
level, not above it. What is short is image content: hardware (thin screws and wires, ~20% of
their box) stays at the fill-the-box level, so the encoder has not yet learnt to outline them.
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
    c.data.box_jitter = 8.0  # at 1024 px: <= 2 px per side at 256 (the boxes are ~14 px there)
    c.train.train_image_encoder = True  # from scratch: the encoder must learn too
    c.train.box_mask_prompt = True  # each box also as a dense mask prompt (train_sam.box_mask_prompt)
    c.train.batch_size = 4
    c.train.epochs = 7
    c.train.learning_rate = 8e-4  # from scratch; MedSAM's 1e-4 is for fine-tuning
    c.train.weight_decay = 0.01
    c.train.warmup_epochs = 0.1
    c.train.log_every = 20
    c.eval.batch_size = 16
    return c
