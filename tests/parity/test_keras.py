"""Parity of the Flax EfficientNet with keras.applications EfficientNetB0/B3, through the Keras weight
import (mskjax.weights.keras), and of its reading of every Keras weight-file layout.

Keras runs on its JAX backend (no TensorFlow). Models are built with weights=None (nothing is
downloaded), then given random BatchNorm statistics and affine parameters, random biases and random
Normalization statistics, and saved. Keras is fed pixels in [0, 255]; our model gets
(x / 255 - mean) / std with the normalisation the import derives from the file. Tolerance: eval-mode
logits and pre-pool feature maps within 1e-4 x max(1, max |reference|) in float32.

The extra Rescaling that Keras adds for weights="imagenet" is not in any weight file: the published
layout test builds Keras' real weights="imagenet" model (its file fetch pointed at a file we wrote)
so that Keras' own pipeline, constants included, is the reference.
"""
from __future__ import annotations

import functools
import os

os.environ["KERAS_BACKEND"] = "jax"  # before keras is imported: keras then needs no TensorFlow

import h5py  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from mskjax import checkpoint, convert  # noqa: E402
from mskjax.models import create  # noqa: E402
from mskjax.weights import (CheckpointMismatch, load, model_arch, normalization_for, read_state_dict,  # noqa: E402
                            source_details, variant_for)
from mskjax.weights import keras as keras_weights  # noqa: E402

SIDE = 64  # even: TF 'SAME' padding (Keras' ZeroPadding2D + 'valid') is asymmetric on stride 2
APPS = {"EfficientNetB0": keras.applications.EfficientNetB0, "EfficientNetB3": keras.applications.EfficientNetB3}


class _NumpyVarianceScaling:
    """Replaces VarianceScaling.__call__ while Keras builds a model: Keras' JAX backend compiles one
    truncated-normal program per weight shape (~30 s for B3 on 2 cores); numpy draws the same
    scale of random weights at once. The weights are random in these tests either way."""

    rng = np.random.RandomState(123)

    def __call__(self, shape, dtype=None):
        from keras.src.initializers.random_initializers import compute_fans
        fan_in, fan_out = compute_fans(shape, input_axes=self.input_axes, output_axes=self.output_axes)
        fan = {"fan_in": fan_in, "fan_out": fan_out}.get(self.mode, (fan_in + fan_out) / 2.0)
        std = np.sqrt(self.scale / max(1.0, fan))
        return keras.ops.convert_to_tensor(_NumpyVarianceScaling.rng.normal(0.0, std, shape).astype("float32"))


def build_keras(app_fn, **kwargs):
    from unittest import mock
    from keras.src.initializers.random_initializers import VarianceScaling
    with mock.patch.object(VarianceScaling, "__call__", _NumpyVarianceScaling.__call__):
        return app_fn(**kwargs)


def test_keras_runs_on_jax_without_tensorflow():
    import sys
    assert keras.backend.backend() == "jax"
    assert "tensorflow" not in sys.modules


def randomise(km, seed: int = 0) -> None:
    rng = np.random.RandomState(seed)
    for layer in km.layers:
        cls = type(layer).__name__
        if cls == "BatchNormalization":
            g, b, mm, mv = layer.get_weights()
            layer.set_weights([rng.normal(1, 0.2, g.shape), rng.normal(0, 0.2, b.shape),
                               rng.normal(0, 0.3, mm.shape), rng.uniform(0.5, 2.0, mv.shape)])
        elif cls in ("Conv2D", "Dense") and layer.use_bias:
            k, b = layer.get_weights()
            layer.set_weights([k, rng.normal(0, 0.2, b.shape)])
        elif cls == "Normalization":
            mean, var, count = layer.get_weights()
            layer.set_weights([rng.uniform(0.3, 0.6, mean.shape), rng.uniform(0.04, 0.09, var.shape), count])


def ours_input(x255: np.ndarray, norm: dict) -> jnp.ndarray:
    assert norm["input_range"] == [0.0, 1.0]
    return jnp.asarray((x255 / 255.0 - np.asarray(norm["mean"], np.float32)) / np.asarray(norm["std"], np.float32))


