"""Box-prompted SAM training (mskjax.train.sam, mskjax.train.sam_data, configs/sam_*.py).

Small sizes throughout: vit_tiny at 64 px on 16 synthetic studies; vit_b at 64 px with random
weights for one step. Most of the time is XLA compilation.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mskjax import checkpoint, distributed, sam as samfn
from mskjax.train import optim, sam_data
from mskjax.train import sam as train_sam
from mskjax.train.__main__ import check_overrides
from mskjax.train.config import ConfigError, load_config, validate_sam
from mskjax.data.mura import read_mura
from mskjax.models.sam import build_sam

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
SIDE = 64


def _load_config(name: str):
    return load_config(CONFIGS / f"{name}.py")


def _small(config, root):
    config.data.root = str(root)
    config.data.synthetic_studies = 16
    # data_root's set: all parts, realistic (a config that asks for another set is refused on it)
    config.data.synthetic_parts = ""
    config.data.synthetic_conspicuity = "realistic"
    config.model.img_size = SIDE
    config.train.batch_size = 2
    config.eval.batch_size = 4
    config.train.log_every = 1
    return config


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("samdata") / "synthetic"
    scale = _load_config("sam_synthetic").data.synthetic_abnormality_scale  # the dataset the config asks for
    subprocess.run([sys.executable, "-m", "mskjax.data.synthetic", "--out", str(root), "--studies", "16",
                    "--seed", "0", "--abnormality-scale", repr(scale)], check=True, capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(REPO)})
    return root


@pytest.fixture(scope="module")
def train_examples(data_root):
    records, _ = read_mura(data_root, "train")
    return sam_data.build_examples(records, SIDE, 2, "train")


# ---------------------------------------------------------------------------------------------
# Pure pieces


def test_loss_matches_hand_computation():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 5, 4)).astype(np.float32) * 3
    targets = (rng.uniform(size=(2, 3, 5, 4)) > 0.6).astype(np.float32)
    targets[0, 1, 0, 0] = 0.5  # a soft edge pixel
    valid = np.array([[True, True, False], [True, False, False]])
    loss, parts = train_sam.sam_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(valid), 0.7, 1.3)
    dices, bces = [], []
    for b, p in zip(*np.nonzero(valid)):
        z, t = logits[b, p].astype(np.float64), targets[b, p].astype(np.float64)
        prob = 1 / (1 + np.exp(-z))
        dices.append(1 - (2 * (prob * t).sum() + 1e-5) / ((prob ** 2).sum() + (t ** 2).sum() + 1e-5))
        bces.append(np.mean(-(t * np.log(prob) + (1 - t) * np.log(1 - prob))))
    np.testing.assert_allclose(float(parts["dice_loss"]), np.mean(dices), rtol=1e-5)
    np.testing.assert_allclose(float(parts["bce"]), np.mean(bces), rtol=1e-5)
    np.testing.assert_allclose(float(loss), 0.7 * np.mean(dices) + 1.3 * np.mean(bces), rtol=1e-5)
    # A perfect, confident prediction has almost no loss; padding prompts do not count.
    t = targets.copy()
    t[0, 2] = 1 - t[0, 2]
    perfect, _ = train_sam.sam_loss(jnp.asarray(np.where(targets > 0.5, 30.0, -30.0)), jnp.asarray(t),
                                    jnp.asarray(valid & (targets.reshape(2, 3, -1) != 0.5).all(-1)))
    assert float(perfect) < 1e-4


def test_box_jitter_stays_within_range_and_image():
    config = _load_config("sam_synthetic")
    shift = train_sam.jitter_scale(config)
    assert shift == pytest.approx(config.data.box_jitter * 256 / 1024)  # given at 1024, scaled to 256
    assert 0 < shift <= 5.0  # the synthetic config keeps it small: its boxes are ~14 px at 256
    rng = np.random.default_rng(1)
    sizes = np.array([[256, 180], [120, 256]], np.int32)  # (h, w)
    x0 = rng.uniform(0, 100, (2, 500))
    y0 = rng.uniform(0, 100, (2, 500))
    boxes = np.stack([x0, y0, x0 + rng.uniform(1, 80, (2, 500)), y0 + rng.uniform(1, 20, (2, 500))], -1)
    boxes = np.minimum(boxes, np.array([[[180, 256, 180, 256]], [[256, 120, 256, 120]]]))
    boxes[:, :20, 2] = sizes[:, None, 1] - rng.uniform(0, 2, (2, 20))  # touching the right border
    boxes = boxes.astype(np.float32)
    out = np.asarray(train_sam.jitter_boxes(jax.random.key(0), jnp.asarray(boxes), jnp.asarray(sizes), shift))
    grow = (out - boxes) * np.array([-1, -1, 1, 1])
    assert grow.min() >= -1e-5 and grow.max() <= shift + 1e-5
    assert grow.max() > 0.95 * shift and np.median(grow) > 0.2 * shift  # really jittered
    for i, (h, w) in enumerate(sizes):
        assert out[i, :, [0, 2]].min() >= 0 and out[i, :, [0, 2]].max() <= w
        assert out[i, :, [1, 3]].min() >= 0 and out[i, :, [1, 3]].max() <= h
    clipped = (boxes[..., 2] + shift > sizes[:, None, 1]) & (out[..., 2] == sizes[:, None, 1])
    assert clipped.any()  # boxes near the border were clipped, not pushed outside


def test_peak_like_boxes_have_the_pipeline_size_and_hold_the_lesion():
    """Map-shaped prompts: fraction x (w, h) of each image, slid inside it, centred within
    offset x (w, h) of a pixel of the prompt's own mask; mix_prompts takes about `share` of them."""
    sizes = np.array([[200, 256], [256, 160]], np.int32)  # (h, w) inside the 256 canvas
    masks = np.zeros((2, 2, 256, 256), np.uint8)
    masks[0, 0, 50:60, 100:110] = 255
    masks[0, 1, 190:200, 0:6] = 255  # at the bottom-left corner: the box must slide inside
    masks[1, 0, 10:14, 140:160] = 255  # at the right border
    frac, off = 0.25, 0.05
    keys = jax.random.split(jax.random.key(0), 200)
    boxes = np.stack([np.asarray(train_sam.peak_like_boxes(k, jnp.asarray(masks), jnp.asarray(sizes), frac, off))
                      for k in keys])  # (200, 2, 2, 4)
    for i, (h, w) in enumerate(sizes):
        b = boxes[:, i]
        np.testing.assert_allclose(b[..., 2] - b[..., 0], frac * w, atol=1e-3)
        np.testing.assert_allclose(b[..., 3] - b[..., 1], frac * h, atol=1e-3)
        assert b[..., [0, 1]].min() >= 0 and b[..., 2].max() <= w + 1e-4 and b[..., 3].max() <= h + 1e-4
    for i, j in ((0, 0), (0, 1), (1, 0)):
        ys, xs = np.nonzero(masks[i, j])
        h, w = sizes[i]
        b = boxes[:, i, j]
        cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
        slack = off * np.array([w, h]) + frac * np.array([w, h]) / 2  # offset, plus a slide at most half a box
        assert np.all(cx >= xs.min() - slack[0]) and np.all(cx <= xs.max() + 1 + slack[0])
        assert np.all(cy >= ys.min() - slack[1]) and np.all(cy <= ys.max() + 1 + slack[1])
        if (i, j) == (0, 0):  # away from the borders: drawn, not fixed
            assert np.std(cx) > 0.5 and np.std(cy) > 0.5
        if (i, j) == (0, 1):  # at the left border the box slides inside instead of shrinking
            assert np.all(b[:, 0] == 0)
    ranged = np.stack([np.asarray(train_sam.peak_like_boxes(k, jnp.asarray(masks), jnp.asarray(sizes), 0.2, off, 0.5))
                       for k in keys[:50]])
    widths = (ranged[..., 2] - ranged[..., 0]) / sizes[None, :, None, 1]
    assert widths.min() >= 0.2 - 1e-4 and widths.max() <= 0.5 + 1e-4 and np.std(widths) > 0.05
    np.testing.assert_allclose((ranged[..., 3] - ranged[..., 1]) / sizes[None, :, None, 0], widths, atol=1e-4)
    a = np.zeros((4, 2, 4), np.float32)
    b = np.ones((4, 2, 4), np.float32)
    takes = np.stack([np.asarray(train_sam.mix_prompts(k, jnp.asarray(a), jnp.asarray(b), 0.3))[..., 0] for k in keys])
    assert 0.25 < takes.mean() < 0.35
    assert np.all(np.asarray(train_sam.mix_prompts(keys[0], jnp.asarray(a), jnp.asarray(b), 0.0)) == 0)
    config = _load_config("sam_synthetic")
    for field, value in (("peak_box_share", 1.5), ("peak_box_fraction", 0.0), ("peak_box_offset", 0.6)):
        bad = _load_config("sam_synthetic")
        bad.data[field] = value
        with pytest.raises(ConfigError, match=f"data.{field}"):
            validate_sam(bad, 1)
    validate_sam(config, 1)


