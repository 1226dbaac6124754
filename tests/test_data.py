"""sar_hf.data: the bundled digits, loading, the data checks, the transforms, and the training script's use of them."""

import inspect
import logging
import math
import os
from collections import Counter

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value
from PIL import Image as PILImage

from sar_hf.data import (
    ImageTransform,
    check_classes,
    check_columns,
    check_image_folder,
    collate_fn,
    drop_bad_images,
    find_bad_images,
    load_digits_dataset,
    load_image_dataset,
    prepare_labels,
    processor_size,
    stratified_split,
    stratified_subset,
    to_rgb,
    vit_image_processor_class,
)


def _png(path, value=128, size=(8, 8)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    PILImage.new("RGB", size, (value, value, value)).save(path)
    return str(path)


def _labelled(labels, feature=None):
    feature = feature or ClassLabel(names=["a", "b", "c"])
    return Dataset.from_dict({"label": labels}, features=Features({"label": feature}))


@pytest.fixture(scope="module")
def digits():
    return load_digits_dataset()


def test_digits_are_real_fixed_and_stratified(digits):
    assert set(digits) == {"train", "test"}
    assert (len(digits["train"]), len(digits["test"])) == (1437, 360)
    assert digits["train"].features["label"].names == [str(i) for i in range(10)]
    image = digits["test"][0]["image"]
    assert image.mode == "L" and image.size == (8, 8)
    counts = np.bincount(digits["test"]["label"], minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # 20% of each class
    again = load_digits_dataset()  # the same split every time
    assert list(again["test"]["label"]) == list(digits["test"]["label"])
    np.testing.assert_array_equal(np.asarray(again["test"][5]["image"]), np.asarray(digits["test"][5]["image"]))


def test_load_digits_arrays_are_scikit_learns_with_a_split_of_every_index():
    from sklearn.datasets import load_digits

    from sar_hf.data import load_digits_arrays

    pixels, labels, train_idx, test_idx = load_digits_arrays()
    reference = load_digits()
    assert pixels.dtype == np.uint8 and labels.dtype == np.int64
    np.testing.assert_array_equal(pixels, np.rint(reference.images * (255 / 16)).astype(np.uint8))
    np.testing.assert_array_equal(labels, reference.target)
    assert len(test_idx) == 360 and sorted([*train_idx, *test_idx]) == list(range(1797))


def test_digits_are_scikit_learns_images_upright_with_their_labels(digits):
    """Every image with its label is one of scikit-learn's, as it stands (not mirrored, not transposed)."""
    from sklearn.datasets import load_digits

    reference = load_digits()
    expected = np.rint(reference.images * (255 / 16)).astype(np.uint8)  # 0..16 -> 0..255, as documented

    def rows(images, labels):
        return sorted((int(label), np.asarray(image).tobytes()) for image, label in zip(images, labels, strict=True))

    images = [*digits["train"]["image"], *digits["test"]["image"]]
    ours = rows(images, [*digits["train"]["label"], *digits["test"]["label"]])
    wrong = sum((Counter(rows(expected, reference.target)) - Counter(ours)).values())
    assert len(ours) == len(expected) and wrong == 0, (
        f"{wrong} of {len(expected)} labelled images are not scikit-learn's"
    )


def test_check_columns_lists_the_available_columns():
    dataset = DatasetDict({"train": Dataset.from_dict({"img": [1], "label": [0]})})
    with pytest.raises(ValueError, match=r"no column 'image'.*\['img', 'label'\].*--image_column_name"):
        check_columns(dataset, "image", "label")
    check_columns(dataset, "img", "label")


def test_check_columns_names_each_missing_column_and_its_flag():
    """The label column is checked only when named; the message names each missing column and the flag for it."""
    dataset = DatasetDict({"train": Dataset.from_dict({"img": [1], "label": [0]})})
    check_columns(dataset, "img")
    columns = "its columns are ['img', 'label']. Name the right one(s) with"
    for image, label, message in [
        ("image", None, f"no column 'image'; {columns} --image_column_name."),
        ("img", "labels", f"no column 'labels'; {columns} --label_column_name."),
        ("image", "labels", f"no column 'image' or 'labels'; {columns} --image_column_name and --label_column_name."),
    ]:
        with pytest.raises(ValueError) as error:
            check_columns(dataset, image, label)
        assert str(error.value) == f"The 'train' split has {message}"


def test_check_image_folder(tmp_path):
    with pytest.raises(ValueError, match=r"^--train_dir '.*missing' is not a folder\.$"):  # the default flag
        check_image_folder(str(tmp_path / "missing"))
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    (tmp_path / "empty" / "cat" / "notes.txt").write_text("no image")
    with pytest.raises(ValueError, match=r"holds no image files.*one subfolder per class"):
        check_image_folder(str(tmp_path / "empty"), "--train_dir")
    _png(tmp_path / "ok" / "cat" / "1.PNG")
    check_image_folder(str(tmp_path / "ok"))


def test_load_image_dataset_from_a_bundled_name_a_folder_or_a_datasets_name(tmp_path):
    assert {name: len(split) for name, split in load_image_dataset("digits").items()} == {"train": 1437, "test": 360}
    for name in ("cat", "dog"):
        _png(tmp_path / "train" / name / "1.png")
        _png(tmp_path / "val" / name / "1.png", value=10)
    folders = load_image_dataset(train_dir=str(tmp_path / "train"), validation_dir=str(tmp_path / "val"))
    assert set(folders) == {"train", "validation"} and folders["train"].features["label"].names == ["cat", "dog"]
    # A `datasets` folder whose split is called "valid" comes back as "validation".
    parquet = tmp_path / "parquet"
    parquet.mkdir()
    for split in ("train", "valid"):
        Dataset.from_dict({"label": [0, 1]}).to_parquet(str(parquet / f"{split}.parquet"))
    assert set(load_image_dataset(str(parquet), cache_dir=str(tmp_path / "cache"))) == {"train", "validation"}
    (tmp_path / "digits").mkdir()  # a bundled name wins over a folder of that name
    assert len(load_image_dataset("digits")["test"]) == 360
    with pytest.raises(ValueError, match="holds no image files"):
        load_image_dataset(train_dir=str(tmp_path / "digits"))
    with pytest.raises(ValueError, match=r"^Name a dataset or a folder of images\.$"):
        load_image_dataset()


def test_load_image_dataset_passes_the_configuration_cache_dir_and_token_to_datasets(tmp_path, monkeypatch):
    """`--dataset_config_name` picks the configuration (here one of two a README declares), `--cache_dir` is where
    `datasets` caches it, the token reaches `datasets.load_dataset`, and a split named "val" becomes "validation"."""
    import datasets

    folder = tmp_path / "two_configs"
    readme = "---\nconfigs:\n"
    for name, sizes in (("small", {"train": 2}), ("big", {"train": 5, "val": 3})):
        readme += f"- config_name: {name}\n  data_files:\n"
        for split, size in sizes.items():
            (folder / name).mkdir(parents=True, exist_ok=True)
            Dataset.from_dict({"label": [i % 2 for i in range(size)]}).to_parquet(
                str(folder / name / f"{split}.parquet")
            )
            readme += f"  - split: {split}\n    path: {name}/{split}.parquet\n"
    (folder / "README.md").write_text(readme + "---\n")
    with pytest.raises(ValueError, match="Config name is missing"):  # datasets' own refusal without a config
        datasets.load_dataset(str(folder), cache_dir=str(tmp_path / "other"))

    tokens = []
    real = datasets.load_dataset

    def spy(*args, **kwargs):
        tokens.append(kwargs.get("token"))
        return real(*args, **{**kwargs, "token": None})

    monkeypatch.setattr(datasets, "load_dataset", spy)
    cache = tmp_path / "cache"
    big = load_image_dataset(str(folder), "big", cache_dir=str(cache), token="hf_secret")
    assert {name: len(split) for name, split in big.items()} == {"train": 5, "validation": 3}
    assert tokens == ["hf_secret"]
    assert cache.is_dir() and any(cache.iterdir())  # datasets cached it there, not in the default cache
    assert {name: len(split) for name, split in load_image_dataset(str(folder), "small").items()} == {"train": 2}


def test_image_folders_keep_a_single_class_and_name_the_empty_flag(tmp_path):
    """One class folder still gives a label column (so that the one-class check can say so), the images are cached
    in `cache_dir`, and an empty folder's error names the flag that gave it."""
    _png(tmp_path / "train" / "cat" / "1.png")
    _png(tmp_path / "train" / "cat" / "2.png", value=10)
    cache = tmp_path / "cache"
    dataset = load_image_dataset(train_dir=str(tmp_path / "train"), cache_dir=str(cache))
    assert dataset["train"].features["label"] == ClassLabel(names=["cat"]) and dataset["train"]["label"] == [0, 0]
    assert cache.is_dir() and any(cache.iterdir())
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"^--train_dir '.*empty' holds no image files"):
        load_image_dataset(train_dir=str(tmp_path / "empty"))
    with pytest.raises(ValueError, match=r"^--validation_dir '.*empty' holds no image files"):
        load_image_dataset(train_dir=str(tmp_path / "train"), validation_dir=str(tmp_path / "empty"))


def test_the_old_import_path_of_the_cluttered_digits_keeps_working():
    import sar_hf.cluttered_digits as old
    from sar_hf.data import cluttered_digits

    assert old.load_cluttered_digits_dataset is cluttered_digits.load_cluttered_digits_dataset
    assert old.compose_canvas is cluttered_digits.compose_canvas


def test_prepare_labels_rejects_missing_labels():
    dataset = DatasetDict({"train": _labelled([0, 1, -1, 2])})
    with pytest.raises(ValueError, match=r"outside 0\.\.2.*-1 at index 2"):
        prepare_labels(dataset, "label")


def test_prepare_labels_rejects_a_label_equal_to_the_number_of_classes():
    """A ClassLabel of 3 names holding the id 3 (cast from integers, which does not check them) has no class."""
    raw = Dataset.from_dict({"label": [0, 1, 2, 3, 1]})
    dataset = DatasetDict({"train": raw.cast(Features({"label": ClassLabel(names=["a", "b", "c"])}))})
    with pytest.raises(ValueError, match=r"1 label\(s\) outside 0\.\.2 .*e\.g\. 3 at index 3"):
        prepare_labels(dataset, "label")


def test_prepare_labels_rejects_other_types():
    dataset = DatasetDict({"train": Dataset.from_dict({"label": [0.5, 1.0]})})
    with pytest.raises(ValueError, match="has type float64; expected a ClassLabel, integers or strings"):
        prepare_labels(dataset, "label")


@pytest.mark.parametrize(
    "train, validation, names",
    [
        (["dog", "cat", "dog"], ["cat", "eel"], ["cat", "dog", "eel"]),
        ([7, 3, 7], [3], ["3", "7"]),  # sorted by value, ids 0..k-1 whatever the raw integers
    ],
)
def test_prepare_labels_encodes_strings_and_integers(train, validation, names):
    dataset = DatasetDict(
        {"train": Dataset.from_dict({"label": train}), "validation": Dataset.from_dict({"label": validation})}
    )
    out = prepare_labels(dataset, "label")
    for split, raw in (("train", train), ("validation", validation)):
        assert out[split].features["label"].names == names
        assert [names[i] for i in out[split]["label"]] == [str(v) for v in raw]


def test_prepare_labels_refuses_list_missing_and_mixed_labels():
    """A list per image, a missing label, integers in one split and strings in another: each its own error."""
    cases = [
        ({"train": [[0], [1]]}, "of the 'train' split has type List; expected a ClassLabel, integers or strings"),
        ({"train": ["cat", None, "dog"]}, r"has missing values \(None\); fix or drop these rows\.$"),
        ({"train": [1, 2], "validation": ["a"]}, r"mixes types \['int', 'str'\]\.$"),
    ]
    for splits, message in cases:
        dataset = DatasetDict({split: Dataset.from_dict({"label": labels}) for split, labels in splits.items()})
        with pytest.raises(ValueError, match=rf"^The label column 'label' {message}"):
            prepare_labels(dataset, "label")


@pytest.mark.parametrize(
    "dtype", ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "string", "large_string"]
)
def test_prepare_labels_accepts_every_integer_and_string_type(dtype):
    """Integers of any width or sign, and both string types, name classes."""
    raw = [5, 3, 5] if "int" in dtype else ["5", "3", "5"]
    dataset = DatasetDict({"train": Dataset.from_dict({"label": raw}, features=Features({"label": Value(dtype)}))})
    out = prepare_labels(dataset, "label")
    assert out["train"].features["label"].names == ["3", "5"] and out["train"]["label"] == [1, 0, 1]


