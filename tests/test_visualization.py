"""`sar_hf.visualization` and `examples/visualize_attention.py` on tiny random ViTs."""

import importlib
import importlib.util
import pathlib
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

import sar_hf.visualization
from sar_hf import SARViTConfig, SARViTForImageClassification, connected_components, spatial_entropy
from sar_hf.visualization import CELL_INCHES, DPI, cls_attention, save_attention_figure

TINY = dict(
    image_size=16,
    patch_size=4,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=37,
    num_labels=3,
)
CELL = round(CELL_INCHES * DPI)  # pixels per panel side
ROOT = pathlib.Path(__file__).resolve().parents[1]


def expected_size(images: int, models: int, heads: int) -> tuple[int, int]:
    """(width, height) in pixels: an image column plus a map and a region panel per head; a row per image and model."""
    return CELL * (1 + 2 * heads), CELL * images * models


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    sar = SARViTForImageClassification(SARViTConfig(**TINY))
    baseline = ViTForImageClassification(ViTConfig(**TINY))  # SDPA, so cls_attention must switch to eager
    baseline.load_state_dict(sar.state_dict())
    return {"baseline": baseline, "SAR": sar}


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)  # not 16x16 and not square: the processor resizes them
    return [Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)) for _ in range(2)]


@pytest.fixture(scope="module")
def processor():
    return ViTImageProcessor(size={"height": 16, "width": 16})


def test_figure_size_one_model(models, images, processor, tmp_path):
    path = save_attention_figure({"SAR": models["SAR"]}, images, processor, tmp_path / "sub" / "one.png")
    assert path == tmp_path / "sub" / "one.png"
    with Image.open(path) as png:
        assert png.format == "PNG"
        assert png.size == expected_size(images=2, models=1, heads=2)


def test_two_models_stack_rows(models, images, processor, tmp_path):
    one = save_attention_figure({"SAR": models["SAR"]}, images, processor, tmp_path / "one.png")
    two = save_attention_figure(models, images, processor, tmp_path / "two.png")
    with Image.open(one) as a, Image.open(two) as b:
        assert b.size == expected_size(images=2, models=2, heads=2)
        assert b.width == a.width and b.height == 2 * a.height


def test_heads_limits_columns(models, images, processor, tmp_path):
    path = save_attention_figure(models, images[:1], processor, tmp_path / "heads.png", heads=1)
    with Image.open(path) as png:
        assert png.size == expected_size(images=1, models=2, heads=1)


