"""Checks of an image-classification dataset, whose errors name the problem and the flag that fixes it.

A missing column, an empty folder, a single class, labels out of range or of the wrong type, an
unreadable image: each is a `ValueError` before any training, instead of a failure in its middle.
"""

import io
import logging
import os

import numpy as np

logger = logging.getLogger(__name__)

#: Suffixes that `load_dataset("imagefolder")` reads.
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")


def holds_image_files(path: str) -> bool:
    """Whether the folder `path` or one of its subfolders holds an image file (it stops at the first)."""
    return any(name.lower().endswith(IMAGE_EXTENSIONS) for _, _, files in os.walk(path) for name in files)


def check_image_folder(path: str, what: str = "--train_dir") -> None:
    """Raises a `ValueError` unless `path` is a folder holding at least one image file."""
    if not os.path.isdir(path):
        raise ValueError(f"{what} {path!r} is not a folder.")
    if not holds_image_files(path):
        raise ValueError(
            f"{what} {path!r} holds no image files ({', '.join(IMAGE_EXTENSIONS)}); expected one subfolder "
            f"per class, e.g. {os.path.join(path, 'cat', '0001.png')}."
        )


def check_columns(dataset, image_column: str, label_column: str | None = None) -> None:
    """Raises a `ValueError` listing the available columns when a split lacks the image or (if named) label column."""
    wanted = (image_column,) if label_column is None else (image_column, label_column)
    for split, ds in dataset.items():
        missing = [name for name in wanted if name not in ds.column_names]
        if missing:
            flags = {image_column: "--image_column_name", label_column: "--label_column_name"}
            hint = " and ".join(f"{flags[name]}" for name in missing)
            raise ValueError(
                f"The {split!r} split has no column {' or '.join(repr(m) for m in missing)}; its columns are "
                f"{ds.column_names}. Name the right one(s) with {hint}."
            )


def prepare_labels(dataset, label_column: str):
    """Checks the label column of every split and returns the dataset with a shared `ClassLabel`.

    A `ClassLabel` column must hold values in `[0, num_classes)` (datasets writes -1 for a missing
    label). An integer or string column is turned into a `ClassLabel` whose names are the sorted
    distinct values over all splits. Any other type (float, list, ...) is an error: a label must
    name one class.
    """
    from datasets import ClassLabel, Value

    features = {split: ds.features[label_column] for split, ds in dataset.items()}
    if all(isinstance(f, ClassLabel) for f in features.values()):
        names = next(iter(features.values())).names
        for split, ds in dataset.items():
            if features[split].names != names:
                raise ValueError(
                    f"The {split!r} split has classes {features[split].names}, other splits {names}; the class "
                    "names must agree."
                )
            values = np.asarray(ds.with_format("numpy")[label_column])
            bad = np.flatnonzero((values < 0) | (values >= len(names)))
            if bad.size:
                raise ValueError(
                    f"The {split!r} split has {bad.size} label(s) outside 0..{len(names) - 1} (the {len(names)} "
                    f"classes of its ClassLabel), e.g. {values[bad[0]]} at index {bad[0]}; -1 means a missing "
                    "label. Fix or drop these rows."
                )
        return dataset

    dtypes = {split: getattr(f, "dtype", type(f).__name__) for split, f in features.items()}
    accepted = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "string", "large_string")
    for split, feature in features.items():
        if not isinstance(feature, (Value, ClassLabel)) or (
            isinstance(feature, Value) and feature.dtype not in accepted
        ):
            raise ValueError(
                f"The label column {label_column!r} of the {split!r} split has type {dtypes[split]}; expected a "
                "ClassLabel, integers or strings (one class per image)."
            )
    values = set()
    for ds in dataset.values():
        column = ds.with_format(None)[label_column]
        if any(v is None for v in column):
            raise ValueError(f"The label column {label_column!r} has missing values (None); fix or drop these rows.")
        values.update(column)
    kinds = {type(v) for v in values}
    if len(kinds) > 1:
        raise ValueError(f"The label column {label_column!r} mixes types {sorted(k.__name__ for k in kinds)}.")
    names = [str(v) for v in sorted(values)]
    index = {name: i for i, name in enumerate(names)}
    out = type(dataset)()
    for split, ds in dataset.items():
        encoded = ds.features.copy()
        encoded[label_column] = ClassLabel(names=names)
        out[split] = ds.map(
            lambda labels: {label_column: [index[str(v)] for v in labels]},
            input_columns=label_column,  # the images are carried over, not decoded
            batched=True,
            features=encoded,
            desc=f"Encoding the {split} labels",
        )
    logger.info("Labels of %r turned into %d classes: %s", label_column, len(names), names)
    return out


def check_classes(ds, label_column: str, split: str = "train") -> None:
    """Raises a `ValueError` when `ds` is empty or holds fewer than two classes."""
    if len(ds) == 0:
        raise ValueError(f"The {split!r} split is empty.")
    feature = ds.features[label_column]
    present = np.unique(np.asarray(ds.with_format("numpy")[label_column]))
    names = getattr(feature, "names", None)
    if getattr(feature, "num_classes", len(present)) < 2 or len(present) < 2:
        found = [names[i] for i in present if i < len(names)] if names else present.tolist()
        raise ValueError(
            f"The {split!r} split has only one class ({found}); classification needs at least two. With an "
            "image folder, put each class in its own subfolder (train_dir/cat/..., train_dir/dog/...)."
        )


def find_bad_images(ds, image_column: str) -> list[tuple[int, str, str]]:
    """Decodes every image once; returns `(index, file or "index i", reason)` for those PIL cannot read.

    A truncated file fails here too: PIL's `load()` refuses truncated data unless
    `ImageFile.LOAD_TRUNCATED_IMAGES` is set.
    """
    from datasets import Image
    from PIL import Image as PILImage

    raw = ds.cast_column(image_column, Image(decode=False)).with_format(None)
    bad = []
    for index, item in enumerate(raw[image_column]):
        path = (item or {}).get("path")
        name = path or f"index {index}"
        try:
            data = item.get("bytes") if item else None
            if data is None and path is None:
                raise ValueError("no image (None)")
            with PILImage.open(io.BytesIO(data) if data is not None else path) as image:
                image.load()
        except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
            bad.append((index, name, f"{type(error).__name__}: {error}"))
    return bad


def drop_bad_images(dataset, image_column: str, skip: bool = False) -> dict[str, int]:
    """Checks every image of every split (in place on the `DatasetDict`).

    Raises a `ValueError` naming the unreadable files (or indices), or with `skip=True` drops them
    and returns the number dropped per split.
    """
    skipped = {}
    for split in list(dataset):
        bad = find_bad_images(dataset[split], image_column)
        skipped[split] = len(bad)
        if not bad:
            continue
        listing = "; ".join(f"{name} ({reason})" for _, name, reason in bad[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        if not skip:
            raise ValueError(
                f"{len(bad)} image(s) of the {split!r} split cannot be read: {listing}{more}. Fix or remove them, "
                "or pass --skip_bad_images to leave them out."
            )
        logger.warning("Skipping %d unreadable image(s) of the %r split: %s%s", len(bad), split, listing, more)
        drop = {index for index, _, _ in bad}
        dataset[split] = dataset[split].select([i for i in range(len(dataset[split])) if i not in drop])
    return skipped


__all__ = [
    "IMAGE_EXTENSIONS",
    "check_classes",
    "check_columns",
    "check_image_folder",
    "drop_bad_images",
    "find_bad_images",
    "holds_image_files",
    "prepare_labels",
]