def test_prepare_labels_says_what_it_encoded(caplog, capfd):
    """The classes found are logged, and the progress bar names the split it encodes."""
    caplog.set_level(logging.INFO, logger="sar_hf.data.checks")
    dataset = DatasetDict(
        {"train": Dataset.from_dict({"label": [7, 3]}), "validation": Dataset.from_dict({"label": [3]})}
    )
    prepare_labels(dataset, "label")
    logged = [record.getMessage() for record in caplog.records if record.name == "sar_hf.data.checks"]
    assert logged == ["Labels of 'label' turned into 2 classes: ['3', '7']"]
    shown = capfd.readouterr().err
    assert "Encoding the train labels" in shown and "Encoding the validation labels" in shown


def test_prepare_labels_keeps_a_valid_class_label():
    dataset = DatasetDict({"train": _labelled([0, 2, 1])})
    assert prepare_labels(dataset, "label") is dataset


def test_check_classes():
    with pytest.raises(ValueError, match=r"only one class \(\['b'\]\)"):
        check_classes(_labelled([1, 1, 1]), "label")
    with pytest.raises(ValueError, match="only one class"):
        check_classes(_labelled([0], ClassLabel(names=["only"])), "label")
    with pytest.raises(ValueError, match="'train' split is empty"):
        check_classes(_labelled([]), "label")
    check_classes(_labelled([0, 2]), "label")
    check_classes(_labelled([1, 0], ClassLabel(names=["x", "y"])), "label")  # two classes are enough


