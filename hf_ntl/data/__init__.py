"""Data: embedded domains, loading any image-classification data set, preprocessing, subsets."""

from .domains import EMBEDDED_DOMAINS, load_embedded_domain
from .loading import (
    DatasetFormatError,
    class_names,
    load_image_classification_dataset,
    stratified_order,
    stratified_subset,
)
from .transforms import (
    DiffusionImages,
    ImageClassificationCollator,
    ImagePreprocessor,
    augment_batch,
    check_diffusion_images,
    encode_diffusion_images,
    encode_diffusion_split,
    light_augment,
)

__all__ = [
    "EMBEDDED_DOMAINS",
    "DatasetFormatError",
    "DiffusionImages",
    "ImageClassificationCollator",
    "ImagePreprocessor",
    "augment_batch",
    "check_diffusion_images",
    "class_names",
    "encode_diffusion_images",
    "encode_diffusion_split",
    "light_augment",
    "load_embedded_domain",
    "load_image_classification_dataset",
    "stratified_order",
    "stratified_subset",
]
