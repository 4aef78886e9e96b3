"""Synthetic musculoskeletal radiographs with ground truth, written in the MURA layout.

    python -m mskjax.data.synthetic --out DIR --studies N --seed S [--size-range 160 320]

or `generate(out_dir, n_studies, seed)`. Each study shows one of the seven MURA body parts in 1-4
views; about half the studies are abnormal, carrying fractures (clean, displaced or hairline),
metal hardware (plates, screws, wires, nails, a shoulder prosthesis) or lytic lesions, visible in
every view of the study. Images are procedural projections (see render.py): bones are hollow
tubes with bright cortex and darker medulla inside a soft-tissue envelope, then film exposure,
blur, noise, gamma/contrast/brightness, collimation and side markers vary per image so that only
the bone tells normal from abnormal.

Layout under DIR (NAME = basename of DIR; CSVs have no header, as in MURA-v1.1):

    {split}/XR_<PART>/patientNNNNN/studyK_{positive,negative}/imageJ.png   8-bit grayscale
    {split}_image_paths.csv      NAME/{split}/XR_<PART>/patientNNNNN/studyK_positive/imageJ.png
    {split}_labeled_studies.csv  NAME/{split}/XR_<PART>/patientNNNNN/studyK_positive/,1
    masks/{split}/.../imageJ.png  0/255 union of the image's abnormalities (abnormal images only)
    evidence/{split}/.../imageJ.png  0/255 evidence (abnormal images only): 255 where the image's
                 8-bit value differs (by >= 1 grey level) from the same view rendered again without
                 its abnormalities - same canvas, anatomy, pose, exposure, noise, collimation and
                 marker - so exactly the pixels the abnormalities changed. One map per image, the
                 union over its abnormalities. Unlike the mask it covers the whole effect: where a
                 displaced fragment left and where it went (most of a displaced fracture's evidence
                 lies outside its mask grown by 3 px), a lesion's or a gap's blurred edge.
    boxes.json   {image CSV path: [{"box": [x0, y0, x1, y1], "type": "fracture"}, ...]}
                 boxes in the image's pixel frame (pixel i covers [i, i+1)): the extent of each
                 abnormality's own mask, so the union of an image's boxes is its mask's extent
    synthetic.json  generator, version, config (seed, ...), counts per split / part / type and
                 "evidence": per type and subtype, the fraction of evidence pixels outside the mask
                 dilated by a 3-px disc (see _evidence_summary)

Determinism: every study draws from its own numpy Generator seeded by (seed, study index), so the
files are byte-identical for the same arguments whatever the number of worker processes. The
render without abnormalities takes no draws of its own (it shares the image's), so images, masks
and boxes are byte-identical to those of version 1.0, which wrote no evidence.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import csv
import io
import json
import math
import multiprocessing
import os
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image

from mskjax.data.synthetic import anatomy as anat
from mskjax.data.synthetic import lesions as les
from mskjax.data.synthetic.render import (Canvas, bone_density, gaussian_blur, glyph, polygon_plate_density,
                                          smooth_noise, soft_thickness)

VERSION = "1.1"  # 1.1: evidence masks (evidence/...); images, masks and boxes as in 1.0
PARTS = anat.PARTS
TYPES = les.TYPES
DEFAULT_SPLITS = (("train", 0.7), ("valid", 0.15), ("test", 0.15))
DEFAULT_SIZE_RANGE = (160, 320)
SOFT_MU = 0.018  # 1/mm
SOFT_SATURATION_MM = 60.0  # film response flattens thick soft tissue
_VIEW_PROBS = (0.15, 0.35, 0.35, 0.15)  # 1, 2, 3, 4 views per study
_MAX_VIEW_TRIES = 16
_INCOMPLETE_MARKER = ".synthetic_incomplete"
EVIDENCE_DILATION_PX = 3  # synthetic.json's evidence statistic: evidence outside the mask grown this much


class SyntheticDatasetError(FileExistsError):
    """The output folder holds something `generate` will not overwrite."""


_CANONICAL_POSE = {"lat": 0.0, "squeeze": 1.0, "spread": 1.0, "flex": 0.0, "dev": 0.0, "pronation": 0.0,
                   "abd": 0.0, "rotation": 0.0, "neighbour": 0}


# ---------------------------------------------------------------------------------------------
# One image


def _film(rng: np.random.Generator, attens: list, long_side: int) -> tuple[list, np.ndarray]:
    """Attenuation maps (H, W) float32 -> brightness in [0, 1] with exposure, heel effect, blur,
    noise, global gamma / contrast / brightness, collimation and a side marker. Returns (images,
    visible): one image per map, all filmed with the same draws (the draws do not depend on how
    many maps there are), and visible (H, W) bool marking pixels not hidden by collimation."""
    h, w = attens[0].shape
    # each step draws once, then applies the same operations to every map in turn, so each image
    # is computed exactly as it would be alone
    k = np.float32(rng.uniform(0.75, 1.3))
    imgs = [1.0 - np.exp(-a * k) for a in attens]
    fog = np.float32(rng.uniform(0.0, 0.12))
    imgs = [fog + (1.0 - fog) * img for img in imgs]
    # heel effect / uneven exposure: a gentle ramp plus low-frequency mottle
    ang = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ramp = (math.cos(ang) * (xx / w - 0.5) + math.sin(ang) * (yy / h - 0.5)).astype(np.float32)
    heel = 1.0 + np.float32(rng.uniform(-0.15, 0.15)) * ramp
    imgs = [img * heel for img in imgs]
    mottle = 1.0 + np.float32(rng.uniform(0.0, 0.05)) * smooth_noise(rng, h, w, max(h, w) / 5)
    imgs = [img * mottle for img in imgs]
    blur = float(rng.uniform(0.35, 1.0)) * long_side / 240.0
    imgs = [gaussian_blur(img.astype(np.float32), blur) for img in imgs]
    sig = np.float32(rng.uniform(0.006, 0.03))
    quantum = rng.standard_normal((h, w)).astype(np.float32)
    imgs = [img + sig * (0.35 + 0.65 * np.sqrt(np.clip(img, 0, 1))) * quantum for img in imgs]
    grain = gaussian_blur(rng.standard_normal((h, w)).astype(np.float32), 0.8)
    grain = np.float32(rng.uniform(0.0, 0.02)) * grain
    imgs = [img + grain for img in imgs]
    gamma = np.float32(math.exp(rng.uniform(-0.4, 0.4)))
    imgs = [np.clip(img, 0.0, 1.0) ** gamma for img in imgs]
    contrast = np.float32(rng.uniform(0.8, 1.2))
    brightness = np.float32(rng.uniform(-0.1, 0.1))
    imgs = [(img - 0.5) * contrast + 0.5 + brightness for img in imgs]
    visible = np.ones((h, w), bool)
    if rng.random() < 0.35:  # collimator edges: uniform borders, dark or light
        level = np.float32(rng.uniform(0.0, 0.08) if rng.random() < 0.5 else rng.uniform(0.55, 0.9))
        m = [int(rng.uniform(0, 0.07) * d) if rng.random() < 0.6 else 0 for d in (w, h, w, h)]
        visible[:, :m[0]] = False
        visible[:m[1], :] = False
        visible[:, w - m[2]:] = False
        visible[h - m[3]:, :] = False
        imgs = [np.where(visible, img, level) for img in imgs]
    if rng.random() < 0.5:  # lead side marker in a corner
        g = glyph("L" if rng.random() < 0.5 else "R")
        k = max(1, int(round(long_side / 90)))
        g = np.kron(g, np.ones((k, k), bool))
        gh, gw = g.shape
        m = int(0.04 * min(h, w)) + 1
        y0 = m if rng.random() < 0.5 else h - m - gh
        x0 = m if rng.random() < 0.5 else w - m - gw
        lead = np.float32(rng.uniform(0.85, 1.0))
        for img in imgs:
            img[y0:y0 + gh, x0:x0 + gw] = np.where(g, lead, img[y0:y0 + gh, x0:x0 + gw])
    return [np.clip(img, 0.0, 1.0) for img in imgs], visible


def _canvas(rng, anatomy, size_range, flip) -> Canvas:
    """Image size and the world->pixel transform framing the anatomy's field of view."""
    x0, y0, x1, y1 = anatomy.fov
    fw, fh = x1 - x0, y1 - y0
    angle = float(np.clip(rng.normal(0.0, 12.0), -30, 30))
    if rng.random() < 0.1:
        angle += 90.0 if rng.random() < 0.5 else -90.0
    a = math.radians(angle)
    wr = abs(math.cos(a)) * fw + abs(math.sin(a)) * fh
    hr = abs(math.sin(a)) * fw + abs(math.cos(a)) * fh
    long_side = int(rng.integers(size_range[0], size_range[1] + 1))
    fov_aspect = min(wr, hr) / max(wr, hr)
    short = int(round(long_side * float(np.clip(fov_aspect * rng.uniform(1.05, 1.6), 0.6, 1.0))))
    h, w = (long_side, short) if hr >= wr else (short, long_side)
    scale = min(w / wr, h / hr) * float(rng.uniform(0.9, 1.12))
    shift = (rng.uniform(-0.04, 0.04) * w, rng.uniform(-0.04, 0.04) * h)
    return Canvas(h, w, ((x0 + x1) / 2, (y0 + y1) / 2), (w / 2 + shift[0], h / 2 + shift[1]), scale,
                  a, flip)


