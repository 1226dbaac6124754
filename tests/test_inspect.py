"""`sar-hf inspect` (sar_hf/scripts/inspect_attention.py) against an independent computation.

The reference loads each checkpoint again with eager attention and `output_attentions=True`: the
log of the [CLS] row of its attention probabilities is the pre-softmax scores shifted by one
constant per row, so its spatial entropy (a float64 loop with scipy, tests/references.py), its
regions (scipy's labelling) and their t intervals (scipy.stats) must be what the command wrote.
"""

import json
import logging
import math
import os
import re
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.ndimage
import torch
import transformers
from PIL import Image
from references import reference_entropy
from scipy import stats

import sar_hf
from sar_hf.data import load_digits_dataset, vit_image_processor_class
from sar_hf.scripts import inspect_attention
from sar_hf.scripts.inspect_attention import InspectArguments, layer_indices, main, map_statistics, summarise

# 16 px images in 4 px patches (a 4x4 grid), 3 layers of 2 heads; scores spread wide of their means.
TINY = dict(
    image_size=16,
    patch_size=4,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=2,
    intermediate_size=37,
    initializer_range=0.2,
)
GRID = (4, 4)
KEYS = {"layer", "head_entropy_mean", "head_entropy_ci95", "entropy_mean", "regions_mean"}


def _clip():
    text = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2, vocab_size=99)
    config = transformers.CLIPConfig(text_config=text, vision_config=TINY, initializer_factor=5.0)
    return transformers.CLIPModel(config)


#: family -> (a random checkpoint of it, the class that loads it for the eager reference)
FAMILIES = {
    "sar-vit": (lambda: sar_hf.SARViTForImageClassification(sar_hf.SARViTConfig(**TINY, num_labels=3)), None),
    "vit": (lambda: transformers.ViTModel(transformers.ViTConfig(**TINY)), None),
    "deit": (lambda: transformers.DeiTForImageClassification(transformers.DeiTConfig(**TINY, num_labels=3)), None),
    "dinov2_with_registers": (
        lambda: transformers.Dinov2WithRegistersModel(
            transformers.Dinov2WithRegistersConfig(**TINY, num_register_tokens=2)
        ),
        None,
    ),
    "beit": (
        lambda: transformers.BeitForImageClassification(
            transformers.BeitConfig(**TINY, use_relative_position_bias=True, num_labels=3)
        ),
        None,
    ),
    "vit_msn": (lambda: transformers.ViTMSNModel(transformers.ViTMSNConfig(**TINY)), None),
    "clip": (_clip, transformers.CLIPVisionModel),
}


def _checkpoint(tmp_path, family, processor=True):
    torch.manual_seed(0)
    build, _ = FAMILIES[family]
    model = build()
    with torch.no_grad():  # some families start their [CLS] token at 0, which makes flat first-layer maps
        for name, parameter in model.named_parameters():
            if name.endswith(("cls_token", "class_embedding", "distillation_token", "position_embeddings")):
                parameter.normal_(std=0.5)
    path = tmp_path / family
    model.save_pretrained(path)
    if processor:
        vit_image_processor_class()(size={"height": 16, "width": 16}).save_pretrained(path)
    return path


def _eager_twin(path, family):
    """The checkpoint loaded again with eager attention, the class chosen here."""
    loader = FAMILIES[family][1]
    if loader is None:
        config = transformers.AutoConfig.from_pretrained(path)
        classifier = any("ForImageClassification" in name for name in config.architectures)
        loader = transformers.AutoModelForImageClassification if classifier else transformers.AutoModel
    return loader.from_pretrained(path, attn_implementation="eager").eval()


