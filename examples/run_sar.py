#!/usr/bin/env python
# /// script
# requires-python = ">=3.10"
# dependencies = [
#     "sar_hf[examples]",  # this repository: pip install -e ".[examples]"
#     "torch>=2.4",
#     "transformers>=5.9,<6",
#     "accelerate>=1.0",
#     "datasets>=3.0",
#     "scikit-learn>=1.3",
#     "pillow>=10.0",
#     "matplotlib>=3.7",
#     "kornia>=0.9",
# ]
# ///
"""Train or fine-tune a ViT-family classifier with the spatial-entropy regulariser (SAR).

Shaped like Transformers' `examples/pytorch/image-classification/run_image_classification.py`;
the SAR parts are `SARViTForImageClassification` (or `SpatialEntropyLoss` for other ViT-family
models), `SARTrainer` and `SARCallback` from `sar_hf` (Peruzzo et al., *Spatial Entropy as an
Inductive Bias for Vision Transformers*, https://arxiv.org/abs/2206.04636).

With no arguments it trains the `small` preset (a ViT of 4 layers, 192 wide, 4 heads, on 32 px
images cut into an 8x8 grid of patches; 1.2M parameters) from scratch for 30 epochs on
scikit-learn's bundled handwritten digits (1797 images of 8x8 pixels, 10 classes; nothing is
downloaded) and scores it on a fixed held-out test split (360 images). On 2 CPU cores this takes
about 5 minutes and reaches about 98% test accuracy:

    python examples/run_sar.py                                    # -> outputs/sar-digits
    python examples/run_sar.py --sar_weight 0 --output_dir outputs/baseline-digits   # plain ViT baseline
    python examples/run_sar.py --train_fraction 0.25 --output_dir outputs/sar-digits-25pc  # small data
    python examples/run_sar.py --dataset_name cluttered-digits   # digits among clutter -> outputs/sar-cluttered-digits
    python examples/run_sar.py my_run.json                        # every argument from a JSON file

Fine-tune a checkpoint on your images (one subfolder per class), or on a dataset of the Hub. A ViT
checkpoint becomes a `SARViTForImageClassification`; a DeiT, DINOv2 (with or without registers),
BEiT or other ViT-family checkpoint keeps its own class (and the saved model loads with plain
Transformers), with `SpatialEntropyLoss` attached:

    python examples/run_sar.py --model_name_or_path google/vit-base-patch16-224-in21k \\
        --train_dir path/to/train --validation_dir path/to/val \\
        --learning_rate 5e-5 --num_train_epochs 10 --sar_warmup_epochs 1 --output_dir outputs/my-sar-vit
    python examples/run_sar.py --model_name_or_path google/vit-base-patch16-224 --ignore_mismatched_sizes \\
        --dataset_name uoft-cs/cifar10 --image_column_name img --label_column_name label \\
        --learning_rate 5e-5 --output_dir outputs/cifar10-sar
    python examples/run_sar.py --model_name_or_path facebook/deit-small-patch16-224 --ignore_mismatched_sizes \\
        --train_dir path/to/train --learning_rate 5e-5 --output_dir outputs/deit-sar

On GPUs (mixed precision is Accelerate's: `--bf16` or `--fp16`; the log states the precision in use,
and on a CPU Accelerate runs `--fp16` in float32), or as two real processes on a CPU:

    accelerate launch --config_file examples/accelerate_configs/single_gpu.yaml examples/run_sar.py --bf16
    accelerate launch --config_file examples/accelerate_configs/multi_gpu.yaml examples/run_sar.py --bf16 \\
        --model_preset vit-small --dataset_name ... --output_dir outputs/deit-s-sar
    torchrun --nproc_per_node 8 examples/run_sar.py --bf16 ...
    accelerate launch --config_file examples/accelerate_configs/two_cpu_processes.yaml examples/run_sar.py \\
        --use_cpu --ddp_backend gloo
    torchrun --nproc_per_node 2 examples/run_sar.py --use_cpu --ddp_backend gloo

(`accelerate launch --cpu --num_processes 2` starts only one process: Accelerate runs CPU jobs
in-process unless it is given an MPI host file.)

A run that stopped (killed, preempted) continues from its last complete checkpoint with
`--resume_from_checkpoint True` (or a checkpoint folder); a checkpoint folder that was being
written when the run died is passed over. Rerunning the same command in the same `--output_dir`
resumes too, as in Transformers' examples; `--overwrite_output_dir` starts afresh.

Outputs in `--output_dir`: the model and its image processor (safetensors), `all_results.json`,
`train_results.json`, `eval_results.json` and `test_results.json` (accuracy, top-5 accuracy
above 5 classes, `*_sar/entropy`), `trainer_state.json` (with the `sar/*` training logs), the
model card `README.md`, and `attention_maps.png` (the [CLS] attention maps of a few test images).
Load the model with `import sar_hf` and the Auto classes or `pipeline("image-classification")`.

Evaluation, and the image processor saved with the model, convert every image to RGB (grayscale,
palette and RGBA images alike) and resize it as the processor does: the evaluation transform *is*
the saved processor, so `pipeline` and `AutoImageProcessor` see what evaluation saw.

Augmentation (training only) is by default a mild random resized crop (area 70-100%) plus, except
on the digits (a flipped digit is another symbol), a horizontal flip, with PIL and torch. DeiT's
recipe adds, each off by default, with kornia (timm needs torchvision, which does not install
beside every torch build; see `sar_hf/augmentation.py` for where kornia's versions differ):

    --randaugment_ops N --randaugment_magnitude M --randaugment_magnitude_std S
        RandAugment: N operations per batch of images, each applied to an image with probability 0.5,
        at magnitude M on timm's 0-10 scale, drawn per batch with standard deviation S.
    --random_erasing_prob P      erase a random box (2-33% of the area) of an image with probability P.
    --mixup_alpha A, --cutmix_alpha A, --mixup_switch_prob P
        mix each training batch on its device: mixup with λ ~ Beta(A, A), cutmix with a box of
        1 − λ of the area, cutmix with probability P when both are on. The model sees the mixed
        images; the loss is the cross-entropy against soft targets (with --label_smoothing_factor
        folded in) plus λ·spatial entropy of the mixed images.
    --label_smoothing_factor E   Trainer's own label smoothing.

`--recipe deit` sets DeiT's values (Touvron et al., https://arxiv.org/abs/2012.12877) in one go:
RandAugment 2 operations at magnitude 9 with std 0.5; mixup 0.8, cutmix 1.0, switch probability
0.5; random erasing 0.25; label smoothing 0.1; AdamW (Trainer's default optimizer) with learning
rate 5e-4 × global batch / 512, weight decay 0.05, 5 warm-up epochs (`--warmup_epochs`) and cosine
decay. A flag given explicitly wins over the recipe:

    python examples/run_sar.py --recipe deit --output_dir outputs/sar-digits-deit
    python examples/run_sar.py --recipe deit --mixup_alpha 0 --learning_rate 1e-3 ...

Left out of DeiT's recipe: stochastic depth (Transformers' ViT has no drop path); repeated
augmentation (DeiT's distributed sampler shows each image three times per batch, augmented apart,
across the GPUs; Trainer's samplers have no such mode); and the EMA of the weights (Trainer keeps
none; DeiT reports small gains that vanish after fine-tuning). Evaluation is never augmented.
Every draw of the augmentations comes from torch's generator, which `--seed` seeds: one seed gives
the same batches and, on the CPU, the same run.
"""

