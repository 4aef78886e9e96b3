"""torchvision ResNet / EfficientNet state dicts -> mskjax Flax variables.

Key mapping (torchvision -> ours):
  resnet:        conv1 / bn1 -> conv1 / bn1; layer{i}.{j}.conv{k} -> layer{i}_block{j}/conv{k};
                 layer{i}.{j}.downsample.{0,1} -> .../downsample_{conv,bn}; fc -> fc
  efficientnet:  features.0.{0,1} -> stem_{conv,bn}; features.{s}.{b}.block.{n} -> stage{s}_block{b}/
                 [expand_, ] dw_, se_{reduce,expand}, project_ ; features.8.{0,1} -> top_{conv,bn};
                 classifier.1 -> classifier
Tensors: conv (O, I, kh, kw) -> (kh, kw, I, O); depthwise (C, 1, k, k) -> (k, k, 1, C);
linear (O, I) -> (I, O); BatchNorm weight/bias/running_mean/running_var -> scale/bias/mean/var.
"""
from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from mskjax.weights.mapping import Target, map_state_dict


def resnet_key(key: str, tree_has) -> Target | None:
    m = re.fullmatch(r"(conv1|bn1|fc)\.(\w+)", key)
    if m:
        return _leaf((m[1],), m[2])
    m = re.fullmatch(r"layer(\d)\.(\d+)\.(conv\d|bn\d|downsample\.0|downsample\.1)\.(\w+)", key)
    if m:
        module = {"downsample.0": "downsample_conv", "downsample.1": "downsample_bn"}.get(m[3], m[3])
        return _leaf((f"layer{m[1]}_block{m[2]}", module), m[4])
    return None


def efficientnet_key(key: str, tree_has) -> Target | None:
    m = re.fullmatch(r"features\.0\.([01])\.(\w+)", key)
    if m:
        return _leaf(("stem_conv" if m[1] == "0" else "stem_bn",), m[2])
    m = re.fullmatch(r"features\.8\.([01])\.(\w+)", key)
    if m:
        return _leaf(("top_conv" if m[1] == "0" else "top_bn",), m[2])
    m = re.fullmatch(r"classifier\.1\.(\w+)", key)
    if m:
        return _leaf(("classifier",), m[1])
    m = re.fullmatch(r"features\.(\d)\.(\d+)\.block\.(\d)\.(.+)", key)
    if m:
        block = f"stage{m[1]}_block{m[2]}"
        parts = (["expand"] if tree_has(block, "expand_conv") else []) + ["dw", "se", "project"]
        n = int(m[3])
        if n >= len(parts):
            return None
        part, rest = parts[n], m[4]
        if part == "se":
            s = re.fullmatch(r"(fc1|fc2)\.(\w+)", rest)
            return _leaf((block, "se_reduce" if s[1] == "fc1" else "se_expand"), s[2]) if s else None
        s = re.fullmatch(r"([01])\.(\w+)", rest)
        if not s:
            return None
        return _leaf((block, f"{part}_conv" if s[1] == "0" else f"{part}_bn"), s[2])
    return None


def _leaf(module: tuple[str, ...], torch_name: str) -> Target | None:
    if torch_name == "num_batches_tracked":
        return Target.IGNORE
    table = {
        "weight": ("params", "kernel_or_scale"),
        "bias": ("params", "bias"),
        "running_mean": ("batch_stats", "mean"),
        "running_var": ("batch_stats", "var"),
    }
    if torch_name not in table:
        return None
    collection, leaf = table[torch_name]
    return Target(collection, module, leaf)


KEY_MAPS = {"resnet": resnet_key, "efficientnet": efficientnet_key}


def torch_tensor_to_flax(value: np.ndarray, leaf_name: str) -> np.ndarray:
    """Re-lays a torch parameter for Flax: conv OIHW -> HWIO, linear (O, I) -> (I, O)."""
    if leaf_name == "kernel" and value.ndim == 4:
        return np.transpose(value, (2, 3, 1, 0))
    if leaf_name == "kernel" and value.ndim == 2:
        return value.T
    return value


def family(arch: str) -> str:
    if arch.startswith("resnet"):
        return "resnet"
    if arch.startswith("efficientnet_"):
        return "efficientnet"
    raise ValueError(f"no torchvision mapping for architecture {arch!r}")


def convert_state_dict(state_dict: Mapping[str, np.ndarray], arch: str, expected) -> dict:
    """Maps a torchvision state dict onto the `expected` variables tree (shapes only needed).

    Returns {"params", "batch_stats"} as numpy float32. Raises CheckpointMismatch naming every
    unexpected key, missing leaf and shape mismatch.
    """
    return map_state_dict(state_dict, KEY_MAPS[family(arch)], torch_tensor_to_flax, expected,
                          source=f"torchvision {arch}")
