"""Reader for the FracAtlas development folder (see ../shared/data/README.md).

Layout under `root`::

    dataset.csv        image_id, region flags (hand, leg, hip, shoulder, mixed), hardware, multiscan,
                       fractured, fracture_count, view flags (frontal, lateral, oblique), split,
                       width, height, original_width, original_height
    annotations.json   COCO: images (id, file_name, width, height), annotations (image_id, bbox
                       [x, y, w, h], segmentation polygons), all in the images' pixel frame
    images/<image_id>  8-bit grayscale JPEGs, already EXIF-transposed
    masks/<stem>.png   0/255 union of the fracture polygons (fractured images only)

Records: label = `fractured`; boxes are the COCO bboxes converted to (x0, y0, x1, y1) = (x, y, x + w,
y + h) in image pixels, type "fracture"; mask_path for fractured images; region, hardware,
multiscan and view flags, fracture_count and the size columns go in `extra`.

FracAtlas has **no patient ids**: `patient` (and `study`) is the image id, so splits cannot be made
patient-disjoint, and several images of one patient (the `multiscan` flag) may land on both sides.

Skipped and reported (never raised halfway): CSV rows with bad fields or duplicate ids, rows whose
image file is missing, annotations naming images absent from annotations.json / dataset.csv / the
images folder, polygons or boxes outside their image (beyond 1e-3 px; coordinates within that
tolerance are clipped), a bbox that disagrees with its polygon's bounds by more than 1 px, an
image size in annotations.json differing from dataset.csv, annotations on an image labelled not
fractured, a fractured annotated image without its mask. An image with any bad annotation is
skipped whole, so a kept record never carries partial ground truth.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from collections.abc import Iterable, Sequence

import numpy as np

from mskjax.data.records import Record, SkipReport

__all__ = ["REGIONS", "VIEWS", "read_fracatlas", "tuning_split"]

REGIONS = ("hand", "leg", "hip", "shoulder", "mixed")
VIEWS = ("frontal", "lateral", "oblique")
_FLAGS = REGIONS + ("hardware", "multiscan", "fractured") + VIEWS
_INTS = ("fracture_count", "width", "height", "original_width", "original_height")
_REQUIRED = ("image_id",) + _FLAGS + _INTS + ("split",)
_COORD_TOL = 1e-3  # pixels
_BBOX_POLY_TOL = 1.0  # pixels


def read_fracatlas(
    root: str | os.PathLike, *, splits: Iterable[str] | None = None
) -> tuple[list[Record], SkipReport]:
    """Read FracAtlas (development part) into records.

    Args:
      root: folder with dataset.csv, annotations.json, images/ and masks/.
      splits: keep only rows of these splits (e.g. ``["train"]``); None keeps all.

    Returns:
      (records in dataset.csv order, skip report). body_part is the single region flag set, or
      "mixed" when the `mixed` flag or several regions are set, or "unknown" when none is.

    Raises:
      FileNotFoundError: root, dataset.csv or annotations.json missing.
      ValueError: dataset.csv lacks a required column, or annotations.json is not COCO-shaped.
    """
    root = os.path.abspath(os.fspath(root))
    csv_path = os.path.join(root, "dataset.csv")
    json_path = os.path.join(root, "annotations.json")
    for p in (csv_path, json_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"FracAtlas: no file {p}")
    wanted = None if splits is None else frozenset([splits] if isinstance(splits, str) else splits)
    report = SkipReport()

    rows, not_selected = _read_rows(csv_path, root, wanted, report)
    anns_by_file, bad_files = _read_annotations(json_path, root, rows, not_selected, report)

    records = []
    for image_id, row in rows.items():
        where = f"{csv_path}:{row['_lineno']}"
        if image_id in bad_files:
            continue  # already reported with the annotation that broke it
        anns = anns_by_file.get(image_id, [])
        if anns and row["fractured"] != 1:
            report.add(where, "label_mismatch", f"{image_id}: {len(anns)} fracture annotation(s) but fractured=0")
            continue
        mask_path = None
        if row["fractured"] == 1 and anns:
            mask = os.path.join(root, "masks", os.path.splitext(image_id)[0] + ".png")
            if not os.path.isfile(mask):
                report.add(where, "missing_mask", f"{image_id}: annotated fracture but no mask at {mask}")
                continue
            mask_path = mask
        extra = {k: row[k] for k in _FLAGS + _INTS if k != "fractured"}
        extra["annotation_ids"] = tuple(a_id for a_id, _ in anns)
        stem = os.path.splitext(image_id)[0]
        records.append(
            Record(
                path=os.path.join(root, "images", image_id),
                label=row["fractured"],
                study=stem,
                patient=stem,  # FracAtlas has no patient ids
                body_part=_body_part(row),
                view=0,
                split=row["split"],
                mask_path=mask_path,
                boxes=tuple(box for _, box in anns),
                box_types=("fracture",) * len(anns),
                extra=extra,
            )
        )
    return records, report


def tuning_split(
    records: Sequence[Record], fraction: float, seed: int, *, name: str = "tune"
) -> tuple[list[Record], list[Record]]:
    """Carve a seeded tuning split from `records` (normally the train records), stratified by label.

    For each label, round(fraction * count) records (at least one when that label has two or more)
    move to the new split with ``split=name``. Records are sorted by path before the seeded shuffle,
    so the result does not depend on input order; output order follows the input. Not
    patient-disjoint: FracAtlas has no patient ids.

    Returns:
      (kept, carved).
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    carved_paths: set[str] = set()
    for label in (0, 1):
        group = sorted(r.path for r in records if r.label == label)
        if not group:
            continue
        n = int(round(fraction * len(group)))
        if len(group) >= 2:
            n = min(max(n, 1), len(group) - 1)
        order = rng.permutation(len(group))
        carved_paths.update(group[i] for i in order[:n])
    kept, carved = [], []
    for r in records:
        if r.path in carved_paths:
            carved.append(dataclasses.replace(r, split=name))
        else:
            kept.append(r)
    return kept, carved


