"""classify -> CAM -> boxes -> SAM masks: two jitted functions per batch (SAM's image encoder, then
the rest), with static shapes.

    pipe = Pipeline.from_directories("runs/synthetic/best", "runs/sam/best")
    for result in pipe.run(items, batch_size=8):        # items: [Item(path=...), ...]
        result.probability, result.boxes, result.mask   # original-image frame

Frames (boxes are (x0, y0, x1, y1) float pixels, pixel i covers [i, i + 1)):

* original: the decoded radiograph (H0, W0) (`mskjax.data.images.decode_image`, EXIF applied);
* classifier input: (S, S), made by `mskjax.data.preprocess.preprocess` with the checkpoint's
  `data.mode` ("resize" squashes, "letterbox" centres and pads) and `input_size`; its
  `mskjax.geometry.Geometry` maps between the two;
* SAM input: the original resized so its long side is SAM's img_size T, zero-padded bottom/right
  (`mskjax.sam.preprocess` with the segmenter's own recipe, `mskjax.sam.preprocessing_of`: SAM's
  bilinear resize and mean/std, or LiteMedSAM's INTER_AREA resize and min-max at T = 256);
  `mskjax.sam.transform_boxes` maps original -> SAM, and `mskjax.sam.postprocess_host` maps its
  masks back (the one postprocess for both).

Host side (outside the jit): decoding, classifier input and geometry, SAM input, padding a short
batch, and afterwards mapping maps and masks back to each image's own original size. Jitted: SAM's
image embeddings (`Pipeline._embed`, compiled alone with `mskjax.passes.encoder_compiler_options`:
on CPU that is faster for the encoder and not for the rest), then one step (`make_step`):
probability, CAM of the abnormal class, boxes in the classifier frame, the same boxes in the
original and SAM frames, and box-prompted masks (multimask off). `make_step(embedded=False)` also
runs the encoder inside the step, in one executable.

Static shapes: every batch has B images (a short last batch is padded, `valid` False), K CAM
boxes per image (1 for "peak", `max_boxes` for "threshold", with validity) and G ground-truth
boxes (0 when there are none). An image judged normal (probability < threshold) gets its prompts
marked invalid: SAM still runs on it (static shapes) but its masks come out empty by construction
(`mskjax.sam.INVALID_PROMPT_LOGIT`), not by a Python branch.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from mskjax import boxes as boxlib
from mskjax import cam as camlib
from mskjax import checkpoint
from mskjax import deletion_choice as dchoice
from mskjax import geometry as geo
from mskjax import sam as samfn
from mskjax.classifier import GrayAsRGB, abnormal_class, normalization_from_metadata, prepare_images, probabilities
from mskjax.data.images import decode_image
from mskjax.data.preprocess import preprocess
from mskjax.embedding_cache import EmbeddingCache, encoder_fingerprint
from mskjax.fill import fill_masked
from mskjax.passes import encoder_compiler_options
from mskjax.sam_auto import masks_to_boxes

BOX_METHODS = ("peak", "threshold")
MULTIMASK = ("single", "best_iou", "map")  # PipelineConfig.multimask
GATES = ("image", "study")  # PipelineConfig.gate
PEAK_CHOICES = ("union", "iou", "confidence", "map")  # PipelineConfig.choose among peaks > 1 candidates
CHOICES = ("first", "deletion") + PEAK_CHOICES  # PipelineConfig.choose
MAP_POINTS = ("none", "peak", "negative", "peak_negative")  # PipelineConfig.map_points


def mean_inside_mask(values: jax.Array, logits: jax.Array) -> jax.Array:
    """The mean of `values` (broadcast to logits' shape (..., L, L)) over each mask's pixels
    (logits > 0) -> (...); 0 for an empty mask."""
    inside = (logits > 0.0).astype(jnp.float32)
    return jnp.sum(values * inside, axis=(-2, -1)) / jnp.maximum(jnp.sum(inside, axis=(-2, -1)), 1.0)


def chosen_masks(dec: dict, multimask: str, map_low: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(low-res logits (B, P, L, L), predicted IoU (B, P)) from `mskjax.sam.decode` output: its only
    mask ("single"), or of its M masks the one with the highest predicted IoU ("best_iou"), or the
    one holding the highest mean map ("map": map_low (B, L, L), the map on SAM's low-res grid,
    `map_in_sam_frame`, averaged over each mask's pixels; an empty mask scores 0)."""
    low, iou = dec["low_res_logits"], dec["iou_predictions"]
    if multimask == "single":
        return low[:, :, 0], iou[:, :, 0]
    if multimask == "map":
        best = jnp.argmax(mean_inside_mask(map_low[:, None, None], low), axis=-1)  # (B, P)
    else:
        best = jnp.argmax(iou, axis=-1)  # (B, P)
    return (jnp.take_along_axis(low, best[:, :, None, None, None], axis=2)[:, :, 0],
            jnp.take_along_axis(iou, best[:, :, None], axis=2)[:, :, 0])


def peak_choice_scores(rule: str, low: jax.Array, iou: jax.Array, low_mirrored: jax.Array | None,
                       map_low) -> jax.Array:
    """(B, K) float32 scores of K candidate masks for PipelineConfig.choose = rule (higher is kept).

    low (B, K, L, L) SAM low-res logits (SAM input frame); iou (B, K) predicted IoU; low_mirrored
    (B, K, L, L) the mirrored view's logits or None; map_low the map on SAM's low-res grid
    (B, L, L) (`map_in_sam_frame`; needed only for rule "map"). A mask with no pixel (no logit > 0)
    scores 0 under "confidence" and "map"."""
    if rule == "iou":
        return iou.astype(jnp.float32)
    if rule == "confidence":
        conf = mean_inside_mask(jax.nn.sigmoid(low), low)
        if low_mirrored is not None:  # each view's own mask; a mean of frame-free numbers
            conf = (conf + mean_inside_mask(jax.nn.sigmoid(low_mirrored), low_mirrored)) / 2.0
        return conf
    if rule == "map":
        return mean_inside_mask(map_low[:, None], low)
    raise PipelineError(f"no score for choice {rule!r}")


class PipelineError(ValueError):
    """A pipeline that cannot be built as asked (unknown CAM method, wrong checkpoint kind ...)."""


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """What the jitted step does (all fields static: changing one recompiles).

    cam: a method of `mskjax.cam.METHODS` (default "grad_cam"), computed for the abnormal class.
    cam_layer: stage name for the CAM (None: the last feature map), or stage names joined by "+"
      to fuse their maps (`mskjax.cam.fused_maps`).
    boxes: "peak" (the report's square box around the CAM maximum: 50 px at a 224 px input,
      scaled to the classifier's input size; box_side overrides) or "threshold" (connected
      components of CAM >= box_fraction * max, the best max_boxes by CAM mass, with validity).
    threshold: an image is abnormal when its probability >= threshold; only abnormal images get
      masks.
    gate: which decision gives an image its masks: "image" (its own probability >= threshold) or
      "study" (its study's probability, the mean of the study's image probabilities as
      `mskjax.segment` reports it, >= threshold: every image of a study called abnormal is
      segmented, none of a study called normal). MURA labels studies, and a study's views share its
      abnormality; `Pipeline.run` then reads every image twice (probabilities first, in a
      classifier-only pass), and `make_step`'s batch carries study_abnormal (B,) bool.
    subtract_baseline: subtract the classifier checkpoint's stored baseline map (metadata
      "localization": the mean raw map of the validation split's normal images, written by
      `mskjax.train` with eval.subtract_normal_mean) from the raw map before post-processing; the
      checkpoint's method and layer must be this config's. Single-stage maps only.
    refine: number of extra SAM passes over the map-derived prompts: each pass prompts SAM again
      with the tight box of the mask the previous pass gave (a prompt whose mask came out empty
      keeps its box). A map's box is loose; a segmenter trained on tight boxes does best on one.
    peak_point: with a SAM trained with `data.peak_point` (checkpoint metadata "peak_point"), the
      "peak" box also carries the map's peak as a positive point, as that SAM was trained; False
      leaves the point out (a padding point instead). Ground-truth boxes, refine passes and
      "threshold" boxes always get the padding point from such a SAM (as it was trained for tight
      boxes). No effect on a SAM trained without points.
    multimask: "single" (SAM's single-mask output, as the project's SAMs are trained), "best_iou"
      (SAM's three multimask outputs, the one with the highest predicted IoU: SAM's own choice for
      an ambiguous prompt) or "map" (of the three, the one holding the highest mean of the
      classifier's map, sampled on SAM's low-res grid: its agreement with the map), for every prompt
      and pass. "map" takes no mirror_average (the mirrored view's masks would need the map mirrored).
    box_margin: grow every box SAM is first prompted with (map-derived and ground-truth) by this
      many original-frame pixels on each side, clipped to the image. A decoder fine-tuned on
      outward-jittered boxes (MedSAM's recipe) expects boxes a little larger than tight ones.
    choose: "first" (the mask SAM gives for the map's box) or "deletion" ("peak" boxes only): SAM
      is also prompted with sub-boxes tiling the map's box (`choice_scales`,
      `mskjax.deletion_choice.candidate_boxes`), each candidate mask is removed from the
      classifier's input (filled in from around it) and the classifier run again; the mask whose
      removal lowers the abnormal probability most, less `choice_area_penalty` times its share of
      the input, is kept (then refined, when asked). With peaks > 1, one of PEAK_CHOICES picks
      among the peaks' masks (one SAM decode per peak; a peak's score is -inf where it has no box):
      "union" keeps every peak's mask (the image's mask is their union), "iou" the mask with the
      highest predicted IoU (SAM's IoU head), "confidence" the mask whose pixels SAM is surest of
      (the mean sigmoid of its low-res logits where they are > 0; the two views' mean with
      mirror_average), "map" the mask holding the highest mean map (the map sampled on SAM's
      low-res grid, `map_in_sam_frame`, averaged over the first view's mask pixels).
    peaks: the number of the map's peaks prompted ("peak" boxes only): the first is the map's peak,
      each later one the highest map pixel at least peak_separation x the classifier's input side
      from every earlier one (`mskjax.boxes.separated_peaks`); each gets the same square box (and,
      for a SAM trained on maps, the map inside it). A map's highest peak misses the abnormality on
      some images where its second is on it (issue 18); `choose` says which mask to keep. The
      pointing game still scores the first peak.
    map_mask_prompt: 0 (off) or t in (0, 1]: for a SAM trained with boxes also given as mask
      prompts (checkpoint metadata "box_mask_prompt"), the map-derived box's mask prompt keeps only
      the low-res cells where the map is at least t times its maximum (`map_in_sam_frame`), so the
      dense prompt says where in the box the map points. Ground-truth boxes and refine passes keep
      the plain box mask.
    map_prompt: for a SAM trained on the classifier's own maps (checkpoint metadata "map_prompt",
      `data.map_prompts` in mskjax.train.sam), the map-derived box's dense prompt is the map inside
      that box (`mskjax.sam.map_prompt`), as it was trained; the pipeline's map and box must then
      be the ones it was trained with (PipelineError otherwise). False gives that box the plain
      box mask instead. No effect on other SAMs.
    map_flips: "none", "h" or "hv": the map is the mean of the classifier's maps of its input as
      given and flipped (left-right; or left-right, up-down and both: four views), each flipped
      back in the classifier's frame, then scaled to a maximum of 1 inside the content
      (`mskjax.cam.flip_mean`). A network
      that encodes absolute position (zero padding, no augmentation) adds a position-dependent
      pattern to its map (issue 18); in the mean of mirrored views the pattern's odd part cancels
      while the abnormality, which moves with the image, stays. The classifier runs 2 or 4 times
      for the map; the probability is the unflipped input's unless probability_flips asks. Not
      with subtract_baseline (a stored map of unflipped inputs).
    probability_flips: "none", "h" or "hv": the probability (and so the abnormal decision against
      threshold) is the mean of the classifier's probabilities of the input as given and flipped
      (the views map_flips names, chosen apart from it; the whole classifier input is flipped,
      letterbox padding with it; test-time augmentation: one more forward pass per view). "logits"
      stay the unflipped input's, and choose="deletion" compares each removal with the unflipped
      input's probability (the removals are not flipped). A threshold chosen for one setting is
      not the threshold for another.
    mirror_average: SAM also segments each image mirrored left-right (its input mirrored inside the
      image, `mskjax.sam.mirror_columns`, and every first-pass prompt with it: boxes, points, the map
      prompt), and the two views' logits are averaged in the original frame (test-time
      augmentation; the project's SAMs train with left-right flips). Map-derived and ground-truth
      prompts alike; the classifier and its map are not mirrored. Twice SAM's encoder work. Not
      with refine passes, choose="deletion" or map_mask_prompt (which act on one view's masks or
      low-res grid).
    map_points: point prompts from the map beside each map-derived box, for a SAM trained without
      points of its own recipe (not one trained with `data.peak_point`, whose point rule is
      peak_point): "none"; "peak" (the map's peak, a positive point); "negative" (negative_points
      negative points where the map is lowest inside the box, `mskjax.boxes.lowest_points` on a
      5 x 5 grid, image content only); "peak_negative" (both). SAM's prompt encoder was trained
      with positive and negative clicks; a box alone leaves it to guess which structure in a loose
      box is meant. Ground-truth boxes get no points (decoded apart, so their masks are those of a
      box alone); refine passes keep the first pass's points. "peak" boxes only; not with
      choose="deletion".
    negative_points: how many negative points map_points "negative" / "peak_negative" gives (1..25).
    """

    cam: str = "grad_cam"
    cam_layer: str | None = None
    boxes: str = "peak"
    threshold: float = 0.5
    gate: str = "image"
    box_side: float | None = None
    box_fraction: float = 0.5
    max_boxes: int = 3
    refine: int = 0
    subtract_baseline: bool = False
    peak_point: bool = True
    multimask: str = "single"
    box_margin: float = 0.0
    choose: str = "first"
    peaks: int = 1
    peak_separation: float = 0.1875
    choice_scales: tuple = (1.0, 0.5, 0.33)
    choice_area_penalty: float = 1.0
    map_mask_prompt: float = 0.0
    map_prompt: bool = True
    map_flips: str = "none"
    mirror_average: bool = False
    probability_flips: str = "none"
    map_points: str = "none"
    negative_points: int = 2

    def __post_init__(self):
        if self.cam not in camlib.METHODS:
            raise PipelineError(f"unknown CAM method {self.cam!r}: expected one of {list(camlib.METHODS)}")
        if self.cam_layer and "+" in self.cam_layer and self.cam in ("cam", "score_cam"):
            raise PipelineError(f"cam_layer {self.cam_layer!r} fuses stages; {self.cam!r} takes one stage")
        if self.boxes not in BOX_METHODS:
            raise PipelineError(f"unknown box method {self.boxes!r}: expected one of {list(BOX_METHODS)}")
        if self.max_boxes < 1:
            raise PipelineError(f"max_boxes must be >= 1, got {self.max_boxes}")
        if self.subtract_baseline and (self.cam == "score_cam" or (self.cam_layer and "+" in self.cam_layer)):
            raise PipelineError("subtract_baseline takes a single-stage gradient map, not score_cam or fused stages")
        if self.gate not in GATES:
            raise PipelineError(f"unknown gate {self.gate!r}: expected one of {list(GATES)}")
        if self.refine < 0:
            raise PipelineError(f"refine must be >= 0, got {self.refine}")
        if not (self.box_margin >= 0.0 and np.isfinite(self.box_margin)):
            raise PipelineError(f"box_margin must be a finite number >= 0, got {self.box_margin}")
        if self.multimask not in MULTIMASK:
            raise PipelineError(f"unknown multimask choice {self.multimask!r}: expected one of {list(MULTIMASK)}")
        if self.multimask == "map" and self.mirror_average:
            raise PipelineError("multimask='map' chooses by the map in the first view's frame: not with mirror_average")
        if self.choose not in CHOICES:
            raise PipelineError(f"unknown mask choice {self.choose!r}: expected one of {list(CHOICES)}")
        if self.choose == "deletion" and self.boxes != "peak":
            raise PipelineError("choose='deletion' tiles the map's peak box: it needs boxes='peak'")
        if self.peaks < 1:
            raise PipelineError(f"peaks must be >= 1, got {self.peaks}")
        if self.peaks > 1 and self.boxes != "peak":
            raise PipelineError(f"peaks={self.peaks} prompts the map's peaks: it needs boxes='peak'")
        if (self.peaks > 1) != (self.choose in PEAK_CHOICES):
            raise PipelineError(f"choose={self.choose!r} with peaks={self.peaks}: peaks > 1 needs a choice among "
                                f"peaks ({list(PEAK_CHOICES)}), and those need peaks > 1")
        if not (0.0 < self.peak_separation <= 1.0):
            raise PipelineError(f"peak_separation must be a fraction of the input side in (0, 1], got "
                                f"{self.peak_separation}")
        if not self.choice_scales or not all(0.0 < float(v) <= 1.0 for v in self.choice_scales):
            raise PipelineError(f"choice_scales must be fractions in (0, 1], got {self.choice_scales}")
        if not (self.choice_area_penalty >= 0.0 and np.isfinite(self.choice_area_penalty)):
            raise PipelineError(f"choice_area_penalty must be a finite number >= 0, got {self.choice_area_penalty}")
        if not (0.0 <= self.map_mask_prompt <= 1.0):
            raise PipelineError(f"map_mask_prompt must be 0 (off) or in (0, 1], got {self.map_mask_prompt}")
        if not 0.0 < self.box_fraction <= 1.0:
            raise PipelineError(f"box_fraction must be in (0, 1], got {self.box_fraction}")
        if self.map_flips not in camlib.FLIPS:
            raise PipelineError(f"unknown map_flips {self.map_flips!r}: expected one of {list(camlib.FLIPS)}")
        if self.probability_flips not in camlib.FLIPS:
            raise PipelineError(f"unknown probability_flips {self.probability_flips!r}: expected one of "
                                f"{list(camlib.FLIPS)}")
        if self.map_flips != "none" and self.subtract_baseline:
            raise PipelineError("map_flips averages maps of flipped inputs; subtract_baseline's stored map is of unflipped "
                                "inputs: use one")
        if self.mirror_average and (self.refine or self.choose == "deletion" or self.map_mask_prompt > 0):
            raise PipelineError("mirror_average averages the first pass's two views: it takes no refine passes, "
                                f"choose='deletion' or map_mask_prompt (got refine={self.refine}, "
                                f"choose={self.choose!r}, map_mask_prompt={self.map_mask_prompt})")
        if self.map_points not in MAP_POINTS:
            raise PipelineError(f"unknown map_points {self.map_points!r}: expected one of {list(MAP_POINTS)}")
        if self.map_points != "none" and (self.boxes != "peak" or self.choose == "deletion"):
            raise PipelineError(f"map_points={self.map_points!r} puts the map's points beside its peak boxes: it needs "
                                f"boxes='peak' and no choose='deletion' (got boxes={self.boxes!r}, "
                                f"choose={self.choose!r})")
        if not 1 <= self.negative_points <= 25:
            raise PipelineError(f"negative_points must be in 1..25 (a 5 x 5 grid), got {self.negative_points}")

    @property
    def num_boxes(self) -> int:
        """The map-derived boxes the map half gives per image (before a choice among peaks)."""
        return int(self.peaks) if self.boxes == "peak" else int(self.max_boxes)


# ---------------------------------------------------------------------------------------------
# The jitted step

def content_mask(geom: geo.Geometry) -> jax.Array:
    """(B, H, W) bool: pixels of the classifier input that hold image content (not letterbox
    padding). Traceable (batched geometry with (B,) fields)."""
    ch, cw = geom.content_hw
    rows = jnp.arange(geom.input_h, dtype=jnp.float32)[None, :, None]
    cols = jnp.arange(geom.input_w, dtype=jnp.float32)[None, None, :]
    top = jnp.asarray(geom.top, jnp.float32)[:, None, None]
    left = jnp.asarray(geom.left, jnp.float32)[:, None, None]
    return ((rows >= top) & (rows < top + jnp.asarray(ch)[:, None, None])
            & (cols >= left) & (cols < left + jnp.asarray(cw)[:, None, None]))


def content_bounds(geom: geo.Geometry) -> jax.Array:
    """(B, 4) float32 (x0, y0, x1, y1): the image content's box in the classifier input (the whole
    input for "resize", the unpadded part for "letterbox"). Traceable."""
    ch, cw = geom.content_hw
    top = jnp.asarray(geom.top, jnp.float32)
    left = jnp.asarray(geom.left, jnp.float32)
    return jnp.stack([left, top, left + jnp.asarray(cw, jnp.float32), top + jnp.asarray(ch, jnp.float32)], axis=-1)


def map_in_sam_frame(maps: jax.Array, geom: geo.Geometry, original_hw: jax.Array, img_size: int,
                     low_res_size: int) -> jax.Array:
    """Maps (B, S, S) in the classifier frame -> (B, L, L) on SAM's low-res grid (cell k covers SAM
    input pixels [k c, (k + 1) c), c = img_size / L), sampled bilinearly at each cell's centre;
    0 where the cell's centre lies outside the original image (SAM's padding). Traceable."""
    cell = img_size / low_res_size
    centres = (jnp.arange(low_res_size, dtype=jnp.float32) + 0.5) * cell
    ys, xs = jnp.meshgrid(centres, centres, indexing="ij")
    pts = jnp.stack([xs.ravel(), ys.ravel()], axis=-1)  # (L*L, 2) SAM frame
    hw = jnp.asarray(original_hw, jnp.float32)
    # SAM frame -> original: the inverse of mskjax.sam.transform_points' per-axis factors.
    factors = samfn.transform_points(jnp.ones((hw.shape[0], 1, 2), jnp.float32), hw, img_size)  # (B, 1, 2)
    orig = pts[None] / factors
    inside = ((orig[..., 0] >= 0) & (orig[..., 0] < hw[:, None, 1]) & (orig[..., 1] >= 0)
              & (orig[..., 1] < hw[:, None, 0]))
    grid = geo.points_to_input(orig, geom) - 0.5  # classifier pixel centres -> array coordinates

    def one(m, g):
        return jax.scipy.ndimage.map_coordinates(m, [g[:, 1], g[:, 0]], order=1, mode="nearest")

    sampled = jax.vmap(one)(maps.astype(jnp.float32), grid)
    return jnp.where(inside, sampled, 0.0).reshape(maps.shape[0], low_res_size, low_res_size)


def stored_baseline(classifier_meta: dict, config: PipelineConfig) -> np.ndarray:
    """The (h, w) float32 baseline map a classifier checkpoint stores for `config`'s map
    (metadata "localization"); PipelineError when it has none or it was made for another map."""
    loc = classifier_meta.get("localization") or {}
    if "baseline" not in loc:
        raise PipelineError("subtract_baseline: the classifier checkpoint stores no baseline map (train it with "
                            "eval.subtract_normal_mean=True)")
    if (loc.get("method"), loc.get("layer") or None) != (config.cam, config.cam_layer or None):
        raise PipelineError(f"subtract_baseline: the checkpoint's baseline is for {loc.get('method')} at "
                            f"{loc.get('layer') or 'the last feature map'}, not {config.cam} at "
                            f"{config.cam_layer or 'the last feature map'}")
    return np.asarray(loc["baseline"], np.float32)


def make_probability(classifier, config: PipelineConfig, normalization: dict, channels: int):
    """probability_of(classifier_variables, images (B, S, S, 1) float32 in [0, 1]) -> (x the
    normalised input (B, S, S, channels), logits (B, num_classes) of x as given, probability (B,):
    P(abnormal), the mean over x and its config.probability_flips views). Not jitted."""

    def probability_of(cvars, images):
        x = prepare_images(images, normalization, channels)
        logits = classifier.apply(cvars, x, train=False).astype(jnp.float32)
        prob = probabilities(logits)
        for axes in camlib.FLIPS[config.probability_flips]:  # test-time flips: the mean over the views
            prob = prob + probabilities(classifier.apply(cvars, jnp.flip(x, axes), train=False).astype(jnp.float32))
        return x, logits, prob / (1 + len(camlib.FLIPS[config.probability_flips]))

    return probability_of


def make_map_half(classifier, config: PipelineConfig, normalization: dict, channels: int, sam_img_size: int,
                  baseline: np.ndarray | None = None):
    """The classifier's half of the step (not yet jitted): probability, map and map-derived boxes.

    map_half(classifier_variables, batch) with batch as `make_step`'s (images, geometry,
    original_hw, valid, threshold, and study_abnormal with config.gate "study"; nothing of SAM's)
    returns a dict of arrays:
      logits (B, num_classes); probability (B,); abnormal (B,) bool (valid & p >= threshold, or
      valid & study_abnormal with config.gate "study");
      cam (B, S, S) in [0, 1] (classifier frame, zero on letterbox padding); peak_input (B, 2) the
      pointing game's peak; boxes_input (B, K, 4) classifier frame; boxes (B, K, 4) original frame
      (clipped); boxes_sam (B, K, 4) SAM frame (grown by config.box_margin, clipped); box_scores
      (B, K); box_valid (B, K) (a real, non-empty box of an abnormal image); peaks_input (B, K, 2)
      for "peak" boxes.
    `make_step` runs it first; `MapPrompter` runs it alone (a SAM trained on the classifier's maps).
    """
    cam_model = classifier if channels == 3 else GrayAsRGB(classifier, channels)
    target = abnormal_class(classifier.num_classes)

    def cam_maps(variables, x3, targets):
        if config.cam_layer and "+" in config.cam_layer:  # stages fused (mskjax.cam.fused_maps)
            return camlib.fused_maps(cam_model, variables, x3, targets, tuple(config.cam_layer.split("+")),
                                     methods=(config.cam,))[config.cam]
        if config.cam == "score_cam":
            return camlib.score_cam(cam_model, variables, x3, targets, config.cam_layer)
        if baseline is not None:  # the stored normal mean, subtracted from the raw map
            return camlib.cam_maps(cam_model, variables, x3, targets, config.cam_layer, methods=(config.cam,),
                                   baseline=baseline)[config.cam]
        return getattr(camlib, config.cam)(cam_model, variables, x3, targets, config.cam_layer)

    probability_of = make_probability(classifier, config, normalization, channels)

    def map_half(cvars, batch):
        x, logits, prob = probability_of(cvars, batch["images"])
        gate = batch["study_abnormal"] if config.gate == "study" else prob >= batch["threshold"]
        abnormal = batch["valid"] & gate
        b = x.shape[0]
        x3 = x if channels == 3 else jnp.repeat(x[..., :1], 3, axis=-1)
        targets = jnp.full((b,), target, jnp.int32)
        geom = batch["geometry"]
        # the mean over mirrored views when config.map_flips asks (mskjax.cam.flip_mean)
        maps = camlib.flip_mean(lambda v: cam_maps(cvars, v, targets), x3, config.map_flips, content_mask(geom))
        side = float(max(maps.shape[1:]))
        out = {"logits": logits, "probability": prob, "abnormal": abnormal, "cam": maps,
               "peak_input": boxlib.peak_point(maps)}  # the one peak rule (plateau of the first maximum), for the pointing game
        if config.boxes == "peak":
            # The peak's plateau centroid (boxes.plateau_peak), the box slid inside the content.
            pk = boxlib.peak_boxes(maps, box_side=config.box_side, input_side=side, bounds=content_bounds(geom))
            boxes_in, scores, bvalid = pk.boxes[:, None], pk.scores[:, None], jnp.ones((b, 1), bool)
            out["peaks_input"] = pk.peaks[:, None]
            if config.peaks > 1:  # the later peaks, each boxed the same way (the first is pk's)
                pts, vals, ok = boxlib.separated_peaks(maps, config.peaks, config.peak_separation * side)
                more = boxlib.boxes_around(jnp.nan_to_num(pts[:, 1:]), boxlib.box_side_for(config.box_side, side),
                                           tuple(maps.shape[1:]), bounds=content_bounds(geom))
                boxes_in = jnp.concatenate([boxes_in, jnp.where(ok[:, 1:, None], more, 0.0)], axis=1)
                scores = jnp.concatenate([scores, jnp.where(ok[:, 1:], vals[:, 1:], 0.0)], axis=1)
                bvalid = jnp.concatenate([bvalid, ok[:, 1:]], axis=1)
                out["peaks_input"] = jnp.concatenate([out["peaks_input"], pts[:, 1:]], axis=1)
        else:
            tb = boxlib.threshold_boxes(maps, fraction=config.box_fraction, k=config.num_boxes)
            boxes_in, scores, bvalid = tb.boxes, tb.scores, tb.valid
        hw = batch["original_hw"]
        boxes_orig = geo.clip_boxes(geo.boxes_to_original(boxes_in, geom), hw)
        grow = jnp.asarray([-1.0, -1.0, 1.0, 1.0], jnp.float32) * config.box_margin
        nonempty = (boxes_orig[..., 2] > boxes_orig[..., 0]) & (boxes_orig[..., 3] > boxes_orig[..., 1])
        out.update(boxes_input=boxes_in, boxes=boxes_orig, box_scores=scores, box_valid=bvalid & nonempty & abnormal[:, None],
                   boxes_sam=samfn.transform_boxes(geo.clip_boxes(boxes_orig + grow, hw), hw, sam_img_size))
        return out

    return map_half


def map_point_prompts(config: PipelineConfig, maps, boxes_in, peaks_in, box_valid, geom: geo.Geometry, hw,
                      img_size: int) -> tuple[jax.Array, jax.Array]:
    """`PipelineConfig.map_points`' point prompts for the map-derived boxes, in SAM's input frame.

    maps (B, S, S) the map in the classifier input frame; boxes_in (B, K, 4) and peaks_in (B, K, 2)
    the map-derived boxes and their peaks in that frame; box_valid (B, K); hw (B, 2) original
    (H, W). Returns points (B, K, N, 2) float32 (x, y) and labels (B, K, N) int32: the peak first
    (1, positive) for "peak" / "peak_negative", then negative_points negatives (0) where the map is
    lowest inside the box (`mskjax.boxes.lowest_points`, image content only); -1 (SAM's padding
    token, at (0, 0)) for every point of an invalid box and for a negative with no place."""
    pts, lbl = [], []
    if "peak" in config.map_points:
        pts.append(peaks_in[:, :, None, :])
        lbl.append(jnp.ones(box_valid.shape + (1,), jnp.int32))
    if "negative" in config.map_points:
        neg, ok = boxlib.lowest_points(maps, boxes_in, int(config.negative_points), allowed=content_mask(geom))
        pts.append(neg)
        lbl.append(jnp.where(ok, 0, -1).astype(jnp.int32))
    lbl = jnp.where(box_valid[..., None], jnp.concatenate(lbl, axis=2), -1)
    given = (lbl >= 0)[..., None]
    pts = jnp.where(given, jnp.concatenate(pts, axis=2), 0.0)
    sam = samfn.transform_points(geo.points_to_original(pts, geom), hw, img_size)
    return jnp.where(given, sam, 0.0).astype(jnp.float32), lbl


def make_step(classifier, sam_model, config: PipelineConfig, normalization: dict, channels: int,
              box_mask: bool = False, baseline: np.ndarray | None = None, point_trained: bool = False,
              embedded: bool = False, map_trained: bool = False):
    """The per-batch function (not yet jitted; `Pipeline` jits it).

    step(classifier_variables, sam_variables, batch) with batch a dict of
      images (B, S, S, 1) float32 in [0, 1] (classifier input frame, before normalisation);
      geometry: batched `Geometry` original -> classifier input;
      sam_images (B, T, T, 3) float32 (`mskjax.sam.preprocess` output), or, when `embedded`,
        sam_embeddings (B, e, e, C) float32: SAM's image embeddings of those images, computed
        outside (`Pipeline` with an embedding cache);
      original_hw (B, 2) float32 (H0, W0);
      valid (B,) bool (False for padding);
      threshold () float32: abnormal when probability >= threshold (an input, so changing it does
        not recompile; `Pipeline.prepare` takes it from the config);
      study_abnormal (B,) bool with config.gate "study": the image's study is called abnormal
        (then it, not the threshold, decides which images get masks);
      gt_boxes (B, G, 4) float32 original frame and gt_valid (B, G) bool (G may be 0);
      with config.mirror_average also sam_input_sizes (B, 2) int32 (the SAM input content's (h, w))
        and sam_embeddings_mirrored (when `embedded`; else the mirrored images are embedded here).
    returns a dict of arrays:
      logits (B, num_classes); probability (B,); abnormal (B,) bool (valid & p >= threshold);
      cam (B, S, S) in [0, 1] (classifier frame, zero on letterbox padding);
      boxes_input (B, K, 4) classifier frame; boxes (B, K, 4) original frame (clipped);
      boxes_sam (B, K, 4) SAM frame; box_scores (B, K); box_valid (B, K) (a real box of an abnormal
      image, non-empty inside the original image);
      mask_logits (B, K, L, L) SAM low-res logits (INVALID_PROMPT_LOGIT where not box_valid);
      mask_iou (B, K) SAM's predicted IoU;
      prompts_sam (B, K, 4) the boxes SAM was last prompted with (boxes_sam, or the masks' tight
      boxes after `config.refine` passes);
      gt_mask_logits (B, G, L, L) and gt_boxes_sam (B, G, 4) when G > 0 (SAM prompted with the
      ground-truth boxes, whatever the classifier said);
      points_sam (B, K, 2) and point_labels (B, K) when point_trained (the first pass's points);
      choice_scores (B, C) float32 (-inf for no candidate) and choice_index (B,) int32 when
      config.choose == "deletion" (C candidates, `mskjax.deletion_choice.candidate_boxes`);
      with config.peaks = K > 1 and a choice rule (not "union"): choice_scores (B, K) float32
      (`peak_choice_scores`; -inf for a peak without a box), choice_index (B,) int32,
      candidate_boxes (B, K, 4) original frame and candidate_valid (B, K); boxes_input, boxes,
      boxes_sam, box_scores, box_valid, mask_logits (and its mirrored view) are then the chosen
      peak's (K = 1); with "union" they keep all K peaks;
      mask_logits_mirrored (B, K, L, L) (and gt_mask_logits_mirrored (B, G, L, L)) with
      config.mirror_average: the mirrored view's logits, in the mirrored SAM frame (`finish`
      averages them with mask_logits in the original frame); mask_iou is then the two views' mean.
    embedded: the batch carries sam_embeddings instead of sam_images (the encoder ran outside).
    point_trained: the SAM was trained with `data.peak_point` (metadata "peak_point"): every box
    it decodes carries one point token, the map's peak for a "peak" box when config.peak_point,
    else a padding point.
    map_trained: the SAM was trained on the classifier's maps (metadata "map_prompt"): with
    config.map_prompt the map-derived box's dense prompt is the map inside it (needs box_mask).
    """
    img_size = sam_model.config.img_size
    if point_trained and config.map_points != "none":
        raise PipelineError(f"map_points={config.map_points!r}: this SAM was trained with data.peak_point and takes "
                            "its own point (PipelineConfig.peak_point)")
    if map_trained and not box_mask:
        raise PipelineError("map_trained: a SAM trained on maps takes them as its dense prompt (box_mask must be True)")
    multi = config.multimask != "single"

    def choose_by_deletion(cvars, svars, emb, batch, prob, boxes_sam, bvalid, geom, hw, map_low):
        """The peak box's candidates (sub-boxes), their masks, and the one whose removal costs the
        classifier most (PipelineConfig.choose == "deletion"); (low (B, 1, L, L), iou (B, 1),
        prompts (B, 1, 4), outputs "choice_scores" (B, C) and "choice_index" (B,))."""
        cands = dchoice.candidate_boxes(boxes_sam[:, 0], config.choice_scales)  # (B, C, 4) SAM frame
        b, c = cands.shape[:2]
        cvalid = jnp.broadcast_to(bvalid[:, :1], (b, c))
        mi = samfn.box_mask_prompt(cands, img_size, sam_model.config.low_res_size) if box_mask else None
        pts = lbl = None
        if point_trained:  # sub-boxes are not the map's box: the padding point
            pts, lbl = samfn.padding_point_prompts((b, c))
        dec = samfn.decode(sam_model, svars, emb, boxes=cands, points=pts, point_labels=lbl, mask_input=mi,
                           multimask=multi, prompt_valid=cvalid)
        low, iou = chosen_masks(dec, config.multimask, map_low)
        inside = dchoice.logits_in_input_frame(low, geom, hw, img_size) > 0.0
        inside = inside & content_mask(geom)[:, None]
        s = inside.shape[-1]
        filled = fill_masked(batch["images"][..., 0], inside)
        xf = prepare_images(filled.reshape(b * c, s, s, 1), normalization, channels)
        removed = probabilities(classifier.apply(cvars, xf, train=False).astype(jnp.float32)).reshape(b, c)
        scores = dchoice.deletion_scores(prob, removed, inside, config.choice_area_penalty)
        scores = jnp.where(inside.any(axis=(2, 3)) & cvalid, scores, -jnp.inf)
        best = jnp.argmax(scores, axis=1)
        pick = lambda a: jnp.take_along_axis(a, best.reshape((b, 1) + (1,) * (a.ndim - 2)), axis=1)  # noqa: E731
        return pick(low), pick(iou), pick(cands), {"choice_scores": scores, "choice_index": best}

    map_half = make_map_half(classifier, config, normalization, channels, img_size, baseline)

    def step(cvars, svars, batch):
        h = map_half(cvars, batch)
        maps, geom, hw = h["cam"], batch["geometry"], batch["original_hw"]
        boxes_in, boxes_sam, bvalid, peaks_in = h["boxes_input"], h["boxes_sam"], h["box_valid"], h.get("peaks_input")
        # The map on SAM's low-res grid, once, for whatever reads it: the multimask and peak choices
        # by the map and the thresholded map's mask prompt.
        needs_map_low = (config.multimask == "map" or config.choose == "map"
                         or (box_mask and config.map_mask_prompt > 0))
        map_low = map_in_sam_frame(maps, geom, hw, img_size, sam_model.config.low_res_size) if needs_map_low else None
        grow = jnp.asarray([-1.0, -1.0, 1.0, 1.0], jnp.float32) * config.box_margin
        valid = batch["valid"]
        emb = batch["sam_embeddings"] if embedded else samfn.embed(sam_model, svars, batch["sam_images"])
        prompts, pvalid = boxes_sam, bvalid
        g = batch["gt_boxes"].shape[1]
        if g:
            gt_sam = samfn.transform_boxes(geo.clip_boxes(batch["gt_boxes"] + grow, hw), hw, img_size)
            gvalid = batch["gt_valid"] & valid[:, None]
            prompts = jnp.concatenate([boxes_sam, gt_sam], axis=1)
            pvalid = jnp.concatenate([bvalid, gvalid], axis=1)
        k = boxes_in.shape[1]  # the map-derived prompts come first
        low_size = sam_model.config.low_res_size
        # A SAM trained on the classifier's maps gets, as it was trained, the map inside the
        # map-derived box as that box's dense prompt (in_sam: the map in SAM's frame, full resolution).
        in_sam = (map_in_sam_frame(maps, geom, hw, img_size, img_size)
                  if map_trained and config.map_prompt and peaks_in is not None else None)

        def box_dense_prompts(boxes):
            # A SAM fine-tuned with boxes also given as dense mask prompts (mskjax.sam.box_mask_prompt)
            # is decoded the way it was trained.
            return samfn.box_mask_prompt(boxes, img_size, low_size) if box_mask else None

        def put_map_prompt(mask_input, boxes, map_sam):
            if map_sam is None:
                return mask_input
            return mask_input.at[:, :k].set(samfn.map_prompt(map_sam[:, None], boxes[:, :k], img_size, low_size))

        mask_input = box_dense_prompts(prompts)
        if box_mask and config.map_mask_prompt > 0:  # the map's box: only where the map is high
            high = map_low >= config.map_mask_prompt * jnp.max(map_low, axis=(1, 2), keepdims=True)
            cov = samfn.box_coverage(prompts[:, :k], img_size, low_size)
            mask_input = mask_input.at[:, :k].set(
                samfn.BOX_MASK_LOGIT * (2.0 * cov * high[:, None].astype(jnp.float32) - 1.0))
        mask_input = put_map_prompt(mask_input, prompts, in_sam)
        points = labels = None
        if point_trained:
            given = jnp.zeros(prompts.shape[:2], bool)
            where = jnp.zeros(prompts.shape[:2] + (2,), jnp.float32)
            if peaks_in is not None and config.peak_point:
                # each peak's box carries its own peak (config.peaks > 1: every one of the K)
                peaks_sam = samfn.transform_points(geo.points_to_original(peaks_in, geom), hw, img_size)
                given = given.at[:, :k].set(bvalid)
                where = where.at[:, :k].set(jnp.where(bvalid[..., None], peaks_sam, 0.0))
            points, labels = samfn.peak_point_prompts(where, given)
        map_pts = map_lbl = None
        if config.map_points != "none":
            map_pts, map_lbl = map_point_prompts(config, maps, boxes_in, peaks_in, bvalid, geom, hw, img_size)

        def decode_first(emb_, boxes_, points_, mask_input_, map_pts_):
            """The first pass over every prompt; with map_points the map-derived prompts carry
            their points and the ground-truth ones are decoded apart, without."""
            if map_pts_ is None:
                return samfn.decode(sam_model, svars, emb_, boxes=boxes_, points=points_, point_labels=labels,
                                    mask_input=mask_input_, multimask=multi, prompt_valid=pvalid)
            cut = lambda a, part: None if a is None else (a[:, :k] if part == 0 else a[:, k:])  # noqa: E731
            parts = [samfn.decode(sam_model, svars, emb_, boxes=cut(boxes_, 0), points=map_pts_, point_labels=map_lbl,
                                  mask_input=cut(mask_input_, 0), multimask=multi, prompt_valid=cut(pvalid, 0))]
            if g:
                parts.append(samfn.decode(sam_model, svars, emb_, boxes=cut(boxes_, 1), mask_input=cut(mask_input_, 1),
                                          multimask=multi, prompt_valid=cut(pvalid, 1)))
            return {key: jnp.concatenate([d[key] for d in parts], axis=1)
                    for key in ("low_res_logits", "iou_predictions")}

        dec = decode_first(emb, prompts, points, mask_input, map_pts)
        low, iou = chosen_masks(dec, config.multimask, map_low)
        extra = {}
        if config.mirror_average:  # the same prompts on the mirrored image; averaged in `finish`
            w = batch["sam_input_sizes"][:, 1]
            emb_m = (batch["sam_embeddings_mirrored"] if embedded else
                     samfn.embed(sam_model, svars, samfn.mirror_columns(batch["sam_images"], w, axis=-2)))
            prompts_m = samfn.mirror_boxes(prompts, w)
            mi_m = put_map_prompt(box_dense_prompts(prompts_m), prompts_m,
                                  None if in_sam is None else samfn.mirror_columns(in_sam, w))
            dec_m = decode_first(emb_m, prompts_m, None if points is None else samfn.mirror_points(points, w), mi_m,
                                 None if map_pts is None else jnp.where(
                                     (map_lbl >= 0)[..., None], samfn.mirror_points(map_pts, w), 0.0))
            low_m, iou_m = chosen_masks(dec_m, config.multimask)
            extra["mask_logits_mirrored"] = low_m[:, :k]
            if g:
                extra["gt_mask_logits_mirrored"] = low_m[:, k:]
            iou = (iou + iou_m) / 2.0
        cam_low, cam_iou, cam_prompts = low[:, :k], iou[:, :k], boxes_sam
        chosen = {}
        if config.choose in PEAK_CHOICES and config.choose != "union":
            scores = peak_choice_scores(config.choose, cam_low, cam_iou, extra.get("mask_logits_mirrored"),
                                        map_low)
            scores = jnp.where(bvalid, scores, -jnp.inf)
            best = jnp.argmax(scores, axis=1)
            pick = lambda a: jnp.take_along_axis(a, best.reshape((a.shape[0], 1) + (1,) * (a.ndim - 2)), axis=1)  # noqa: E731
            cam_low, cam_iou, cam_prompts = pick(cam_low), pick(cam_iou), pick(boxes_sam)
            if "mask_logits_mirrored" in extra:
                extra["mask_logits_mirrored"] = pick(extra["mask_logits_mirrored"])
            chosen = {key: pick(h[key]) for key in ("boxes_input", "boxes", "boxes_sam", "box_scores", "box_valid")}
            if map_pts is not None:
                map_pts, map_lbl = pick(map_pts), pick(map_lbl)
            extra.update(choice_scores=scores, choice_index=best.astype(jnp.int32), candidate_boxes=h["boxes"],
                         candidate_valid=bvalid)
        if config.choose == "deletion":
            plain = probabilities(h["logits"])  # the unflipped input's: the removals are not flipped
            cam_low, cam_iou, cam_prompts, extra = choose_by_deletion(cvars, svars, emb, batch, plain, boxes_sam,
                                                                      bvalid, geom, hw, map_low)
        for _ in range(config.refine):
            # The tight box of the mask in the SAM input frame, at the upscaled logits' resolution.
            tight, nonempty_mask = masks_to_boxes(samfn.upscale_logits(cam_low, img_size) > 0.0)
            cam_prompts = jnp.where(nonempty_mask[..., None], tight, cam_prompts)
            mi = samfn.box_mask_prompt(cam_prompts, img_size, sam_model.config.low_res_size) if box_mask else None
            pts, lbl = map_pts, map_lbl  # the map's points stay (None without map_points)
            if point_trained:  # tight boxes: the padding point, as such a SAM was trained
                pts, lbl = samfn.padding_point_prompts(cam_prompts.shape[:2])
            dec = samfn.decode(sam_model, svars, emb, boxes=cam_prompts, points=pts, point_labels=lbl, mask_input=mi,
                               multimask=multi, prompt_valid=chosen.get("box_valid", bvalid))
            cam_low, cam_iou = chosen_masks(dec, config.multimask, map_low)
        out = {**extra, **{k: h[k] for k in ("logits", "probability", "abnormal", "cam", "peak_input", "boxes_input",
                                             "boxes", "boxes_sam", "box_scores", "box_valid")}, **chosen,
               "mask_logits": cam_low, "mask_iou": cam_iou, "prompts_sam": cam_prompts}
        if point_trained:  # the first pass's point per map prompt (SAM frame) and its label (1 | -1)
            out["points_sam"], out["point_labels"] = points[:, :k, 0], labels[:, :k, 0]
            if chosen:  # the chosen peak's point, as its box
                out["points_sam"], out["point_labels"] = pick(out["points_sam"]), pick(out["point_labels"])
        if map_pts is not None:  # the first pass's map points per map-derived prompt (SAM frame)
            out["map_points_sam"], out["map_point_labels"] = map_pts, map_lbl
        if g:
            out["gt_mask_logits"] = low[:, k:]
            out["gt_boxes_sam"] = gt_sam
        return out

    return step


# ---------------------------------------------------------------------------------------------
# Host side: items, batches, results

@dataclasses.dataclass(frozen=True)
class Item:
    """One input image and whatever ground truth it has.

    path: the image file. study: id of its study (study-level decisions average over it).
    label: 0/1 or None (unknown). body_part: optional group name. mask_path: optional 0/255 PNG in
    the original frame (the abnormality's own mask). gt_boxes: tuple of (x0, y0, x1, y1)
    original-frame boxes. evidence_path: optional 0/255 PNG of the pixels that change when the
    abnormality is removed (synthetic data only; `mskjax.data.synthetic`).
    """

    path: str
    study: str
    label: int | None = None
    body_part: str | None = None
    mask_path: str | None = None
    gt_boxes: tuple = ()
    evidence_path: str | None = None


@dataclasses.dataclass
class ImageResult:
    """Everything the pipeline found for one image, in its original frame (H0, W0).

    probability: P(abnormal). predicted: probability >= threshold (with config.gate "study": its
    study's mean probability >= threshold), the decision that gave it masks. cam: (H0, W0) float32 in [0, 1].
    boxes (n, 4), box_scores (n,): the valid CAM boxes (none for images judged normal). mask: (H0, W0)
    bool, union of SAM's masks for those boxes. gt_box_mask: (H0, W0) bool from SAM prompted with
    the ground-truth boxes, or None. gt_mask: the ground-truth mask, or None. image: (H0, W0) float32.
    """

    item: Item
    image: np.ndarray
    probability: float
    predicted: bool
    cam: np.ndarray
    boxes: np.ndarray
    box_scores: np.ndarray
    mask: np.ndarray
    mask_iou: np.ndarray
    gt_mask: np.ndarray | None = None
    gt_box_mask: np.ndarray | None = None
    peak: np.ndarray | None = None


@dataclasses.dataclass
class Unreadable:
    """An input the run skipped: `path`, `reason`."""

    path: str
    reason: str


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.round(np.asarray(image, np.float32) * 255.0), 0, 255).astype(np.uint8)


