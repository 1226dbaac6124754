"""Cluttered digits: scikit-learn's digits, enlarged on a larger canvas among fragments of other digits.

It follows the cluttered MNIST of the Spatial Transformer Networks paper (Jaderberg et al., 2015,
https://arxiv.org/abs/1506.02025: 28 px digits on 60x60 canvases with 8x8 px fragments of other
digits), scaled to the bundled 8x8 digits: each digit is enlarged (bilinear) to `scale` times its
size and placed on a `canvas_size` square, at a random offset of up to `max_offset` pixels from
the centre, and `fragments` crops of `fragment_size` pixels from *other* digits of the same split
are scattered around it. Unlike the
plain digits, which fill their whole frame, the object now covers a fraction of the image, so the
dataset carries its ground truth: the ink of the placed digit, as a mask.

Everything is deterministic in `seed`. The train, validation and test canvases are built from the
digits' fixed splits ([`~sar_hf.data.load_digits_arrays`]; validation is a fixed stratified part
of the digits' train split), and clutter is cut only from digits of the same split, so no test
digit appears in training, not even as a fragment.
"""

import numpy as np

from .digits import DIGITS_SEED, digits_features, load_digits_arrays

CANVAS_SIZE = 32
SCALE = 2
# Chosen so that the `small` preset is clearly harder-pressed than on the plain digits but still learns:
# trained on 25% of the data for 50 epochs, it scores about 0.5 here against about 0.8 on the same
# digits centred without clutter (and 0.9 on the plain digits). Digits anywhere on the canvas, or
# six 6 px fragments, leave it near chance (0.2 to 0.3) at that size.
FRAGMENTS = 3
FRAGMENT_SIZE = 4
MAX_OFFSET = 2
TEST_CANVASES_PER_DIGIT = 2
VALIDATION_SIZE = 0.15
_SPLIT_STREAMS = {"train": 0, "validation": 1, "test": 2}  # one random stream per split


def enlarge(pixels: np.ndarray, scale: int) -> np.ndarray:
    """`uint8 [N, h, w]` digits -> `uint8 [N, h * scale, w * scale]`, resized bilinearly with PIL."""
    from PIL import Image

    size = (pixels.shape[2] * scale, pixels.shape[1] * scale)
    return np.stack([np.asarray(Image.fromarray(p, mode="L").resize(size, Image.BILINEAR)) for p in pixels])


