"""The classifier's input contract: what a checkpoint's metadata says about its input, and the one
place that turns images into model input and logits into probabilities.

Everything that runs a classifier (the trainer, the pipeline, `mskjax.localize`, tools) goes
through these functions, so a checkpoint's normalization means the same thing everywhere.

Images enter as (B, H, W, 1 | C) float in [0, 1] (the loader's and the pipeline's host output);
"normalization" metadata is {"input_range": [0, 1], "mean": [...], "std": [...], "per_image"?: bool}.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# One set of ImageNet statistics (RGB, inputs in [0, 1]) for every import and every model.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_NORMALIZATION = {"input_range": [0.0, 1.0], "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}

NORMALIZATIONS = ("none", "imagenet", "per_image")
PER_IMAGE_MIN_STD = 1e-3  # a blank (or padding) image stays blank instead of dividing by ~0


def normalization(name: str, channels: int) -> dict[str, Any]:
    """A training config's `data.normalization` ("none" | "imagenet" | "per_image") for a model with
    `channels` input channels -> the checkpoint's "normalization" metadata."""
    if name == "imagenet":
        mean, std = list(IMAGENET_MEAN), list(IMAGENET_STD)
        if channels == 1:  # a one-channel stem summed from RGB sees the gray value on every channel
            mean, std = [float(np.mean(mean))], [float(np.mean(std))]
        return {"input_range": [0.0, 1.0], "mean": mean, "std": std}
    if name == "per_image":
        return {"input_range": [0.0, 1.0], "mean": [0.0] * channels, "std": [1.0] * channels, "per_image": True}
    if name == "none":
        return {"input_range": [0.0, 1.0], "mean": [0.0] * channels, "std": [1.0] * channels}
    raise ValueError(f"unknown normalization {name!r}: expected one of {list(NORMALIZATIONS)}")


def normalization_from_metadata(norm: dict) -> dict[str, Any]:
    """A checkpoint's "normalization" metadata -> the `norm` argument of prepare_images (defaults:
    mean 0, std 1, no per-image standardisation). input_range is the caller's to check."""
    return {"mean": norm.get("mean", [0.0]), "std": norm.get("std", [1.0]),
            "per_image": bool(norm.get("per_image", False))}


def prepare_images(images: jax.Array, norm: dict, channels: int) -> jax.Array:
    """(B, H, W, 1|C) in [0, 1] -> model input (B, H, W, channels) float32, normalised.

    norm["per_image"] (optional, default False): first standardise each image to zero mean and unit
    standard deviation over all its pixels and channels (std floored at PER_IMAGE_MIN_STD), which
    takes exposure, gamma and contrast differences between radiographs off the model's hands; then
    (x - mean) / std with the checkpoint's mean and std."""
    if images.shape[-1] == 1 and channels == 3:
        images = jnp.repeat(images, 3, axis=-1)
    if norm.get("per_image", False):
        images = images.astype(jnp.float32)
        m = jnp.mean(images, axis=(1, 2, 3), keepdims=True)
        s = jnp.std(images, axis=(1, 2, 3), keepdims=True)
        images = (images - m) / jnp.maximum(s, PER_IMAGE_MIN_STD)
    mean = jnp.asarray(norm["mean"], jnp.float32)
    std = jnp.asarray(norm["std"], jnp.float32)
    return (images - mean) / std


def abnormal_class(num_classes: int) -> int:
    """Index of the abnormal logit: 0 for a single-logit head (sigmoid), else class 1."""
    return 0 if num_classes == 1 else 1


def probabilities(logits: jax.Array) -> jax.Array:
    """(B, K) logits -> (B,) probability of abnormal (sigmoid of one logit, else softmax class 1)."""
    if logits.shape[-1] == 1:
        return jax.nn.sigmoid(logits[:, 0])
    return jax.nn.softmax(logits, axis=-1)[:, 1]


class GrayAsRGB:
    """Presents a classifier that takes C != 3 channels to `mskjax.cam`, which takes (B, H, W, 3)
    inputs: it feeds the model the first C channels (the gray image is repeated, so nothing is lost).
    Duck-typed: cam only uses `apply`, `segments` and `num_classes`."""

    def __init__(self, model, channels: int):
        self.model, self.channels = model, channels
        self.segments = model.segments
        self.num_classes = model.num_classes

    def apply(self, variables, x, *args, method=None, **kwargs):
        if method in (None, "features"):
            x = x[..., :self.channels]
        return self.model.apply(variables, x, *args, method=method, **kwargs)