def read_mask(path: str, hw: tuple[int, int]) -> np.ndarray:
    """A 0/255 (any non-zero = inside) mask PNG as bool (H0, W0); ValueError naming the file if
    its size differs from the image's."""
    with Image.open(path) as im:
        m = np.asarray(im.convert("L")) > 0
    if m.shape != tuple(hw):
        raise ValueError(f"mask {path} is {m.shape[1]}x{m.shape[0]} (WxH) but its image is {hw[1]}x{hw[0]}")
    return m


def classifier_input_settings(classifier_meta: dict) -> tuple[int, str, int, dict]:
    """(input_size, mode, channels, normalization) of a classifier checkpoint's metadata, as the
    pipeline feeds it; PipelineError when it expects inputs other than [0, 1]."""
    data = classifier_meta.get("data", {})
    norm = classifier_meta.get("normalization") or {}
    rng = norm.get("input_range", [0.0, 1.0])
    if [float(v) for v in rng] != [0.0, 1.0]:
        raise PipelineError(f"classifier expects inputs in {rng}; the pipeline feeds [0, 1] images "
                            "(convert the checkpoint's normalization first)")
    return (int(data.get("image_size", classifier_meta["input_size"])), data.get("mode", "resize"),
            int(classifier_meta.get("in_channels", 3)), normalization_from_metadata(norm))


