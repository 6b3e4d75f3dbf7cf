"""Data for EPG: embedded datasets (scikit-learn's digits and sample JPEGs), normalisation
conventions, batched stage-1 view augmentations (epg-method.md §2), image folders (index,
``epg prepare``) and their loaders (portable Pillow one; DALI, imported only when built)."""

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
from .dali import DaliLoader, dali_available
from .embedded import (
    NUM_CLASSES,
    EmbeddedDigits,
    load_digits_tensors,
    make_grid_png,
    sample_jpeg_paths,
    to_uint8,
)
from .folder import IMAGE_EXTENSIONS, BadImageError, BatchSchedule, FolderIndex, ImageSizeError
from .portable import PortableLoader
from .prepare import PrepareReport, center_crop_arr, prepare

__all__ = [
    "CONVENTIONS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "NUM_CLASSES",
    "BadImageError",
    "BatchSchedule",
    "DaliLoader",
    "EmbeddedDigits",
    "FolderIndex",
    "ImageSizeError",
    "PortableLoader",
    "PrepareReport",
    "ViewAugment",
    "ViewAugmentConfig",
    "blur_kernel_size",
    "center_crop_arr",
    "dali_available",
    "from_unit",
    "load_digits_tensors",
    "make_grid_png",
    "prepare",
    "random_resized_crop",
    "sample_jpeg_paths",
    "stage1_views",
    "to_uint8",
    "to_unit",
    "view1_config",
    "view2_config",
]