# --------------------------------------------------------------------------------------------


def _body_part(row: dict) -> str:
    regions = [k for k in REGIONS[:-1] if row[k] == 1]
    if row["mixed"] == 1 or len(regions) > 1:
        return "mixed"
    return regions[0] if regions else "unknown"


def _read_rows(csv_path: str, root: str, wanted, report: SkipReport) -> tuple[dict[str, dict], set[str]]:
    """Kept rows by image_id, and the ids of valid rows left out because of their split."""
    rows: dict[str, dict] = {}
    not_selected: set[str] = set()
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in _REQUIRED if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{csv_path}: missing column(s) {missing}")
        for lineno, raw in enumerate(reader, start=2):
            where = f"{csv_path}:{lineno}"
            image_id = (raw["image_id"] or "").strip()
            try:
                row = _parse_row(raw)
            except ValueError as e:
                report.add(where, "bad_row", f"{image_id or '<no id>'}: {e}")
                continue
            if wanted is not None and row["split"] not in wanted:
                not_selected.add(image_id)
                continue
            if image_id in rows:
                report.add(where, "duplicate_row", f"{image_id} listed again")
                continue
            path = os.path.join(root, "images", image_id)
            if not os.path.isfile(path):
                report.add(where, "missing_file", f"{image_id}: no file at {path}")
                continue
            row["_lineno"] = lineno
            rows[image_id] = row
    return rows, not_selected - set(rows)


def _parse_row(raw: dict) -> dict:
    image_id = (raw["image_id"] or "").strip()
    if not image_id or "/" in image_id or "\\" in image_id or image_id in (".", ".."):
        raise ValueError(f"invalid image_id {raw['image_id']!r}")
    row: dict = {"image_id": image_id, "split": (raw["split"] or "").strip()}
    if not row["split"]:
        raise ValueError("empty split")
    for k in _FLAGS:
        v = (raw[k] or "").strip()
        if v not in ("0", "1"):
            raise ValueError(f"column {k!r} must be 0 or 1, got {raw[k]!r}")
        row[k] = int(v)
    for k in _INTS:
        try:
            row[k] = int((raw[k] or "").strip())
        except ValueError:
            raise ValueError(f"column {k!r} must be an integer, got {raw[k]!r}") from None
        if row[k] < 0 or (k in ("width", "height") and row[k] == 0):
            raise ValueError(f"column {k!r} out of range: {row[k]}")
    return row