def render_view(rng: np.random.Generator, anatomy: anat.Anatomy, abnormalities: list,
                size_range=DEFAULT_SIZE_RANGE, flip: bool = False, counterfactual: bool = False):
    """Draw one radiograph of `anatomy` with its abnormalities.

    Returns (image uint8 (H, W), masks: list of bool (H, W) per abnormality, canvas); with
    counterfactual=True a fourth item, uint8 (H, W): the same view rendered without its
    abnormalities (same canvas, texture, soft tissue, exposure, blur, noise, collimation and side
    marker; only the abnormalities' bone effects and metal are left out). It is exactly
    `render_view(rng_copy, anatomy, [], size_range, flip)[0]` for a copy of `rng` taken before this
    call, and it takes no draws of its own (it reuses the image's): the first three items and the
    state `rng` is left in are the same with and without it.
    """
    cv = _canvas(rng, anatomy, size_range, flip)
    h, w, px = cv.height, cv.width, cv.mm_per_px
    xw, yw = cv.x_world, cv.y_world
    tex = smooth_noise(rng, h, w, max(1.2, 1.4 / px)) * np.float32(rng.uniform(0.15, 0.35))

    soft = np.zeros((h, w), np.float32)
    for s in anatomy.soft:
        win = cv.window(s.world_bbox())
        if win is not None:
            soft[win] = np.maximum(soft[win], soft_thickness(xw[win], yw[win], s))
    soft = np.float32(SOFT_MU * SOFT_SATURATION_MM) * (1.0 - np.exp(soft * np.float32(-1.0 / SOFT_SATURATION_MM)))
    soft *= 1.0 + 0.06 * smooth_noise(rng, h, w, max(4.0, 12.0 / px))

    masks = [np.zeros((h, w), bool) for _ in abnormalities]
    bone = np.zeros((h, w), np.float32)
    # the intact bones, summed exactly as a render without abnormalities sums them
    bone_cf = np.zeros((h, w), np.float32) if counterfactual else None
    for name, b in anatomy.bones.items():
        effects = [(i, ab) for i, ab in enumerate(abnormalities)
                   if not isinstance(ab, les.Hardware) and ab.bone == name]
        pad = max([les.pad_for(ab) for _, ab in effects], default=0.0)
        win = cv.window(b.world_bbox(pad))
        if win is None:
            continue
        x, y, t = xw[win], yw[win], tex[win]
        dens, inside = bone_density(x, y, b, t)
        if counterfactual:
            if pad:  # a displaced fragment widened the window: redraw in the unpadded one
                win0 = cv.window(b.world_bbox(0.0))
                if win0 is not None:
                    bone_cf[win0] += bone_density(xw[win0], yw[win0], b, tex[win0])[0]
            else:  # effects return new arrays, so dens is still the intact bone
                bone_cf[win] += dens
        for i, ab in effects:
            dens, m = les.apply_bone_effect(ab, b, x, y, dens, inside, px,
                                            lambda xx, yy, b=b, t=t: bone_density(xx, yy, b, t))
            masks[i][win] |= m
        bone[win] += dens

    for verts, thick in anatomy.plates:
        vb = np.asarray(verts)
        win = cv.window((vb[:, 0].min(), vb[:, 1].min(), vb[:, 0].max(), vb[:, 1].max()))
        if win is not None:
            plate = polygon_plate_density(xw[win], yw[win], verts, thick, 0.016, 0.05, 2.5, px, tex[win])
            bone[win] += plate
            if counterfactual:
                bone_cf[win] += plate

    metal = np.zeros((h, w), np.float32)
    for i, ab in enumerate(abnormalities):
        if not isinstance(ab, les.Hardware):
            continue
        for prim in les.hardware_primitives(ab, anatomy):
            win = cv.window(les.primitive_bbox(prim))
            if win is None:
                continue
            dens, inside = les.primitive_density(prim, xw[win], yw[win], px)
            metal[win] += dens
            masks[i][win] |= inside

    attens = [soft + bone + metal]
    if counterfactual:  # (+ an empty metal layer: the sum rounds as in a render without abnormalities)
        attens.append(soft + bone_cf + np.zeros((h, w), np.float32))
    # one film for both: the same exposure, blur, noise, collimation and marker draws, taken once
    imgs, visible = _film(rng, attens, max(h, w))
    masks = [m & visible for m in masks]
    imgs = [np.round(img * 255.0).astype(np.uint8) for img in imgs]
    return (imgs[0], masks, cv, imgs[1]) if counterfactual else (imgs[0], masks, cv)


