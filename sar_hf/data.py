"""Image-classification data for the examples and benchmarks: the bundled digits, checks, transforms.

Everything here runs offline. `load_digits_dataset` builds a real dataset (scikit-learn's
handwritten digits) with a fixed held-out test split; the `check_*` helpers turn the usual ways a
dataset can be wrong (a missing column, an empty folder, a single class, bad labels, an unreadable
image) into a `ValueError` that names the problem; the transforms convert, resize and normalise with PIL and
torch alone (torchvision does not install beside every torch build), as the image processors do.
The training recipe's augmentations on batches are in `sar_hf.augmentation`.
"""

import inspect
import io
import logging
import math
import os

import numpy as np
import torch

logger = logging.getLogger(__name__)

#: Suffixes that `load_dataset("imagefolder")` reads.
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")

DIGITS_TEST_SIZE = 0.2
DIGITS_SEED = 0


def load_digits_arrays(test_size: float = DIGITS_TEST_SIZE, seed: int = DIGITS_SEED):
    """scikit-learn's handwritten digits as arrays, with the fixed stratified train/test split.

    Returns:
        `(pixels, labels, train_indices, test_indices)`: `uint8 [1797, 8, 8]` (values 0..16 scaled to
        0..255), `int64 [1797]`, and the sorted indices of each split (defaults: 20% test, seed 0, i.e.
        1437 train / 360 test).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=test_size, stratify=labels, random_state=seed
    )
    return pixels, labels, np.sort(train_idx), np.sort(test_idx)


def digits_features(**extra):
    """The `Features` of the bundled digit datasets: `"image"`, `"label"` (classes "0".."9") and `extra`."""
    from datasets import ClassLabel, Features, Image

    return Features({"image": Image(), "label": ClassLabel(names=[str(i) for i in range(10)]), **extra})


def load_digits_dataset(test_size: float = DIGITS_TEST_SIZE, seed: int = DIGITS_SEED):
    """scikit-learn's handwritten digits as a [`~datasets.DatasetDict`] with `"train"` and `"test"`.

    1797 grayscale images of 8x8 pixels (values 0..16 scaled to 0..255), 10 classes, bundled with
    scikit-learn, so nothing is downloaded. The test split is stratified and fixed by `seed`
    (defaults: 20%, seed 0, i.e. 1437 train / 360 test), so that every run and benchmark scores on
    the same held-out images ([`load_digits_arrays`]).

    Returns:
        `DatasetDict` with columns `"image"` ([`~datasets.Image`], PIL mode "L") and `"label"`
        ([`~datasets.ClassLabel`] with names "0".."9").
    """
    from datasets import Dataset, DatasetDict
    from PIL import Image as PILImage

    pixels, labels, train_idx, test_idx = load_digits_arrays(test_size, seed)

    def build(indices):
        images = [PILImage.fromarray(pixels[i], mode="L") for i in indices]
        return Dataset.from_dict({"image": images, "label": labels[indices].tolist()}, features=digits_features())

    return DatasetDict({"train": build(train_idx), "test": build(test_idx)})


# ---------------------------------------------------------------------------------------------
# Checks with errors that name the problem


def check_image_folder(path: str, what: str = "--train_dir") -> None:
    """Raises a `ValueError` unless `path` is a folder holding at least one image file."""
    if not os.path.isdir(path):
        raise ValueError(f"{what} {path!r} is not a folder.")
    for _, _, files in os.walk(path):
        if any(name.lower().endswith(IMAGE_EXTENSIONS) for name in files):
            return
    raise ValueError(
        f"{what} {path!r} holds no image files ({', '.join(IMAGE_EXTENSIONS)}); expected one subfolder "
        f"per class, e.g. {os.path.join(path, 'cat', '0001.png')}."
    )


def check_columns(dataset, image_column: str, label_column: str) -> None:
    """Raises a `ValueError` listing the available columns when a split lacks the image or label column."""
    for split, ds in dataset.items():
        missing = [name for name in (image_column, label_column) if name not in ds.column_names]
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
        found = [names[i] for i in present] if names else present.tolist()
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


# ---------------------------------------------------------------------------------------------
# Transforms (PIL + torch; no torchvision)


def load_image_processor(name_or_path: str, **kwargs):
    """`AutoImageProcessor.from_pretrained`, or `ViTImageProcessor` where the Auto class needs torchvision.

    Some transformers releases (5.9, for one) refuse `AutoImageProcessor` without torchvision,
    which does not install beside every torch build; ViT-family processors load as ViT's.
    """
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(name_or_path, **kwargs)
    except ImportError:
        return vit_image_processor_class().from_pretrained(name_or_path, **kwargs)


def vit_image_processor_class():
    """ViT's image processor class for this install: the torchvision one, else the PIL one."""
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        from transformers import ViTImageProcessor

        return ViTImageProcessor
    from transformers import ViTImageProcessorPil  # the same processor without torchvision

    return ViTImageProcessorPil


