"""What the command lines take as input: image paths and dataset specs, as pipeline Items.

    items_from_paths(["a.png", "folder/"])            files and folders (searched recursively)
    items_from_dataset("fracatlas:DIR:tune")          a dataset split with its ground truth

A dataset spec is KIND:DIR[:SPLIT] with KIND one of synthetic, mura, fracatlas; SPLIT defaults to
the held-out one (DEFAULT_SPLITS), and "tune" names the validation split `mskjax.train` carves
from train (images the classifier never trained on, for choosing thresholds).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from mskjax.data.fracatlas import read_fracatlas
from mskjax.data.mura import read_mura
from mskjax.data.splits import tuning_records
from mskjax.pipeline import Item

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
DEFAULT_SPLITS = {"synthetic": "test", "mura": "valid", "fracatlas": "valid"}
# mura:DIR:tune / fracatlas:DIR:tune: the validation split mskjax.train carves from the official
# train split (default data.valid_fraction and seed 0), which its classifier never trains on.
TUNE_SPLIT = "tune"


class InputError(ValueError):
    """Inputs that cannot be resolved (unknown dataset kind, missing folder)."""


def items_from_paths(paths: Sequence[str]):
    """(items, skips) for files and folders given on a command line. A folder is searched
    recursively for image files (IMAGE_SUFFIXES, sorted). A folder that holds none is a skip
    (folder, reason), so the run counts and lists it instead of dropping it. A path that does not
    exist still becomes an item, so the run reports it as unreadable with its reason."""
    files: list[str] = []
    skips: list[tuple[str, str]] = []
    for p in paths:
        if os.path.isdir(p):
            found = sorted(str(q) for q in Path(p).rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES and q.is_file())
            if not found:
                others = sum(1 for q in Path(p).rglob("*") if q.is_file())
                skips.append((os.path.abspath(p), f"folder holds no image file ({' '.join(sorted(IMAGE_SUFFIXES))})"
                              + (f"; {others} other file(s) ignored" if others else "; it is empty")))
            files += found
        else:
            files.append(p)
    return [Item(path=os.path.abspath(f), study=os.path.dirname(os.path.abspath(f))) for f in files], skips


def parse_dataset(spec: str) -> tuple[str, str, str]:
    """'kind:DIR[:SPLIT]' -> (kind, DIR, SPLIT) with the kind's default split."""
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in DEFAULT_SPLITS or not rest:
        raise InputError(f"--dataset must be mura:DIR, fracatlas:DIR or synthetic:DIR (optionally :SPLIT); got {spec!r}")
    root, split = rest, DEFAULT_SPLITS[kind]
    if not os.path.isdir(rest) and ":" in rest:
        head, tail = rest.rsplit(":", 1)
        if tail and "/" not in tail:
            root, split = head, tail
    if not os.path.isdir(root):
        raise InputError(f"--dataset {spec}: folder not found: {root}")
    return kind, root, split


def items_from_dataset(spec: str):
    """(items, reader_skips [(where, reason)], description) for a dataset spec."""
    kind, root, split = parse_dataset(spec)
    if split == TUNE_SPLIT and kind in ("mura", "fracatlas"):
        # The validation split mskjax.train carves from train (its default valid_fraction and seed: data.splits.tuning_records):
        # images the classifier did not train on, for choosing thresholds.
        splits = tuning_records(kind, root)
        records, report = splits.records["valid"], [s for _, s in splits.skipped]
    elif kind in ("mura", "synthetic"):
        records, report = read_mura(root, split)
    else:
        records, report = read_fracatlas(root, splits=[split])
    items = [Item(path=r.path, study=r.study, label=r.label, body_part=r.body_part, mask_path=r.mask_path,
                  gt_boxes=tuple(r.boxes), evidence_path=r.evidence_path) for r in records]
    skips = [(s.where, f"[{s.kind}] {s.reason}") for s in report]
    return items, skips, f"{kind} at {root}, split {split!r}"