def classifier_inputs(images: Sequence[np.ndarray], input_size: int, mode: str, batch_size: int):
    """Decoded (H0, W0) float32 [0, 1] images -> the classifier half's inputs, padded to batch_size:
    images (B, S, S, 1) float32 (`mskjax.data.preprocess.preprocess`), batched Geometry, original_hw
    (B, 2) float32 and valid (B,) bool (padding rows: an all-zero image, identity geometry)."""
    n = len(images)
    if not 0 < n <= batch_size:
        raise ValueError(f"prepare needs 1..{batch_size} images, got {n}")
    s = input_size
    x = np.zeros((batch_size, s, s, 1), np.float32)
    geoms, hw = [], np.ones((batch_size, 2), np.float32)
    for i, im in enumerate(images):
        x[i], g = preprocess(im, s, mode, channels=1)
        geoms.append(g)
        hw[i] = im.shape
    geoms += [geo.Geometry(1.0, 1.0, 0.0, 0.0, 1.0, 1.0, input_h=s, input_w=s)] * (batch_size - n)
    return x, geo.stack_geometries(geoms), hw, np.arange(batch_size) < n


def map_prompt_settings(config: PipelineConfig) -> dict:
    """What a SAM trained on a classifier's maps must be given the same way at inference (its
    checkpoint's metadata "map_prompt" holds these, with the classifier it was trained on)."""
    return {"cam": config.cam, "cam_layer": config.cam_layer or None, "boxes": config.boxes,
            "box_side": None if config.box_side is None else float(config.box_side),
            "box_margin": float(config.box_margin), "subtract_baseline": bool(config.subtract_baseline),
            "map_flips": config.map_flips}


