"""Keras `keras.applications` EfficientNetB0..B7 weight files -> mskjax Flax variables.

Reads the files with h5py alone (Keras itself is not needed):
  * legacy HDF5 (`.h5`), as Keras publishes them (`efficientnetb3.h5`, `efficientnetb3_notop.h5`:
    root attribute `layer_names`; group `<layer>` with attribute `weight_names` such as
    "block1a_dwconv/depthwise_kernel:0"; dataset `<layer>/<weight_name>`), and as `model.save("x.h5")`
    writes them (the same under `model_weights/`, e.g. `model_weights/stem_bn/stem_bn/gamma`);
  * Keras 3 weight files (`model.save_weights("x.weights.h5")`): `layers/<class>[_k]/vars/<i>`, the
    group `vars` carrying the layer name in its `name` attribute, variables in the layer's own order;
  * Keras 3 archives (`.keras`, a zip holding `model.weights.h5` in that format).
Every format is read into one flat dict {"<layer name>/<variable>": array}, variables named kernel,
bias, gamma, beta, moving_mean, moving_variance (BatchNorm), mean, variance, count (Normalization).

Keras' EfficientNet takes pixels in [0, 255] and normalises inside the model:
    x / 255 -> Normalization: (x - mean) / max(sqrt(variance), 1e-7)
            -> [built with weights="imagenet" only] Rescaling(1 / sqrt(IMAGENET_STDDEV_RGB))
The Normalization statistics are in the file; the last Rescaling is not (Keras adds it when it builds the
model with weights="imagenet", because its published files store the ImageNet standard deviations as
the variance). `normalization` folds the three steps into our contract: [0, 1] input, then
(x - mean) / std with std = max(sqrt(variance), 1e-7) * sqrt(IMAGENET_STDDEV_RGB) (or without the last
factor). The Flax model gets the already-normalised image; `padding="same"`, BatchNorm eps 1e-3,
momentum 0.01 (Keras' 0.99).

Key mapping (Keras layer -> ours): stem_conv / stem_bn / top_conv / top_bn -> same names;
predictions -> classifier; block{s}{letter}_{expand_conv, expand_bn, dwconv, bn, se_reduce, se_expand,
project_conv, project_bn} -> stage{s}_block{letter index}/{expand_conv, expand_bn, dw_conv, dw_bn,
se_reduce, se_expand, project_conv, project_bn}. Keras kernels are HWIO already; depthwise kernels
(k, k, C, 1) become (k, k, 1, C); Dense (in, out) as is.
"""
from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from mskjax.classifier import IMAGENET_MEAN, IMAGENET_STD
from mskjax.models import default_variant
from mskjax.weights.mapping import CheckpointMismatch, Target, map_state_dict

# keras/src/applications/efficientnet.py: the constant of the Rescaling that Keras adds for weights="imagenet".
IMAGENET_STDDEV_RGB = IMAGENET_STD  # Keras' name for the same statistics
# What Keras' published EfficientNet files store in their Normalization layer (mean, and the standard
# deviations as "variance": tensorflow/tensorflow#49930).
PUBLISHED_NORMALIZATION_MEAN = IMAGENET_MEAN
PUBLISHED_NORMALIZATION_VARIANCE = IMAGENET_STDDEV_RGB
KERAS_EPSILON = 1e-7  # keras.config.epsilon(), the floor of Normalization's sqrt(variance)

# Meta entries the readers add to the flat dict (not weights): how many Rescaling layers the file lists.
RESCALING_COUNT_KEY = "__keras__/rescaling_layers"

# Variable order of each layer class in Keras 3 weight files (`vars/0`, `vars/1`, ...).
_VAR_NAMES = {
    "conv2d": ("kernel", "bias"),
    "depthwise_conv2d": ("kernel", "bias"),
    "dense": ("kernel", "bias"),
    "batch_normalization": ("gamma", "beta", "moving_mean", "moving_variance"),
    "normalization": ("mean", "variance", "count"),
}
# Legacy variable names -> ours (TF 2 wrote "depthwise_kernel").
_LEGACY_VAR = {"depthwise_kernel": "kernel"}

