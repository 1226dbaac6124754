"""The training script's arguments: which model, which data, the SAR settings; and how they are parsed.

Shaped like Transformers' image-classification example: argument dataclasses read by
`HfArgumentParser`, with Trainer's own `TrainingArguments` beside them, and one `.json` argument
read as a file of every argument. DeiT's flags are [`RecipeArguments`] in `deit_recipe`.
"""

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser, TrainingArguments

from ..callbacks import GRANULARITIES, SCHEDULES
from ..data import BUNDLED_DATASETS
from .deit_recipe import RECIPES, RecipeArguments, recipe_learning_rate

#: From-scratch architectures. `small` trains on a laptop CPU in minutes; `tiny` is for tests;
#: `vit-tiny`, `vit-small` and `vit-base` are DeiT-Ti, DeiT-S and ViT-B (the paper's backbones).
MODEL_PRESETS = {
    "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=16,
                 patch_size=4),
    "small": dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=4, intermediate_size=384,
                  image_size=32, patch_size=4),
    "vit-tiny": dict(hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768,
                     image_size=224, patch_size=16, layer_norm_eps=1e-6),
    "vit-small": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                      image_size=224, patch_size=16, layer_norm_eps=1e-6),
    "vit-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                     image_size=224, patch_size=16),
}  # fmt: skip

#: TrainingArguments defaults of this script, for training from scratch (the DeiT recipe's AdamW,
#: cosine decay and weight decay, shortened); every one can be overridden on the command line.
TRAINING_DEFAULTS = {
    "do_train": True,
    "do_eval": True,
    "num_train_epochs": 30,
    "per_device_train_batch_size": 64,
    "per_device_eval_batch_size": 256,
    "learning_rate": 1e-3,
    "weight_decay": 0.05,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.1,
    "eval_strategy": "epoch",
    "save_strategy": "epoch",
    "save_total_limit": 2,
    "logging_steps": 10,
    "remove_unused_columns": False,  # the transforms need the image column
    "seed": 42,
}
#: The bundled dataset trained on without --dataset_name or --train_dir.
DEFAULT_DATASET = "digits"


