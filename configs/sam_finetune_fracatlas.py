"""The synthetic-pretrained tiny SAM (configs/sam_synthetic.py) fine-tuned on FracAtlas fracture masks.

    python -m mskjax.train --config configs/sam_synthetic.py --workdir runs/sam_synthetic
    python -m mskjax.train --config configs/sam_finetune_fracatlas.py --workdir runs/sam_fracatlas \
        [--config.init_from=runs/sam_synthetic/best]

Data: ../shared/data/fracatlas. Training uses the fractured images of FracAtlas' train split (one
box prompt per annotated fracture, its mask = the fracture-polygon mask inside that box); "valid" is
a stratified tuning split carved from train (best checkpoint); "test" is FracAtlas' official valid
split, scored once with ground-truth boxes in the original image frame. MedSAM's recipe: frozen
prompt encoder, Dice + BCE, boxes jittered outward by up to 20 px at 1024 (5 px at 256); the image
encoder is trained too (a vit_tiny at 256 px is cheap enough on a CPU).

Each box also goes in as a dense mask prompt (mskjax.sam.box_mask_prompt), as configs/sam_synthetic.py
trains the starting model. Measured 2026-11-26 on this project's 2-core CPU shared with other jobs,
starting from the current configs/sam_synthetic.py model (synthetic test Dice 0.755): 1 epoch
(122 steps of 4 images), 3 min 32 s wall, 177 s CPU; test (official valid split) mean Dice 0.614
over 91 fractures, valid (tuning split) 0.612. Before (earlier synthetic model at Dice 0.343, no
mask prompt): 0.374 / 0.297. Still below simply filling the ground-truth box (0.763 on the same 91
fractures: FracAtlas' polygons cover 62% of their box on average); one epoch is short.
"""
from mskjax.train.config import sam_base_config


def get_config():
    c = sam_base_config()
    c.init_from = "runs/sam_synthetic/best"
    c.model.arch = "vit_tiny"
    c.model.img_size = 256
    c.data.dataset = "fracatlas"
    c.data.root = "../shared/data/fracatlas"
    c.data.valid_fraction = 0.15
    c.data.max_prompts = 4
    c.data.hflip = True
    c.train.train_image_encoder = True
    c.train.box_mask_prompt = True  # as configs/sam_synthetic.py trained it
    c.train.batch_size = 4
    c.train.epochs = 1  # "a few minutes" on the CPU; more epochs for a real run
    c.train.learning_rate = 1e-4  # MedSAM's fine-tuning rate
    c.train.weight_decay = 0.01
    c.train.warmup_epochs = 0.0
    c.eval.batch_size = 16
    return c
