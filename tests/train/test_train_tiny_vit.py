"""LiteMedSAM's TinyViT encoder as a classifier through `mskjax.train`: data.mode "lite_medsam",
init_from "litemedsam" (the packaged weights) and train.trainable "head" (a frozen backbone).

The head-only step is checked on ResNet18 at 32 px (seconds); one whole run trains the full-size
TinyViT from LiteMedSAM's packaged weights on a few synthetic images (about a minute on 2 cores).
"""
from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mskjax import checkpoint
from mskjax.data.images import decode_image
from mskjax.data.preprocess import preprocess
from mskjax.geometry import letterbox_geometry
from mskjax.models import create
from mskjax.models.sam.lite_medsam import lite_medsam_preprocess
from mskjax.train import classifier as train_cls
from mskjax.train import optim
from mskjax.train.config import ConfigError, base_config, load_config, validate
from mskjax.weights.litemedsam import load_litemedsam

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def _tiny_config():
    return load_config(HERE / "tiny_config.py")


def _tiny_vit_config(root: Path):
    c = base_config()
    c.init_from = "litemedsam"
    c.model.arch = "tiny_vit_medsam"
    c.data.dataset = "synthetic"
    c.data.root = str(root)
    c.data.image_size = 256
    c.data.mode = "lite_medsam"
    c.data.synthetic_studies = 6
    c.data.workers = 1
    c.data.augment = False
    c.train.trainable = "head"
    c.train.batch_size = 4
    c.train.epochs = 1
    c.train.learning_rate = 1e-2
    c.train.warmup_epochs = 0.0
    c.train.log_every = 1
    c.eval.batch_size = 4
    c.eval.bootstrap = 0
    c.eval.test_split = ""
    c.eval.localization = False
    return c


# ---------------------------------------------------------------------------------------------
# The input recipe


@pytest.mark.parametrize("shape", [(300, 200), (97, 256), (512, 384)])
def test_lite_medsam_mode_is_litemedsams_recipe_on_the_float_image(shape):
    img = np.random.default_rng(sum(shape)).uniform(0.1, 0.8, shape).astype(np.float32)
    x, geom = preprocess(img, 256, "lite_medsam", channels=3)
    ref, (h, w) = lite_medsam_preprocess(img, 256)
    np.testing.assert_array_equal(x, ref)
    lb = letterbox_geometry(shape, 256, align="topleft")  # bottom/right padding, SAM's rounding
    assert (geom.top, geom.left) == (0.0, 0.0) and tuple(int(v) for v in geom.content_hw) == (h, w)
    assert (float(lb.scale_x), float(lb.scale_y)) == (geom.scale_x, geom.scale_y)
    assert x[:h, :w].min() == 0 and x[:h, :w].max() == pytest.approx(1, abs=1e-6)  # over the image
    assert x[h:].max(initial=0) == 0 and x[:, w:].max(initial=0) == 0  # padding stays 0


def test_lite_medsam_mode_on_a_radiograph_matches_the_segmenters_input(shared_data):
    path = shared_data / "fracatlas" / "images" / "IMG0003001.jpg"
    decoded = decode_image(path).image
    x, _ = preprocess(decoded, 256, "lite_medsam", channels=1)
    ref, _ = lite_medsam_preprocess(np.round(decoded * 255).astype(np.uint8), 256)
    # The official recipe resizes uint8 and rounds; the trainer resizes the float image: the two
    # differ by at most half a grey level before the min-max stretch.
    assert np.max(np.abs(x[..., 0] - ref[..., 0])) < 2.5 / 255


# ---------------------------------------------------------------------------------------------
# Configuration


@pytest.mark.parametrize("change, field", [
    (dict(image_size=128), "data.image_size"),
    (dict(mode="resize"), "data.mode"),
    (dict(normalization="imagenet"), "data.mode"),
    (dict(head_type="gap"), "model.head_type"),
    (dict(dtype="bfloat16"), "model.dtype"),
    (dict(trainable="backbone"), "train.trainable"),
])
def test_tiny_vit_config_errors_name_the_field(tmp_path, change, field):
    c = _tiny_vit_config(tmp_path)
    for key, value in change.items():
        section = {"image_size": c.data, "mode": c.data, "normalization": c.data, "head_type": c.model,
                   "dtype": c.model, "trainable": c.train}[key]
        section[key] = value
    with pytest.raises(ConfigError, match=f"config.{field}"):
        validate(c, 1)


def test_litemedsam_init_and_head_types_need_the_right_arch(tmp_path):
    c = _tiny_config()
    c.init_from = "litemedsam"
    with pytest.raises(ConfigError, match="config.init_from.*tiny_vit_medsam"):
        validate(c, 1)
    c = _tiny_config()
    c.model.head_type = "mil"
    with pytest.raises(ConfigError, match="config.model.head_type"):
        validate(c, 1)
    validate(_tiny_vit_config(tmp_path), 1)