@dataclass
class ModelArguments:
    """Which model to train: a checkpoint to fine-tune (`model_name_or_path`) or a preset from scratch."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "A checkpoint to fine-tune: a local folder or a Hub id (e.g. google/vit-base-patch16-224-in21k). "
            "A checkpoint of model type vit (the non-distilled DeiT ones too) loads into "
            "SARViTForImageClassification; a DINOv2, BEiT or other ViT-family checkpoint keeps its own class, with "
            "SpatialEntropyLoss attached. Leave it out to train "
            "--model_preset from scratch."
        },
    )
    model_preset: str = field(
        default="small",
        metadata={
            "help": "Architecture trained from scratch when no --model_name_or_path is given: small (4 layers, 192 "
            "wide, 32 px images, 4 px patches; minutes on a CPU), tiny (for tests), vit-tiny (DeiT-Ti), vit-small "
            "(DeiT-S) or vit-base (ViT-B).",
            "choices": list(MODEL_PRESETS),
        },
    )
    image_size: int | None = field(
        default=None, metadata={"help": "Overrides the preset's input resolution (pixels per side)."}
    )
    patch_size: int | None = field(
        default=None,
        metadata={"help": "Overrides the preset's patch size; the SAR grid is (image_size / patch_size) per side."},
    )
    image_processor_name: str | None = field(
        default=None, metadata={"help": "Image processor to use instead of the checkpoint's (folder or Hub id)."}
    )
    ignore_mismatched_sizes: bool = field(
        default=False,
        metadata={
            "help": "Re-initialise checkpoint weights whose shapes do not fit, e.g. the classifier of a checkpoint "
            "trained on another number of classes."
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Train from scratch even when --output_dir holds checkpoints of an earlier run (its checkpoint "
            "folders are deleted); by default such a run is resumed."
        },
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "Where to store the models and datasets downloaded from the Hub."}
    )
    model_revision: str = field(
        default="main", metadata={"help": "The model version to use (branch name, tag name or commit id)."}
    )
    token: str | None = field(
        default=None, metadata={"help": "Hub token for private models or datasets (default: the stored login)."}
    )

    def __post_init__(self):
        if self.model_preset not in MODEL_PRESETS:
            raise ValueError(f"--model_preset must be one of {list(MODEL_PRESETS)}, got {self.model_preset!r}.")
        for name in ("image_size", "patch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name} must be a positive number of pixels, got {value}.")
            if value is not None and self.model_name_or_path is not None:
                raise ValueError(
                    f"--{name} sets up a model trained from scratch; a checkpoint (--model_name_or_path) keeps "
                    "its own."
                )
        preset = MODEL_PRESETS[self.model_preset]
        image, patch = self.image_size or preset["image_size"], self.patch_size or preset["patch_size"]
        if self.model_name_or_path is None and image % patch:
            raise ValueError(f"--image_size {image} is not a multiple of --patch_size {patch}.")


@dataclass
class DataTrainingArguments:
    """Which data to train and evaluate on, and how to check, split and augment it."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "A dataset for `datasets.load_dataset` (a Hub id or a local folder of data files), or a "
            f"dataset that sar_hf builds offline: {', '.join(BUNDLED_DATASETS)} (a bundled name wins over a "
            "folder of that name; write ./digits for the folder). Without --dataset_name or --train_dir, the "
            "bundled scikit-learn digits are used."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "The dataset's configuration name."})
    train_dir: str | None = field(
        default=None, metadata={"help": "A folder of training images, one subfolder per class (train_dir/cat/1.png)."}
    )
    validation_dir: str | None = field(
        default=None, metadata={"help": "A folder of validation images laid out as --train_dir."}
    )
    image_column_name: str = field(default="image", metadata={"help": "The dataset column holding the images."})
    label_column_name: str = field(default="label", metadata={"help": "The dataset column holding the labels."})
    train_val_split: float = field(
        default=0.15,
        metadata={
            "help": "Fraction of the train split held out for validation when the data has no validation split "
            "(stratified by class when possible)."
        },
    )
    train_fraction: float = field(
        default=1.0,
        metadata={
            "help": "Train on this fraction of the train split, stratified by class (after the validation split "
            "is carved off), for small-data runs. In (0, 1]."
        },
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Truncate the training set to this many images (debugging, quick runs)."}
    )
    max_eval_samples: int | None = field(
        default=None,
        metadata={"help": "Truncate the validation set to this many images (the test split stays whole)."},
    )
    verify_images: bool = field(
        default=True,
        metadata={
            "help": "Decode every image once before training, so that an unreadable or truncated file fails at "
            "once with its name rather than in the middle of training. It costs one decode per image (long for "
            "ImageNet-sized data): --no_verify_images skips it for data you trust."
        },
    )
    skip_bad_images: bool = field(
        default=False,
        metadata={"help": "Leave out the images that cannot be read (and report how many) instead of failing."},
    )
    augment: bool = field(
        default=True, metadata={"help": "Augment the training images (random resized crops, and flips per --hflip)."}
    )
    hflip: bool | None = field(
        default=None,
        metadata={
            "help": "Flip training images horizontally at random. Defaults to on, except for the bundled digits "
            "(a mirrored digit is another symbol)."
        },
    )
    crop_scale_min: float = field(
        default=0.7,
        metadata={"help": "Smallest area fraction of the random resized crops (torchvision's default is 0.08)."},
    )
    attention_figure_images: int = field(
        default=8,
        metadata={"help": "Draw the [CLS] attention maps of this many test images into attention_maps.png (0: none)."},
    )

    def __post_init__(self):
        if self.dataset_name is not None and (self.train_dir is not None or self.validation_dir is not None):
            raise ValueError("Pass either --dataset_name or --train_dir/--validation_dir, not both.")
        if self.validation_dir is not None and self.train_dir is None:
            raise ValueError("--validation_dir needs a --train_dir.")
        if not 0 < self.train_fraction <= 1:
            raise ValueError(f"--train_fraction must be in (0, 1], got {self.train_fraction}.")
        if not 0 <= self.train_val_split < 1:
            raise ValueError(f"--train_val_split must be in [0, 1), got {self.train_val_split}.")
        for name in ("max_train_samples", "max_eval_samples"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}.")
        if not 0 < self.crop_scale_min <= 1:
            raise ValueError(f"--crop_scale_min must be in (0, 1], got {self.crop_scale_min}.")
        if self.attention_figure_images < 0:
            raise ValueError(f"--attention_figure_images must be >= 0, got {self.attention_figure_images}.")

    @property
    def bundled_dataset(self) -> str | None:
        """The name of the bundled dataset in use (a key of `BUNDLED_DATASETS`), or None for the user's data."""
        if self.dataset_name is None and self.train_dir is None:
            return DEFAULT_DATASET
        return self.dataset_name if self.dataset_name in BUNDLED_DATASETS else None

    @property
    def description(self) -> str:
        """The dataset, as the log and the model card name it."""
        if self.bundled_dataset is not None:
            return BUNDLED_DATASETS[self.bundled_dataset][0]
        return self.dataset_name or self.train_dir