def _visible_enough(ab, anatomy, cv, mask, visible_min=6) -> bool:
    p = cv.to_pixel(les.anchor(ab, anatomy))
    mx, my = 0.04 * cv.width, 0.04 * cv.height
    inside = mx <= p[0] <= cv.width - mx and my <= p[1] <= cv.height - my
    return bool(inside and int(mask.sum()) >= visible_min)


def _inside_fov(p, fov, margin=0.08) -> bool:
    x0, y0, x1, y1 = fov
    mx, my = margin * (x1 - x0), margin * (y1 - y0)
    return bool(x0 + mx <= p[0] <= x1 - mx and y0 + my <= p[1] <= y1 - my)


def mask_box(mask: np.ndarray) -> list[float]:
    """[x0, y0, x1, y1] extent of a boolean mask (pixel i covers [i, i+1))."""
    ys, xs = np.nonzero(mask)
    if xs.size == 0:
        raise ValueError("empty mask has no box")
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def evidence_mask(image: np.ndarray, counterfactual: np.ndarray) -> np.ndarray:
    """Evidence of an abnormal image: bool (H, W), True where its written 8-bit value differs from
    that of the same view rendered without its abnormalities (|difference| >= 1 grey level).

    Both renders share every random draw (noise included), so nothing but the abnormalities'
    effect, after blur and 8-bit rounding, is marked: a displaced fragment's old and new place, a
    lesion's or a gap's blurred edge, metal. image, counterfactual: uint8 (H, W), same frame."""
    if image.shape != counterfactual.shape:
        raise ValueError(f"image {image.shape} and counterfactual {counterfactual.shape} differ in shape")
    return image != counterfactual