def compose_canvas(
    digit: np.ndarray,
    pieces: list[np.ndarray],
    canvas_size: int,
    rng: np.random.Generator,
    max_offset: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One canvas: `digit` at a random position, each of `pieces` at a random position clear of it.

    A piece never touches the digit's box grown by one pixel, so the clutter never overlaps the
    object's mask (nor sits right against it); pieces may overlap each other (the brighter pixel wins).

    Args:
        digit (`np.ndarray` of shape `[s, s]`, `uint8`): the enlarged digit.
        pieces (list of `np.ndarray` of shape `[f, f]`, `uint8`): fragments of other digits.
        canvas_size (`int`): side of the square canvas, in pixels; at least `s + 2 * f + 1`, so that
            wherever the digit lies, one side leaves room for a piece and a pixel of gap.
        rng (`np.random.Generator`): the source of every position.
        max_offset (`int`, *optional*): the digit lies at most this many pixels from the centre along
            each axis (uniformly); anywhere on the canvas when None.

    Returns:
        `(image, mask)`: `uint8 [canvas_size, canvas_size]` pixels and `bool [canvas_size, canvas_size]`,
        True on the digit's ink (its pixels > 0).
    """
    side = digit.shape[0]
    image = np.zeros((canvas_size, canvas_size), np.uint8)
    low, high = 0, canvas_size - side
    if max_offset is not None:
        centre = high // 2
        low, high = max(low, centre - max_offset), min(high, centre + max_offset)
    top, left = rng.integers(low, high + 1, size=2)
    for piece in pieces:
        size = piece.shape[0]
        while True:  # rejection sampling: the free band around the digit is at least `size` wide
            y, x = rng.integers(0, canvas_size - size + 1, size=2)
            clear_rows = y + size < top or y > top + side
            clear_cols = x + size < left or x > left + side
            if clear_rows or clear_cols:
                break
        np.maximum(image[y : y + size, x : x + size], piece, out=image[y : y + size, x : x + size])
    image[top : top + side, left : left + side] = digit
    mask = np.zeros_like(image, dtype=bool)
    mask[top : top + side, left : left + side] = digit > 0
    return image, mask


def cut_fragment(digit: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A random `size`-pixel square crop of an enlarged digit that holds ink (the inkiest of 10 tries)."""
    best = None
    for _ in range(10):
        y, x = rng.integers(0, digit.shape[0] - size + 1, size=2)
        crop = digit[y : y + size, x : x + size]
        if best is None or crop.sum() > best.sum():
            best = crop
        if (crop > 0).mean() >= 0.25:
            break
    return best


def build_split(
    pixels: np.ndarray,
    labels: np.ndarray,
    indices: np.ndarray,
    canvases_per_digit: int,
    canvas_size: int,
    fragments: int,
    fragment_size: int,
    rng: np.random.Generator,
    max_offset: int | None = None,
) -> dict[str, list]:
    """The canvases of one split: `canvases_per_digit` for each digit of `indices`, clutter from `indices` only.

    Returns:
        `{"image": [PIL "L"], "label": [int], "mask": [PIL "L", 255 on the digit's ink], "digit": [int]}`,
        where `"digit"` is the index of the placed digit in scikit-learn's `load_digits()`.
    """
    from PIL import Image

    columns = {"image": [], "label": [], "mask": [], "digit": []}
    for _ in range(canvases_per_digit):
        for position, index in enumerate(indices):
            others = rng.choice(len(indices) - 1, size=fragments)
            others = indices[others + (others >= position)]  # any digit of the split but this one
            pieces = [cut_fragment(pixels[other], fragment_size, rng) for other in others]
            image, mask = compose_canvas(pixels[index], pieces, canvas_size, rng, max_offset)
            columns["image"].append(Image.fromarray(image, mode="L"))
            columns["mask"].append(Image.fromarray(mask.astype(np.uint8) * 255, mode="L"))
            columns["label"].append(int(labels[index]))
            columns["digit"].append(int(index))
    return columns


def load_cluttered_digits_dataset(
    seed: int = DIGITS_SEED,
    canvas_size: int = CANVAS_SIZE,
    scale: int = SCALE,
    fragments: int = FRAGMENTS,
    fragment_size: int = FRAGMENT_SIZE,
    max_offset: int | None = MAX_OFFSET,
    test_canvases_per_digit: int = TEST_CANVASES_PER_DIGIT,
    validation_size: float = VALIDATION_SIZE,
):
    """The cluttered digits as a [`~datasets.DatasetDict`] with `"train"`, `"validation"` and `"test"`.

    With the defaults: 16 px digits within 2 px of the centre of 32x32 canvases, with three 4x4 px
    fragments; 1221 train and 216 validation canvases (one per digit of the digits' train split),
    720 test canvases (two per test digit). A 32 px model with 4 px patches sees the digit on about
    4x4 of its 8x8 patches.

    Args:
        seed (`int`): seeds the validation split and every position and fragment.
        canvas_size (`int`): side of the square images, in pixels.
        scale (`int`): enlargement of the 8x8 digits.
        fragments (`int`): fragments of other digits per canvas.
        fragment_size (`int`): side of a fragment, in pixels of the enlarged digits.
        max_offset (`int`, *optional*): the digit lies at most this many pixels from the canvas's
            centre along each axis; anywhere when None.
        test_canvases_per_digit (`int`): test canvases per test digit (each with its own position and clutter).
        validation_size (`float`): fraction of the digits' train split kept for validation (stratified).

    Returns:
        `DatasetDict` with columns `"image"` (PIL mode "L"), `"label"` (classes "0".."9"), `"mask"`
        (PIL mode "L", 255 on the digit's ink, 0 elsewhere) and `"digit"` (the index of the placed
        digit in scikit-learn's `load_digits()`).
    """
    from datasets import Dataset, DatasetDict, Image, Value
    from sklearn.model_selection import train_test_split

    side = 8 * scale
    if canvas_size < side + 2 * fragment_size + 1:
        raise ValueError(
            f"canvas_size {canvas_size} leaves no room for the clutter around a {side} px digit: it must be at "
            f"least {side + 2 * fragment_size + 1}, so that wherever the digit lies, one side has room for a "
            f"{fragment_size} px fragment and a pixel of gap."
        )
    if fragment_size > side:
        raise ValueError(f"fragment_size {fragment_size} is larger than the enlarged digit ({side} px).")
    pixels, labels, train_idx, test_idx = load_digits_arrays()
    pixels = enlarge(pixels, scale)
    train_idx, validation_idx = train_test_split(
        train_idx, test_size=validation_size, stratify=labels[train_idx], random_state=seed
    )
    splits = {"train": (np.sort(train_idx), 1), "validation": (np.sort(validation_idx), 1)}
    splits["test"] = (test_idx, test_canvases_per_digit)
    features = digits_features(mask=Image(), digit=Value("int64"))
    dataset = {}
    for name, (indices, copies) in splits.items():
        rng = np.random.default_rng([seed, _SPLIT_STREAMS[name]])
        columns = build_split(pixels, labels, indices, copies, canvas_size, fragments, fragment_size, rng, max_offset)
        dataset[name] = Dataset.from_dict(columns, features=features)
    return DatasetDict(dataset)


__all__ = ["compose_canvas", "load_cluttered_digits_dataset"]