@functools.lru_cache(maxsize=None)
def built(app: str, tmp: str):
    """Keras model (random, saved to TMP/<app>.weights.h5 and loaded back so every layer uses the
    saved state), our model and jitted run, the import, and both sides' (features, logits)."""
    km = build_keras(APPS[app], weights=None, input_shape=(SIDE, SIDE, 3), classes=7, classifier_activation=None)
    randomise(km)
    path = os.path.join(tmp, f"{app}.weights.h5")
    km.save_weights(path)
    km.load_weights(path)
    x255 = np.random.RandomState(1).uniform(0, 255, (2, SIDE, SIDE, 3)).astype(np.float32)
    both = keras.Model(km.input, [km.get_layer("top_activation").output, km.output])
    ref_feat, ref_logits = (np.asarray(a) for a in both.predict(x255, verbose=0))  # inference mode, one jit

    variables = load("keras", app, path)
    norm = normalization_for("keras", app, read_state_dict("keras", path))
    model = create(model_arch("keras", app), num_classes=7, **variant_for("keras", app))

    @jax.jit
    def run(v, x):
        f = model.apply(v, x, method="features")
        return f, model.apply(v, f, method="head")

    feat, logits = run(variables, ours_input(x255, norm))
    return dict(km=km, path=path, x255=x255, model=model, run=run, variables=variables, norm=norm,
                ours=(np.asarray(feat), np.asarray(logits)), ref=(ref_feat, ref_logits))


@pytest.fixture(scope="module")
def tmp_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("keras"))


@pytest.fixture(scope="module", params=list(APPS))
def pair(request, tmp_dir):
    return request.param, built(request.param, tmp_dir)


def test_eval_logits_and_features(pair):
    app, b = pair
    (feat, logits), (ref_feat, ref_logits) = b["ours"], b["ref"]
    assert logits.shape == ref_logits.shape == (2, 7) and feat.shape == ref_feat.shape
    assert np.abs(logits - ref_logits).max() <= 1e-4 * max(1.0, np.abs(ref_logits).max()), app
    assert np.abs(feat - ref_feat).max() <= 1e-4 * max(1.0, np.abs(ref_feat).max()), app


def test_trainable_parameter_counts_equal_keras(pair):
    app, b = pair
    want = sum(int(np.prod(w.shape)) for w in b["km"].trainable_weights)
    assert sum(int(np.prod(np.shape(a))) for a in jax.tree.leaves(b["variables"]["params"])) == want


def test_variant_is_keras_batchnorm_and_same_padding(pair):
    app, b = pair
    bns = [l for l in b["km"].layers if isinstance(l, keras.layers.BatchNormalization)]
    assert {(l.epsilon, l.momentum) for l in bns} == {(b["model"].bn_epsilon, 1 - b["model"].bn_momentum)}
    assert b["model"].padding == "same"


def test_normalization_is_read_from_the_file(pair):
    """weights=None model: Normalization's own statistics, no ImageNet rescaling."""
    app, b = pair
    mean, var, _ = next(l for l in b["km"].layers if isinstance(l, keras.layers.Normalization)).get_weights()
    np.testing.assert_allclose(b["norm"]["mean"], mean.reshape(-1), rtol=1e-6)
    np.testing.assert_allclose(b["norm"]["std"], np.sqrt(var.reshape(-1)), rtol=1e-6)
    assert source_details("keras", app, read_state_dict("keras", b["path"]))["imagenet_rescaling"] is False