def dilate_disc(mask: np.ndarray, radius: int) -> np.ndarray:
    """Bool (H, W) mask grown by a disc: pixels whose centre lies within `radius` px (Euclidean) of
    a pixel of `mask`."""
    m = np.asarray(mask, bool)
    h, w = m.shape
    r = int(radius)
    out = m.copy()
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            if (dy or dx) and dy * dy + dx * dx <= r * r:
                out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] |= \
                    m[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def evidence_outside(evidence: np.ndarray, mask: np.ndarray, radius: int = EVIDENCE_DILATION_PX) -> tuple[int, int]:
    """(evidence pixels, those outside the abnormality mask dilated by a disc of `radius` px)."""
    ev = np.asarray(evidence, bool)
    return int(ev.sum()), int((ev & ~dilate_disc(mask, radius)).sum())


def study_rng(seed: int, index: int) -> np.random.Generator:
    """The Generator of study `index` (independent of worker count and of other studies)."""
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(1, int(index))))


def unit_mm(anatomy: anat.Anatomy) -> float:
    """mm per pixel when the part's field of view fills a 128-px image (with slack for rotation)."""
    x0, y0, x1, y1 = anatomy.fov
    return 1.15 * max(x1 - x0, y1 - y0) / 128.0


def render_study(seed: int, index: int, part: str, abnormal_type: str | None,
                 size_range=DEFAULT_SIZE_RANGE, abnormality_scale: float = 1.0,
                 conspicuity: str = "realistic", evidence: bool = True) -> dict:
    """All views of one study.

    abnormality_scale multiplies every abnormality's dimensions (fracture gaps and displacement
    limits, lesion and hardware sizes), not the anatomy: 1.0 is the default look; larger values make
    the task easier for a classifier trained from scratch on few images. conspicuity: "realistic"
    (the default mix) or "high" (displaced fractures, deep lesions through the cortex: see
    lesions.CONSPICUITY).

    evidence: also render every abnormal view without its abnormalities (see render_view's
    counterfactual) and return where the two differ (`evidence_mask`). Images, masks and boxes do
    not depend on it: the second render takes no draws of its own.

    Returns {"images": [uint8 (H, W)], "masks": [uint8 (H, W) 0/255 or None],
    "evidence": [uint8 (H, W) 0/255 or None] (only with evidence=True), "boxes": [[{"box", "type"}]
    per image], "abnormalities": [descriptions]}. Masks and evidence are None for normal images;
    an abnormal image's evidence is the union over its abnormalities (one map per image).
    """
    if part not in PARTS:
        raise ValueError(f"unknown body part {part!r}; expected one of {PARTS}")
    rng = study_rng(seed, index)
    subject = anat.draw_subject(rng)
    flip = bool(rng.random() < 0.5)
    n_views = 1 + int(rng.choice(4, p=_VIEW_PROBS))
    base = anat.build(part, subject, dict(_CANONICAL_POSE))
    abns = []
    if abnormal_type is not None:
        for _ in range(_MAX_VIEW_TRIES):  # keep abnormalities well inside the field of view
            abns = les.draw_abnormalities(rng, abnormal_type, base, unit_mm(base), abnormality_scale, conspicuity)
            if all(_inside_fov(les.anchor(a, base), base.fov) for a in abns):
                break
        else:
            raise RuntimeError(f"study {index} ({part}): no {abnormal_type} fits inside the field of view")
    out = {"images": [], "masks": [], "boxes": [], "abnormalities": [_describe(a) for a in abns]}
    if evidence:
        out["evidence"] = []
    twin = evidence and bool(abns)
    for view in range(n_views):
        for _ in range(_MAX_VIEW_TRIES):
            anatomy = anat.build(part, subject, anat.draw_pose(part, rng, view))
            img, masks, cv, *cf = render_view(rng, anatomy, abns, size_range, flip, counterfactual=twin)
            if all(_visible_enough(a, anatomy, cv, m) for a, m in zip(abns, masks)):
                break
        else:
            raise RuntimeError(f"study {index} ({part}): abnormality not visible after {_MAX_VIEW_TRIES} tries")
        out["images"].append(img)
        if abns:
            union = np.zeros(img.shape, bool)
            for m in masks:
                union |= m
            out["masks"].append((union * 255).astype(np.uint8))
            out["boxes"].append([{"box": mask_box(m), "type": a.type} for a, m in zip(abns, masks)])
        else:
            out["masks"].append(None)
            out["boxes"].append([])
        if evidence:
            out["evidence"].append((evidence_mask(img, cf[0]) * 255).astype(np.uint8) if twin else None)
    return out