import logging
import math
import os
import shutil
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
import transformers
from accelerate.utils import DistributedType
from transformers import (
    AutoConfig,
    AutoModelForImageClassification,
    HfArgumentParser,
    TrainingArguments,
    set_seed,
)

from sar_hf import SARCallback, SARTrainer, SARViTConfig, SARViTForImageClassification, SpatialEntropyLoss
from sar_hf.augmentation import (
    RANDAUGMENT_MAX_MAGNITUDE,
    RANDAUGMENT_OPERATIONS,
    MixupCutmix,
    TrainImageTransform,
)
from sar_hf.callbacks import GRANULARITIES, SCHEDULES
from sar_hf.checkpoints import is_complete_checkpoint, last_complete_checkpoint
from sar_hf.cluttered_digits import load_cluttered_digits_dataset
from sar_hf.data import (
    ImageTransform,
    check_classes,
    check_columns,
    check_image_folder,
    collate_fn,
    drop_bad_images,
    load_digits_dataset,
    load_image_processor,
    prepare_labels,
    processor_size,
    stratified_split,
    stratified_subset,
    vit_image_processor_class,
)
from sar_hf.metrics import compute_metrics
from sar_hf.visualization import save_attention_figure

logger = logging.getLogger(__name__)

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
#: Named sets of flag values (`--recipe`); a flag given explicitly wins. "deit" is the recipe of DeiT
#: (https://arxiv.org/abs/2012.12877, Table 9), which the SAR paper trains with; its learning rate
#: scales with the global batch (RECIPE_LEARNING_RATE_PER_IMAGE).
RECIPES = {
    "deit": {
        "randaugment_ops": 2,
        "randaugment_magnitude": 9.0,
        "randaugment_magnitude_std": 0.5,
        "mixup_alpha": 0.8,
        "cutmix_alpha": 1.0,
        "mixup_switch_prob": 0.5,
        "random_erasing_prob": 0.25,
        "label_smoothing_factor": 0.1,
        "weight_decay": 0.05,
        "lr_scheduler_type": "cosine",
        "warmup_epochs": 5.0,
    }
}
#: DeiT's linear scaling rule: a learning rate of 5e-4 for a global batch of 512 images.
RECIPE_LEARNING_RATE_PER_IMAGE = {"deit": 5e-4 / 512}
#: Models that become a SARViTForImageClassification; any other ViT-family model keeps its own class.
VIT_MODEL_TYPES = ("vit", SARViTConfig.model_type)
#: Datasets built offline by sar_hf, by `--dataset_name`: (description, loader). Without --dataset_name
#: or --train_dir, "digits" is used.
BUNDLED_DATASETS = {
    "digits": ("scikit-learn digits", load_digits_dataset),
    "cluttered-digits": ("cluttered scikit-learn digits", load_cluttered_digits_dataset),
}
_TRUE = ("true", "last", "auto", "1", "yes")
_FALSE = ("false", "none", "no", "0", "")


