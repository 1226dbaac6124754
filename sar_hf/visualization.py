"""Pictures of [CLS] attention maps, their 8-connected regions and their spatial entropy, and of the
entropy layer by layer (`sar-hf inspect`).

matplotlib is imported inside the functions that draw (with its Agg canvas, leaving pyplot's
global backend alone), so `import sar_hf` does not pull it in.
"""

import pathlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from transformers import PreTrainedModel

from .capture import CLSScoreCapture
from .components import connected_components
from .entropy import spatial_entropy

CELL_INCHES = 2.0  # each panel is a CELL_INCHES square ...
DPI = 100  # ... of CELL_INCHES * DPI = 200 pixels, so the PNG is 200·columns × 200·rows pixels

if TYPE_CHECKING:
    import PIL.Image


def cls_attention(model: PreTrainedModel, pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pre-softmax [CLS]-to-patch scores of one layer of a ViT-family classifier, in eval mode.

    The scores come from the model's SAR capture ([`CLSScoreCapture`]): its `sar_loss`'s layer if
    it has one (a [`SARViTForImageClassification`], or a model given to [`SpatialEntropyLoss`]),
    else the last layer, through a capture attached for this call only. The model keeps its
    attention implementation.

    Args:
        model ([`PreTrainedModel`]): the classifier; its training flag is restored afterwards.
        pixel_values (`torch.FloatTensor` of shape `[B, C, H, W]`): processed images.

    Returns:
        `(scores, (gh, gw))`: float32 scores `[B, heads, gh*gw]` in raster order of the patch grid
        of `gh` rows and `gw` columns, without gradient.
    """
    sar_loss = getattr(model, "sar_loss", None)
    capture = sar_loss.capture if sar_loss is not None else CLSScoreCapture(model)
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(pixel_values.to(model.device))
        scores, grid_size, _ = capture.pop()
        return scores.float(), grid_size
    finally:
        model.train(training)
        if sar_loss is None:
            capture.remove()


def save_attention_figure(
    models: Mapping[str, PreTrainedModel],
    images: Sequence["PIL.Image.Image"],
    image_processor,
    output_path,
    heads: int | None = None,
) -> pathlib.Path:
    """Draw the [CLS] attention maps of one or more models on the same images, as a PNG grid.

    The scores come from [`cls_attention`] (one row of pictures per image and model), and the
    picture, `output_path` and `heads` are [`draw_attention_figure`]'s.

    Args:
        models (`Mapping[str, PreTrainedModel]`): name -> ViT-family classifier, see [`cls_attention`].
        images (`Sequence[PIL.Image.Image]`): the input images.
        image_processor: turns `images` into `pixel_values` for every model (e.g. a `ViTImageProcessor`).
    """
    if not images:
        raise ValueError("Pass at least one image.")
    images = [image.convert("RGB") for image in images]
    pixel_values = image_processor(images, return_tensors="pt")["pixel_values"]
    scores = {name: cls_attention(model, pixel_values) for name, model in models.items()}
    return draw_attention_figure(scores, images, output_path, heads)


def draw_attention_figure(
    scores: Mapping[str, tuple[torch.Tensor, tuple[int, int]]],
    images: Sequence["PIL.Image.Image"],
    output_path,
    heads: int | None = None,
) -> pathlib.Path:
    """Draw [CLS] attention maps, given their scores, as a PNG grid.

    One row per image and set of scores, the rows of an image next to each other (e.g. baseline
    then SAR) and labelled with the set's name. A row holds the input image, then for each head
    the attention map (the softmax of the scores over the `gh × gw` patch grid, titled with the
    map's spatial entropy in nats) and its 8-connected regions above the mean score (one colour
    per region, background black). Each panel is `CELL_INCHES` square at `DPI`, so the PNG is
    `200 * (1 + 2 * heads)` pixels wide and `200 * len(images) * len(scores)` pixels high, with
    `heads` the most heads shown for any set.

    Args:
        scores (`Mapping[str, tuple[torch.Tensor, tuple[int, int]]]`): name -> `(scores, (gh, gw))`,
            pre-softmax (or log-softmax) [CLS]-to-patch scores `[len(images), heads, gh*gw]` in raster
            order of the patch grid, as [`cls_attention`] returns them.
        images (`Sequence[PIL.Image.Image]`): the input images, shown as they are.
        output_path (`str` or `os.PathLike`): where the PNG goes; parent folders are created.
        heads (`int`, *optional*): show only the first `heads` heads of each set (default all).

    Returns:
        `pathlib.Path`: `output_path`.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not scores or not images:
        raise ValueError("Pass at least one model (or set of scores) and one image.")
    if heads is not None and heads < 1:
        raise ValueError(f"`heads` must be a positive number of heads, got {heads}.")
    maps = {name: _maps(values, grid, heads) for name, (values, grid) in scores.items()}
    columns = 1 + 2 * max(probs.shape[1] for probs, _, _ in maps.values())
    rows = len(images) * len(maps)

    fig = Figure(figsize=(CELL_INCHES * columns, CELL_INCHES * rows), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_frame_on(False)
    for i, image in enumerate(images):
        for j, (name, (probs, regions, entropy)) in enumerate(maps.items()):
            row = axes[i * len(maps) + j]
            row[0].imshow(image.convert("RGB"))
            row[0].set_ylabel(f"{name}\nimage {i}", fontsize=9)
            for h in range(probs.shape[1]):
                row[1 + 2 * h].imshow(probs[i, h], cmap="inferno", interpolation="nearest")
                row[1 + 2 * h].set_title(f"head {h}: H = {entropy[i, h] + 0.0:.3f}", fontsize=8)  # + 0.0: no "-0.000"
                row[2 + 2 * h].imshow(_colour(regions[i, h]), interpolation="nearest")
                count = regions[i, h].max()
                row[2 + 2 * h].set_title(f"{count} region{'' if count == 1 else 's'} > mean", fontsize=8)
    return _save(fig, output_path)


def save_entropy_plot(report: Mapping, output_path) -> pathlib.Path:
    """Plot the mean spatial entropy of the [CLS] maps against the layer, one line per head, as a PNG.

    Args:
        report (`Mapping`): what `sar-hf inspect` writes to `inspect.json`: `"model"`, `"images"` and
            `"layers"`, each layer with `"layer"`, `"head_entropy_mean"` `[heads]` and
            `"head_entropy_ci95"` `[heads, 2]` (bounds may be None, with a single image).
        output_path (`str` or `os.PathLike`): where the PNG goes; parent folders are created.

    Returns:
        `pathlib.Path`: `output_path`. Each head's line carries its 95% interval as error bars; the
        mean over the heads is the dashed black line.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    layers = [entry["layer"] for entry in report["layers"]]
    means = np.array([entry["head_entropy_mean"] for entry in report["layers"]], dtype=float)  # [layers, heads]
    bounds = np.array([entry["head_entropy_ci95"] for entry in report["layers"]], dtype=float)  # None -> nan
    fig = Figure(figsize=(7, 4.5), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for h in range(means.shape[1]):
        errors = np.abs(bounds[:, h].T - means[:, h])  # [2, layers]: below and above the mean
        ax.errorbar(layers, means[:, h], yerr=errors, marker="o", markersize=3, capsize=2, label=f"head {h}")
    ax.plot(layers, means.mean(axis=1), "k--", label="mean over heads")
    ax.set_xlabel("layer")
    ax.set_ylabel("spatial entropy of the [CLS] maps (nats)")
    ax.set_xticks(layers)
    ax.set_title(f"{report['model']}: {report['images']} images, 95% intervals", fontsize=9)
    ax.legend(fontsize=7, ncol=max(1, means.shape[1] // 8))
    return _save(fig, output_path)


def _save(fig, output_path) -> pathlib.Path:
    output_path = pathlib.Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output_path, dpi=DPI, format="png")
    return output_path


def _maps(scores: torch.Tensor, grid_size: tuple[int, int], heads: int | None):
    """Scores [B, h, gh*gw] -> softmax maps and region labels [B, h, gh, gw], entropies [B, h], as numpy."""
    gh, gw = grid_size
    scores = scores[:, :heads].detach().float().cpu()
    entropy = spatial_entropy(scores, (gh, gw), reduction="none")
    grid = scores.reshape(*scores.shape[:2], gh, gw)
    regions = connected_components(grid > scores.mean(dim=-1)[..., None, None])
    return scores.softmax(dim=-1).reshape(grid.shape).numpy(), regions.numpy(), entropy.numpy()


def _colour(labels: np.ndarray) -> np.ndarray:
    """[gh, gw] region labels -> [gh, gw, 3] RGB: black background, tab20 colours cycling over regions."""
    from matplotlib import colormaps

    palette = np.array([(0.0, 0.0, 0.0), *colormaps["tab20"].colors])
    return palette[np.where(labels > 0, (labels - 1) % 20 + 1, 0)]


__all__ = [
    "CELL_INCHES",
    "DPI",
    "cls_attention",
    "draw_attention_figure",
    "save_attention_figure",
    "save_entropy_plot",
]
