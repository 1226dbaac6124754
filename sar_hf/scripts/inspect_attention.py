"""`sar-hf inspect`: how object-shaped is a checkpoint's [CLS] attention? Its spatial entropy, layer by layer.

The SAR paper starts from an observation: self-supervised ViTs attend in a few object-shaped
regions, supervised ones do not. This command measures that on any ViT-family checkpoint (ViT,
DeiT, DINOv2 with or without registers, BEiT, ViT-MSN, CLIP's image tower; trained with SAR or
not), loaded as it was saved, attention kernel included. One forward pass per batch captures the
pre-softmax [CLS]-to-patch scores of every layer at once (`CLSScoreCapture`); for every layer and
head it reports, over the images, the mean spatial entropy of the maps (nats; SPEC steps 2-6,
`spatial_entropy`) with a 95% t-interval, and the mean number of 8-connected regions above the
map's mean (`connected_components`). It writes, in `--output`:

* `inspect.json`: `{"model", "images": N, "layers": [{"layer", "head_entropy_mean": [heads],
  "head_entropy_ci95": [[lo, hi], ...], "entropy_mean", "regions_mean"}, ...]}`, layers in order
  (with a single image the interval's bounds are null);
* `entropy_by_layer.png`: the mean entropy against the layer, one line per head;
* `attention_layer_<L>.png`: the maps and regions of the first `--figure_images` images at `--figure_layer`.
"""

import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import AutoConfig, AutoModel, AutoModelForImageClassification, HfArgumentParser

from sar_hf import CLSScoreCapture, connected_components, spatial_entropy
from sar_hf.data import (
    BUNDLED_DATASETS,
    check_columns,
    holds_image_files,
    load_image_dataset,
    load_image_processor,
    to_rgb,
    vit_image_processor_class,
)
from sar_hf.visualization import draw_attention_figure, save_entropy_plot

logger = logging.getLogger(__name__)

#: The split measured when `--split` is not given: the first of these that the data has.
SPLIT_PREFERENCE = ("test", "validation", "train")
SUPPORTED = "ViT, DeiT, DINOv2 (with or without registers), BEiT, ViT-MSN and CLIP"


@dataclass
class InspectArguments:
    """What `sar-hf inspect` measures: which checkpoint, on which images, which layers, and what it draws."""

    model: str = field(metadata={"help": f"A checkpoint folder or Hub id: {SUPPORTED}, trained with SAR or not."})
    images: str = field(
        metadata={
            "help": "A folder of images (any PIL mode; flat, or one subfolder per class), a dataset bundled with "
            f"sar_hf ({', '.join(BUNDLED_DATASETS)}) or a `datasets` name (a Hub id or a folder of data files)."
        }
    )
    output: str | None = field(
        default=None, metadata={"help": "Where the results go (default: outputs/inspect-<model's name>)."}
    )
    layers: list[int] | None = field(
        default=None,
        metadata={"help": "The layers to measure, e.g. 0 5 -1 (negative counts from the end); all by default."},
    )
    batch_size: int = field(default=32, metadata={"help": "Images per forward pass."})
    split: str | None = field(
        default=None,
        metadata={"help": f"The split of a dataset to measure (default: the first of {', '.join(SPLIT_PREFERENCE)})."},
    )
    image_column_name: str = field(default="image", metadata={"help": "The dataset column holding the images."})
    max_images: int | None = field(default=None, metadata={"help": "Measure only the first this many images."})
    figure_layer: int = field(default=-1, metadata={"help": "The layer whose maps are drawn."})
    figure_images: int = field(default=4, metadata={"help": "Draw the maps of this many images (0: none)."})
    cache_dir: str | None = field(
        default=None, metadata={"help": "Where to store the models and datasets downloaded from the Hub."}
    )
    token: str | None = field(
        default=None, metadata={"help": "Hub token for private models or datasets (default: the stored login)."}
    )

    def __post_init__(self):
        for name in ("batch_size", "max_images"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name} must be at least 1, got {value}.")
        if self.figure_images < 0:
            raise ValueError(f"--figure_images must be >= 0, got {self.figure_images}.")
        if self.output is None:
            self.output = os.path.join("outputs", f"inspect-{os.path.basename(os.path.normpath(self.model))}")


