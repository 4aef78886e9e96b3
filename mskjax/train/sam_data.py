"""Examples for box-prompted SAM training: images, one box per lesion, each lesion's own mask.

Frames (boxes (x0, y0, x1, y1) float pixels, pixel i covers [i, i + 1)):
- original: the decoded image, (H, W).
- SAM input: resized so the long side is S = img_size ((h, w) = `mskjax.sam.sam_input_size`),
  placed at the top-left of an S x S canvas (padding bottom/right), exactly as `mskjax.sam.preprocess`
  with the model's recipe: "sam" (PIL's antialiased bilinear resize, then mean/std) or
  "lite_medsam" (cv2 INTER_AREA resize, then per-image min-max; `normalize_canvas` does either).

One prompt per lesion. Records carry one box per lesion but a single mask per image (the union of
its lesions: synthetic masks and FracAtlas masks both are). A lesion's own mask is taken as the
union mask inside that lesion's box: the box is the extent of the lesion's own mask, so this holds
all of the lesion and nothing outside its box; only where two lesions' boxes overlap can it also
hold a piece of the other one (synthetic train split: 107 of 560 images have two lesions, rarely
overlapping). Each lesion is scored against that same mask, so train and test agree.

Prompts of an image are decoded together (one image embedding, up to `max_prompts` prompts, padded
with a validity flag); an image with more lesions becomes several examples. Everything lives in host
memory as uint8: images (N, S, S) gray, masks (N, P, S, S) 0..255 (antialiased resize of the 0/255
lesion mask, so partial coverage survives at S), and, for scoring, each lesion's mask in the
original frame cropped to its box.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax.numpy as jnp
import numpy as np
from PIL import Image

from mskjax.data.images import ImageDecodeError, decode_image
from mskjax.data.records import Record, SkipReport
from mskjax.models.sam.sam import PIXEL_MEAN, PIXEL_STD
from mskjax.sam import PREPROCESSING, resize_into_canvas


class SamDataError(ValueError):
    """A split that yields no usable example, naming the split and what was skipped."""


@dataclasses.dataclass
class LesionTruth:
    """One lesion's ground truth in the original frame, for scoring.

    example, prompt: where its prompt sits in `SamExamples` (boxes[example, prompt]).
    box_px: (x0, y0, x1, y1) int pixel extent in the original frame (the box rounded outward).
    crop: bool (y1 - y0, x1 - x0), the lesion's mask inside box_px (zero outside it).
    """

    example: int
    prompt: int
    type: str
    path: str
    box_px: tuple[int, int, int, int]
    crop: np.ndarray


@dataclasses.dataclass
class SamExamples:
    """All examples of one split, in host memory.

    images (N_img, S, S) uint8: grayscale, resized into the top-left (h, w), zero elsewhere.
    input_sizes (N_img, 2) int32 (h, w); original_sizes (N_img, 2) int32 (H, W).
    image_index (N, ) int32: the image of each example.
    boxes (N, P, 4) float32: ground-truth boxes in the SAM input frame (unjittered).
    masks (N, P, S, S) uint8 0..255: each prompt's lesion mask in the SAM input frame.
    valid (N, P) bool: real prompts (False = padding).
    types (N, P): lesion type strings ("" for padding).
    lesions: one LesionTruth per valid prompt.
    skipped: what was left out and why.
    maps (N_img, S, S) uint8 and map_boxes (N_img, 4) float32, when a SAM trains on a classifier's
    maps (`build_examples` with a prompter): the map in the SAM input frame (0..255 for [0, 1]) and the box the
    pipeline draws around its peak, SAM input frame.
    """

    img_size: int
    images: np.ndarray
    input_sizes: np.ndarray
    original_sizes: np.ndarray
    paths: list[str]
    image_index: np.ndarray
    boxes: np.ndarray
    masks: np.ndarray
    valid: np.ndarray
    types: np.ndarray
    lesions: list[LesionTruth]
    skipped: SkipReport
    maps: np.ndarray | None = None
    map_boxes: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.image_index.shape[0])

    @property
    def max_prompts(self) -> int:
        return int(self.boxes.shape[1])


def to_uint8(image01: np.ndarray) -> np.ndarray:
    """float [0, 1] (H, W) -> uint8 (round to nearest)."""
    return np.clip(np.rint(np.asarray(image01, np.float64) * 255.0), 0, 255).astype(np.uint8)


def _inside(images, input_sizes):
    """(B, S, S) bool: the pixels of each canvas that hold the resized image (not padding)."""
    s = images.shape[-1]
    rows = jnp.arange(s)[None, :, None] < input_sizes[:, 0, None, None]
    cols = jnp.arange(s)[None, None, :] < input_sizes[:, 1, None, None]
    return rows & cols


def normalize_canvas(images, input_sizes, preprocessing: str = "sam"):
    """The model input (B, S, S, 3) float32 from gray canvases (B, S, S) uint8 and their (h, w),
    by the segmenter's recipe (`mskjax.sam.preprocessing_of(model)`): `normalize_gray` for "sam",
    `normalize_min_max` for "lite_medsam". Jit-able; `preprocessing` is static."""
    if preprocessing == "lite_medsam":
        return normalize_min_max(images, input_sizes)
    if preprocessing == "sam":
        return normalize_gray(images, input_sizes)
    raise ValueError(f"unknown preprocessing {preprocessing!r}: expected one of {PREPROCESSING}")


def normalize_min_max(images, input_sizes):
    """LiteMedSAM input (B, S, S, 3) float32 from gray canvases (B, S, S) uint8 and (B, 2) (h, w):
    (x - min) / max(max - min, 1e-8) with min and max over each resized image (the padding left
    out, as the official recipe normalises before padding), 0 in the padding. Equals
    `mskjax.sam.preprocess(..., preprocessing="lite_medsam")` of the original gray uint8 images
    (float32 division here, float64 there: within one float32 ulp). Jit-able."""
    inside = _inside(images, input_sizes)
    x = images.astype(jnp.float32)
    lo = jnp.min(jnp.where(inside, x, jnp.inf), axis=(1, 2), keepdims=True)
    hi = jnp.max(jnp.where(inside, x, -jnp.inf), axis=(1, 2), keepdims=True)
    y = jnp.where(inside, (x - lo) / jnp.maximum(hi - lo, 1e-8), 0.0)
    return jnp.repeat(y[..., None], 3, axis=-1)


def normalize_gray(images, input_sizes):
    """SAM input (B, S, S, 3) float32 from gray canvases (B, S, S) uint8 and (B, 2) (h, w): each
    channel (x - PIXEL_MEAN) / PIXEL_STD inside the image, 0 in the padding. Equals
    `mskjax.sam.preprocess` of the original gray images. Jit-able (jnp in, jnp out)."""
    x = images.astype(jnp.float32)[..., None]
    x = (x - jnp.asarray(PIXEL_MEAN, jnp.float32)) / jnp.asarray(PIXEL_STD, jnp.float32)
    return jnp.where(_inside(images, input_sizes)[..., None], x, 0.0)


def box_pixels(box: Sequence[float], hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """A float box -> the int pixel extent it touches, (floor x0, floor y0, ceil x1, ceil y1),
    clipped to the image."""
    h, w = hw
    x0, y0 = max(0, int(math.floor(box[0]))), max(0, int(math.floor(box[1])))
    x1, y1 = min(w, int(math.ceil(box[2]))), min(h, int(math.ceil(box[3])))
    return x0, y0, x1, y1


def build_examples(records: Sequence[Record], img_size: int, max_prompts: int, split: str = "",
                   log=None, preprocessing: str = "sam", prompter=None, prompt_batch: int = 16) -> SamExamples:
    """Decodes every record with boxes and a mask and makes its examples (see module docstring).
    preprocessing: the segmenter's input recipe, which decides how images are resized.
    prompter: a `mskjax.pipeline.MapPrompter`, or None: each kept image's classifier map and map
    box (`MapPrompter.run`; SamExamples.maps (uint8, `quantize_maps`) and map_boxes), drawn from
    the decoded image while it is in memory (batches of prompt_batch), so nothing is decoded twice.

    Records without boxes (normal images) give no example and are not reported. Skipped and
    reported in `skipped`: records with boxes but no mask, files that cannot be decoded, a mask
    whose size differs from its image, a lesion whose box holds no mask pixel.
    """
    s, p = img_size, max_prompts
    if prompter is not None and prompter.sam_img_size != img_size:
        raise SamDataError(f"map prompts are drawn for a {prompter.sam_img_size} px SAM input, the examples are "
                           f"{img_size} px")
    pending, maps, map_boxes = [], [], []  # decoded originals awaiting the prompter; its outputs

    def prompt_pending():
        got = prompter.run(pending, prompt_batch)
        maps.append(quantize_maps(got["maps_sam"]))
        map_boxes.append(got["boxes_sam"].astype(np.float32))
        pending.clear()

    skipped = SkipReport()
    images, in_sizes, orig_sizes, paths = [], [], [], []
    ex_image, ex_boxes, ex_masks, ex_valid, ex_types, lesions = [], [], [], [], [], []
    for rec in records:
        if not rec.boxes:
            continue
        if rec.mask_path is None:
            skipped.add(rec.path, "no_mask", f"{len(rec.boxes)} box(es) but no mask")
            continue
        try:
            image = decode_image(rec.path).image
            mask = decode_image(rec.mask_path).image > 0.5
        except (ImageDecodeError, FileNotFoundError) as e:
            skipped.add(rec.path, "unreadable", str(e))
            continue
        if mask.shape != image.shape:
            skipped.add(rec.path, "mask_size", f"mask {rec.mask_path} is {mask.shape[::-1]}, image {image.shape[::-1]}")
            continue
        hw = image.shape
        kept = []  # (box, type, box_px, crop)
        for box, kind in zip(rec.boxes, rec.box_types):
            bx = box_pixels(box, hw)
            crop = mask[bx[1]:bx[3], bx[0]:bx[2]]
            if bx[2] <= bx[0] or bx[3] <= bx[1] or not crop.any():
                skipped.add(rec.path, "empty_lesion", f"{kind} box {tuple(box)} holds no mask pixel")
                continue
            kept.append((box, kind, bx, crop.copy()))
        if not kept:
            continue
        canvas, (h, w) = resize_into_canvas(to_uint8(image), s, preprocessing)
        img_idx = len(images)
        images.append(canvas)
        in_sizes.append((h, w))
        orig_sizes.append(hw)
        paths.append(rec.path)
        if prompter is not None:
            pending.append(image)
            if len(pending) == prompt_batch:
                prompt_pending()
        sx, sy = w / hw[1], h / hw[0]  # ResizeLongestSide's effective scale per axis
        for start in range(0, len(kept), p):
            chunk = kept[start:start + p]
            boxes = np.zeros((p, 4), np.float32)
            masks = np.zeros((p, s, s), np.uint8)
            valid = np.zeros((p,), bool)
            types = np.full((p,), "", object)
            for j, (box, kind, bx, crop) in enumerate(chunk):
                boxes[j] = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
                own = np.zeros(hw, np.uint8)
                own[bx[1]:bx[3], bx[0]:bx[2]] = crop * np.uint8(255)
                masks[j, :h, :w] = np.asarray(Image.fromarray(own).resize((w, h), Image.BILINEAR))
                valid[j] = True
                types[j] = kind
                lesions.append(LesionTruth(len(ex_image), j, kind, rec.path, bx, crop))
            ex_image.append(img_idx)
            ex_boxes.append(boxes)
            ex_masks.append(masks)
            ex_valid.append(valid)
            ex_types.append(types)
    if log is not None and skipped:
        log(f"{split or 'split'}: {skipped.summary(limit=5)}")
    if pending:
        prompt_pending()
    n = len(ex_image)
    ex = SamExamples(
        img_size=s,
        images=np.stack(images) if images else np.zeros((0, s, s), np.uint8),
        input_sizes=np.asarray(in_sizes, np.int32).reshape(-1, 2),
        original_sizes=np.asarray(orig_sizes, np.int32).reshape(-1, 2),
        paths=paths,
        image_index=np.asarray(ex_image, np.int32),
        boxes=np.stack(ex_boxes) if n else np.zeros((0, p, 4), np.float32),
        masks=np.stack(ex_masks) if n else np.zeros((0, p, s, s), np.uint8),
        valid=np.stack(ex_valid) if n else np.zeros((0, p), bool),
        types=np.stack(ex_types) if n else np.zeros((0, p), object),
        lesions=lesions,
        skipped=skipped,
    )
    if prompter is not None:
        ex = dataclasses.replace(ex, maps=np.concatenate(maps) if maps else np.zeros((0, s, s), np.uint8),
                                 map_boxes=np.concatenate(map_boxes) if map_boxes else np.zeros((0, 4), np.float32))
    return ex


def quantize_maps(maps01: np.ndarray) -> np.ndarray:
    """Maps in [0, 1] (float) -> uint8 (255 = 1), as SamExamples keeps them."""
    return np.round(np.clip(maps01, 0.0, 1.0) * 255.0).astype(np.uint8)


def gather_batch(ex: SamExamples, indices: np.ndarray, repeat_prompts: bool = False) -> dict[str, np.ndarray]:
    """Host arrays for the examples `indices` (B,): images (B, S, S) uint8, input_sizes (B, 2),
    boxes (B, P, 4), masks (B, P, S, S) uint8, valid (B, P). Indices < 0 are padding rows (copies
    of example 0 with valid all False).

    repeat_prompts (training): the padding prompt slots of an example with k < P lesions take
    copies of its lesions (slot j gets lesion j mod k) and count as valid. The decoder runs on
    every slot anyway; each copy gets its own box jitter, so the slots add training signal for free.
    """
    idx = np.asarray(indices)
    real = idx >= 0
    safe = np.where(real, idx, 0)
    img = ex.image_index[safe]
    boxes, masks, valid = ex.boxes[safe], ex.masks[safe], ex.valid[safe]
    if repeat_prompts:
        p = ex.max_prompts
        k = np.maximum(valid.sum(axis=1, keepdims=True), 1)  # real lesions come first in each example
        src = np.arange(p)[None, :] % k  # (B, P)
        rows = np.arange(len(safe))[:, None]
        boxes, masks, valid = boxes[rows, src], masks[rows, src], valid[rows, src]
    out = {"images": ex.images[img], "input_sizes": ex.input_sizes[img], "boxes": boxes,
           "masks": masks, "valid": valid & real[:, None]}
    if ex.maps is not None:  # maps (B, S, S) uint8, map_boxes (B, 4)
        out["maps"], out["map_boxes"] = ex.maps[img], ex.map_boxes[img]
    return out


def image_union_masks(ex: SamExamples) -> list[np.ndarray]:
    """Each image's ground truth in its original frame: (H, W) bool, the union of its lesions'
    masks (`LesionTruth.crop` placed at box_px), one per image of `ex` in order."""
    out = [np.zeros((int(h), int(w)), bool) for h, w in ex.original_sizes]
    for t in ex.lesions:
        x0, y0, x1, y1 = t.box_px
        m = out[int(ex.image_index[t.example])]
        m[y0:y1, x0:x1] |= t.crop
    return out


def lesion_dice(pred: np.ndarray, truth: LesionTruth) -> tuple[float, float]:
    """(Dice, IoU) of a predicted (H, W) bool mask against one lesion's mask (zero outside its box)."""
    x0, y0, x1, y1 = truth.box_px
    inter = float(np.logical_and(pred[y0:y1, x0:x1], truth.crop).sum())
    p, g = float(pred.sum()), float(truth.crop.sum())
    dice = 2 * inter / (p + g) if p + g > 0 else 1.0
    union = p + g - inter
    return dice, (inter / union if union > 0 else 1.0)