def test_box_mask_prompt_covers_the_box_to_a_fraction_of_a_cell():
    s = 64  # low-res grid 16 x 16, cells of 4 px
    boxes = jnp.asarray([[[8.0, 4.0, 20.0, 12.0], [0.0, 0.0, 64.0, 64.0]],
                         [[10.0, 6.0, 13.0, 7.0], [0.0, 0.0, 0.0, 0.0]]])
    m = np.asarray(samfn.box_mask_prompt(boxes, s))
    big = samfn.BOX_MASK_LOGIT
    assert m.shape == (2, 2, 16, 16)
    want = np.full((16, 16), -big)
    want[1:3, 2:5] = big  # the box covers cells x 2..4, y 1..2 exactly
    np.testing.assert_allclose(m[0, 0], want, atol=1e-6)
    np.testing.assert_allclose(m[0, 1], np.full((16, 16), big), atol=1e-6)  # the whole image
    # x [10, 13) covers half of cell 2 and a quarter of cell 3; y [6, 7) a quarter of cell 1.
    f = np.zeros((16, 16))
    f[1, 2], f[1, 3] = 0.5 * 0.25, 0.25 * 0.25
    np.testing.assert_allclose(m[1, 0], big * (2 * f - 1), atol=1e-6)
    np.testing.assert_allclose(m[1, 1], np.full((16, 16), -big), atol=1e-6)  # an empty (padding) box


def test_gray_canvas_normalisation_equals_sam_preprocess():
    img = np.random.default_rng(2).integers(0, 256, (37, 53), dtype=np.uint8)
    canvas, (h, w) = sam_data.resize_into_canvas(img, 64)
    ours = np.asarray(sam_data.normalize_gray(jnp.asarray(canvas[None]), jnp.asarray([[h, w]])))
    ref = samfn.preprocess(img, 64)
    assert (h, w) == tuple(ref.input_sizes[0])
    np.testing.assert_allclose(ours, ref.images, atol=1e-5)


