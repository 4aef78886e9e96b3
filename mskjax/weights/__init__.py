"""Imports of foreign checkpoints into mskjax variables.

`load(source, arch, path, num_classes=None, in_channels=3)` -> {"params", "batch_stats"} for
`mskjax.models.create(model_arch(source, arch), num_classes, **variant_for(source, arch))`.

Sources and what `arch` names:
  "torchvision"  our architecture name ("resnet50", "efficientnet_b3"), a `.pth` state dict
  "timm"         timm's model name ("resnet50", "efficientnet_b3", "tf_efficientnet_b3[.tag]"),
                 a `.pth` / `.bin` / `.safetensors` state dict (mskjax.weights.timm)
  "keras"        a keras.applications EfficientNet ("EfficientNetB3" or "efficientnet_b3") or
                 ResNet50 (-> our "resnet50_v1"), a `.h5` / `.weights.h5` / `.keras` file
                 (mskjax.weights.keras)
`normalization_for(source, arch, state_dict)` says what input each expects.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mskjax.weights.mapping import CheckpointMismatch, to_numpy

__all__ = ["CheckpointMismatch", "from_state_dict", "load", "variant_for", "checkpoint_classes", "read_torch_state_dict",
           "read_state_dict", "model_arch", "normalization_for", "source_details", "SOURCES"]

SOURCES = ("torchvision", "timm", "keras")

HEAD = {"resnet": "fc", "efficientnet": "classifier"}
STEM = {"resnet": "conv1", "efficientnet": "stem_conv"}

# What each source's models expect as input: [0, 1] RGB, then this mean/std.
IMAGENET_NORMALIZATION = {"input_range": [0.0, 1.0], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def _check_source(source: str) -> None:
    if source not in SOURCES:
        raise ValueError(f"unknown checkpoint source {source!r}: expected one of {list(SOURCES)}")


def model_arch(source: str, arch: str) -> str:
    """Our architecture name for a source's model name ("tf_efficientnet_b3" -> "efficientnet_b3")."""
    _check_source(source)
    if source == "timm":
        from mskjax.weights import timm
        return timm.arch_for(arch)
    if source == "keras":
        from mskjax.weights import keras
        return keras.arch_for(arch)
    return arch


def variant_for(source: str, arch: str) -> dict[str, Any]:
    """Variant settings a checkpoint from `source` needs for `arch` (padding, BatchNorm)."""
    from mskjax.models import default_variant
    _check_source(source)
    if source == "timm":
        from mskjax.weights import timm
        return timm.variant(arch)
    if source == "keras":
        from mskjax.weights import keras
        return keras.variant(arch)
    return default_variant(arch)


