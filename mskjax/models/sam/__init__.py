"""Segment Anything (SAM) in Flax linen, parameter-for-parameter with the official PyTorch model."""
from mskjax.models.sam.sam import (
    ARCHS,
    MASK_THRESHOLD,
    PIXEL_MEAN,
    PIXEL_STD,
    Sam,
    SamConfig,
    build_sam,
    init_sam_variables,
    sam_config,
    sam_variable_shapes,
)

__all__ = [
    "ARCHS", "MASK_THRESHOLD", "PIXEL_MEAN", "PIXEL_STD", "Sam", "SamConfig", "build_sam",
    "init_sam_variables", "sam_config", "sam_variable_shapes",
]