def write_published_layout(km, path, with_top: bool, published_stats: bool) -> None:
    """Writes `km`'s weights in the layout of Keras' published `efficientnetb0[_notop].h5` (TF 2
    `save_weights`): root attrs layer_names/backend/keras_version, group per layer with attr
    weight_names "<layer>/<var>:0" ("depthwise_kernel" for depthwise convs)."""
    top_only = {"avg_pool", "top_dropout", "predictions"}
    layers = [l for l in km.layers if with_top or l.name not in top_only]
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [l.name.encode("utf8") for l in layers]
        f.attrs["backend"] = b"tensorflow"
        f.attrs["keras_version"] = b"2.4.0"
        for layer in layers:
            g = f.create_group(layer.name)
            values = layer.get_weights()
            names = [("depthwise_kernel" if isinstance(layer, keras.layers.DepthwiseConv2D) and w.name == "kernel"
                      else w.name) for w in layer.weights]
            if isinstance(layer, keras.layers.Normalization) and published_stats:
                values = [np.asarray(keras_weights.PUBLISHED_NORMALIZATION_MEAN, np.float32),
                          np.asarray(keras_weights.PUBLISHED_NORMALIZATION_VARIANCE, np.float32), values[2]]
            full = [f"{layer.name}/{n}:0" for n in names]
            g.attrs["weight_names"] = [n.encode("utf8") for n in full]
            for n, v in zip(full, values):
                g.create_dataset(n, data=v)


def test_every_file_layout_reads_the_same(tmp_dir):
    """.weights.h5 (Keras 3), .keras archive, model.save .h5 (model_weights/...), and the published
    TF 2 layout give the same variables. (Keras' own loader reading our published-layout file is the
    next test.)"""
    b = built("EfficientNetB0", tmp_dir)
    km = b["km"]
    ref = read_state_dict("keras", b["path"])
    km.save(os.path.join(tmp_dir, "b0.keras"))
    km.save(os.path.join(tmp_dir, "b0.h5"))
    write_published_layout(km, os.path.join(tmp_dir, "published.h5"), with_top=True, published_stats=False)
    for name in ("b0.keras", "b0.h5", "published.h5"):
        got = read_state_dict("keras", os.path.join(tmp_dir, name))
        weights_only = lambda d: {k: v for k, v in d.items() if not k.startswith("__keras__")}  # noqa: E731
        assert sorted(weights_only(got)) == sorted(weights_only(ref)), name
        for k, v in weights_only(ref).items():
            np.testing.assert_array_equal(got[k], v, err_msg=f"{name} {k}")
    with h5py.File(os.path.join(tmp_dir, "b0.h5")) as f:  # the model.save layout really is nested
        assert "model_weights/stem_bn/stem_bn/gamma" in f
    with h5py.File(os.path.join(tmp_dir, "published.h5")) as f:
        assert "block1a_dwconv/block1a_dwconv/depthwise_kernel:0" in f


def test_published_imagenet_file_matches_keras_imagenet_pipeline(tmp_dir, monkeypatch):
    """A `_notop` file in the published layout with the published Normalization statistics, loaded by
    Keras' own weights="imagenet" code path (which adds Rescaling(1 / sqrt(std))), against our import."""
    from keras.src.applications import efficientnet as keras_efficientnet
    b = built("EfficientNetB0", tmp_dir)
    path = os.path.join(tmp_dir, "efficientnetb0_notop.h5")
    write_published_layout(b["km"], path, with_top=False, published_stats=True)
    monkeypatch.setattr(keras_efficientnet.file_utils, "get_file", lambda *a, **k: path)
    km = build_keras(keras.applications.EfficientNetB0, weights="imagenet", include_top=False,
                     input_shape=(SIDE, SIDE, 3))
    assert sum(isinstance(l, keras.layers.Rescaling) for l in km.layers) == 2
    np.testing.assert_array_equal(km.get_layer("block2a_dwconv").get_weights()[0],  # Keras read our file
                                  b["km"].get_layer("block2a_dwconv").get_weights()[0])
    ref = np.asarray(km.predict(b["x255"], verbose=0))

    state = read_state_dict("keras", path)
    assert keras_weights.imagenet_rescaling(state)[0] is True
    norm = normalization_for("keras", "EfficientNetB0", state)
    np.testing.assert_allclose(norm["mean"], [0.485, 0.456, 0.406], rtol=1e-6)
    np.testing.assert_allclose(norm["std"], [0.229, 0.224, 0.225], rtol=1e-6)  # ImageNet std, as intended
    variables = load("keras", "EfficientNetB0", path, num_classes=7)  # no top: a new head
    feat, _ = b["run"](variables, ours_input(b["x255"], norm))
    assert np.abs(np.asarray(feat) - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())

    km.save_weights(os.path.join(tmp_dir, "imagenet_built.weights.h5"))  # two Rescaling layers listed
    rescale, why = keras_weights.imagenet_rescaling(read_state_dict("keras", os.path.join(tmp_dir, "imagenet_built.weights.h5")))
    assert rescale and "second Rescaling" in why


