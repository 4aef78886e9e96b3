"""The base configuration of box-prompted SAM training (`kind = "sam"`), and its validation.

`configs/sam_*.py` start from `sam_base_config()` and override a few fields; `python -m mskjax.train`
sends any config whose `kind` is "sam" to `mskjax.train_sam`. Every field exists here with its type,
so a mistyped override is an error listing the valid names (see `mskjax.train.check_overrides`).
"""
from __future__ import annotations

import ml_collections

from mskjax.config_base import ConfigError, check_synthetic_data

LOSS_FRAMES = ("input", "low_res")


def sam_base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.kind = "sam"
    c.seed = 0
    # An mskjax SAM checkpoint directory to start from: `python -m mskjax.convert --source sam ...`
    # output, or WORKDIR/best of an earlier SAM run. "" trains from a fresh initialisation.
    c.init_from = ""

    c.model = ml_collections.ConfigDict()
    c.model.arch = "vit_tiny"  # vit_tiny | vit_b | vit_l | vit_h
    c.model.img_size = 256  # SAM input side S (multiple of 16); official weights are 1024

    c.data = ml_collections.ConfigDict()
    c.data.dataset = "synthetic"  # synthetic | fracatlas (any dataset whose records carry boxes + masks)
    c.data.root = "data/synthetic"
    c.data.body_parts = ""  # synthetic/MURA layout: comma-separated XR_ parts; "" = all
    c.data.valid_fraction = 0.15  # FracAtlas: tuning split carved from train
    c.data.synthetic_studies = 700  # generated when data.root has no dataset
    c.data.synthetic_seed = 0
    c.data.synthetic_abnormality_scale = 1.0  # generator knob: multiplies abnormality sizes
    c.data.synthetic_conspicuity = "realistic"  # generator knob: realistic | high (synthetic_lesions.CONSPICUITY)
    c.data.synthetic_parts = ""  # generator knob: comma-separated XR_ parts to draw; "" = all seven
    # Prompts (lesions) decoded per image in one example; an image with more lesions becomes
    # several examples. Padding prompts are masked out of the loss.
    c.data.max_prompts = 2
    # MedSAM's box perturbation: each side moves outward by U(0, box_jitter) px, given in a 1024 px
    # SAM input frame and scaled by img_size / 1024 (5 px at 256); then clipped to the image.
    c.data.box_jitter = 20.0
    # Training: prompt slots an image's lesions leave empty repeat them (each with its own jitter).
    c.data.repeat_prompts = True
    c.data.hflip = False  # random horizontal flips of image, boxes and masks (training only)

    c.train = ml_collections.ConfigDict()
    c.train.box_mask_prompt = False  # each box also as a dense mask prompt (train_sam.box_mask_prompt)
    c.train.batch_size = 8  # images per global batch (each with up to data.max_prompts prompts)
    c.train.epochs = 10
    c.train.optimizer = "adamw"  # adamw | sgd
    c.train.learning_rate = 1e-4  # MedSAM: AdamW 1e-4, weight decay 0.01
    c.train.weight_decay = 0.01
    c.train.momentum = 0.9
    c.train.warmup_epochs = 0.0
    c.train.grad_clip = 1.0
    c.train.train_image_encoder = True  # False: only the mask decoder learns (prompt encoder: never)
    c.train.cache_embeddings = False  # frozen encoder only: embed every image once, keep in memory
    c.train.dice_weight = 1.0
    c.train.bce_weight = 1.0
    c.train.loss_frame = "input"  # input: logits upscaled to S x S | low_res: the S/4 grid
    c.train.log_every = 10

    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 16  # images
    c.eval.every_epochs = 1
    c.eval.test_split = "test"  # evaluated once with the best checkpoint; "" to skip

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.keep = 2
    c.checkpoint.every_steps = 0  # 0: at the end of every epoch
    c.checkpoint.async_writes = True

    c.distributed = ml_collections.ConfigDict()
    c.distributed.coordinator = ""
    c.distributed.num_processes = 0
    c.distributed.process_id = -1
    c.distributed.heartbeat_timeout_s = 0  # 0: $MSKJAX_HEARTBEAT_TIMEOUT_S or JAX's default (100 s)
    return c


def validate_sam(c: ml_collections.ConfigDict, num_devices: int) -> None:
    """Raises ConfigError naming the first field whose value cannot work."""
    from mskjax.models.sam import ARCHS

    def need(ok: bool, field: str, msg: str):
        if not ok:
            raise ConfigError(f"config.{field}: {msg}")

    need(c.kind == "sam", "kind", f"expected 'sam', got {c.kind!r}")
    need(c.model.arch in ARCHS, "model.arch", f"{c.model.arch!r} is not one of {list(ARCHS)}")
    need(c.model.img_size >= 32 and c.model.img_size % 16 == 0, "model.img_size",
         f"must be a multiple of 16 and >= 32, got {c.model.img_size}")
    need(c.data.dataset in ("synthetic", "mura", "fracatlas"), "data.dataset", "synthetic | mura | fracatlas")
    need(0 < c.data.valid_fraction < 1, "data.valid_fraction", "must be in (0, 1)")
    check_synthetic_data(c.data, need)
    need(c.data.max_prompts >= 1, "data.max_prompts", "must be >= 1")
    need(c.data.box_jitter >= 0, "data.box_jitter", "must be >= 0")
    need(c.train.batch_size > 0, "train.batch_size", "must be > 0")
    need(c.train.batch_size % num_devices == 0, "train.batch_size",
         f"{c.train.batch_size} is not divisible by the {num_devices} devices")
    need(c.eval.batch_size > 0 and c.eval.batch_size % num_devices == 0, "eval.batch_size",
         f"{c.eval.batch_size} must be > 0 and divisible by the {num_devices} devices")
    need(c.train.epochs > 0, "train.epochs", "must be > 0")
    need(c.train.learning_rate > 0, "train.learning_rate", f"must be > 0, got {c.train.learning_rate}")
    need(c.train.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    need(c.train.optimizer in ("adamw", "sgd"), "train.optimizer", "adamw | sgd")
    need(c.train.dice_weight >= 0 and c.train.bce_weight >= 0 and c.train.dice_weight + c.train.bce_weight > 0,
         "train.dice_weight", "dice_weight and bce_weight must be >= 0, not both 0")
    need(c.train.loss_frame in LOSS_FRAMES, "train.loss_frame", " | ".join(LOSS_FRAMES))
    need(not (c.train.cache_embeddings and c.train.train_image_encoder), "train.cache_embeddings",
         "embeddings can only be cached while the image encoder is frozen "
         "(set train.train_image_encoder=False)")
    need(c.eval.every_epochs >= 1, "eval.every_epochs", "must be >= 1")
    need(c.checkpoint.keep >= 1, "checkpoint.keep", "must be >= 1")