def load_model(name_or_path: str, cache_dir: str | None = None, token: str | None = None):
    """The checkpoint as saved: its own class (the image tower of a CLIP checkpoint), its attention kernel.

    Raises:
        `ValueError` for a checkpoint that is not a ViT-family image model; `CLSScoreCapture`
        refuses, with the reason, those without [CLS] attention over a patch grid (Swin, ConvNeXt, ...).
    """
    hub = dict(cache_dir=cache_dir, token=token)
    config = AutoConfig.from_pretrained(name_or_path, **hub)
    if not hasattr(getattr(config, "vision_config", config), "patch_size"):
        raise ValueError(
            f"{name_or_path} is a {config.model_type!r} model, which does not cut images into patches; "
            f"sar-hf inspect measures {SUPPORTED} checkpoints."
        )
    if config.model_type == "clip":
        from transformers import CLIPVisionModel

        model = CLIPVisionModel.from_pretrained(name_or_path, **hub)
    elif any("ForImageClassification" in name for name in config.architectures or ()):
        model = AutoModelForImageClassification.from_pretrained(name_or_path, **hub)
    else:  # a backbone (DINO, DINOv2, ViT-MSN, ...)
        model = AutoModel.from_pretrained(name_or_path, **hub)
    sar_loss = getattr(model, "sar_loss", None)
    if sar_loss is not None:  # a SAR classifier captures the layer it regularises; inspection captures them all
        sar_loss.capture.remove()
    return model.eval()


def is_image_folder(path: str) -> bool:
    """Whether `--images path` names a folder of images rather than a bundled dataset or a `datasets` name.

    A folder that holds image files (or no file at all, which `load_image_dataset` refuses with the
    reason) is one; a folder of data files (parquet, csv, ...) is a `datasets` name.
    """
    if path in BUNDLED_DATASETS or not os.path.isdir(path):
        return False
    return holds_image_files(path) or not any(names for _, _, names in os.walk(path))


def load_images(args: InspectArguments):
    """The images to measure, from a folder, a bundled dataset or a `datasets` name: a `Dataset` of one column."""
    folder = is_image_folder(args.images)
    dataset = load_image_dataset(
        None if folder else args.images,
        train_dir=args.images if folder else None,
        cache_dir=args.cache_dir,
        token=args.token,
    )
    split = args.split or next((name for name in SPLIT_PREFERENCE if name in dataset), next(iter(dataset)))
    if split not in dataset:
        raise ValueError(f"--split {split!r}: the data has the splits {list(dataset)}.")
    check_columns({split: dataset[split]}, args.image_column_name)
    images = dataset[split].select_columns([args.image_column_name])
    if args.max_images is not None:
        images = images.select(range(min(args.max_images, len(images))))
    if len(images) == 0:
        raise ValueError(f"The {split!r} split of {args.images} holds no images.")
    return images


def layer_indices(layers: list[int] | None, num_layers: int, flag: str = "--layers") -> list[int]:
    """`layers` (negative counting from the end; all when None) as sorted, distinct indices in `[0, num_layers)`."""
    if layers is None:
        return list(range(num_layers))
    for layer in layers:
        if not -num_layers <= layer < num_layers:
            raise ValueError(
                f"{flag} {layer} is out of range: the model has {num_layers} layers (0..{num_layers - 1}, or "
                f"-{num_layers}..-1)."
            )
    return sorted({layer % num_layers for layer in layers})