def _image_folder(root, count=7):
    """`count` images of every PIL mode the command reads, opaque, in class subfolders, not 16x16."""
    rng = np.random.default_rng(0)
    modes = ["RGB", "L", "RGBA", "P"]
    for i in range(count):
        image = Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8))
        mode = modes[i % len(modes)]
        image = image.convert(mode, palette=Image.Palette.ADAPTIVE) if mode == "P" else image.convert(mode)
        (root / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        image.save(root / f"class{i % 2}" / f"{i}.png")
    return root


def _folder_images(root):
    """The folder's images in the order that `imagefolder` reads them, as RGB."""
    from datasets import load_dataset

    dataset = load_dataset("imagefolder", data_files={"train": str(root / "**")}, drop_labels=False)["train"]
    return [image.convert("RGB") for image in dataset["image"]]


def _eager_cls_probabilities(twin, images):
    """Per layer, the eager attention probabilities of the [CLS] token to the patches, `[N, heads, patches]`
    float64, of `images` resized to 16 px."""
    processor = vit_image_processor_class()(size={"height": 16, "width": 16})
    pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        attentions = twin(pixel_values=pixel_values, output_attentions=True).attentions
    return [probs[:, :, 0, -GRID[0] * GRID[1] :].double() for probs in attentions]


def _reference(twin, images, layers):
    """Per-image entropies and region counts `[N, len(layers), heads]` from the eager attention probabilities."""
    probabilities = _eager_cls_probabilities(twin, images)
    entropy, regions = [], []
    for layer in layers:
        log_probs = probabilities[layer].log()  # [N, heads, patches]
        maps = log_probs.reshape(-1, log_probs.shape[-1])
        entropy.append([reference_entropy(row[None, None], GRID) for row in maps])
        masks = (maps > maps.mean(-1, keepdim=True)).reshape(-1, *GRID).numpy()
        regions.append([scipy.ndimage.label(mask, structure=np.ones((3, 3)))[1] for mask in masks])
    shape = (len(layers), len(images), -1)
    return np.array(entropy).reshape(shape).transpose(1, 0, 2), np.array(regions).reshape(shape).transpose(1, 0, 2)


def _check_report(report, entropy, regions, layers, model):
    assert set(report) == {"model", "images", "layers"} and report["model"] == model
    assert report["images"] == len(entropy)
    assert [entry["layer"] for entry in report["layers"]] == layers
    for i, entry in enumerate(report["layers"]):
        assert set(entry) == KEYS
        values = entropy[:, i]  # [N, heads]
        np.testing.assert_allclose(entry["head_entropy_mean"], values.mean(0), atol=1e-5)
        for h, (low, high) in enumerate(entry["head_entropy_ci95"]):
            mean, sem = values[:, h].mean(), stats.sem(values[:, h])
            # A head whose maps all have one region (entropy 0) has an interval of width 0; scipy's is NaN.
            expected = stats.t.interval(0.95, len(values) - 1, loc=mean, scale=sem) if sem > 0 else (mean, mean)
            np.testing.assert_allclose([low, high], expected, atol=1e-5)
        assert entry["entropy_mean"] == pytest.approx(values.mean(), abs=1e-5)
        assert entry["regions_mean"] == pytest.approx(regions[:, i].mean(), abs=1e-12)


@pytest.fixture
def forward_passes(monkeypatch):
    """`(batch size, attention implementation)` of every forward pass of the model that the command loads."""
    passes = []
    load_model = inspect_attention.load_model

    def recording(*args, **kwargs):
        model = load_model(*args, **kwargs)
        model.register_forward_pre_hook(
            lambda module, a, k: passes.append((k["pixel_values"].shape[0], module.config._attn_implementation)),
            with_kwargs=True,
        )
        return model

    monkeypatch.setattr(inspect_attention, "load_model", recording)
    return passes


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_against_eager_attention_probabilities(tmp_path, family, forward_passes):
    """Every layer and head, on a folder of mixed-mode images, from one SDPA pass per batch."""
    path = _checkpoint(tmp_path, family)
    folder = _image_folder(tmp_path / "images")
    out = tmp_path / "out"
    report = main(["--model", str(path), "--images", str(folder), "--output", str(out), "--batch_size", "3"])

    assert json.loads((out / "inspect.json").read_text()) == report
    entropy, regions = _reference(_eager_twin(path, family), _folder_images(folder), [0, 1, 2])
    _check_report(report, entropy, regions, [0, 1, 2], str(path))
    assert regions.max() >= 2 and regions.min() >= 1  # maps with several regions among them
    # One forward pass per batch of 3 (7 images), with the attention the checkpoint was loaded with.
    assert forward_passes == [(3, "sdpa"), (3, "sdpa"), (1, "sdpa")]
    for name in ("entropy_by_layer.png", "attention_layer_2.png"):
        with Image.open(out / name) as png:
            assert png.format == "PNG"


def test_the_bundled_digits_and_chosen_layers(tmp_path, forward_passes, monkeypatch):
    """A SAR ViT on the digits' 360 test images, layers chosen out of order, the maps drawn at a layer not measured."""
    drawn, draw = [], inspect_attention.draw_attention_figure
    monkeypatch.setattr(inspect_attention, "draw_attention_figure", lambda *args: drawn.append(args) or draw(*args))
    path = _checkpoint(tmp_path, "sar-vit")
    out = tmp_path / "digits"
    args = ["--model", str(path), "--images", "digits", "--output", str(out), "--layers", "-1", "1"]
    report = main([*args, "--figure_layer", "0", "--figure_images", "3", "--batch_size", "128"])
    images = [image.convert("RGB") for image in load_digits_dataset()["test"]["image"]]
    twin = _eager_twin(path, "sar-vit")
    entropy, regions = _reference(twin, images, [1, 2])
    _check_report(report, entropy, regions, [1, 2], str(path))
    assert len(forward_passes) == 3
    from sar_hf.visualization import CELL_INCHES, DPI

    with Image.open(out / "attention_layer_0.png") as png:  # 3 images, an image and 2 panels per head
        assert png.size == (CELL_INCHES * DPI * (1 + 2 * 2), CELL_INCHES * DPI * 3)
    assert not (out / "attention_layer_2.png").exists()
    # What the figure shows: the first 3 images as they are, and their layer-0 maps, labelled with the checkpoint.
    ((scores, pictures, png),) = drawn
    assert list(scores) == [f"{path.name}, layer 0"] and png == os.path.join(str(out), "attention_layer_0.png")
    assert [np.asarray(picture.convert("RGB")).tolist() for picture in pictures] == [
        np.asarray(image).tolist() for image in images[:3]
    ]
    kept, grid_size = scores[f"{path.name}, layer 0"]
    probs = _eager_cls_probabilities(twin, images[:3])[0]
    assert grid_size == GRID and kept.shape == probs.shape
    torch.testing.assert_close(
        kept.double().log_softmax(-1), (probs / probs.sum(-1, keepdim=True)).log(), atol=1e-4, rtol=0
    )


def test_a_checkpoint_saved_without_its_image_processor(tmp_path):
    """The images are then resized to the model's own size by a ViT image processor."""
    path = _checkpoint(tmp_path, "vit_msn", processor=False)
    folder = _image_folder(tmp_path / "images", count=3)
    report = main(["--model", str(path), "--images", str(folder), "--output", str(tmp_path / "out")])
    entropy, regions = _reference(_eager_twin(path, "vit_msn"), _folder_images(folder), [0, 1, 2])
    _check_report(report, entropy, regions, [0, 1, 2], str(path))


def test_summarise_by_hand():
    """The report's arithmetic on numbers worked out by hand: t(0.975, 2) = 4.302653."""
    entropy = np.array([[[0.1, 1.0]], [[0.2, 1.0]], [[0.3, 1.0]]])  # 3 images, 1 layer, 2 heads
    regions = np.array([[[1, 2]], [[3, 4]], [[5, 6]]])
    (entry,) = summarise("m", entropy, regions, [7])["layers"]
    half = 4.302653 * 0.1 / math.sqrt(3)  # sd of 0.1, 0.2, 0.3 is 0.1
    assert entry["layer"] == 7 and entry["head_entropy_mean"] == pytest.approx([0.2, 1.0])
    assert entry["head_entropy_ci95"] == [pytest.approx([0.2 - half, 0.2 + half], abs=1e-6), pytest.approx([1, 1])]
    assert entry["entropy_mean"] == pytest.approx(0.6) and entry["regions_mean"] == pytest.approx(3.5)
    (two,) = summarise("m", entropy[:2], regions[:2], [7])["layers"]  # the smallest N with an interval
    half = 12.706205 * math.sqrt(0.005) / math.sqrt(2)  # t(0.975, 1); sd of 0.1, 0.2 is sqrt(0.005)
    assert two["head_entropy_ci95"][0] == pytest.approx([0.15 - half, 0.15 + half], abs=1e-6)
    one = summarise("m", entropy[:1], regions[:1], [7])
    assert one["images"] == 1 and one["layers"][0]["head_entropy_ci95"] == [[None, None], [None, None]]
    json.dumps(one, allow_nan=False)  # valid JSON: no NaN


def test_measure_batches_sends_each_to_the_models_device_and_dtype_and_keeps_the_first_scores(monkeypatch):
    """`measure` with a stand-in model on the "meta" device in float16 (as a checkpoint on a GPU in half precision):
    each batch of `batch_size` images reaches the model there, in its dtype; the statistics are those of every
    image's scores, in order; the scores of the first `keep` images come back (none by default)."""
    from datasets import Dataset

    calls, returned = [], []

    class Model:
        device, dtype = torch.device("meta"), torch.float16

        def __call__(self, pixel_values):
            calls.append((pixel_values.device, pixel_values.dtype, tuple(pixel_values.shape)))

    class Capture:  # the scores of the last forward pass: random, one map per (layer, head)
        def __init__(self, model, layer):
            self.layers = layer

        def pop(self):
            returned.append(torch.randn(calls[-1][2][0], len(self.layers), 2, 16, dtype=torch.float16))
            return returned[-1], GRID, None

        def remove(self):
            pass

    monkeypatch.setattr(inspect_attention, "CLSScoreCapture", Capture)
    rng = np.random.default_rng(0)
    images = Dataset.from_dict(
        {"picture": [Image.fromarray(rng.integers(0, 256, (20, 24), dtype=np.uint8)) for _ in range(5)]}
    )
    processor = vit_image_processor_class()(size={"height": 16, "width": 16})
    for keep, kept_images in ((None, 0), (3, 3), (9, 5)):
        calls.clear(), returned.clear()
        kwargs = {} if keep is None else {"keep": keep}
        entropy, regions, kept, grid_size = inspect_attention.measure(Model(), processor, images, [0, 2], 2, **kwargs)
        assert calls == [(torch.device("meta"), torch.float16, (n, 3, 16, 16)) for n in (2, 2, 1)]
        scores = torch.cat(returned)
        expected_entropy, expected_regions = map_statistics(scores, GRID)
        np.testing.assert_array_equal(entropy, expected_entropy.numpy())
        np.testing.assert_array_equal(regions, expected_regions.numpy())
        assert grid_size == GRID and kept.dtype == torch.float32
        torch.testing.assert_close(kept, scores[:kept_images].float(), rtol=0, atol=0)


def test_map_statistics_by_hand():
    """Two layers of one head on a 2x3 grid: a map with two regions above its mean, and one with none."""
    two = torch.tensor([5.0, 0.0, 5.0, 0.0, 0.0, 0.0])  # mean 5/3: two cells, apart -> two regions of mass 1/2
    flat = torch.zeros(6)
    entropy, regions = map_statistics(torch.stack([two, flat])[None, :, None], (2, 3))
    assert entropy.shape == regions.shape == (1, 2, 1)
    assert entropy[0, :, 0].tolist() == pytest.approx([math.log(2), 0.0]) and regions[0, :, 0].tolist() == [2, 0]
    nan, inf = flat.clone().fill_(float("nan")), two.clone().index_fill_(0, torch.tensor([4]), float("inf"))
    with pytest.raises(ValueError, match=r"^2 \[CLS\] map\(s\) hold non-finite scores; their entropy is undefined.$"):
        map_statistics(torch.stack([two, nan, inf, flat])[None, :, None], (2, 3))  # one bad score spoils a map


def test_layer_indices():
    assert layer_indices(None, 3) == [0, 1, 2]
    assert layer_indices([-1, 0, 2], 3) == [0, 2]
    assert layer_indices([-3, 1, 1], 3) == [0, 1]  # -3 is the first of 3 layers; repeats collapse
    with pytest.raises(ValueError, match=r"^--layers 3 is out of range: the model has 3 layers \(0..2, or -3..-1\).$"):
        layer_indices([3], 3)
    with pytest.raises(ValueError, match=r"^--figure_layer -4 is out of range"):
        layer_indices([-4], 3, "--figure_layer")


def test_arguments_are_checked_as_they_are_parsed():
    """The smallest accepted values, the messages for the values below them, and where the results go by default."""
    args = InspectArguments(model="runs/my-ckpt/", images="digits", batch_size=1, max_images=1, figure_images=0)
    assert args.output == os.path.join("outputs", "inspect-my-ckpt")
    assert InspectArguments(model="m", images="digits", output="here").output == "here"
    for flag, value, message in [
        ("batch_size", 0, "--batch_size must be at least 1, got 0."),
        ("max_images", 0, "--max_images must be at least 1, got 0."),
        ("figure_images", -1, "--figure_images must be >= 0, got -1."),
    ]:
        with pytest.raises(ValueError, match=f"^{message}$"):
            InspectArguments(model="m", images="digits", **{flag: value})


def _split(count, column="image", start=0):
    """A `datasets.Dataset` of `count` distinct 4x4 grey images (pixel value = start + index) and a label column."""
    import datasets

    images = [Image.new("L", (4, 4), start + i) for i in range(count)]
    features = datasets.Features({column: datasets.Image(), "label": datasets.Value("int64")})
    return datasets.Dataset.from_dict({column: images, "label": list(range(count))}, features=features)


def _grey_levels(images):
    return [image.getpixel((0, 0)) for image in images[images.column_names[0]]]


@pytest.mark.parametrize(
    "splits, expected",
    [
        (("train", "validation", "test"), "test"),
        (("train", "validation"), "validation"),
        (("validation", "train"), "validation"),
        (("train",), "train"),
        (("holdout", "extra"), "holdout"),  # none preferred: the first
    ],
)
def test_the_split_measured_by_default(monkeypatch, splits, expected):
    from datasets import DatasetDict

    data = DatasetDict({name: _split(2, start=10 * i) for i, name in enumerate(splits)})
    monkeypatch.setattr(inspect_attention, "load_image_dataset", lambda *a, **k: data)
    images = inspect_attention.load_images(InspectArguments(model="m", images="somewhere"))
    assert _grey_levels(images) == _grey_levels(data[expected])


def test_max_images_and_a_split_that_is_not_there(monkeypatch):
    from datasets import DatasetDict

    data = DatasetDict({"train": _split(3), "test": _split(5, start=100)})
    monkeypatch.setattr(inspect_attention, "load_image_dataset", lambda *a, **k: data)

    def load(**kwargs):
        return inspect_attention.load_images(InspectArguments(model="m", images="somewhere", **kwargs))

    assert _grey_levels(load(max_images=2)) == [100, 101]  # the first ones
    assert _grey_levels(load(max_images=1)) == [100]
    assert _grey_levels(load(max_images=9)) == [100, 101, 102, 103, 104]
    assert _grey_levels(load(split="train", max_images=2)) == [0, 1]
    with pytest.raises(ValueError, match=r"^--split 'validation': the data has the splits \['train', 'test'\].$"):
        load(split="validation")


def test_images_from_a_folder_of_data_files(tmp_path):
    """A folder of parquet files is a `datasets` name (its splits, its columns), not a folder of images."""
    _split(3, column="picture").to_parquet(str(tmp_path / "train.parquet"))
    _split(5, column="picture", start=100).to_parquet(str(tmp_path / "test.parquet"))

    def load(**kwargs):
        args = InspectArguments(model="m", images=str(tmp_path), image_column_name="picture", **kwargs)
        return inspect_attention.load_images(args)

    images = load()
    assert images.column_names == ["picture"] and _grey_levels(images) == [100, 101, 102, 103, 104]  # test
    assert _grey_levels(load(split="train")) == [0, 1, 2]
    assert _grey_levels(load(max_images=2)) == [100, 101]  # the first ones
    assert _grey_levels(load(max_images=1)) == [100]
    assert _grey_levels(load(max_images=9)) == [100, 101, 102, 103, 104]
    with pytest.raises(ValueError, match=r"^--split 'validation': the data has the splits \['train', 'test'\].$"):
        load(split="validation")
    with pytest.raises(ValueError, match="no column 'image'"):
        inspect_attention.load_images(InspectArguments(model="m", images=str(tmp_path)))


def test_what_counts_as_a_folder_of_images(tmp_path, monkeypatch):
    (tmp_path / "images" / "cat").mkdir(parents=True)
    (tmp_path / "images" / "cat" / "a.PNG").write_bytes(b"")
    (tmp_path / "empty").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.parquet").write_bytes(b"")
    (tmp_path / "digits").mkdir()  # a folder named like a bundled dataset: the name wins
    (tmp_path / "digits" / "a.png").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    folders = ("images", "empty", "data", "digits", "images/cat/a.PNG", "missing")
    assert [inspect_attention.is_image_folder(name) for name in folders] == [True, True, False, False, False, False]


def test_a_split_without_images_is_refused(monkeypatch):
    from datasets import DatasetDict

    monkeypatch.setattr(inspect_attention, "load_image_dataset", lambda *a, **k: DatasetDict({"test": _split(0)}))
    with pytest.raises(ValueError, match=r"^The 'test' split of somewhere holds no images.$"):
        inspect_attention.load_images(InspectArguments(model="m", images="somewhere"))


def test_errors_say_what_is_wrong(tmp_path):
    folder = _image_folder(tmp_path / "images", count=2)

    def run(model, images=folder, *extra):
        return main(["--model", str(model), "--images", str(images), "--output", str(tmp_path / "out"), *extra])

    bert = tmp_path / "bert"
    config = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, vocab_size=99)
    transformers.BertModel(transformers.BertConfig(**config)).save_pretrained(bert)
    with pytest.raises(ValueError, match="'bert' model, which does not cut images into patches"):
        run(bert)
    swin = tmp_path / "swin"
    config = dict(image_size=16, patch_size=4, embed_dim=8, depths=[1], num_heads=[2], window_size=2)
    transformers.SwinModel(transformers.SwinConfig(**config)).save_pretrained(swin)
    with pytest.raises(ValueError, match="attends within windows"):
        run(swin)
    odd = _checkpoint(tmp_path, "vit")
    vit_image_processor_class()(size={"height": 18, "width": 18}).save_pretrained(odd)
    with pytest.raises(ValueError, match="Images of 18x18 pixels do not tile into 4x4 patches"):
        run(odd)
    vit = _checkpoint(tmp_path, "deit")
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(ValueError, match="holds no image files"):
        run(vit, tmp_path / "empty")
    with pytest.raises(ValueError, match="--layers 3 is out of range"):
        run(vit, folder, "--layers", "3")
    with pytest.raises(ValueError, match=r"--split 'test': the data has the splits \['train'\]"):
        run(vit, folder, "--split", "test")
    with pytest.raises(ValueError, match="--batch_size must be at least 1"):
        run(vit, folder, "--batch_size", "0")
    with pytest.raises(
        ValueError, match=r"^--figure_layer 3 is out of range: the model has 3 layers \(0..2, or -3..-1\).$"
    ):
        run(vit, folder, "--figure_layer", "3")


