"""MURA-layout reader on small trees written here, each bad case included; Record and SkipReport."""
from __future__ import annotations

import dataclasses
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from mskjax.data.mura import BODY_PARTS, patient_disjoint_split, read_mura
from mskjax.data.records import Record, SkipReport

PREFIX = "MURA-v1.1"


def _png(path, w=8, h=6, value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w), value, np.uint8)).save(path)


def _make_tree(root, split="train", studies=None, prefix=PREFIX):
    """studies: list of (part, patient, study_dir, n_images). Returns (image csv rows, study csv rows)."""
    studies = studies or [
        ("XR_WRIST", "patient00001", "study1_positive", 2),
        ("XR_WRIST", "patient00001", "study2_negative", 1),
        ("XR_WRIST", "patient00002", "study1_negative", 3),
        ("XR_HAND", "patient00003", "study1_positive", 1),
    ]
    image_rows, study_rows = [], []
    for part, patient, study, n in studies:
        rel = f"{split}/{part}/{patient}/{study}"
        study_rows.append([f"{prefix}/{rel}/", "1" if study.endswith("positive") else "0"])
        for i in range(1, n + 1):
            _png(root / rel / f"image{i}.png", value=10 * i)
            image_rows.append([f"{prefix}/{rel}/image{i}.png"])
    _write_csvs(root, split, image_rows, study_rows)
    return image_rows, study_rows


def _write_csvs(root, split, image_rows, study_rows):
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{split}_image_paths.csv").write_text("".join(",".join(r) + "\n" for r in image_rows))
    (root / f"{split}_labeled_studies.csv").write_text("".join(",".join(r) + "\n" for r in study_rows))


# ---------------------------------------------------------------------------------- good trees


def test_reads_clean_tree(tmp_path):
    _make_tree(tmp_path)
    records, skipped = read_mura(tmp_path, "train")
    assert len(skipped) == 0, skipped.summary()
    assert len(records) == 7
    r = records[0]
    assert r.path == str(tmp_path / "train/XR_WRIST/patient00001/study1_positive/image1.png")
    assert os.path.isabs(r.path) and os.path.isfile(r.path)
    assert (r.label, r.study, r.patient, r.body_part, r.view, r.split) == (
        1, "train/XR_WRIST/patient00001/study1_positive", "patient00001", "XR_WRIST", 0, "train")
    assert r.mask_path is None and r.boxes == () and r.box_types == ()
    assert [x.view for x in records] == [0, 1, 0, 0, 1, 2, 0]
    assert [x.label for x in records] == [1, 1, 0, 0, 0, 0, 1]
    assert len({x.study for x in records}) == 4
    assert {x.body_part for x in records} == {"XR_WRIST", "XR_HAND"}


def test_folder_name_in_csv_is_dropped_and_any_split_name_works(tmp_path):
    _make_tree(tmp_path / "renamed", split="test", prefix="SomethingElse")
    records, skipped = read_mura(tmp_path / "renamed", "test")
    assert len(records) == 7 and not skipped
    assert all(r.split == "test" and r.study.startswith("test/") for r in records)


def test_body_part_filter(tmp_path):
    _make_tree(tmp_path)
    records, skipped = read_mura(tmp_path, "train", body_parts=["XR_HAND"])
    assert [r.body_part for r in records] == ["XR_HAND"] and not skipped
    assert len(read_mura(tmp_path, "train", body_parts="XR_WRIST")[0]) == 6
    with pytest.raises(ValueError, match="XR_KNEE"):
        read_mura(tmp_path, "train", body_parts=["XR_KNEE"])
    assert len(BODY_PARTS) == 7


def test_missing_csv_raises(tmp_path):
    _make_tree(tmp_path)
    with pytest.raises(FileNotFoundError, match="valid_image_paths.csv"):
        read_mura(tmp_path, "valid")