def _read_annotations(json_path: str, root: str, rows: dict[str, dict], not_selected: set[str], report: SkipReport):
    """image_id (file name) -> [(annotation id, (x0, y0, x1, y1))]; set of file names with bad ones."""
    with open(json_path, encoding="utf-8") as f:
        try:
            coco = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{json_path}: not valid JSON ({e})") from e
    if not isinstance(coco, dict) or not isinstance(coco.get("images"), list) or not isinstance(coco.get("annotations"), list):
        raise ValueError(f"{json_path}: expected a COCO object with 'images' and 'annotations' lists")
    images: dict = {}
    for im in coco["images"]:
        try:
            images[im["id"]] = (str(im["file_name"]), int(im["width"]), int(im["height"]))
        except (KeyError, TypeError, ValueError):
            report.add(json_path, "bad_annotation", f"malformed image entry {im!r}")
    by_file: dict[str, list] = {}
    bad_files: set[str] = set()
    for ann in coco["annotations"]:
        ann_id = ann.get("id") if isinstance(ann, dict) else None
        where = f"{json_path}: annotation {ann_id}"
        if not isinstance(ann, dict) or ann.get("image_id") not in images:
            report.add(where, "missing_image", f"names image id {ann.get('image_id') if isinstance(ann, dict) else ann!r}, absent from 'images'")
            continue
        file_name, width, height = images[ann["image_id"]]
        if file_name in not_selected:
            continue  # an image of a split the caller did not ask for
        if file_name not in rows:
            in_dir = os.path.isfile(os.path.join(root, "images", file_name))
            why = "not a kept dataset.csv row" if in_dir else "no such file in images/"
            report.add(where, "missing_image", f"names {file_name}: {why}")
            continue
        row = rows[file_name]
        if (width, height) != (row["width"], row["height"]):
            if file_name not in bad_files:
                report.add(where, "size_mismatch", f"{file_name}: annotations.json says {width}x{height}, dataset.csv {row['width']}x{row['height']}")
            bad_files.add(file_name)
            continue
        try:
            box = _annotation_box(ann, width, height)
        except ValueError as e:
            kind = "outside_image" if "outside" in str(e) else "bad_annotation"
            report.add(where, kind, f"{file_name} ({width}x{height}): {e}; image skipped")
            bad_files.add(file_name)
            continue
        by_file.setdefault(file_name, []).append((ann_id, box))
    return by_file, bad_files


def _annotation_box(ann: dict, width: int, height: int) -> tuple[float, float, float, float]:
    """Validate one COCO annotation; return its bbox as (x0, y0, x1, y1) clipped into the image."""
    bbox = ann.get("bbox")
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(_finite(v) for v in bbox):
        raise ValueError(f"bbox {bbox!r} is not four finite numbers")
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        raise ValueError(f"bbox {bbox} has non-positive size")
    box = (x, y, x + w, y + h)
    _check_inside(box, width, height, "bbox")
    polys = ann.get("segmentation")
    if polys:
        if not isinstance(polys, list) or not all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 for p in polys):
            raise ValueError("segmentation is not a list of polygons [x0, y0, x1, y1, ...]")
        pts = np.asarray([v for p in polys for v in p], dtype=np.float64).reshape(-1, 2)
        if not np.all(np.isfinite(pts)):
            raise ValueError("segmentation has non-finite coordinates")
        bounds = (pts[:, 0].min(), pts[:, 1].min(), pts[:, 0].max(), pts[:, 1].max())
        _check_inside(bounds, width, height, "polygon")
        if max(abs(a - b) for a, b in zip(bounds, box)) > _BBOX_POLY_TOL:
            raise ValueError(f"bbox {box} disagrees with its polygon bounds {tuple(float(b) for b in bounds)}")
    return (
        min(max(box[0], 0.0), width),
        min(max(box[1], 0.0), height),
        min(max(box[2], 0.0), width),
        min(max(box[3], 0.0), height),
    )


def _check_inside(box, width: int, height: int, what: str) -> None:
    x0, y0, x1, y1 = box
    if x0 < -_COORD_TOL or y0 < -_COORD_TOL or x1 > width + _COORD_TOL or y1 > height + _COORD_TOL:
        raise ValueError(f"{what} {tuple(float(v) for v in box)} lies outside the image")


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