def test_imagenet_rescaling_constants_are_pinned():
    """The constants a random-weights parity test cannot see: Keras' IMAGENET_STDDEV_RGB and the
    statistics of its published files, and how they combine."""
    from keras.src.applications import efficientnet as keras_efficientnet
    assert tuple(keras_efficientnet.IMAGENET_STDDEV_RGB) == keras_weights.IMAGENET_STDDEV_RGB == (0.229, 0.224, 0.225)
    published = {"normalization/mean": np.array([0.485, 0.456, 0.406], np.float32),
                 "normalization/variance": np.array([0.229, 0.224, 0.225], np.float32),
                 keras_weights.RESCALING_COUNT_KEY: np.asarray(1)}
    n = keras_weights.normalization(published)
    np.testing.assert_allclose(n["std"], [0.229, 0.224, 0.225], rtol=1e-6)
    no = keras_weights.normalization(published, rescale=False)  # what Normalization alone would do
    np.testing.assert_allclose(no["std"], np.sqrt([0.229, 0.224, 0.225]), rtol=1e-6)
    adapted = dict(published, **{"normalization/variance": np.array([0.04, 0.05, 0.06], np.float32)})
    assert keras_weights.imagenet_rescaling(adapted)[0] is False
    adapted[keras_weights.RESCALING_COUNT_KEY] = np.asarray(2)
    np.testing.assert_allclose(keras_weights.normalization(adapted)["std"],
                               np.sqrt([0.04, 0.05, 0.06]) * np.sqrt([0.229, 0.224, 0.225]), rtol=1e-6)


def test_b0_file_as_b3_names_keys(tmp_dir):
    b = built("EfficientNetB0", tmp_dir)
    with pytest.raises(CheckpointMismatch) as e:
        load("keras", "EfficientNetB3", b["path"])
    msg = str(e.value)
    assert "keras EfficientNetB3" in msg and "missing (" in msg and "shape mismatches (" in msg
    assert ("block3b_expand_bn/moving_variance: checkpoint (240,) vs model "
            "batch_stats/stage3_block1/expand_bn/var (288,)") in msg


