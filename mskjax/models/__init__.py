"""Classifier backbones (ResNet, EfficientNet) and, under `mskjax.models.sam`, Segment Anything."""
from mskjax.models.registry import ARCHITECTURES, create, default_variant, native_resolution

__all__ = ["ARCHITECTURES", "create", "default_variant", "native_resolution"]