def processor_size(image_processor) -> tuple[int, int]:
    """`(height, width)` that an image processor produces: its crop size if it crops, else its size."""

    def read(size):
        if size is None:
            return None
        get = size.get if isinstance(size, dict) else lambda key: getattr(size, key, None)
        if get("height") and get("width"):
            return int(get("height")), int(get("width"))
        if get("shortest_edge"):
            return int(get("shortest_edge")), int(get("shortest_edge"))
        return None

    cropped = (
        read(getattr(image_processor, "crop_size", None))
        if getattr(image_processor, "do_center_crop", False)
        else None
    )
    size = cropped or read(getattr(image_processor, "size", None))
    if size is None:
        raise ValueError(
            f"Cannot tell the output size of {type(image_processor).__name__} (size={image_processor.size})."
        )
    return size


def to_rgb(image):
    """A PIL image of any mode (L, P, RGBA, ...) as RGB, converted as Transformers' image processors convert it.

    That is `transformers.image_transforms.convert_to_rgb`, which the processors run with
    `do_convert_rgb=True`: newer Transformers releases composite transparency onto white, older
    ones (5.9) drop the alpha channel. Training converts as the saved processor does at inference.
    """
    from PIL import Image as PILImage
    from transformers.image_transforms import convert_to_rgb

    if "return_numpy" in inspect.signature(convert_to_rgb).parameters:  # the compositing releases
        return PILImage.fromarray(convert_to_rgb(image, return_numpy=True))
    return convert_to_rgb(image)


class ImageTransform:
    """PIL image -> normalised `[3, H, W]` float tensor, with optional training augmentation.

    Every image is first converted to RGB as the image processors do ([`to_rgb`]). Without
    augmentation the whole image is resized to `size` (as `ViTImageProcessor` does). Training takes
    a random crop covering `crop_scale` of the area with an aspect ratio in [3/4, 4/3] (a mild
    `RandomResizedCrop`), resizes it to `size`, and flips it horizontally with probability 0.5 when
    `hflip`. Random numbers come from torch's global generator, which Trainer seeds, restores on
    resume and seeds per dataloader worker.

    Args:
        size (`tuple[int, int]`): output `(height, width)`.
        image_mean, image_std (`sequence of 3 floats`): per-channel normalisation, on `[0, 1]` pixels.
        augment (`bool`, *optional*, defaults to `False`): random crops (and flips).
        hflip (`bool`, *optional*, defaults to `False`): random horizontal flips when augmenting.
        crop_scale (`tuple[float, float]`, *optional*, defaults to `(0.7, 1.0)`): area range of the crops.
        resample (`int`, *optional*): PIL's filter for the resize, e.g. the image processor's
            `resample`; defaults to bilinear.
    """

    def __init__(self, size, image_mean, image_std, augment=False, hflip=False, crop_scale=(0.7, 1.0), resample=None):
        self.size = tuple(size)
        mean = [float(m) for m in image_mean] if np.ndim(image_mean) else [float(image_mean)] * 3
        std = [float(s) for s in image_std] if np.ndim(image_std) else [float(image_std)] * 3
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)
        self.augment = augment
        self.hflip = hflip
        self.crop_scale = crop_scale
        self.resample = 2 if resample is None else int(resample)  # PIL.Image.Resampling.BILINEAR

    def _crop_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        area = width * height
        low, high = self.crop_scale
        for _ in range(10):
            target = area * (low + (high - low) * torch.rand(()).item())
            log_ratio = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * torch.rand(()).item()
            ratio = math.exp(log_ratio)
            w, h = math.sqrt(target * ratio), math.sqrt(target / ratio)
            if w <= width and h <= height:
                left = (width - w) * torch.rand(()).item()
                top = (height - h) * torch.rand(()).item()
                return left, top, left + w, top + h
        return 0.0, 0.0, float(width), float(height)

    def pixels(self, image) -> torch.Tensor:
        """The RGB image, cropped, flipped and resized, as a `[3, H, W]` float tensor in `[0, 1]`."""
        from PIL import Image as PILImage

        image = to_rgb(image)
        height, width = self.size
        if self.augment:
            box = self._crop_box(*image.size)
            image = image.resize((width, height), self.resample, box=box)
            if self.hflip and torch.rand(()).item() < 0.5:
                image = image.transpose(PILImage.Transpose.FLIP_LEFT_RIGHT)
        elif image.size != (width, height):
            image = image.resize((width, height), self.resample)
        return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)  # 'h w c -> c h w'

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """`[..., 3, H, W]` pixels in `[0, 1]` -> normalised with the per-channel mean and std."""
        return (pixels - self.mean) / self.std

    def __call__(self, image) -> torch.Tensor:
        return self.normalize(self.pixels(image))


def collate_fn(examples) -> dict[str, torch.Tensor]:
    """Stacks `pixel_values` and `labels` of the transformed examples into a batch."""
    return {
        "pixel_values": torch.stack([example["pixel_values"] for example in examples]),
        "labels": torch.tensor([example["labels"] for example in examples], dtype=torch.long),
    }


__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageTransform",
    "check_classes",
    "check_columns",
    "check_image_folder",
    "collate_fn",
    "drop_bad_images",
    "find_bad_images",
    "digits_features",
    "load_digits_arrays",
    "load_digits_dataset",
    "load_image_processor",
    "prepare_labels",
    "processor_size",
    "stratified_split",
    "stratified_subset",
    "to_rgb",
    "vit_image_processor_class",
]
