"""`sar_hf.visualization` and `examples/visualize_attention.py` on tiny random ViTs."""

import importlib
import importlib.util
import pathlib
import sys

import numpy as np
import pytest
import scipy.ndimage
import torch
from PIL import Image
from references import reference_entropy
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

import sar_hf.visualization
from sar_hf import SARViTConfig, SARViTForImageClassification, connected_components, spatial_entropy
from sar_hf.visualization import CELL_INCHES, DPI, cls_attention, draw_attention_figure, save_attention_figure

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


def softmax(scores: np.ndarray) -> np.ndarray:
    exp = np.exp(scores - scores.max(-1, keepdims=True))
    return exp / exp.sum(-1, keepdims=True)


def region_colours() -> np.ndarray:
    """Black for the background, then tab20's 20 colours: [21, 3]."""
    from matplotlib import colormaps

    return np.array([(0.0, 0.0, 0.0), *colormaps["tab20"].colors])


def scipy_regions(scores: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """8-connected regions of the patches scoring above the map's mean, numbered by scipy in raster order."""
    return scipy.ndimage.label((scores > scores.mean()).reshape(grid), structure=np.ones((3, 3)))[0]


def drawn_scores() -> dict:
    """Two sets of scores on different grids and with different numbers of heads; image 0's head 0 of
    set "A" has a single region above the mean (entropy 0), image 1's head 1 of set "B" one region above
    the mean and three patches exactly at it (not above it: else two regions), the others several."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(2, 3, 12, generator=generator) * 2
    a[0, 0] = torch.tensor([5.0, 4, 0, 0, 6, 0, 0, 0, 0, 0, 0, 0])  # one region: the top-left corner
    b = torch.randn(2, 2, 6, generator=generator) * 2
    b[1, 1] = torch.tensor([3.0, 0, 1, 1, 0, 1])  # mean 1: only the top-left patch is above it
    return {"A": (a, (3, 4)), "B": (b, (2, 3))}


@pytest.mark.parametrize("heads", [None, 2, 1])
def test_the_drawn_figure_shows_each_sets_maps_regions_and_entropies(tmp_path, saved_figures, heads):
    """Every panel of `draw_attention_figure` against numpy and scipy: the image, the softmax map with
    the map's spatial entropy (a float64 loop with scipy) in its title, the regions above the mean
    coloured from black and tab20 with their count, and the labels of each row."""
    scores = drawn_scores()
    images = [
        Image.fromarray(np.random.default_rng(1).integers(0, 256, (10, 14), dtype=np.uint8)),  # greyscale
        Image.new("RGBA", (8, 6), (200, 30, 90, 40)),
    ]
    path = draw_attention_figure(scores, images, str(tmp_path / "new" / "maps.png"), heads=heads)
    (figure,) = saved_figures

    shown = {name: min(values.shape[1], heads or values.shape[1]) for name, (values, _) in scores.items()}
    columns = 1 + 2 * max(shown.values())
    assert path == tmp_path / "new" / "maps.png" and isinstance(path, pathlib.Path)
    with Image.open(path) as png:
        assert (png.format, png.size) == ("PNG", (CELL * columns, CELL * 4))  # 2 images x 2 sets
    assert len(figure.axes) == 4 * columns
    for ax in figure.axes:  # pictures, not plots
        assert not len(ax.get_xticks()) and not len(ax.get_yticks()) and not ax.get_frame_on()

    for i, image in enumerate(images):
        for j, (name, (values, grid)) in enumerate(scores.items()):
            row = figure.axes[(2 * i + j) * columns :][:columns]
            assert row[0].get_ylabel() == f"{name}\nimage {i}"
            assert row[0].yaxis.label.get_fontsize() == 9  # two lines that fit beside a 200 px panel
            np.testing.assert_array_equal(row[0].images[0].get_array(), np.asarray(image.convert("RGB")))
            for h in range(shown[name]):
                s = values[i, h].double().numpy()
                picture, regions = row[1 + 2 * h], row[2 + 2 * h]
                (drawn,) = picture.images
                np.testing.assert_allclose(drawn.get_array(), softmax(s).reshape(grid), rtol=1e-5)
                assert (drawn.get_cmap().name, drawn.get_interpolation()) == ("inferno", "nearest")
                entropy = reference_entropy(values[i, h][None, None], grid)
                title = picture.get_title()
                assert picture.title.get_fontsize() == regions.title.get_fontsize() == 8
                assert title == f"head {h}: H = {float(title.rsplit(' ', 1)[1]):.3f}"
                assert float(title.rsplit(" ", 1)[1]) == pytest.approx(entropy, abs=6e-4), (name, i, h)
                labels = scipy_regions(s, grid)
                (coloured,) = regions.images
                np.testing.assert_array_equal(coloured.get_array(), region_colours()[labels])
                assert coloured.get_interpolation() == "nearest"
                count = labels.max()
                assert regions.get_title() == (f"{count} regions > mean" if count != 1 else "1 region > mean")
            for ax in row[1 + 2 * shown[name] :]:  # a set with fewer heads leaves its last panels empty
                assert not ax.images and not ax.get_title()
    assert figure.axes[1].get_title() == "head 0: H = 0.000"  # not "-0.000"
    assert figure.axes[2].get_title() == "1 region > mean"


def test_regions_beyond_twenty_cycle_through_the_twenty_colours(tmp_path, saved_figures):
    """25 lone patches above the mean (every other row and column of a 9x9 grid): region 21 takes region 1's
    colour, region 25 region 5's; the background stays black."""
    high = np.zeros((9, 9))
    high[::2, ::2] = 1
    scores = torch.from_numpy(high).reshape(1, 1, 81).float()
    draw_attention_figure({"lone": (scores, (9, 9))}, [Image.new("RGB", (9, 9))], tmp_path / "many.png")
    (figure,) = saved_figures
    labels = scipy_regions(high.reshape(-1), (9, 9))
    assert labels.max() == 25
    colours = region_colours()
    expected = np.where(labels[..., None] > 0, colours[(labels - 1) % 20 + 1], colours[0])
    np.testing.assert_array_equal(figure.axes[2].images[0].get_array(), expected)
    assert figure.axes[2].get_title() == "25 regions > mean"
    assert (expected[0, 0] == expected[8, 0]).all() and (expected[0, 0] != expected[0, 2]).any()  # regions 1 and 21


def draw_small(path, heads=None, sets=("A", "B"), images=2) -> pathlib.Path:
    """`draw_attention_figure` of `drawn_scores`'s `sets` on the first `images` of two plain images."""
    pictures = [Image.new("RGB", (14, 10), (10, 200, 30)), Image.new("RGB", (8, 6), (200, 30, 90))][:images]
    scores = {name: (values[:images], grid) for name, (values, grid) in drawn_scores().items() if name in sets}
    return draw_attention_figure(scores, pictures, path, heads)


def test_the_pictures_fill_their_panels_and_no_text_runs_into_a_picture_or_off_the_png(tmp_path, saved_figures):
    """Each image, map and region picture is drawn nearly as large as its 200 px panel (the layout packs
    them, less room for the titles and labels), and no title or row label overlaps a picture or leaves
    the PNG."""
    draw_small(tmp_path / "maps.png")
    (figure,) = saved_figures
    pictures = [ax.images[0].get_window_extent() for ax in figure.axes if ax.images]  # as last drawn
    assert len(pictures) == 2 * (1 + 2 * 3) + 2 * (1 + 2 * 2)  # set "A" has three heads, "B" two
    for box in pictures:
        assert max(box.width, box.height) >= 0.85 * CELL, box
    texts = [text for ax in figure.axes for text in (ax.title, ax.yaxis.label) if text.get_text()]
    assert len(texts) == len(pictures)  # a title above each map and region picture, a label beside each image
    for text in texts:
        box = text.get_window_extent()
        assert figure.bbox.x0 <= box.x0 and box.x1 <= figure.bbox.x1, text.get_text()
        assert figure.bbox.y0 <= box.y0 and box.y1 <= figure.bbox.y1, text.get_text()
        assert not any(box.overlaps(picture) for picture in pictures), text.get_text()


def test_the_pngs_are_the_same_whatever_matplotlibs_settings_and_go_exactly_where_asked(tmp_path):
    """A user's matplotlibrc (another dpi for figures and for saving, another file format) changes neither
    picture: each is a PNG of the documented size, with the same pixels, written to the path given, even
    without a suffix and in folders that do not exist yet."""
    import matplotlib

    report = entropy_report(3)
    plain = [
        draw_small(tmp_path / "plain.png", heads=1, sets="A", images=1),
        sar_hf.visualization.save_entropy_plot(report, tmp_path / "plain-entropy.png"),
    ]
    with matplotlib.rc_context({"figure.dpi": 72, "savefig.dpi": 50, "savefig.format": "jpg"}):
        paths = [
            draw_small(tmp_path / "new" / "folders" / "attention", heads=1, sets="A", images=1),
            sar_hf.visualization.save_entropy_plot(report, tmp_path / "other" / "folders" / "entropy"),
        ]
    assert paths == [tmp_path / "new" / "folders" / "attention", tmp_path / "other" / "folders" / "entropy"]
    assert sorted(path.name for path in tmp_path.glob("*/folders/*")) == ["attention", "entropy"]
    for path, reference, size in zip(paths, plain, [(CELL * 3, CELL), (700, 450)], strict=True):
        with Image.open(path) as png, Image.open(reference) as expected:
            assert (png.format, png.size) == ("PNG", size)
            np.testing.assert_array_equal(np.asarray(png), np.asarray(expected))


def test_nothing_to_draw_or_no_head_is_a_value_error(tmp_path):
    scores, image = {"A": (torch.zeros(1, 2, 4), (2, 2))}, [Image.new("RGB", (4, 4))]
    with pytest.raises(ValueError, match=r"^Pass at least one model \(or set of scores\) and one image\.$"):
        draw_attention_figure({}, image, tmp_path / "none.png")
    with pytest.raises(ValueError, match=r"^Pass at least one model \(or set of scores\) and one image\.$"):
        draw_attention_figure(scores, [], tmp_path / "none.png")
    for heads in (0, -1):
        with pytest.raises(ValueError, match=rf"`heads` must be a positive number of heads, got {heads}\."):
            draw_attention_figure(scores, image, tmp_path / "none.png", heads=heads)
    with pytest.raises(ValueError, match=r"^Pass at least one image\.$"):
        save_attention_figure({}, [], None, tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()


def entropy_report(heads: int, seed: int = 0) -> dict:
    """A report as `sar-hf inspect` writes it: layers 0, 2 and 5, asymmetric intervals, and layer 2's
    bounds of head 0 unknown (None)."""
    rng = np.random.default_rng(seed)
    means = rng.uniform(0.5, 2.0, (3, heads))
    bounds = np.stack([means - rng.uniform(0.05, 0.2, means.shape), means + rng.uniform(0.3, 0.5, means.shape)], -1)
    layers = []
    for k, layer in enumerate([0, 2, 5]):
        ci95 = bounds[k].tolist()
        if k == 1:
            ci95[0] = [None, None]
        layers.append({"layer": layer, "head_entropy_mean": means[k].tolist(), "head_entropy_ci95": ci95})
    return {"model": "org/tiny-vit", "images": 7, "layers": layers}


@pytest.mark.parametrize(("heads", "legend_columns"), [(3, 1), (16, 2)])
def test_the_entropy_plot_draws_each_heads_means_and_intervals(tmp_path, saved_figures, heads, legend_columns):
    report = entropy_report(heads)
    path = sar_hf.visualization.save_entropy_plot(report, str(tmp_path / "plots" / "entropy.png"))
    (figure,) = saved_figures
    assert path == tmp_path / "plots" / "entropy.png" and isinstance(path, pathlib.Path)
    with Image.open(path) as png:
        assert (png.format, png.size) == ("PNG", (700, 450))

    (ax,) = figure.axes
    layers = [0, 2, 5]
    means = np.array([entry["head_entropy_mean"] for entry in report["layers"]])
    assert len(ax.containers) == heads
    for h, bars in enumerate(ax.containers):  # one line with error bars per head, in order
        line, _, (segments,) = bars.lines
        assert bars.get_label() == f"head {h}"
        np.testing.assert_array_equal(line.get_xdata(), layers)
        np.testing.assert_array_equal(line.get_ydata(), means[:, h])
        for k, segment in enumerate(segments.get_segments()):  # from the lower to the upper bound
            low, high = report["layers"][k]["head_entropy_ci95"][h]
            if low is None:
                assert not len(segment)  # no interval, no bar
            else:
                np.testing.assert_allclose(segment, [[layers[k], low], [layers[k], high]])
    (mean_line,) = [line for line in ax.lines if line.get_label() == "mean over heads"]
    np.testing.assert_allclose(mean_line.get_ydata(), means.mean(axis=1))
    np.testing.assert_array_equal(mean_line.get_xdata(), layers)
    assert (mean_line.get_linestyle(), mean_line.get_color()) == ("--", "k")
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("layer", "spatial entropy of the [CLS] maps (nats)")
    np.testing.assert_array_equal(ax.get_xticks(), layers)
    assert ax.get_title() == "org/tiny-vit: 7 images, 95% intervals"
    legend = ax.get_legend()
    assert [text.get_text() for text in legend.get_texts()] == [
        "mean over heads",
        *(f"head {h}" for h in range(heads)),
    ]
    assert legend._ncols == legend_columns
    assert {text.get_fontsize() for text in legend.get_texts()} == {7} and ax.title.get_fontsize() == 9
    for bars in ax.containers:  # each mean a dot of 3 pt, each bound a cap of 2 pt on each side
        line, caps, _ = bars.lines
        assert (line.get_marker(), line.get_markersize()) == ("o", 3)
        assert len(caps) == 2 and all((cap.get_marker(), cap.get_markersize()) == ("_", 4) for cap in caps)
    # The plot and its labels fill the figure, up to a margin of a few pixels.
    plot, page = ax.get_tightbbox(), figure.bbox
    assert max(plot.x0 - page.x0, plot.y0 - page.y0, page.x1 - plot.x1, page.y1 - plot.y1) < 10
    assert min(plot.x0 - page.x0, plot.y0 - page.y0, page.x1 - plot.x1, page.y1 - plot.y1) >= 0


def test_cls_attention_of_a_sar_model_is_its_regularised_layers_and_leaves_its_capture(images, processor):
    """A SAR model's pictures show the layer its loss regularises (here the first, not the last), through
    the capture of its `sar_loss`, which keeps working afterwards."""
    torch.manual_seed(0)
    model = SARViTForImageClassification(SARViTConfig(**TINY, sar_layer=0, initializer_range=0.2)).train()
    pixel_values = processor(images, return_tensors="pt")["pixel_values"]
    scores, grid = cls_attention(model, pixel_values)
    assert model.training and grid == (4, 4) and scores.dtype == torch.float32 and not scores.requires_grad

    eager = ViTForImageClassification(ViTConfig(**TINY, initializer_range=0.2, attn_implementation="eager")).eval()
    eager.load_state_dict(model.state_dict())
    with torch.no_grad():
        attentions = eager(pixel_values, output_attentions=True).attentions
    first, last = (attentions[layer][:, :, 0, 1:].log() for layer in (0, -1))
    torch.testing.assert_close(
        scores - scores.mean(-1, keepdim=True), first - first.mean(-1, keepdim=True), atol=1e-5, rtol=0
    )
    assert not torch.allclose(scores - scores.mean(-1, keepdim=True), last - last.mean(-1, keepdim=True), atol=1e-2)

    labels = torch.tensor([0, 1])
    out = model.eval()(pixel_values, labels=labels)  # the loss still reads the first layer's scores
    torch.testing.assert_close(out.spatial_entropy, spatial_entropy(first, grid), atol=1e-5, rtol=0)


def test_cls_attention_of_a_plain_model_takes_its_capture_away_again(images, processor):
    """The capture attached for one call is removed, also when the forward pass fails, so the next call (or
    a `sar_loss` of the user's) can capture the layer again."""
    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(**TINY))
    pixel_values = processor(images, return_tensors="pt")["pixel_values"]
    first, _ = cls_attention(model, pixel_values)
    second, _ = cls_attention(model, pixel_values)
    torch.testing.assert_close(first, second)
    with pytest.raises(ValueError, match="do not tile"):
        cls_attention(model, pixel_values[..., :15])
    sar_hf.CLSScoreCapture(model).remove()  # the last layer is free again
    assert not model._forward_hooks and not model._forward_pre_hooks


def test_cls_attention_moves_the_images_to_the_models_device(images, processor):
    # A model on a GPU takes the processor's CPU tensors; the meta device (shapes, no values) stands in.
    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(**TINY)).to("meta")
    scores, grid = cls_attention(model, processor(images, return_tensors="pt")["pixel_values"])
    assert (scores.device.type, scores.shape, scores.dtype, grid) == ("meta", (2, 2, 16), torch.float32, (4, 4))


def test_greyscale_and_transparent_images_are_taken_as_rgb(models, processor, tmp_path, saved_figures):
    rng = np.random.default_rng(2)
    images = [
        Image.fromarray(rng.integers(0, 256, (20, 24), dtype=np.uint8)),  # "L"
        Image.fromarray(rng.integers(0, 256, (20, 24, 4), dtype=np.uint8)),  # "RGBA"
    ]
    save_attention_figure({"SAR": models["SAR"]}, images, processor, tmp_path / "modes.png")
    (figure,) = saved_figures
    rgb = processor([image.convert("RGB") for image in images], return_tensors="pt")["pixel_values"]
    scores, grid = cls_attention(models["SAR"], rgb)
    for i in range(2):
        for h in range(2):
            drawn = figure.axes[i * 5 + 1 + 2 * h].images[0].get_array()
            np.testing.assert_allclose(drawn, softmax(scores[i, h].double().numpy()).reshape(grid), rtol=1e-5)