def test_check_classes_of_a_plain_integer_column():
    """Without a ClassLabel (no names, no class count) the classes are the distinct values."""
    ints = Dataset.from_dict({"label": [7, 7]}, features=Features({"label": Value("int64")}))
    with pytest.raises(ValueError, match=r"^The 'validation' split has only one class \(\[7\]\)"):
        check_classes(ints, "label", "validation")
    check_classes(Dataset.from_dict({"label": [7, 3]}), "label")


def test_check_classes_of_a_class_label_with_a_single_name():
    """A ClassLabel of one class is one class, even holding an id it does not name (cast from integers)."""
    raw = Dataset.from_dict({"label": [0, 1, 0]})
    ds = raw.cast(Features({"label": ClassLabel(names=["only"])}))
    with pytest.raises(ValueError, match=r"^The 'train' split has only one class \(\['only'\]\)"):
        check_classes(ds, "label")


@pytest.fixture
def image_files(tmp_path):
    good = [_png(tmp_path / f"good{i}.png", 40 * i) for i in range(3)]
    truncated = tmp_path / "truncated.png"
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    PILImage.fromarray(noise).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:1500])  # a PNG cut short, as by an interrupted copy
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image at all")
    return good, str(truncated), str(garbage)


def test_bad_images_are_named_or_skipped_and_counted(image_files):
    good, truncated, garbage = image_files
    files = [good[0], truncated, good[1], garbage, good[2]]
    features = Features({"image": Image(), "label": ClassLabel(names=["a", "b"])})
    ds = Dataset.from_dict({"image": files, "label": [0, 1, 0, 1, 0]}, features=features)
    bad = find_bad_images(ds, "image")
    assert [(i, name) for i, name, _ in bad] == [(1, truncated), (3, garbage)]

    dataset = DatasetDict({"train": ds})
    with pytest.raises(
        ValueError, match=r"2 image\(s\) of the 'train' split cannot be read: .*truncated\.png.*garbage\.png"
    ):
        drop_bad_images(dataset, "image")
    assert drop_bad_images(dataset, "image", skip=True) == {"train": 2}
    assert len(dataset["train"]) == 3
    assert find_bad_images(dataset["train"], "image") == []


