"""Automatic mask generation with SAM ("SAM without a box"), as pure functions.

What `segment_anything.SamAutomaticMaskGenerator` does with crop_n_layers=0 and
min_mask_region_area=0, with static shapes under jit:

1. a regular grid of points_per_side^2 foreground point prompts over the image (`point_grid`),
2. three masks per point (multimask), logits brought to the original image size,
3. keep masks whose predicted IoU > pred_iou_thresh and whose `stability_score` >=
   stability_score_thresh (each filter only when its threshold is > 0, as the official),
4. box non-maximum suppression on the masks' boxes ranked by predicted IoU (`mask_nms`),
5. the first max_masks survivors, padded to a fixed count K with a validity mask.

Not done here (the official options that are left out): image crops (crop_n_layers > 0, and so
crop NMS and the crop-edge box filter, which never fires without crops), small-region and hole
removal (min_mask_region_area > 0) and RLE outputs. One difference by design: empty masks are never
returned (the official keeps them, with box [0, 0, 0, 0], when stability_score_thresh <= 0; with a
positive threshold their stability is 0 or NaN and both drop them).

Frames: boxes are (x0, y0, x1, y1) in original-image pixels, pixel i covering [i, i + 1), so a mask
whose last column is c has x1 = c + 1. (The official `batched_mask_to_box` gives the indices of the
first and last pixels instead, i.e. ours minus (0, 0, 1, 1); NMS here uses those index boxes so that
its IoUs, and thus its choices, are the official ones.) Points are (x, y) in the same frame.

Precision: stability scores count pixels near +-offset, so with a small offset they move with
TF32 matmuls/convolutions on GPUs; for comparisons run float32 at full precision
(jax_default_matmul_precision="highest"; torch's allow_tf32 off), as the parity checks do.

Typical use (model = mskjax.models.sam.build_sam(arch), variables from mskjax.weights.sam):

    out = generate(model, variables, image_uint8, points_per_side=16, max_masks=64)
    for k in np.flatnonzero(out["valid"]): use(out["masks"][k], out["boxes"][k])
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from mskjax.models.sam.sam import MASK_THRESHOLD, Sam
from mskjax.sam import decode, embed, postprocess, preprocess, preprocessing_of, transform_points

# One index box = official box; our edge boxes are this much bigger at x1 and y1.
_INDEX_TO_EDGE = np.asarray([0.0, 0.0, 1.0, 1.0], np.float32)


def point_grid(n_per_side: int) -> np.ndarray:
    """(n^2, 2) float64 points (x, y) in [0, 1]^2: cell centres of an n x n grid, x fastest
    (row-major over y), the official `build_point_grid`'s points in its order."""
    n = int(n_per_side)
    if n < 1:
        raise ValueError(f"points_per_side must be >= 1, got {n_per_side}")
    half_cell = 0.5 / n
    side = np.linspace(half_cell, 1.0 - half_cell, n)  # linspace, not (i + 0.5) / n: same bits
    ys, xs = np.meshgrid(side, side, indexing="ij")
    return np.stack([xs.reshape(-1), ys.reshape(-1)], axis=-1)


def stability_score(logits: jax.Array, threshold: float = MASK_THRESHOLD,
                    offset: float = 1.0) -> jax.Array:
    """IoU of the masks (logits > threshold + offset) and (logits > threshold - offset), over the
    last two axes: (..., H, W) float -> (...) float32. The first mask lies inside the second, so
    this is a ratio of pixel counts; NaN where both are empty (0 / 0), as the official."""
    high = jnp.sum(logits > threshold + offset, axis=(-2, -1), dtype=jnp.int32)
    low = jnp.sum(logits > threshold - offset, axis=(-2, -1), dtype=jnp.int32)
    return high.astype(jnp.float32) / low.astype(jnp.float32)