# What a map-trained SAM's metadata means when it lacks a key (it was trained before the setting
# existed, i.e. with the setting's default).
_MAP_PROMPT_DEFAULTS = {"map_flips": "none"}


def map_prompt_differences(trained: dict, config: PipelineConfig) -> list[str]:
    """Where `config`'s map and box differ from those a map-trained SAM was trained on (its
    metadata "map_prompt"), one "key value (trained with value)" each; [] when they agree."""
    got = map_prompt_settings(config)
    was = {k: trained.get(k, _MAP_PROMPT_DEFAULTS.get(k)) for k in got}
    return [f"{k} {v!r} (trained with {was[k]!r})" for k, v in got.items() if v != was[k]]


def check_map_prompt(trained: dict, config: PipelineConfig) -> None:
    """PipelineError unless `config` gives the map and box a map-trained SAM was trained on."""
    diff = map_prompt_differences(trained, config)
    if diff:
        raise PipelineError("this SAM was trained on the classifier's maps as its dense prompt; the pipeline's "
                            f"map and box differ: {', '.join(diff)}. Use the trained settings, or map_prompt=False "
                            "(segment --no-map-prompt) for the plain box prompt")
    if config.map_mask_prompt > 0:
        raise PipelineError("map_mask_prompt and a map-trained SAM's map prompt both set the map box's dense prompt: "
                            "use one (map_prompt=False for the thresholded map)")