@dataclass
class ModelArguments:
    """Which model to train: a checkpoint to fine-tune (`model_name_or_path`) or a preset from scratch."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "A checkpoint to fine-tune: a local folder or a Hub id (e.g. google/vit-base-patch16-224-in21k). "
            "A ViT checkpoint loads into SARViTForImageClassification; a DeiT, DINOv2, BEiT or other ViT-family "
            "checkpoint keeps its own class, with SpatialEntropyLoss attached. Leave it out to train "
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
    randaugment_ops: int = field(
        default=0,
        metadata={
            "help": "RandAugment (kornia's): this many random operations per batch of training images, each applied "
            "to an image with probability 0.5. 0: off; DeiT: 2."
        },
    )
    randaugment_magnitude: float = field(
        default=9.0, metadata={"help": "RandAugment's strength on timm's scale, 0 to 10 (DeiT: 9)."}
    )
    randaugment_magnitude_std: float = field(
        default=0.0,
        metadata={"help": "Standard deviation of RandAugment's magnitude, drawn per batch (DeiT: 0.5)."},
    )
    random_erasing_prob: float = field(
        default=0.0,
        metadata={
            "help": "Probability that a training image has a random box (2-33%% of its area) set to the mean colour. "
            "0: off; DeiT: 0.25."
        },
    )
    mixup_alpha: float = field(
        default=0.0,
        metadata={
            "help": "Mixup: mix each training batch with λ ~ Beta(alpha, alpha), on its device, and train on soft "
            "targets. 0: off; DeiT: 0.8."
        },
    )
    cutmix_alpha: float = field(
        default=0.0,
        metadata={
            "help": "Cutmix: paste a box of 1 − λ of the area, λ ~ Beta(alpha, alpha), from another image of the "
            "batch, and train on soft targets. 0: off; DeiT: 1.0."
        },
    )
    mixup_switch_prob: float = field(
        default=0.5,
        metadata={"help": "With both mixup and cutmix on, the probability that a batch gets cutmix (DeiT: 0.5)."},
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
        if not 0 <= self.randaugment_ops <= RANDAUGMENT_OPERATIONS:
            raise ValueError(
                f"--randaugment_ops must be in [0, {RANDAUGMENT_OPERATIONS}], got {self.randaugment_ops}."
            )
        if not 0 <= self.randaugment_magnitude <= RANDAUGMENT_MAX_MAGNITUDE:
            raise ValueError(f"--randaugment_magnitude must be in [0, 10], got {self.randaugment_magnitude}.")
        if not self.randaugment_magnitude_std >= 0:
            raise ValueError(f"--randaugment_magnitude_std must be >= 0, got {self.randaugment_magnitude_std}.")
        for name in ("mixup_alpha", "cutmix_alpha"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"--{name} must be a finite number >= 0, got {getattr(self, name)}.")
        for name in ("random_erasing_prob", "mixup_switch_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"--{name} must be a probability in [0, 1], got {getattr(self, name)}.")

    @property
    def mixes_batches(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    @property
    def bundled_dataset(self) -> str | None:
        """The name of the bundled dataset in use (a key of `BUNDLED_DATASETS`), or None for the user's data."""
        if self.dataset_name is None and self.train_dir is None:
            return "digits"
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