def masks_to_boxes(masks: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Tight boxes around binary masks (..., H, W) -> (boxes (..., 4) float32, valid (...) bool).

    Boxes are (x0, y0, x1, y1) in the masks' pixel frame, pixel i covering [i, i + 1): x0 is the
    first column with a pixel set, x1 one past the last. Empty masks get valid False and box zeros.
    """
    masks = jnp.asarray(masks, bool)
    h, w = masks.shape[-2:]
    rows = jnp.any(masks, axis=-1)  # (..., H)
    cols = jnp.any(masks, axis=-2)  # (..., W)
    ys, xs = jnp.arange(h), jnp.arange(w)
    y0 = jnp.min(jnp.where(rows, ys, h), axis=-1)
    y1 = jnp.max(jnp.where(rows, ys + 1, 0), axis=-1)
    x0 = jnp.min(jnp.where(cols, xs, w), axis=-1)
    x1 = jnp.max(jnp.where(cols, xs + 1, 0), axis=-1)
    valid = jnp.any(rows, axis=-1)
    boxes = jnp.stack([x0, y0, x1, y1], axis=-1).astype(jnp.float32)
    return jnp.where(valid[..., None], boxes, 0.0), valid


def box_iou_one_to_many(box: jax.Array, boxes: jax.Array) -> jax.Array:
    """IoU of one box (4,) with boxes (N, 4), xyxy, area (x1 - x0) * (y1 - y0) as torchvision's
    nms; 0 / 0 (two degenerate boxes) gives NaN, which never exceeds a threshold."""
    ix0 = jnp.maximum(box[0], boxes[:, 0])
    iy0 = jnp.maximum(box[1], boxes[:, 1])
    ix1 = jnp.minimum(box[2], boxes[:, 2])
    iy1 = jnp.minimum(box[3], boxes[:, 3])
    inter = jnp.maximum(ix1 - ix0, 0.0) * jnp.maximum(iy1 - iy0, 0.0)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / (area + areas - inter)


def mask_nms(boxes: jax.Array, scores: jax.Array, valid: jax.Array, iou_threshold: float,
             max_out: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Greedy box NMS with a static output size (torchvision.ops.nms's rule, one category).

    boxes (N, 4) xyxy float, scores (N,), valid (N,) bool (invalid entries, and entries with a NaN
    score, are neither kept nor suppress others). Candidates are visited by decreasing score (ties:
    lower index first); one is kept unless an already kept box has IoU > iou_threshold with it.
    Returns (indices (max_out,) int32 into the inputs, in keep order = decreasing score;
    keep_valid (max_out,) bool; num_kept () int32, the number of survivors, which may exceed
    max_out, in which case only the first max_out are listed). Padding entries have index 0.
    A `lax.fori_loop` over the N sorted candidates, O(N^2) box comparisons; jit-able.
    """
    boxes = jnp.asarray(boxes, jnp.float32)
    scores = jnp.asarray(scores, jnp.float32)
    n = boxes.shape[0]
    if boxes.shape != (n, 4) or scores.shape != (n,) or jnp.shape(valid) != (n,):
        raise ValueError(f"mask_nms wants boxes (N, 4), scores (N,), valid (N,); got "
                         f"{boxes.shape}, {scores.shape}, {jnp.shape(valid)}")
    if max_out < 1:
        raise ValueError(f"max_out must be >= 1, got {max_out}")
    valid = jnp.asarray(valid, bool) & ~jnp.isnan(scores)
    order = jnp.argsort(jnp.where(valid, -scores, jnp.inf), stable=True)
    sorted_boxes, sorted_valid = boxes[order], valid[order]
    later = jnp.arange(n)

    def visit(i, suppressed):
        alive = sorted_valid[i] & ~suppressed[i]
        overlap = box_iou_one_to_many(sorted_boxes[i], sorted_boxes) > iou_threshold
        return suppressed | (overlap & (later > i) & alive)

    suppressed = jax.lax.fori_loop(0, n, visit, ~sorted_valid)
    kept = ~suppressed  # in sorted order
    # Kept positions first, in sorted (score) order; then pad to max_out.
    first = jnp.argsort(suppressed, stable=True)[:max_out]
    keep_valid = kept[first]
    indices = jnp.where(keep_valid, order[first], 0).astype(jnp.int32)
    if max_out > n:
        pad = max_out - n
        indices = jnp.concatenate([indices, jnp.zeros((pad,), jnp.int32)])
        keep_valid = jnp.concatenate([keep_valid, jnp.zeros((pad,), bool)])
    return indices, keep_valid, jnp.sum(kept, dtype=jnp.int32)


def _prompt_points(points_per_side: int, points_per_batch: int, original_size: tuple[int, int],
                   img_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Grid points in the original frame (P, 2) float32, and in the SAM input frame padded to
    batches (nb, pb, 2) float32 with their validity (nb, pb)."""
    h, w = original_size
    original = point_grid(points_per_side) * np.asarray([w, h], np.float64)  # official: grid * (W, H)
    sam_frame = transform_points(original, original_size, img_size)
    p = original.shape[0]
    nb = -(-p // points_per_batch)
    padded = np.zeros((nb * points_per_batch, 2), np.float32)
    padded[:p] = sam_frame
    valid = np.arange(nb * points_per_batch) < p
    return (original.astype(np.float32), padded.reshape(nb, points_per_batch, 2),
            valid.reshape(nb, points_per_batch))


def _chunked_mask_stats(low_res_logits: jax.Array, input_size: tuple[int, int],
                        original_size: tuple[int, int], img_size: int, offset: jax.Array,
                        chunk_size: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Stability (N,), edge boxes (N, 4) and non-emptiness (N,) of masks given as low-res logits
    (N, L, L), measured at the original size; chunk_size masks at a time (sequential, to bound the
    memory of the original-size logits)."""
    n = low_res_logits.shape[0]
    chunk_size = max(1, min(chunk_size, n))
    n_chunks = -(-n // chunk_size)
    padded = jnp.pad(low_res_logits, ((0, n_chunks * chunk_size - n), (0, 0), (0, 0)))

    def one_chunk(low_res):
        logits = postprocess(low_res, input_size, original_size, img_size, return_logits=True)
        boxes, nonempty = masks_to_boxes(logits > MASK_THRESHOLD)
        return stability_score(logits, MASK_THRESHOLD, offset), boxes, nonempty

    stats = jax.lax.map(one_chunk, padded.reshape(n_chunks, chunk_size, *padded.shape[1:]))
    return tuple(x.reshape(n_chunks * chunk_size, *x.shape[2:])[:n] for x in stats)


def select_masks(low_res_logits: jax.Array, predicted_iou: jax.Array, candidate_valid: jax.Array,
                 pred_iou_thresh, stability_score_thresh, stability_score_offset, box_nms_thresh, *,
                 input_size: tuple[int, int], original_size: tuple[int, int], img_size: int,
                 max_masks: int, chunk_size: int = 192) -> dict:
    """Filter and de-duplicate N candidate masks of one image; the official AMG's steps after the
    model (filters, boxes, NMS) without crops.

    low_res_logits (N, L, L) float over the padded SAM input (from `mskjax.sam.decode`);
    predicted_iou (N,); candidate_valid (N,) bool (False for padding prompts). A candidate is kept
    if valid, its mask (logits > 0 at the original size) is not empty, predicted_iou >
    pred_iou_thresh (when that is > 0) and its stability score at the original size (offset
    stability_score_offset) >= stability_score_thresh (when that is > 0); then `mask_nms` on the
    boxes, ranked by predicted IoU, at IoU box_nms_thresh. Thresholds may be traced; sizes and
    max_masks are static (input_size (h, w) of the resized image, original_size (H, W)).

    Returns {"index": (K,) int32 into the N candidates, "masks": (K, H, W) bool, "boxes": (K, 4)
    float32 edge boxes in the original frame, "predicted_iou", "stability_score": (K,) float32,
    "valid": (K,) bool, "num_kept": () int32}, K = max_masks, padding zeroed.
    """
    stability, boxes, nonempty = _chunked_mask_stats(
        low_res_logits, input_size, original_size, img_size, stability_score_offset, chunk_size)
    candidate = jnp.asarray(candidate_valid, bool) & nonempty
    # Official filters: each only when its threshold is positive; '>' for IoU, '>=' for stability.
    candidate &= jnp.where(pred_iou_thresh > 0, predicted_iou > pred_iou_thresh, True)
    candidate &= jnp.where(stability_score_thresh > 0, stability >= stability_score_thresh, True)

    index_boxes = boxes - _INDEX_TO_EDGE  # the official's boxes, for the official's IoUs
    keep, valid, num_kept = mask_nms(index_boxes, predicted_iou, candidate, box_nms_thresh,
                                     max_masks)
    masks = postprocess(low_res_logits[keep], input_size, original_size, img_size)
    return {
        "index": keep,
        "masks": masks & valid[:, None, None],
        "boxes": jnp.where(valid[:, None], boxes[keep], 0.0),
        "predicted_iou": jnp.where(valid, predicted_iou[keep], 0.0).astype(jnp.float32),
        "stability_score": jnp.where(valid, stability[keep], 0.0),
        "valid": valid,
        "num_kept": num_kept,
    }


@partial(jax.jit, static_argnums=(0,), static_argnames=(
    "input_size", "original_size", "points_per_side", "points_per_batch", "max_masks"))
def generate_from_input(model: Sam, variables: dict, image: jax.Array, pred_iou_thresh: jax.Array,
                        stability_score_thresh: jax.Array, stability_score_offset: jax.Array,
                        box_nms_thresh: jax.Array, *, input_size: tuple[int, int],
                        original_size: tuple[int, int], points_per_side: int,
                        points_per_batch: int, max_masks: int) -> dict:
    """`generate` on one preprocessed image (1, S, S, 3) (from `mskjax.sam.preprocess`).

    Sizes and counts are static (one compilation per image size and setting); the four thresholds
    are traced, so changing them does not recompile. Returns the dict described in `generate`.
    """
    s = model.config.img_size
    points, prompts, prompt_valid = _prompt_points(points_per_side, points_per_batch,
                                                   original_size, s)
    emb = embed(model, variables, image)
    labels = jnp.ones((1, points_per_batch, 1), jnp.int32)  # one foreground point per prompt

    def one_batch(batch):
        pts, pv = batch
        out = decode(model, variables, emb, points=pts[None, :, None, :], point_labels=labels,
                     prompt_valid=pv[None], multimask=True)
        return out["low_res_logits"][0], out["iou_predictions"][0]  # (pb, M, L, L), (pb, M)

    # Sequential over prompt batches, as the official (bounds decoder memory).
    low_res, iou = jax.lax.map(one_batch, (jnp.asarray(prompts), jnp.asarray(prompt_valid)))
    n_masks = low_res.shape[2]
    # Candidates in the official order: point-major, then the M masks of each point.
    low_res = low_res.reshape(-1, *low_res.shape[3:])
    candidate = jnp.repeat(jnp.asarray(prompt_valid).reshape(-1), n_masks)
    out = select_masks(low_res, iou.reshape(-1), candidate, pred_iou_thresh,
                       stability_score_thresh, stability_score_offset, box_nms_thresh,
                       input_size=input_size, original_size=original_size, img_size=s,
                       max_masks=max_masks, chunk_size=points_per_batch * n_masks)
    index = out.pop("index")
    out["points"] = jnp.where(out["valid"][:, None], jnp.asarray(points)[index // n_masks], 0.0)
    return out


def generate(model: Sam, variables: dict, image_uint8: np.ndarray, points_per_side: int = 16,
             points_per_batch: int = 64, pred_iou_thresh: float = 0.88,
             stability_score_thresh: float = 0.95, stability_score_offset: float = 1.0,
             box_nms_thresh: float = 0.7, max_masks: int = 64) -> dict:
    """Masks for everything in one image, prompted by a grid of points (no boxes needed).

    image_uint8: (H, W) grayscale, (H, W, 1) or (H, W, 3) RGB uint8 in the original frame.
    points_per_side^2 point prompts, run points_per_batch at a time; see the module docstring for
    the filters and what is left out. Host-side preprocessing (the model's own recipe,
    `mskjax.sam.preprocessing_of`: SAM's PIL resize, or LiteMedSAM's), then one jitted call
    (compiled once per image size and static setting).

    Returns a dict of arrays with K = max_masks:
      masks (K, H, W) bool at the original size; boxes (K, 4) float32 xyxy, original pixels,
      pixel i covering [i, i + 1); predicted_iou (K,) float32; stability_score (K,) float32;
      points (K, 2) float32 (x, y) original pixels, the prompt that gave each mask;
      valid (K,) bool, True for the first min(num_kept, K) entries, which are sorted by decreasing
      predicted IoU (padding: False, zero arrays); num_kept () int32, how many masks survived NMS
      (more than K means the K listed are the best K by predicted IoU, the rest are cut).
    Memory: the low-res logits of all 3 * points_per_side^2 masks ((img_size / 4)^2 float32 each),
    plus points_per_batch * 3 original-size logits at a time.
    """
    image = np.asarray(image_uint8)
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (1, 3))):
        raise ValueError(f"generate takes one image (H, W), (H, W, 1) or (H, W, 3), got shape "
                         f"{image.shape}")
    for name, v in (("points_per_side", points_per_side), ("points_per_batch", points_per_batch),
                    ("max_masks", max_masks)):
        if int(v) != v or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    for name, v in (("pred_iou_thresh", pred_iou_thresh),
                    ("stability_score_thresh", stability_score_thresh),
                    ("stability_score_offset", stability_score_offset),
                    ("box_nms_thresh", box_nms_thresh)):
        if not np.isfinite(v):
            raise ValueError(f"{name} must be a finite number, got {v!r}")
    batch = preprocess(image, model.config.img_size, preprocessing_of(model))
    f32 = partial(jnp.asarray, dtype=jnp.float32)
    return generate_from_input(
        model, variables, jnp.asarray(batch.images), f32(pred_iou_thresh),
        f32(stability_score_thresh), f32(stability_score_offset), f32(box_nms_thresh),
        input_size=tuple(int(v) for v in batch.input_sizes[0]),
        original_size=tuple(int(v) for v in batch.original_sizes[0]),
        points_per_side=int(points_per_side), points_per_batch=int(points_per_batch),
        max_masks=int(max_masks))
