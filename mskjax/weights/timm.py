"""timm ResNet / EfficientNet state dicts -> mskjax Flax variables.

Supported timm names (an optional pretrained tag after a dot, e.g. "tf_efficientnet_b3.ap_in1k"):
  resnet18/34/50/101/152          -> our "resnet<d>"        (same module names as torchvision)
  efficientnet_b0..b7             -> our "efficientnet_b<n>", symmetric padding, BatchNorm eps 1e-5
  tf_efficientnet_b0..b7          -> our "efficientnet_b<n>", TF 'SAME' padding, BatchNorm eps 1e-3
(BatchNorm momentum is torch's 0.1 in all of them, as timm builds them.)

Key mapping (timm -> ours), EfficientNet:
  conv_stem / bn1 -> stem_conv / stem_bn;  conv_head / bn2 -> top_conv / top_bn;  classifier -> classifier
  blocks.{s}.{b} -> stage{s+1}_block{b}, where
    depthwise-separable block (no expansion): conv_dw, bn1, se.*, conv_pw, bn2
        -> dw_conv, dw_bn, se_*, project_conv, project_bn
    inverted-residual block: conv_pw, bn1, conv_dw, bn2, se.*, conv_pwl, bn3
        -> expand_conv, expand_bn, dw_conv, dw_bn, se_*, project_conv, project_bn
  se.conv_reduce / se.conv_expand -> se_reduce / se_expand
Tensors are re-laid out as for torchvision (conv OIHW -> HWIO, depthwise (C, 1, k, k) -> (k, k, 1, C),
linear (O, I) -> (I, O)).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

import numpy as np

from mskjax.classifier import IMAGENET_MEAN, IMAGENET_STD
from mskjax.weights.mapping import CheckpointMismatch, Target, map_state_dict, read_torch_state_dict, to_numpy
from mskjax.weights.torchvision import _leaf, resnet_key, torch_tensor_to_flax

_NAME = re.compile(r"(resnet(?:18|34|50|101|152)|(tf_)?efficientnet_(b[0-7]))(?:\.(\w+))?")

# timm's pretrained_cfg mean/std of each name's default tag (timm 1.0.31); used only when timm is not
# installed. tests/parity/test_timm.py checks this table against timm.
_IMAGENET = (IMAGENET_MEAN, IMAGENET_STD)
_INCEPTION = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
DEFAULT_TAG_MEAN_STD = {
    **{f"resnet{d}": _IMAGENET for d in (18, 34, 50, 101, 152)},
    **{f"efficientnet_b{i}": _IMAGENET for i in range(8)},
    "efficientnet_b1": _INCEPTION,  # default tag ra4_e3600_r240_in1k
    **{f"tf_efficientnet_b{i}": _IMAGENET for i in range(8)},
}


def parse_name(name: str) -> tuple[str, str | None]:
    """"tf_efficientnet_b3.ap_in1k" -> ("tf_efficientnet_b3", "ap_in1k"). Unknown names raise ValueError."""
    m = _NAME.fullmatch(name)
    if not m:
        raise ValueError(f"unsupported timm model {name!r}: expected resnet18/34/50/101/152, efficientnet_b0..b7 "
                         "or tf_efficientnet_b0..b7, optionally with a pretrained tag ('.ra2_in1k')")
    return (m[1], m[4])


def arch_for(name: str) -> str:
    """Our architecture name for a timm model name: "tf_efficientnet_b3" -> "efficientnet_b3"."""
    base, _ = parse_name(name)
    return base[len("tf_"):] if base.startswith("tf_") else base


def variant(name: str) -> dict:
    """Variant settings that reproduce timm's model `name` (padding, BatchNorm epsilon and momentum)."""
    base, _ = parse_name(name)
    if base.startswith("tf_"):
        return {"padding": "same", "bn_epsilon": 1e-3, "bn_momentum": 0.1}
    return {"padding": "symmetric", "bn_epsilon": 1e-5, "bn_momentum": 0.1}


def normalization(name: str) -> dict:
    """{"input_range": [0, 1], "mean", "std"} from timm's pretrained config for `name` (its tag, or the
    default tag). Uses timm when installed (authoritative for every tag); otherwise the pinned table of
    default tags, and a tagged name raises ValueError."""
    base, tag = parse_name(name)
    try:
        from timm.models import get_pretrained_cfg  # optional: authoritative where installed
    except ImportError:
        if tag is not None:
            raise ValueError(f"the normalisation of timm {name!r} needs timm installed (only default tags are pinned)")
        mean, std = DEFAULT_TAG_MEAN_STD[base]
    else:
        cfg = get_pretrained_cfg(name)
        if cfg is None:
            raise ValueError(f"timm has no pretrained config for {name!r}")
        mean, std = cfg.mean, cfg.std
    return {"input_range": [0.0, 1.0], "mean": [float(v) for v in mean], "std": [float(v) for v in std]}


def head_key(name: str) -> str:
    """The state-dict key of the classifier weight (its first dimension is the number of classes)."""
    return "fc.weight" if arch_for(name).startswith("resnet") else "classifier.weight"


def efficientnet_key(key: str, tree_has) -> Target | None:
    simple = {"conv_stem": "stem_conv", "bn1": "stem_bn", "conv_head": "top_conv", "bn2": "top_bn",
              "classifier": "classifier"}
    m = re.fullmatch(r"(conv_stem|bn1|conv_head|bn2|classifier)\.(\w+)", key)
    if m:
        return _leaf((simple[m[1]],), m[2])
    m = re.fullmatch(r"blocks\.(\d)\.(\d+)\.(.+)\.(\w+)", key)
    if not m:
        return None
    block = f"stage{int(m[1]) + 1}_block{m[2]}"
    inverted = tree_has(block, "expand_conv")
    names = ({"conv_pw": "expand_conv", "bn1": "expand_bn", "conv_dw": "dw_conv", "bn2": "dw_bn",
              "conv_pwl": "project_conv", "bn3": "project_bn"} if inverted else
             {"conv_dw": "dw_conv", "bn1": "dw_bn", "conv_pw": "project_conv", "bn2": "project_bn"})
    names.update({"se.conv_reduce": "se_reduce", "se.conv_expand": "se_expand"})
    if m[3] not in names:
        return None
    return _leaf((block, names[m[3]]), m[4])


def convert_state_dict(state_dict: Mapping[str, np.ndarray], name: str, expected) -> dict:
    """Maps a timm state dict onto the `expected` variables tree of `arch_for(name)`.

    Returns {"params", "batch_stats"} as numpy float32; raises CheckpointMismatch naming every
    unexpected key, missing leaf and shape mismatch."""
    key_map = resnet_key if arch_for(name).startswith("resnet") else efficientnet_key
    return map_state_dict(state_dict, key_map, torch_tensor_to_flax, expected, source=f"timm {name}")


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """A timm checkpoint file -> flat {key: float32 numpy}: `.safetensors` (as timm publishes on the
    Hugging Face hub) or a PyTorch `.pth` / `.bin` (bare or under "state_dict" / "model")."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return read_torch_state_dict(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    from safetensors.numpy import load_file  # optional: comes with timm / huggingface_hub
    try:
        raw = load_file(str(path))
    except Exception as e:  # safetensors raises its own error type for damaged headers
        raise CheckpointMismatch(f"cannot read {path} as a safetensors file: {type(e).__name__}: {e}") from e
    return {k: to_numpy(v) for k, v in raw.items()}