def test_a_two_tower_checkpoint_without_its_processor_is_refused_with_the_reason(tmp_path):
    """A SigLIP checkpoint (image size and layers in its `vision_config`, no [CLS] token), saved without its image
    processor: the command reads its image tower's size and depth, and the refusal says why (not an AttributeError)."""
    text = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2, vocab_size=99)
    config = transformers.SiglipConfig(text_config=text, vision_config=TINY)
    transformers.SiglipModel(config).save_pretrained(tmp_path / "siglip")
    args = ["--model", str(tmp_path / "siglip"), "--images", str(_image_folder(tmp_path / "images", count=2))]
    with pytest.raises(ValueError, match=r"^SiglipModel has no \[CLS\] token"):
        main([*args, "--output", str(tmp_path / "out")])


class _TorchWithAGPU:
    """torch as the command sees it on a machine with a GPU (the model's `to` is recorded, not run)."""

    cuda = type("cuda", (), {"is_available": staticmethod(lambda: True)})

    def __getattr__(self, name):
        return getattr(torch, name)


def test_what_the_command_prints_and_logs(tmp_path, monkeypatch, capsys):
    """A user's terminal: the progress bar, the log lines (INFO and up, in the format set), one line per layer;
    and the model moved to the GPU when there is one."""
    path = _checkpoint(tmp_path, "vit_msn", processor=False)
    folder = _image_folder(tmp_path / "images", count=3)
    out = tmp_path / "out"
    moves = []
    load_model = inspect_attention.load_model

    def recording(*args, **kwargs):
        model = load_model(*args, **kwargs)
        model.to = lambda device: moves.append(device) or model
        return model

    monkeypatch.setattr(inspect_attention, "load_model", recording)
    monkeypatch.setattr(inspect_attention, "torch", _TorchWithAGPU())
    captured, measure = [], inspect_attention.measure

    def recording_measure(model, processor, images, layers, *args, **kwargs):
        captured.append(layers)
        return measure(model, processor, images, layers, *args, **kwargs)

    monkeypatch.setattr(inspect_attention, "measure", recording_measure)
    out.mkdir()  # a folder that is there already (a rerun) is written into
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    root.handlers.clear()  # as in a fresh process, where `main` sets the logging up
    root.setLevel(logging.WARNING)
    try:
        args = ["--model", str(path), "--images", str(folder), "--output", str(out), "--layers", "2", "0"]
        report = main([*args, "--batch_size", "2", "--figure_images", "0", "--figure_layer", "1"])
    finally:
        root.handlers[:], root.level = handlers, level
    printed, err = capsys.readouterr()
    assert moves == ["cuda"]
    assert captured == [[0, 2]]  # no maps drawn: the figure's layer is not captured
    assert printed.splitlines() == [
        f"layer {entry['layer']:>2}: entropy {entry['entropy_mean']:.3f} nats, {entry['regions_mean']:.2f} regions"
        for entry in report["layers"]
    ]
    assert [entry["layer"] for entry in report["layers"]] == [0, 2] and report["images"] == 3
    name = "sar_hf.scripts.inspect_attention"
    warning = f"WARNING - {name} - {path} has no image processor; resizing to its 16 px with a ViTImageProcessor."
    assert warning in err.splitlines()
    assert f"INFO - {name} - 3 images, 2 layers: {out}" in err.splitlines()
    assert re.search(
        r"\[CLS\] maps: 100%.*\| 2/2 \[[^\]]*[0-9?](batch/s|s/batch)\]", err
    )  # two batches of up to 2 images
    assert sorted(os.listdir(out)) == ["entropy_by_layer.png", "inspect.json"]  # no maps drawn
    assert (out / "inspect.json").read_text(encoding="utf-8") == json.dumps(report, indent=2)  # for people to read


