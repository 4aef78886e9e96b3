"""FracAtlas reader: the real folder in ../shared/data (counts from its README, boxes against masks)
and tiny broken copies written here (new small CSV / JSON / image files, nothing copied)."""
from __future__ import annotations

import collections
import csv
import json

import numpy as np
import pytest
from PIL import Image

from mskjax.data.fracatlas import read_fracatlas, tuning_split


@pytest.fixture(scope="module")
def real(shared_data):
    return read_fracatlas(shared_data / "fracatlas")


# ---------------------------------------------------------------------------------- real folder


def test_real_counts_match_readme(real):
    records, skipped = real
    assert not skipped, skipped.summary()
    assert len(records) == 2138
    assert sum(r.label for r in records) == 656
    counts = collections.Counter((r.split, r.label) for r in records)
    assert counts == {("train", 1): 574, ("train", 0): 1295, ("valid", 1): 82, ("valid", 0): 187}
    assert len({r.study for r in records}) == 2138
    assert all(r.patient == r.study == r.path.rsplit("/", 1)[1][:-4] for r in records)  # no patient ids


def test_real_boxes_masks_and_flags(real, shared_data):
    records, _ = real
    fractured = [r for r in records if r.label == 1]
    assert all(r.mask_path is not None and len(r.boxes) >= 1 for r in fractured)
    assert all(r.mask_path is None and r.boxes == () for r in records if r.label == 0)
    assert sum(len(r.boxes) for r in records) == 855  # COCO annotations in annotations.json
    assert all(set(r.box_types) <= {"fracture"} for r in records)
    r = next(r for r in records if r.path.endswith("IMG0000019.jpg"))
    # COCO bbox [221.068..., 165.174..., 48.628..., 26.191...] -> (x, y, x + w, y + h)
    np.testing.assert_allclose(r.boxes[0], [221.06848184818483, 165.17491749174923,
                                            221.06848184818483 + 48.62830033003303,
                                            165.17491749174923 + 26.19141914191417])
    assert set(r.extra) >= {"hand", "leg", "hip", "shoulder", "mixed", "hardware", "multiscan",
                            "frontal", "lateral", "oblique", "fracture_count", "width", "height"}
    assert collections.Counter(r.body_part for r in records) == {
        "leg": 1032, "hand": 728, "mixed": 232, "hip": 100, "shoulder": 46}
    assert sum(r.extra["hardware"] for r in records) > 0


def test_real_boxes_agree_with_masks_and_image_sizes(real):
    records, _ = real
    for r in records:
        with Image.open(r.path) as im:
            assert im.size == (r.extra["width"], r.extra["height"]), r.path
        for x0, y0, x1, y1 in r.boxes:
            assert 0 <= x0 < x1 <= r.extra["width"] and 0 <= y0 < y1 <= r.extra["height"], r.path
        if r.mask_path is None:
            continue
        mask = np.asarray(Image.open(r.mask_path)) > 127
        assert mask.shape == (r.extra["height"], r.extra["width"]), r.mask_path
        ys, xs = np.nonzero(mask)
        # Every mask pixel lies in some box (1 px slack for polygon rasterisation) ...
        inside = np.zeros(xs.shape, bool)
        for x0, y0, x1, y1 in r.boxes:
            inside |= (xs + 0.5 >= x0 - 1) & (xs + 0.5 <= x1 + 1) & (ys + 0.5 >= y0 - 1) & (ys + 0.5 <= y1 + 1)
        assert inside.all(), r.mask_path
        # ... and the mask's extent matches the boxes' union (x, y in the same frame, not swapped).
        bx0, by0 = min(b[0] for b in r.boxes), min(b[1] for b in r.boxes)
        bx1, by1 = max(b[2] for b in r.boxes), max(b[3] for b in r.boxes)
        assert abs(xs.min() - bx0) <= 2 and abs(ys.min() - by0) <= 2, r.mask_path
        assert abs(xs.max() + 1 - bx1) <= 2 and abs(ys.max() + 1 - by1) <= 2, r.mask_path


