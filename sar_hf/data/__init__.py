"""Image-classification data for the training script, the benchmarks and `sar-hf inspect`; all offline.

* `digits`: scikit-learn's handwritten digits, with a fixed held-out test split.
* `cluttered_digits`: those digits enlarged among fragments of other digits, with object masks.
* `loading`: a bundled dataset, a `datasets` name or an image folder as a `DatasetDict`; splits.
* `checks`: what can be wrong with a dataset, as errors that name it.
* `transforms`: image processors and the per-image transform that matches them.
"""

from .checks import (
    IMAGE_EXTENSIONS,
    check_classes,
    check_columns,
    check_image_folder,
    drop_bad_images,
    find_bad_images,
    holds_image_files,
    prepare_labels,
)
from .cluttered_digits import load_cluttered_digits_dataset
from .digits import DIGITS_SEED, DIGITS_TEST_SIZE, digits_features, load_digits_arrays, load_digits_dataset
from .loading import BUNDLED_DATASETS, load_image_dataset, stratified_split, stratified_subset
from .transforms import (
    ImageTransform,
    collate_fn,
    load_image_processor,
    processor_size,
    to_rgb,
    vit_image_processor_class,
)

__all__ = [
    "BUNDLED_DATASETS",
    "DIGITS_SEED",
    "DIGITS_TEST_SIZE",
    "IMAGE_EXTENSIONS",
    "ImageTransform",
    "check_classes",
    "check_columns",
    "check_image_folder",
    "collate_fn",
    "digits_features",
    "drop_bad_images",
    "find_bad_images",
    "holds_image_files",
    "load_cluttered_digits_dataset",
    "load_digits_arrays",
    "load_digits_dataset",
    "load_image_dataset",
    "load_image_processor",
    "prepare_labels",
    "processor_size",
    "stratified_split",
    "stratified_subset",
    "to_rgb",
    "vit_image_processor_class",
]