def _describe(ab) -> dict:
    if isinstance(ab, les.Fracture):
        return {"type": "fracture", "subtype": ab.kind, "bone": ab.bone}
    if isinstance(ab, les.Lytic):
        return {"type": "lesion", "subtype": "lytic", "bone": ab.bone}
    return {"type": "hardware", "subtype": ab.kind, "bone": ab.bone}


# ---------------------------------------------------------------------------------------------
# The dataset plan: parts, labels, patients, splits


def plan_studies(n_studies: int, seed: int, splits=DEFAULT_SPLITS, abnormal_fraction: float = 0.5,
                 parts=PARTS) -> list[dict]:
    """Deterministic list of studies: {index, split, part, patient, study, label, type}.

    `parts` (a subset of PARTS, default all) are balanced; within each part a fraction
    `abnormal_fraction` is abnormal, with the three types in turn. Patients (1-3 studies of one
    part) belong to exactly one split; patient numbers run through the splits in order, like MURA's.
    """
    if n_studies < 1:
        raise ValueError(f"n_studies must be >= 1, got {n_studies}")
    if not 0.0 <= abnormal_fraction <= 1.0:
        raise ValueError(f"abnormal_fraction must be in [0, 1], got {abnormal_fraction}")
    chosen = _check_parts(parts)
    names = [s for s, _ in splits]
    fracs = np.array([f for _, f in splits], float)
    if len(set(names)) != len(names) or (fracs < 0).any() or fracs.sum() <= 0:
        raise ValueError(f"bad splits {splits!r}: need distinct names and non-negative fractions")
    fracs = fracs / fracs.sum()
    rng = np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(0,)))
    drawn = [chosen[i % len(chosen)] for i in range(n_studies)]
    rng.shuffle(drawn)
    studies = []
    for part in chosen:
        k = drawn.count(part)
        n_abn = int(round(k * abnormal_fraction))
        labels = np.array([1] * n_abn + [0] * (k - n_abn))
        rng.shuffle(labels)
        types = [TYPES[(j + int(rng.integers(3))) % 3] for j in range(n_abn)] if n_abn else []
        types = list(rng.permutation(np.array(types, dtype=object))) if types else []
        it = iter(types)
        for lab in labels:
            studies.append({"part": part, "label": int(lab), "type": next(it) if lab else None})
    # group into patients of 1-3 studies of the same part
    patients = []
    i = 0
    while i < len(studies):
        size = 1 + int(rng.choice(3, p=(0.72, 0.23, 0.05)))
        group = [s for s in studies[i:i + size] if s["part"] == studies[i]["part"]]
        patients.append(group)
        i += len(group)
    order = rng.permutation(len(patients))
    bounds = np.cumsum(fracs) * n_studies
    split_of = []
    done = 0
    for j in order:
        mid = done + 0.5 * len(patients[j])
        split_of.append(names[min(int(np.searchsorted(bounds, mid, side="right")), len(names) - 1)])
        done += len(patients[j])
    by_split = {s: [] for s in names}
    for j, sp in zip(order, split_of):
        by_split[sp].append(patients[j])
    out = []
    pid = 0
    for sp in names:
        for group in sorted(by_split[sp], key=lambda g: PARTS.index(g[0]["part"])):
            pid += 1
            for k, s in enumerate(group, start=1):
                out.append({"index": len(out), "split": sp, "part": s["part"], "patient": pid, "study": k,
                            "label": s["label"], "type": s["type"]})
    return out