def test_bad_files_are_clear_errors(tmp_dir):
    b = built("EfficientNetB0", tmp_dir)
    data = open(b["path"], "rb").read()
    cut = os.path.join(tmp_dir, "cut.weights.h5")
    with open(cut, "wb") as f:
        f.write(data[: len(data) // 3])
    with pytest.raises(CheckpointMismatch, match="cut.weights.h5"):
        read_state_dict("keras", cut)
    with pytest.raises(FileNotFoundError):
        read_state_dict("keras", os.path.join(tmp_dir, "nothing.h5"))
    notop = os.path.join(tmp_dir, "notop_for_error.h5")
    write_published_layout(b["km"], notop, with_top=False, published_stats=False)
    with pytest.raises(CheckpointMismatch, match="num_classes"):
        load("keras", "EfficientNetB0", notop)
    with pytest.raises(ValueError, match="EfficientNetB9"):
        model_arch("keras", "EfficientNetB9")


def test_convert_cli_round_trip(tmp_dir, tmp_path):
    b = built("EfficientNetB0", tmp_dir)
    out = tmp_path / "ckpt"
    assert convert.main(["--source", "keras", "--arch", "EfficientNetB0", b["path"], str(out)]) == 0
    model, restored, meta = checkpoint.load_model(out)
    assert meta["arch"] == "efficientnet_b0" and meta["num_classes"] == 7
    assert meta["variant"] == {"padding": "same", "bn_epsilon": 1e-3, "bn_momentum": 0.01}
    assert meta["normalization"] == b["norm"]
    assert meta["source"]["format"] == "keras" and meta["source"]["imagenet_rescaling"] is False
    for a, c in zip(jax.tree.leaves(restored), jax.tree.leaves(b["variables"])):
        np.testing.assert_array_equal(a, c)


# ------------------------------------------------------------------------------ ResNet50 (v1)

@functools.lru_cache(maxsize=None)
def built_resnet50(tmp: str):
    km = build_keras(keras.applications.ResNet50, weights=None, input_shape=(SIDE, SIDE, 3), classes=7,
                     classifier_activation=None)
    randomise(km)
    path = os.path.join(tmp, "resnet50.weights.h5")
    km.save_weights(path)
    rgb = np.random.RandomState(2).uniform(0, 255, (2, SIDE, SIDE, 3)).astype(np.float32)
    caffe = rgb[..., ::-1] - np.asarray(keras_weights.CAFFE_MEAN_BGR, np.float32)  # Keras' preprocess_input
    both = keras.Model(km.input, [km.get_layer("conv5_block3_out").output, km.output])
    ref = tuple(np.asarray(a) for a in both.predict(caffe, verbose=0))
    variables = load("keras", "ResNet50", path)
    norm = normalization_for("keras", "ResNet50")
    model = create(model_arch("keras", "ResNet50"), num_classes=7, **variant_for("keras", "ResNet50"))
    lo, hi = norm["input_range"]
    x = (rgb / 255.0 * (hi - lo) + lo - np.asarray(norm["mean"], np.float32)) / np.asarray(norm["std"], np.float32)

    @jax.jit
    def run(v, x):
        f = model.apply(v, x, method="features")
        return f, model.apply(v, f, method="head")

    ours = tuple(np.asarray(a) for a in run(variables, jnp.asarray(x)))
    return dict(km=km, model=model, variables=variables, ours=ours, ref=ref, caffe=caffe)


def test_resnet50_v1_eval_logits_and_features(tmp_dir):
    b = built_resnet50(tmp_dir)
    (feat, logits), (ref_feat, ref_logits) = b["ours"], b["ref"]
    assert logits.shape == ref_logits.shape == (2, 7) and feat.shape == ref_feat.shape
    assert np.abs(logits - ref_logits).max() <= 1e-4 * max(1.0, np.abs(ref_logits).max())
    assert np.abs(feat - ref_feat).max() <= 1e-4 * max(1.0, np.abs(ref_feat).max())


def test_resnet50_v1_variant_parameters_and_preprocessing(tmp_dir):
    """Parameter count, BatchNorm settings, and the caffe constants Keras' preprocess_input uses."""
    from keras.applications.resnet50 import preprocess_input
    b = built_resnet50(tmp_dir)
    want = sum(int(np.prod(w.shape)) for w in b["km"].trainable_weights)
    assert sum(int(np.prod(np.shape(a))) for a in jax.tree.leaves(b["variables"]["params"])) == want
    bns = [l for l in b["km"].layers if isinstance(l, keras.layers.BatchNormalization)]
    assert {(l.epsilon, l.momentum) for l in bns} == {(b["model"].bn_epsilon, 1 - b["model"].bn_momentum)}
    assert b["model"].stride_in_1x1 and b["model"].conv_bias
    rgb = np.random.RandomState(3).uniform(0, 255, (1, 4, 4, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(preprocess_input(rgb.copy())),
                               rgb[..., ::-1] - np.asarray(keras_weights.CAFFE_MEAN_BGR, np.float32), rtol=1e-6)
    assert normalization_for("keras", "ResNet50") == {"input_range": [0.0, 255.0], "mean": [123.68, 116.779, 103.939],
                                                      "std": [1.0, 1.0, 1.0]}