@pytest.mark.parametrize("count, more", [(5, ""), (6, " and 1 more"), (7, " and 2 more")])
def test_every_split_is_checked_and_the_message_lists_five_bad_images(tmp_path, caplog, count, more):
    """A clean split does not stop the check of the next; the error lists the first five files and counts the rest."""
    garbage = []
    for i in range(count):
        garbage.append(tmp_path / f"bad{i}.png")
        garbage[-1].write_bytes(b"not an image")
    features = Features({"image": Image()})
    clean = Dataset.from_dict({"image": [PILImage.new("L", (4, 4))]}, features=features)
    bad = Dataset.from_dict({"image": [str(path) for path in garbage]}, features=features)
    with pytest.raises(ValueError) as error:
        drop_bad_images(DatasetDict({"train": clean, "validation": bad}), "image")
    reasons = [reason for _, _, reason in find_bad_images(bad, "image")]
    listing = "; ".join(f"{path} ({reason})" for path, reason in zip(garbage[:5], reasons, strict=False))
    assert str(error.value).startswith(f"{count} image(s) of the 'validation' split cannot be read: {listing}{more}. ")
    caplog.set_level(logging.WARNING, logger="sar_hf.data.checks")
    dataset = DatasetDict({"train": clean, "validation": bad})
    assert drop_bad_images(dataset, "image", skip=True) == {"train": 0, "validation": count}
    assert len(dataset["validation"]) == 0
    warned = [record.getMessage() for record in caplog.records if record.name == "sar_hf.data.checks"]
    assert warned == [f"Skipping {count} unreadable image(s) of the 'validation' split: {listing}{more}"]


def test_good_images_in_memory_are_not_bad():
    """Images held as bytes (no file), as `datasets` stores PIL images, decode fine."""
    images = [PILImage.new("L", (4, 4), v) for v in (0, 255)]
    ds = Dataset.from_dict({"image": images}, features=Features({"image": Image()}))
    assert ds.cast_column("image", Image(decode=False))[0]["image"]["path"] is None  # held in memory
    assert find_bad_images(ds, "image") == []
    missing = Dataset.from_dict({"image": [images[0], None]}, features=Features({"image": Image()}))
    assert find_bad_images(missing, "image") == [(1, "index 1", "ValueError: no image (None)")]


def test_bad_images_in_memory_are_named_by_index():
    features = Features({"image": Image(), "label": Value("int64")})
    ds = Dataset.from_dict({"image": [{"bytes": b"\x89PNG broken", "path": None}], "label": [0]}, features=features)
    assert find_bad_images(ds, "image")[0][:2] == (0, "index 0")


def test_stratified_split_and_subset():
    ds = _labelled([0] * 40 + [1] * 40 + [2] * 20)
    split = stratified_split(ds, 0.25, "label", seed=0)
    assert np.bincount(split["test"]["label"]).tolist() == [10, 10, 5]
    subset = stratified_subset(ds, 0.5, "label", seed=0)
    assert np.bincount(subset["label"]).tolist() == [20, 20, 10]
    assert stratified_subset(ds, 1.0, "label", seed=0) is ds
    tiny = _labelled([0, 1, 2])  # too few images to put every class on both sides: random split
    assert len(stratified_split(tiny, 1, "label", seed=0)["test"]) == 1


def _numbered(labels):
    """Rows with an `id` (their index) and a ClassLabel `label`."""
    features = Features({"id": Value("int64"), "label": ClassLabel(num_classes=max(labels) + 1)})
    return Dataset.from_dict({"id": list(range(len(labels))), "label": list(labels)}, features=features)