_KERAS_ARCH = re.compile(r"(?:efficientnet_?|EfficientNet)[bB]([0-7])")
_KERAS_RESNET = re.compile(r"ResNet50|resnet50(_v1)?")

# keras.applications.imagenet_utils.preprocess_input(mode="caffe") for ResNet50: RGB -> BGR, then
# subtract these BGR means from pixels in [0, 255]; no scaling.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


def arch_for(name: str) -> str:
    """Our architecture for a Keras application name: "EfficientNetB3", "efficientnetb3" or
    "efficientnet_b3" -> "efficientnet_b3"; "ResNet50" / "resnet50" -> "resnet50_v1"."""
    if _KERAS_RESNET.fullmatch(name):
        return "resnet50_v1"
    m = _KERAS_ARCH.fullmatch(name)
    if not m:
        raise ValueError(f"unsupported Keras application {name!r}: expected EfficientNetB0..B7 "
                         "(also written efficientnetb3 / efficientnet_b3) or ResNet50")
    return f"efficientnet_b{m[1]}"


def variant(name: str) -> dict:
    """Variant settings of the Keras model. EfficientNet: TF 'SAME' padding, BatchNorm eps 1e-3 and
    Keras momentum 0.99 (0.01 in our torch convention). ResNet50: v1 (`resnet50_v1`'s defaults:
    stride on the first 1x1 conv, conv biases, eps 1.001e-5, momentum 0.01)."""
    arch = arch_for(name)
    if arch == "resnet50_v1":
        return default_variant(arch)
    return {"padding": "same", "bn_epsilon": 1e-3, "bn_momentum": 0.01}


# ----------------------------------------------------------------------------------------- reading

def read_weights(path: str | Path) -> dict[str, np.ndarray]:
    """A Keras weight file (`.h5` legacy or Keras 3 `.weights.h5`, or a `.keras` archive) -> flat
    {"<layer>/<variable>": numpy} plus RESCALING_COUNT_KEY. Raises FileNotFoundError for a missing
    file and CheckpointMismatch for one that is not a Keras weight file."""
    import h5py  # optional dependency: pip install mskjax[convert]
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Keras weight file not found: {path}")
    try:
        if path.suffix == ".keras":
            with zipfile.ZipFile(path) as z:
                if "model.weights.h5" not in z.namelist():
                    raise CheckpointMismatch(f"{path} is a zip without model.weights.h5: not a .keras archive")
                data = io.BytesIO(z.read("model.weights.h5"))
            with h5py.File(data, "r") as f:
                return _read_keras3(f, path)
        with h5py.File(path, "r") as f:
            if "layer_names" in f.attrs:
                return _read_legacy(f, path)
            if "model_weights" in f and "layer_names" in f["model_weights"].attrs:
                return _read_legacy(f["model_weights"], path)
            if "layers" in f:
                return _read_keras3(f, path)
            raise CheckpointMismatch(f"{path} is HDF5 but not a Keras weight file (no layer_names, "
                                     "model_weights or layers)")
    except (OSError, zipfile.BadZipFile, KeyError) as e:  # truncated / foreign files
        raise CheckpointMismatch(f"cannot read {path} as a Keras weight file: {type(e).__name__}: {e}") from e


def _text(value: Any) -> str:
    return value.decode("utf8") if isinstance(value, bytes) else str(value)


def _read_legacy(group, path: Path) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    rescaling = 0
    for layer in (_text(n) for n in group.attrs["layer_names"]):
        if re.fullmatch(r"rescaling(_\d+)?", layer):
            rescaling += 1
        g = group[layer]
        for wname in (_text(n) for n in g.attrs.get("weight_names", [])):
            parts = wname.split("/")
            var = parts[-1].split(":")[0]
            owner = parts[-2] if len(parts) >= 2 else layer  # the owning layer (nested models keep it)
            out[f"{owner}/{_LEGACY_VAR.get(var, var)}"] = np.asarray(g[wname])
    out[RESCALING_COUNT_KEY] = np.asarray(rescaling)
    return out