def test_masks_and_boxes_from_synthetic_ground_truth(tmp_path):
    image_rows, _ = _make_tree(tmp_path)
    _png(tmp_path / "masks/train/XR_WRIST/patient00001/study1_positive/image1.png", value=255)
    boxes = {
        image_rows[0][0]: [{"box": [1, 2, 5, 6], "type": "fracture"}, {"box": [0, 0, 8, 6], "type": "hardware"}],
        image_rows[6][0]: [{"box": [0.5, 0.5, 3.5, 2.5], "type": "lesion"}],
        f"{PREFIX}/valid/XR_WRIST/patient09999/study1_positive/image1.png": [{"box": [0, 0, 1, 1], "type": "fracture"}],
    }
    (tmp_path / "boxes.json").write_text(json.dumps(boxes))
    records, skipped = read_mura(tmp_path, "train")
    assert not skipped, skipped.summary()  # the valid-split entry belongs to another split
    r0, r6 = records[0], records[6]
    assert r0.mask_path == str(tmp_path / "masks/train/XR_WRIST/patient00001/study1_positive/image1.png")
    assert r0.boxes == ((1.0, 2.0, 5.0, 6.0), (0.0, 0.0, 8.0, 6.0))
    assert r0.box_types == ("fracture", "hardware")
    assert r6.boxes == ((0.5, 0.5, 3.5, 2.5),) and r6.box_types == ("lesion",)
    assert all(r.mask_path is None for r in records[1:])
    assert all(r.evidence_path is None for r in records)  # no evidence folder


def test_evidence_path_from_the_evidence_folder(tmp_path):
    _make_tree(tmp_path)
    rel = "train/XR_WRIST/patient00001/study1_positive"
    _png(tmp_path / "masks" / rel / "image1.png", value=255)
    _png(tmp_path / "evidence" / rel / "image1.png", value=255)
    _png(tmp_path / "evidence" / rel / "image2.png", value=255)  # evidence without a mask is read too
    (tmp_path / "evidence" / "train/XR_HAND/patient00003/study1_positive/image1.png").mkdir(parents=True)  # not a file
    records, skipped = read_mura(tmp_path, "train")
    assert not skipped, skipped.summary()
    by_path = {os.path.relpath(r.path, tmp_path): r for r in records}
    assert by_path[f"{rel}/image1.png"].evidence_path == str(tmp_path / "evidence" / rel / "image1.png")
    assert by_path[f"{rel}/image1.png"].mask_path == str(tmp_path / "masks" / rel / "image1.png")
    assert by_path[f"{rel}/image2.png"].evidence_path == str(tmp_path / "evidence" / rel / "image2.png")
    assert by_path[f"{rel}/image2.png"].mask_path is None
    assert sum(r.evidence_path is not None for r in records) == 2


def test_reads_a_synthetic_folder_with_evidence(tmp_path):
    from mskjax.data import synthetic
    root = tmp_path / "SYN"
    synthetic.generate(root, 4, 0, size_range=(64, 72), workers=1, splits=(("train", 1.0),), parts=("XR_HAND",))
    records, skipped = read_mura(root, "train")
    assert not skipped, skipped.summary()
    assert any(r.label for r in records) and not all(r.label for r in records)
    for r in records:
        assert (r.evidence_path is not None) == (r.mask_path is not None) == bool(r.label)
        if r.evidence_path:
            assert r.evidence_path == os.path.join(str(root), "evidence", os.path.relpath(r.path, root))
            assert os.path.isfile(r.evidence_path)


@pytest.mark.parametrize(
    "entry, match",
    [
        ({"box": [0, 0, 9, 6], "type": "fracture"}, "outside the 8x6 image"),
        ({"box": [3, 3, 2, 5], "type": "fracture"}, "empty or inverted"),
        ({"box": [0, 0, 1, 1], "type": "tumour"}, "unknown type"),
        ({"box": [0, 0, 1], "type": "fracture"}, "four finite numbers"),
        ({"bbox": [0, 0, 1, 1], "type": "fracture"}, "expected"),
    ],
)
def test_bad_box_skips_that_image_only(tmp_path, entry, match):
    image_rows, _ = _make_tree(tmp_path)
    (tmp_path / "boxes.json").write_text(json.dumps({image_rows[1][0]: [entry]}))
    records, skipped = read_mura(tmp_path, "train")
    assert len(records) == 6
    assert skipped.counts() == {"bad_box": 1}
    assert re.search(match, skipped.items[0].reason)
    assert image_rows[1][0] in skipped.items[0].reason