def test_the_hub_settings_reach_every_download(tmp_path, monkeypatch):
    """--cache_dir and --token go to each thing that may come from the Hub: the config, the model (a backbone, a
    classifier, CLIP's image tower), its image processor and the dataset."""
    calls = []

    def recorder(what, load):
        def recorded(*args, **kwargs):
            calls.append((what, kwargs.get("cache_dir"), kwargs.get("token")))
            return load(*args, **kwargs)

        return recorded

    for name in ("AutoConfig", "AutoModel", "AutoModelForImageClassification"):
        loader = getattr(inspect_attention, name).from_pretrained
        monkeypatch.setattr(inspect_attention, name, SimpleNamespace(from_pretrained=recorder(name, loader)))
    clip = recorder("CLIPVisionModel", transformers.CLIPVisionModel.from_pretrained)
    monkeypatch.setattr(transformers.CLIPVisionModel, "from_pretrained", clip)  # imported where it is used
    for name in ("load_image_processor", "load_image_dataset"):
        monkeypatch.setattr(inspect_attention, name, recorder(name, getattr(inspect_attention, name)))
    cache, token = str(tmp_path / "cache"), "hf_not_a_real_token"
    args = ["--images", "digits", "--max_images", "2", "--figure_images", "0", "--output", str(tmp_path / "out")]
    main(["--model", str(_checkpoint(tmp_path, "vit")), *args, "--cache_dir", cache, "--token", token])
    for family in ("deit", "clip"):
        inspect_attention.load_model(str(_checkpoint(tmp_path, family)), cache, token)
    loaded = ["AutoConfig", "AutoModel", "load_image_processor", "load_image_dataset"]
    loaded += ["AutoConfig", "AutoModelForImageClassification", "AutoConfig", "CLIPVisionModel"]
    assert calls == [(what, cache, token) for what in loaded]


def test_the_command_line_of_the_process_and_the_help(monkeypatch, capsys):
    """`main()` reads the process's arguments (`python -m sar_hf.scripts.inspect_attention --help`); the help
    starts with the docstring's first paragraph."""
    monkeypatch.setattr(sys, "argv", ["inspect_attention.py", "--help"])
    with pytest.raises(SystemExit) as raised:
        main()
    assert raised.value.code == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert printed.startswith("usage: sar-hf inspect ")
    description = printed.split(" options: ")[0]  # after the usage, before the flags
    assert description.endswith(" " + " ".join(inspect_attention.__doc__.split("\n\n")[0].split()))
