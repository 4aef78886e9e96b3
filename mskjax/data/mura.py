"""Reader for the MURA-v1.1 layout (real data or synthetic data laid out the same way).

Layout under `root` (the folder that holds the CSVs)::

    <root>/<split>_image_paths.csv       one image path per row, no header
    <root>/<split>_labeled_studies.csv   "<study path>/,<0|1>" per row, no header
    <root>/<split>/XR_<PART>/patientNNNNN/studyN_{positive,negative}/imageN.png
    <root>/masks/<split>/XR_<PART>/.../imageN.png     optional 0/255 mask (synthetic data)
    <root>/evidence/<split>/XR_<PART>/.../imageN.png  optional 0/255 evidence mask (synthetic data)
    <root>/boxes.json                                 optional {"<CSV image path>": [{"box": [x0, y0, x1, y1], "type": ...}]}

Paths in the CSVs begin with the dataset folder's name (``MURA-v1.1/train/...``): the first
component is dropped and the rest joined to `root`, so the folder may be renamed. Any split name
works (the synthetic set also has ``test``).

Labels belong to studies; every image of a study gets the study's label. Bad rows are skipped and
reported in a `SkipReport`, never raised halfway: a row pointing to a missing file, a label not
0/1, duplicate rows, paths outside the `<split>/XR_<PART>/patient/study/image` tree, a study label
that disagrees with the folder suffix (``_positive`` = 1), a study with no images, boxes that are
malformed or fall outside their image, boxes.json entries for images no CSV row names.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
from collections.abc import Iterable, Sequence

import numpy as np
from PIL import Image

from mskjax.data.records import Record, SkipReport

__all__ = ["BODY_PARTS", "BOX_TYPES", "read_mura", "patient_disjoint_split"]

BODY_PARTS = ("XR_ELBOW", "XR_FINGER", "XR_FOREARM", "XR_HAND", "XR_HUMERUS", "XR_SHOULDER", "XR_WRIST")
BOX_TYPES = ("fracture", "hardware", "lesion")

_PATIENT_RE = re.compile(r"patient\d+")
_STUDY_RE = re.compile(r"study\d+_(positive|negative)")
_IMAGE_RE = re.compile(r"image(\d+)\.(png|jpg|jpeg)")
_BOX_TOL = 1e-6  # pixels: boxes may touch the image border, not cross it


class _BadPath(ValueError):
    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind


def read_mura(
    root: str | os.PathLike,
    split: str,
    *,
    body_parts: Iterable[str] | None = None,
) -> tuple[list[Record], SkipReport]:
    """Read one split of a MURA-layout dataset.

    Args:
      root: folder holding ``<split>_image_paths.csv`` and ``<split>_labeled_studies.csv``.
      split: split name, e.g. "train", "valid", "test".
      body_parts: keep only these (e.g. ``["XR_WRIST"]``); None keeps all seven.

    Returns:
      records: one `Record` per valid image, in CSV order. study = "<split>/<XR_PART>/<patient>/<study>",
        patient = "patientNNNNN", view = N - 1 for imageN, label = the study's label, mask_path /
        evidence_path from the optional masks / evidence folders (None where the file is absent),
        boxes / box_types from the optional boxes.json.
      skipped: every row or study left out, with a kind and a reason.

    Raises:
      FileNotFoundError: `root` or one of the two CSVs does not exist.
      ValueError: an unknown body part name, a malformed split name, or a boxes.json that is not a
        JSON object (dataset-level faults, not row-level ones).
    """
    root = os.path.abspath(os.fspath(root))
    if not split or "/" in split or "\\" in split or split in (".", ".."):
        raise ValueError(f"invalid split name {split!r}")
    selected = _check_body_parts(body_parts)
    images_csv = os.path.join(root, f"{split}_image_paths.csv")
    studies_csv = os.path.join(root, f"{split}_labeled_studies.csv")
    for p in (images_csv, studies_csv):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"MURA split {split!r}: no file {p}")
    report = SkipReport()

    studies, skipped_studies = _read_studies(studies_csv, split, selected, report)
    boxes_by_path = _read_boxes_json(root)

    records: list[Record] = []
    seen_images: set[str] = set()
    images_per_study: dict[str, int] = {s: 0 for s in studies}
    for lineno, row in _csv_rows(images_csv):
        where = f"{images_csv}:{lineno}"
        fields = [f for f in row if f.strip()]
        if len(fields) != 1:
            report.add(where, "bad_row", f"expected one image path, got {row!r}")
            continue
        csv_path = fields[0].strip()
        try:
            parts = _parse_csv_path(csv_path, split, depth=5)
        except _BadPath as e:
            report.add(where, e.kind, f"{csv_path!r}: {e}")
            continue
        _, body_part, patient, study_dir, image_name = parts
        if body_part not in selected:
            continue
        rel = "/".join(parts)
        if rel in seen_images:
            report.add(where, "duplicate_row", f"image {csv_path!r} listed again")
            continue
        seen_images.add(rel)
        study_id = "/".join(parts[:4])
        if study_id not in studies:
            if study_id in skipped_studies:
                report.add(where, "study_skipped", f"{csv_path!r}: its study was skipped ({skipped_studies[study_id]})")
            else:
                report.add(where, "unlabeled_study", f"{csv_path!r}: study {study_id!r} is not in {studies_csv}")
            continue
        path = os.path.join(root, *parts)
        if not os.path.isfile(path):
            report.add(where, "missing_file", f"{csv_path!r}: no file at {path}")
            continue
        mask = os.path.join(root, "masks", *parts)
        mask_path = mask if os.path.isfile(mask) else None
        evidence = os.path.join(root, "evidence", *parts)
        evidence_path = evidence if os.path.isfile(evidence) else None
        entries = boxes_by_path.pop(csv_path, [])
        try:
            boxes, box_types = _check_boxes(entries, path)
        except ValueError as e:
            report.add(where, "bad_box", f"{csv_path!r}: {e}")
            continue
        view = int(_IMAGE_RE.fullmatch(image_name).group(1)) - 1
        records.append(
            Record(
                path=path,
                label=studies[study_id],
                study=study_id,
                patient=patient,
                body_part=body_part,
                view=max(view, 0),
                split=split,
                mask_path=mask_path,
                boxes=boxes,
                box_types=box_types,
                evidence_path=evidence_path,
            )
        )
        images_per_study[study_id] += 1

    for study_id, n in images_per_study.items():
        if n == 0:
            report.add(study_id, "empty_study", f"labelled study {study_id!r} has no readable image rows")

    for csv_path in boxes_by_path:  # entries no kept image claimed
        try:
            parts = _parse_csv_path(csv_path, split, depth=5)
        except _BadPath:
            continue  # another split's entry, or not an image path of this tree
        if parts[1] in selected and "/".join(parts) not in seen_images:
            report.add(os.path.join(root, "boxes.json"), "orphan_annotation", f"boxes for {csv_path!r}, which no CSV row names")
    return records, report


def patient_disjoint_split(
    records: Sequence[Record], fraction: float, seed: int, *, name: str = "val"
) -> tuple[list[Record], list[Record]]:
    """Carve a validation split out of `records` so that no patient is on both sides.

    A seeded random `fraction` of the *patients* (not images; rounded, at least one and at most all
    but one when there are two or more patients) moves to the new split, whose records get
    ``split=name``. Deterministic for a given seed and set of records (patients are sorted before
    shuffling, so input order does not matter); order within each output follows the input.

    Returns:
      (kept, carved) lists of `Record`.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    patients = sorted({r.patient for r in records})
    if len(patients) < 2:
        raise ValueError(f"need at least two patients to split, got {len(patients)}")
    n_carved = min(max(int(round(fraction * len(patients))), 1), len(patients) - 1)
    order = np.random.default_rng(seed).permutation(len(patients))
    carved_patients = {patients[i] for i in order[:n_carved]}
    kept, carved = [], []
    for r in records:
        if r.patient in carved_patients:
            carved.append(dataclasses.replace(r, split=name))
        else:
            kept.append(r)
    return kept, carved