def test_hflip_keeps_image_box_and_mask_together():
    rng = np.random.default_rng(3)
    s = 16
    images = rng.integers(0, 256, (4, s, s), dtype=np.uint8)
    sizes = np.array([[16, 10], [12, 16], [16, 16], [9, 7]], np.int32)
    for i, (h, w) in enumerate(sizes):
        images[i, h:] = 0
        images[i, :, w:] = 0
    masks = np.zeros((4, 1, s, s), np.uint8)
    boxes = np.array([[[1, 2, 4, 6]], [[3, 1, 9, 5]], [[0, 0, 16, 3]], [[2, 2, 5, 4]]], np.float32)
    for i, b in enumerate(boxes[:, 0].astype(int)):
        masks[i, 0, b[1]:b[3], b[0]:b[2]] = 255
    key = jax.random.key(0)
    im2, m2, b2 = (np.asarray(a) for a in train_sam.hflip(key, jnp.asarray(images), jnp.asarray(masks),
                                                            jnp.asarray(boxes), jnp.asarray(sizes)))
    flipped = [not np.array_equal(im2[i], images[i]) for i in range(4)]
    assert any(flipped)
    for i, (h, w) in enumerate(sizes):
        assert not im2[i, :, w:].any() and not im2[i, h:].any()  # padding stays at bottom/right
        b = b2[i, 0].astype(int)
        box_mask = np.zeros((s, s), bool)
        box_mask[b[1]:b[3], b[0]:b[2]] = True
        np.testing.assert_array_equal(m2[i, 0] > 0, box_mask)
        if flipped[i]:
            np.testing.assert_array_equal(im2[i, :h, :w], images[i, :h, :w][:, ::-1])
    # Flipping again with the same key restores everything.
    back = train_sam.hflip(key, jnp.asarray(im2), jnp.asarray(m2), jnp.asarray(b2), jnp.asarray(sizes))
    np.testing.assert_array_equal(np.asarray(back[0]), images)
    np.testing.assert_allclose(np.asarray(back[2]), boxes)


def test_examples_one_prompt_per_lesion(train_examples, data_root):
    ex = train_examples
    records, _ = read_mura(data_root, "train")
    n_lesions = sum(len(r.boxes) for r in records if r.mask_path)
    assert len(ex.lesions) == n_lesions == int(ex.valid.sum()) > 0
    assert ex.images.shape[1:] == (SIDE, SIDE) and ex.masks.shape[2:] == (SIDE, SIDE)
    for e in range(len(ex)):
        i = ex.image_index[e]
        h, w = ex.input_sizes[i]
        assert not ex.images[i, h:].any() and not ex.images[i, :, w:].any()
        for j in np.flatnonzero(ex.valid[e]):
            x0, y0, x1, y1 = ex.boxes[e, j]
            assert 0 <= x0 < x1 <= w + 1e-4 and 0 <= y0 < y1 <= h + 1e-4
            m = ex.masks[e, j]
            assert m.any()
            ys, xs = np.nonzero(m)  # the lesion's own mask stays in (about) its box
            assert xs.min() >= np.floor(x0) - 1 and xs.max() <= np.ceil(x1) and ys.min() >= np.floor(y0) - 1
        assert not ex.masks[e, ~ex.valid[e]].any()
    for les in ex.lesions:
        assert les.crop.any() and les.crop.shape == (les.box_px[3] - les.box_px[1], les.box_px[2] - les.box_px[0])
    # Training batches may fill empty prompt slots with copies of the image's lesions.
    rep = sam_data.gather_batch(ex, np.arange(len(ex)), repeat_prompts=True)
    assert rep["valid"].all()
    single = ex.valid.sum(1) == 1
    assert single.any()
    np.testing.assert_array_equal(rep["masks"][single, 1], ex.masks[single, 0])
    np.testing.assert_array_equal(rep["boxes"][single, 1], ex.boxes[single, 0])
    plain = sam_data.gather_batch(ex, np.array([-1, 0]))
    assert not plain["valid"][0].any() and (plain["valid"][1] == ex.valid[0]).all()
    # Scoring a perfect prediction gives Dice 1.
    les = ex.lesions[0]
    h0, w0 = ex.original_sizes[ex.image_index[les.example]]
    pred = np.zeros((h0, w0), bool)
    pred[les.box_px[1]:les.box_px[3], les.box_px[0]:les.box_px[2]] = les.crop
    assert sam_data.lesion_dice(pred, les) == (1.0, 1.0)


def test_scoring_frames_agree_with_training_frames(data_root):
    """Low-res logits made from the training masks (SAM input frame), scored the way `evaluate`
    scores (original frame, lesion's own mask): high Dice; the same logits shifted by 3 cells: low.
    Catches any mix-up between the frames."""
    records, _ = read_mura(data_root, "train")
    ex = sam_data.build_examples([r for r in records if r.boxes][:8], 256, 2)
    truth = {(l.example, l.prompt): l for l in ex.lesions}
    good, shifted = [], []
    for e in range(len(ex)):
        cover = ex.masks[e].astype(np.float64).reshape(2, 64, 4, 64, 4).mean((2, 4)) / 255
        logits = 20 * (cover - 0.5)
        i = ex.image_index[e]
        for lg, out in ((logits, good), (np.roll(logits, 3, axis=-1), shifted)):
            masks = samfn.postprocess_host(lg, ex.input_sizes[i], ex.original_sizes[i], 256)
            out += [sam_data.lesion_dice(masks[j], truth[(e, j)])[0] for j in np.flatnonzero(ex.valid[e])]
    assert len(good) == len(ex.lesions) > 0
    assert np.mean(good) > 0.75 and np.mean(shifted) < 0.5 * np.mean(good), (np.mean(good), np.mean(shifted))


def test_fill_box_baseline_is_the_dice_of_the_filled_box(train_examples):
    """sam_data.fill_box_dice equals lesion_dice of a mask that fills box_px, and evaluate reports it."""
    for t in train_examples.lesions[:6]:
        x0, y0, x1, y1 = t.box_px
        pred = np.zeros((y1 + 3, x1 + 3), bool)
        pred[y0:y1, x0:x1] = True
        np.testing.assert_allclose(sam_data.fill_box_dice(t), sam_data.lesion_dice(pred, t), atol=1e-12)
    assert 0 < sam_data.fill_box_dice(train_examples.lesions[0])[0] < 1


