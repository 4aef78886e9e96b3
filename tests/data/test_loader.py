"""Loader: batch contents, epochs and shuffling, process shards, resume, bad files, threads, cache."""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from PIL import Image

import mskjax.data.loader as loader_mod
from mskjax.data.images import decode_image
from mskjax.data.loader import DEVICE_KEYS, HOST_KEYS, Loader, device_batch, epoch_order
from mskjax.data.preprocess import preprocess
from mskjax.data.records import Record

S = 8  # model input side for the tiny files


def _record(path, label, i=0):
    return Record(path=str(path), label=label, study=str(i), patient=str(i), body_part="XR_TEST",
                  view=0, split="train")


def _write_pngs(folder, n, bad=()):
    """n small PNGs of different sizes and contents; indices in `bad` get garbage bytes."""
    rng = np.random.default_rng(0)
    records = []
    for i in range(n):
        path = folder / f"img{i:02d}.png"
        if i in bad:
            path.write_bytes(b"this is not a PNG file at all")
        else:
            h, w = 10 + i, 14 + (3 * i) % 11
            Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)).save(path)
        records.append(_record(path, i % 2, i))
    return records


def _expected_image(path, mode="resize", channels=1):
    img, geom = preprocess(decode_image(path).image, S, mode, channels)
    return np.round(img * 255.0).astype(np.uint8).astype(np.float32) / 255.0, geom


def _take(loader, n=None):
    out = []
    for i, b in enumerate(loader):
        out.append(b)
        if n is not None and i + 1 == n:
            break
    return out


@pytest.fixture
def good(tmp_path):
    return _write_pngs(tmp_path, 13)


@pytest.fixture
def with_bad(tmp_path):
    return _write_pngs(tmp_path, 13, bad=(5,))


def test_batches_hold_the_preprocessed_records_and_pad_the_end(good):
    ld = Loader(good, global_batch_size=4, image_size=S, shuffle=False, num_epochs=1,
                drop_remainder=False, process_index=0, process_count=1)
    assert len(ld) == ld.steps_per_epoch == 4
    batches = _take(ld)
    assert len(batches) == 4
    for b in batches:
        assert set(b) == set(DEVICE_KEYS) | set(HOST_KEYS)
        assert b["image"].shape == (4, S, S, 1) and b["image"].dtype == np.float32
        assert b["label"].dtype == np.int32 and b["index"].dtype == np.int32 and b["valid"].dtype == bool
    index = np.concatenate([b["index"] for b in batches])
    np.testing.assert_array_equal(index, list(range(13)) + [-1, -1, -1])
    for b in batches:
        for r, i in enumerate(b["index"]):
            if i < 0:
                assert not b["valid"][r] and np.all(b["image"][r] == 0)
                continue
            want, geom = _expected_image(good[i].path)
            np.testing.assert_array_equal(b["image"][r], want)
            assert b["label"][r] == good[i].label and b["valid"][r]
            np.testing.assert_array_equal(b["original_hw"][r], [10 + i, 14 + (3 * i) % 11])
            assert b["geometry"].scale_x[r] == pytest.approx(geom.scale_x)
            assert b["geometry"].original_h[r] == 10 + i


def test_epochs_visit_every_record_once_in_a_seeded_order(good):
    def run(seed):
        ld = Loader(good[:12], global_batch_size=4, image_size=S, seed=seed, num_epochs=3,
                    process_index=0, process_count=1)
        idx = np.concatenate([b["index"] for b in _take(ld)]).reshape(3, 12)
        return idx

    idx = run(0)
    for e in range(3):
        assert sorted(idx[e]) == list(range(12))
        np.testing.assert_array_equal(idx[e], epoch_order(12, 0, e))
    assert not np.array_equal(idx[0], idx[1])
    np.testing.assert_array_equal(run(0), idx)
    assert not np.array_equal(run(1), idx)


def test_drop_remainder_steps(good):
    ld = Loader(good, global_batch_size=4, image_size=S, num_epochs=2, process_index=0, process_count=1)
    assert len(ld) == 3
    batches = _take(ld)
    assert len(batches) == 6 and all(b["valid"].all() for b in batches)