# --------------------------------------------------------------------------------------------


def _check_body_parts(body_parts: Iterable[str] | None) -> frozenset[str]:
    if body_parts is None:
        return frozenset(BODY_PARTS)
    if isinstance(body_parts, str):
        body_parts = [body_parts]
    chosen = frozenset(body_parts)
    unknown = sorted(chosen - set(BODY_PARTS))
    if unknown:
        raise ValueError(f"unknown MURA body part(s) {unknown}; known: {list(BODY_PARTS)}")
    return chosen


def _csv_rows(path: str):
    with open(path, newline="", encoding="utf-8") as f:
        for lineno, row in enumerate(csv.reader(f), start=1):
            if not row or not any(field.strip() for field in row):
                continue
            yield lineno, row


def _parse_csv_path(csv_path: str, split: str, depth: int) -> list[str]:
    """'<dataset>/<split>/XR_PART/patient/study[/imageN.png]' -> the components after <dataset>."""
    if csv_path.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", csv_path):
        raise _BadPath("outside_tree", "absolute path")
    parts = [p for p in csv_path.rstrip("/").split("/")]
    if any(p in ("", ".", "..") for p in parts):
        raise _BadPath("outside_tree", "empty, '.' or '..' path component")
    if len(parts) != depth + 1:
        raise _BadPath("outside_tree", f"expected <dataset>/{split}/XR_<PART>/patient/study{'/image' if depth == 5 else ''}")
    parts = parts[1:]
    if parts[0] != split:
        raise _BadPath("outside_tree", f"path is in split {parts[0]!r}, not {split!r}")
    if not parts[1].startswith("XR_"):
        raise _BadPath("outside_tree", f"{parts[1]!r} is not an XR_<PART> folder")
    if parts[1] not in BODY_PARTS:
        raise _BadPath("unknown_body_part", f"unknown body part {parts[1]!r}")
    if not _PATIENT_RE.fullmatch(parts[2]):
        raise _BadPath("outside_tree", f"{parts[2]!r} is not a patientNNNNN folder")
    if not _STUDY_RE.fullmatch(parts[3]):
        raise _BadPath("outside_tree", f"{parts[3]!r} is not a studyN_positive/negative folder")
    if depth == 5 and not _IMAGE_RE.fullmatch(parts[4]):
        raise _BadPath("outside_tree", f"{parts[4]!r} is not an imageN.png file name")
    return parts