def study_dir(name: str, st: dict) -> str:
    """CSV path of a study folder, e.g. NAME/train/XR_HAND/patient00001/study1_positive/."""
    lab = "positive" if st["label"] else "negative"
    return f"{name}/{st['split']}/{st['part']}/patient{st['patient']:05d}/study{st['study']}_{lab}/"


def _png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode="L").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _work(job) -> dict:
    """Render one study and write its files (runs in worker processes)."""
    root, name, st, seed, size_range, scale, conspicuity = job
    res = render_study(seed, st["index"], st["part"], st["type"] if st["label"] else None, size_range, scale,
                       conspicuity)
    sdir = study_dir(name, st)
    rel = sdir[len(name) + 1:]
    (Path(root) / rel).mkdir(parents=True, exist_ok=True)
    paths, boxes, ev_counts = [], {}, []
    for j, (img, mask, ev, bx) in enumerate(zip(res["images"], res["masks"], res["evidence"], res["boxes"]),
                                            start=1):
        (Path(root) / rel / f"image{j}.png").write_bytes(_png_bytes(img))
        paths.append(f"{sdir}image{j}.png")
        if mask is not None:
            for sub, arr in (("masks", mask), ("evidence", ev)):
                d = Path(root) / sub / rel
                d.mkdir(parents=True, exist_ok=True)
                (d / f"image{j}.png").write_bytes(_png_bytes(arr))
            boxes[paths[-1]] = bx
            ev_counts.append(evidence_outside(ev > 0, mask > 0))
    return {"study": sdir, "paths": paths, "boxes": boxes, "abnormalities": res["abnormalities"],
            "evidence": ev_counts}


# ---------------------------------------------------------------------------------------------
# The whole dataset


def _check_parts(parts) -> tuple[str, ...]:
    """`parts` in PARTS order, validated: a non-empty subset of PARTS without repeats."""
    parts = tuple(parts)
    unknown = [p for p in parts if p not in PARTS]
    if not parts or unknown or len(set(parts)) != len(parts):
        raise ValueError(f"parts must be distinct names from {PARTS}, got {parts!r}")
    return tuple(p for p in PARTS if p in parts)


def _config(n_studies, seed, splits, size_range, abnormal_fraction, abnormality_scale, conspicuity,
            parts=PARTS) -> dict:
    out = {"n_studies": int(n_studies), "seed": int(seed),
            "splits": [[str(s), float(f)] for s, f in splits],
            "size_range": [int(size_range[0]), int(size_range[1])],
            "abnormal_fraction": float(abnormal_fraction)}
    if abnormality_scale != 1.0:  # absent at the default, so datasets made before the knob still match
        out["abnormality_scale"] = float(abnormality_scale)
    if conspicuity != "realistic":  # likewise
        out["conspicuity"] = str(conspicuity)
    if tuple(parts) != PARTS:  # likewise
        out["parts"] = list(parts)
    return out


def _clear(root: Path, split_names) -> None:
    for s in split_names:
        for p in (root / s, ):
            if p.is_dir():
                shutil.rmtree(p)
        for f in (f"{s}_image_paths.csv", f"{s}_labeled_studies.csv"):
            (root / f).unlink(missing_ok=True)
    for sub in ("masks", "evidence"):
        if (root / sub).is_dir():
            shutil.rmtree(root / sub)
    for f in ("boxes.json", "synthetic.json"):
        (root / f).unlink(missing_ok=True)