def test_orphan_box_entry_reported(tmp_path):
    _make_tree(tmp_path)
    ghost = f"{PREFIX}/train/XR_WRIST/patient00001/study1_positive/image9.png"
    (tmp_path / "boxes.json").write_text(json.dumps({ghost: [{"box": [0, 0, 1, 1], "type": "fracture"}]}))
    records, skipped = read_mura(tmp_path, "train")
    assert len(records) == 7
    assert skipped.counts() == {"orphan_annotation": 1} and ghost in skipped.items[0].reason


# ---------------------------------------------------------------------------------- bad rows


def test_every_bad_case_is_skipped_counted_and_reported(tmp_path):
    image_rows, study_rows = _make_tree(
        tmp_path,
        studies=[
            ("XR_WRIST", "patient00001", "study1_positive", 2),  # good
            ("XR_WRIST", "patient00002", "study1_negative", 2),  # image2 file deleted -> missing_file
            ("XR_HAND", "patient00003", "study1_positive", 1),  # labelled 0 -> label_mismatch
            ("XR_HAND", "patient00004", "study1_negative", 1),  # label "2" -> bad_label
            ("XR_ELBOW", "patient00005", "study1_negative", 1),  # study row duplicated, image row duplicated
            ("XR_FINGER", "patient00006", "study1_positive", 1),  # no study row -> unlabeled_study
        ],
    )
    os.remove(tmp_path / "train/XR_WRIST/patient00002/study1_negative/image2.png")
    study_rows[2][1] = "0"
    study_rows[3][1] = "2"
    study_rows.append(list(study_rows[4]))  # duplicate study row
    del study_rows[5]
    study_rows.append([f"{PREFIX}/train/XR_SHOULDER/patient00007/study1_negative/", "0"])  # no images -> empty_study
    study_rows.append([f"{PREFIX}/valid/XR_SHOULDER/patient00008/study1_negative/", "0"])  # other split -> outside_tree
    image_rows.append(list(image_rows[6]))  # duplicate image row
    image_rows.append([f"{PREFIX}/train/XR_WRIST/patient00001/../../../../etc/passwd"])  # outside_tree
    image_rows.append([f"{PREFIX}/train/XR_WRIST/patient00001/image1.png"])  # too shallow -> outside_tree
    image_rows.append([f"{PREFIX}/train/XR_KNEE/patient00001/study1_positive/image1.png"])  # unknown_body_part
    image_rows.append(["/abs/train/XR_WRIST/patient00001/study1_positive/image1.png"])  # absolute
    _write_csvs(tmp_path, "train", image_rows, study_rows)

    records, skipped = read_mura(tmp_path, "train")

    kept = {(r.study, r.view) for r in records}
    assert kept == {
        ("train/XR_WRIST/patient00001/study1_positive", 0),
        ("train/XR_WRIST/patient00001/study1_positive", 1),
        ("train/XR_WRIST/patient00002/study1_negative", 0),
        ("train/XR_ELBOW/patient00005/study1_negative", 0),
    }
    assert skipped.counts() == {
        "outside_tree": 4,  # a study row of another split; '..', too-shallow and absolute image paths
        "study_skipped": 2,  # the images of the mismatched and the bad-label studies
        "duplicate_row": 2,  # one study row, one image row
        "label_mismatch": 1,
        "bad_label": 1,
        "unknown_body_part": 1,
        "missing_file": 1,
        "unlabeled_study": 1,
        "empty_study": 1,  # the labelled study without image rows
    }
    empty = [s for s in skipped if s.kind == "empty_study"][0]
    assert "patient00007" in empty.reason
    missing = [s for s in skipped if s.kind == "missing_file"][0]
    assert "patient00002/study1_negative/image2.png" in missing.reason
    assert str(tmp_path / "train_image_paths.csv") in missing.where  # file:line
    text = skipped.summary()
    assert text.startswith(f"{len(skipped)} skipped: ") and "missing_file=1" in text


