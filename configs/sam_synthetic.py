"""A tiny SAM (vit_tiny, 256 px) trained from scratch on synthetic radiographs with box prompts.

    python -m mskjax.train --config configs/sam_synthetic.py --workdir runs/sam_synthetic

Uses `data/synthetic_x3` (2,000 studies of all seven parts, seed 0, abnormalities at three times
their default size: configs/synthetic.py's set until 2026-11-26; generated if absent; the demo points
it at the classifier's data instead), and trains every part but the prompt encoder (frozen, as in
MedSAM) on one box prompt per lesion
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
"box_mask_prompt": true; `mskjax.checkpoint.load_sam` reads it; decode it with the same mask prompt);
the test split is scored once, with ground-truth boxes, in the original frame, per type (results.json).

Target: mean test Dice >= 0.75 in at most 15 minutes on 2 CPU cores.
On `data/synthetic_x3` (these settings, 2 epochs = 862 steps of 4 images): test mean Dice
0.755 over 413 lesions (fracture 0.746, hardware 0.767, lesion 0.762), valid 0.754, in 12 min 17 s
run directly (11 min 38 s as the demo's SAM stage, same numbers) on this 2-core machine shared with
other jobs - reached, by a small margin (fracture alone is just under 0.75).
On the default-size dataset (`data/synthetic`, 700 studies, 7 epochs = 1,008 steps; the settings
before the classifier moved to larger abnormalities): test mean Dice 0.666 (fracture 0.724,
hardware 0.447, lesion 0.779) in 15 min 34 s at load 5-6 - not reached there; filling the
ground-truth box scores 0.697 on that test split, and thin hardware (screws and wires, ~20% of
their box) stayed at the fill-the-box level.
"""
from mskjax.train.config import sam_base_config


def get_config():
    c = sam_base_config()
    c.model.arch = "vit_tiny"
    c.model.img_size = 256
    c.data.dataset = "synthetic"
    c.data.root = "data/synthetic_x3"
    c.data.synthetic_studies = 2000
    c.data.synthetic_seed = 0
    c.data.synthetic_abnormality_scale = 3.0
    c.data.max_prompts = 2  # 2 is the most lesions an image of this set has
    c.data.hflip = True
    c.data.box_jitter = 8.0  # at 1024 px: <= 2 px per side at 256 (the boxes are ~14 px there)
    c.train.train_image_encoder = True  # from scratch: the encoder must learn too
    c.train.box_mask_prompt = True  # each box also as a dense mask prompt (train_sam.box_mask_prompt)
    c.train.batch_size = 4
    c.train.epochs = 2
    c.train.learning_rate = 8e-4  # from scratch; MedSAM's 1e-4 is for fine-tuning
    c.train.weight_decay = 0.01
    c.train.warmup_epochs = 0.1
    c.train.log_every = 20
    c.eval.batch_size = 16
    return c