def map_statistics(scores: torch.Tensor, grid_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Spatial entropy and number of regions of every map.

    Args:
        scores (`torch.Tensor` of shape `[B, layers, heads, gh*gw]`): [CLS]-to-patch scores.
        grid_size (`tuple[int, int]`): `(gh, gw)`.

    Returns:
        `(entropy, regions)`: float32 nats and int64 counts of the 8-connected regions above each
        map's mean, both `[B, layers, heads]`.
    """
    if not torch.isfinite(scores).all():
        bad = (~torch.isfinite(scores)).any(-1).sum()
        raise ValueError(f"{int(bad)} [CLS] map(s) hold non-finite scores; their entropy is undefined.")
    scores = scores.float()
    maps = scores.flatten(1, 2)  # [B, layers * heads, gh*gw]: one call for every layer
    entropy = spatial_entropy(maps, grid_size, reduction="none")
    mask = (maps > maps.mean(-1, keepdim=True)).unflatten(-1, grid_size)  # SPEC step 2's mask, on the grid
    _, regions = connected_components(mask, return_counts=True)
    return entropy.view(scores.shape[:3]), regions.view(scores.shape[:3])


def summarise(model: str, entropy: np.ndarray, regions: np.ndarray, layers: list[int]) -> dict:
    """The report of `inspect.json` from per-image entropies and region counts `[N, len(layers), heads]`.

    Each head's interval is the 95% Student t interval of its mean over the N images,
    `mean ± t(0.975, N − 1) · sd / √N` (bounds None when N = 1); `entropy_mean` and `regions_mean`
    average over the images and the heads.
    """
    from scipy import stats

    n = entropy.shape[0]
    means = entropy.mean(axis=0)  # [layers, heads]
    if n > 1:
        half = stats.t.ppf(0.975, n - 1) * entropy.std(axis=0, ddof=1) / math.sqrt(n)
        intervals = np.stack([means - half, means + half], axis=-1).tolist()  # [layers, heads, 2]
    else:
        intervals = [[[None, None]] * means.shape[1]] * len(layers)
    return {
        "model": model,
        "images": n,
        "layers": [
            {
                "layer": layer,
                "head_entropy_mean": means[i].tolist(),
                "head_entropy_ci95": intervals[i],
                "entropy_mean": float(entropy[:, i].mean()),
                "regions_mean": float(regions[:, i].mean()),
            }
            for i, layer in enumerate(layers)
        ],
    }


def measure(model, processor, images, layers: list[int], batch_size: int, keep: int = 0):
    """Every image's statistics at `layers`, with one forward pass per batch; and the scores of the first `keep`.

    Args:
        model: the checkpoint (see [`load_model`]); its attention kernel is the one it was loaded with.
        processor: its image processor; each image is first converted to RGB, as the processors do.
        images (`datasets.Dataset`): one column of images (any PIL mode).
        layers (`list[int]`): distinct layer indices, in order.
        batch_size (`int`): images per forward pass.
        keep (`int`): how many of the first images' scores to return (for the pictures).

    Returns:
        `(entropy, regions, kept, grid_size)`: numpy `[N, len(layers), heads]` entropies (nats) and
        region counts, the scores `[keep, len(layers), heads, gh*gw]` of the first `keep` images,
        and the patch grid `(gh, gw)`.
    """
    from tqdm.auto import tqdm

    (column,) = images.column_names
    capture = CLSScoreCapture(model, layer=layers)  # every layer in the one forward pass
    entropies, counts, kept = [], [], []
    try:
        for start in tqdm(range(0, len(images), batch_size), desc="[CLS] maps", unit="batch"):
            batch = [to_rgb(image) for image in images[start : start + batch_size][column]]
            pixel_values = processor(images=batch, return_tensors="pt")["pixel_values"]
            with torch.no_grad():
                model(pixel_values=pixel_values.to(model.device, model.dtype))
            scores, grid_size, _ = capture.pop()  # [B, layers, heads, gh*gw]
            entropy, regions = map_statistics(scores, grid_size)
            entropies.append(entropy.cpu())
            counts.append(regions.cpu())
            kept.append(scores[: max(keep - start, 0)].float().cpu())
    finally:
        capture.remove()
    return torch.cat(entropies).numpy(), torch.cat(counts).numpy(), torch.cat(kept), grid_size


def inspect_checkpoint(args: InspectArguments) -> dict:
    """Runs `sar-hf inspect` on parsed arguments; returns the report it wrote to `inspect.json`."""
    model = load_model(args.model, args.cache_dir, args.token)
    if torch.cuda.is_available():
        model.to("cuda")
    try:
        processor = load_image_processor(args.model, cache_dir=args.cache_dir, token=args.token)
    except OSError:  # a checkpoint saved without its image processor
        size = getattr(model.config, "vision_config", model.config).image_size
        logger.warning("%s has no image processor; resizing to its %s px with a ViTImageProcessor.", args.model, size)
        processor = vit_image_processor_class()(size={"height": size, "width": size})
    images = load_images(args)
    num_layers = getattr(model.config, "vision_config", model.config).num_hidden_layers
    layers = layer_indices(args.layers, num_layers)
    figure_layer = layer_indices([args.figure_layer], num_layers, "--figure_layer")[0]
    captured = sorted(set(layers) | {figure_layer}) if args.figure_images else layers
    entropy, regions, kept, grid_size = measure(
        model, processor, images, captured, args.batch_size, keep=args.figure_images
    )
    measured = [captured.index(layer) for layer in layers]
    report = summarise(args.model, entropy[:, measured], regions[:, measured], layers)

    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "inspect.json"), "w", encoding="utf-8") as file:
        json.dump(report, file, indent=2, allow_nan=False)
    save_entropy_plot(report, os.path.join(args.output, "entropy_by_layer.png"))
    if args.figure_images:
        name = f"{os.path.basename(os.path.normpath(args.model))}, layer {figure_layer}"
        scores = {name: (kept[:, captured.index(figure_layer)], grid_size)}
        pictures = images[: len(kept)][images.column_names[0]]
        draw_attention_figure(scores, pictures, os.path.join(args.output, f"attention_layer_{figure_layer}.png"))
    logger.info("%d images, %d layers: %s", len(images), len(layers), args.output)
    return report


def main(args: list[str] | None = None) -> dict:
    """`sar-hf inspect`: parses `args` (default: the command line) and measures."""
    parser = HfArgumentParser(InspectArguments, prog="sar-hf inspect", description=__doc__.split("\n\n")[0])
    (inspect_args,) = parser.parse_args_into_dataclasses(args=sys.argv[1:] if args is None else args)
    logging.basicConfig(format="%(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    report = inspect_checkpoint(inspect_args)
    for entry in report["layers"]:
        print(
            f"layer {entry['layer']:>2}: entropy {entry['entropy_mean']:.3f} nats, {entry['regions_mean']:.2f} regions"
        )
    return report


if __name__ == "__main__":
    main()