def fit_map_prompt(config: PipelineConfig, sam_meta: dict | None) -> PipelineConfig:
    """`config` made usable with `sam_meta`'s SAM: for a SAM trained on a classifier's maps
    (metadata "map_prompt"), the map prompt is kept when config's map and box are the trained ones
    and switched off (map_prompt=False: the plain box prompt) when they are not, instead of the
    PipelineError `check_map_prompt` gives. Unchanged for other SAMs. For interactive use (the
    viewer's other maps); command lines keep the error."""
    trained = (sam_meta or {}).get("map_prompt")
    if not trained or not config.map_prompt:
        return config
    same = not map_prompt_differences(trained, config)
    return config if same and config.map_mask_prompt == 0 else dataclasses.replace(config, map_prompt=False)


def trained_map_config(config: PipelineConfig, sam_meta: dict | None, map_too: bool = True) -> PipelineConfig:
    """`config` with the box (boxes, box_side, box_margin) and, when map_too, the map (cam, cam_layer,
    subtract_baseline) that `sam_meta`'s SAM was trained on with a classifier's maps; unchanged for
    other SAMs."""
    trained = (sam_meta or {}).get("map_prompt")
    if not trained:
        return config
    keys = ("boxes", "box_side", "box_margin") + (("cam", "cam_layer", "subtract_baseline", "map_flips") if map_too else ())
    return dataclasses.replace(config, **{k: trained[k] for k in keys if k in trained})


