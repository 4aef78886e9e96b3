"""The jitted pipeline: each output equals the library function it stands for, frames line up,
normal images get no mask, padding is inert, unreadable files are reported, checkpoints load."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mskjax import boxes as boxlib
from mskjax import cam as camlib
from mskjax import checkpoint, geometry
from mskjax import deletion_choice as dc
from mskjax import sam as samfn
from mskjax.classifier import GrayAsRGB
from mskjax.data.images import decode_image
from mskjax.data.mura import read_mura
from mskjax.models import create
from mskjax.models.sam import build_sam, sam_variable_shapes
from mskjax.checkpoint import load_classifier, load_sam
from mskjax.pipeline import Item, Pipeline, PipelineConfig, PipelineError, content_bounds, content_mask, describe
from mskjax.weights.mapping import CheckpointMismatch
from mskjax.weights.sam import sam_metadata

CLS_SIZE = 64
SAM_SIZE = 64


def random_variables(shapes, seed: int):
    """Numpy variables for a tree of ShapeDtypeStructs without compiling an initialiser: kernels
    LeCun normal, BatchNorm var / LayerNorm scale 1, biases and means 0, embeddings N(0, 1)."""
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "kernel":
            return (rng.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1]))).astype(np.float32)
        if name in ("scale", "var"):
            return np.ones(s.shape, np.float32)
        if name in ("embedding", "positional_encoding_gaussian_matrix"):
            return rng.normal(size=s.shape).astype(np.float32)
        return np.zeros(s.shape, np.float32)
    return jax.tree_util.tree_map_with_path(leaf, shapes)


def random_classifier(directory: Path, side: int = CLS_SIZE, mode: str = "resize", seed: int = 0,
                      norm: dict | None = None) -> Path:
    """A 1-channel ResNet18 classifier checkpoint (input `side` px, `mode`), random weights, in the
    checkpoint contract (also tests/sam/test_train_sam.py's classifier for map prompts)."""
    model = create("resnet18", num_classes=1)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, side, side, 1)), train=False))
    meta = checkpoint.classifier_metadata("resnet18", 1, 1, side, {"padding": "symmetric"},
                                          norm or {"input_range": [0.0, 1.0], "mean": [0.5], "std": [0.25]})
    meta["data"] = {"mode": mode, "image_size": side}
    return checkpoint.save(directory, random_variables(shapes, seed), meta)


def make_checkpoints(root: Path, mode: str, seed: int = 0, norm: dict | None = None) -> tuple[Path, Path]:
    """A 1-channel ResNet18 classifier (input CLS_SIZE, `mode`) and a vit_tiny SAM (SAM_SIZE),
    random weights, in the checkpoint contract."""
    cls_dir = random_classifier(root / "classifier", CLS_SIZE, mode, seed, norm)
    sam = build_sam("vit_tiny", SAM_SIZE)
    sam_dir = checkpoint.save(root / "sam", random_variables(sam_variable_shapes(sam), seed + 1),
                              sam_metadata("vit_tiny", SAM_SIZE))
    return cls_dir, sam_dir


def make_synthetic(out: Path) -> Path:
    """8 studies (one abnormal, with masks and boxes), all in a 'test' split, small images."""
    subprocess.run([sys.executable, "-m", "mskjax.data.synthetic", "--out", str(out), "--studies", "8", "--seed", "0",
                    "--splits", "test:1.0", "--size-range", "96", "160", "--workers", "1"], check=True,
                   capture_output=True)
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    cls_dir, sam_dir = make_checkpoints(root, "letterbox")
    pipe = Pipeline.from_directories(cls_dir, sam_dir, PipelineConfig(threshold=0.5))
    data = make_synthetic(root / "syn")
    records, _ = read_mura(data, "test")
    return pipe, records, cls_dir, sam_dir


def _batch_of(pipe, records, n, batch_size):
    recs = sorted(records, key=lambda r: -r.label)[:n]  # the abnormal images first
    images = [decode_image(r.path).image for r in recs]
    num_gt = max(len(r.boxes) for r in recs)
    return recs, images, pipe.prepare(images, batch_size, [r.boxes for r in recs], num_gt)


def test_step_outputs_equal_their_parts(setup):
    pipe, records, _, _ = setup
    recs, images, batch = _batch_of(pipe, records, 3, 4)
    assert batch["gt_boxes"].shape[1] >= 1 and batch["gt_valid"][0].any()
    batch["threshold"] = np.float32(-1.0)  # every real image "abnormal": all its prompts decode
    out = pipe.step(batch)
    model, cvars = pipe.classifier, pipe.classifier_variables

    # References, jitted once (eager SAM / ResNet would compile op by op).
    @jax.jit
    def reference(batch):
        x = (batch["images"] - 0.5) / 0.25
        logits = model.apply(cvars, x, train=False)
        # Grad-CAM by hand for the 1-channel model, zeroed on the letterbox padding.
        acts = model.apply(cvars, x, method="features")
        grads = jax.grad(lambda a: model.apply(cvars, a, method="head")[:, 0].sum())(acts)
        raw = jnp.einsum("bhwc,bc->bhw", acts, grads.mean(axis=(1, 2)))
        cam = camlib.postprocess(raw, (CLS_SIZE, CLS_SIZE)) * content_mask(batch["geometry"])
        return jax.nn.sigmoid(logits[:, 0]), cam

    p, cam = reference(batch)
    np.testing.assert_allclose(out["probability"], np.asarray(p), atol=1e-5)
    np.testing.assert_array_equal(out["abnormal"], [True, True, True, False])  # the 4th row is padding
    np.testing.assert_allclose(out["cam"], np.asarray(cam), atol=1e-5)

    # Peak boxes (the report's 50 px at 224, scaled) in the classifier frame, then original, then SAM.
    pk = boxlib.peak_boxes(jnp.asarray(out["cam"]), bounds=content_bounds(batch["geometry"]))
    np.testing.assert_allclose(out["boxes_input"][:, 0], np.asarray(pk.boxes), atol=1e-5)
    b = np.asarray(pk.boxes)
    inside = (b[:, 0] > 0) & (b[:, 2] < CLS_SIZE)  # not clipped at the border
    np.testing.assert_allclose((b[:, 2] - b[:, 0])[inside], 50 * CLS_SIZE / 224, atol=1e-4)
    g = batch["geometry"]
    for i, im in enumerate(images):
        h0, w0 = im.shape
        s, top, left = float(g.scale_x[i]), float(g.top[i]), float(g.left[i])
        b = out["boxes_input"][i, 0]
        by_hand = np.clip([(b[0] - left) / s, (b[1] - top) / float(g.scale_y[i]), (b[2] - left) / s,
                           (b[3] - top) / float(g.scale_y[i])], 0, [w0, h0, w0, h0])
        np.testing.assert_allclose(out["boxes"][i, 0], by_hand, atol=1e-3)
        np.testing.assert_allclose(out["boxes_sam"][i, 0], samfn.transform_boxes(by_hand, (h0, w0), SAM_SIZE),
                                   atol=1e-3)
        assert out["box_valid"][i, 0] == (by_hand[2] > by_hand[0] and by_hand[3] > by_hand[1])
    assert not out["box_valid"][3].any()

    # SAM masks: the same logits as embedding + decoding the SAM-frame boxes separately.
    gt_sam = samfn.transform_boxes(batch["gt_boxes"], batch["original_hw"].astype(np.float64), SAM_SIZE)
    prompts = jnp.concatenate([jnp.asarray(out["boxes_sam"]), jnp.asarray(gt_sam)], axis=1)

    @jax.jit
    def sam_reference(images, prompts):
        emb = samfn.embed(pipe.sam_model, pipe.sam_variables, images)
        return samfn.decode(pipe.sam_model, pipe.sam_variables, emb, boxes=prompts, multimask=False)
    low = np.asarray(sam_reference(jnp.asarray(batch["sam_images"]), prompts)["low_res_logits"][:, :, 0])
    k = out["mask_logits"].shape[1]
    for i in range(3):
        for j in range(k):
            if out["box_valid"][i, j]:
                np.testing.assert_allclose(out["mask_logits"][i, j], low[i, j], atol=2e-3)
        for j in range(batch["gt_boxes"].shape[1]):
            if batch["gt_valid"][i, j]:
                np.testing.assert_allclose(out["gt_mask_logits"][i, j], low[i, k + j], atol=2e-3)
    assert np.all(out["mask_logits"][~out["box_valid"]] == samfn.INVALID_PROMPT_LOGIT)

    # Back to the original frame: the numpy path equals mskjax.sam.postprocess.
    h0, w0 = images[0].shape
    mine = samfn.postprocess_host(out["gt_mask_logits"][0], batch["sam_input_sizes"][0], (h0, w0), SAM_SIZE,
                                  return_logits=True)
    ref = samfn.postprocess(jnp.asarray(out["gt_mask_logits"][0]), batch["sam_input_sizes"][0], (h0, w0), SAM_SIZE,
                            return_logits=True)
    np.testing.assert_allclose(mine, np.asarray(ref), atol=1e-3)