@pytest.mark.parametrize(
    "labels, fraction",
    [
        ([0] * 40 + [1] * 40 + [2] * 20, 0.1),
        ([0] * 40 + [1] * 40 + [2] * 20, 0.3),
        ([0] * 30 + [1] * 19 + [2], 0.1),  # a class of one image: no stratified split, a random one
    ],
)
def test_stratified_subset_keeps_that_fraction_of_the_images(labels, fraction):
    ds = _numbered(labels)
    subset = stratified_subset(ds, fraction, "label", seed=0)
    assert len(subset) == round(fraction * len(ds))
    ids = list(subset["id"])
    assert len(set(ids)) == len(ids) and set(ids) <= set(range(len(ds)))
    assert [labels[i] for i in ids] == list(subset["label"])
    if min(np.bincount(labels)) > 1:  # stratified: each class keeps its share
        expected = fraction * np.bincount(labels)
        assert np.abs(np.bincount(list(subset["label"]), minlength=3) - expected).max() <= 1


def test_stratified_splits_and_subsets_are_seeded():
    """A stratified split (and so a subset) is one split per seed: the same on every run, another for another seed."""
    ds = _numbered([0] * 40 + [1] * 40 + [2] * 20)

    def test_ids(seed):
        return list(stratified_split(ds, 0.25, "label", seed=seed)["test"]["id"])

    def subset_ids(seed):
        return list(stratified_subset(ds, 0.3, "label", seed=seed)["id"])

    assert test_ids(0) == test_ids(0) and test_ids(0) != test_ids(1)
    assert subset_ids(3) == subset_ids(3) and subset_ids(3) != subset_ids(4)


def test_stratified_subset_of_a_tiny_or_an_almost_whole_fraction():
    """The subset keeps `round(fraction * n)` images, at least one; a fraction that rounds to all of them is all."""
    ds = _numbered([0] * 50 + [1] * 50)
    assert len(stratified_subset(ds, 0.01, "label", seed=0)) == 1  # round(1.0)
    assert len(stratified_subset(ds, 0.004, "label", seed=0)) == 1  # round(0.4) = 0, but never nothing
    assert stratified_subset(ds, 0.999, "label", seed=0) is ds  # round(99.9) = 100
    assert stratified_subset(ds, 1.5, "label", seed=0) is ds


def test_a_split_that_cannot_be_stratified_is_still_the_same_for_the_same_seed(caplog):
    """With a class of one image the split is random, but seeded: one seed, one split, on every run."""
    caplog.set_level(logging.WARNING, logger="sar_hf.data.loading")
    ds = _numbered([0] * 30 + [1] * 29 + [2])

    def test_ids(seed):
        return list(stratified_split(ds, 0.5, "label", seed=seed)["test"]["id"])

    test = test_ids(0)
    with pytest.raises(ValueError) as refusal:  # what datasets says, which the warning passes on
        ds.train_test_split(test_size=0.5, stratify_by_column="label", seed=0)
    assert (
        caplog.records[0].getMessage()
        == f"Cannot stratify the split by 'label' ({refusal.value}); splitting at random."
    )
    assert len(test) == 30 and set(test) <= set(range(60))
    assert test == test_ids(0) and test != test_ids(1)  # 1 chance in 10^17 that two random splits agree
    subset = list(stratified_subset(ds, 0.5, "label", seed=0)["id"])
    assert subset == list(stratified_subset(ds, 0.5, "label", seed=0)["id"])