@dataclass
class SARArguments:
    """The spatial-entropy regulariser: its weight λ, λ's schedule, and which layer it acts on."""

    sar_weight: float = field(
        default=0.01,
        metadata={
            "help": "Peak λ in loss = cross_entropy + λ * spatial_entropy (the paper: 0.01). 0 trains the plain "
            "ViT baseline with everything else identical."
        },
    )
    sar_schedule: str = field(
        default="warmup_cosine",
        metadata={
            "help": "λ schedule: warmup_cosine (the paper's: linear warm-up, then cosine decay to 0 at the end) "
            "or constant.",
            "choices": list(SCHEDULES),
        },
    )
    sar_warmup_epochs: float | None = field(
        default=None,
        metadata={"help": "Epochs of λ warm-up. Defaults to a tenth of the run (the paper: 10 of 100 epochs)."},
    )
    sar_granularity: str = field(
        default="auto",
        metadata={
            "help": "Change λ once per epoch (the authors' release) or at every optimizer step; auto: per epoch in "
            "runs of 10 epochs or more, per step in shorter ones (so that λ > 0 on almost every step).",
            "choices": list(GRANULARITIES),
        },
    )
    sar_layer: int = field(
        default=-1, metadata={"help": "The layer whose [CLS] attention is regularised; negative counts from the end."}
    )
    sar_no_skip_no_norm: bool = field(
        default=False,
        metadata={
            "help": "The authors' best variant: no residual around attention and no LayerNorm before the MLP in "
            "the last block."
        },
    )

    def __post_init__(self):
        if not math.isfinite(self.sar_weight) or self.sar_weight < 0:
            raise ValueError(f"--sar_weight must be a finite number >= 0, got {self.sar_weight}.")
        if self.sar_schedule not in SCHEDULES:
            raise ValueError(f"--sar_schedule must be one of {list(SCHEDULES)}, got {self.sar_schedule!r}.")
        if self.sar_granularity not in GRANULARITIES:
            raise ValueError(f"--sar_granularity must be one of {list(GRANULARITIES)}, got {self.sar_granularity!r}.")
        if self.sar_warmup_epochs is not None and not self.sar_warmup_epochs >= 0:
            raise ValueError(f"--sar_warmup_epochs must be >= 0, got {self.sar_warmup_epochs}.")


_DESCRIPTION = """\
Train or fine-tune a ViT-family image classifier with the spatial-entropy regulariser (SAR).

With no arguments: the `small` preset (4 layers, 192 wide, 32 px images in 4 px patches) from
scratch for 30 epochs on scikit-learn's bundled digits, scored on a fixed held-out test split;
2.5 to 4 minutes on 2 CPU cores. A checkpoint of model type `vit` (--model_name_or_path; the
non-distilled DeiT checkpoints are among them) trains as SARViTForImageClassification; a DINOv2,
BEiT or other ViT-family checkpoint keeps its own class, with SpatialEntropyLoss attached. One
.json argument is read as a file of every argument; a flag given explicitly wins over --recipe,
which wins over this script's defaults."""
_EXAMPLES = """\
examples:
  sar-hf train                                                      # -> outputs/sar-digits
  sar-hf train --sar_weight 0 --output_dir outputs/baseline-digits  # the plain ViT baseline
  sar-hf train --dataset_name cluttered-digits --train_fraction 0.25
  sar-hf train --recipe deit --output_dir outputs/sar-digits-deit
  sar-hf train --model_name_or_path google/vit-base-patch16-224-in21k --train_dir path/to/train \\
      --validation_dir path/to/val --ignore_mismatched_sizes --learning_rate 5e-5 --num_train_epochs 10 \
      --output_dir outputs/my-sar-vit
  sar-hf train my_run.json
  accelerate launch --config_file examples/accelerate_configs/multi_gpu.yaml -m sar_hf train --bf16 ...

`python examples/run_sar.py` takes the same arguments. More in the README."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Each flag's default after its help, and the description and examples as written."""