def test_real_split_filter(shared_data):
    valid, skipped = read_fracatlas(shared_data / "fracatlas", splits=["valid"])
    assert len(valid) == 269 and not skipped and {r.split for r in valid} == {"valid"}


def test_tuning_split_stratified_and_seeded(real):
    train = [r for r in real[0] if r.split == "train"]
    kept, tune = tuning_split(train, 0.1, seed=0)
    assert len(kept) + len(tune) == len(train)
    assert {r.path for r in kept}.isdisjoint({r.path for r in tune})
    assert sum(r.label for r in tune) == round(0.1 * 574)
    assert sum(1 - r.label for r in tune) == round(0.1 * 1295)
    assert {r.split for r in tune} == {"tune"} and {r.split for r in kept} == {"train"}
    again = tuning_split(list(reversed(train)), 0.1, seed=0)[1]
    assert {r.path for r in again} == {r.path for r in tune}
    assert {r.path for r in tuning_split(train, 0.1, seed=1)[1]} != {r.path for r in tune}
    with pytest.raises(ValueError, match="fraction"):
        tuning_split(train, 1.0, seed=0)


# ---------------------------------------------------------------------------------- broken copies

_COLUMNS = ["image_id", "hand", "leg", "hip", "shoulder", "mixed", "hardware", "multiscan", "fractured",
            "fracture_count", "frontal", "lateral", "oblique", "split", "width", "height",
            "original_width", "original_height"]


def _row(image_id, fractured, split="train", w=40, h=30, **over):
    row = dict(image_id=image_id, hand=1, leg=0, hip=0, shoulder=0, mixed=0, hardware=0, multiscan=0,
               fractured=fractured, fracture_count=fractured, frontal=1, lateral=0, oblique=0, split=split,
               width=w, height=h, original_width=w * 4, original_height=h * 4)
    row.update(over)
    return row


def _poly(x0, y0, x1, y1):
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def _ann(ann_id, image_id, x0, y0, x1, y1, poly=None):
    return {"id": ann_id, "image_id": image_id, "category_id": 0, "iscrowd": 0,
            "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
            "segmentation": [poly if poly is not None else _poly(x0, y0, x1, y1)]}