def normalization_for(source: str, arch: str, state_dict: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """{"input_range", "mean", "std"} the source's model expects (see mskjax.checkpoint). Keras reads
    its Normalization statistics from `state_dict` (`read_state_dict("keras", path)`)."""
    _check_source(source)
    if source == "timm":
        from mskjax.weights import timm
        return timm.normalization(arch)
    if source == "keras":
        from mskjax.weights import keras
        if keras.arch_for(arch) == "resnet50_v1":
            return keras.resnet_normalization()
        if state_dict is None:
            raise ValueError("Keras normalisation is read from the weight file: pass its state_dict")
        return keras.normalization(state_dict)
    return dict(IMAGENET_NORMALIZATION)


def source_details(source: str, arch: str, state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Source-specific facts for a checkpoint's metadata ("source" entry)."""
    _check_source(source)
    if source == "timm":
        return {"name": arch}
    if source == "keras":
        from mskjax.weights import keras
        if keras.arch_for(arch) == "resnet50_v1":
            return {"name": arch, "keras_input_range": [0, 255],
                    "keras_preprocessing": "caffe (BGR, mean subtraction) outside the model; "
                                           "our stem takes RGB (kernel channels reversed)"}
        rescale, why = keras.imagenet_rescaling(state_dict)
        return {"name": arch, "keras_input_range": [0, 255], "imagenet_rescaling": rescale,
                "imagenet_rescaling_reason": why}
    return {}


def read_torch_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """A `.pth` file -> flat {key: float32 numpy}. Accepts a bare state dict or one wrapped under
    "state_dict" / "model". Loads with `weights_only=True` (no arbitrary pickles)."""
    import torch  # optional dependency: pip install mskjax[convert]
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated / foreign files
        raise CheckpointMismatch(f"cannot read {path} as a PyTorch checkpoint: {type(e).__name__}: {e}") from e
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, Mapping) and wrapper in obj and isinstance(obj[wrapper], Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping):
        raise CheckpointMismatch(f"{path} holds a {type(obj).__name__}, not a state dict")
    return {k: to_numpy(v) for k, v in obj.items()}


def read_state_dict(source: str, path: str | Path) -> dict[str, np.ndarray]:
    """Reads a checkpoint file of `source` into a flat {key: numpy} dict."""
    _check_source(source)
    if source == "timm":
        from mskjax.weights import timm
        return timm.read_state_dict(path)
    if source == "keras":
        from mskjax.weights import keras
        return keras.read_weights(path)
    return read_torch_state_dict(path)


def checkpoint_classes(source: str, arch: str, state_dict: Mapping[str, Any]) -> int | None:
    """Number of logits of the checkpoint's classifier (None: a Keras file without its top)."""
    _check_source(source)
    if source == "keras":
        from mskjax.weights import keras
        return keras.head_classes(state_dict)
    if source == "timm":
        from mskjax.weights import timm
        key = timm.head_key(arch)
    else:
        from mskjax.weights import torchvision as tv
        key = "fc.weight" if tv.family(arch) == "resnet" else "classifier.1.weight"
    if key not in state_dict:
        raise CheckpointMismatch(f"{source} {arch} checkpoint has no {key}: cannot tell its number of classes "
                                 "(is it the right architecture?)")
    return int(np.shape(state_dict[key])[0])


def _convert(source: str, arch: str, state_dict: Mapping[str, np.ndarray], expected) -> dict:
    if source == "timm":
        from mskjax.weights import timm
        return timm.convert_state_dict(state_dict, arch, expected)
    if source == "keras":
        from mskjax.weights import keras
        return keras.convert_state_dict(state_dict, arch, expected)
    from mskjax.weights import torchvision as tv
    return tv.convert_state_dict(state_dict, arch, expected)


def from_state_dict(source: str, arch: str, state_dict: Mapping[str, Any], num_classes: int | None = None,
                    in_channels: int = 3, seed: int = 0) -> dict:
    """Flat foreign state dict -> {"params", "batch_stats"} (numpy float32) for
    `create(model_arch(source, arch), num_classes, **variant_for(source, arch))`.

    `in_channels=1` sums the stem kernel over the checkpoint's input channels (its order), so a
    gray image replicated to 3 channels and the gray image through the summed kernel give the same
    output. A `num_classes` other than the checkpoint's keeps the backbone and initialises a new
    head from `seed` (fine-tuning); a checkpoint without a head (Keras `_notop`) needs `num_classes`.
    """
    from mskjax.models import create
    from mskjax.weights import torchvision as tv
    ours = model_arch(source, arch)
    fam = tv.family(ours)
    state_dict = {k: to_numpy(v) for k, v in state_dict.items()}
    ckpt_classes = checkpoint_classes(source, arch, state_dict)
    if ckpt_classes is None and num_classes is None:
        raise CheckpointMismatch(f"{source} {arch} checkpoint has no classifier: pass num_classes for a new head")
    variant = variant_for(source, arch)
    model = create(ours, num_classes=ckpt_classes or num_classes, **variant)
    expected = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)), train=False))
    head_width = expected["params"][HEAD[fam]]["kernel"].shape[0]  # features feeding the classifier
    if ckpt_classes is None:  # nothing in the file for the head: map the backbone only
        expected = {c: {k: v for k, v in tree.items() if k != HEAD[fam]} for c, tree in expected.items()}
    variables = _convert(source, arch, state_dict, expected)
    if in_channels == 1:
        k = variables["params"][STEM[fam]]["kernel"]
        variables["params"][STEM[fam]]["kernel"] = k.sum(axis=2, keepdims=True)
    elif in_channels != 3:
        raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")
    if num_classes is not None and num_classes != ckpt_classes:
        fresh = create(ours, num_classes=num_classes, **variant)
        # Initialising the head alone gives the same values as initialising the whole model (Flax
        # derives each module's RNG from its path) without tracing the backbone.
        head = fresh.init(jax.random.PRNGKey(seed), jnp.zeros((1, 1, 1, head_width)), train=False,
                          method="head")["params"][HEAD[fam]]
        variables["params"][HEAD[fam]] = jax.tree.map(np.asarray, head)
    return variables


def load(source: str, arch: str, path: str | Path, num_classes: int | None = None, in_channels: int = 3,
         seed: int = 0) -> dict:
    """Reads a foreign checkpoint file and returns {"params", "batch_stats"} for
    `mskjax.models.create(model_arch(source, arch), num_classes, **variant_for(source, arch))`."""
    return from_state_dict(source, arch, read_state_dict(source, path), num_classes, in_channels, seed)