def _ramp(width, height):
    """An RGB image whose red grows to the right and green downwards, so that any crop of it shows its orientation."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[..., 0] = np.rint(np.linspace(0, 250, width))[None, :]
    pixels[..., 1] = np.rint(np.linspace(0, 250, height))[:, None]
    return PILImage.fromarray(pixels)


def _direction(pixels):
    """1 for a transformed `_ramp` that stands upright, -1 for one mirrored left-right; an AssertionError for
    anything else (transposed, upside down).

    Its red must change only along the width and its green only along the height, growing downwards.
    """
    red, green = pixels[0] * 255, pixels[1] * 255
    assert (red - red[:1]).abs().max() < 0.5 and (green - green[:, :1]).abs().max() < 0.5, "transposed"
    assert (green[1:, 0] - green[:-1, 0]).min() > -1e-3 and green[-1, 0] - green[0, 0] > 20, "upside down"
    steps = red[0, 1:] - red[0, :-1]
    if steps.min() > -1e-3 and red[0, -1] - red[0, 0] > 20:
        return 1
    assert steps.max() < 1e-3 and red[0, 0] - red[0, -1] > 20, "neither upright nor mirrored"
    return -1


def _mirrored(transform, image, draws=100, seed=0):
    """How many of `draws` training transforms of `image` (a `_ramp`) come out mirrored."""
    torch.manual_seed(seed)
    return sum(_direction(transform.pixels(image)) == -1 for _ in range(draws))


@pytest.mark.parametrize("size", [(20, 12), (12, 20)])
def test_training_crops_of_non_square_images_keep_their_orientation(size):
    """A 24x16 image cropped and resized to a taller or a wider size comes out `[3, H, W]`, upright."""
    image = _ramp(24, 16)
    plain = ImageTransform(size, [0.0] * 3, [1.0] * 3)
    assert plain(image).shape == (3, *size) and _direction(plain(image)) == 1
    transform = ImageTransform(size, [0.0] * 3, [1.0] * 3, augment=True, crop_scale=(0.5, 0.8))
    torch.manual_seed(0)
    corners = set()
    for _ in range(50):
        pixels = transform.pixels(image)
        assert pixels.shape == (3, *size)
        assert _direction(pixels) == 1
        corners.add((round(float(pixels[0, 0, 0]), 3), round(float(pixels[1, 0, 0]), 3)))
    assert len(corners) > 10  # the crops do move about


def test_training_flips_half_the_images_left_right_and_only_with_hflip():
    """`hflip`: about one image in two mirrored left-right (never upside down); without it, none."""
    image = _ramp(24, 16)
    flipping = ImageTransform((16, 16), [0.0] * 3, [1.0] * 3, augment=True, hflip=True)
    assert 25 <= _mirrored(flipping, image) <= 75  # Binomial(100, 1/2): 50 ± 5; seeded, so it never flakes
    assert _mirrored(ImageTransform((16, 16), [0.0] * 3, [1.0] * 3, augment=True), image) == 0


def test_image_transform_eval_resizes_and_normalises():
    transform = ImageTransform((16, 12), image_mean=[0.5] * 3, image_std=[0.5] * 3)
    out = transform(PILImage.new("L", (8, 8), 255))  # grayscale -> 3 channels
    assert out.shape == (3, 16, 12) and out.dtype == torch.float32
    torch.testing.assert_close(out, torch.ones_like(out))
    torch.testing.assert_close(transform.pixels(PILImage.new("RGB", (4, 4), (0, 51, 255))), out.new_tensor(
        [0.0, 0.2, 1.0]).view(3, 1, 1).expand(3, 16, 12))  # fmt: skip


def test_image_transform_converts_every_mode_as_the_image_processor_does():
    """Grayscale, palette, transparent images: the same pixels as ViT's image processor with do_convert_rgb."""
    rng = np.random.default_rng(0)
    rgb = PILImage.fromarray(rng.integers(0, 256, (9, 7, 3), dtype=np.uint8))
    transparent = rgb.copy()
    transparent.putalpha(PILImage.fromarray(rng.integers(0, 256, (9, 7), dtype=np.uint8)))
    palette = rgb.convert("P", palette=PILImage.Palette.ADAPTIVE, colors=8)
    palette.info["transparency"] = 3  # one palette entry is transparent
    images = [rgb, rgb.convert("L"), rgb.convert("LA"), transparent, PILImage.new("RGBA", (5, 5)), palette]
    processor = vit_image_processor_class()(
        size={"height": 16, "width": 12}, image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.3, 0.4], do_convert_rgb=True
    )
    transform = ImageTransform((16, 12), processor.image_mean, processor.image_std)
    for image in images:
        expected = processor(image, return_tensors="pt")["pixel_values"][0]
        torch.testing.assert_close(transform(image), expected, msg=image.mode)
        assert to_rgb(image).mode == "RGB"


def test_to_rgb_takes_the_numpy_path_or_an_older_releases_conversion(monkeypatch):
    """Where `convert_to_rgb` can return an array, `to_rgb` asks for one (returning PIL is deprecated there and
    warns); with an older release, whose `convert_to_rgb` has no such argument, it converts as that release does."""
    from transformers import image_transforms

    rgba = PILImage.new("RGBA", (3, 2), (10, 20, 30, 0))  # fully transparent
    if "return_numpy" in inspect.signature(image_transforms.convert_to_rgb).parameters:  # compositing (not 5.9)
        warned = []
        monkeypatch.setattr(image_transforms.logger, "warning_once", lambda *args, **kwargs: warned.append(args))
        assert np.asarray(to_rgb(rgba)).tolist() == [[[255, 255, 255]] * 3] * 2 and warned == []  # on white

    def convert_to_rgb(image):  # the older releases (5.9): the alpha channel is dropped
        return image.convert("RGB")

    monkeypatch.setattr(image_transforms, "convert_to_rgb", convert_to_rgb)
    assert np.asarray(to_rgb(rgba)).tolist() == [[[10, 20, 30]] * 3] * 2


def test_image_transform_takes_a_single_mean_and_std_and_the_processors_resample():
    """A scalar mean or std stands for all three channels; `resample` is PIL's filter (bilinear when not given)."""
    image = PILImage.fromarray(np.arange(48, dtype=np.uint8).reshape(6, 8) * 5)
    scalar = ImageTransform((12, 16), image_mean=0.5, image_std=0.25)
    torch.testing.assert_close(scalar(image), ImageTransform((12, 16), [0.5] * 3, [0.25] * 3)(image))
    for resample in (None, PILImage.Resampling.NEAREST, PILImage.Resampling.BICUBIC):
        transform = ImageTransform((12, 16), [0.0] * 3, [1.0] * 3, resample=resample)
        resized = image.convert("RGB").resize((16, 12), PILImage.Resampling.BILINEAR if resample is None else resample)
        expected = torch.from_numpy(np.asarray(resized, np.float32) / 255).permute(2, 0, 1)
        torch.testing.assert_close(transform.pixels(image), expected, msg=str(resample))


