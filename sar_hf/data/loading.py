"""Where the images come from: a dataset bundled with sar_hf, a `datasets` name, or a folder of images.

The bundled datasets are built offline; a `datasets` name (a Hub id or a folder of data files)
downloads only when it names the Hub; an image folder is read with `imagefolder`, one subfolder
per class. Split names are made uniform (`val` and `valid` become `validation`).
"""

import logging
import os

from .checks import check_image_folder
from .cluttered_digits import load_cluttered_digits_dataset
from .digits import load_digits_dataset

logger = logging.getLogger(__name__)

#: Datasets built offline by sar_hf, by name: (description, loader of a `DatasetDict`).
BUNDLED_DATASETS = {
    "digits": ("scikit-learn digits", load_digits_dataset),
    "cluttered-digits": ("cluttered scikit-learn digits", load_cluttered_digits_dataset),
}
_SPLIT_ALIASES = {"val": "validation", "valid": "validation"}


def load_image_dataset(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_dir: str | None = None,
    validation_dir: str | None = None,
    cache_dir: str | None = None,
    token: str | None = None,
):
    """A [`~datasets.DatasetDict`] from a bundled name, a `datasets` name, or image folders.

    Args:
        dataset_name (`str`, *optional*): a key of `BUNDLED_DATASETS` (which wins over a folder of
            that name: write `./digits` for the folder), or anything `datasets.load_dataset` reads.
        dataset_config_name (`str`, *optional*): the `datasets` configuration.
        train_dir, validation_dir (`str`, *optional*): folders of images, one subfolder per class
            (`train_dir/cat/1.png`), read into the "train" and "validation" splits. Used when
            `dataset_name` is None.
        cache_dir, token (`str`, *optional*): for `datasets.load_dataset`.

    Returns:
        `DatasetDict` with the splits under uniform names.

    Raises:
        `ValueError` when a folder holds no images, or when neither a name nor a folder is given.
    """
    from datasets import DatasetDict, load_dataset

    if dataset_name in BUNDLED_DATASETS:
        dataset = BUNDLED_DATASETS[dataset_name][1]()
    elif dataset_name is not None:
        dataset = load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir, token=token)
    elif train_dir is not None:
        check_image_folder(train_dir, "--train_dir")
        data_files = {"train": os.path.join(train_dir, "**")}
        if validation_dir is not None:
            check_image_folder(validation_dir, "--validation_dir")
            data_files["validation"] = os.path.join(validation_dir, "**")
        # drop_labels=False: one class folder still gives a label column (and a clear error later).
        dataset = load_dataset("imagefolder", data_files=data_files, cache_dir=cache_dir, drop_labels=False)
    else:
        raise ValueError("Name a dataset or a folder of images.")
    return DatasetDict({_SPLIT_ALIASES.get(name, name): split for name, split in dataset.items()})


def stratified_split(ds, test_size, label_column: str, seed: int):
    """`ds.train_test_split` stratified by the label when every class can be split, else at random."""
    try:
        return ds.train_test_split(test_size=test_size, stratify_by_column=label_column, seed=seed)
    except ValueError as error:  # a class with a single image, or a split too small for every class
        logger.warning("Cannot stratify the split by %r (%s); splitting at random.", label_column, error)
        return ds.train_test_split(test_size=test_size, seed=seed)


def stratified_subset(ds, fraction: float, label_column: str, seed: int):
    """A `fraction` of `ds`, stratified by the label when possible (all of it when `fraction == 1`)."""
    if fraction >= 1:
        return ds
    keep = max(1, round(fraction * len(ds)))
    if keep >= len(ds):
        return ds
    return stratified_split(ds, len(ds) - keep, label_column, seed)["train"]


__all__ = ["BUNDLED_DATASETS", "load_image_dataset", "stratified_split", "stratified_subset"]