def _read_keras3(f, path: Path) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    counts = {"rescaling": 0}

    def walk(layers_group):
        for key in layers_group:
            g = layers_group[key]
            cls = re.sub(r"_\d+$", "", key)
            if cls == "rescaling":
                counts["rescaling"] += 1
            if "layers" in g:  # a nested model
                walk(g["layers"])
            v = g.get("vars")
            if v is None or len(v) == 0:
                continue
            if "name" not in v.attrs:
                raise CheckpointMismatch(f"{path}: {v.name} has no layer name (written by a Keras version "
                                         "older than this reader supports): save it as a .keras archive")
            layer = _text(v.attrs["name"])
            names = _VAR_NAMES.get(cls)
            for i in range(len(v)):
                var = names[i] if names is not None and i < len(names) else f"var{i}"
                out[f"{layer}/{var}"] = np.asarray(v[str(i)])

    walk(f["layers"])
    out[RESCALING_COUNT_KEY] = np.asarray(counts["rescaling"])
    return out


# ----------------------------------------------------------------------------------------- mapping

_VAR_TARGET = {
    "kernel": ("params", "kernel"),
    "bias": ("params", "bias"),
    "gamma": ("params", "scale"),
    "beta": ("params", "bias"),
    "moving_mean": ("batch_stats", "mean"),
    "moving_variance": ("batch_stats", "var"),
}
_BLOCK_PART = {"expand_conv": "expand_conv", "expand_bn": "expand_bn", "dwconv": "dw_conv", "bn": "dw_bn",
               "se_reduce": "se_reduce", "se_expand": "se_expand", "project_conv": "project_conv",
               "project_bn": "project_bn"}


def efficientnet_key(key: str, tree_has) -> Target | None:
    if key.startswith("__keras__/") or re.fullmatch(r"normalization(_\d+)?/(mean|variance|count)", key):
        return Target.IGNORE  # read by `normalization`, not a model variable
    layer, _, var = key.rpartition("/")
    if var not in _VAR_TARGET:
        return None
    collection, leaf = _VAR_TARGET[var]
    if layer in ("stem_conv", "stem_bn", "top_conv", "top_bn"):
        return Target(collection, (layer,), leaf)
    if layer == "predictions":
        return Target(collection, ("classifier",), leaf)
    m = re.fullmatch(r"block(\d)([a-z])_(\w+)", layer)
    if m and m[3] in _BLOCK_PART:
        return Target(collection, (f"stage{m[1]}_block{ord(m[2]) - ord('a')}", _BLOCK_PART[m[3]]), leaf)
    return None


def resnet_key(key: str, tree_has) -> Target | None:
    """Keras ResNet50: conv1_{conv,bn} -> conv1 / bn1; conv{s}_block{b}_{k}_{conv,bn} ->
    layer{s-1}_block{b-1}/{conv,bn}{k}, k = 0 the shortcut (downsample_{conv,bn}); predictions -> fc."""
    if key.startswith("__keras__/"):
        return Target.IGNORE
    layer, _, var = key.rpartition("/")
    if var not in _VAR_TARGET:
        return None
    collection, leaf = _VAR_TARGET[var]
    if layer in ("conv1_conv", "conv1_bn"):
        return Target(collection, ("conv1" if layer == "conv1_conv" else "bn1",), leaf)
    if layer == "predictions":
        return Target(collection, ("fc",), leaf)
    m = re.fullmatch(r"conv([2-5])_block(\d+)_([0-3])_(conv|bn)", layer)
    if not m:
        return None
    module = f"downsample_{m[4]}" if m[3] == "0" else f"{m[4]}{m[3]}"
    return Target(collection, (f"layer{int(m[1]) - 1}_block{int(m[2]) - 1}", module), leaf)


