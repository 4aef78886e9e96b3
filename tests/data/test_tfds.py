"""TFDS builders (mskjax.data.tfds_builders): build as array_record and read back without TensorFlow.

Pixels are compared exactly with `decode_image` after the stated quantisation (round(x * 255) for
uint8, round(x * 65535) for uint16); masks, boxes and labels with the dataset readers' records.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys

import numpy as np
import pytest

from mskjax.data import synthetic, tfds_builders as tb
from mskjax.data.fracatlas import REGIONS, VIEWS, read_fracatlas
from mskjax.data.images import decode_image
from mskjax.data.mura import BODY_PARTS, read_mura
from mskjax.data.preprocess import resize_image

# 14 studies = 2 per body part, so each part has one abnormal study (6 studies at this seed round
# to none); small images keep generation to about a second.
_STUDIES, _SEED, _SIZES = 14, 0, (64, 112)


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic") / "synth"
    synthetic.generate(root, _STUDIES, _SEED, size_range=_SIZES, workers=1)
    return root


@pytest.fixture(scope="module")
def synthetic_built(synthetic_dir, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds_synth")
    return tb.build("synthetic_mura", data_dir, synthetic_dir), data_dir


def _gray_u8(path):
    return np.round(decode_image(path).image * 255.0).astype(np.uint8)


def _mask01(path, shape):
    if path is None:
        return np.zeros(shape, np.uint8)
    return (decode_image(path).image > 0).astype(np.uint8)


def test_tensorflow_is_not_installed_or_imported(synthetic_built):
    assert importlib.util.find_spec("tensorflow") is None
    assert "tensorflow" not in sys.modules
    builder, _ = synthetic_built
    assert builder.info.file_format.value == "array_record"


def test_synthetic_mura_round_trip(synthetic_dir, synthetic_built):
    builder, data_dir = synthetic_built
    names = builder.info.features["body_part"].names
    assert tuple(names) == BODY_PARTS
    n_boxes = 0
    for split in ("train", "valid", "test"):
        records, report = read_mura(synthetic_dir, split)
        assert not report, report.summary()
        source = tb.data_source("synthetic_mura", data_dir, split)
        assert len(source) == len(records) > 0
        for i, rec in enumerate(records):  # stored in reader (CSV) order
            ex = source[i]
            assert ex["path"].decode() == os.path.relpath(rec.path, synthetic_dir)
            image = _gray_u8(rec.path)
            assert ex["image"].dtype == np.uint8
            np.testing.assert_array_equal(ex["image"], image)
            np.testing.assert_array_equal(ex["original_size"], image.shape)
            assert ex["label"] == rec.label
            assert ex["study"].decode() == rec.study and ex["patient"].decode() == rec.patient
            assert names[ex["body_part"]] == rec.body_part and ex["view"] == rec.view
            np.testing.assert_array_equal(ex["mask"], _mask01(rec.mask_path, image.shape))
            assert ex["boxes"].dtype == np.float32 and ex["boxes"].shape == (len(rec.boxes), 4)
            np.testing.assert_array_equal(ex["boxes"], np.asarray(rec.boxes, np.float32).reshape(-1, 4))
            assert [tb.BOX_TYPES[t] for t in ex["box_types"]] == list(rec.box_types)
            n_boxes += len(rec.boxes)
    assert n_boxes > 0  # the comparison above really covered boxes and masks
    meta = builder.info.metadata
    assert meta["skipped_items"] == [] and meta["empty_splits"] == []
    assert meta["splits"]["train"]["written"] == len(read_mura(synthetic_dir, "train")[0])


def test_resize_and_uint16(synthetic_dir, tmp_path):
    builder = tb.build("synthetic_mura", tmp_path, synthetic_dir, max_side=48, image_dtype="uint16")
    assert builder.builder_config.name == "side48_uint16"
    records, _ = read_mura(synthetic_dir, "train")
    source = builder.as_data_source("train")
    checked_box = False
    for i, rec in enumerate(records):
        ex = source[i]
        x = decode_image(rec.path).image
        h0, w0 = x.shape
        s = 48 / max(h0, w0)
        h, w = (48, round(w0 * s)) if h0 >= w0 else (round(h0 * s), 48)
        assert ex["image"].dtype == np.uint16 and ex["image"].shape == (h, w)
        expected = np.round(np.clip(resize_image(x, h, w), 0, 1) * 65535.0).astype(np.uint16)
        np.testing.assert_array_equal(ex["image"], expected)
        np.testing.assert_array_equal(ex["original_size"], (h0, w0))
        assert ex["mask"].shape == (h, w) and set(np.unique(ex["mask"])) <= {0, 1}
        scale = np.array([w / w0, h / h0, w / w0, h / h0], np.float32)
        np.testing.assert_allclose(ex["boxes"], np.asarray(rec.boxes, np.float32).reshape(-1, 4) * scale, rtol=1e-6)
        checked_box |= len(rec.boxes) > 0
    assert checked_box


def test_uint16_of_8bit_source_is_257_times_uint8(synthetic_dir, synthetic_built, tmp_path):
    u16 = tb.build("synthetic_mura", tmp_path, synthetic_dir, image_dtype="uint16").as_data_source("valid")
    u8 = tb.data_source("synthetic_mura", synthetic_built[1], "valid")
    for i in range(len(u8)):
        np.testing.assert_array_equal(u16[i]["image"], u8[i]["image"].astype(np.uint16) * 257)


def test_fracatlas_subset(shared_data, tmp_path):
    root = shared_data / "fracatlas"
    limit = 10
    builder = tb.build("fracatlas", tmp_path, root, limit=limit)
    assert builder.builder_config.name == "first10"
    fractured = 0
    for split in ("train", "valid"):
        records, _ = read_fracatlas(root, splits=[split])
        records = records[:limit]
        source = builder.as_data_source(split)
        assert len(source) == limit
        names = builder.info.features["body_part"].names
        for i, rec in enumerate(records):
            ex = source[i]
            image = _gray_u8(rec.path)
            np.testing.assert_array_equal(ex["image"], image)
            assert ex["label"] == rec.label and ex["image_id"].decode() == os.path.basename(rec.path)
            np.testing.assert_array_equal(ex["mask"], _mask01(rec.mask_path, image.shape))
            np.testing.assert_array_equal(ex["boxes"], np.asarray(rec.boxes, np.float32).reshape(-1, 4))
            assert [tb.BOX_TYPES[t] for t in ex["box_types"]] == ["fracture"] * len(rec.boxes)
            np.testing.assert_array_equal(ex["regions"], [bool(rec.extra[k]) for k in REGIONS])
            np.testing.assert_array_equal(ex["views"], [bool(rec.extra[k]) for k in VIEWS])
            assert bool(ex["hardware"]) == bool(rec.extra["hardware"])
            assert ex["fracture_count"] == rec.extra["fracture_count"]
            assert names[ex["body_part"]] == rec.body_part
            fractured += rec.label == 1 and ex["mask"].any() and len(ex["boxes"]) > 0
    assert fractured >= 1  # the first 10 train rows include annotated fractures


def test_mura_layout_with_bad_files_skips_and_counts(synthetic_dir, tmp_path):
    src = tmp_path / "MURA-v1.1"
    shutil.copytree(synthetic_dir, src)
    # Rewrite the CSV prefix to the new folder name, as a real MURA tree has it.
    for csv in src.glob("*.csv"):
        csv.write_text(csv.read_text().replace(f"{synthetic_dir.name}/", "MURA-v1.1/"))
    boxes = src / "boxes.json"
    boxes.write_text(json.dumps({k.replace(f"{synthetic_dir.name}/", "MURA-v1.1/", 1): v
                                 for k, v in json.loads(boxes.read_text()).items()}))
    records, _ = read_mura(src, "train")
    missing, truncated = records[0].path, records[1].path
    os.remove(missing)
    with open(truncated, "r+b") as f:
        f.truncate(os.path.getsize(truncated) // 2)

    builder = tb.build("mura", tmp_path / "tfds", src)
    stats = builder.info.metadata["splits"]["train"]
    assert stats["records"] == len(records) - 1  # the reader already dropped the missing file
    assert stats["skipped_by_kind"] == {"missing_file": 1, "decode_error": 1}
    assert stats["written"] == len(records) - 2
    source = tb.data_source("mura", tmp_path / "tfds", "train")
    assert len(source) == len(records) - 2
    assert "mask" not in source[0]  # real MURA has no pixel ground truth
    stored = {source[i]["path"].decode() for i in range(len(source))}
    assert os.path.relpath(missing, src) not in stored and os.path.relpath(truncated, src) not in stored
    assert set(BODY_PARTS) >= {builder.info.features["body_part"].int2str(source[0]["body_part"])}

    # The count survives on disk: a fresh builder reads it from metadata.json.
    fresh = tb.get_builder("mura", tmp_path / "tfds")
    report = tb.skip_report(fresh, "train")
    assert report.counts() == {"missing_file": 1, "decode_error": 1}
    assert any(truncated in s.where for s in report) and tb.skip_report(fresh, "valid").counts() == {}


def test_reuse_and_errors(synthetic_dir, synthetic_built, tmp_path):
    builder, data_dir = synthetic_built
    info_file = os.path.join(os.fspath(builder.data_path), "dataset_info.json")
    before = os.stat(info_file).st_mtime_ns
    again = tb.build("synthetic_mura", data_dir, synthetic_dir)  # prepared already: reused
    assert os.stat(info_file).st_mtime_ns == before and len(again.as_data_source("test")) > 0
    # overwrite=True rebuilds from the current source: a file removed since is now a skip.
    src = tmp_path / "synth"
    shutil.copytree(synthetic_dir, src)
    first = tb.build("synthetic_mura", tmp_path / "tfds", src)
    n = first.info.splits["train"].num_examples
    os.remove(read_mura(src, "train")[0][0].path)
    assert tb.build("synthetic_mura", tmp_path / "tfds", src).info.splits["train"].num_examples == n  # reused
    rebuilt = tb.build("synthetic_mura", tmp_path / "tfds", src, overwrite=True)
    assert rebuilt.info.splits["train"].num_examples == n - 1
    assert tb.skip_report(rebuilt, "train").counts() == {"missing_file": 1}
    assert len(tb.data_source("synthetic_mura", tmp_path / "tfds", "train")) == n - 1

    with pytest.raises(FileNotFoundError, match="no prepared dataset"):
        tb.data_source("synthetic_mura", data_dir, "train", max_side=32)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tb.build("mura", tmp_path, tmp_path / "nowhere")
    with pytest.raises(ValueError, match="unknown builder"):
        tb.get_builder("imagenet", tmp_path)
    with pytest.raises(TypeError, match="unknown setting"):
        tb.get_builder("mura", tmp_path, max_size=64)
    with pytest.raises(ValueError, match="max_side"):
        tb.get_builder("mura", tmp_path, max_side=0)
    with pytest.raises(ValueError, match="unknown body part"):
        tb.get_builder("mura", tmp_path, body_parts=["XR_KNEE"])