def test_per_image_normalisation_reaches_the_classifier(setup, tmp_path):
    """A checkpoint trained with data.normalization = "per_image" gets each image standardised in
    the pipeline too, as in training (mskjax.classifier.prepare_images)."""
    pipe, records, _, _ = setup
    norm = {"input_range": [0.0, 1.0], "mean": [0.0], "std": [1.0], "per_image": True}
    cls_dir, sam_dir = make_checkpoints(tmp_path, "letterbox", norm=norm)
    per = Pipeline.from_directories(cls_dir, sam_dir, PipelineConfig(threshold=0.5))
    assert per.normalization["per_image"] is True and pipe.normalization["per_image"] is False
    _, _, batch = _batch_of(per, records, 2, 2)
    out = per.step(batch)
    x = np.asarray(batch["images"], np.float64)
    z = (x - x.mean(axis=(1, 2, 3), keepdims=True)) / x.std(axis=(1, 2, 3), keepdims=True)
    logits = per.classifier.apply(per.classifier_variables, jnp.asarray(z, jnp.float32), train=False)
    np.testing.assert_allclose(out["probability"], np.asarray(jax.nn.sigmoid(logits[:, 0])), atol=1e-5)


def test_normal_images_get_no_mask_and_threshold_needs_no_recompile(setup):
    pipe, records, _, _ = setup
    _, _, batch = _batch_of(pipe, records, 2, 4)
    pipe.step(dict(batch, threshold=np.float32(0.5)))  # compiled here, whatever ran before on this worker
    before = pipe._step._cache_size()
    batch["threshold"] = np.float32(2.0)  # nothing reaches it
    out = pipe.step(batch)
    assert pipe._step._cache_size() == before
    assert not out["abnormal"].any() and not out["box_valid"].any()
    assert np.all(out["mask_logits"] == samfn.INVALID_PROMPT_LOGIT)
    # Ground-truth prompts still decode (they do not depend on the classifier's decision).
    assert np.all(out["gt_mask_logits"][batch["gt_valid"]] > samfn.INVALID_PROMPT_LOGIT)


def test_run_maps_back_to_original_size_and_reports_unreadable(setup, shared_data, tmp_path):
    pipe, records, _, _ = setup
    frac = sorted((shared_data / "fracatlas" / "images").iterdir())[:2]
    bad = tmp_path / "not_an_image.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage")
    syn = sorted(records, key=lambda r: -r.label)[:3]  # as in the first test: same shapes, no recompile
    items = ([Item(str(p), "frac") for p in frac] + [Item(str(bad), "bad"), Item(str(tmp_path / "missing.jpg"), "x")]
             + [Item(r.path, r.study, r.label, r.body_part, r.mask_path, r.boxes) for r in syn])
    unreadable, calls = [], []
    results = list(pipe.run(items, batch_size=4, unreadable=unreadable, progress=lambda d, t: calls.append((d, t))))
    assert [r.item.path for r in results] == [str(p) for p in frac] + [r.path for r in syn]
    assert sorted(u.path for u in unreadable) == sorted([str(bad), str(tmp_path / "missing.jpg")])
    assert any("FileNotFoundError" in u.reason for u in unreadable)
    assert calls[-1] == (7, 7)
    for r in results:
        h0, w0 = decode_image(r.item.path).image.shape
        assert r.cam.shape == r.mask.shape == (h0, w0) and r.mask.dtype == bool
        assert 0.0 <= r.cam.min() and r.cam.max() <= 1.0
        assert r.predicted == (r.probability >= 0.5)
        if not r.predicted:
            assert len(r.boxes) == 0 and not r.mask.any()
        for b in r.boxes:
            assert 0 <= b[0] < b[2] <= w0 and 0 <= b[1] < b[3] <= h0
    last = results[2]
    assert last.item.label == 1 and last.gt_mask is not None and last.gt_mask.shape == last.mask.shape
    assert last.gt_box_mask is not None and last.gt_box_mask.shape == last.mask.shape


def test_checkpoint_errors_name_the_path(setup, tmp_path):
    _, _, cls_dir, sam_dir = setup
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        load_classifier(tmp_path / "nope")
    with pytest.raises(CheckpointMismatch, match=f"{sam_dir}.*not a classifier"):
        load_classifier(sam_dir)
    with pytest.raises(CheckpointMismatch, match=f"{cls_dir}.*not a SAM"):
        load_sam(cls_dir)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointMismatch, match="mskjax.json is missing"):
        load_sam(tmp_path / "empty")
    model, variables, meta = load_sam(sam_dir)
    assert meta["img_size"] == SAM_SIZE and set(variables) == {"params", "buffers"}


def test_config_validation():
    with pytest.raises(PipelineError, match="unknown CAM method"):
        PipelineConfig(cam="gradcam")
    with pytest.raises(PipelineError, match="unknown box method"):
        PipelineConfig(boxes="otsu")
    assert PipelineConfig(boxes="threshold", max_boxes=4).num_boxes == 4
    assert PipelineConfig().num_boxes == 1


def test_content_mask_covers_only_the_letterboxed_image():
    g = geometry.stack_geometries([geometry.letterbox_geometry((40, 80), 16), geometry.letterbox_geometry((80, 40), 16)])
    m = np.asarray(content_mask(jax.tree.map(jnp.asarray, g)))
    assert m[0].sum() == 16 * 8 and m[0][4:12].all() and not m[0][:4].any()
    assert m[1].sum() == 16 * 8 and m[1][:, 4:12].all() and not m[1][:, 12:].any()


def test_config_takes_fused_stages_but_not_for_single_stage_methods():
    assert PipelineConfig(cam="layer_cam", cam_layer="layer2+layer3").cam_layer == "layer2+layer3"
    with pytest.raises(PipelineError, match="fuses stages"):
        PipelineConfig(cam="score_cam", cam_layer="layer2+layer3")


def test_refine_prompts_sam_with_the_tight_box_of_the_first_mask(setup):
    """refine=1: the second pass's prompt is the tight box (SAM input frame) of the first pass's
    mask, and its logits equal decoding that box directly; an empty first mask keeps its box."""
    pipe, records, cls_dir, sam_dir = setup
    refined = Pipeline.from_directories(cls_dir, sam_dir, PipelineConfig(threshold=0.5, refine=1))
    _, _, batch = _batch_of(pipe, records, 3, 4)
    batch["threshold"] = np.float32(-1.0)
    first, second = pipe.step(batch), refined.step(batch)
    np.testing.assert_allclose(second["boxes_sam"], first["boxes_sam"], atol=1e-5)
    up = np.asarray(samfn.upscale_logits(jnp.asarray(first["mask_logits"]), SAM_SIZE)) > 0
    emb = samfn.embed(pipe.sam_model, pipe.sam_variables, jnp.asarray(batch["sam_images"]))
    checked = 0
    for i in range(3):
        m = up[i, 0]
        if m.any():
            ys, xs = np.nonzero(m)
            tight = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)
            checked += 1
        else:
            tight = first["boxes_sam"][i, 0]
        np.testing.assert_allclose(second["prompts_sam"][i, 0], tight, atol=1e-4)
        low = samfn.decode(pipe.sam_model, pipe.sam_variables, emb[i:i + 1], boxes=jnp.asarray(tight)[None, None],
                           multimask=False)["low_res_logits"][0, 0, 0]
        np.testing.assert_allclose(second["mask_logits"][i, 0], np.asarray(low), atol=2e-3)
    assert checked >= 1  # a random SAM gives some non-empty masks: the tight-box path ran
    with pytest.raises(PipelineError, match="refine"):
        PipelineConfig(refine=-1)


