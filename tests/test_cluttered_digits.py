"""The cluttered digits: deterministic, split-clean, masks on the ink, clutter off the mask."""

import math

import numpy as np
import pytest

from sar_hf.data import load_digits_arrays
from sar_hf.data.cluttered_digits import build_split, compose_canvas, enlarge, load_cluttered_digits_dataset


@pytest.fixture(scope="module")
def dataset():
    return load_cluttered_digits_dataset()


def arrays(split, column, count=None):
    rows = split if count is None else split.select(range(count))
    return np.stack([np.asarray(image) for image in rows[column]])


def test_the_same_seed_builds_the_same_canvases_and_another_seed_others(dataset):
    again = load_cluttered_digits_dataset()
    for name in ("train", "validation", "test"):
        np.testing.assert_array_equal(arrays(dataset[name], "image"), arrays(again[name], "image"))
        np.testing.assert_array_equal(arrays(dataset[name], "mask"), arrays(again[name], "mask"))
        assert dataset[name]["label"] == again[name]["label"]
    other = load_cluttered_digits_dataset(seed=1)
    assert not np.array_equal(arrays(dataset["test"], "image", 20), arrays(other["test"], "image", 20))


def test_splits_come_from_the_digits_own_splits(dataset):
    pixels, labels, train_idx, test_idx = load_digits_arrays()
    train, validation, test = (set(dataset[name]["digit"]) for name in ("train", "validation", "test"))
    assert train | validation == set(train_idx.tolist()) and not train & validation
    assert test == set(test_idx.tolist())
    assert len(dataset["test"]) == 2 * len(test_idx)  # two canvases per test digit
    for name in ("train", "validation", "test"):
        digits = np.asarray(dataset[name]["digit"])
        np.testing.assert_array_equal(np.asarray(dataset[name]["label"]), labels[digits])


def test_the_splits_have_the_documented_sizes_classes_and_a_stratified_validation_split(dataset):
    """1221 train and 216 validation canvases (15% of the digits' 1437 train digits, each class kept in its
    share), 720 test canvases (two per test digit); images and masks are pictures, labels the classes "0".."9"."""
    from datasets import ClassLabel, Features, Image, Value

    _, labels, train_idx, _ = load_digits_arrays()
    assert {name: len(split) for name, split in dataset.items()} == {"train": 1221, "validation": 216, "test": 720}
    validation = np.bincount(dataset["validation"]["label"], minlength=10)
    assert validation.sum() == math.ceil(0.15 * len(train_idx))
    assert (np.abs(validation - 0.15 * np.bincount(labels[train_idx], minlength=10)) < 1).all(), validation
    expected = Features(
        {"image": Image(), "label": ClassLabel(names=list("0123456789")), "mask": Image(), "digit": Value("int64")}
    )
    for split in dataset.values():
        assert split.features == expected


def test_each_canvas_holds_scikit_learns_digit_upright_with_its_label(dataset):
    """The placed digit (`digit` indexes scikit-learn's `load_digits()`) is that digit as scikit-learn draws it,
    scaled to 0..255 and enlarged bilinearly to 16 px, not mirrored nor transposed, near the centre."""
    from PIL import Image
    from sklearn.datasets import load_digits

    reference = load_digits()
    for name in ("train", "validation", "test"):
        split = dataset[name].select(range(10))
        for image, index, label in zip(arrays(split, "image"), split["digit"], split["label"], strict=True):
            assert label == reference.target[index]
            digit = Image.fromarray(np.rint(reference.images[index] * (255 / 16)).astype(np.uint8))
            enlarged = np.asarray(digit.resize((16, 16), Image.BILINEAR))
            offsets = range(8 - 2, 8 + 2 + 1)  # the centre of a 32 px canvas, give or take MAX_OFFSET
            found = any(np.array_equal(image[y : y + 16, x : x + 16], enlarged) for y in offsets for x in offsets)
            assert found, f"the {name} canvas of digit {index} does not hold it upright"