@pytest.fixture
def saved_figures(monkeypatch) -> list:
    """The matplotlib figures that `save_attention_figure` saves, kept to find each panel's cells in the PNG."""
    from matplotlib.figure import Figure

    figures, savefig = [], Figure.savefig

    def keep(figure, *args, **kwargs):
        figures.append(figure)
        return savefig(figure, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    return figures


def cell_colours(png: np.ndarray, ax, grid: tuple[int, int]) -> np.ndarray:
    """The PNG's RGB `[gh, gw, 3]` at the centre of each grid cell that `ax` shows (`imshow` puts the
    cell of row r and column c at the data point (c, r); display y counts from the bottom)."""
    gh, gw = grid
    centres = ax.transData.transform([(c, r) for r in range(gh) for c in range(gw)])
    return np.array([png[int(png.shape[0] - y), int(x)] for x, y in centres]).reshape(gh, gw, 3)


def inferno_values(colours: np.ndarray) -> np.ndarray:
    """RGB colours of the inferno colormap -> the values in [0, 1] that it gave them."""
    from matplotlib import colormaps

    table = colormaps["inferno"](np.linspace(0, 1, 256))[:, :3] * 255
    distances = ((colours[..., None, :].astype(float) - table) ** 2).sum(-1)
    return distances.argmin(-1) / 255


def test_region_and_map_panels_show_each_maps_regions_and_softmax(images, processor, tmp_path, saved_figures):
    """The PNG's pixels against a reference computed here: the [CLS] attention of an eager plain ViT
    with the same weights, regions above the mean by `connected_components`, softmax over the patches."""
    settings = {**TINY, "initializer_range": 0.2}  # scores spread well away from their mean
    torch.manual_seed(0)
    model = SARViTForImageClassification(SARViTConfig(**settings))
    path = save_attention_figure({"SAR": model}, images, processor, tmp_path / "maps.png")
    with Image.open(path) as png:
        pixels = np.asarray(png.convert("RGB"))
    (figure,) = saved_figures

    eager = ViTForImageClassification(ViTConfig(**settings, attn_implementation="eager")).eval()
    eager.load_state_dict(model.state_dict())
    with torch.no_grad():
        attentions = eager(processor(images, return_tensors="pt")["pixel_values"], output_attentions=True).attentions
    probs = attentions[-1][:, :, 0, 1:]  # [B, heads, patches]: [CLS] to the patches, whose scores they order
    grid, heads = (4, 4), TINY["num_attention_heads"]
    mask = probs.log() > probs.log().mean(-1, keepdim=True)
    regions = connected_components(mask.reshape(*mask.shape[:2], *grid)).numpy()
    maps = (probs / probs.sum(-1, keepdim=True)).reshape(regions.shape).numpy()  # softmax of the scores
    assert regions.max() >= 2 and (regions == 0).any()  # maps with background and several regions

    for i in range(len(images)):
        for h in range(heads):
            panels = figure.axes[i * (1 + 2 * heads) + 1 + 2 * h :][:2]  # the map, then its regions
            colours = cell_colours(pixels, panels[1], grid)
            assert ((colours == 0).all(-1) == (regions[i, h] == 0)).all(), (i, h)  # black: not above the mean
            same_colour = (colours[:, :, None, None] == colours[None, None]).all(-1)
            same_region = regions[i, h][:, :, None, None] == regions[i, h][None, None]
            assert (same_colour == same_region).all(), (i, h)  # one colour per region
            expected = (maps[i, h] - maps[i, h].min()) / (maps[i, h].max() - maps[i, h].min())  # imshow's scaling
            np.testing.assert_allclose(inferno_values(cell_colours(pixels, panels[0], grid)), expected, atol=0.01)


def test_cls_attention_sar_equals_eager_vit(models, images, processor):
    baseline, sar = models["baseline"], models["SAR"]
    baseline.train()  # the flags must come back, and dropout must be off meanwhile
    sar.eval()
    pixel_values = processor(images, return_tensors="pt")["pixel_values"]

    fast, grid = cls_attention(sar, pixel_values)
    eager, eager_grid = cls_attention(baseline, pixel_values)

    assert grid == eager_grid == (4, 4)
    assert fast.shape == eager.shape == (2, 2, 16)
    # Raw scores vs log-probabilities: equal up to one constant per row.
    centred = [scores - scores.mean(-1, keepdim=True) for scores in (fast, eager)]
    torch.testing.assert_close(*centred, atol=1e-5, rtol=0)
    entropies = [spatial_entropy(scores, grid, reduction="none") for scores in (fast, eager)]
    torch.testing.assert_close(*entropies, atol=1e-5, rtol=0)
    assert baseline.training and not sar.training
    assert baseline.config._attn_implementation == "sdpa" and not baseline.config.output_attentions


def test_import_does_not_load_matplotlib(monkeypatch):
    for name in [name for name in sys.modules if name.split(".")[0] == "matplotlib"]:
        monkeypatch.delitem(sys.modules, name)  # put back after the test
    importlib.reload(sar_hf.visualization)
    assert not any(name.split(".")[0] == "matplotlib" for name in sys.modules)


def test_example_main(models, images, processor, tmp_path):
    for name, model in models.items():
        model.save_pretrained(tmp_path / name)
        processor.save_pretrained(tmp_path / name)
    files = []
    for i, image in enumerate(images):
        files.append(tmp_path / f"image{i}.png")
        image.save(files[-1])
    spec = importlib.util.spec_from_file_location("visualize_attention", ROOT / "examples" / "visualize_attention.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)

    output = tmp_path / "attention.png"
    argv = ["--model", str(tmp_path / "baseline"), "--model", str(tmp_path / "SAR"), "--labels", "baseline", "SAR"]
    path = example.main([*argv, "--images", *map(str, files), "--output", str(output), "--heads", "1"])

    assert path == output
    with Image.open(output) as png:
        assert png.size == expected_size(images=2, models=2, heads=1)
    with pytest.raises(SystemExit):  # one label for two models
        example.main([*argv[:-1], "--images", str(files[0])])