def test_stored_baseline_is_subtracted_from_the_raw_map(setup):
    """subtract_baseline: the checkpoint's normal-mean map comes off the raw map before
    post-processing (as mskjax.cam.cam_maps(baseline=)); a checkpoint without one, or with one
    made for another map, is refused by name."""
    pipe, records, _, _ = setup
    h = CLS_SIZE // 32  # layer4 of ResNet18
    base = np.random.default_rng(0).normal(size=(h, h)).astype(np.float32)
    meta = dict(pipe.classifier_meta, localization={"method": "grad_cam", "layer": None, "baseline": base.tolist()})
    config = PipelineConfig(threshold=0.5, subtract_baseline=True)
    with_base = Pipeline(pipe.classifier, pipe.classifier_variables, meta, pipe.sam_model, pipe.sam_variables,
                         pipe.sam_meta, config)
    _, _, batch = _batch_of(pipe, records, 2, 2)
    out = with_base.step(batch)
    x = (batch["images"] - 0.5) / 0.25
    x3 = jnp.repeat(jnp.asarray(x), 3, axis=-1)  # as the pipeline feeds a 1-channel model (GrayAsRGB)
    ref = camlib.cam_maps(GrayAsRGB(pipe.classifier, 1), pipe.classifier_variables, x3, jnp.zeros((2,), jnp.int32),
                          None, methods=("grad_cam",), baseline=base)["grad_cam"] * content_mask(batch["geometry"])
    np.testing.assert_allclose(out["cam"], np.asarray(ref), atol=1e-5)
    assert np.abs(out["cam"] - pipe.step(batch)["cam"]).max() > 1e-3  # the baseline changed the map
    with pytest.raises(PipelineError, match="stores no baseline"):
        Pipeline(pipe.classifier, pipe.classifier_variables, pipe.classifier_meta, pipe.sam_model,
                 pipe.sam_variables, pipe.sam_meta, config)
    with pytest.raises(PipelineError, match="baseline is for grad_cam"):
        Pipeline(pipe.classifier, pipe.classifier_variables, meta, pipe.sam_model, pipe.sam_variables,
                 pipe.sam_meta, PipelineConfig(cam="layer_cam", cam_layer="layer3", subtract_baseline=True))
    with pytest.raises(PipelineError, match="single-stage"):
        PipelineConfig(cam="layer_cam", cam_layer="layer2+layer3", subtract_baseline=True)


def test_peak_point_goes_with_the_peak_box_of_a_point_trained_sam(setup):
    """A SAM whose metadata says peak_point (trained with data.peak_point) gets the map's peak as a
    positive point beside its "peak" box; ground-truth boxes and refine passes get the padding
    point; peak_point=False gives the padding point to the map box too."""
    pipe, records, cls_dir, sam_dir = setup
    meta = {**pipe.sam_meta, "peak_point": True}

    def pipeline(**kw):
        return Pipeline(pipe.classifier, pipe.classifier_variables, pipe.classifier_meta, pipe.sam_model,
                        pipe.sam_variables, meta, PipelineConfig(threshold=0.5, **kw))

    _, _, batch = _batch_of(pipe, records, 3, 4)
    batch["threshold"] = np.float32(-1.0)
    with_point, without = pipeline().step(batch), pipeline(peak_point=False).step(batch)
    assert "points_sam" not in pipe.step(batch)  # a SAM trained without points gets none
    np.testing.assert_array_equal(with_point["point_labels"][:, 0], [1, 1, 1, -1])  # row 4 pads the batch
    np.testing.assert_array_equal(without["point_labels"], -np.ones((4, 1)))
    emb = samfn.embed(pipe.sam_model, pipe.sam_variables, jnp.asarray(batch["sam_images"]))
    for i in range(3):
        box = with_point["boxes_sam"][i, 0]
        pt = with_point["points_sam"][i, 0]
        assert box[0] - 1e-3 <= pt[0] <= box[2] + 1e-3 and box[1] - 1e-3 <= pt[1] <= box[3] + 1e-3
        for out, label in ((with_point, 1), (without, -1)):
            ref = samfn.decode(pipe.sam_model, pipe.sam_variables, emb[i:i + 1], boxes=jnp.asarray(box)[None, None],
                               points=jnp.asarray(pt if label == 1 else np.zeros(2, np.float32))[None, None, None],
                               point_labels=jnp.full((1, 1, 1), label, jnp.int32), multimask=False)
            np.testing.assert_allclose(out["mask_logits"][i, 0], np.asarray(ref["low_res_logits"][0, 0, 0]), atol=2e-3)
    assert np.abs(with_point["mask_logits"] - without["mask_logits"]).max() > 1e-3  # the point reached SAM
    # Refine passes re-prompt with the tight box and the padding point, as such a SAM was trained.
    refined = pipeline(refine=1).step(batch)
    i = 0
    ref = samfn.decode(pipe.sam_model, pipe.sam_variables, emb[i:i + 1],
                       boxes=jnp.asarray(refined["prompts_sam"][i, 0])[None, None],
                       points=jnp.zeros((1, 1, 1, 2)), point_labels=jnp.full((1, 1, 1), -1, jnp.int32), multimask=False)
    np.testing.assert_allclose(refined["mask_logits"][i, 0], np.asarray(ref["low_res_logits"][0, 0, 0]), atol=2e-3)
    # Several peaks: each peak's box carries its own peak; the chosen one keeps its point.
    union = pipeline(peaks=2, choose="union").step(batch)
    np.testing.assert_array_equal(union["point_labels"][:3], np.ones((3, 2)))
    np.testing.assert_allclose(union["points_sam"][:, 0], with_point["points_sam"][:, 0], atol=1e-4)
    for i in range(3):
        box, pt = union["boxes_sam"][i, 1], union["points_sam"][i, 1]
        assert box[0] - 1e-3 <= pt[0] <= box[2] + 1e-3 and box[1] - 1e-3 <= pt[1] <= box[3] + 1e-3
    picked = pipeline(peaks=2, choose="confidence").step(batch)
    for i in range(3):
        np.testing.assert_allclose(picked["points_sam"][i, 0], union["points_sam"][i, picked["choice_index"][i]],
                                   atol=1e-4)


def _multimask_step_and_reference(pipe, records, rule):
    """A 3-image batch (every image abnormal) through a multimask=rule pipeline; its outputs, the
    batch, and SAM's three masks for the same map boxes decoded directly (the reference)."""
    multi = Pipeline(pipe.classifier, pipe.classifier_variables, pipe.classifier_meta, pipe.sam_model,
                     pipe.sam_variables, pipe.sam_meta, PipelineConfig(threshold=0.5, multimask=rule))
    _, _, batch = _batch_of(pipe, records, 3, 4)
    batch["threshold"] = np.float32(-1.0)
    out = multi.step(batch)
    emb = samfn.embed(pipe.sam_model, pipe.sam_variables, jnp.asarray(batch["sam_images"]))
    ref = samfn.decode(pipe.sam_model, pipe.sam_variables, emb[:3], boxes=jnp.asarray(out["boxes_sam"][:3]),
                       multimask=True)
    return out, batch, ref