def test_training_crops_are_resized_with_the_processors_resample():
    """A training crop is the box cut from the image and resized with `resample` (bilinear when not given), as PIL
    does it given the same box."""
    image = PILImage.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8))
    for resample in (None, PILImage.Resampling.NEAREST, PILImage.Resampling.BICUBIC):
        transform = ImageTransform(
            (12, 16), [0.0] * 3, [1.0] * 3, augment=True, crop_scale=(0.5, 0.8), resample=resample
        )
        torch.manual_seed(1)
        box = transform._crop_box(40, 30)
        torch.manual_seed(1)
        pixels = transform.pixels(image)
        filter_ = PILImage.Resampling.BILINEAR if resample is None else resample
        expected = np.asarray(image.resize((16, 12), filter_, box=box), np.float32) / 255
        torch.testing.assert_close(pixels, torch.from_numpy(expected).permute(2, 0, 1), msg=str(resample))


def test_training_crops_cover_that_share_of_the_image_as_a_random_resized_crop():
    """Each crop box lies in the image, covers a share of its area within `crop_scale`, with an aspect ratio within
    [3/4, 4/3], anywhere in the image; after 10 failed tries it is the whole image, as torchvision's
    `RandomResizedCrop` does (here it fails with the probability computed from the two uniform draws)."""
    torch.manual_seed(0)
    transform = ImageTransform((8, 8), [0.0] * 3, [1.0] * 3, augment=True, crop_scale=(0.5, 0.9))
    boxes = np.array([transform._crop_box(40, 30) for _ in range(1500)])
    left, top, right, bottom = boxes.T
    assert left.min() >= 0 and top.min() >= 0 and right.max() <= 40 + 1e-9 and bottom.max() <= 30 + 1e-9
    width, height = right - left, bottom - top
    share, ratio = width * height / (40 * 30), width / height
    assert share.min() >= 0.5 - 1e-9 and share.max() <= 0.9 + 1e-9 and share.max() - share.min() > 0.35
    assert ratio.min() >= 3 / 4 - 1e-9 and ratio.max() <= 4 / 3 + 1e-9 and ratio.max() - ratio.min() > 0.5
    assert np.abs(left / (40 - width) - 0.5).max() > 0.45 and np.abs(top / (30 - height) - 0.5).max() > 0.45

    # A square image and a share in [0.9, 1]: a try fits when |log ratio| <= -log share, so it succeeds with
    # p = E[-log s] / log(4/3) over s ~ U[0.9, 1]; all ten fail with probability (1 - p)^10, about 0.138.
    p = (0.1 + 0.9 * math.log(0.9)) / 0.1 / math.log(4 / 3)
    whole = ImageTransform((8, 8), [0.0] * 3, [1.0] * 3, augment=True, crop_scale=(0.9, 1.0))
    boxes = [whole._crop_box(50, 50) for _ in range(8000)]
    fallback = np.mean([box == (0.0, 0.0, 50.0, 50.0) for box in boxes])
    assert abs(fallback - (1 - p) ** 10) < 0.012, (fallback, (1 - p) ** 10)  # sd 0.004; 11 tries give 0.113


def test_image_transform_augments_reproducibly():
    image = PILImage.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4)
    plain = ImageTransform((8, 8), [0.0] * 3, [1.0] * 3)(image)
    augment = ImageTransform((8, 8), [0.0] * 3, [1.0] * 3, augment=True, hflip=True, crop_scale=(0.5, 0.6))
    torch.manual_seed(0)
    first = [augment(image) for _ in range(4)]
    torch.manual_seed(0)
    second = [augment(image) for _ in range(4)]
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b)
        assert a.shape == (3, 8, 8) and not torch.equal(a, plain)


def test_processor_size():
    class Processor:
        size = {"height": 24, "width": 32}
        do_center_crop = False

    assert processor_size(Processor()) == (24, 32)
    Processor.size, Processor.do_center_crop, Processor.crop_size = (
        {"shortest_edge": 256},
        True,
        {"height": 224, "width": 224},
    )
    assert processor_size(Processor()) == (224, 224)
    Processor.do_center_crop = False
    assert processor_size(Processor()) == (256, 256)


def test_processor_size_reads_attribute_sizes_and_refuses_what_it_cannot_tell():
    """A size given as an object with attributes (not a dict) is read the same; the crop counts only where the
    processor says it crops; a size it cannot read is the error that says so."""
    from types import SimpleNamespace as Processor

    assert processor_size(Processor(size=Processor(height=24, width=32))) == (24, 32)
    assert processor_size(Processor(size=Processor(shortest_edge=256))) == (256, 256)
    assert processor_size(Processor(size={"height": 24, "width": 32}, crop_size={"height": 8, "width": 8})) == (24, 32)
    assert processor_size(Processor(size={"shortest_edge": 20}, do_center_crop=True)) == (20, 20)  # no crop_size
    for unreadable in (Processor(size={"height": 24}), Processor(size=None)):
        with pytest.raises(ValueError, match=r"^Cannot tell the output size of SimpleNamespace \(size="):
            processor_size(unreadable)