def test_masks_are_the_ink_of_the_placed_digit_and_nothing_else_touches_its_box(dataset):
    """For each canvas, the enlarged digit is found at a position near the centre where the image equals it
    pixel for pixel; the mask is that digit's ink (> 0) there and False everywhere else; and the
    ring of one pixel around the digit's box is empty (the clutter keeps clear)."""
    pixels = enlarge(load_digits_arrays()[0], 2)
    split = dataset["test"].select(range(40))
    images, masks = arrays(split, "image"), arrays(split, "mask") > 0
    for image, mask, index in zip(images, masks, split["digit"], strict=True):
        digit = pixels[index]
        side, size = digit.shape[0], image.shape[0]
        found = [
            (y, x) for y in range(size - side + 1) for x in range(size - side + 1)
            if np.array_equal(image[y : y + side, x : x + side], digit)
            and np.array_equal(mask[y : y + side, x : x + side], digit > 0)
            and mask.sum() == (digit > 0).sum()
        ]  # fmt: skip
        assert len(found) >= 1, index
        y, x = found[0]
        assert abs(y - 8) <= 2 and abs(x - 8) <= 2  # within MAX_OFFSET of the centre
        ring = np.zeros_like(mask)
        ring[max(y - 1, 0) : y + side + 1, max(x - 1, 0) : x + side + 1] = True
        ring[y : y + side, x : x + side] = False
        assert not image[ring].any()
        assert image[~mask].any()  # there is clutter


def test_the_clutter_never_overlaps_the_mask_and_comes_from_other_digits_of_the_split():
    """Digits of constant, distinct values show where every clutter pixel came from: the canvas of
    digit i holds the value i+1 only on its mask, and elsewhere only values of the split's other digits,
    each of which (the first and the last too) is cut for clutter somewhere."""
    count = 30
    pixels = np.stack([np.full((16, 16), i + 1, np.uint8) for i in range(count)])
    pixels[:, :, :3] = 0  # some background in every digit, so the mask is not the whole box
    indices = np.arange(0, count, 2)  # the split: even digits; the odd ones must never show up
    rng = np.random.default_rng(0)
    columns = build_split(pixels, np.zeros(count, np.int64), indices, 3, 40, 8, 6, rng)
    everywhere = set()
    for image, mask, index in zip(columns["image"], columns["mask"], columns["digit"], strict=True):
        image, mask = np.asarray(image), np.asarray(mask) > 0
        assert (image[mask] == index + 1).all() and mask.sum() == (pixels[index] > 0).sum()
        clutter = set(np.unique(image[~mask]).tolist()) - {0}
        assert clutter and clutter <= {i + 1 for i in indices if i != index}
        everywhere |= clutter
    assert everywhere == {i + 1 for i in indices}


def test_on_the_tightest_canvas_every_piece_lands_whole_and_clear_of_the_digit():
    """The smallest canvas the loader admits (the digit, two fragments and a pixel): wherever the
    digit lies, a single piece is placed whole (none of it under the digit, which is pasted last and
    would hide it) and never touches the digit's box."""
    rng = np.random.default_rng(1)
    digit, piece = np.full((16, 16), 200, np.uint8), np.full((6, 6), 100, np.uint8)
    for _ in range(300):
        image, mask = compose_canvas(digit, [piece], 16 + 2 * 6 + 1, rng)
        assert mask.sum() == 256 and (image[mask] == 200).all() and (image == 100).sum() == 36
        rows, cols = np.nonzero(mask)
        grown = np.zeros_like(mask)
        grown[max(rows.min() - 1, 0) : rows.max() + 2, max(cols.min() - 1, 0) : cols.max() + 2] = True
        assert not image[grown & ~mask].any()


def test_the_digit_lands_anywhere_or_within_max_offset_of_the_centre():
    """Every position is drawn: anywhere on the canvas without `max_offset`, else `centre ± max_offset` along each
    axis, where the centre is `(canvas_size - side) // 2`."""
    rng = np.random.default_rng(0)
    digit = np.full((4, 4), 9, np.uint8)
    for canvas_size, max_offset, expected in [(10, None, range(7)), (11, 2, range(1, 6)), (10, 1, range(2, 5))]:
        tops, lefts = set(), set()
        for _ in range(200):
            _, mask = compose_canvas(digit, [], canvas_size, rng, max_offset)
            rows, cols = np.nonzero(mask)
            tops.add(int(rows.min()))
            lefts.add(int(cols.min()))
        assert tops == set(expected) and lefts == set(expected), (canvas_size, max_offset)