def test_multimask_best_iou_takes_the_mask_sam_rates_highest(setup):
    pipe, records, cls_dir, sam_dir = setup
    out, _, ref = _multimask_step_and_reference(pipe, records, "best_iou")
    iou, low = np.asarray(ref["iou_predictions"]), np.asarray(ref["low_res_logits"])
    assert low.shape[2] == 3
    best = iou.argmax(-1)
    for i in range(3):
        np.testing.assert_allclose(out["mask_iou"][i, 0], iou[i, 0, best[i, 0]], atol=1e-4)
        np.testing.assert_allclose(out["mask_logits"][i, 0], low[i, 0, best[i, 0]], atol=2e-3)
    gt = out["gt_mask_logits"]  # ground-truth prompts take the same choice
    assert gt.shape[2:] == out["mask_logits"].shape[2:]
    with pytest.raises(PipelineError, match="multimask"):
        PipelineConfig(multimask="largest")


def test_multimask_map_takes_the_mask_holding_the_most_map(setup):
    from mskjax.pipeline import map_in_sam_frame
    pipe, records, _, _ = setup
    out, batch, ref = _multimask_step_and_reference(pipe, records, "map")
    low = np.asarray(ref["low_res_logits"])[:, 0]  # (3, M, L, L)
    g = batch["geometry"]
    map_low = np.asarray(map_in_sam_frame(jnp.asarray(out["cam"]), g, jnp.asarray(batch["original_hw"]),
                                          pipe.sam_img_size, pipe.sam_model.config.low_res_size))[:3]
    inside = low > 0
    mean_map = (map_low[:, None] * inside).sum(axis=(2, 3)) / np.maximum(inside.sum(axis=(2, 3)), 1)
    best = mean_map.argmax(axis=1)
    for i in range(3):
        np.testing.assert_allclose(out["mask_logits"][i, 0], low[i, best[i]], atol=2e-3)
    with pytest.raises(PipelineError, match="mirror_average"):
        PipelineConfig(multimask="map", mirror_average=True)


def test_box_margin_grows_every_first_prompt_inside_the_image(setup):
    pipe, records, cls_dir, sam_dir = setup
    _, _, batch = _batch_of(pipe, records, 3, 4)
    batch["threshold"] = np.float32(-1.0)
    grown = Pipeline(pipe.classifier, pipe.classifier_variables, pipe.classifier_meta, pipe.sam_model,
                     pipe.sam_variables, pipe.sam_meta, PipelineConfig(threshold=0.5, box_margin=4.0)).step(batch)
    plain = pipe.step(batch)
    hw = batch["original_hw"]
    for key, orig in (("boxes_sam", plain["boxes"]), ("gt_boxes_sam", batch["gt_boxes"])):
        want = samfn.transform_boxes(geometry.clip_boxes(np.asarray(orig, np.float64) + [-4, -4, 4, 4], hw), hw, SAM_SIZE)
        np.testing.assert_allclose(grown[key], want, atol=1e-3)
        assert not np.allclose(grown[key], plain[key])
    np.testing.assert_array_equal(grown["boxes"], plain["boxes"])  # the reported box is the map's own
    for bad in (-1.0, float("nan")):
        with pytest.raises(PipelineError, match="box_margin"):
            PipelineConfig(box_margin=bad)


def test_embedding_cache_gives_the_same_results_and_skips_the_encoder_the_second_time(setup, tmp_path):
    pipe, records, _, _ = setup
    cached = Pipeline(pipe.classifier, pipe.classifier_variables, pipe.classifier_meta, pipe.sam_model,
                      pipe.sam_variables, pipe.sam_meta, pipe.config, embedding_cache=tmp_path / "emb")
    _, _, batch = _batch_of(pipe, records, 3, 4)
    plain = pipe.step(batch)
    _, _, batch = _batch_of(cached, records, 3, 4)
    first = cached.step(batch)
    assert (cached.embeddings.hits, cached.embeddings.misses) == (0, 3)
    assert len(list(cached.embeddings.folder.glob("*.npy"))) == 3
    for k in ("probability", "boxes", "mask_iou", "gt_mask_logits"):
        np.testing.assert_allclose(first[k], plain[k], rtol=1e-4, atol=1e-4, err_msg=k)
    # The second time the encoder is not called at all.
    cached._embed = None
    second = cached.step(batch)
    assert (cached.embeddings.hits, cached.embeddings.misses) == (3, 3)
    for k in ("mask_logits", "gt_mask_logits", "mask_iou"):
        np.testing.assert_array_equal(second[k], first[k], err_msg=k)
    # The key is the encoder's weights: other weights, another folder.
    other = jax.tree.map(lambda v: v * 1.01, pipe.sam_variables)
    moved = Pipeline(pipe.classifier, pipe.classifier_variables, pipe.classifier_meta, pipe.sam_model, other,
                     pipe.sam_meta, pipe.config, embedding_cache=tmp_path / "emb")
    assert moved.embeddings.folder != cached.embeddings.folder
    assert describe(cached)["embedding_cache"] == str(cached.embeddings.folder)
    with pytest.raises(PipelineError, match="names no arch"):
        Pipeline(pipe.classifier, pipe.classifier_variables, pipe.classifier_meta, pipe.sam_model,
                 pipe.sam_variables, {}, pipe.config, embedding_cache=tmp_path / "emb")


def test_deletion_choice_keeps_the_candidate_whose_removal_costs_most(setup):
    pipe, records, _, _ = setup
    scales = (1.0, 0.5)
    chooser = Pipeline(pipe.classifier, pipe.classifier_variables, pipe.classifier_meta, pipe.sam_model,
                       pipe.sam_variables, pipe.sam_meta,
                       PipelineConfig(threshold=0.0, choose="deletion", choice_scales=scales))
    _, _, batch = _batch_of(chooser, records, 3, 4)
    out = chooser.step(batch)
    scores, index = out["choice_scores"], out["choice_index"]
    assert scores.shape == (4, 10) and index.shape == (4,)
    for i in range(3):  # real images: the chosen candidate is the best-scoring one, and its box is the prompt
        assert np.isfinite(scores[i]).any()
        assert index[i] == np.argmax(scores[i])
        cands = np.asarray(dc.candidate_boxes(out["boxes_sam"][i:i + 1, 0], scales))[0]
        np.testing.assert_allclose(out["prompts_sam"][i, 0], cands[index[i]], rtol=1e-5, atol=1e-4)
    assert not np.isfinite(scores[3]).any()  # the padding image: no candidate
    # The first candidate is the map's box itself: with choose="first" that is the mask given.
    first = Pipeline(pipe.classifier, pipe.classifier_variables, pipe.classifier_meta, pipe.sam_model,
                     pipe.sam_variables, pipe.sam_meta, PipelineConfig(threshold=0.0)).step(batch)
    for i in range(3):
        if index[i] == 0:
            np.testing.assert_allclose(out["mask_logits"][i], first["mask_logits"][i], atol=1e-4)
    with pytest.raises(PipelineError, match="boxes='peak'"):
        PipelineConfig(choose="deletion", boxes="threshold")


def test_map_in_sam_frame_puts_each_map_cell_where_the_geometry_does():
    from mskjax.pipeline import map_in_sam_frame
    # Original 100 x 200 (H, W) squashed to a 64 x 64 classifier input; SAM 256 (scale 1.28), low-res 64.
    hw = (100, 200)
    geom = geometry.stack_geometries([geometry.resize_geometry(hw, (64, 64))])
    maps = np.zeros((1, 64, 64), np.float32)
    maps[0, 16:48, 16:32] = 1.0  # classifier frame = original (50, 25)-(100, 75) = SAM (64, 32)-(128, 96)
    out = np.asarray(map_in_sam_frame(jnp.asarray(maps), geom, jnp.asarray([hw], jnp.float32), 256, 64))
    assert out.shape == (1, 64, 64)
    hot = out[0] > 0.5
    assert hot[10:22, 18:30].all()          # low-res cells 8..24 x 16..32, edges left out
    assert not hot[:6].any() and not hot[:, :14].any() and not hot[26:].any()
    assert (out[0, 33:] == 0).all()          # SAM's padding below the image (128 px high in SAM)