def _evidence_summary(plan, results) -> dict:
    """synthetic.json's "evidence": per type and per subtype (an image's abnormalities' subtypes
    joined by "+", e.g. "fracture/complete+displaced"), over all splits, the abnormal images, those
    whose evidence is empty, and the fraction of evidence pixels outside the image's mask dilated
    by EVIDENCE_DILATION_PX: the mean of the per-image fractions (images with evidence) and the
    pooled fraction (all pixels together)."""
    groups: dict = {}
    for st, r in zip(plan, results):
        if not st["label"]:
            continue
        sub = "+".join(sorted({a["subtype"] for a in r["abnormalities"]}))
        for key in (st["type"], f"{st['type']}/{sub}"):
            groups.setdefault(key, []).extend(r["evidence"])
    out = {}
    for key, counts in groups.items():
        n = np.array([c[0] for c in counts], np.int64)
        k = np.array([c[1] for c in counts], np.int64)
        has = n > 0
        out[key] = {"images": len(counts), "empty": int((~has).sum()),
                    "mean": round(float(np.mean(k[has] / n[has])), 4) if has.any() else None,
                    "pooled": round(float(k.sum() / n.sum()), 4) if has.any() else None}
    return {"rule": "evidence/.../imageJ.png (abnormal images): 255 where the image's 8-bit value differs "
                    "from the same view rendered without its abnormalities",
            "dilation_px": EVIDENCE_DILATION_PX,
            "outside_dilated_mask": {
                "types": {t: out.get(t, {"images": 0, "empty": 0, "mean": None, "pooled": None}) for t in TYPES},
                "subtypes": {k: v for k, v in out.items() if "/" in k}}}