def convert_state_dict(state_dict: Mapping[str, np.ndarray], name: str, expected) -> dict:
    """Maps a flat Keras dict (see `read_weights`) onto the `expected` variables tree.

    Returns {"params", "batch_stats"} as float32 numpy; raises CheckpointMismatch naming every
    unexpected key, missing leaf and shape mismatch. For ResNet50 the stem kernel's input channels
    are reversed, so our model takes RGB where Keras' takes BGR."""
    resnet = arch_for(name) == "resnet50_v1"
    relaid = {}
    for k, v in state_dict.items():
        v = np.asarray(v)
        if k.endswith("_dwconv/kernel") and v.ndim == 4:
            v = np.transpose(v, (0, 1, 3, 2))  # (k, k, C, 1) -> (k, k, 1, C)
        if resnet and k == "conv1_conv/kernel" and v.ndim == 4:
            v = v[:, :, ::-1, :]  # BGR -> RGB input channels
        relaid[k] = v.astype(np.float32) if v.dtype.kind == "f" else v
    key_map = resnet_key if resnet else efficientnet_key
    return map_state_dict(relaid, key_map, lambda v, leaf: v, expected, source=f"keras {name}")


def head_classes(state_dict: Mapping[str, np.ndarray]) -> int | None:
    """Number of logits of the file's "predictions" layer; None for a file without one (`_notop`)."""
    kernel = state_dict.get("predictions/kernel")
    return None if kernel is None else int(np.shape(kernel)[-1])


# ----------------------------------------------------------------------------------- normalisation

def _find(state_dict: Mapping[str, np.ndarray], var: str) -> np.ndarray:
    keys = [k for k in state_dict if re.fullmatch(rf"normalization(_\d+)?/{var}", k)]
    if len(keys) != 1:
        raise CheckpointMismatch(f"Keras file has {len(keys)} Normalization '{var}' variables, expected 1 "
                                 f"(found: {keys}): is it a keras.applications EfficientNet?")
    return np.asarray(state_dict[keys[0]], np.float64).reshape(-1)


def imagenet_rescaling(state_dict: Mapping[str, np.ndarray]) -> tuple[bool, str]:
    """Whether the Keras model this file belongs to ends its input pipeline with Rescaling(1 /
    sqrt(IMAGENET_STDDEV_RGB)), and why we think so:
      * the file lists a second Rescaling layer: the model was built with weights="imagenet";
      * the Normalization holds Keras' published ImageNet statistics (the published `.h5` files,
        which predate that layer, and which Keras always loads with it);
      * otherwise not (a model built with weights=None, its Normalization adapted or left at 0 / 1).
    """
    if int(np.asarray(state_dict.get(RESCALING_COUNT_KEY, 0))) >= 2:
        return True, "the file lists a second Rescaling layer (a model built with weights='imagenet')"
    mean, var = _find(state_dict, "mean"), _find(state_dict, "variance")
    if (mean.shape == (3,) and np.allclose(mean, PUBLISHED_NORMALIZATION_MEAN, atol=1e-6)
            and np.allclose(var, PUBLISHED_NORMALIZATION_VARIANCE, atol=1e-6)):
        return True, "the Normalization holds Keras' published ImageNet statistics"
    return False, "one Rescaling layer and Normalization statistics other than Keras' published ones"


def resnet_normalization() -> dict:
    """Keras ResNet50's caffe preprocessing with the channel flip folded into the stem: RGB pixels
    in [0, 255] minus the ImageNet means (RGB order), no scaling."""
    return {"input_range": [0.0, 255.0], "mean": [float(v) for v in CAFFE_MEAN_BGR[::-1]], "std": [1.0, 1.0, 1.0]}


def normalization(state_dict: Mapping[str, np.ndarray], rescale: bool | None = None) -> dict:
    """Our normalisation contract for the file's Keras input pipeline (module docstring):
    {"input_range": [0, 1], "mean": [3], "std": [3]} so that (x / 255 - mean) / std equals Keras'
    layers on pixels x in [0, 255]. `rescale` None decides by `imagenet_rescaling`."""
    if rescale is None:
        rescale, _ = imagenet_rescaling(state_dict)
    mean, var = _find(state_dict, "mean"), _find(state_dict, "variance")
    std = np.maximum(np.sqrt(var), KERAS_EPSILON)
    if rescale:
        std = std * np.sqrt(np.asarray(IMAGENET_STDDEV_RGB))
    return {"input_range": [0.0, 1.0], "mean": [float(v) for v in mean], "std": [float(v) for v in std]}
