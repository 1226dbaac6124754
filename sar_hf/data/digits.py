"""scikit-learn's handwritten digits as an image dataset, with a fixed held-out test split; nothing is downloaded."""

import numpy as np

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


__all__ = ["DIGITS_SEED", "DIGITS_TEST_SIZE", "digits_features", "load_digits_arrays", "load_digits_dataset"]