@dataclass
class RecipeArguments:
    """A training recipe (a named set of values for the other flags), and the learning-rate warm-up in epochs."""

    recipe: str | None = field(
        default=None,
        metadata={
            "help": "Set the flags of a published recipe at once; a flag given explicitly wins. deit: RandAugment "
            "(2 operations, magnitude 9, std 0.5), mixup 0.8, cutmix 1.0 (switch probability 0.5), random erasing "
            "0.25, label smoothing 0.1, AdamW with learning rate 5e-4 * global batch / 512, weight decay 0.05, "
            "5 warm-up epochs and cosine decay.",
            "choices": list(RECIPES),
        },
    )
    warmup_epochs: float | None = field(
        default=None,
        metadata={
            "help": "Learning-rate warm-up in epochs, turned into optimizer steps once the size of the training set "
            "is known; replaces --warmup_steps (DeiT: 5)."
        },
    )

    def __post_init__(self):
        if self.recipe is not None and self.recipe not in RECIPES:
            raise ValueError(f"--recipe must be one of {list(RECIPES)}, got {self.recipe!r}.")
        if self.warmup_epochs is not None and not self.warmup_epochs >= 0:
            raise ValueError(f"--warmup_epochs must be >= 0, got {self.warmup_epochs}.")


def parse_args(args: list[str] | None = None):
    """`(model_args, data_args, sar_args, recipe_args, training_args)` from a command line, or from one `.json` file.

    Each value comes from, in order of precedence: the arguments; the `--recipe`; the script's
    defaults (`TRAINING_DEFAULTS`, and `--output_dir` outputs/sar-<name> for a bundled dataset,
    e.g. outputs/sar-digits, outputs/sar-vit otherwise); the dataclasses' defaults.
    """
    import argparse
    import json

    args = sys.argv[1:] if args is None else list(args)
    parser = HfArgumentParser(
        (ModelArguments, DataTrainingArguments, SARArguments, RecipeArguments, TrainingArguments)
    )
    from_json = len(args) == 1 and args[0].endswith(".json")
    if from_json:
        with open(os.path.abspath(args[0]), encoding="utf-8") as file:
            values = json.load(file)
        given = {key for key, value in values.items() if value is not None}
        recipe, dataset_name = values.get("recipe"), values.get("dataset_name")
    else:
        # `--flag`, `--flag=value` and `--flag-name` spellings, as HfArgumentParser accepts them.
        given = {arg.split("=", 1)[0][2:].replace("-", "_") for arg in args if arg.startswith("--")}
        recipe_parser = argparse.ArgumentParser(add_help=False)
        recipe_parser.add_argument("--recipe")
        recipe_parser.add_argument("--dataset_name", "--dataset-name")
        recipe, dataset_name = vars(recipe_parser.parse_known_args(args)[0]).values()
    own_data = bool(given & {"dataset_name", "train_dir", "validation_dir"}) and dataset_name not in BUNDLED_DATASETS
    # Trainer's own warm-up flags (`warmup_ratio`: the deprecated spelling of a fractional `warmup_steps`).
    warmup_given = sorted(given & {"warmup_steps", "warmup_ratio"})
    if "warmup_epochs" in given and warmup_given:
        raise ValueError(
            f"--warmup_epochs and --{warmup_given[0]} both set the learning-rate warm-up; give one of them."
        )
    output_dir = "outputs/sar-vit" if own_data else f"outputs/sar-{dataset_name or 'digits'}"
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
        batch = training_args.per_device_train_batch_size * training_args.world_size
        training_args.learning_rate = (
            RECIPE_LEARNING_RATE_PER_IMAGE[recipe] * batch * training_args.gradient_accumulation_steps
        )
    return parsed