def test_epoch_iterator_resumes_exactly():
    a = sam_data.EpochIterator(10, 3, seed=5)
    first = [next(a) for _ in range(4)]  # crosses an epoch (3 batches per epoch)
    assert len(set(np.concatenate(first[:3]).tolist())) == 9  # no repeats inside an epoch
    state = json.loads(json.dumps(a.state()))
    rest = [next(a) for _ in range(5)]
    b = sam_data.EpochIterator(10, 3, seed=5, state=state)
    for x, y in zip(rest, [next(b) for _ in range(5)]):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(first[0], sam_data.EpochIterator(10, 3, seed=6).__next__())


def test_config_errors():
    config = _load_config("sam_synthetic")
    config.train.cache_embeddings = True
    with pytest.raises(ConfigError, match="train.cache_embeddings"):
        validate_sam(config, 1)
    for field, value in (("synthetic_abnormality_scale", 0.0), ("synthetic_conspicuity", "loud"),
                         ("synthetic_parts", "XR_HAND,XR_HAND")):  # the checks shared with the classifier
        bad = _load_config("sam_synthetic")
        bad.data[field] = value
        with pytest.raises(ConfigError, match=f"data.{field}"):
            validate_sam(bad, 1)
    err = check_overrides(["x", f"--config={CONFIGS / 'sam_synthetic.py'}", "--config.train.encoder=1"])
    assert "unknown config field" in err and "train_image_encoder" in err


# ---------------------------------------------------------------------------------------------
# Training steps in process


def _state_and_step(config):
    mesh = distributed.data_mesh()
    model = build_sam(config.model.arch, config.model.img_size)
    tx = optim.make_optimizer(config.train.optimizer, optim.schedule(config.train.learning_rate, 100, 0),
                              config.train.weight_decay, config.train.momentum, config.train.grad_clip)
    state = train_sam.create_state(model, tx, config, mesh)
    step = jax.jit(train_sam.make_train_step(model, tx, config), donate_argnums=0)
    return model, state, step


def _copy(tree):
    return jax.tree.map(lambda a: np.array(a), tree)


def test_loss_decreases_and_frozen_parts_stay(train_examples, data_root):
    config = _small(_load_config("sam_synthetic"), data_root)
    config.train.learning_rate = 1e-3
    _, state, step = _state_and_step(config)
    before = _copy({"frozen": state["frozen"], "params": state["params"]})
    batch = sam_data.gather_batch(train_examples, np.arange(min(4, len(train_examples))))
    losses = []
    for _ in range(12):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    assert np.isfinite(losses).all()
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:2]), losses
    after = _copy({"frozen": state["frozen"], "params": state["params"]})
    assert set(after["frozen"]["params"]) == {"prompt_encoder"}
    jax.tree.map(np.testing.assert_array_equal, before["frozen"], after["frozen"])  # bit-identical
    assert set(after["params"]) == {"image_encoder", "mask_decoder"}
    for part in ("image_encoder", "mask_decoder"):
        moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), before["params"][part], after["params"][part])
        assert max(jax.tree.leaves(moved)) > 0


@pytest.mark.slow  # ~50 s on 2 cores (CI's 45-minute budget); the vit_b model's parity tests run always
def test_vit_b_config_one_step(train_examples):
    """The vit_b config's structure and settings, at 64 px with random weights (official weights
    are 1024 px and not available here), takes one training step."""
    config = _load_config("sam_finetune_fracatlas_vit_b")
    assert config.model.arch == "vit_b" and config.model.img_size == 1024
    assert config.init_from  # points at a converted official checkpoint
    validate_sam(config, 1)
    config.init_from = ""
    config.model.img_size = SIDE
    config.data.max_prompts = 2
    _, state, step = _state_and_step(config)
    assert state["params"]["image_encoder"]["blocks_11"]["attn"]["qkv"]["kernel"].shape == (768, 2304)
    pe_before = _copy(state["frozen"])
    dec_before = _copy(state["params"]["mask_decoder"])
    batch = sam_data.gather_batch(train_examples, np.arange(2))
    state, m = step(state, batch)
    assert np.isfinite(float(m["loss"])) and float(m["grad_norm"]) > 0
    assert int(state["step"]) == 1
    jax.tree.map(np.testing.assert_array_equal, pe_before, _copy(state["frozen"]))
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), state["params"]["mask_decoder"], dec_before)
    assert max(jax.tree.leaves(moved)) > 0


# ---------------------------------------------------------------------------------------------
# The whole run through the CLI


@pytest.fixture(scope="module")
def cli_run(data_root, tmp_path_factory):
    """The demo's SAM config (configs/sam_synthetic.py trained on a classifier's maps) through the
    CLI, 2 epochs on 16 studies, with a random classifier's maps (24 px boxes at 64 px)."""
    workdir = tmp_path_factory.mktemp("samrun")
    cls_dir = _random_classifier(tmp_path_factory.mktemp("samrun_classifier") / "classifier", SIDE)
    args = [sys.executable, "-m", "mskjax.train", f"--config={CONFIGS / 'sam_synthetic_classifier_maps.py'}",
            f"--workdir={workdir}", f"--config.data.map_prompts={cls_dir}", "--config.data.map_box_side=24",
            f"--config.data.root={data_root}", "--config.data.synthetic_studies=16",
            "--config.data.synthetic_parts=", "--config.data.synthetic_conspicuity=realistic",
            "--config.eval.every_epochs=1",
            f"--config.model.img_size={SIDE}", "--config.train.batch_size=2", "--config.train.epochs=2",
            "--config.eval.batch_size=4", "--config.train.log_every=1", "--config.train.learning_rate=1e-3"]
    out = subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=900,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return workdir, out.stdout


