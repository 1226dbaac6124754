"""`sar-hf inspect` (sar_hf/scripts/inspect_attention.py) against an independent computation.

The reference loads each checkpoint again with eager attention and `output_attentions=True`: the
log of the [CLS] row of its attention probabilities is the pre-softmax scores shifted by one
constant per row, so its spatial entropy (a float64 loop with scipy, tests/references.py), its
regions (scipy's labelling) and their t intervals (scipy.stats) must be what the command wrote.
"""

import json
import math

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
from sar_hf.scripts.inspect_attention import layer_indices, main, map_statistics, summarise

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


def _reference(twin, images, layers):
    """Per-image entropies and region counts `[N, len(layers), heads]` from the eager attention probabilities."""
    processor = vit_image_processor_class()(size={"height": 16, "width": 16})
    pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        attentions = twin(pixel_values=pixel_values, output_attentions=True).attentions
    entropy, regions = [], []
    for layer in layers:
        log_probs = attentions[layer][:, :, 0, -GRID[0] * GRID[1] :].double().log()  # [N, heads, patches]
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


def test_the_bundled_digits_and_chosen_layers(tmp_path, forward_passes):
    """A SAR ViT on the digits' 360 test images, layers chosen out of order, the maps drawn at a layer not measured."""
    path = _checkpoint(tmp_path, "sar-vit")
    out = tmp_path / "digits"
    args = ["--model", str(path), "--images", "digits", "--output", str(out), "--layers", "-1", "1"]
    report = main([*args, "--figure_layer", "0", "--figure_images", "3", "--batch_size", "128"])
    images = [image.convert("RGB") for image in load_digits_dataset()["test"]["image"]]
    entropy, regions = _reference(_eager_twin(path, "sar-vit"), images, [1, 2])
    _check_report(report, entropy, regions, [1, 2], str(path))
    assert len(forward_passes) == 3
    from sar_hf.visualization import CELL_INCHES, DPI

    with Image.open(out / "attention_layer_0.png") as png:  # 3 images, an image and 2 panels per head
        assert png.size == (CELL_INCHES * DPI * (1 + 2 * 2), CELL_INCHES * DPI * 3)
    assert not (out / "attention_layer_2.png").exists()


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
    one = summarise("m", entropy[:1], regions[:1], [7])
    assert one["images"] == 1 and one["layers"][0]["head_entropy_ci95"] == [[None, None], [None, None]]
    json.dumps(one, allow_nan=False)  # valid JSON: no NaN


def test_map_statistics_by_hand():
    """Two layers of one head on a 2x3 grid: a map with two regions above its mean, and one with none."""
    two = torch.tensor([5.0, 0.0, 5.0, 0.0, 0.0, 0.0])  # mean 5/3: two cells, apart -> two regions of mass 1/2
    flat = torch.zeros(6)
    entropy, regions = map_statistics(torch.stack([two, flat])[None, :, None], (2, 3))
    assert entropy.shape == regions.shape == (1, 2, 1)
    assert entropy[0, :, 0].tolist() == pytest.approx([math.log(2), 0.0]) and regions[0, :, 0].tolist() == [2, 0]
    with pytest.raises(ValueError, match=r"1 \[CLS\] map\(s\) hold non-finite scores"):
        map_statistics(torch.stack([two, flat.clone().fill_(float("nan"))])[None, :, None], (2, 3))


def test_layer_indices():
    assert layer_indices(None, 3) == [0, 1, 2]
    assert layer_indices([-1, 0, 2], 3) == [0, 2]
    with pytest.raises(ValueError, match=r"--layers 3 is out of range: the model has 3 layers \(0..2, or -3..-1\)"):
        layer_indices([3], 3)
    with pytest.raises(ValueError, match="--figure_layer -4 is out of range"):
        layer_indices([-4], 3, "--figure_layer")


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
