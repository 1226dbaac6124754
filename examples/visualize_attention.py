# /// script
# requires-python = ">=3.10"
# dependencies = [
#     "sar_hf[examples]",
# ]
# ///
"""Draw the [CLS] attention maps of a baseline ViT and a SAR ViT on the same images.

Each model gets one row per image: the image, then for each head its attention map over the
patch grid (titled with its spatial entropy, in nats) and the 8-connected regions above the mean
score. Fewer, larger regions and lower entropy are what the SAR regulariser trains for.

    python examples/visualize_attention.py \
        --model google/vit-base-patch16-224 --model outputs/sar-vit \
        --labels baseline SAR \
        --images cat.jpg dog.jpg \
        --output attention.png --heads 4

Models load with `AutoModelForImageClassification` (a local folder or a Hub id; only a Hub id
downloads anything), and the images are processed with the first model's image processor.
"""

import argparse
import pathlib

from PIL import Image
from transformers import AutoModelForImageClassification

import sar_hf  # noqa: F401  (registers the SAR classes with the Auto classes)
from sar_hf.data import load_image_processor
from sar_hf.visualization import save_attention_figure


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", action="append", required=True, help="Checkpoint folder or Hub id; repeat to compare models."
    )
    parser.add_argument("--labels", nargs="+", help="One row label per --model (default: the folder or id names).")
    parser.add_argument("--images", nargs="+", required=True, type=pathlib.Path, help="Image files to draw.")
    parser.add_argument("--output", type=pathlib.Path, default=pathlib.Path("attention.png"), help="PNG to write.")
    parser.add_argument("--heads", type=int, help="Show only the first N heads of each model (default: all).")
    args = parser.parse_args(argv)
    if args.labels is None:
        args.labels = [pathlib.PurePath(model).name or model for model in args.model]
    if len(args.labels) != len(args.model):
        parser.error(f"--labels gave {len(args.labels)} names for {len(args.model)} --model arguments.")
    if len(set(args.labels)) != len(args.labels):
        parser.error(f"Row labels must differ, got {args.labels}; pass --labels.")
    if args.heads is not None and args.heads < 1:
        parser.error(f"--heads must be positive, got {args.heads}.")
    return args


def main(argv=None) -> pathlib.Path:
    args = parse_args(argv)
    models = {
        label: AutoModelForImageClassification.from_pretrained(model)
        for label, model in zip(args.labels, args.model, strict=True)
    }
    image_processor = load_image_processor(args.model[0])
    images = [Image.open(path).convert("RGB") for path in args.images]  # convert() reads and closes the file
    path = save_attention_figure(models, images, image_processor, args.output, heads=args.heads)
    print(f"Wrote {path}")
    return path


if __name__ == "__main__":
    main()