def test_map_mask_prompt_needs_a_box_mask_sam_and_changes_its_masks(setup):
    pipe, records, _, _ = setup
    with pytest.raises(PipelineError, match="mask prompts"):
        Pipeline(pipe.classifier, pipe.classifier_variables, pipe.classifier_meta, pipe.sam_model,
                 pipe.sam_variables, {**pipe.sam_meta, "box_mask_prompt": False},
                 PipelineConfig(threshold=0.0, map_mask_prompt=0.5))
    with pytest.raises(PipelineError, match="map_mask_prompt"):
        PipelineConfig(map_mask_prompt=1.5)
    meta = {**pipe.sam_meta, "box_mask_prompt": True}
    plain = Pipeline(pipe.classifier, pipe.classifier_variables, pipe.classifier_meta, pipe.sam_model,
                     pipe.sam_variables, meta, PipelineConfig(threshold=0.0))
    shaped = Pipeline(pipe.classifier, pipe.classifier_variables, pipe.classifier_meta, pipe.sam_model,
                      pipe.sam_variables, meta, PipelineConfig(threshold=0.0, map_mask_prompt=0.9))
    _, _, batch = _batch_of(plain, records, 3, 4)
    a, b = plain.step(batch), shaped.step(batch)
    assert not np.allclose(a["mask_logits"][:3], b["mask_logits"][:3])  # the map's prompt changed
    np.testing.assert_allclose(a["gt_mask_logits"], b["gt_mask_logits"], atol=1e-5)  # ground-truth prompts did not


def test_map_prompter_gives_the_pipelines_map_and_box(setup):
    """MapPrompter (what a SAM is trained on with data.map_prompts) is the pipeline's own first half:
    the same box in SAM's frame and the same map, sampled into SAM's frame at full resolution."""
    from mskjax.pipeline import MapPrompter, map_in_sam_frame
    pipe, records, _, _ = setup
    config = PipelineConfig(threshold=0.0, box_side=20.0, box_margin=2.0)
    full = Pipeline(pipe.classifier, pipe.classifier_variables, pipe.classifier_meta, pipe.sam_model,
                    pipe.sam_variables, pipe.sam_meta, config)
    _, images, batch = _batch_of(full, records, 3, 4)
    out = full.step(batch)
    mp = MapPrompter(pipe.classifier, pipe.classifier_variables, pipe.classifier_meta, config, SAM_SIZE)
    got = mp.run(images, batch_size=2)  # two batches, the second padded
    assert got["maps_sam"].shape == (3, SAM_SIZE, SAM_SIZE) and got["boxes_sam"].shape == (3, 4)
    np.testing.assert_allclose(got["probability"], out["probability"][:3], atol=1e-6)
    np.testing.assert_allclose(got["boxes_sam"], out["boxes_sam"][:3, 0], atol=1e-4)
    want = map_in_sam_frame(jnp.asarray(out["cam"]), batch["geometry"], jnp.asarray(batch["original_hw"]),
                            SAM_SIZE, SAM_SIZE)
    np.testing.assert_allclose(got["maps_sam"], np.asarray(want)[:3], atol=1e-5)
    assert got["maps_sam"].max() > 0.5
    with pytest.raises(PipelineError, match="'peak'"):
        MapPrompter(pipe.classifier, pipe.classifier_variables, pipe.classifier_meta,
                    PipelineConfig(boxes="threshold"), SAM_SIZE)


def test_map_trained_sam_gets_the_map_inside_its_box(setup):
    """A SAM whose metadata says it was trained on the classifier's maps gets, for the map's box, the
    map inside that box as its dense prompt (mskjax.sam.map_prompt); other prompts keep the box mask;
    another map or box than the trained one is refused; map_prompt=False is the plain box mask."""
    from mskjax.pipeline import map_in_sam_frame, map_prompt_settings
    pipe, records, _, _ = setup
    config = PipelineConfig(threshold=0.0, box_side=24.0)
    meta = {**pipe.sam_meta, "box_mask_prompt": True,
            "map_prompt": {**map_prompt_settings(config), "classifier": "somewhere"}}

    def pipeline(m, c):
        return Pipeline(pipe.classifier, pipe.classifier_variables, pipe.classifier_meta, pipe.sam_model,
                        pipe.sam_variables, m, c)
    mapped = pipeline(meta, config)
    plain = pipeline({**pipe.sam_meta, "box_mask_prompt": True}, config)
    off = pipeline(meta, PipelineConfig(threshold=0.0, box_side=24.0, map_prompt=False))
    _, _, batch = _batch_of(mapped, records, 3, 4)
    a, b, c = mapped.step(batch), plain.step(batch), off.step(batch)
    np.testing.assert_array_equal(b["mask_logits"], c["mask_logits"])
    np.testing.assert_allclose(a["gt_mask_logits"], b["gt_mask_logits"], atol=1e-5)  # ground-truth prompts alike
    assert not np.allclose(a["mask_logits"][:3], b["mask_logits"][:3])

    in_sam = map_in_sam_frame(jnp.asarray(a["cam"]), batch["geometry"], jnp.asarray(batch["original_hw"]),
                              SAM_SIZE, SAM_SIZE)
    low = pipe.sam_model.config.low_res_size
    dense = samfn.map_prompt(in_sam[:, None], jnp.asarray(a["boxes_sam"]), SAM_SIZE, low)
    emb = samfn.embed(pipe.sam_model, pipe.sam_variables, jnp.asarray(batch["sam_images"]))
    ref = samfn.decode(pipe.sam_model, pipe.sam_variables, emb, boxes=jnp.asarray(a["boxes_sam"]), mask_input=dense,
                       multimask=False)["low_res_logits"][:, :, 0]
    np.testing.assert_allclose(a["mask_logits"][:3], np.asarray(ref)[:3], atol=2e-3)

    with pytest.raises(PipelineError, match="box_side 30.0 \\(trained with 24.0\\)"):
        pipeline(meta, PipelineConfig(box_side=30.0))
    with pytest.raises(PipelineError, match="cam_layer"):
        pipeline(meta, PipelineConfig(box_side=24.0, cam="layer_cam", cam_layer="layer3"))
    with pytest.raises(PipelineError, match="map_mask_prompt"):
        pipeline(meta, PipelineConfig(box_side=24.0, map_mask_prompt=0.5))
    pipeline(meta, PipelineConfig(box_side=30.0, map_prompt=False))  # the plain box mask: any box


def test_fit_and_trained_map_config_follow_the_sams_record():
    from mskjax.pipeline import fit_map_prompt, map_prompt_settings, trained_map_config
    trained_on = PipelineConfig(cam="layer_cam", cam_layer="layer2", box_side=64.0)
    meta = {"map_prompt": {**map_prompt_settings(trained_on), "classifier": "c"}}
    assert fit_map_prompt(trained_on, meta) == trained_on  # the trained map: its prompt kept
    assert fit_map_prompt(PipelineConfig(cam="grad_cam"), meta).map_prompt is False  # another map: plain box
    assert fit_map_prompt(PipelineConfig(cam="grad_cam"), {}).map_prompt is True  # other SAMs: untouched
    got = trained_map_config(PipelineConfig(threshold=0.3), meta)
    assert (got.cam, got.cam_layer, got.box_side, got.threshold) == ("layer_cam", "layer2", 64.0, 0.3)
    got = trained_map_config(PipelineConfig(cam="grad_cam"), meta, map_too=False)
    assert (got.cam, got.box_side) == ("grad_cam", 64.0)
    assert trained_map_config(PipelineConfig(), {}) == PipelineConfig()