def make_parser() -> HfArgumentParser:
    """The parser of `sar-hf train`: the four dataclasses of the script and Trainer's `TrainingArguments`."""
    return HfArgumentParser(
        (ModelArguments, DataTrainingArguments, SARArguments, RecipeArguments, TrainingArguments),
        prog="sar-hf train",
        description=_DESCRIPTION,
        epilog=_EXAMPLES,
        formatter_class=_HelpFormatter,
    )


def parse_args(args: list[str] | None = None):
    """`(model_args, data_args, sar_args, recipe_args, training_args)` from a command line, or from one `.json` file.

    Each value comes from, in order of precedence: the arguments; the `--recipe`; the script's
    defaults (`TRAINING_DEFAULTS`, and `--output_dir` outputs/sar-<name> for a bundled dataset,
    e.g. outputs/sar-digits, outputs/sar-vit otherwise); the dataclasses' defaults.
    """
    args = sys.argv[1:] if args is None else list(args)
    parser = make_parser()
    from_json = len(args) == 1 and args[0].endswith(".json")
    if from_json:
        with open(os.path.abspath(args[0]), encoding="utf-8") as file:
            values = json.load(file)
        given = {key for key, value in values.items() if value is not None}
        recipe, dataset_name = values.get("recipe"), values.get("dataset_name")
    else:
        # `--flag`, `--flag=value` and `--flag-name` spellings, as HfArgumentParser accepts them.
        given = {arg.split("=", 1)[0][2:].replace("-", "_") for arg in args if arg.startswith("--")}
        early = argparse.ArgumentParser(add_help=False)  # the two flags that choose defaults, read first
        early.add_argument("--recipe")
        early.add_argument("--dataset_name", "--dataset-name")
        recipe, dataset_name = vars(early.parse_known_args(args)[0]).values()
    own_data = bool(given & {"dataset_name", "train_dir", "validation_dir"}) and dataset_name not in BUNDLED_DATASETS
    # Trainer's own warm-up flags (`warmup_ratio`: the deprecated spelling of a fractional `warmup_steps`).
    warmup_given = sorted(given & {"warmup_steps", "warmup_ratio"})
    if "warmup_epochs" in given and warmup_given:
        raise ValueError(
            f"--warmup_epochs and --{warmup_given[0]} both set the learning-rate warm-up; give one of them."
        )
    output_dir = "outputs/sar-vit" if own_data else f"outputs/sar-{dataset_name or DEFAULT_DATASET}"
    defaults = {"output_dir": output_dir, **TRAINING_DEFAULTS}
    if recipe in RECIPES:  # another value fails RecipeArguments' check
        # An explicit --warmup_steps (or --warmup_ratio) wins over the recipe's warm-up in epochs.
        defaults.update({k: v for k, v in RECIPES[recipe].items() if not (k == "warmup_epochs" and warmup_given)})
    if from_json:
        parsed = parser.parse_dict({**defaults, **values})
    else:
        parser.set_defaults(**defaults)
        parsed = parser.parse_args_into_dataclasses(args=args)
    training_args = parsed[-1]
    if not 0 <= training_args.label_smoothing_factor <= 1:
        raise ValueError(f"--label_smoothing_factor must be in [0, 1], got {training_args.label_smoothing_factor}.")
    if recipe in RECIPES and "learning_rate" not in given:
        training_args.learning_rate = recipe_learning_rate(recipe, training_args)
    return parsed


__all__ = [
    "DEFAULT_DATASET",
    "DataTrainingArguments",
    "MODEL_PRESETS",
    "ModelArguments",
    "SARArguments",
    "TRAINING_DEFAULTS",
    "make_parser",
    "parse_args",
]