def test_a_piece_lands_on_every_position_clear_of_the_digit():
    """Uniform rejection sampling: over many canvases a piece lands on every position clear of the
    digit's grown box (above or below it in its columns, beside it in its rows, in the corners) and
    on no other; the digit sits at the centre (`max_offset=0`), and the piece's corner is marked."""
    rng = np.random.default_rng(0)
    canvas_size, side, size = 14, 4, 3
    digit, piece = np.full((side, side), 1, np.uint8), np.full((size, size), 2, np.uint8)
    piece[0, 0] = 3
    top = left = (canvas_size - side) // 2
    allowed = {
        (y, x)
        for y in range(canvas_size - size + 1)
        for x in range(canvas_size - size + 1)
        if y + size < top or y > top + side or x + size < left or x > left + side
    }
    seen = set()
    for _ in range(3000):
        image, _ = compose_canvas(digit, [piece], canvas_size, rng, max_offset=0)
        seen.add(tuple(int(i) for i in np.argwhere(image == 3)[0]))
    assert seen == allowed


def crop_places(seed: int, s: int, size: int, tries: int = 10) -> list[tuple[int, int]]:
    """The top-left corners of the first `tries` crops that `cut_fragment` draws from `seed` (numpy alone)."""
    rng = np.random.default_rng(seed)
    return [tuple(int(i) for i in rng.integers(0, s - size + 1, size=2)) for _ in range(tries)]


def covers(place: tuple[int, int], pixel: tuple[int, int], size: int) -> bool:
    """Whether the `size`-pixel crop at `place` holds `pixel`."""
    return place[0] <= pixel[0] < place[0] + size and place[1] <= pixel[1] < place[1] + size


def test_a_fragment_is_cut_anywhere_in_the_digit():
    """An inky digit stops the search at the first try, so the crop's place is uniform: every offset
    from 0 to `s - size` is drawn along each axis (pixel values mark the place)."""
    from sar_hf.data.cluttered_digits import cut_fragment

    s, size = 8, 3
    digit = (np.arange(s * s).reshape(s, s) + 1).astype(np.uint8)
    places = set()
    rng = np.random.default_rng(0)
    for _ in range(500):
        crop = cut_fragment(digit, size, rng)
        places.add(divmod(int(crop[0, 0]) - 1, s))
    assert places == {(y, x) for y in range(s - size + 1) for x in range(s - size + 1)}


def test_a_fragment_is_the_inkiest_of_ten_tries():
    """A digit with one ink pixel: a seed whose first ten crops all miss it and whose eleventh holds
    it (found with numpy alone) gives a blank crop; one whose tenth holds it gives that crop."""
    from sar_hf.data.cluttered_digits import cut_fragment

    s, size = 8, 2
    digit = np.zeros((s, s), np.uint8)
    digit[5, 2] = 90

    def first_hit(seed):
        places = crop_places(seed, s, size, tries=11)
        return next((attempt for attempt, place in enumerate(places, 1) if covers(place, (5, 2), size)), None)

    seeds = {hit: next(seed for seed in range(10_000) if first_hit(seed) == hit) for hit in (10, 11)}
    assert cut_fragment(digit, size, np.random.default_rng(seeds[10])).max() == 90
    assert cut_fragment(digit, size, np.random.default_rng(seeds[11])).max() == 0