class Pipeline:
    """Models, settings and the compiled step. Build with `from_directories` or the constructor.

    embedding_cache: a folder (`mskjax.embedding_cache`, the trainer's `train.embedding_cache_dir`
    layout and keys): SAM's image embeddings are read from it and the missing ones computed and
    written, so that a second run over the same images (another CAM, box or threshold) skips the
    image encoder, the pipeline's heaviest part. The jitted step always takes embeddings: the encoder
    is compiled apart (`mskjax.passes.encoder_compiler_options`), its output read from the cache
    where there is one. A SAM fine-tuned with its encoder frozen shares
    the folder with its training run (same weights, same inputs, same keys).
    """

    def __init__(self, classifier, classifier_variables, classifier_meta: dict, sam_model, sam_variables,
                 sam_meta: dict | None = None, config: PipelineConfig = PipelineConfig(),
                 embedding_cache: str | os.PathLike | None = None):
        self.classifier, self.sam_model, self.config = classifier, sam_model, config
        self.classifier_meta = dict(classifier_meta)
        self.sam_meta = dict(sam_meta or {})
        self.input_size, self.mode, self.channels, self.normalization = classifier_input_settings(self.classifier_meta)
        self.sam_img_size = int(sam_model.config.img_size)
        self.sam_preprocessing = samfn.preprocessing_of(sam_model)
        self.classifier_variables = jax.tree.map(jnp.asarray, classifier_variables)
        self.sam_variables = jax.tree.map(jnp.asarray, sam_variables)
        self.box_mask_prompt = bool(self.sam_meta.get("box_mask_prompt", False))
        self.point_trained = bool(self.sam_meta.get("peak_point", False))
        self.baseline = stored_baseline(self.classifier_meta, config) if config.subtract_baseline else None
        self.map_trained = bool(self.sam_meta.get("map_prompt"))
        if self.map_trained and config.map_prompt:
            check_map_prompt(self.sam_meta["map_prompt"], config)
        if config.map_mask_prompt > 0 and not self.box_mask_prompt:
            raise PipelineError("map_mask_prompt: this SAM was not trained with boxes as mask prompts "
                                "(checkpoint metadata box_mask_prompt), so it takes no dense prompt")
        self.embeddings = None
        if embedding_cache:
            arch = self.sam_meta.get("arch")
            if not arch:
                raise PipelineError("embedding_cache: the SAM checkpoint's metadata names no arch, which the cache's "
                                    "key needs")
            c = sam_model.config
            host = jax.tree.map(np.asarray, sam_variables)
            self.embeddings = EmbeddingCache(
                embedding_cache, encoder_fingerprint(host, arch, self.sam_img_size, self.sam_preprocessing),
                (c.embedding_size, c.embedding_size, c.prompt_embed_dim))
        # The encoder is compiled apart from the rest of the step, with its own XLA options (Eigen
        # instead of YNNPACK on CPU: 1.1-1.2x on the whole pipeline, `encoder_compiler_options`); the
        # step takes its embeddings, from here or from the cache.
        self._embed = jax.jit(functools.partial(samfn.embed, sam_model),
                              compiler_options=encoder_compiler_options() or None)
        probability_of = make_probability(classifier, config, self.normalization, self.channels)
        self._probability = jax.jit(lambda cvars, images: probability_of(cvars, images)[2])
        self._step = jax.jit(make_step(classifier, sam_model, config, self.normalization, self.channels,
                                       box_mask=self.box_mask_prompt, baseline=self.baseline,
                                       point_trained=self.point_trained, embedded=True,
                                       map_trained=self.map_trained))

    @classmethod
    def from_directories(cls, classifier_dir, sam_dir, config: PipelineConfig = PipelineConfig(),
                         embedding_cache: str | os.PathLike | None = None) -> "Pipeline":
        model, variables, meta = checkpoint.load_classifier(classifier_dir)
        smodel, svars, smeta = checkpoint.load_sam(sam_dir)
        return cls(model, variables, meta, smodel, svars, smeta, config, embedding_cache)

    # -- host-side preparation ------------------------------------------------------------
    def prepare(self, images: Sequence[np.ndarray], batch_size: int,
                gt_boxes: Sequence[np.ndarray] | None = None, num_gt: int = 0,
                study_abnormal: Sequence[bool] | None = None) -> dict:
        """Decoded (H0, W0) float32 [0, 1] images -> the step's batch dict, padded to batch_size.
        gt_boxes: per image (n_i, 4) original-frame boxes, n_i <= num_gt. study_abnormal: per image,
        whether its study is called abnormal (`study_decisions`); required with config.gate "study"."""
        n = len(images)
        if self.config.gate == "study":
            if study_abnormal is None or len(study_abnormal) != n:
                raise PipelineError("gate='study': prepare needs study_abnormal, one bool per image "
                                    "(Pipeline.study_decisions)")
            gate = np.zeros((batch_size,), bool)
            gate[:n] = np.asarray(study_abnormal, bool)
            extra_gate = {"study_abnormal": gate}
        else:
            extra_gate = {}
        x, geometry, hw, valid = classifier_inputs(images, self.input_size, self.mode, batch_size)
        sam_in = samfn.preprocess([_to_uint8(im) for im in images], self.sam_img_size, self.sam_preprocessing)
        t = self.sam_img_size
        sam_images = np.zeros((batch_size, t, t, 3), np.float32)
        sam_images[:n] = sam_in.images
        gb = np.zeros((batch_size, num_gt, 4), np.float32)
        gv = np.zeros((batch_size, num_gt), bool)
        for i, boxes in enumerate(gt_boxes or []):
            boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
            if len(boxes) > num_gt:
                raise ValueError(f"image {i} has {len(boxes)} ground-truth boxes, more than num_gt={num_gt}")
            gb[i, :len(boxes)] = boxes
            gv[i, :len(boxes)] = True
        extra = {}
        sizes = np.concatenate([sam_in.input_sizes, np.ones((batch_size - n, 2), np.int32)])
        if self.embeddings is not None:  # the cache's keys: the uint8 canvas SAM's input is made from
            extra["sam_canvases"] = [samfn.resize_into_canvas(_to_uint8(im), t, self.sam_preprocessing)
                                     for im in images]
        if self.config.mirror_average:  # SAM's second view: its input mirrored inside the image
            extra["sam_images_mirrored"] = samfn.mirror_columns(sam_images, sizes[:, 1], axis=-2)
            if self.embeddings is not None:
                extra["sam_canvases_mirrored"] = [(samfn.mirror_columns(c[None], [hw[1]])[0], hw)
                                                  for c, hw in extra["sam_canvases"]]
        return {**extra, **extra_gate, "images": x, "geometry": geometry, "sam_images": sam_images,
                "original_hw": hw, "valid": valid, "threshold": np.float32(self.config.threshold), "gt_boxes": gb, "gt_valid": gv,
                "sam_input_sizes": sizes}

    def image_embeddings(self, batch: dict, mirrored: bool = False) -> np.ndarray:
        """(B, e, e, C) float32 SAM embeddings of a prepared batch from the embedding cache; the
        missing ones are computed (one encoder call on the whole padded batch) and written. Padding
        rows are zero (their prompts are invalid). mirrored: of the mirrored view
        (`PipelineConfig.mirror_average`; its canvases are their own cache keys)."""
        cache = self.embeddings
        suffix = "_mirrored" if mirrored else ""
        emb = np.zeros((len(batch["valid"]),) + cache.shape, np.float32)
        missing = []
        for i, (canvas, hw) in enumerate(batch["sam_canvases" + suffix]):
            got = cache.get(canvas, hw)
            if got is None:
                missing.append(i)
            else:
                emb[i] = got
        if missing:
            computed = np.asarray(self._embed(self.sam_variables, batch["sam_images" + suffix]))
            for i in missing:
                emb[i] = computed[i]
                cache.put(*batch["sam_canvases" + suffix][i], computed[i])
        return emb

    def sam_embeddings(self, batch: dict, mirrored: bool = False):
        """(B, e, e, C) float32 SAM image embeddings of a prepared batch (mirrored: of its mirrored
        view): from the embedding cache where there is one (`image_embeddings`), else the encoder
        (`_embed`)."""
        if self.embeddings is not None:
            return self.image_embeddings(batch, mirrored)
        return self._embed(self.sam_variables, batch["sam_images_mirrored" if mirrored else "sam_images"])

    def step(self, batch: dict, sam_embeddings=None, mirrored_embeddings=None) -> dict:
        """Runs the jitted step on a prepared batch; numpy outputs. sam_embeddings: the batch's
        `sam_embeddings`, when the caller has them already (the viewer keeps them); else computed.
        mirrored_embeddings: the same for the mirrored view (config.mirror_average)."""
        host_only = ("sam_canvases", "sam_images", "sam_images_mirrored", "sam_canvases_mirrored")
        args = {k: v for k, v in batch.items() if k not in host_only}
        if not self.config.mirror_average:
            args.pop("sam_input_sizes", None)
        else:
            args["sam_embeddings_mirrored"] = (self.sam_embeddings(batch, mirrored=True) if mirrored_embeddings is None
                                               else mirrored_embeddings)
        args["sam_embeddings"] = self.sam_embeddings(batch) if sam_embeddings is None else sam_embeddings
        out = self._step(self.classifier_variables, self.sam_variables, args)
        return jax.tree.map(np.asarray, out)

    def finish(self, batch: dict, out: dict, index: int, image: np.ndarray, item: Item,
               gt_mask: np.ndarray | None) -> ImageResult:
        """Image `index` of a batch's outputs mapped back to its original frame."""
        h0, w0 = image.shape
        g = batch["geometry"]
        geom = geo.Geometry(*(float(np.asarray(f)[index]) for f in g._data()), input_h=g.input_h, input_w=g.input_w)
        cam_orig = np.clip(geo.map_to_original(out["cam"][index].astype(np.float64), geom, (h0, w0)), 0, 1)
        keep = out["box_valid"][index]
        in_size = batch["sam_input_sizes"][index]

        def masks_of(key, which):
            logits = out[key][index][which]
            if not len(logits):
                return np.zeros((h0, w0), bool)
            if key + "_mirrored" not in out:
                return samfn.postprocess_host(logits, in_size, (h0, w0), self.sam_img_size).any(axis=0)
            # mirror_average: the mirrored view's logits, mirrored back in the original frame (which
            # is the SAM input's content resized), averaged with the first view's
            a = samfn.postprocess_host(logits, in_size, (h0, w0), self.sam_img_size, return_logits=True)
            b = samfn.postprocess_host(out[key + "_mirrored"][index][which], in_size, (h0, w0), self.sam_img_size,
                                       return_logits=True)[..., ::-1]
            return ((a + b) / 2.0 > samfn.MASK_THRESHOLD).any(axis=0)

        mask = masks_of("mask_logits", keep)
        gt_box_mask = None
        if "gt_mask_logits" in out and batch["gt_valid"][index].any():
            gt_box_mask = masks_of("gt_mask_logits", batch["gt_valid"][index])
        return ImageResult(
            item=item, image=image, probability=float(out["probability"][index]),
            predicted=bool(out["abnormal"][index]), cam=cam_orig.astype(np.float32),
            boxes=out["boxes"][index][keep].astype(np.float64), box_scores=out["box_scores"][index][keep],
            mask=mask, mask_iou=out["mask_iou"][index][keep], gt_mask=gt_mask, gt_box_mask=gt_box_mask,
            peak=np.asarray(geo.points_to_original(out["peak_input"][index].astype(np.float64), geom), np.float64))

    def probabilities(self, images: Sequence[np.ndarray], batch_size: int = 8) -> np.ndarray:
        """Decoded (H0, W0) float32 [0, 1] images -> (N,) float32 P(abnormal), as the step gives it
        (config.probability_flips included), from the classifier alone."""
        out = []
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            x, _, _, _ = classifier_inputs(chunk, self.input_size, self.mode, batch_size)
            out.append(np.asarray(self._probability(self.classifier_variables, x))[:len(chunk)])
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0,), np.float32)

    def study_decisions(self, items: Sequence[Item], batch_size: int = 8) -> dict[str, bool]:
        """{study: called abnormal}: the mean probability of the study's readable images (as
        `mskjax.segment` reports a study) >= config.threshold. Unreadable images are left out here
        (`run` reports them)."""
        studies: list[str] = []
        probs: list[float] = []
        pending: list[tuple[Item, np.ndarray]] = []

        def flush():
            probs.extend(float(p) for p in self.probabilities([im for _, im in pending], batch_size))
            studies.extend(it.study for it, _ in pending)
            pending.clear()

        for it in items:
            try:
                pending.append((it, read_item(it)[0]))
            except (OSError, ValueError):
                continue
            if len(pending) == batch_size:
                flush()
        if pending:
            flush()
        return {s: p >= self.config.threshold for s, p in study_probabilities(studies, probs).items()}

    # -- whole runs ----------------------------------------------------------------------------
    def run(self, items: Iterable[Item], batch_size: int = 8, unreadable: list | None = None,
            progress=None) -> Iterator[ImageResult]:
        """Decodes, batches and runs `items`, yielding one ImageResult per readable image in order.

        Files that cannot be decoded (or whose mask cannot be read) are appended to `unreadable`
        as `Unreadable(path, reason)` and skipped. progress(done, total) is called after each
        batch when given (total counts every item).
        """
        items = list(items)
        num_gt = max([len(it.gt_boxes) for it in items] + [0])
        studies = self.study_decisions(items, batch_size) if self.config.gate == "study" else None
        skipped = unreadable if unreadable is not None else []
        pending: list[tuple[Item, np.ndarray, np.ndarray | None]] = []
        done = 0

        def flush():
            batch = self.prepare([im for _, im, _ in pending], batch_size,
                                 [it.gt_boxes for it, _, _ in pending], num_gt,
                                 None if studies is None else [studies.get(it.study, False) for it, _, _ in pending])
            out = self.step(batch)
            results = [self.finish(batch, out, i, im, it, gm) for i, (it, im, gm) in enumerate(pending)]
            pending.clear()
            return results

        for it in items:
            try:
                image, gm = read_item(it)
            except (OSError, ValueError) as e:  # FileNotFoundError, ImageDecodeError, bad mask/boxes
                skipped.append(Unreadable(it.path, f"{type(e).__name__}: {e}"))
                done += 1
                continue
            pending.append((it, image, gm))
            if len(pending) == batch_size:
                n = len(pending)
                yield from flush()
                done += n
                if progress:
                    progress(done, len(items))
        if pending:
            n = len(pending)
            yield from flush()
            done += n
        if progress:
            progress(done, len(items))