def test_mirror_average_adds_the_mirrored_view_and_is_mirror_equivariant(setup):
    """mirror_average: the first view's logits are the plain pipeline's; the second view is SAM
    decoding the mirrored input with the mirrored prompts (map prompt included); and for an image
    SAM takes unresized, the pipeline on the mirrored image gives the mirror of its masks."""
    from mskjax.pipeline import map_in_sam_frame, map_prompt_settings
    pipe, records, _, _ = setup
    config = PipelineConfig(threshold=0.0, box_side=24.0, mirror_average=True)
    single = PipelineConfig(threshold=0.0, box_side=24.0)
    meta = {**pipe.sam_meta, "box_mask_prompt": True, "map_prompt": {**map_prompt_settings(single), "classifier": "c"}}

    def pipeline(c):
        return Pipeline(pipe.classifier, pipe.classifier_variables, pipe.classifier_meta, pipe.sam_model,
                        pipe.sam_variables, meta, c)
    both, one = pipeline(config), pipeline(single)
    _, _, batch = _batch_of(both, records, 3, 4)
    a, b = both.step(batch), one.step(batch)
    for k in ("mask_logits", "gt_mask_logits", "probability", "boxes_sam"):
        np.testing.assert_allclose(a[k], b[k], atol=1e-5, err_msg=k)
    assert a["mask_logits_mirrored"].shape == a["mask_logits"].shape

    w = jnp.asarray(batch["sam_input_sizes"][:, 1])
    model, svars, low = pipe.sam_model, pipe.sam_variables, pipe.sam_model.config.low_res_size
    emb = samfn.embed(model, svars, samfn.mirror_columns(jnp.asarray(batch["sam_images"]), w, axis=-2))
    in_sam = map_in_sam_frame(jnp.asarray(a["cam"]), batch["geometry"], jnp.asarray(batch["original_hw"]),
                              SAM_SIZE, SAM_SIZE)
    boxes = samfn.mirror_boxes(jnp.asarray(a["boxes_sam"]), w)
    dense = samfn.map_prompt(samfn.mirror_columns(in_sam, w)[:, None], boxes, SAM_SIZE, low)
    ref = samfn.decode(model, svars, emb, boxes=boxes, mask_input=dense, multimask=False)["low_res_logits"][:, :, 0]
    np.testing.assert_allclose(a["mask_logits_mirrored"][:3], np.asarray(ref)[:3], atol=2e-3)
    gt = samfn.mirror_boxes(jnp.asarray(a["gt_boxes_sam"]), w)
    ref = samfn.decode(model, svars, emb, boxes=gt, mask_input=samfn.box_mask_prompt(gt, SAM_SIZE, low),
                       multimask=False)["low_res_logits"][:, :, 0]
    valid = batch["gt_valid"][:3]
    np.testing.assert_allclose(a["gt_mask_logits_mirrored"][:3][valid], np.asarray(ref)[:3][valid], atol=2e-3)

    # Equivariance on a 64 x 48 image (SAM's input unresized): the mirrored image's first view is
    # the image's second view, mirrored back, and its averaged mask the mirror of the image's.
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (64, 48)).astype(np.float32) / 255.0
    box = np.asarray([[10.0, 20.0, 30.0, 40.0]])
    flipped_box = np.asarray([[48 - 30.0, 20.0, 48 - 10.0, 40.0]])
    pa = both.prepare([image], 2, [box], 1)
    pb = both.prepare([image[:, ::-1].copy()], 2, [flipped_box], 1)
    oa, ob = both.step(pa), both.step(pb)

    def logits(o, key):
        return samfn.postprocess_host(o[key][0], (64, 48), (64, 48), SAM_SIZE, return_logits=True)
    # (a mirrored view's logits come out in the mirrored frame: the mirrored image's own frame)
    np.testing.assert_allclose(logits(ob, "gt_mask_logits"), logits(oa, "gt_mask_logits_mirrored"), atol=1e-3)
    np.testing.assert_allclose(logits(ob, "gt_mask_logits_mirrored"), logits(oa, "gt_mask_logits"), atol=1e-3)
    ra = both.finish(pa, oa, 0, image, Item(path="a", study="a"), None)
    rb = both.finish(pb, ob, 0, image[:, ::-1], Item(path="b", study="b"), None)
    average = (logits(oa, "gt_mask_logits") + logits(oa, "gt_mask_logits_mirrored")[..., ::-1]) / 2
    assert ra.gt_box_mask.any() and not ra.gt_box_mask.all()
    np.testing.assert_array_equal(ra.gt_box_mask, (average > 0).any(axis=0))
    near_zero = np.abs(average[0]) < 1e-3  # pixels at the threshold may go either way
    np.testing.assert_array_equal(rb.gt_box_mask[:, ::-1][~near_zero],
                                  ra.gt_box_mask[~near_zero])

    with pytest.raises(PipelineError, match="mirror_average"):
        PipelineConfig(mirror_average=True, refine=1)
    with pytest.raises(PipelineError, match="mirror_average"):
        PipelineConfig(mirror_average=True, choose="deletion")


def test_mirror_average_reads_both_views_from_the_embedding_cache(setup, tmp_path):
    pipe, records, _, _ = setup
    config = PipelineConfig(threshold=0.0, mirror_average=True)
    plain = Pipeline(pipe.classifier, pipe.classifier_variables, pipe.classifier_meta, pipe.sam_model,
                     pipe.sam_variables, pipe.sam_meta, config)
    cached = Pipeline(pipe.classifier, pipe.classifier_variables, pipe.classifier_meta, pipe.sam_model,
                      pipe.sam_variables, pipe.sam_meta, config, embedding_cache=tmp_path / "emb")
    _, _, batch = _batch_of(cached, records, 3, 4)
    want = plain.step(batch)
    first = cached.step(batch)
    assert (cached.embeddings.hits, cached.embeddings.misses) == (0, 6)  # 3 images x 2 views
    cached._embed = None  # the second time the encoder is not called at all
    second = cached.step(batch)
    assert (cached.embeddings.hits, cached.embeddings.misses) == (6, 6)
    for k in ("mask_logits", "mask_logits_mirrored", "gt_mask_logits_mirrored"):
        np.testing.assert_allclose(first[k], want[k], rtol=1e-4, atol=1e-4, err_msg=k)
        np.testing.assert_array_equal(second[k], first[k], err_msg=k)


def test_map_flips_average_the_maps_of_flipped_inputs(setup, tmp_path):
    """map_flips: the map is the mean of the maps of the classifier's input and its flips, each
    flipped back, scaled to a maximum of 1; the probability and the peak rule are the plain ones."""
    from mskjax.pipeline import make_map_half, map_prompt_differences, map_prompt_settings
    pipe, records, _, sam_dir = setup
    cls_dir = random_classifier(tmp_path / "cls", mode="resize", seed=4)  # content fills the input
    p = Pipeline.from_directories(cls_dir, sam_dir, PipelineConfig(threshold=0.0))
    _, _, batch = _batch_of(p, records, 3, 4)

    def half(flips):
        return jax.jit(make_map_half(p.classifier, PipelineConfig(threshold=0.0, map_flips=flips), p.normalization,
                                     p.channels, SAM_SIZE))
    plain = half("none")

    def cam_of(axes):
        got = plain(p.classifier_variables, {**batch, "images": np.flip(batch["images"], axes).copy()})
        return np.flip(np.asarray(got["cam"]), axes)
    base = plain(p.classifier_variables, batch)
    for flips, views in (("h", [(2,)]), ("hv", [(2,), (1,), (1, 2)])):
        out = half(flips)(p.classifier_variables, batch)
        want = np.asarray(base["cam"]) + sum(cam_of(a) for a in views)
        want = want / want.max(axis=(1, 2), keepdims=True)
        np.testing.assert_allclose(out["cam"][:3], want[:3], atol=1e-5, err_msg=flips)
        np.testing.assert_allclose(out["probability"], base["probability"], atol=1e-6)
        np.testing.assert_allclose(out["peak_input"][:3], np.asarray(boxlib.peak_point(jnp.asarray(want)))[:3], atol=1e-4)
        assert not np.allclose(out["cam"][:3], base["cam"][:3])

    with pytest.raises(PipelineError, match="map_flips"):
        PipelineConfig(map_flips="x")
    with pytest.raises(PipelineError, match="subtract_baseline"):
        PipelineConfig(map_flips="h", subtract_baseline=True)
    # A map-trained SAM recorded before map_flips existed was trained on unflipped maps.
    old = {k: v for k, v in map_prompt_settings(PipelineConfig()).items() if k != "map_flips"}
    assert map_prompt_differences(old, PipelineConfig()) == []
    assert map_prompt_differences(old, PipelineConfig(map_flips="hv")) == ["map_flips 'hv' (trained with 'none')"]