def generate(out_dir, n_studies: int, seed: int, splits=DEFAULT_SPLITS, size_range=DEFAULT_SIZE_RANGE,
             abnormal_fraction: float = 0.5, workers: int | None = None, overwrite: bool = False,
             abnormality_scale: float = 1.0, conspicuity: str = "realistic", parts=PARTS) -> dict:
    """Write a synthetic MURA-layout dataset to out_dir and return its summary (synthetic.json).

    If out_dir already holds a dataset made with the same arguments and generator version, nothing
    is rewritten and its summary is returned, unless overwrite=True. A folder holding anything else
    raises SyntheticDatasetError. workers: processes (default: CPU count, at most 8); the output
    does not depend on it.
    """
    root = Path(out_dir)
    lo, hi = int(size_range[0]), int(size_range[1])
    if not 32 <= lo <= hi:
        raise ValueError(f"size_range must satisfy 32 <= lo <= hi, got {size_range!r}")
    s_lo, s_hi = les.ABNORMALITY_SCALE_RANGE
    if not (math.isfinite(abnormality_scale) and s_lo <= abnormality_scale <= s_hi):
        raise ValueError(f"abnormality_scale must be within [{s_lo}, {s_hi}], got {abnormality_scale!r}")
    if conspicuity not in les.CONSPICUITY:
        raise ValueError(f"conspicuity must be one of {les.CONSPICUITY}, got {conspicuity!r}")
    parts = _check_parts(parts)
    config = _config(n_studies, seed, splits, (lo, hi), abnormal_fraction, abnormality_scale, conspicuity, parts)
    plan = plan_studies(n_studies, seed, splits, abnormal_fraction, parts)  # validates before touching disk
    split_names = [s for s, _ in splits]
    meta = root / "synthetic.json"
    if root.exists():
        if not root.is_dir():
            raise SyntheticDatasetError(f"{root} exists and is not a folder")
        if meta.is_file() and not (root / _INCOMPLETE_MARKER).exists():
            old = json.loads(meta.read_text())
            if old.get("config") == config and old.get("version") == VERSION and not overwrite:
                return old
            if not overwrite:
                raise SyntheticDatasetError(
                    f"{root} holds a synthetic dataset made with other arguments or version "
                    f"({old.get('config')}, version {old.get('version')}; asked for {config}, version "
                    f"{VERSION}); pass overwrite=True to replace it")
            _clear(root, [s for s, _ in old.get("config", {}).get("splits", [])] + split_names)
        elif (root / _INCOMPLETE_MARKER).exists():
            _clear(root, split_names)
        elif any(root.iterdir()):
            raise SyntheticDatasetError(f"{root} is not empty and holds no synthetic dataset; refusing to write there")
    root.mkdir(parents=True, exist_ok=True)
    (root / _INCOMPLETE_MARKER).write_text("generation in progress\n")
    name = root.resolve().name
    jobs = [(str(root), name, st, int(seed), (lo, hi), float(abnormality_scale), str(conspicuity)) for st in plan]
    if workers is None:
        workers = min(os.cpu_count() or 1, 8)
    if workers <= 1 or len(jobs) < 4:
        results = [_work(j) for j in jobs]
    else:
        ctx = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as ex:
            results = list(ex.map(_work, jobs, chunksize=max(1, min(16, len(jobs) // (4 * workers)))))

    boxes = {}
    summary_splits = {}
    for sp in split_names:
        rows = [(st, r) for st, r in zip(plan, results) if st["split"] == sp]
        img_rows = sorted(p for _, r in rows for p in r["paths"])
        study_rows = sorted((r["study"], st["label"]) for st, r in rows)
        with open(root / f"{sp}_image_paths.csv", "w", newline="") as f:
            csv.writer(f, lineterminator="\n").writerows([p] for p in img_rows)
        with open(root / f"{sp}_labeled_studies.csv", "w", newline="") as f:
            csv.writer(f, lineterminator="\n").writerows(study_rows)
        part_counts = {p: {"studies": 0, "images": 0, "abnormal_studies": 0} for p in parts}
        types = {t: 0 for t in TYPES}
        subtypes: dict = {}
        for st, r in rows:
            part_counts[st["part"]]["studies"] += 1
            part_counts[st["part"]]["images"] += len(r["paths"])
            part_counts[st["part"]]["abnormal_studies"] += st["label"]
            if st["label"]:
                types[st["type"]] += 1
            for a in r["abnormalities"]:
                key = f"{a['type']}/{a['subtype']}"
                subtypes[key] = subtypes.get(key, 0) + 1
            boxes.update(r["boxes"])
        summary_splits[sp] = {
            "patients": len({st["patient"] for st, _ in rows}),
            "studies": len(rows),
            "images": len(img_rows),
            "abnormal_studies": sum(st["label"] for st, _ in rows),
            "abnormal_images": sum(len(r["paths"]) for st, r in rows if st["label"]),
            "parts": part_counts, "types": types, "subtypes": dict(sorted(subtypes.items())),
        }
    (root / "boxes.json").write_text(json.dumps(dict(sorted(boxes.items())), indent=1) + "\n")
    summary = {
        "generator": "mskjax.data.synthetic", "version": VERSION, "name": name, "config": config,
        "splits": summary_splits, "evidence": _evidence_summary(plan, results),
        "totals": {k: sum(v[k] for v in summary_splits.values())
                   for k in ("patients", "studies", "images", "abnormal_studies", "abnormal_images")},
    }
    meta.write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    (root / _INCOMPLETE_MARKER).unlink()
    return json.loads(meta.read_text())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mskjax.data.synthetic", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output folder (its name becomes the CSV path prefix)")
    ap.add_argument("--studies", type=int, default=500, help="number of studies (default 500)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size-range", type=int, nargs=2, default=list(DEFAULT_SIZE_RANGE), metavar=("LO", "HI"),
                    help="long side of each image in pixels, drawn uniformly (default 160 320)")
    ap.add_argument("--abnormal-fraction", type=float, default=0.5)
    ap.add_argument("--abnormality-scale", type=float, default=1.0,
                    help="multiplies every abnormality's size (default 1.0; 0.25-4)")
    ap.add_argument("--conspicuity", choices=les.CONSPICUITY, default="realistic",
                    help="realistic (default): the full mix of fractures and lesions; high: displaced "
                         "fractures and deep lesions through the cortex")
    ap.add_argument("--parts", default="", help="comma-separated body parts to draw (default: all of "
                    + ",".join(PARTS) + ")")
    ap.add_argument("--splits", default="train:0.7,valid:0.15,test:0.15",
                    help="comma-separated name:fraction (default train:0.7,valid:0.15,test:0.15)")
    ap.add_argument("--workers", type=int, default=None, help="processes (default: CPU count, max 8)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing synthetic dataset")
    args = ap.parse_args(argv)
    try:
        splits = tuple((s.split(":")[0], float(s.split(":")[1])) for s in args.splits.split(","))
    except (IndexError, ValueError):
        ap.error(f"--splits must look like train:0.7,valid:0.15,test:0.15, got {args.splits!r}")
    t0 = time.perf_counter()
    summary = generate(args.out, args.studies, args.seed, splits=splits, size_range=tuple(args.size_range),
                       abnormal_fraction=args.abnormal_fraction, workers=args.workers, overwrite=args.overwrite,
                       abnormality_scale=args.abnormality_scale, conspicuity=args.conspicuity,
                       parts=tuple(p.strip() for p in args.parts.split(",") if p.strip()) or PARTS)
    dt = time.perf_counter() - t0
    tot = summary["totals"]
    print(f"{args.out}: {tot['studies']} studies, {tot['images']} images "
          f"({tot['abnormal_studies']} abnormal studies) in {dt:.1f} s")
    return 0