def test_cli_run_writes_results_and_exports_best(cli_run):
    workdir, stdout = cli_run
    results = json.loads((workdir / "results.json").read_text())
    assert results["best_step"] > 0
    for split in ("valid", "test"):
        rep = results[split]
        assert rep["n"] > 0 and 0.0 <= rep["dice"] <= 1.0
        assert set(rep["by_type"]) <= {"fracture", "hardware", "lesion"}
        assert 0.0 < rep["fill_box"]["dice"] < 1.0 and rep["fill_box"]["n"] == rep["n"]
    assert len(results["test"]["lesions"]) == results["test"]["n"]
    assert results["time"]["cpu_s"] > 0
    lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert any("valid/dice" in l for l in lines) and any("train/loss" in l for l in lines)
    assert "valid at step" in stdout
    # Trained on a classifier's maps: valid is scored with them at every evaluation, the best model
    # is kept by that Dice, and valid and test report it.
    evals = [l for l in lines if "valid/map_dice" in l]
    assert len(evals) == 2 and all("valid/dice" in l for l in evals)
    best = max(evals, key=lambda l: l["valid/map_dice"])  # the first of equals, as the loop keeps it
    assert results["best_step"] == best["step"]
    for split in ("valid", "test"):
        m = results[split]["map_prompts"]
        assert m["n"] > 0 and 0.0 <= m["dice"] <= 1.0
    np.testing.assert_allclose(results["valid"]["map_prompts"]["dice"], best["valid/map_dice"], atol=1e-6)
    _, _, meta = checkpoint.load_sam(workdir / "best")
    np.testing.assert_allclose(meta["source"]["valid_map_dice"], best["valid/map_dice"], atol=1e-6)
    assert meta["map_prompt"]["box_side"] == 24.0


def test_exported_best_loads_and_predicts(cli_run, data_root):
    workdir, _ = cli_run
    model, variables, meta = checkpoint.load_sam(workdir / "best")
    assert meta["kind"] == "sam" and meta["arch"] == "vit_tiny" and meta["img_size"] == SIDE
    assert meta["source"]["format"] == "mskjax.train_sam" and meta["source"]["trained"] == ["image_encoder", "mask_decoder"]
    assert meta["box_mask_prompt"] is True and samfn.uses_box_mask_prompt(meta)  # as configs/sam_synthetic.py
    # The prompt encoder in the export is the untouched initialisation.
    config = _small(_load_config("sam_synthetic"), data_root)
    _, state, _ = _state_and_step(config)
    init = _copy(state["frozen"])
    jax.tree.map(np.testing.assert_array_equal, init["params"]["prompt_encoder"], variables["params"]["prompt_encoder"])
    jax.tree.map(np.testing.assert_array_equal, init["buffers"], variables["buffers"])
    # Predicts through the public SAM functions, with the official-style preprocess.
    rec = next(r for r in read_mura(data_root, "test")[0] if r.boxes)
    from mskjax.data.images import decode_image
    img = sam_data.to_uint8(decode_image(rec.path).image)
    batch = samfn.preprocess(img, SIDE)
    emb = samfn.embed(model, variables, jnp.asarray(batch.images))
    boxes = samfn.transform_boxes(np.asarray(rec.boxes, np.float32)[None], batch.original_sizes)
    out = samfn.decode(model, variables, emb, boxes=jnp.asarray(boxes), multimask=False,
                       mask_input=samfn.box_mask_prompt(jnp.asarray(boxes), SIDE))
    masks = samfn.postprocess(out["low_res_logits"][0, :, 0], batch.input_sizes[0], batch.original_sizes[0], SIDE)
    assert masks.shape == (len(rec.boxes), *img.shape) and bool(np.isfinite(out["low_res_logits"]).all())
    # The trainer's predict (what evaluate scores) is that same computation.
    canvas, hw = sam_data.resize_into_canvas(img, SIDE)
    sizes = np.asarray([hw], np.int32)
    trained = train_sam.make_predict(model, box_mask=True)(variables, jnp.asarray(canvas[None]), jnp.asarray(sizes),
                                                           jnp.asarray(boxes))
    np.testing.assert_allclose(np.asarray(trained), np.asarray(out["low_res_logits"][:, :, 0]), atol=1e-3, rtol=1e-3)
    plain = train_sam.make_predict(model, box_mask=False)(variables, jnp.asarray(canvas[None]), jnp.asarray(sizes),
                                                          jnp.asarray(boxes))
    assert float(np.abs(np.asarray(plain) - np.asarray(trained)).max()) > 1e-3  # the mask prompt matters


def test_peak_points_are_the_map_box_centres_with_the_same_draws(train_examples):
    """data.peak_point: the point of a map-shaped prompt is its centre (clipped into the image), drawn
    with the same random numbers as the box (so configs without points train exactly as before)."""
    b = sam_data.gather_batch(train_examples, np.arange(4))
    masks, sizes = jnp.asarray(b["masks"]), jnp.asarray(b["input_sizes"])
    key = jax.random.PRNGKey(5)
    boxes = train_sam.peak_like_boxes(key, masks, sizes, 0.3, 0.03)
    same, points = train_sam.peak_like_boxes(key, masks, sizes, 0.3, 0.03, return_points=True)
    np.testing.assert_array_equal(np.asarray(boxes), np.asarray(same))
    pts, bx = np.asarray(points), np.asarray(boxes)
    h, w = b["input_sizes"][:, 0, None], b["input_sizes"][:, 1, None]
    assert (pts[..., 0] >= 0).all() and (pts[..., 0] <= w).all() and (pts[..., 1] <= h).all()
    inside = (bx[..., 0] > 0) & (bx[..., 2] < w) & (bx[..., 1] > 0) & (bx[..., 3] < h)  # not slid
    assert inside.any()
    np.testing.assert_allclose(pts[inside], ((bx[..., :2] + bx[..., 2:]) / 2)[inside], atol=1e-4)
    given = jnp.asarray([[True, False]] * 4)
    p, lab = samfn.peak_point_prompts(points, given)
    assert p.shape == (4, 2, 1, 2) and lab.shape == (4, 2, 1)
    np.testing.assert_array_equal(np.asarray(lab)[..., 0], np.where(np.asarray(given), 1, -1))
    np.testing.assert_array_equal(np.asarray(p)[:, 1], 0.0)