def _read_studies(
    path: str, split: str, selected: frozenset[str], report: SkipReport
) -> tuple[dict[str, int], dict[str, str]]:
    """study id -> label for valid rows; study id -> reason for studies skipped as a whole."""
    studies: dict[str, int] = {}
    skipped: dict[str, str] = {}
    for lineno, row in _csv_rows(path):
        where = f"{path}:{lineno}"
        if len(row) != 2:
            report.add(where, "bad_row", f"expected '<study path>/,<label>', got {row!r}")
            continue
        csv_path, label_text = row[0].strip(), row[1].strip()
        try:
            parts = _parse_csv_path(csv_path, split, depth=4)
        except _BadPath as e:
            report.add(where, e.kind, f"{csv_path!r}: {e}")
            continue
        if parts[1] not in selected:
            continue
        study_id = "/".join(parts)
        if label_text not in ("0", "1"):
            report.add(where, "bad_label", f"study {csv_path!r}: label {label_text!r} is not 0 or 1")
            skipped.setdefault(study_id, "bad label")
            continue
        label = int(label_text)
        folder_label = 1 if parts[3].endswith("_positive") else 0
        if label != folder_label:
            reason = f"label {label} disagrees with folder {parts[3]!r}"
            report.add(where, "label_mismatch", f"study {csv_path!r}: {reason}")
            skipped[study_id] = reason
            studies.pop(study_id, None)
            continue
        if study_id in skipped:
            report.add(where, "study_skipped", f"study {csv_path!r} was already skipped ({skipped[study_id]})")
            continue
        if study_id in studies:
            report.add(where, "duplicate_row", f"study {csv_path!r} listed again")
            continue
        studies[study_id] = label
    return studies, skipped


def _read_boxes_json(root: str) -> dict[str, list]:
    path = os.path.join(root, "boxes.json")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected an object mapping CSV image paths to box lists")
    return dict(data)


def _check_boxes(entries, image_path: str) -> tuple[tuple, tuple]:
    """Validate boxes.json entries for one image against its displayed size; raise ValueError."""
    if not isinstance(entries, list):
        raise ValueError(f"boxes entry must be a list, got {type(entries).__name__}")
    if not entries:
        return (), ()
    width, height = _displayed_size(image_path)
    boxes, types = [], []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or set(entry) != {"box", "type"}:
            raise ValueError(f"box {i}: expected {{'box': [x0, y0, x1, y1], 'type': ...}}, got {entry!r}")
        box, kind = entry["box"], entry["type"]
        if kind not in BOX_TYPES:
            raise ValueError(f"box {i}: unknown type {kind!r}; known: {list(BOX_TYPES)}")
        if (
            not isinstance(box, list)
            or len(box) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in box)
        ):
            raise ValueError(f"box {i}: expected four finite numbers, got {box!r}")
        x0, y0, x1, y1 = (float(v) for v in box)
        if not (x0 < x1 and y0 < y1):
            raise ValueError(f"box {i}: {box} is empty or inverted (need x0 < x1, y0 < y1)")
        if x0 < -_BOX_TOL or y0 < -_BOX_TOL or x1 > width + _BOX_TOL or y1 > height + _BOX_TOL:
            raise ValueError(f"box {i}: {box} lies outside the {width}x{height} image")
        boxes.append((x0, y0, x1, y1))
        types.append(kind)
    return tuple(boxes), tuple(types)


def _displayed_size(path: str) -> tuple[int, int]:
    """(width, height) after EXIF orientation, from the header only."""
    try:
        with Image.open(path) as im:
            width, height = im.size
            orientation = im.getexif().get(0x0112, 1)
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot read image header of {path} to check its boxes ({e})") from e
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)
