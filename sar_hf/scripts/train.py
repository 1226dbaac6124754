"""`sar-hf train`: train or fine-tune a ViT-family image classifier with the spatial-entropy regulariser (SAR).

The flow of Transformers' `run_image_classification.py`: parse the arguments, find the checkpoint
to resume from, load and check the data, build the model and its image processor, set the
transforms, train with [`SARTrainer`], evaluate on the validation and test splits, draw the [CLS]
attention maps and write the model card. The arguments are in `arguments.py`, the steps in
`utils.py`, DeiT's recipe in `deit_recipe.py`; `sar-hf train --help` lists every flag. The same
script runs as `python examples/run_sar.py`, `python -m sar_hf train` and
`python sar_hf/scripts/train.py`, so its imports are absolute.
"""

import logging
import os
import sys

import transformers
from transformers import set_seed

from sar_hf import SARCallback, SARTrainer
from sar_hf.data import ImageTransform, collate_fn, processor_size
from sar_hf.metrics import compute_metrics
from sar_hf.scripts.arguments import parse_args
from sar_hf.scripts.deit_recipe import MixingTrainer
from sar_hf.scripts.utils import (
    build_model,
    end_distributed,
    figure_images,
    load_data,
    precision_in_use,
    resolve_checkpoint,
    steps_per_epoch,
    vision_config,
)
from sar_hf.visualization import save_attention_figure

logger = logging.getLogger(__name__)


def train(model_args, data_args, sar_args, recipe_args, training_args) -> dict:
    """Runs the script on parsed arguments (see `parse_args`); returns all the metrics it saved."""
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

    # A run that stopped continues from its last complete checkpoint.
    checkpoint = resolve_checkpoint(model_args, training_args)

    # The data, checked: one error that names the problem rather than a failure mid-training.
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

    # The model and its image processor.
    set_seed(training_args.seed)
    model, processor = build_model(model_args, sar_args, labels)
    vision = vision_config(model.config)
    logger.info(
        "Model: %s (%s), %.2fM parameters, %s px images, %s px patches",
        model_args.model_name_or_path or f"preset {model_args.model_preset!r}",
        type(model).__name__,
        model.num_parameters() / 1e6,
        vision.image_size,
        vision.patch_size,
    )
    pictures = []
    if data_args.attention_figure_images and training_args.should_save:
        figure_split = dataset.get("test", dataset.get("validation", dataset["train"]))
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
    train_images = recipe_args.train_transform(image_transform)

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
        warmup = round(recipe_args.warmup_epochs * steps_per_epoch(training_args, len(dataset["train"])))
        training_args.warmup_steps = warmup
        logger.info("Learning-rate warm-up: %s epochs = %d optimizer steps", recipe_args.warmup_epochs, warmup)

    # The trainer: SARTrainer adds λ·spatial entropy to its loss; SARCallback schedules λ and logs sar/*.
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
    if recipe_args.mixes_batches:
        # The loss of mixed batches is a cross-entropy against soft targets, with the smoothing folded
        # into them (so Trainer's label smoother, which would smooth them again, is not used).
        batch_mix = recipe_args.batch_mix(len(labels), training_args.label_smoothing_factor)
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

    # Train, then score on the validation and test splits.
    results = {}
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model()
        metrics = {**train_result.metrics, "train_samples": len(dataset["train"])}
        if skipped:
            metrics["skipped_images"] = sum(skipped.values())
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
        results.update(metrics)
    scored = [("eval", "validation")] if training_args.do_eval else []
    if "test" in dataset and (training_args.do_eval or training_args.do_predict):
        scored.append(("test", "test"))
    for prefix, split in scored:
        metrics = trainer.evaluate(eval_dataset=dataset[split], metric_key_prefix=prefix)
        metrics[f"{prefix}_samples"] = len(dataset[split])
        trainer.log_metrics(prefix, metrics)
        trainer.save_metrics(prefix, metrics)
        results.update(metrics)

    # The [CLS] attention maps of a few test images, and the model card (or the Hub).
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


def main(args: list[str] | None = None) -> dict:
    """`sar-hf train`: parses `args` (default: the command line), trains, and ends the process group."""
    results = train(*parse_args(args))
    end_distributed()  # after `train` has returned, so that the trainer and its DDP wrapper are gone
    return results


if __name__ == "__main__":
    main()