def fill_box_dice(truth: LesionTruth) -> tuple[float, float]:
    """(Dice, IoU) of the baseline that fills the lesion's box: every pixel of box_px (the box
    rounded outward, i.e. every pixel it touches) against the lesion's mask."""
    x0, y0, x1, y1 = truth.box_px
    area, g = float((x1 - x0) * (y1 - y0)), float(truth.crop.sum())
    dice = 2 * g / (area + g) if area + g > 0 else 1.0
    return dice, (g / area if area > 0 else 1.0)


def dice_report(scores: list[tuple[str, float, float]]) -> dict:
    """[(type, dice, iou)] -> {"dice", "iou", "n", "by_type": {type: {"dice", "iou", "n"}}} (means)."""
    def summary(rows):
        return {"dice": float(np.mean([r[1] for r in rows])) if rows else float("nan"),
                "iou": float(np.mean([r[2] for r in rows])) if rows else float("nan"), "n": len(rows)}
    out = summary(scores)
    out["by_type"] = {t: summary([r for r in scores if r[0] == t]) for t in sorted({r[0] for r in scores})}
    return out


def class_counts(ex: SamExamples) -> dict[str, int]:
    return {t: sum(1 for l in ex.lesions if l.type == t) for t in sorted({l.type for l in ex.lesions})}


class EpochIterator:
    """Seeded shuffled batches of example indices, resumable from `state()`.

    Epoch e visits a permutation drawn from numpy's Generator seeded with (seed, e); each batch
    takes the next `batch_size` indices; an epoch's remainder is dropped (static shapes). The state
    is {"epoch", "position"} (JSON), saved in every run checkpoint.
    """

    def __init__(self, n: int, batch_size: int, seed: int, state: dict | None = None):
        if n < batch_size:
            raise SamDataError(f"{n} training examples cannot fill one batch of {batch_size}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.epoch, self.position = 0, 0
        if state is not None:
            self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._perm_epoch, self._perm = -1, None

    @property
    def steps_per_epoch(self) -> int:
        return self.n // self.batch_size

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        if self.position + self.batch_size > self.n:
            self.epoch, self.position = self.epoch + 1, 0
        if self._perm_epoch != self.epoch:
            self._perm = np.random.default_rng((self.seed, self.epoch)).permutation(self.n)
            self._perm_epoch = self.epoch
        out = self._perm[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return out
