"""Data for EPG: embedded datasets (scikit-learn's digits and sample JPEGs), normalisation
conventions, and batched stage-1 view augmentations (epg-method.md §2)."""

from .augment import (
    CONVENTIONS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ViewAugment,
    ViewAugmentConfig,
    blur_kernel_size,
    from_unit,
    random_resized_crop,
    stage1_views,
    to_unit,
    view1_config,
    view2_config,
)
from .embedded import (
    NUM_CLASSES,
    EmbeddedDigits,
    load_digits_tensors,
    make_grid_png,
    sample_jpeg_paths,
    to_uint8,
)

__all__ = [
    "CONVENTIONS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "NUM_CLASSES",
    "EmbeddedDigits",
    "ViewAugment",
    "ViewAugmentConfig",
    "blur_kernel_size",
    "from_unit",
    "load_digits_tensors",
    "make_grid_png",
    "random_resized_crop",
    "sample_jpeg_paths",
    "stage1_views",
    "to_uint8",
    "to_unit",
    "view1_config",
    "view2_config",
]
