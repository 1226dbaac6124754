"""sar_hf.data: the bundled digits, loading, the data checks and the transforms."""

import os

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


def test_check_columns_lists_the_available_columns():
    dataset = DatasetDict({"train": Dataset.from_dict({"img": [1], "label": [0]})})
    with pytest.raises(ValueError, match=r"no column 'image'.*\['img', 'label'\].*--image_column_name"):
        check_columns(dataset, "image", "label")
    check_columns(dataset, "img", "label")


def test_check_image_folder(tmp_path):
    with pytest.raises(ValueError, match="is not a folder"):
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
    with pytest.raises(ValueError, match="Name a dataset or a folder of images"):
        load_image_dataset()


def test_the_old_import_path_of_the_cluttered_digits_keeps_working():
    import sar_hf.cluttered_digits as old
    from sar_hf.data import cluttered_digits

    assert old.load_cluttered_digits_dataset is cluttered_digits.load_cluttered_digits_dataset
    assert old.compose_canvas is cluttered_digits.compose_canvas


def test_prepare_labels_rejects_missing_labels():
    dataset = DatasetDict({"train": _labelled([0, 1, -1, 2])})
    with pytest.raises(ValueError, match=r"outside 0\.\.2.*-1 at index 2"):
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


def test_collate_fn():
    batch = collate_fn(
        [{"pixel_values": torch.zeros(3, 4, 4), "labels": 1}, {"pixel_values": torch.ones(3, 4, 4), "labels": 0}]
    )
    assert batch["pixel_values"].shape == (2, 3, 4, 4)
    assert batch["labels"].tolist() == [1, 0] and batch["labels"].dtype == torch.long