def test_a_fragment_stops_at_a_quarter_of_faint_ink_and_keeps_the_first_of_equally_inky_crops():
    """The search stops at the first crop whose ink (any pixel > 0, however faint) covers a quarter of it,
    and of equally inky crops keeps the first: the rule that makes a seed give the same canvases."""
    from sar_hf.data.cluttered_digits import cut_fragment

    # Faint ink (value 1) everywhere, one bright pixel: the first crop, all faint, is taken.
    faint = np.ones((8, 8), np.uint8)
    faint[5, 2] = 90
    seed = next(seed for seed in range(1000) if not covers(crop_places(seed, 8, 2)[0], (5, 2), 2)
                and any(covers(place, (5, 2), 2) for place in crop_places(seed, 8, 2)))  # fmt: skip
    assert cut_fragment(faint, 2, np.random.default_rng(seed)).max() == 1
    # One pixel of 2x2 (exactly a quarter) stops the search before a crop of a brighter pixel.
    two = np.zeros((8, 8), np.uint8)
    two[1, 1], two[6, 6] = 50, 90

    def dim_first_then_bright(seed):
        places = crop_places(seed, 8, 2)
        inky = [k for k, place in enumerate(places) if covers(place, (1, 1), 2) or covers(place, (6, 6), 2)]
        return (
            bool(inky) and covers(places[inky[0]], (1, 1), 2) and any(covers(p, (6, 6), 2) for p in places[inky[0] :])
        )

    seed = next(seed for seed in range(1000) if dim_first_then_bright(seed))
    assert cut_fragment(two, 2, np.random.default_rng(seed)).max() == 50
    # One ink pixel in every 3x3 crop (a lattice of step 3): ten equally inky tries, the first is kept.
    lattice = np.zeros((8, 8), np.uint8)
    lattice[::3, ::3] = 70
    first_and_tenth = lambda seed: crop_places(seed, 8, 3)[::9]  # noqa: E731
    seed = next(seed for seed in range(1000) if len({(y % 3, x % 3) for y, x in first_and_tenth(seed)}) == 2)
    y, x = crop_places(seed, 8, 3)[0]
    np.testing.assert_array_equal(cut_fragment(lattice, 3, np.random.default_rng(seed)), lattice[y : y + 3, x : x + 3])


def test_enlarge_scales_each_side_as_pil_does():
    """`[N, h, w]` -> `[N, h * scale, w * scale]`, each image resized bilinearly by PIL, also when not square."""
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (3, 4, 6), dtype=np.uint8)
    out = enlarge(pixels, 3)
    assert out.shape == (3, 12, 18) and out.dtype == np.uint8
    for image, enlarged in zip(pixels, out, strict=True):
        np.testing.assert_array_equal(enlarged, np.asarray(Image.fromarray(image).resize((18, 12), Image.BILINEAR)))


def test_bad_geometry_is_refused_with_the_reason_before_anything_is_built(monkeypatch):
    """A canvas too small for the clutter (on which a centred digit leaves no room for a piece, so the
    placement would never end) or a fragment larger than the digit is refused at once; the tightest
    canvas (the digit, two fragments and a pixel) and a fragment as large as the digit are accepted."""
    import sar_hf.data.cluttered_digits as module

    built, build_split = [], module.build_split

    def few(pixels, labels, indices, copies, canvas_size, *args):  # five canvases per split are enough here
        built.append((pixels.shape[1], canvas_size))
        assert len(built) > 1, "a refused geometry reached the build"  # (on 24 px it might never end)
        return build_split(pixels, labels, indices[:5], copies, canvas_size, *args)

    monkeypatch.setattr(module, "build_split", few)
    with pytest.raises(
        ValueError,
        match=r"^canvas_size 24 leaves no room for the clutter around a 16 px digit: it must be at least 25, so "
        r"that wherever the digit lies, one side has room for a 4 px fragment and a pixel of gap\.$",
    ):
        load_cluttered_digits_dataset(canvas_size=16 + 2 * 4)
    with pytest.raises(ValueError, match=r"^fragment_size 9 is larger than the enlarged digit \(8 px\)\.$"):
        load_cluttered_digits_dataset(scale=1, fragment_size=9, canvas_size=40)
    assert not built
    built.append("accepted from here")
    for scale, fragment_size, canvas_size in [(2, 4, 25), (1, 8, 25)]:
        tight = load_cluttered_digits_dataset(scale=scale, fragment_size=fragment_size, canvas_size=canvas_size)
        assert built[-3:] == [(8 * scale, canvas_size)] * 3
        assert np.asarray(tight["test"][0]["image"]).shape == (canvas_size, canvas_size)