# ---------------------------------------------------------------------------------------------
# The head-only step


def test_head_only_step_moves_the_head_alone():
    config = _tiny_config()
    config.train.trainable = "head"
    config.train.weight_decay = 0.1  # decay must not reach the frozen kernels either
    model = train_cls.step_model(config)
    heads = train_cls.head_modules(model, config)
    assert heads == ("fc",)
    v = train_cls.init_variables(model, config, jax.random.PRNGKey(0))
    tx = train_cls.trainable_optimizer(optim.make_optimizer("adamw", 1e-2, 0.1, grad_clip=1.0), heads)
    state = {"step": jnp.zeros((), jnp.int32), "params": v["params"], "batch_stats": v["batch_stats"],
             "opt_state": tx.init(v["params"]), "rng": jax.random.PRNGKey(1)}
    norm = train_cls.normalization(config)
    step = jax.jit(train_cls.make_train_step(model, tx, config, norm, 1.0, 1.0, None))
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.uniform(0, 1, (8, 32, 32, 1)), jnp.float32),
             "label": jnp.asarray([0, 1] * 4), "valid": jnp.ones(8, bool)}
    new, out = step(state, batch)
    new, out = step(new, batch)
    assert np.isfinite(float(out["loss"])) and float(out["grad_norm"]) > 0
    for name in v["params"]:
        same = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), v["params"][name],
                                            new["params"][name]))
        assert all(same) if name != "fc" else not any(same), name
    jax.tree.map(np.testing.assert_array_equal, v["batch_stats"], new["batch_stats"])  # inference-mode BN

    # The logits the step trains are the model's inference-mode logits: the head sees the frozen features.
    full = model.apply({"params": new["params"], "batch_stats": new["batch_stats"]},
                       train_cls.prepare_images(batch["image"], norm, 1), train=False)
    feats = model.apply(v, train_cls.prepare_images(batch["image"], norm, 1), train=False, method="features")
    head = model.apply({"params": new["params"], "batch_stats": new["batch_stats"]}, feats, method="head")
    np.testing.assert_allclose(full, head, rtol=1e-5, atol=1e-5)


def test_tiny_vit_inference_one_image_at_a_time_equals_the_batch(tmp_path):
    """The trainer's eval step and frozen features run a TinyViT one image at a time on one CPU
    device (faster there); the values are the batch's. A reduced TinyViT keeps this fast."""
    from mskjax.models.tiny_vit_classifier import TinyViTClassifier
    model = TinyViTClassifier(img_size=64, embed_dims=(8, 16, 16, 16), depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1),
                              window_sizes=(4, 4, 4, 4), out_chans=16)
    config = _tiny_vit_config(tmp_path)
    v = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 1)))
    x = jnp.asarray(np.random.default_rng(0).uniform(0, 1, (3, 64, 64, 1)), jnp.float32)
    infer = jax.jit(train_cls.inference_apply(model, config))
    np.testing.assert_allclose(np.asarray(infer(v, x)), np.asarray(model.apply(v, x)), rtol=1e-5, atol=1e-5)
    feats = jax.jit(lambda v, x: train_cls.inference_apply(model, config)(v, x, method="features"))(v, x)
    np.testing.assert_allclose(np.asarray(feats), np.asarray(model.apply(v, x, method="features")), rtol=1e-5,
                               atol=1e-5)


# ---------------------------------------------------------------------------------------------
# A whole run from LiteMedSAM's packaged encoder


def test_tiny_vit_run_from_litemedsam_trains_the_head_and_exports_a_usable_checkpoint(tmp_path):
    config = _tiny_vit_config(tmp_path / "data")
    result = train_cls.train_and_evaluate(config, tmp_path / "run")
    model, variables, meta = checkpoint.load_classifier(tmp_path / "run" / "best")
    assert meta["arch"] == "tiny_vit_medsam" and meta["variant"] == {"head_type": "linear"}
    assert meta["data"] == {"mode": "lite_medsam", "image_size": 256}
    lms, _ = load_litemedsam()
    enc = lms["params"]["image_encoder"]
    assert set(variables["params"]) == set(enc) | {"fc"}
    for name in enc:  # the encoder and its BatchNorm statistics exactly as packaged
        jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, enc[name]),
                     jax.tree.map(np.asarray, variables["params"][name]))
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, lms["batch_stats"]["image_encoder"]),
                 jax.tree.map(np.asarray, variables["batch_stats"]))
    fresh = train_cls.variables_from_litemedsam(model, jax.random.split(jax.random.PRNGKey(config.seed))[0])
    assert not np.array_equal(np.asarray(fresh["params"]["fc"]["kernel"]),
                              np.asarray(variables["params"]["fc"]["kernel"]))  # the head learnt
    assert result["best_step"] >= 1 and (tmp_path / "run" / "results.json").is_file()
    # The exported model runs on the trainer's own input: probabilities from mskjax.classifier's contract.
    assert isinstance(model, type(create("tiny_vit_medsam")))