def load_data(model_args: ModelArguments, data_args: DataTrainingArguments, training_args: TrainingArguments):
    """The checked `DatasetDict` with "train", "validation" (unless no validation is wanted) and maybe "test"."""
    from datasets import DatasetDict, load_dataset

    image_col, label_col = data_args.image_column_name, data_args.label_column_name
    if data_args.bundled_dataset is not None:
        dataset = BUNDLED_DATASETS[data_args.bundled_dataset][1]()
    elif data_args.dataset_name is not None:
        dataset = load_dataset(
            data_args.dataset_name,
            data_args.dataset_config_name,
            cache_dir=model_args.cache_dir,
            token=model_args.token,
        )
    elif data_args.train_dir is not None:
        data_files = {"train": os.path.join(data_args.train_dir, "**")}
        check_image_folder(data_args.train_dir, "--train_dir")
        if data_args.validation_dir is not None:
            check_image_folder(data_args.validation_dir, "--validation_dir")
            data_files["validation"] = os.path.join(data_args.validation_dir, "**")
        # drop_labels=False: one class folder still gives a label column (and a clear error below).
        dataset = load_dataset("imagefolder", data_files=data_files, cache_dir=model_args.cache_dir, drop_labels=False)

    aliases = {"val": "validation", "valid": "validation"}
    dataset = DatasetDict({aliases.get(name, name): split for name, split in dataset.items()})
    if "train" not in dataset:
        raise ValueError(f"The dataset has no 'train' split; its splits are {list(dataset)}.")
    dataset = DatasetDict({name: dataset[name] for name in ("train", "validation", "test") if name in dataset})
    check_columns(dataset, image_col, label_col)
    dataset = DatasetDict({name: split.select_columns([image_col, label_col]) for name, split in dataset.items()})
    for name, split in dataset.items():
        if len(split) == 0:
            raise ValueError(f"The {name!r} split is empty.")
    dataset = prepare_labels(dataset, label_col)
    check_classes(dataset["train"], label_col, "train")

    skipped = {}
    if data_args.verify_images:
        skipped = drop_bad_images(dataset, image_col, skip=data_args.skip_bad_images)
    if "validation" not in dataset and data_args.train_val_split > 0:
        split = stratified_split(dataset["train"], data_args.train_val_split, label_col, training_args.seed)
        dataset["train"], dataset["validation"] = split["train"], split["test"]
    if data_args.train_fraction < 1:
        dataset["train"] = stratified_subset(dataset["train"], data_args.train_fraction, label_col, training_args.seed)
    if data_args.max_train_samples is not None:
        train = dataset["train"].shuffle(seed=training_args.seed)
        dataset["train"] = train.select(range(min(data_args.max_train_samples, len(train))))
    if data_args.max_eval_samples is not None and "validation" in dataset:
        validation = dataset["validation"].shuffle(seed=training_args.seed)
        dataset["validation"] = validation.select(range(min(data_args.max_eval_samples, len(validation))))
    for name, split in dataset.items():
        if len(split) == 0:
            raise ValueError(f"The {name!r} split is empty after skipping unreadable images and subsetting.")
    if training_args.do_train:
        check_classes(dataset["train"], label_col, "train")
    if training_args.do_eval and "validation" not in dataset:
        raise ValueError("--do_eval needs a validation split: give --validation_dir or a --train_val_split above 0.")
    return dataset, skipped


def build_model(model_args: ModelArguments, sar_args: SARArguments, labels: list[str]):
    """`(model, image_processor)`: the checkpoint fine-tuned, or the preset from scratch.

    A ViT checkpoint (or a preset) becomes a `SARViTForImageClassification`; any other ViT-family
    checkpoint keeps the class that the Auto classes give it, with a `SpatialEntropyLoss` attached
    (`model.sar_loss`), so that the saved model is that class's own checkpoint. The image processor
    converts every image to RGB (`do_convert_rgb`), as training does.
    """
    id2label = dict(enumerate(labels))
    label2id = {name: i for i, name in id2label.items()}
    sar = dict(sar_weight=sar_args.sar_weight, sar_layer=sar_args.sar_layer)
    if model_args.model_name_or_path is not None:
        hub = dict(cache_dir=model_args.cache_dir, revision=model_args.model_revision, token=model_args.token)
        path = model_args.model_name_or_path
        config = AutoConfig.from_pretrained(path, **hub)
        if config.num_labels != len(labels):
            if not model_args.ignore_mismatched_sizes:
                raise ValueError(
                    f"{path} classifies {config.num_labels} classes and the data has {len(labels)}; pass "
                    "--ignore_mismatched_sizes to train a new classifier head on top of its other weights."
                )
            logger.warning(
                "--ignore_mismatched_sizes: the classifier of %s has %d outputs and the data %d classes; the "
                "classifier is initialised anew, every other weight comes from the checkpoint.",
                path,
                config.num_labels,
                len(labels),
            )
        # `num_labels` follows from id2label; passing both makes Transformers warn about the old head.
        common = dict(
            id2label=id2label, label2id=label2id, ignore_mismatched_sizes=model_args.ignore_mismatched_sizes, **hub
        )
        if config.model_type in VIT_MODEL_TYPES:
            model = SARViTForImageClassification.from_pretrained(
                path, sar_no_skip_no_norm=sar_args.sar_no_skip_no_norm, **sar, **common
            )
        else:
            if sar_args.sar_no_skip_no_norm:
                raise ValueError(
                    f"--sar_no_skip_no_norm rebuilds the last block of a ViT (SARViTForImageClassification); {path} "
                    f"is a {config.model_type!r} model, which keeps its own blocks. Leave the flag out."
                )
            model = AutoModelForImageClassification.from_pretrained(path, **common)
            SpatialEntropyLoss(model, **sar)  # attaches itself as `model.sar_loss`
        try:
            processor = load_image_processor(model_args.image_processor_name or path, **hub)
        except OSError:
            if model_args.image_processor_name is not None:
                raise
            size = _vision_config(model.config).image_size
            logger.warning("%s has no image processor; using a ViTImageProcessor for its %s px.", path, size)
            processor = _vit_image_processor(size)
    else:
        preset = dict(MODEL_PRESETS[model_args.model_preset])
        preset["image_size"] = model_args.image_size or preset["image_size"]
        preset["patch_size"] = model_args.patch_size or preset["patch_size"]
        # Attention dropout stays 0: the loss reads the attention scores (SPEC).
        config = SARViTConfig(
            **preset,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            id2label=id2label,
            label2id=label2id,
            sar_no_skip_no_norm=sar_args.sar_no_skip_no_norm,
            **sar,
        )
        model = SARViTForImageClassification(config)
        if model_args.image_processor_name is not None:
            processor = load_image_processor(model_args.image_processor_name, cache_dir=model_args.cache_dir)
        else:
            processor = _vit_image_processor(config.image_size)
    # Training converts every image to RGB; so do evaluation and the saved processor (grayscale, palette, RGBA).
    processor.do_convert_rgb = True
    return model, processor