def test_probability_flips_average_the_probabilities_of_flipped_inputs(setup, tmp_path):
    """probability_flips: the probability (and the abnormal decision) is the mean of the
    probabilities of the input and its flips; logits, map and boxes stay those of the plain input."""
    from mskjax.pipeline import make_map_half
    pipe, records, _, sam_dir = setup
    cls_dir = random_classifier(tmp_path / "cls", mode="resize", seed=4)
    p = Pipeline.from_directories(cls_dir, sam_dir, PipelineConfig(threshold=0.0))
    _, _, batch = _batch_of(p, records, 3, 4)

    def half(flips):
        return jax.jit(make_map_half(p.classifier, PipelineConfig(probability_flips=flips), p.normalization,
                                     p.channels, SAM_SIZE))
    plain = half("none")
    base = plain(p.classifier_variables, batch)

    def prob_of(axes):
        flipped = {**batch, "images": np.flip(batch["images"], axes).copy()}
        return np.asarray(plain(p.classifier_variables, flipped)["probability"])
    for flips, views in (("h", [(2,)]), ("hv", [(2,), (1,), (1, 2)])):
        out = half(flips)(p.classifier_variables, batch)
        want = (np.asarray(base["probability"]) + sum(prob_of(a) for a in views)) / (1 + len(views))
        np.testing.assert_allclose(out["probability"], want, atol=1e-6, err_msg=flips)
        assert not np.allclose(out["probability"][:3], base["probability"][:3], atol=1e-4)
        # a threshold between an image's two probabilities: the two settings decide differently
        i = int(np.argmax(np.abs(np.asarray(out["probability"]) - np.asarray(base["probability"]))[:3]))
        t = np.float32((float(out["probability"][i]) + float(base["probability"][i])) / 2)
        got = half(flips)(p.classifier_variables, {**batch, "threshold": t})["abnormal"][i]
        assert bool(got) != bool(plain(p.classifier_variables, {**batch, "threshold": t})["abnormal"][i])
        for key in ("logits", "cam", "boxes_sam"):
            np.testing.assert_allclose(out[key], base[key], atol=1e-6, err_msg=key)
    with pytest.raises(PipelineError, match="probability_flips"):
        PipelineConfig(probability_flips="v")


def test_peaks_prompt_each_separated_peak_and_the_choice_keeps_the_best_scoring_mask(setup):
    pipe, records, _, _ = setup

    def with_config(**kw):
        return Pipeline(pipe.classifier, pipe.classifier_variables, pipe.classifier_meta, pipe.sam_model,
                        pipe.sam_variables, pipe.sam_meta, PipelineConfig(threshold=0.0, **kw))

    _, _, batch = _batch_of(pipe, records, 3, 4)
    one = with_config().step(batch)
    union = with_config(peaks=2, choose="union").step(batch)
    assert union["mask_logits"].shape[1] == 2 and union["boxes"].shape[1] == 2
    # The first candidate is the single-peak pipeline's box and mask; the second is boxed the same
    # way around the map's highest pixel at least 0.1875 x the input side from the first peak.
    np.testing.assert_allclose(union["boxes"][:, :1], one["boxes"], atol=1e-4)
    np.testing.assert_allclose(union["mask_logits"][:3, 0], one["mask_logits"][:3, 0], atol=1e-4)
    side = pipe.input_size
    pts, _, ok = boxlib.separated_peaks(jnp.asarray(union["cam"]), 2, 0.1875 * side)
    assert np.asarray(ok[:3, 1]).all() and not union["box_valid"][3].any()
    centres = (union["boxes_input"][:3, 1, :2] + union["boxes_input"][:3, 1, 2:]) / 2
    widths = union["boxes_input"][:3, 1, 2] - union["boxes_input"][:3, 1, 0]
    np.testing.assert_allclose(widths, one["boxes_input"][:3, 0, 2] - one["boxes_input"][:3, 0, 0], atol=1e-4)
    inside = (np.abs(centres - np.asarray(pts[:3, 1])) < 1e-3).all(axis=1)  # unless slid inside the content
    assert inside.any()
    low = union["mask_logits"][:3]
    on = low > 0
    confidence = (1 / (1 + np.exp(-low)) * on).sum(axis=(2, 3)) / np.maximum(on.sum(axis=(2, 3)), 1)
    for rule, expected in (("iou", union["mask_iou"][:3]), ("confidence", confidence), ("map", None)):
        out = with_config(peaks=2, choose=rule).step(batch)
        scores, index = out["choice_scores"], out["choice_index"]
        assert scores.shape == (4, 2) and not np.isfinite(scores[3]).any()
        if expected is not None:
            np.testing.assert_allclose(scores[:3], expected, rtol=1e-4, atol=1e-5, err_msg=rule)
        for i in range(3):
            assert index[i] == np.argmax(scores[i])
            np.testing.assert_allclose(out["mask_logits"][i, 0], union["mask_logits"][i, index[i]], atol=1e-4)
            np.testing.assert_allclose(out["boxes"][i, 0], union["boxes"][i, index[i]], atol=1e-4)
            np.testing.assert_allclose(out["candidate_boxes"][i], union["boxes"][i], atol=1e-4)
        assert out["mask_logits"].shape[1] == 1 and out["box_valid"].shape == (4, 1)
        np.testing.assert_array_equal(out["peak_input"], one["peak_input"])  # the pointing game's peak is the first
    # A refine pass after the choice re-prompts SAM with the chosen mask's tight box, the chosen
    # peak's validity marking the prompt.
    refined = with_config(peaks=2, choose="iou", refine=1).step(batch)
    emb = samfn.embed(pipe.sam_model, pipe.sam_variables, jnp.asarray(batch["sam_images"]))
    ref = samfn.decode(pipe.sam_model, pipe.sam_variables, emb, boxes=jnp.asarray(refined["prompts_sam"]),
                       multimask=False)["low_res_logits"][:, :, 0]
    np.testing.assert_allclose(refined["mask_logits"][:3], np.asarray(ref)[:3], atol=2e-3)
    assert np.all(refined["mask_logits"][3] == samfn.INVALID_PROMPT_LOGIT)
    with pytest.raises(PipelineError, match="needs a choice among peaks"):
        PipelineConfig(peaks=2)
    with pytest.raises(PipelineError, match="need peaks > 1"):
        PipelineConfig(choose="iou")
    with pytest.raises(PipelineError, match="boxes='peak'"):
        PipelineConfig(peaks=2, choose="iou", boxes="threshold")
    with pytest.raises(PipelineError, match="peak_separation"):
        PipelineConfig(peaks=2, choose="iou", peak_separation=0.0)


