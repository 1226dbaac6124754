"""Pictures of [CLS] attention maps, their 8-connected regions and their spatial entropy.

matplotlib is imported inside `save_attention_figure` (and drawn with its Agg canvas, leaving
pyplot's global backend alone), so `import sar_hf` does not pull it in.
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

    One row per image and model, the models' rows of an image next to each other (e.g. baseline
    then SAR) and labelled with the model's name. A row holds the input image, then for each head
    the attention map (the softmax of the scores over the `gh × gw` patch grid, titled with the
    map's spatial entropy in nats) and its 8-connected regions above the mean score (one colour
    per region, background black). Each panel is `CELL_INCHES` square at `DPI`, so the PNG is
    `200 * (1 + 2 * heads)` pixels wide and `200 * len(images) * len(models)` pixels high, with
    `heads` the most heads shown for any model.

    Args:
        models (`Mapping[str, PreTrainedModel]`): name -> ViT-family classifier, see [`cls_attention`].
        images (`Sequence[PIL.Image.Image]`): the input images.
        image_processor: turns `images` into `pixel_values` for every model (e.g. a `ViTImageProcessor`).
        output_path (`str` or `os.PathLike`): where the PNG goes; parent folders are created.
        heads (`int`, *optional*): show only the first `heads` heads of each model (default all).

    Returns:
        `pathlib.Path`: `output_path`.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not models or not images:
        raise ValueError("Pass at least one model and one image.")
    if heads is not None and heads < 1:
        raise ValueError(f"`heads` must be a positive number of heads, got {heads}.")
    images = [image.convert("RGB") for image in images]
    pixel_values = image_processor(images, return_tensors="pt")["pixel_values"]
    maps = {name: _maps(model, pixel_values, heads) for name, model in models.items()}
    columns = 1 + 2 * max(probs.shape[1] for probs, _, _ in maps.values())
    rows = len(images) * len(models)

    fig = Figure(figsize=(CELL_INCHES * columns, CELL_INCHES * rows), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_frame_on(False)
    for i, image in enumerate(images):
        for j, (name, (probs, regions, entropy)) in enumerate(maps.items()):
            row = axes[i * len(models) + j]
            row[0].imshow(image)
            row[0].set_ylabel(f"{name}\nimage {i}", fontsize=9)
            for h in range(probs.shape[1]):
                row[1 + 2 * h].imshow(probs[i, h], cmap="inferno", interpolation="nearest")
                row[1 + 2 * h].set_title(f"head {h}: H = {entropy[i, h] + 0.0:.3f}", fontsize=8)  # + 0.0: no "-0.000"
                row[2 + 2 * h].imshow(_colour(regions[i, h]), interpolation="nearest")
                count = regions[i, h].max()
                row[2 + 2 * h].set_title(f"{count} region{'' if count == 1 else 's'} > mean", fontsize=8)
    output_path = pathlib.Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output_path, dpi=DPI, format="png")
    return output_path


def _maps(model, pixel_values, heads):
    """-> softmax maps [B, h, gh, gw], region labels [B, h, gh, gw] and entropies [B, h], as numpy."""
    scores, (gh, gw) = cls_attention(model, pixel_values)
    scores = scores[:, :heads].cpu()
    entropy = spatial_entropy(scores, (gh, gw), reduction="none")
    grid = scores.reshape(*scores.shape[:2], gh, gw)
    regions = connected_components(grid > scores.mean(dim=-1)[..., None, None])
    return scores.softmax(dim=-1).reshape(grid.shape).numpy(), regions.numpy(), entropy.numpy()


def _colour(labels: np.ndarray) -> np.ndarray:
    """[gh, gw] region labels -> [gh, gw, 3] RGB: black background, tab20 colours cycling over regions."""
    from matplotlib import colormaps

    palette = np.array([(0.0, 0.0, 0.0), *colormaps["tab20"].colors])
    return palette[np.where(labels > 0, (labels - 1) % 20 + 1, 0)]


__all__ = ["CELL_INCHES", "DPI", "cls_attention", "save_attention_figure"]
