"""Where the trained classifier's map points, scored on a split's abnormal images that have masks.

The trainer's report on localization (issue 18's scoreboard): for each abnormal record with a
ground-truth mask, the CAM of the abnormal logit at model-input size (as `mskjax.pipeline` makes
it: the checkpoint's preprocessing and normalization, zero on letterbox padding), its peak
(`boxes.peak_point`: the first maximum's plateau) and the pipeline's peak box; the peak is carried
to the original frame and scored there against the lesion mask and, where the synthetic world
wrote one, the evidence mask (the pixels that change when the abnormality is removed):

- pointing game at each tolerance (original pixels), with its chance level (`metrics.pointing_chance`);
- the peak box's best IoU with the ground-truth boxes.

Unreadable images or masks are counted and skipped.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mskjax import boxes as boxlib
from mskjax import cam as camlib
from mskjax import geometry as geo
from mskjax import metrics
from mskjax.classifier import GrayAsRGB, abnormal_class, prepare_images
from mskjax.data.images import decode_image
from mskjax.data.preprocess import preprocess
from mskjax.pipeline import content_bounds, content_mask, read_mask

TOLERANCES = (0.0, 15.0)


def make_cam_step(model, norm: dict, channels: int, method: str = "grad_cam", layer: str | None = None,
                  flips: str = "none"):
    """jitted (variables, images (B, S, S, 1) in [0, 1], geometry, baseline) -> (maps (B, S, S),
    peaks (B, 2) (x, y), peak boxes (B, 4)), all in the model-input frame. `layer` "a+b" fuses the
    stages' maps (`mskjax.cam.fused_maps`; no baseline then). flips: the map as the mean over the
    input and its flips (`mskjax.cam.flip_mean`, as the pipeline's PipelineConfig.map_flips)."""
    cam_model = model if channels == 3 else GrayAsRGB(model, channels)
    target = abnormal_class(model.num_classes)

    def step(variables, images, geom, baseline):
        x = prepare_images(images, norm, channels)
        x3 = x if channels == 3 else jnp.repeat(x[..., :1], 3, axis=-1)
        targets = jnp.full((images.shape[0],), target, jnp.int32)

        def maps_of(x):
            if layer and "+" in layer:  # stages fused (mskjax.cam.fused_maps)
                return camlib.fused_maps(cam_model, variables, x, targets, tuple(layer.split("+")),
                                         methods=(method,))[method]
            return camlib.cam_maps(cam_model, variables, x, targets, layer, methods=(method,), baseline=baseline)[method]
        maps = camlib.flip_mean(maps_of, x3, flips, content_mask(geom))
        pk = boxlib.peak_boxes(maps, input_side=float(max(maps.shape[1:])), bounds=content_bounds(geom))
        return maps, boxlib.peak_point(maps), pk.boxes

    return jax.jit(step)


def normal_mean_map(model, variables, records: Sequence, *, norm: dict, channels: int, size: int, mode: str,
                    method: str = "grad_cam", layer: str | None = None, batch_size: int = 32,
                    limit: int = 256) -> tuple[np.ndarray | None, int]:
    """(mean raw map (h, w) float32 at the CAM stage's resolution, count) over up to `limit` normal
    records: the pattern the network puts on every image, whatever it shows (where the frame is).
    `mskjax.cam.cam_maps(..., baseline=)` subtracts it. (None, 0) without normal records."""
    normals = [r for r in records if r.label == 0][:limit]
    cam_model = model if channels == 3 else GrayAsRGB(model, channels)
    target = abnormal_class(model.num_classes)

    @jax.jit
    def raw_maps(variables, images):
        x = prepare_images(images, norm, channels)
        x3 = x if channels == 3 else jnp.repeat(x[..., :1], 3, axis=-1)
        t = jnp.full((images.shape[0],), target, jnp.int32)
        return camlib.cam_maps(cam_model, variables, x3, t, layer, methods=(method,), raw=True)[method]

    total, count = None, 0
    for start in range(0, len(normals), batch_size):
        images = np.zeros((batch_size, size, size, 1), np.float32)
        n = 0
        for r in normals[start:start + batch_size]:
            try:
                images[n] = preprocess(decode_image(r.path).image, size, mode, channels=1)[0]
            except (OSError, ValueError):
                continue  # an unreadable normal image is left out of the mean
            n += 1
        if n:
            m = np.asarray(raw_maps(variables, images))[:n].astype(np.float64)
            total = m.sum(0) if total is None else total + m.sum(0)
            count += n
    return (None, 0) if not count else ((total / count).astype(np.float32), count)


def _batched_geometry(geoms) -> geo.Geometry:
    """Per-image scalar geometries -> one batched Geometry ((B,) data fields)."""
    fields = np.asarray([[float(np.asarray(v)) for v in g._data()] for g in geoms], np.float32).T
    return geo.Geometry(*fields, input_h=geoms[0].input_h, input_w=geoms[0].input_w)


def localization_report(model, variables, records: Sequence, *, norm: dict, channels: int, size: int,
                        mode: str, method: str = "grad_cam", layer: str | None = None, baseline=None,
                        batch_size: int = 32, tolerances: Sequence[float] = TOLERANCES,
                        flips: str = "none") -> dict | None:
    """Pointing game (with chance) against lesion and evidence masks, and peak-box IoU, over the
    abnormal `records` that have a mask; None when there are none."""
    chosen = [r for r in records if r.label == 1 and r.mask_path]
    if not chosen:
        return None
    step = make_cam_step(model, norm, channels, method, layer, flips)
    truths = {"lesion": [], "evidence": []}
    box_ious, skipped = [], []
    for start in range(0, len(chosen), batch_size):
        batch = []
        for r in chosen[start:start + batch_size]:
            try:
                image = decode_image(r.path).image
                lesion = read_mask(r.mask_path, image.shape)
                evidence = read_mask(r.evidence_path, image.shape) if getattr(r, "evidence_path", None) else None
            except (OSError, ValueError) as e:
                skipped.append(f"{r.path}: {type(e).__name__}: {e}")
                continue
            x, g = preprocess(image, size, mode, channels=1)
            batch.append((r, image.shape, x, g, lesion, evidence))
        if not batch:
            continue
        n = len(batch)
        images = np.zeros((batch_size, size, size, 1), np.float32)
        images[:n] = np.stack([b[2] for b in batch])
        geoms = [b[3] for b in batch] + [batch[0][3]] * (batch_size - n)
        _, peaks, pboxes = jax.tree.map(np.asarray, step(variables, images, _batched_geometry(geoms), baseline))
        for i, (r, hw, _, g, lesion, evidence) in enumerate(batch):
            peak = geo.points_to_original(peaks[i].astype(np.float64), g)
            for name, mask in (("lesion", lesion), ("evidence", evidence)):
                if mask is not None and mask.any():
                    truths[name].append((metrics.pointing_hits_at(peak, mask, tolerances),
                                         [metrics.pointing_chance(mask, t) for t in tolerances]))
            if len(r.boxes):
                box = geo.clip_boxes(geo.boxes_to_original(pboxes[i].astype(np.float64), g), hw)
                gt = np.asarray(r.boxes, np.float64).reshape(-1, 4)
                box_ious.append(float(np.max(metrics.pairwise_box_iou(box.reshape(1, 4), gt))))
    out = {"method": method, "layer": layer or "last stage", "map_flips": flips, "n_abnormal_with_mask": len(chosen),
           "skipped": skipped, "baseline_subtracted": baseline is not None}
    for name, rows in truths.items():
        if not rows:
            continue
        hits = np.stack([h for h, _ in rows])
        chance = np.asarray([c for _, c in rows], np.float64)
        out[name] = {f"{t:g}px": {"hit_rate": float(hits[:, j].mean()), "chance": float(chance[:, j].mean()),
                                  "n": len(rows)} for j, t in enumerate(tolerances)}
    out["peak_box_iou"] = {"mean": float(np.mean(box_ious)) if box_ious else float("nan"), "n": len(box_ious)}
    return out


def summary_lines(rep: dict) -> list[str]:
    """Printable lines of a localization_report."""
    lines = [f"localization ({rep['method']}, {rep['layer']}"
             f"{', normal mean subtracted' if rep['baseline_subtracted'] else ''}): "
             f"{rep['n_abnormal_with_mask']} abnormal images with masks"]
    for name in ("lesion", "evidence"):
        if name in rep:
            parts = [f"{k} {v['hit_rate']:.3f} (chance {v['chance']:.3f})" for k, v in rep[name].items()]
            lines.append(f"  pointing game vs {name} masks: " + ", ".join(parts) + f"; n {next(iter(rep[name].values()))['n']}")
    lines.append(f"  peak box IoU with ground-truth boxes: {rep['peak_box_iou']['mean']:.3f} (n {rep['peak_box_iou']['n']})")
    return lines