@pytest.mark.slow  # ~80 s (two compiled steps) for an option the demo does not use; CI's budget
def test_peak_point_config_trains_and_is_recorded(train_examples, data_root, tmp_path):
    config = _small(_load_config("sam_synthetic_map_points"), data_root)
    assert config.data.peak_point and config.data.peak_box_share > 0
    bad = _small(_load_config("sam_synthetic_map_points"), data_root)
    bad.data.peak_box_share = 0.0
    with pytest.raises(ConfigError, match="data.peak_point"):
        validate_sam(bad, 1)
    losses = {}
    for points in (True, False):
        config.data.peak_point = points
        _, state, step = _state_and_step(config)
        batch = sam_data.gather_batch(train_examples, np.arange(2))
        state, m = step(state, batch)  # the state is donated: keep the returned one
        losses[points] = float(m["loss"])
    assert np.isfinite(list(losses.values())).all()
    assert losses[True] != losses[False]  # the point tokens reach the decoder
    config.data.peak_point = True
    train_sam.export_sam(tmp_path / "ck", train_sam.merge_variables(state["params"], state["frozen"]), config, {})
    assert checkpoint.load_sam(tmp_path / "ck")[2]["peak_point"] is True


def test_map_prompt_is_the_map_inside_its_box():
    """mskjax.sam.map_prompt: BOX_MASK_LOGIT * (2 f m - 1), f the cell's share inside the box, m the
    map's mean over the cell (16 px input, 4 x 4 low-res cells of 4 px)."""
    maps = np.zeros((16, 16), np.float32)
    maps[0:4, 0:4] = 1.0       # cell (0, 0) at the map's maximum
    maps[4:8, 4:8] = 0.5       # cell (1, 1) at half
    maps[0:4, 8:10] = 1.0      # cell (0, 2): half its pixels at 1
    box = jnp.asarray([0.0, 0.0, 12.0, 6.0])  # cells x 0..2 whole, y row 0 whole, row 1 half
    out = np.asarray(samfn.map_prompt(jnp.asarray(maps), box, 16, 4))
    L = samfn.BOX_MASK_LOGIT
    assert out.shape == (4, 4)
    assert out[0, 0] == pytest.approx(L)                       # f 1, m 1
    assert out[1, 1] == pytest.approx(L * (2 * 0.5 * 0.5 - 1))  # f 0.5, m 0.5
    assert out[0, 2] == pytest.approx(0.0)                     # f 1, m 0.5
    assert out[0, 1] == pytest.approx(-L)                      # inside the box, map 0
    assert out[3, 3] == pytest.approx(-L) and out[0, 3] == pytest.approx(-L)  # outside the box
    # A map at 1 everywhere is the plain box mask.
    np.testing.assert_allclose(np.asarray(samfn.map_prompt(jnp.ones((16, 16)), box, 16, 4)),
                               np.asarray(samfn.box_mask_prompt(box, 16, 4)), atol=1e-6)


def test_with_map_prompt_takes_the_map_box_the_map_and_the_union_of_lesions(train_examples):
    b = sam_data.gather_batch(train_examples, np.arange(4), repeat_prompts=True)
    s = SIDE
    low = s // 4
    rng = np.random.default_rng(0)
    maps = jnp.asarray(rng.integers(0, 256, (4, s, s), dtype=np.uint8))
    map_boxes = jnp.asarray([[2.0, 3.0, 30.0, 40.0]] * 4)
    boxes, masks, valid = jnp.asarray(b["boxes"]), jnp.asarray(b["masks"]), jnp.asarray(b["valid"])
    mi = samfn.box_mask_prompt(boxes, s, low)
    key = jax.random.PRNGKey(1)
    nb, nm, ni = train_sam.with_map_prompt(key, boxes, masks, valid, mi, maps, map_boxes, 1.0, s, low)
    np.testing.assert_array_equal(np.asarray(nb[:, 0]), np.asarray(map_boxes))
    np.testing.assert_array_equal(np.asarray(nb[:, 1:]), np.asarray(boxes[:, 1:]))  # other slots unchanged
    union = np.where(b["valid"][:, :, None, None], b["masks"], 0).max(axis=1)
    np.testing.assert_array_equal(np.asarray(nm[:, 0]), union)
    np.testing.assert_array_equal(np.asarray(nm[:, 1:]), b["masks"][:, 1:])
    np.testing.assert_allclose(np.asarray(ni[:, 0]),
                               np.asarray(samfn.map_prompt(maps.astype(jnp.float32) / 255.0, map_boxes, s, low)),
                               atol=1e-6)
    np.testing.assert_array_equal(np.asarray(ni[:, 1:]), np.asarray(mi[:, 1:]))
    # A share of one half takes some examples and not others, with the same key the same ones.
    hb, _, _ = train_sam.with_map_prompt(jax.random.PRNGKey(3), boxes, masks, valid, mi, maps,
                                         jnp.asarray([[2.0, 3.0, 30.0, 40.0]] * 4), 0.5, s, low)
    took = np.all(np.asarray(hb[:, 0]) == np.asarray(map_boxes), axis=1)
    assert took.shape == (4,)
    again, _, _ = train_sam.with_map_prompt(jax.random.PRNGKey(3), boxes, masks, valid, mi, maps, map_boxes, 0.5, s, low)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(hb))