def test_processor_size_of_a_processor_without_a_size_is_the_same_error():
    """Not an `AttributeError` from writing the message: the processor has no `size` at all."""
    from types import SimpleNamespace as Processor

    with pytest.raises(ValueError, match=r"^Cannot tell the output size of SimpleNamespace \(size=None\)\.$"):
        processor_size(Processor(do_center_crop=False))


def test_load_image_processor_reads_a_saved_processor_with_or_without_the_auto_class(tmp_path, monkeypatch):
    """A saved processor comes back with its settings and the keyword arguments applied, also where
    `AutoImageProcessor` refuses to load without torchvision."""
    import transformers

    from sar_hf.data import load_image_processor

    saved = vit_image_processor_class()(size={"height": 20, "width": 12}, image_mean=[0.1, 0.2, 0.3])
    saved.save_pretrained(tmp_path)

    def check(processor):
        assert processor_size(processor) == (20, 12) and list(processor.image_mean) == [0.1, 0.2, 0.3]
        assert processor.do_normalize is False  # the keyword argument

    check(load_image_processor(str(tmp_path), do_normalize=False))

    def refuse(*args, **kwargs):
        raise ImportError("this processor needs torchvision")

    try:
        monkeypatch.setattr(transformers.AutoImageProcessor, "from_pretrained", refuse)
    except ImportError:  # releases (5.9) whose Auto class without torchvision is a placeholder that already refuses
        pass
    fallback = load_image_processor(str(tmp_path), do_normalize=False)
    assert type(fallback) is vit_image_processor_class()
    check(fallback)


def test_collate_fn():
    batch = collate_fn(
        [{"pixel_values": torch.zeros(3, 4, 4), "labels": 1}, {"pixel_values": torch.ones(3, 4, 4), "labels": 0}]
    )
    assert batch["pixel_values"].shape == (2, 3, 4, 4)
    assert batch["labels"].tolist() == [1, 0] and batch["labels"].dtype == torch.long


# --------------------------------------------------------------------------------------------
# The training script's data steps (sar_hf/scripts), on in-memory data


def test_train_fraction_trains_on_that_fraction_of_the_train_split(monkeypatch):
    """`--train_fraction 0.1`: a tenth of what the validation split leaves, stratified, none of it validation."""
    from sar_hf.scripts import utils
    from sar_hf.scripts.arguments import parse_args

    labels = np.repeat(np.arange(4), [160, 120, 80, 40])
    features = Features({"image": Value("int64"), "label": ClassLabel(num_classes=4)})
    rows = Dataset.from_dict({"image": list(range(len(labels))), "label": labels.tolist()}, features=features)
    monkeypatch.setattr(utils, "load_image_dataset", lambda *args, **kwargs: DatasetDict({"train": rows}))
    model_args, data_args, _, _, training_args = parse_args(["--train_fraction", "0.1", "--no_verify_images"])
    dataset, _ = utils.load_data(model_args, data_args, training_args)  # "image" holds the row ids

    validation = set(dataset["validation"]["image"])
    assert len(validation) == math.ceil(0.15 * len(rows))  # --train_val_split's default
    left = np.array([i for i in range(len(rows)) if i not in validation])
    train = list(dataset["train"]["image"])
    assert len(train) == round(0.1 * len(left)) and set(train) <= set(left.tolist())
    assert np.abs(np.bincount(labels[train], minlength=4) - 0.1 * np.bincount(labels[left])).max() <= 1


@pytest.mark.parametrize(
    "flags, flipped",
    [
        ([], False),  # the bundled digits: a mirrored digit is another glyph
        (["--dataset_name", "cluttered-digits"], False),
        (["--train_dir", "own/images"], True),
        (["--dataset_name", "someone/images"], True),
        (["--train_dir", "own/images", "--hflip", "False"], False),
        (["--hflip", "True"], True),
    ],
)
def test_the_training_script_flips_a_users_images_and_never_the_digits(tmp_path, monkeypatch, flags, flipped):
    """The training transform that `sar-hf train` builds (stopped there, before any training) mirrors about half
    of a user's images and none of the bundled digits, unless `--hflip` says otherwise."""
    from sar_hf.scripts import train

    class Built(Exception):
        pass

    def build(*args, **kwargs):
        raise Built(ImageTransform(*args, **kwargs))

    def load_data(*args):
        ds = Dataset.from_dict(
            {"image": [PILImage.new("L", (8, 8), v) for v in (0, 80, 160, 240)], "label": [0, 1, 0, 1]},
            features=Features({"image": Image(), "label": ClassLabel(names=["a", "b"])}),
        )
        return DatasetDict({"train": ds, "validation": ds}), {}

    monkeypatch.setattr(train, "load_data", load_data)
    monkeypatch.setattr(train, "ImageTransform", build)
    args = ["--model_preset", "tiny", "--output_dir", str(tmp_path), "--report_to", "none", *flags]
    with pytest.raises(Built) as built:
        train.main(args)
    mirrored = _mirrored(built.value.args[0], _ramp(24, 16))
    expected = range(25, 76) if flipped else range(1)  # Binomial(100, 1/2): 50 ± 5; seeded, so it never flakes
    assert mirrored in expected, f"{mirrored} of 100 training images mirrored"
