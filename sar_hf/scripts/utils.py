"""The reusable steps of the training script: resume, load the data, build the model, and a few counts.

Each step takes the script's argument dataclasses (`arguments.py`) and Trainer's
`TrainingArguments`, and raises a `ValueError` that names the flag to change when it cannot go on.
"""

import logging
import math
import os
import shutil

import numpy as np
import torch
from accelerate.utils import DistributedType
from transformers import AutoConfig, AutoModelForImageClassification, TrainingArguments

from ..checkpoints import is_complete_checkpoint, last_complete_checkpoint
from ..configuration_sar_vit import SARViTConfig
from ..data import (
    check_classes,
    check_columns,
    drop_bad_images,
    load_image_dataset,
    load_image_processor,
    prepare_labels,
    stratified_split,
    stratified_subset,
    vit_image_processor_class,
)
from ..loss import SpatialEntropyLoss
from ..modeling_sar_vit import SARViTForImageClassification
from .arguments import MODEL_PRESETS, DataTrainingArguments, ModelArguments, SARArguments

logger = logging.getLogger(__name__)

#: Models that become a SARViTForImageClassification; any other ViT-family model keeps its own class.
VIT_MODEL_TYPES = ("vit", SARViTConfig.model_type)
_TRUE = ("true", "last", "auto", "1", "yes")
_FALSE = ("false", "none", "no", "0", "")


def resolve_checkpoint(model_args: ModelArguments, training_args: TrainingArguments) -> str | None:
    """The checkpoint to resume from: the one named, the last complete one in `output_dir`, or None.

    As in Transformers' examples, rerunning a command in the same `--output_dir` resumes it;
    `--overwrite_output_dir` deletes its checkpoint folders and starts afresh. A checkpoint folder
    that a killed run left half-written is passed over, and refused when named.
    """
    requested = training_args.resume_from_checkpoint
    if isinstance(requested, bool):  # `true` or `false` in a .json file of arguments
        requested = str(requested)
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


def load_data(model_args: ModelArguments, data_args: DataTrainingArguments, training_args: TrainingArguments):
    """`(dataset, skipped)`: the checked `DatasetDict` and the unreadable images left out per split.

    The dataset has "train", "validation" (carved from "train" by `--train_val_split` when the data
    has none, unless that is 0) and maybe "test", each with only the image and label columns, the
    labels a shared `ClassLabel`; `--train_fraction` and `--max_*_samples` applied.
    """
    from datasets import DatasetDict

    image_col, label_col = data_args.image_column_name, data_args.label_column_name
    dataset = load_image_dataset(
        data_args.bundled_dataset or data_args.dataset_name,
        data_args.dataset_config_name,
        data_args.train_dir,
        data_args.validation_dir,
        cache_dir=model_args.cache_dir,
        token=model_args.token,
    )
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
    seed = training_args.seed
    if "validation" not in dataset and data_args.train_val_split > 0:
        split = stratified_split(dataset["train"], data_args.train_val_split, label_col, seed)
        dataset["train"], dataset["validation"] = split["train"], split["test"]
    if data_args.train_fraction < 1:
        dataset["train"] = stratified_subset(dataset["train"], data_args.train_fraction, label_col, seed)
    for name, limit in (("train", data_args.max_train_samples), ("validation", data_args.max_eval_samples)):
        if limit is not None and name in dataset:
            dataset[name] = dataset[name].shuffle(seed=seed).select(range(min(limit, len(dataset[name]))))
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
            size = vision_config(model.config).image_size
            logger.warning("%s has no image processor; using a ViTImageProcessor for its %s px.", path, size)
            processor = _square_vit_processor(size)
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
            processor = _square_vit_processor(config.image_size)
    # Training converts every image to RGB; so do evaluation and the saved processor (grayscale, palette, RGBA).
    processor.do_convert_rgb = True
    return model, processor


def _square_vit_processor(size: int):
    """A ViT image processor that resizes to `size` × `size` pixels, for models saved without one."""
    return vit_image_processor_class()(size={"height": size, "width": size})


def vision_config(config):
    """The config that holds `image_size` and `patch_size` (CLIP keeps them in its vision config)."""
    return getattr(config, "vision_config", config)


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


def figure_images(split, image_column: str, label_column: str, count: int) -> list:
    """Up to `count` images of `split`, one per class first (in class order), as PIL images."""
    labels = np.asarray(split.with_format("numpy")[label_column])
    order = [int(np.flatnonzero(labels == label)[0]) for label in np.unique(labels)]
    firsts = set(order)
    order += [i for i in range(len(split)) if i not in firsts]
    return [split[i][image_column] for i in order[:count]]


def end_distributed():
    """Destroys the process group of a distributed run once every rank is done, as PyTorch asks.

    A gloo group left for the interpreter's exit aborts a rank now and then (SIGABRT, "terminate
    called without an active exception") after all its work, and the launcher then kills the
    others. It runs after training has returned, so that the trainer and its DDP wrapper are gone
    first.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()  # no rank tears the group down while another still uses it
        torch.distributed.destroy_process_group()


__all__ = [
    "VIT_MODEL_TYPES",
    "build_model",
    "end_distributed",
    "figure_images",
    "load_data",
    "precision_in_use",
    "resolve_checkpoint",
    "steps_per_epoch",
    "vision_config",
]