def _random_classifier(directory: Path, side: int) -> Path:
    """A 1-channel ResNet18 classifier checkpoint with random weights at a `side` px input
    (tests/test_pipeline.py's builder; tests/ is not a package: loaded by path)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("_mskjax_test_pipeline", REPO / "tests" / "test_pipeline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.random_classifier(directory, side)


@pytest.fixture(scope="module")
def map_setup(data_root, tmp_path_factory):
    """The map-prompt config at test size with a random classifier's maps: (config, classifier
    directory, examples of every split)."""
    cls_dir = _random_classifier(tmp_path_factory.mktemp("maps") / "classifier", SIDE)
    config = _small(_load_config("sam_synthetic_classifier_maps"), data_root)
    config.data.map_prompts = str(cls_dir)
    config.data.map_box_side = 24.0
    examples, _ = train_sam.load_examples(config, log=lambda *a: None)
    return config, cls_dir, examples


def test_map_prompt_config_trains_on_the_classifiers_maps_and_is_recorded(map_setup, data_root, tmp_path):
    from mskjax.pipeline import MapPrompter, Pipeline, PipelineConfig, PipelineError
    config, cls_dir, examples = map_setup
    validate_sam(config, 1)
    for field, value, match in (("train.box_mask_prompt", False, "box_mask_prompt"),
                                ("data.map_prompt_share", 0.0, "map_prompt_share"),
                                ("data.map_cam", "nope", "map_cam"), ("data.map_flips", "x", "map_flips")):
        bad = _small(_load_config("sam_synthetic_classifier_maps"), data_root)
        bad.data.map_prompts = str(cls_dir)
        section, name = field.split(".")
        bad[section][name] = value
        with pytest.raises(ConfigError, match=match):
            validate_sam(bad, 1)

    ex = examples["train"]
    n_img = len(ex.paths)
    assert ex.maps.shape == (n_img, SIDE, SIDE) and ex.maps.dtype == np.uint8 and ex.map_boxes.shape == (n_img, 4)
    assert examples["valid"].maps.shape == (len(examples["valid"].paths), SIDE, SIDE)  # valid is scored with them
    # The maps and boxes are what the pipeline's first half gives for those images.
    from mskjax.data.images import decode_image
    mp = MapPrompter.from_directory(cls_dir, train_sam.map_pipeline_config(config), SIDE)
    want = mp.run([decode_image(p).image for p in ex.paths[:3]])
    np.testing.assert_allclose(ex.map_boxes[:3], want["boxes_sam"], atol=1e-5)
    np.testing.assert_allclose(ex.maps[:3] / 255.0, want["maps_sam"], atol=0.5 / 255 + 1e-6)
    sides = ex.map_boxes[:, 2:] - ex.map_boxes[:, :2]
    assert (sides > 0).all() and (ex.map_boxes >= 0).all() and (ex.map_boxes <= SIDE).all()

    batch = sam_data.gather_batch(ex, np.arange(2), repeat_prompts=True)
    assert batch["maps"].shape == (2, SIDE, SIDE) and batch["map_boxes"].shape == (2, 4)
    model, state, _ = _state_and_step(config)
    tx = optim.make_optimizer(config.train.optimizer, optim.schedule(config.train.learning_rate, 100, 0),
                              config.train.weight_decay, config.train.momentum, config.train.grad_clip)
    step = jax.jit(train_sam.make_train_step(model, tx, config))  # not donated: the same state twice
    _, m_flat = step(state, {**batch, "maps": np.full_like(batch["maps"], 255)})
    state, m = step(state, batch)
    assert np.isfinite([float(m["loss"]), float(m_flat["loss"])]).all()
    assert float(m["loss"]) != float(m_flat["loss"])  # the map reaches the loss (a flat map: the plain box)

    train_sam.export_sam(tmp_path / "ck", train_sam.merge_variables(state["params"], state["frozen"]), config, {})
    smodel, svars, smeta = checkpoint.load_sam(tmp_path / "ck")
    rec = smeta["map_prompt"]
    assert rec["cam"] == "layer_cam" and rec["cam_layer"] == "layer2" and rec["box_side"] == 24.0
    assert rec["classifier"] == str(cls_dir) and rec["map_flips"] == config.data.map_flips == "hv"
    other = config.copy_and_resolve_references()
    other.data.map_flips = "h"
    assert train_sam.map_pipeline_config(other).map_flips == "h"  # what MapPrompter and the record then use
    cmodel, cvars, cmeta = checkpoint.load_classifier(cls_dir)
    Pipeline(cmodel, cvars, cmeta, smodel, svars, smeta, train_sam.map_pipeline_config(config))
    with pytest.raises(PipelineError, match="trained with"):
        Pipeline(cmodel, cvars, cmeta, smodel, svars, smeta, PipelineConfig(cam="layer_cam", cam_layer="layer2"))


def test_train_prompt_encoder_moves_its_parameters_not_its_buffer(train_examples, data_root):
    config = _small(_load_config("sam_synthetic"), data_root)
    config.train.train_prompt_encoder = True
    assert train_sam.trainable_parts(config) == ("image_encoder", "mask_decoder", "prompt_encoder")
    _, state, step = _state_and_step(config)
    before = _copy({"frozen": state["frozen"], "params": state["params"]})
    state, m = step(state, sam_data.gather_batch(train_examples, np.arange(2)))
    after = _copy({"frozen": state["frozen"], "params": state["params"]})
    assert np.isfinite(float(m["loss"]))
    jax.tree.map(np.testing.assert_array_equal, before["frozen"], after["frozen"])  # the buffer, bit for bit
    assert after["frozen"]["params"] == {}
    moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), before["params"]["prompt_encoder"],
                         after["params"]["prompt_encoder"])
    assert moved["mask_downscaling_0"]["kernel"] > 0  # the dense prompt's path learns (box mask prompts)


def test_hflip_with_map_flips_the_map_and_its_box_with_the_image():
    rng = np.random.default_rng(4)
    s = 16
    images = rng.integers(0, 256, (4, s, s), dtype=np.uint8)
    sizes = np.array([[16, 10], [12, 16], [16, 16], [9, 7]], np.int32)
    masks = rng.integers(0, 256, (4, 2, s, s), dtype=np.uint8)
    boxes = rng.uniform(0, 6, (4, 2, 4)).astype(np.float32)
    maps = np.zeros((4, s, s), np.uint8)
    map_boxes = np.array([[1, 2, 4, 6], [3, 1, 9, 5], [0, 0, 16, 3], [2, 2, 5, 4]], np.float32)
    for i, b in enumerate(map_boxes.astype(int)):
        maps[i, b[1]:b[3], b[0]:b[2]] = 200  # the map is its box: where the box goes, the map must go
    key = jax.random.key(1)
    args = [jnp.asarray(a) for a in (images, masks, boxes, sizes)]
    im, m, b, mp, mb = (np.asarray(a) for a in train_sam.hflip_with_map(key, *args, jnp.asarray(maps),
                                                                       jnp.asarray(map_boxes)))
    ref = [np.asarray(a) for a in train_sam.hflip(key, *args)]
    np.testing.assert_array_equal(im, ref[0])
    np.testing.assert_array_equal(m, ref[1])
    np.testing.assert_array_equal(b, ref[2])
    flipped = [not np.array_equal(im[i], images[i]) for i in range(4)]
    assert any(flipped) and not all(flipped)
    for i in range(4):
        bx = mb[i].astype(int)
        want = np.zeros((s, s), bool)
        want[bx[1]:bx[3], bx[0]:bx[2]] = True
        np.testing.assert_array_equal(mp[i] > 0, want)
        w, (x0, y0, x1, y1) = float(sizes[i, 1]), map_boxes[i]
        np.testing.assert_allclose(mb[i], [w - x1, y0, w - x0, y1] if flipped[i] else map_boxes[i])


def test_map_prompt_scoring_decodes_the_map_prompt_and_scores_each_image_against_its_mask(map_setup, data_root):
    """evaluate_map_prompts: every image once, prompted with its map box and the map inside it
    (make_predict_map = samfn.decode with samfn.map_prompt), its mask in the original frame scored
    against the image's whole ground-truth mask file (Dice by hand), batches padded."""
    from mskjax.data.images import decode_image
    from mskjax.pipeline import read_mask
    config, _, examples = map_setup
    ex = examples["valid"]
    n = len(ex.paths)
    assert n >= 2
    model, state, _ = _state_and_step(config)
    variables = train_sam.merge_variables(state["params"], state["frozen"])

    predict = jax.jit(train_sam.make_predict_map(model))
    got = np.asarray(predict(variables, ex.images, ex.input_sizes, ex.maps, ex.map_boxes))
    emb = samfn.embed(model, variables, sam_data.normalize_canvas(jnp.asarray(ex.images), jnp.asarray(ex.input_sizes)))
    boxes = jnp.asarray(ex.map_boxes)[:, None]
    dense = samfn.map_prompt(jnp.asarray(ex.maps, jnp.float32)[:, None] / 255.0, boxes, SIDE, model.config.low_res_size)
    ref = samfn.decode(model, variables, emb, boxes=boxes, mask_input=dense, multimask=False)["low_res_logits"][:, :, 0]
    np.testing.assert_allclose(got, np.asarray(ref), atol=1e-4, rtol=1e-4)

    # Scoring, with a stand-in decoder whose logits are known: the dense prompt itself.
    def stand_in(v, images, sizes, maps, map_boxes):
        return samfn.map_prompt(maps.astype(jnp.float32)[:, None] / 255.0, map_boxes[:, None], SIDE, SIDE // 4)

    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    # Flat maps in each image's first lesion box (a random classifier's boxes may miss every lesion).
    first = [int(np.flatnonzero(ex.image_index == i)[0]) for i in range(n)]
    ex = dataclasses.replace(ex, maps=np.full_like(ex.maps, 255), map_boxes=ex.boxes[first, 0])
    rep = train_sam.evaluate_map_prompts(stand_in, None, ex, 3, sharding)  # 3: the last batch is padded
    records = {r.path: r for r in read_mura(data_root, "valid")[0]}
    want_d, want_i = [], []
    low = np.asarray(stand_in(None, None, None, jnp.asarray(ex.maps), jnp.asarray(ex.map_boxes)))
    for i, path in enumerate(ex.paths):
        hw = decode_image(path).image.shape
        truth = read_mask(records[path].mask_path, hw) > 0
        pred = samfn.postprocess_host(low[i, 0], ex.input_sizes[i], ex.original_sizes[i], SIDE)
        inter = np.logical_and(pred, truth).sum()
        want_d.append(2 * inter / (pred.sum() + truth.sum()))
        want_i.append(inter / np.logical_or(pred, truth).sum())
    assert rep["n"] == n
    np.testing.assert_allclose([rep["dice"], rep["iou"]], [np.mean(want_d), np.mean(want_i)], rtol=1e-9)
    assert 0.0 < rep["dice"] < 1.0
