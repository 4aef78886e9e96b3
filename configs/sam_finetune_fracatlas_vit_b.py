"""MedSAM's recipe on FracAtlas with the official SAM ViT-B, for users who have its weights.

    python -m mskjax.convert --source sam --arch vit_b sam_vit_b_01ec64.pth weights/sam_vit_b
    python -m mskjax.train --config configs/sam_finetune_fracatlas_vit_b.py --workdir runs/sam_vit_b \
        [--config.init_from=weights/sam_vit_b]

As MedSAM: 1024 px inputs, frozen prompt encoder, image encoder and mask decoder trained with AdamW
(1e-4, weight decay 0.01), Dice + BCE, boxes jittered outward by up to 20 px, single-mask output.
Data as configs/sam_finetune_fracatlas.py (train: fractured train images, one prompt per fracture;
valid: tuning split of train; test: FracAtlas' official valid split, ground-truth boxes).

Cost: this is accelerator work. On this project's 2-core CPU one forward pass of the 1024 px ViT-B
image encoder takes about 23 s per image (the project's measurement), so one epoch over the ~490
fractured training images would take hours. On a CPU, train the decoder alone on embeddings
computed once: --config.train.train_image_encoder=False --config.train.cache_embeddings=True
(one encoder pass per image, then cheap decoder steps).

Result: not measured here (the official SAM weights cannot be downloaded on the project's machines,
and a from-scratch ViT-B at 1024 px is out of a CPU's reach).
"""
from mskjax.train.config import sam_base_config


def get_config():
    c = sam_base_config()
    c.init_from = "weights/sam_vit_b"  # python -m mskjax.convert --source sam --arch vit_b ...
    c.model.arch = "vit_b"
    c.model.img_size = 1024
    c.data.dataset = "fracatlas"
    c.data.root = "../shared/data/fracatlas"
    c.data.valid_fraction = 0.15
    c.data.max_prompts = 4
    c.data.box_jitter = 20.0
    c.train.train_image_encoder = True
    c.train.cache_embeddings = False
    c.train.batch_size = 2
    c.train.epochs = 10
    c.train.learning_rate = 1e-4
    c.train.weight_decay = 0.01
    c.eval.batch_size = 4
    return c