def study_probabilities(studies: Sequence[str], probabilities: Sequence[float]) -> dict[str, float]:
    """{study: the mean of its images' probabilities}: a study's probability, the one rule for
    `mskjax.segment`'s study-level figures and PipelineConfig.gate "study"."""
    by_study: dict[str, list[float]] = {}
    for s, p in zip(studies, probabilities):
        by_study.setdefault(s, []).append(float(p))
    return {s: float(np.mean(v)) for s, v in by_study.items()}


def read_item(it: Item) -> tuple[np.ndarray, np.ndarray | None]:
    """An item's decoded image (H0, W0) float32 [0, 1] and ground-truth mask (or None); raises
    OSError / ValueError (a file that cannot be decoded, a bad mask or boxes outside the image)."""
    image = decode_image(it.path).image
    gm = read_mask(it.mask_path, image.shape) if it.mask_path else None
    if it.gt_boxes:
        geo.validate_boxes(np.asarray(it.gt_boxes), image.shape, name=f"ground-truth boxes of {it.path}")
    return image, gm


class MapPrompter:
    """The classifier's half of the pipeline alone (`make_map_half`): for each image, the map and
    the map-derived box as the pipeline would give them to a SAM, for training a SAM on them
    (`data.map_prompts` in mskjax.train.sam).

        mp = MapPrompter.from_directory("runs/demo/classifier/best", PipelineConfig(cam="layer_cam",
                                         cam_layer="layer2", box_side=64), sam_img_size=256)
        out = mp.run(images)   # decoded (H0, W0) float32 [0, 1] images

    Only config.boxes == "peak" (one box per image). Every image gets its box whatever the
    classifier says (the threshold is not applied: training wants the map of every abnormal image).
    """

    def __init__(self, classifier, classifier_variables, classifier_meta: dict, config: PipelineConfig,
                 sam_img_size: int):
        if config.boxes != "peak":
            raise PipelineError(f"MapPrompter gives one map box per image: boxes must be 'peak', got {config.boxes!r}")
        self.input_size, self.mode, channels, normalization = classifier_input_settings(classifier_meta)
        # Every image gets its box: the gate (image or study) plays no part here.
        config = dataclasses.replace(config, gate="image")
        self.config, self.sam_img_size = config, int(sam_img_size)
        self.variables = jax.tree.map(jnp.asarray, classifier_variables)
        baseline = stored_baseline(classifier_meta, config) if config.subtract_baseline else None
        half = make_map_half(classifier, config, normalization, channels, self.sam_img_size, baseline)
        t = self.sam_img_size

        def prompts(cvars, batch):
            h = half(cvars, batch)
            return {"probability": h["probability"], "boxes_sam": h["boxes_sam"][:, 0],
                    "maps_sam": map_in_sam_frame(h["cam"], batch["geometry"], batch["original_hw"], t, t)}

        self._prompts = jax.jit(prompts)

    @classmethod
    def from_directory(cls, classifier_dir, config: PipelineConfig, sam_img_size: int) -> "MapPrompter":
        model, variables, meta = checkpoint.load_classifier(classifier_dir)
        return cls(model, variables, meta, config, sam_img_size)

    def run(self, images: Sequence[np.ndarray], batch_size: int = 16) -> dict:
        """Decoded (H0, W0) float32 [0, 1] images -> probability (N,) float32, boxes_sam (N, 4)
        float32 (the map's box, SAM input frame) and maps_sam (N, T, T) float32 in [0, 1] (the map
        in the SAM input frame, T = sam_img_size, 0 on SAM's padding)."""
        t = self.sam_img_size
        out = {"probability": np.zeros((0,), np.float32), "boxes_sam": np.zeros((0, 4), np.float32),
               "maps_sam": np.zeros((0, t, t), np.float32)}
        parts = [out]
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            x, geometry, hw, valid = classifier_inputs(chunk, self.input_size, self.mode, batch_size)
            batch = {"images": x, "geometry": geometry, "original_hw": hw, "valid": valid, "threshold": np.float32(0.0)}
            got = jax.tree.map(np.asarray, self._prompts(self.variables, batch))
            parts.append({k: v[:len(chunk)] for k, v in got.items()})
        return {k: np.concatenate([p[k] for p in parts]).astype(np.float32) for k in out}


