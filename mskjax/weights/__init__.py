"""Imports of foreign checkpoints into mskjax variables.

`load(source, arch, path, num_classes=None, in_channels=3)` -> {"params", "batch_stats"} for
`mskjax.models.create(arch, num_classes, **variant_for(source, arch))`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mskjax.weights.mapping import CheckpointMismatch, to_numpy

__all__ = ["CheckpointMismatch", "from_state_dict", "load", "variant_for", "checkpoint_classes", "read_torch_state_dict"]

SOURCES = ("torchvision",)

HEAD = {"resnet": "fc", "efficientnet": "classifier"}
STEM = {"resnet": "conv1", "efficientnet": "stem_conv"}

# What each source's models expect as input: [0, 1] RGB, then this mean/std.
IMAGENET_NORMALIZATION = {"input_range": [0.0, 1.0], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def variant_for(source: str, arch: str) -> dict[str, Any]:
    """Variant settings a checkpoint from `source` needs for `arch` (padding, BatchNorm)."""
    from mskjax.models import default_variant
    if source == "torchvision":
        return default_variant(arch)
    raise ValueError(f"unknown checkpoint source {source!r}: expected one of {list(SOURCES)}")


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


def checkpoint_classes(source: str, arch: str, state_dict: Mapping[str, Any]) -> int:
    """Number of logits of the checkpoint's classifier."""
    from mskjax.weights import torchvision as tv
    key = "fc.weight" if tv.family(arch) == "resnet" else "classifier.1.weight"
    if key not in state_dict:
        raise CheckpointMismatch(f"{source} {arch} checkpoint has no {key}: cannot tell its number of classes "
                                 "(is it the right architecture?)")
    return int(np.shape(state_dict[key])[0])


def from_state_dict(source: str, arch: str, state_dict: Mapping[str, Any], num_classes: int | None = None,
                    in_channels: int = 3, seed: int = 0) -> dict:
    """Flat foreign state dict -> {"params", "batch_stats"} (numpy float32).

    `in_channels=1` sums the stem kernel over the checkpoint's input channels (its order), so a
    gray image replicated to 3 channels and the gray image through the summed kernel give the same
    output. A `num_classes` other than the checkpoint's keeps the backbone and initialises a new
    head from `seed` (fine-tuning).
    """
    from mskjax.models import create
    from mskjax.weights import torchvision as tv
    if source != "torchvision":
        raise ValueError(f"unknown checkpoint source {source!r}: expected one of {list(SOURCES)}")
    fam = tv.family(arch)
    state_dict = {k: to_numpy(v) for k, v in state_dict.items()}
    ckpt_classes = checkpoint_classes(source, arch, state_dict)
    variant = variant_for(source, arch)
    model = create(arch, num_classes=ckpt_classes, **variant)
    expected = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)), train=False))
    variables = tv.convert_state_dict(state_dict, arch, expected)
    if in_channels == 1:
        k = variables["params"][STEM[fam]]["kernel"]
        variables["params"][STEM[fam]]["kernel"] = k.sum(axis=2, keepdims=True)
    elif in_channels != 3:
        raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")
    if num_classes is not None and num_classes != ckpt_classes:
        fresh = create(arch, num_classes=num_classes, **variant)
        head = jax.jit(lambda k: fresh.init(k, jnp.zeros((1, 32, 32, in_channels)), train=False))(
            jax.random.PRNGKey(seed))["params"][HEAD[fam]]
        variables["params"][HEAD[fam]] = jax.tree.map(np.asarray, head)
    return variables


def load(source: str, arch: str, path: str | Path, num_classes: int | None = None, in_channels: int = 3,
         seed: int = 0) -> dict:
    """Reads a foreign checkpoint file and returns {"params", "batch_stats"} for
    `mskjax.models.create(arch, num_classes, **variant_for(source, arch))`."""
    return from_state_dict(source, arch, read_torch_state_dict(path), num_classes, in_channels, seed)