def _vision_config(config):
    """The config that holds `image_size` and `patch_size` (CLIP keeps them in its vision config)."""
    return getattr(config, "vision_config", config)


def _vit_image_processor(image_size: int):
    return vit_image_processor_class()(size={"height": image_size, "width": image_size})


def resolve_checkpoint(model_args: ModelArguments, training_args: TrainingArguments) -> str | None:
    """The checkpoint to resume from: the one named, the last complete one in `output_dir`, or None."""
    requested = training_args.resume_from_checkpoint
    if isinstance(requested, str) and requested.lower() in _FALSE:
        return None
    output_dir = training_args.output_dir
    if requested is not None and not (requested is True or str(requested).lower() in _TRUE):
        if not os.path.isdir(requested):
            raise ValueError(f"--resume_from_checkpoint {requested!r} is not a folder.")
        if not is_complete_checkpoint(requested):
            raise ValueError(
                f"--resume_from_checkpoint {requested!r} is not a complete checkpoint (no readable trainer_state.json "
                "or weights: the run was probably killed while saving it). Pass --resume_from_checkpoint True to take "
                "the last complete checkpoint of --output_dir."
            )
        return requested
    if not training_args.do_train:
        return None
    if model_args.overwrite_output_dir:
        if requested is not None:
            raise ValueError("--resume_from_checkpoint and --overwrite_output_dir contradict each other.")
        if training_args.should_save and os.path.isdir(output_dir):
            for name in os.listdir(output_dir):
                if name.startswith("checkpoint-") and os.path.isdir(os.path.join(output_dir, name)):
                    logger.warning("--overwrite_output_dir: deleting %s", os.path.join(output_dir, name))
                    shutil.rmtree(os.path.join(output_dir, name))
        return None
    last = last_complete_checkpoint(output_dir)
    if requested is not None and last is None:
        raise ValueError(f"--resume_from_checkpoint {requested}: {output_dir!r} holds no complete checkpoint.")
    if last is not None and requested is None:
        logger.warning(
            "Checkpoint detected, resuming training at %s. To train from scratch, change --output_dir or pass "
            "--overwrite_output_dir.",
            last,
        )
    return last


def steps_per_epoch(training_args: TrainingArguments, train_size: int) -> int:
    """Optimizer steps in one epoch over `train_size` images (at least 1), as Trainer counts them."""
    batches = math.ceil(train_size / (training_args.per_device_train_batch_size * training_args.world_size))
    # A last step of fewer than `gradient_accumulation_steps` batches is still a step.
    return max(math.ceil(batches / training_args.gradient_accumulation_steps), 1)


