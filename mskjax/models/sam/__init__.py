"""Segment Anything (SAM) in Flax linen, parameter-for-parameter with the official PyTorch model,
and LiteMedSAM (TinyViT encoder, 256 px input) with the same methods."""
from mskjax.models.sam.lite_medsam import (
    IMAGE_SIZE as LITE_MEDSAM_IMAGE_SIZE,
    LiteMedSam,
    LiteMedSamConfig,
    build_lite_medsam,
    init_lite_medsam_variables,
    lite_medsam_input_size,
    lite_medsam_preprocess,
    lite_medsam_transform_boxes,
    lite_medsam_variable_shapes,
)
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

LITE_MEDSAM_ARCH = "lite_medsam"  # the `arch` of a LiteMedSAM checkpoint (kind "sam")


def is_lite_medsam(model_or_arch) -> bool:
    """Whether a model (or an arch name) is LiteMedSAM, whose input is made by
    `lite_medsam_preprocess` rather than SAM's resize + mean/std."""
    arch = model_or_arch if isinstance(model_or_arch, str) else model_or_arch.config.arch
    return arch == LITE_MEDSAM_ARCH


def build_segmenter(arch: str, img_size: int = 1024):
    """The module for a SAM checkpoint's `arch` and `img_size`: `build_sam(arch, img_size)`, or
    `build_lite_medsam()` for arch "lite_medsam" (its img_size must be 256)."""
    if is_lite_medsam(arch):
        if int(img_size) != LITE_MEDSAM_IMAGE_SIZE:
            raise ValueError(f"LiteMedSAM takes {LITE_MEDSAM_IMAGE_SIZE} px inputs, got img_size {img_size}")
        return build_lite_medsam()
    return build_sam(arch, img_size)


def segmenter_variable_shapes(model) -> dict:
    """The variables' structure of a `build_segmenter` module: {"params", "buffers"} for SAM,
    plus "batch_stats" (the TinyViT encoder's BatchNorm statistics) for LiteMedSAM."""
    return lite_medsam_variable_shapes(model) if isinstance(model, LiteMedSam) else sam_variable_shapes(model)


__all__ = [
    "ARCHS", "LITE_MEDSAM_ARCH", "LITE_MEDSAM_IMAGE_SIZE", "MASK_THRESHOLD", "PIXEL_MEAN", "PIXEL_STD",
    "LiteMedSam", "LiteMedSamConfig", "Sam", "SamConfig", "build_lite_medsam", "build_sam", "build_segmenter",
    "init_lite_medsam_variables", "init_sam_variables", "is_lite_medsam", "lite_medsam_input_size",
    "lite_medsam_preprocess", "lite_medsam_transform_boxes", "lite_medsam_variable_shapes", "sam_config",
    "sam_variable_shapes", "segmenter_variable_shapes",
]