def test_bad_file_is_skipped_and_its_row_filled_with_the_next_good_record(with_bad):
    ld = Loader(with_bad, global_batch_size=4, image_size=S, seed=3, num_epochs=2,
                process_index=0, process_count=1)
    batches = _take(ld)  # must not raise
    assert len(batches) == 6
    assert ld.skipped == [(with_bad[5].path, ld.skipped[0][1])]
    assert "ImageDecodeError" in ld.skipped[0][1]
    assert ld.skip_report.counts() == {"undecodable": 1}
    for e in range(2):
        order = epoch_order(13, 3, e)
        want = order[:12].copy()
        pos = int(np.flatnonzero(want == 5)[0]) if 5 in want else None
        if pos is not None:
            nxt = order[(pos + 1) % 13]
            want[pos] = nxt if nxt != 5 else order[(pos + 2) % 13]
        got = np.concatenate([b["index"] for b in batches[3 * e:3 * e + 3]])
        np.testing.assert_array_equal(got, want)
        assert all(b["valid"].all() for b in batches[3 * e:3 * e + 3])


def test_evaluation_masks_bad_files_and_sees_every_good_image_once(with_bad):
    ld = Loader(with_bad, global_batch_size=4, image_size=S, shuffle=True, num_epochs=1,
                drop_remainder=False, process_index=0, process_count=1)
    batches = _take(ld)
    valid = np.concatenate([b["valid"] for b in batches])
    index = np.concatenate([b["index"] for b in batches])
    assert sorted(index[valid]) == [i for i in range(13) if i != 5]
    assert np.all(index[~valid] == -1) and (~valid).sum() == 16 - 12
    assert [p for p, _ in ld.skipped] == [with_bad[5].path]


def test_missing_file_is_reported(good, tmp_path):
    records = good[:7] + [_record(tmp_path / "gone.png", 1, 99)]
    ld = Loader(records, global_batch_size=4, image_size=S, num_epochs=1, process_index=0, process_count=1)
    assert len(_take(ld)) == 2
    assert ld.skip_report.counts() == {"missing_file": 1}


def test_all_files_bad_raises_a_clear_error(tmp_path):
    records = _write_pngs(tmp_path, 4, bad=(0, 1, 2, 3))
    ld = Loader(records, global_batch_size=2, image_size=S, process_index=0, process_count=1, workers=0)
    with pytest.raises(ValueError, match="none of the 4 records"):
        _take(ld, 1)


@pytest.mark.parametrize("drop_remainder", [True, False])
@pytest.mark.parametrize("count", [2, 4])
def test_process_shards_interleave_into_the_single_process_batch(with_bad, drop_remainder, count):
    kw = dict(global_batch_size=4, image_size=S, seed=1, num_epochs=2, drop_remainder=drop_remainder)
    whole = _take(Loader(with_bad, process_index=0, process_count=1, **kw))
    parts = [_take(Loader(with_bad, process_index=p, process_count=count, **kw)) for p in range(count)]
    assert all(len(p) == len(whole) for p in parts)
    for step, w in enumerate(whole):
        for p in range(count):
            local = parts[p][step]
            assert local["image"].shape[0] == 4 // count
            for key in ("image", "label", "valid", "index", "original_hw"):
                np.testing.assert_array_equal(local[key], w[key][p::count], err_msg=f"{key} step {step}")


def test_resume_from_state_reproduces_the_uninterrupted_run(with_bad):
    kw = dict(global_batch_size=4, image_size=S, seed=7, num_epochs=3, process_index=0, process_count=1)
    full = _take(Loader(with_bad, **kw))
    assert len(full) == 9
    first = Loader(with_bad, **kw)
    head = _take(first, 4)
    state = json.loads(json.dumps(first.state()))
    assert state == {"epoch": 1, "step": 1, "seed": 7, "num_records": 13, "global_batch_size": 4}
    tail = _take(Loader(with_bad, state=state, **kw))
    assert len(head) + len(tail) == 9
    for a, b in zip(head + tail, full):
        np.testing.assert_array_equal(a["index"], b["index"])
        np.testing.assert_array_equal(a["image"], b["image"])
    first.restore({"epoch": 2, "step": 0, "seed": 7})
    again = _take(first)
    assert len(again) == 3
    for a, b in zip(again, full[6:]):
        np.testing.assert_array_equal(a["index"], b["index"])


@pytest.mark.parametrize("state,match", [
    ({"epoch": 0, "step": 0, "seed": 8}, "seed=8"),
    ({"epoch": 0, "step": 0, "seed": 7, "num_records": 12}, "num_records"),
    ({"epoch": 0, "step": 3, "seed": 7}, "outside"),
    ({"epoch": 0, "seed": 7}, "missing"),
    ({"epoch": 0, "step": 0, "seed": 7, "cursor": 1}, "unknown"),
])
def test_bad_state_is_refused(good, state, match):
    with pytest.raises(ValueError, match=match):
        Loader(good, global_batch_size=4, image_size=S, seed=7, process_index=0, process_count=1, state=state)