def precision_in_use(accelerator) -> str:
    """The mixed precision that Accelerate applies: `--fp16` on a CPU, for one, runs in float32."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return "as the DeepSpeed config sets it"
    return accelerator.mixed_precision if accelerator.native_amp else "no (float32)"


class MixingTrainer(SARTrainer):
    """[`SARTrainer`] that mixes every training batch (mixup or cutmix) on the device, before Trainer counts it.

    Trainer draws the batches of an optimizer step in `get_batch_samples`, already on the device
    (Accelerate places them there), and counts their labels to normalise the loss under gradient
    accumulation. Mixing them there lets the model see the mixed images and Trainer count the soft
    targets `[B, classes]` as it counts any labels; the loss is `compute_loss_func` (a soft-target
    cross-entropy) plus the SAR term that [`SARTrainer`] adds. Evaluation batches never come here.

    Args:
        batch_mix ([`MixupCutmix`]): `(pixel_values, labels) -> (mixed pixel_values, soft targets)`.
    """

    def __init__(self, *args, batch_mix: MixupCutmix, **kwargs):
        super().__init__(*args, **kwargs)
        self.batch_mix = batch_mix

    def _mix(self, batch: dict) -> dict:
        pixel_values, labels = (batch[key].to(self.args.device) for key in ("pixel_values", "labels"))
        pixel_values, labels = self.batch_mix(pixel_values, labels)
        return {**batch, "pixel_values": pixel_values, "labels": labels}

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        return super().get_batch_samples(map(self._mix, epoch_iterator), num_batches, device)


def figure_images(split, image_column: str, label_column: str, count: int) -> list:
    """Up to `count` images of `split`, one per class first (in class order), as PIL images."""
    labels = np.asarray(split.with_format("numpy")[label_column])
    order = [int(np.flatnonzero(labels == label)[0]) for label in np.unique(labels)]
    firsts = set(order)
    order += [i for i in range(len(split)) if i not in firsts]
    return [split[i][image_column] for i in order[:count]]


def main(args: list[str] | None = None) -> dict:
    """Runs the script on `args` (default: the command line) and returns all the metrics it saved."""
    model_args, data_args, sar_args, recipe_args, training_args = parse_args(args)

    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    log_level = training_args.get_process_log_level()
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()
    # This script's own messages (data sizes, model size, resuming) at INFO on the main process.
    script_level = logging.INFO if training_args.should_log and training_args.log_level == "passive" else log_level
    for name in (__name__, "sar_hf"):
        logging.getLogger(name).setLevel(script_level)

    checkpoint = resolve_checkpoint(model_args, training_args)
    with training_args.main_process_first(desc="loading and checking the dataset"):
        dataset, skipped = load_data(model_args, data_args, training_args)
    image_col, label_col = data_args.image_column_name, data_args.label_column_name
    labels = dataset["train"].features[label_col].names
    logger.info(
        "Data: %s, %d classes, %s",
        data_args.description,
        len(labels),
        ", ".join(f"{name} {len(split)}" for name, split in dataset.items()),
    )

    set_seed(training_args.seed)
    model, processor = build_model(model_args, sar_args, labels)
    vision = _vision_config(model.config)
    logger.info(
        "Model: %s (%s), %.2fM parameters, %s px images, %s px patches",
        model_args.model_name_or_path or f"preset {model_args.model_preset!r}",
        type(model).__name__,
        model.num_parameters() / 1e6,
        vision.image_size,
        vision.patch_size,
    )

    figure_split = dataset.get("test", dataset.get("validation", dataset["train"]))
    pictures = []
    if data_args.attention_figure_images and training_args.should_save:
        pictures = figure_images(figure_split, image_col, label_col, data_args.attention_figure_images)

    # Training: crops and flips per image, then RandAugment and random erasing on the batch that the
    # loader fetches (datasets hands the transform a whole batch). Evaluation: the image processor
    # itself, i.e. exactly what the saved processor does at inference.
    image_transform = ImageTransform(
        processor_size(processor),
        processor.image_mean,
        processor.image_std,
        augment=data_args.augment,
        hflip=data_args.hflip if data_args.hflip is not None else data_args.bundled_dataset is None,
        crop_scale=(data_args.crop_scale_min, 1.0),
        resample=getattr(processor, "resample", None),
    )
    train_images = TrainImageTransform(
        image_transform,
        randaugment_ops=data_args.randaugment_ops,
        randaugment_magnitude=data_args.randaugment_magnitude,
        randaugment_magnitude_std=data_args.randaugment_magnitude_std,
        random_erasing_prob=data_args.random_erasing_prob,
    )

    def eval_images(images):
        return processor(images=images, return_tensors="pt")["pixel_values"]

    def transforms(transform):
        def apply(batch):
            return {"pixel_values": transform(batch[image_col]), "labels": batch[label_col]}

        return apply

    dataset["train"].set_transform(transforms(train_images))
    for name in ("validation", "test"):
        if name in dataset:
            dataset[name].set_transform(transforms(eval_images))

    if recipe_args.warmup_epochs is not None:
        epoch_steps = steps_per_epoch(training_args, len(dataset["train"]))
        training_args.warmup_steps = round(recipe_args.warmup_epochs * epoch_steps)
        logger.info(
            "Learning-rate warm-up: %s epochs = %d optimizer steps",
            recipe_args.warmup_epochs,
            training_args.warmup_steps,
        )

    callback = SARCallback(
        sar_weight=sar_args.sar_weight,
        schedule=sar_args.sar_schedule,
        warmup_epochs=sar_args.sar_warmup_epochs,
        granularity=sar_args.sar_granularity,
    )
    trainer_kwargs = dict(
        model=model,
        args=training_args,
        train_dataset=dataset["train"] if training_args.do_train else None,
        eval_dataset=dataset.get("validation") if training_args.do_eval else None,
        compute_metrics=compute_metrics,
        processing_class=processor,
        data_collator=collate_fn,
        callbacks=[callback],
    )
    if data_args.mixes_batches:
        batch_mix = MixupCutmix(
            len(labels),
            mixup_alpha=data_args.mixup_alpha,
            cutmix_alpha=data_args.cutmix_alpha,
            switch_prob=data_args.mixup_switch_prob,
            label_smoothing=training_args.label_smoothing_factor,
        )
        # The model's SAR loss is also a cross-entropy against soft targets (smoothing is folded into
        # them, so Trainer's own label smoother, which would smooth them again, is not used).
        trainer = MixingTrainer(batch_mix=batch_mix, compute_loss_func=model.sar_loss, **trainer_kwargs)
    else:
        trainer = SARTrainer(**trainer_kwargs)
    precision = precision_in_use(trainer.accelerator)
    logger.warning(
        "Process rank: %s, device: %s, world size: %s, distributed: %s, mixed precision: %s",
        training_args.process_index,
        training_args.device,
        training_args.world_size,
        training_args.parallel_mode.value,
        precision,
    )
    requested = "fp16" if training_args.fp16 else "bf16" if training_args.bf16 else None
    if requested and precision == "no (float32)":
        logger.warning("--%s was given, but Accelerate runs float32 on %s.", requested, training_args.device)

    results = {}
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model()
        metrics = dict(train_result.metrics)
        metrics["train_samples"] = len(dataset["train"])
        if skipped:
            metrics["skipped_images"] = sum(skipped.values())
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
        results.update(metrics)
    if training_args.do_eval:
        metrics = trainer.evaluate()
        metrics["eval_samples"] = len(dataset["validation"])
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        results.update(metrics)
    if "test" in dataset and (training_args.do_eval or training_args.do_predict):
        metrics = trainer.evaluate(eval_dataset=dataset["test"], metric_key_prefix="test")
        metrics["test_samples"] = len(dataset["test"])
        trainer.log_metrics("test", metrics)
        trainer.save_metrics("test", metrics)
        results.update(metrics)

    if pictures and trainer.is_world_process_zero():
        model = trainer.accelerator.unwrap_model(trainer.model)
        output_path = os.path.join(training_args.output_dir, "attention_maps.png")
        save_attention_figure({f"SAR λ={sar_args.sar_weight}": model}, pictures, processor, output_path)
        logger.info("Attention maps of %d images: %s", len(pictures), output_path)
    local = model_args.model_name_or_path is None or os.path.isdir(model_args.model_name_or_path)
    if model_args.model_name_or_path is None:
        # The card takes a model's empty `name_or_path` for the name of a base model; a folder reads as
        # "trained from scratch".
        trainer.accelerator.unwrap_model(trainer.model).config.name_or_path = training_args.output_dir
    card = {
        "finetuned_from": None if local else model_args.model_name_or_path,
        "tasks": "image-classification",
        "dataset": data_args.description if data_args.train_dir is None else None,
        "tags": ["image-classification", "vision"],
    }
    if training_args.push_to_hub:
        trainer.push_to_hub(**card)
    else:
        trainer.create_model_card(**card)
    if trainer.is_world_process_zero():
        for name in ("eval", "test"):
            if f"{name}_accuracy" in results:
                print(f"final {name} accuracy: {results[f'{name}_accuracy']:.4f}", flush=True)
    return results


def end_distributed():
    """Destroys the process group of a distributed run once every rank is done, as PyTorch asks.

    A gloo group left for the interpreter's exit aborts a rank now and then (SIGABRT, "terminate
    called without an active exception") after all its work, and the launcher then kills the
    others. It runs after `main` has returned, so that the trainer and its DDP wrapper are gone
    first.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()  # no rank tears the group down while another still uses it
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
    end_distributed()