def test_study_gate_segments_every_image_of_a_study_called_abnormal(setup, tmp_path):
    pipe, records, _, _ = setup
    recs = sorted(records, key=lambda r: (r.study, r.path))[:6]
    items = [Item(r.path, r.study, r.label, r.body_part, r.mask_path, r.boxes) for r in recs]
    items.append(Item(str(tmp_path / "missing.png"), recs[0].study))  # unreadable: left out of its study's mean
    probs = pipe.probabilities([decode_image(it.path).image for it in items[:6]], batch_size=4)
    # The classifier-only pass gives the step's probabilities.
    _, _, batch = _batch_of(pipe, records, 3, 4)
    step_p = pipe.step(batch)["probability"][:3]
    np.testing.assert_allclose(pipe.probabilities([decode_image(r.path).image for r in
                                                   sorted(records, key=lambda r: -r.label)[:3]]), step_p, atol=1e-5)
    means = {}
    for it, p in zip(items[:6], probs):
        means.setdefault(it.study, []).append(float(p))
    # A threshold between the study means and the image probabilities, so the two gates differ.
    study_mean = {s: float(np.mean(v)) for s, v in means.items()}
    thr = float(np.median(list(study_mean.values())))
    gated = Pipeline(pipe.classifier, pipe.classifier_variables, pipe.classifier_meta, pipe.sam_model,
                     pipe.sam_variables, pipe.sam_meta, PipelineConfig(threshold=thr, gate="study"))
    assert gated.study_decisions(items, batch_size=4) == {s: m >= thr for s, m in study_mean.items()}
    unreadable = []
    results = list(gated.run(items, batch_size=4, unreadable=unreadable))
    assert [u.path for u in unreadable] == [items[-1].path]
    for r in results:
        assert r.predicted == (study_mean[r.item.study] >= thr)
        if not r.predicted:
            assert len(r.boxes) == 0 and not r.mask.any()
    assert len({r.predicted for r in results}) == 2  # both kinds of study present
    with pytest.raises(PipelineError, match="study_abnormal"):
        gated.prepare([decode_image(items[0].path).image], 4)
    with pytest.raises(PipelineError, match="unknown gate"):
        PipelineConfig(gate="patient")


def test_map_points_go_beside_the_map_box_and_not_the_ground_truth_boxes(setup):
    """map_points="peak_negative": each map box carries its peak (label 1) and the map's lowest grid
    places inside it (label 0), as `map_point_prompts` computes them; SAM decodes the box with
    them; ground-truth boxes decode as boxes alone; refine passes keep the points; the mirrored
    view gets the mirrored points; a point-trained SAM and non-peak boxes refuse the option."""
    pipe, records, _, _ = setup

    def pipeline(meta=None, **kw):
        return Pipeline(pipe.classifier, pipe.classifier_variables, pipe.classifier_meta, pipe.sam_model,
                        pipe.sam_variables, meta or pipe.sam_meta, PipelineConfig(threshold=0.5, **kw))

    _, _, batch = _batch_of(pipe, records, 3, 4)
    batch["threshold"] = np.float32(-1.0)
    plain = pipe.step(batch)
    out = pipeline(map_points="peak_negative", negative_points=2).step(batch)
    np.testing.assert_array_equal(out["map_point_labels"][:3, 0], np.tile([1, 0, 0], (3, 1)))
    np.testing.assert_array_equal(out["map_point_labels"][3], -np.ones((1, 3)))  # the batch's padding row
    g, hw = batch["geometry"], jnp.asarray(batch["original_hw"])
    to_sam = lambda p: np.asarray(samfn.transform_points(geometry.points_to_original(jnp.asarray(p), g), hw,  # noqa: E731
                                                         pipe.sam_img_size))
    neg, ok = boxlib.lowest_points(jnp.asarray(out["cam"]), jnp.asarray(out["boxes_input"]), 2,
                                   allowed=content_mask(g))
    assert np.asarray(ok)[:3].all()
    np.testing.assert_allclose(out["map_points_sam"][:3, :, 1:], to_sam(np.nan_to_num(neg))[:3], atol=1e-3)
    # the peak: the one a point-trained SAM gets beside the same box (the peak box's own peak)
    trained = pipeline({**pipe.sam_meta, "peak_point": True}).step(batch)
    np.testing.assert_allclose(out["map_points_sam"][:3, :, 0], trained["points_sam"][:3], atol=1e-4)
    cam, bx = np.asarray(out["cam"]), np.asarray(out["boxes_input"])
    for i in range(3):  # the negatives: inside the box, the lowest of its 5 x 5 grid's places
        t = (np.arange(5) + 0.5) / 5
        xs, ys = bx[i, 0, 0] + t * (bx[i, 0, 2] - bx[i, 0, 0]), bx[i, 0, 1] + t * (bx[i, 0, 3] - bx[i, 0, 1])
        grid = np.sort([cam[i, int(y), int(x)] for y in ys for x in xs])
        got = [cam[i, int(y), int(x)] for x, y in np.asarray(neg)[i, 0]]
        np.testing.assert_allclose(got, grid[:2])
        for x, y in np.asarray(neg)[i, 0]:
            assert bx[i, 0, 0] <= x <= bx[i, 0, 2] and bx[i, 0, 1] <= y <= bx[i, 0, 3]
    emb = samfn.embed(pipe.sam_model, pipe.sam_variables, jnp.asarray(batch["sam_images"]))
    ref = samfn.decode(pipe.sam_model, pipe.sam_variables, emb, boxes=jnp.asarray(out["boxes_sam"]),
                       points=jnp.asarray(out["map_points_sam"]), point_labels=jnp.asarray(out["map_point_labels"]),
                       multimask=False)["low_res_logits"][:, :, 0]
    np.testing.assert_allclose(out["mask_logits"][:3], np.asarray(ref)[:3], atol=2e-3)
    assert np.abs(out["mask_logits"][:3] - plain["mask_logits"][:3]).max() > 1e-3  # the points reached SAM
    valid = batch["gt_valid"]
    np.testing.assert_allclose(out["gt_mask_logits"][valid], plain["gt_mask_logits"][valid], atol=1e-4)
    negative = pipeline(map_points="negative", negative_points=3).step(batch)
    np.testing.assert_array_equal(negative["map_point_labels"][:3], np.zeros((3, 1, 3)))

    refined = pipeline(map_points="peak", refine=1).step(batch)
    ref = samfn.decode(pipe.sam_model, pipe.sam_variables, emb, boxes=jnp.asarray(refined["prompts_sam"]),
                       points=jnp.asarray(refined["map_points_sam"]),
                       point_labels=jnp.asarray(refined["map_point_labels"]), multimask=False)["low_res_logits"][:, :, 0]
    np.testing.assert_allclose(refined["mask_logits"][:3], np.asarray(ref)[:3], atol=2e-3)

    mirrored = pipeline(map_points="peak_negative", mirror_average=True)
    _, _, mbatch = _batch_of(mirrored, records, 3, 4)
    mbatch["threshold"] = np.float32(-1.0)
    m = mirrored.step(mbatch)
    w = jnp.asarray(mbatch["sam_input_sizes"][:, 1])
    emb_m = samfn.embed(pipe.sam_model, pipe.sam_variables,
                        samfn.mirror_columns(jnp.asarray(mbatch["sam_images"]), w, axis=-2))
    ref = samfn.decode(pipe.sam_model, pipe.sam_variables, emb_m, boxes=samfn.mirror_boxes(jnp.asarray(m["boxes_sam"]), w),
                       points=samfn.mirror_points(jnp.asarray(m["map_points_sam"]), w),
                       point_labels=jnp.asarray(m["map_point_labels"]), multimask=False)["low_res_logits"][:, :, 0]
    np.testing.assert_allclose(m["mask_logits_mirrored"][:3], np.asarray(ref)[:3], atol=2e-3)

    with pytest.raises(PipelineError, match="peak_point"):
        pipeline({**pipe.sam_meta, "peak_point": True}, map_points="peak")
    with pytest.raises(PipelineError, match="boxes='peak'"):
        PipelineConfig(boxes="threshold", map_points="negative")
    with pytest.raises(PipelineError, match="negative_points"):
        PipelineConfig(map_points="negative", negative_points=0)
    with pytest.raises(PipelineError, match="map_points"):
        PipelineConfig(map_points="positive")