def test_output_does_not_depend_on_threads_or_prefetch(with_bad):
    kw = dict(global_batch_size=4, image_size=S, seed=2, num_epochs=2, process_index=0, process_count=1)
    a = _take(Loader(with_bad, workers=0, prefetch=0, cache=False, **kw))
    b = _take(Loader(with_bad, workers=3, prefetch=4, **kw))
    assert len(a) == len(b) == 6
    for x, y in zip(a, b):
        for key in ("image", "index", "label", "valid"):
            np.testing.assert_array_equal(x[key], y[key])


def test_cache_decodes_each_file_once(good, monkeypatch):
    calls = []

    def counting(path, **kw):
        calls.append(path)
        return decode_image(path, **kw)

    monkeypatch.setattr(loader_mod, "decode_image", counting)
    kw = dict(global_batch_size=4, image_size=S, shuffle=False, num_epochs=3, process_index=0, process_count=1)
    _take(Loader(good[:12], cache=True, **kw))
    assert sorted(calls) == sorted(r.path for r in good[:12])
    calls.clear()
    _take(Loader(good[:12], cache=False, **kw))
    assert len(calls) == 36


def test_sharded_batches_are_global_arrays(good):
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    kw = dict(global_batch_size=4, image_size=S, shuffle=False, num_epochs=1)
    plain = _take(Loader(good, **kw))
    sharded = _take(Loader(good, sharding=sharding, **kw))
    for p, s in zip(plain, sharded):
        for key in DEVICE_KEYS:
            assert isinstance(s[key], jax.Array) and s[key].sharding == sharding
            assert s[key].shape[0] == 4
            np.testing.assert_array_equal(np.asarray(s[key]), p[key])
        assert isinstance(s["original_hw"], np.ndarray) and isinstance(s["local_index"], np.ndarray)
        assert set(device_batch(s)) == set(DEVICE_KEYS)


def test_uint8_and_three_channel_letterbox_on_fracatlas(shared_data):
    paths = sorted((shared_data / "fracatlas" / "images").glob("*.jpg"))[:4]
    records = [_record(p, 0, i) for i, p in enumerate(paths)]
    ld = Loader(records, global_batch_size=4, image_size=S, mode="letterbox", channels=3, shuffle=False,
                num_epochs=1, image_dtype="uint8", process_index=0, process_count=1)
    (b,) = _take(ld)
    assert b["image"].dtype == np.uint8 and b["image"].shape == (4, S, S, 3)
    for r, path in enumerate(paths):
        want, geom = _expected_image(str(path), mode="letterbox", channels=3)
        np.testing.assert_array_equal(b["image"][r], np.round(want * 255).astype(np.uint8))
        assert b["geometry"].left[r] == geom.left and b["geometry"].top[r] == geom.top


def test_a_new_iterator_supersedes_the_old_one(good):
    ld = Loader(good, global_batch_size=4, image_size=S, process_index=0, process_count=1, workers=0)
    old = iter(ld)
    next(old)
    new = iter(ld)
    next(new)
    with pytest.raises(RuntimeError, match="superseded"):
        next(old)
    assert ld.state()["step"] == 2


@pytest.mark.parametrize("kwargs,match", [
    (dict(global_batch_size=3, process_count=2, process_index=0), "multiple"),
    (dict(global_batch_size=16), "no full batch"),
    (dict(global_batch_size=4, mode="crop"), "mode"),
    (dict(global_batch_size=4, process_index=2, process_count=2), "process_index"),
    (dict(global_batch_size=4, bad_records="ignore"), "bad_records"),
])
def test_bad_arguments_are_refused(good, kwargs, match):
    with pytest.raises(ValueError, match=match):
        Loader(good, image_size=S, **kwargs)


def test_close_stops_threads_and_the_loader_can_start_again(good):
    ld = Loader(good, global_batch_size=4, image_size=S, shuffle=False, process_index=0, process_count=1,
                workers=2, prefetch=3)
    it = iter(ld)
    first = next(it)
    ld.close()
    with pytest.raises(RuntimeError, match="superseded"):
        next(it)
    second = next(iter(ld))  # continues from the saved position with a new pool
    np.testing.assert_array_equal(first["index"], [0, 1, 2, 3])
    np.testing.assert_array_equal(second["index"], [4, 5, 6, 7])