def _write_set(root, rows, coco_images, annotations, masks=(), skip_files=()):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    with open(root / "dataset.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    for row in rows:
        if row["image_id"] not in skip_files:
            Image.new("L", (int(row["width"]), int(row["height"])), 60).save(root / "images" / row["image_id"])
    for stem in masks:
        Image.new("L", (40, 30), 0).save(root / "masks" / f"{stem}.png")
    (root / "annotations.json").write_text(json.dumps({
        "info": {}, "categories": [{"id": 0, "name": "fractured"}],
        "images": coco_images, "annotations": annotations}))


def _img(i, name, w=40, h=30):
    return {"id": i, "file_name": name, "width": w, "height": h}


def test_clean_tiny_set(tmp_path):
    rows = [_row("A.jpg", 1), _row("B.jpg", 0, split="valid")]
    _write_set(tmp_path, rows, [_img(1, "A.jpg")],
               [_ann(10, 1, 5, 6, 15, 16), _ann(11, 1, 20.0, 20.0, 40.0, 30.0000000000001)], masks=["A"])
    records, skipped = read_fracatlas(tmp_path)
    assert not skipped, skipped.summary()
    a, b = records
    assert a.label == 1 and a.boxes == ((5.0, 6.0, 15.0, 16.0), (20.0, 20.0, 40.0, 30.0))  # clipped within tolerance
    assert a.box_types == ("fracture", "fracture") and a.mask_path == str(tmp_path / "masks" / "A.png")
    assert a.extra["annotation_ids"] == (10, 11) and a.body_part == "hand" and a.split == "train"
    assert b.label == 0 and b.boxes == () and b.mask_path is None and b.split == "valid"
    # Choosing a split is not a fault: A's annotations are not reported as orphans.
    only_valid, skipped = read_fracatlas(tmp_path, splits="valid")
    assert [r.study for r in only_valid] == ["B"] and not skipped, skipped.summary()


def test_every_broken_case_skipped_and_reported(tmp_path):
    rows = [
        _row("OK.jpg", 1),
        _row("OUT.jpg", 1),  # polygon outside the image
        _row("MIS.jpg", 1),  # bbox disagrees with polygon
        _row("SIZE.jpg", 1),  # annotations.json size differs from dataset.csv
        _row("NORM.jpg", 0),  # annotated but labelled normal
        _row("NOMASK.jpg", 1),  # annotated, no mask file
        _row("GONE.jpg", 0),  # image file missing
        _row("BAD.jpg", 0, hand=7),  # bad flag value
        _row("OK.jpg", 1),  # duplicate row
        _row("MIX.jpg", 0, hip=1, mixed=1),
    ]
    images_ = [_img(1, "OK.jpg"), _img(2, "OUT.jpg"), _img(3, "MIS.jpg"), _img(4, "SIZE.jpg", w=41),
               _img(5, "NORM.jpg"), _img(6, "NOMASK.jpg"), _img(7, "NOWHERE.jpg")]
    anns = [
        _ann(1, 1, 5, 5, 10, 10),
        _ann(2, 2, 30, 20, 45, 29, poly=_poly(30, 20, 45, 29)),  # x1 = 45 > width 40
        _ann(3, 3, 5, 5, 10, 10, poly=_poly(5, 5, 20, 10)),  # polygon reaches x = 20, bbox says 10
        _ann(4, 4, 5, 5, 10, 10),
        _ann(5, 5, 5, 5, 10, 10),
        _ann(6, 6, 5, 5, 10, 10),
        _ann(7, 7, 5, 5, 10, 10),  # image entry whose file is in neither CSV nor images/
        _ann(8, 99, 5, 5, 10, 10),  # image id absent from 'images'
    ]
    _write_set(tmp_path, rows, images_, anns, masks=["OK", "OUT", "MIS", "SIZE", "NORM"], skip_files=["GONE.jpg"])
    records, skipped = read_fracatlas(tmp_path)
    assert [r.path.rsplit("/", 1)[1] for r in records] == ["OK.jpg", "MIX.jpg"]
    assert records[1].body_part == "mixed"
    assert skipped.counts() == {
        "missing_image": 2,
        "outside_image": 1,
        "bad_annotation": 1,
        "size_mismatch": 1,
        "label_mismatch": 1,
        "missing_mask": 1,
        "missing_file": 1,
        "bad_row": 1,
        "duplicate_row": 1,
    }, skipped.summary()
    by_kind = {s.kind: s for s in skipped}
    assert "OUT.jpg" in by_kind["outside_image"].reason and "annotation 2" in by_kind["outside_image"].where
    assert "disagrees" in by_kind["bad_annotation"].reason
    assert "41x30" in by_kind["size_mismatch"].reason
    assert "GONE.jpg" in by_kind["missing_file"].reason
    assert "'hand'" in by_kind["bad_row"].reason


def test_missing_column_raises(tmp_path):
    _write_set(tmp_path, [_row("A.jpg", 0)], [], [])
    text = (tmp_path / "dataset.csv").read_text().replace("multiscan", "multi_scan")
    (tmp_path / "dataset.csv").write_text(text)
    with pytest.raises(ValueError, match="multiscan"):
        read_fracatlas(tmp_path)


def test_missing_annotations_file_raises(tmp_path):
    _write_set(tmp_path, [_row("A.jpg", 0)], [], [])
    (tmp_path / "annotations.json").unlink()
    with pytest.raises(FileNotFoundError, match="annotations.json"):
        read_fracatlas(tmp_path)