def test_label_written_as_text_or_blank_rows_handled(tmp_path):
    image_rows, study_rows = _make_tree(tmp_path)
    study_rows[0][1] = "positive"
    _write_csvs(tmp_path, "train", image_rows + [[""]], study_rows)
    records, skipped = read_mura(tmp_path, "train")
    assert len(records) == 5  # study1_positive's two images go
    assert skipped.counts()["bad_label"] == 1 and skipped.counts()["study_skipped"] == 2


# ---------------------------------------------------------------------------------- patient split


def _many_patients(n=40):
    out = []
    for p in range(n):
        for v in range(1 + p % 3):
            out.append(Record(path=f"/x/p{p}/i{v}.png", label=p % 2, study=f"s{p}", patient=f"patient{p:05d}",
                              body_part="XR_WRIST", view=v, split="train"))
    return out


def test_patient_disjoint_split():
    recs = _many_patients()
    kept, carved = patient_disjoint_split(recs, 0.25, seed=0)
    assert len(kept) + len(carved) == len(recs)
    assert not ({r.patient for r in kept} & {r.patient for r in carved})
    assert len({r.patient for r in carved}) == 10
    assert all(r.split == "val" for r in carved) and all(r.split == "train" for r in kept)
    again = patient_disjoint_split(list(reversed(recs)), 0.25, seed=0)[1]
    assert {r.path for r in again} == {r.path for r in carved}  # input order does not matter
    other = patient_disjoint_split(recs, 0.25, seed=1)[1]
    assert {r.patient for r in other} != {r.patient for r in carved}
    assert patient_disjoint_split(recs, 0.25, seed=0, name="tune")[1][0].split == "tune"


def test_patient_disjoint_split_on_read_tree(tmp_path):
    _make_tree(tmp_path)
    records, _ = read_mura(tmp_path, "train")
    kept, carved = patient_disjoint_split(records, 0.34, seed=3)
    assert len({r.patient for r in carved}) == 1
    assert not ({r.patient for r in kept} & {r.patient for r in carved})


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_patient_split_rejects_bad_fraction(fraction):
    with pytest.raises(ValueError, match="fraction"):
        patient_disjoint_split(_many_patients(), fraction, seed=0)


# ---------------------------------------------------------------------------------- records


def test_record_validates_and_normalises():
    r = Record(path="/a/b.png", label=1, study="s", patient="p", body_part="XR_HAND", view=0, split="train",
               boxes=[[1, 2, 3, 4]], box_types=["fracture"], extra={"k": 1})
    assert r.boxes == ((1.0, 2.0, 3.0, 4.0),) and r.box_types == ("fracture",)
    assert hash(r) == hash(dataclasses.replace(r, extra={"k": 2}))  # extra is not hashed
    assert r.evidence_path is None and dataclasses.replace(r, evidence_path="/a/e.png").evidence_path == "/a/e.png"
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.label = 0  # type: ignore[misc]
    base = dict(path="/a/b.png", label=0, study="s", patient="p", body_part="b", view=0, split="train")
    for bad, match in [
        ({"path": "rel/b.png"}, "absolute"),
        ({"label": 2}, "label"),
        ({"label": True}, "label"),
        ({"view": -1}, "view"),
        ({"boxes": ((3, 0, 1, 1),), "box_types": ("fracture",)}, "x0 <= x1"),
        ({"boxes": ((0, 0, 1, 1),)}, "1 boxes but 0 box_types"),
        ({"mask_path": "m.png"}, "mask_path"),
        ({"evidence_path": "e.png"}, "evidence_path"),
    ]:
        with pytest.raises(ValueError, match=match):
            Record(**{**base, **bad})


def test_skip_report():
    rep = SkipReport()
    assert not rep and rep.summary() == "nothing skipped"
    rep.add("a.csv:3", "missing_file", "gone")
    rep.add("a.csv:4", "missing_file", "gone too")
    rep.add("a.csv:5", "bad_label", "label 7")
    assert len(rep) == 3 and rep.counts() == {"missing_file": 2, "bad_label": 1}
    assert rep.kinds() == {"missing_file", "bad_label"}
    assert "a.csv:5: [bad_label] label 7" in rep.summary()
    assert "... and 2 more" in rep.summary(limit=1)