def default_cam(classifier_meta: dict, cam: str | None, cam_layer: str | None) -> tuple[str, str | None]:
    """(method, layer) for the pipeline: what the user asked for; else the map the classifier's
    training run localized with (checkpoint metadata "localization", written by mskjax.train);
    else Grad-CAM of the last feature map (the report's choice)."""
    if cam is not None:
        return cam, cam_layer
    loc = classifier_meta.get("localization") or {}
    if loc.get("method") in camlib.METHODS:
        return loc["method"], cam_layer if cam_layer is not None else loc.get("layer")
    return "grad_cam", cam_layer


def default_map_flips(classifier_meta: dict, cam: str | None, map_flips: str | None) -> str:
    """The pipeline's map_flips: what the user asked for; else, when the map itself is the
    classifier's own (no cam asked for, `default_cam`), the flips its training run localized with
    (metadata "localization" "map_flips", `eval.map_flips`); else "none"."""
    if map_flips is not None:
        return map_flips
    loc = classifier_meta.get("localization") or {}
    if cam is None and loc.get("method") in camlib.METHODS and loc.get("map_flips") in camlib.FLIPS:
        return loc["map_flips"]
    return "none"


def describe(pipe: Pipeline) -> dict:
    """JSON-able settings of a pipeline, for reports."""
    c = dataclasses.asdict(pipe.config)
    return {"pipeline": c, "classifier": {k: pipe.classifier_meta.get(k) for k in
                                          ("arch", "input_size", "in_channels", "data", "source")},
            "sam": {**{k: pipe.sam_meta.get(k) for k in ("arch", "img_size", "source")},
                    "preprocessing": pipe.sam_preprocessing},
            "classifier_input": {"size": pipe.input_size, "mode": pipe.mode},
            "embedding_cache": str(pipe.embeddings.folder) if pipe.embeddings is not None else None}


__all__ = ["BOX_METHODS", "CHOICES", "GATES", "MAP_POINTS", "MULTIMASK", "PEAK_CHOICES", "chosen_masks", "mean_inside_mask", "peak_choice_scores", "ImageResult", "Item", "MapPrompter", "Pipeline", "PipelineConfig", "PipelineError", "Unreadable",
           "check_map_prompt", "classifier_input_settings", "classifier_inputs", "map_prompt_differences", "fit_map_prompt", "trained_map_config", "content_bounds", "content_mask", "default_cam", "default_map_flips", "describe",
           "make_map_half", "make_step", "map_point_prompts", "map_prompt_settings", "read_mask", "read_item", "stored_baseline", "study_probabilities"]
