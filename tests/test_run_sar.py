"""The training script (`sar-hf train`, `examples/run_sar.py`) end to end on tiny models and offline data.

The script's `main(args)` is called in this process (as Transformers' example tests do), except
for the two-process runs, which go through `accelerate launch` and `torchrun` in a subprocess.
Its arguments (`sar_hf/scripts/arguments.py`) and steps (`sar_hf/scripts/utils.py`) are tested here too.
"""

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image as PILImage

import sar_hf
from sar_hf.metrics import compute_metrics
from sar_hf.scripts.arguments import TRAINING_DEFAULTS, parse_args
from sar_hf.scripts.train import main
from sar_hf.scripts.utils import end_distributed, load_data, steps_per_epoch

ROOT = pathlib.Path(__file__).resolve().parents[1]

# A few seconds per run: the tiny preset (16 px images, 4 px patches, 2 layers 32 wide).
TINY = [
    "--model_preset", "tiny",
    "--max_train_samples", "64",
    "--max_eval_samples", "32",
    "--per_device_train_batch_size", "16",
    "--per_device_eval_batch_size", "128",
    "--num_train_epochs", "1",
    "--logging_steps", "1",
    "--report_to", "none",
    "--attention_figure_images", "0",
    "--dataloader_pin_memory", "False",
]  # fmt: skip


def _run(tmp_path, *extra, name="out"):
    output_dir = tmp_path / name
    results = main([*TINY, "--output_dir", str(output_dir), "--cache_dir", str(tmp_path / "cache"), *extra])
    return results, output_dir


def _state(output_dir):
    return json.loads((output_dir / "trainer_state.json").read_text())


def _train_logs(output_dir):
    """The training logs of a run, which must apply the SAR term (λ > 0) on some step."""
    logs = [entry for entry in _state(output_dir)["log_history"] if "loss" in entry]
    assert logs and all("sar/entropy" in entry for entry in logs)
    assert max(entry["sar/weight"] for entry in logs) > 0
    return logs


@pytest.fixture
def batches(monkeypatch):
    """Every batch that reaches the model, as `(training, pixel_values, labels)`, recorded in `compute_loss`."""
    seen = []
    compute_loss = sar_hf.SARTrainer.compute_loss

    def recording(self, model, inputs, *args, **kwargs):
        seen.append((model.training, inputs["pixel_values"].detach().clone(), inputs["labels"].clone()))
        return compute_loss(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(sar_hf.SARTrainer, "compute_loss", recording)
    return seen


def _image_folder(root, classes=("cat", "dog", "eel"), per_class=6, size=(12, 10)):
    rng = np.random.default_rng(0)
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 60, (*size[::-1], 3), dtype=np.uint8) + np.uint8(90 * k)
            PILImage.fromarray(pixels).save(root / name / f"{i}.png")
    return root


# --------------------------------------------------------------------------------------------
# Arguments


def test_defaults_need_no_arguments():
    model_args, data_args, sar_args, recipe_args, training_args = parse_args([])
    assert model_args.model_preset == "small" and model_args.model_name_or_path is None
    assert (
        data_args.bundled_dataset == "digits" and data_args.train_val_split == 0.15 and data_args.train_fraction == 1.0
    )
    assert (sar_args.sar_weight, sar_args.sar_schedule, sar_args.sar_granularity) == (0.01, "warmup_cosine", "auto")
    assert training_args.output_dir == "outputs/sar-digits"
    assert training_args.do_train and training_args.do_eval and not training_args.remove_unused_columns
    assert training_args.learning_rate == TRAINING_DEFAULTS["learning_rate"]
    # DeiT's recipe is off unless asked for.
    assert recipe_args.recipe is None and recipe_args.warmup_epochs is None
    assert (recipe_args.randaugment_ops, recipe_args.random_erasing_prob, recipe_args.mixup_alpha) == (0, 0, 0)
    assert training_args.label_smoothing_factor == 0
    assert not recipe_args.mixes_batches
    # Own data goes elsewhere by default; every default can be overridden.
    args = ["--train_dir", "x", "--learning_rate", "5e-5", "--eval_strategy", "no", "--do_eval", "False"]
    *_, training_args = parse_args(args)
    assert training_args.output_dir == "outputs/sar-vit"
    assert training_args.learning_rate == 5e-5 and not training_args.do_eval


def test_a_bundled_dataset_by_name(tmp_path):
    """`--dataset_name cluttered-digits` builds the bundled dataset offline: its own validation split
    is used, digits are not flipped, and the default output folder and the card name it."""
    args = ["--dataset_name", "cluttered-digits", "--model_preset", "tiny", "--max_train_samples", "32"]
    model_args, data_args, _, _, training_args = parse_args(args)
    assert training_args.output_dir == "outputs/sar-cluttered-digits"
    assert data_args.bundled_dataset == "cluttered-digits" and data_args.description == "cluttered scikit-learn digits"
    dataset, _ = load_data(model_args, data_args, training_args)
    assert {name: len(split) for name, split in dataset.items()} == {"train": 32, "validation": 216, "test": 720}
    assert dataset["train"].column_names == ["image", "label"]
    # The folder of that name is reached with a path.
    (tmp_path / "cluttered-digits").mkdir()
    _, data_args, *_ = parse_args(["--dataset_name", str(tmp_path / "cluttered-digits")])
    assert data_args.bundled_dataset is None


def test_json_config_file(tmp_path):
    config = {
        "output_dir": str(tmp_path / "run"),
        "sar_weight": 0.05,
        "sar_schedule": "constant",
        "train_fraction": 0.5,
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    model_args, data_args, sar_args, _, training_args = parse_args([str(path)])
    assert (sar_args.sar_weight, sar_args.sar_schedule, data_args.train_fraction) == (0.05, "constant", 0.5)
    assert training_args.output_dir == str(tmp_path / "run")
    assert training_args.num_train_epochs == TRAINING_DEFAULTS["num_train_epochs"]
    path.write_text(json.dumps({**config, "sar_schedule": "linear"}))
    with pytest.raises(ValueError, match="--sar_schedule must be one of"):
        parse_args([str(path)])


def test_a_json_file_chooses_the_defaults_as_the_flags_do(tmp_path):
    """The keys of a .json file that are not null count as given, as flags do: own data, an explicit learning rate
    or warm-up over the recipe's, two warm-ups refused."""

    def parsed(values):
        path = tmp_path / "run.json"
        path.write_text(json.dumps(values))
        return parse_args([str(path)])

    assert parsed({"train_dir": "own/images"})[-1].output_dir == "outputs/sar-vit"
    assert parsed({"train_dir": None})[-1].output_dir == "outputs/sar-digits"  # null: not given
    assert parsed({"dataset_name": "cluttered-digits"})[-1].output_dir == "outputs/sar-cluttered-digits"
    *_, recipe_args, training_args = parsed({"recipe": "deit", "learning_rate": 1e-3, "warmup_steps": 3})
    assert (training_args.learning_rate, training_args.warmup_steps, recipe_args.warmup_epochs) == (1e-3, 3, None)
    with pytest.raises(ValueError, match="^--warmup_epochs and --warmup_steps both set the learning-rate warm-up"):
        parsed({"warmup_epochs": 2, "warmup_steps": 10})


def test_each_spelling_of_a_flag_chooses_the_defaults():
    """`--flag value`, `--flag=value` and `--flag-name` count as given alike: the default output folder, the recipe's
    learning rate, the warm-up that is refused twice."""
    for args, output_dir in [
        (["--dataset_name", "someone/images"], "outputs/sar-vit"),
        (["--dataset-name", "cluttered-digits"], "outputs/sar-cluttered-digits"),
        (["--dataset_name=cluttered-digits"], "outputs/sar-cluttered-digits"),
        (["--train_dir=runs/lr=0.1"], "outputs/sar-vit"),
        (["--train-dir", "own", "--validation-dir", "val"], "outputs/sar-vit"),
    ]:
        assert parse_args(args)[-1].output_dir == output_dir, args
    for spelling in (["--learning_rate=1e-3"], ["--learning-rate", "1e-3"]):
        assert parse_args(["--recipe", "deit", *spelling])[-1].learning_rate == 1e-3, spelling
    with pytest.raises(ValueError, match="^--warmup_epochs and --warmup_steps both set"):
        parse_args(["--warmup_epochs=2", "--warmup-steps=10"])


def test_a_json_file_is_read_as_utf8_whatever_the_locale(tmp_path, monkeypatch):
    """A .json file of arguments (UTF-8, as JSON is) with a non-ASCII path, read where the locale's encoding is
    another one (cp1252, as on Windows; `open`'s default is faked here)."""
    import builtins

    from sar_hf.scripts import arguments

    def open_with_cp1252_default(file, mode="r", buffering=-1, encoding=None, *args, **kwargs):
        return builtins.open(file, mode, buffering, encoding or "cp1252", *args, **kwargs)

    monkeypatch.setattr(arguments, "open", open_with_cp1252_default, raising=False)
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"output_dir": "runs/λ-0.01"}, ensure_ascii=False), encoding="utf-8")
    assert parse_args([str(path)])[-1].output_dir == "runs/λ-0.01"


def test_without_arguments_the_command_line_is_read(monkeypatch):
    """`python examples/run_sar.py --flags` calls `main()`: the flags after the program's name."""
    import sys

    monkeypatch.setattr(sys, "argv", ["examples/run_sar.py", "--sar_weight", "0.5", "--model_preset", "tiny"])
    model_args, _, sar_args, *_ = parse_args()
    assert (sar_args.sar_weight, model_args.model_preset) == (0.5, "tiny")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--train_fraction", "1.5"], r"--train_fraction must be in \(0, 1\], got 1.5"),
        (["--train_fraction", "0"], r"--train_fraction must be in \(0, 1\]"),
        (["--train_val_split", "1"], r"--train_val_split must be in \[0, 1\)"),
        (["--sar_weight", "-0.1"], "--sar_weight must be a finite number >= 0"),
        (["--sar_warmup_epochs", "-1"], "--sar_warmup_epochs must be >= 0"),
        (["--image_size", "30"], "--image_size 30 is not a multiple of --patch_size 4"),
        (["--model_name_or_path", "x", "--patch_size", "8"], "--patch_size sets up a model trained from scratch"),
        (["--dataset_name", "x", "--train_dir", "y"], "Pass either --dataset_name or --train_dir"),
        (["--validation_dir", "y"], "--validation_dir needs a --train_dir"),
        (["--max_train_samples", "0"], "--max_train_samples must be at least 1"),
        (["--mixup_alpha", "-0.2"], r"--mixup_alpha must be in \[0, inf\), got -0.2"),
        (["--cutmix_alpha", "-1"], r"--cutmix_alpha must be in \[0, inf\)"),
        (["--mixup_switch_prob", "1.5"], r"--mixup_switch_prob must be in \[0, 1\], got 1.5"),
        (["--random_erasing_prob", "-0.25"], r"--random_erasing_prob must be in \[0, 1\]"),
        (["--label_smoothing_factor", "1.1"], r"--label_smoothing_factor must be in \[0, 1\]"),
        (["--randaugment_magnitude", "12"], r"--randaugment_magnitude must be in \[0, 10\], got 12"),
        (["--randaugment_ops", "16"], r"--randaugment_ops must be in \[0, 15\]"),
        (["--randaugment_magnitude_std", "-1"], r"--randaugment_magnitude_std must be in \[0, inf\)"),
        (["--recipe", "deit", "--cutmix_alpha", "-1"], r"--cutmix_alpha must be in \[0, inf\)"),
        (["--warmup_epochs", "-1"], r"--warmup_epochs must be in \[0, inf\)"),
        (["--warmup_epochs", "2", "--warmup_steps", "10"], "--warmup_epochs and --warmup_steps both set"),
        (["--warmup_epochs", "2", "--warmup_ratio", "0.1"], "--warmup_epochs and --warmup_ratio both set"),
        (["--image_size", "0"], "--image_size must be a positive number of pixels, got 0."),
        (["--patch_size", "-4"], "--patch_size must be a positive number of pixels, got -4."),
        (["--model_name_or_path", "x", "--image_size", "32"], "--image_size sets up a model trained from scratch"),
        (["--patch_size", "5"], "--image_size 32 is not a multiple of --patch_size 5."),  # the small preset's 32 px
        (["--model_preset", "tiny", "--image_size", "18"], "--image_size 18 is not a multiple of --patch_size 4."),
        (["--dataset_name", "x", "--validation_dir", "y"], "Pass either --dataset_name or --train_dir"),
        (["--train_val_split", "-0.1"], r"--train_val_split must be in \[0, 1\), got -0.1."),
        (["--max_eval_samples", "0"], "--max_eval_samples must be at least 1, got 0."),
        (["--crop_scale_min", "0"], r"--crop_scale_min must be in \(0, 1\], got 0.0."),
        (["--crop_scale_min", "1.01"], r"--crop_scale_min must be in \(0, 1\], got 1.01."),
        (["--attention_figure_images", "-1"], "--attention_figure_images must be >= 0, got -1."),
        (["--sar_weight", "inf"], "--sar_weight must be a finite number >= 0, got inf."),
        (["--sar_weight", "nan"], "--sar_weight must be a finite number >= 0, got nan."),
        (["--sar_warmup_epochs", "nan"], "--sar_warmup_epochs must be >= 0, got nan."),
        (["--label_smoothing_factor", "-0.1"], r"--label_smoothing_factor must be in \[0, 1\], got -0.1."),
    ],
)
def test_invalid_arguments(tmp_path, monkeypatch, args, message):
    """Each error is one sentence that starts with the flag to change (the message as a whole, not a part)."""
    import re

    from sar_hf.scripts import train as script

    def accepted(*parsed):  # fails at once rather than going on to load data and train
        raise AssertionError(f"{args} accepted")

    monkeypatch.setattr(script, "train", accepted)
    with pytest.raises(ValueError) as raised:
        main([*args, "--output_dir", str(tmp_path)])
    assert re.match(message, str(raised.value)) and str(raised.value).endswith("."), str(raised.value)


def test_the_limits_of_each_range_are_accepted():
    args = ["--train_fraction", "1", "--train_val_split", "0", "--crop_scale_min", "1",
            "--attention_figure_images", "0", "--sar_weight", "0", "--sar_warmup_epochs", "0",
            "--max_train_samples", "1", "--max_eval_samples", "1", "--label_smoothing_factor", "1",
            "--model_preset", "tiny", "--image_size", "1", "--patch_size", "1"]  # fmt: skip
    model_args, data_args, sar_args, _, training_args = parse_args(args)
    assert (data_args.train_fraction, data_args.train_val_split, data_args.crop_scale_min) == (1, 0, 1)
    assert (sar_args.sar_weight, sar_args.sar_warmup_epochs, training_args.label_smoothing_factor) == (0, 0, 1)
    assert (model_args.image_size, model_args.patch_size, data_args.max_eval_samples) == (1, 1, 1)
    *_, training_args = parse_args(["--model_preset", "tiny", "--image_size", "24"])  # 24 = 6 patches of 4 px
    assert training_args.label_smoothing_factor == 0


@pytest.mark.parametrize(
    "values, message",
    [
        ({"model_preset": "huge"},
         "--model_preset must be one of ['tiny', 'small', 'vit-tiny', 'vit-small', 'vit-base'], got 'huge'."),
        ({"sar_granularity": "hourly"}, "--sar_granularity must be one of ['auto', 'epoch', 'step'], got 'hourly'."),
        ({"sar_schedule": "linear"}, "--sar_schedule must be one of ['warmup_cosine', 'constant'], got 'linear'."),
    ],
)  # fmt: skip
def test_a_json_file_is_checked_as_the_flags_are(tmp_path, values, message):
    """A `.json` file skips argparse's choices; the dataclasses check the names themselves."""
    path = tmp_path / "run.json"
    path.write_text(json.dumps(values))
    with pytest.raises(ValueError) as raised:
        parse_args([str(path)])
    assert str(raised.value) == message


def test_compute_metrics():
    logits = np.eye(8)[[0, 1, 2, 3]] + np.linspace(0, 0.5, 8)  # then classes 7, 6, 5, 4 rank next
    assert compute_metrics((logits, np.array([0, 1, 7, 0]))) == {"accuracy": 0.5, "top5_accuracy": 0.75}
    assert compute_metrics(((np.array([[0.2, 0.8], [0.9, 0.1]]), None), np.array([1, 1]))) == {"accuracy": 0.5}


def test_recipe_deit_sets_the_documented_values():
    *_, recipe_args, training_args = parse_args(["--recipe", "deit"])
    assert (recipe_args.randaugment_ops, recipe_args.randaugment_magnitude, recipe_args.randaugment_magnitude_std) == (
        2,
        9,
        0.5,
    )
    assert (recipe_args.mixup_alpha, recipe_args.cutmix_alpha, recipe_args.mixup_switch_prob) == (0.8, 1.0, 0.5)
    assert (recipe_args.random_erasing_prob, training_args.label_smoothing_factor) == (0.25, 0.1)
    assert training_args.optim.value.startswith("adamw") and training_args.weight_decay == 0.05
    assert training_args.lr_scheduler_type.value == "cosine" and recipe_args.warmup_epochs == 5
    assert training_args.learning_rate == pytest.approx(5e-4 * 64 / 512)  # the script's batch of 64
    # The global batch counts the processes and the accumulated batches too.
    args = ["--recipe", "deit", "--per_device_train_batch_size", "128", "--gradient_accumulation_steps", "4"]
    *_, training_args = parse_args(args)
    assert training_args.learning_rate == pytest.approx(5e-4)


def test_an_explicit_flag_wins_over_the_recipe(tmp_path):
    args = ["--recipe", "deit", "--mixup_alpha", "0", "--learning-rate", "1e-3", "--warmup_steps", "3",
            "--label_smoothing_factor=0.05", "--randaugment_ops", "1", "--weight_decay", "0"]  # fmt: skip
    *_, recipe_args, training_args = parse_args(args)
    assert (recipe_args.mixup_alpha, recipe_args.randaugment_ops, training_args.label_smoothing_factor) == (0, 1, 0.05)
    assert (training_args.learning_rate, training_args.warmup_steps, training_args.weight_decay) == (1e-3, 3, 0)
    assert recipe_args.warmup_epochs is None  # --warmup_steps replaces the recipe's warm-up
    assert (recipe_args.cutmix_alpha, recipe_args.random_erasing_prob) == (1.0, 0.25)  # the rest of the recipe stays
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"recipe": "deit", "cutmix_alpha": 0.5, "output_dir": str(tmp_path)}))
    *_, recipe_args, training_args = parse_args([str(path)])
    assert (recipe_args.cutmix_alpha, recipe_args.mixup_alpha, recipe_args.warmup_epochs) == (0.5, 0.8, 5)
    assert training_args.learning_rate == pytest.approx(5e-4 * 64 / 512)


def test_gradient_accumulation_gives_the_gradient_of_one_big_batch(tmp_path):
    """Soft targets through MixingTrainer: 2 accumulated batches of 4 make the step that one batch of 8 makes."""
    import torch
    from tiny import TINY as TINY_CONFIG
    from tiny import TinyImages
    from transformers import TrainingArguments

    from sar_hf.scripts.deit_recipe import MixingTrainer, MixupCutmix

    targets = MixupCutmix(3, mixup_alpha=1.0, label_smoothing=0.1)

    def mix(pixel_values, labels):  # the same for every image wherever it lies: no pairing within the batch
        return pixel_values.flip(-1), targets.soft_targets(labels, (labels + 1) % 3, 0.3 + 0.1 * labels)

    def new_model(sar_weight=0.5):
        torch.manual_seed(0)
        return sar_hf.SARViTForImageClassification(sar_hf.SARViTConfig(**TINY_CONFIG, sar_weight=sar_weight))

    def one_step(batch_size, accumulation, sar_weight=0.5):
        model = new_model(sar_weight)
        args = TrainingArguments(
            output_dir=str(tmp_path / f"{batch_size}x{accumulation}"), per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation, max_steps=1, learning_rate=1.0, optim="sgd", weight_decay=0.0,
            lr_scheduler_type="constant", max_grad_norm=0.0, report_to="none", save_strategy="no", use_cpu=True,
            seed=0,
        )  # fmt: skip
        trainer = MixingTrainer(
            model=model, args=args, train_dataset=TinyImages(8), batch_mix=mix, compute_loss_func=model.sar_loss,
            callbacks=[sar_hf.SARCallback(schedule="constant")],
        )  # fmt: skip
        trainer.train()
        return model.state_dict()

    big, accumulated = one_step(8, 1), one_step(4, 2)
    # By hand: one SGD step of size 1 on mean soft cross-entropy + λ · mean spatial entropy of the 8 images.
    model = new_model()
    data = TinyImages(8)
    pixel_values, soft = mix(data.pixel_values, data.labels)
    logits = model(pixel_values).logits
    scores, grid_size, _ = model.sar_loss.capture.pop()
    loss = -(soft * logits.log_softmax(-1)).sum(-1).mean() + 0.5 * sar_hf.spatial_entropy(scores, grid_size)
    loss.backward()
    expected = {name: (param - param.grad).detach() for name, param in model.named_parameters()}
    for name, value in expected.items():
        torch.testing.assert_close(big[name], value, atol=1e-6, rtol=1e-5, msg=name)
        torch.testing.assert_close(accumulated[name], value, atol=1e-6, rtol=1e-5, msg=name)
    without = one_step(8, 1, sar_weight=0.0)  # the SAR term takes part in that gradient
    assert any(not torch.allclose(without[name], value, atol=1e-5) for name, value in big.items())


@pytest.mark.parametrize("images, batch_size, accumulation", [(26, 2, 4), (64, 16, 3), (10, 4, 1), (5, 8, 2)])
def test_steps_per_epoch_counts_as_trainer_does(tmp_path, images, batch_size, accumulation):
    """`--warmup_epochs` turns epochs into the optimizer steps that Trainer takes in one epoch, a partly
    accumulated last step included (26 images in batches of 2, 4 accumulated: 13 batches, 4 steps), and
    one step when all the images fit in one batch (5 images, batches of 8)."""
    import torch
    from tiny import TINY as TINY_CONFIG
    from tiny import TinyImages
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
        num_train_epochs=1, report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = sar_hf.SARViTForImageClassification(sar_hf.SARViTConfig(**TINY_CONFIG))
    trainer = Trainer(model=model, args=args, train_dataset=TinyImages(images))
    trainer.train()
    assert steps_per_epoch(args, images) == trainer.state.global_step
    # Issue 23's case: 1221 images, batch 16, 4 accumulated: 77 batches make 20 steps (not 19).
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=16, gradient_accumulation_steps=4)
    assert steps_per_epoch(args, 1221) == 20


@pytest.mark.parametrize(
    "images, batch_size, processes, accumulation", [(26, 2, 8, 1), (1221, 16, 8, 4), (10, 4, 2, 1), (3, 4, 2, 2)]
)
def test_steps_per_epoch_on_several_processes_counts_each_processs_share(
    tmp_path, monkeypatch, images, batch_size, processes, accumulation
):
    """On 8 GPUs each process loads an eighth of the batches: `--warmup_epochs` counts the steps of one process
    (1221 images, batches of 16 on 8 processes: 10 batches each, 4 accumulated make 3 steps, not 20)."""
    from accelerate.data_loader import prepare_data_loader
    from torch.utils.data import DataLoader
    from transformers import TrainingArguments

    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation
    )
    monkeypatch.setattr(TrainingArguments, "world_size", property(lambda self: processes))
    # What each process's loader yields when Trainer's Accelerator shards the batches across the processes.
    batches = {
        len(prepare_data_loader(DataLoader(range(images), batch_size=batch_size), None, processes, rank, False))
        for rank in range(processes)
    }
    assert len(batches) == 1  # the same on every process
    steps = -(-batches.pop() // accumulation)  # a last step of fewer batches is still a step
    assert steps_per_epoch(args, images) == steps
    if (images, batch_size, processes, accumulation) == (1221, 16, 8, 4):
        assert steps == 3


# --------------------------------------------------------------------------------------------
# Data errors (they stop the run before any training)


def test_missing_column_lists_the_columns(tmp_path):
    from datasets import Dataset

    folder = tmp_path / "data"
    folder.mkdir()
    Dataset.from_dict({"img": [[0]], "target": [0]}).to_parquet(str(folder / "train.parquet"))
    with pytest.raises(ValueError, match=r"no column 'image' or 'label'; its columns are \['img', 'target'\]"):
        _run(tmp_path, "--dataset_name", str(folder))


def test_empty_folder(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"--train_dir .* holds no image files"):
        _run(tmp_path, "--train_dir", str(tmp_path / "train"))


def test_one_class(tmp_path):
    train = _image_folder(tmp_path / "train", classes=("cat",))
    with pytest.raises(ValueError, match=r"only one class \(\['cat'\]\)"):
        _run(tmp_path, "--train_dir", str(train))


@pytest.mark.parametrize(
    "labels, message",
    [([0.0, 1.0], "has type float64"), ([0, None], "has missing values")],
)
def test_bad_labels(tmp_path, labels, message):
    from datasets import Dataset, Features, Image, Value

    folder = tmp_path / "data"
    folder.mkdir()
    images = [PILImage.new("RGB", (8, 8)) for _ in labels]
    features = Features({"image": Image(), "label": Value("float64" if isinstance(labels[0], float) else "int64")})
    Dataset.from_dict({"image": images, "label": labels}, features=features).to_parquet(str(folder / "train.parquet"))
    with pytest.raises(ValueError, match=message):
        _run(tmp_path, "--dataset_name", str(folder))


def test_unreadable_image_is_named(tmp_path):
    train = _image_folder(tmp_path / "train")
    (train / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ValueError, match=r"1 image\(s\) of the 'train' split cannot be read: .*dog/broken\.png"):
        _run(tmp_path, "--train_dir", str(train))


# --------------------------------------------------------------------------------------------
# Training runs


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """One default run on the digits (tiny preset), shared by the tests that read its outputs."""
    tmp_path = tmp_path_factory.mktemp("digits")
    return _run(tmp_path, "--attention_figure_images", "3")


@pytest.mark.slow
def test_digits_default_run(digits_run):
    results, out = digits_run
    for key in ("eval_accuracy", "eval_top5_accuracy", "eval_sar/entropy", "test_accuracy", "test_sar/entropy"):
        assert np.isfinite(results[key]), key
    assert results["train_samples"] == 64 and results["eval_samples"] == 32 and results["test_samples"] == 360
    saved = json.loads((out / "all_results.json").read_text())
    assert saved["test_accuracy"] == results["test_accuracy"]
    for name in ("model.safetensors", "config.json", "preprocessor_config.json", "train_results.json",
                 "eval_results.json", "test_results.json", "README.md"):  # fmt: skip
        assert (out / name).is_file(), name
    card = (out / "README.md").read_text()
    assert "spatial-entropy" in card and "trained from scratch on the scikit-learn digits dataset" in card
    # The paper and the package with its version, and no link to a repository that does not exist.
    from importlib.metadata import version

    assert "*Spatial Entropy as an Inductive Bias for Vision Transformers* (Peruzzo et al." in card
    assert "https://arxiv.org/abs/2206.04636" in card and f"using sar_hf {version('sar_hf')}." in card
    assert "github.com" not in card
    train_logs = _train_logs(out)
    assert len(train_logs) == 4 and all("sar/weight" in e for e in train_logs)
    # One row per image, an image column plus a map and a region column per head (2 in `tiny`).
    from sar_hf.visualization import CELL_INCHES, DPI

    with PILImage.open(out / "attention_maps.png") as picture:
        assert picture.size == (CELL_INCHES * DPI * (1 + 2 * 2), CELL_INCHES * DPI * 3)

    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(out)
    assert isinstance(model, sar_hf.SARViTForImageClassification)
    assert model.config.sar_weight == 0.01  # the peak λ, not the schedule's last value
    assert model.config.id2label[3] == "3"


def _images_of_every_mode():
    """Single images of every mode the script reads (digits are mode L), opaque and transparent."""
    rng = np.random.default_rng(0)
    rgb = PILImage.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8))
    alpha = PILImage.fromarray(rng.integers(0, 256, (10, 12), dtype=np.uint8))
    transparent = rgb.copy()
    transparent.putalpha(alpha)
    opaque = rgb.convert("RGBA")
    return {
        "L": rgb.convert("L"),
        "RGB": rgb,
        "RGBA (opaque)": opaque,
        "RGBA (transparent)": transparent,
        "P": rgb.convert("P", palette=PILImage.Palette.ADAPTIVE),
        "L 8x8 digit": load_digits_test_image(),
    }


def load_digits_test_image():
    from sar_hf.data import load_digits_dataset

    return load_digits_dataset()["test"][0]["image"]


@pytest.mark.slow
def test_saved_processor_reproduces_the_evaluation_transform(digits_run):
    """Serving parity: AutoImageProcessor and pipeline on any image mode give the pixels evaluation gave."""
    import torch
    from transformers import pipeline

    from sar_hf.data import ImageTransform, load_image_processor, processor_size

    _, out = digits_run
    processor = load_image_processor(str(out))  # AutoImageProcessor (ViT's without torchvision on 5.9)
    assert json.loads((out / "preprocessor_config.json").read_text())["do_convert_rgb"] is True
    # The script's per-image transform without augmentation: the same conversion, resize and normalisation.
    reference = ImageTransform(processor_size(processor), processor.image_mean, processor.image_std)
    classifier = pipeline("image-classification", model=str(out))
    images = _images_of_every_mode()
    for mode, image in images.items():
        expected = reference(image)
        torch.testing.assert_close(processor(image, return_tensors="pt")["pixel_values"][0], expected, msg=mode)
        # pipeline converts with PIL's `convert("RGB")` before the processor sees the image, which drops
        # transparency instead of compositing it onto white (newer Transformers): transparent RGBA differs.
        if mode != "RGBA (transparent)":
            piped = classifier.preprocess(image)["pixel_values"][0]
            torch.testing.assert_close(piped, expected, msg=f"pipeline, {mode}")
    batch = processor(list(images.values()), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(batch, torch.stack([reference(image) for image in images.values()]))


@pytest.mark.slow
def test_pipeline_accuracy_equals_the_test_accuracy(digits_run):
    from transformers import pipeline

    from sar_hf.data import load_digits_dataset

    results, out = digits_run
    test = load_digits_dataset()["test"]
    classifier = pipeline("image-classification", model=str(out), top_k=1)
    predictions = classifier(list(test["image"]), batch_size=64)
    names = test.features["label"].names
    truth = [names[label] for label in test["label"]]
    correct = [prediction[0]["label"] == label for prediction, label in zip(predictions, truth, strict=True)]
    assert np.mean(correct) == pytest.approx(results["test_accuracy"], abs=1e-9)


@pytest.mark.slow
def test_sar_weight_changes_the_trained_weights(tmp_path):
    from safetensors.torch import load_file

    short = ["--max_steps", "3", "--save_strategy", "no", "--do_eval", "False", "--eval_strategy", "no"]
    _, baseline = _run(tmp_path, *short, "--sar_weight", "0", name="baseline")
    _, sar = _run(tmp_path, *short, "--sar_weight", "0.5", name="sar")
    train_logs = [entry for entry in _state(baseline)["log_history"] if "loss" in entry]
    assert train_logs and all(entry["sar/weight"] == 0 for entry in train_logs)
    for entry in train_logs:  # the loss is the cross-entropy alone; the entropy is still measured
        assert entry["loss"] == pytest.approx(entry["sar/ce_loss"], rel=1e-3)
        assert entry["sar/entropy"] > 0
    assert json.loads((baseline / "config.json").read_text())["sar_weight"] == 0
    for entry in _train_logs(sar):
        assert entry["loss"] == pytest.approx(entry["sar/ce_loss"] + entry["sar/weight"] * entry["sar/entropy"])
    # Same seed, same data and initialisation: the weights differ only through the SAR term.
    plain, regularised = load_file(baseline / "model.safetensors"), load_file(sar / "model.safetensors")
    assert max(float((plain[k] - regularised[k]).abs().max()) for k in plain) > 1e-4


@pytest.mark.slow
def test_fp16_on_a_cpu_logs_the_precision_in_use(tmp_path, caplog):
    """Accelerate runs `--fp16` in float32 on a CPU; the log line says so instead of "fp16"."""
    import logging

    with caplog.at_level(logging.WARNING):
        _run(tmp_path, "--fp16", "--use_cpu", "--max_steps", "1", "--save_strategy", "no", "--do_eval", "False",
             "--eval_strategy", "no")  # fmt: skip
    assert "mixed precision: no (float32)" in caplog.text and "mixed precision: fp16" not in caplog.text
    assert "--fp16 was given, but Accelerate runs float32 on cpu" in caplog.text


@pytest.mark.slow
def test_bf16_mixed_precision(tmp_path, monkeypatch, caplog):
    """Accelerate's autocast reaches the SAR scores; the loss and the saved weights stay float32.

    (`--fp16` needs a GPU: on a CPU, Accelerate runs it in float32.)
    """
    import torch

    import sar_hf.loss as modeling

    seen = []

    def recording_spatial_entropy(cls_logits, *args, **kwargs):
        seen.append(str(cls_logits.dtype))
        result = sar_hf.spatial_entropy(cls_logits, *args, **kwargs)
        assert result[0].dtype == torch.float32
        return result

    monkeypatch.setattr(modeling, "spatial_entropy", recording_spatial_entropy)
    with caplog.at_level("WARNING"):
        results, out = _run(tmp_path, "--bf16", "--use_cpu", "--save_strategy", "no")
    assert "mixed precision: bf16" in caplog.text
    assert seen and set(seen) == {"torch.bfloat16"}
    assert all(np.isfinite(entry["sar/entropy"]) for entry in _train_logs(out))
    assert np.isfinite(results["eval_accuracy"])
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as saved:
        assert {saved.get_tensor(name).dtype for name in saved.keys()} == {torch.float32}


@pytest.mark.slow
def test_push_to_hub_uploads_the_model_and_its_card(tmp_path, monkeypatch):
    """`--push_to_hub` against a stand-in Hub: the repo is created and the output folder uploaded."""
    import types

    import huggingface_hub
    import transformers.trainer

    calls = {"create_repo": [], "upload_folder": []}

    def create_repo(*args, **kwargs):
        repo_id = kwargs.get("repo_id") or next(a for a in args if isinstance(a, str))
        calls["create_repo"].append(repo_id)
        return types.SimpleNamespace(repo_id=repo_id)

    def upload_folder(*args, **kwargs):
        folder = pathlib.Path(kwargs["folder_path"])
        card = (folder / "README.md").read_text()
        calls["upload_folder"].append((kwargs["repo_id"], sorted(p.name for p in folder.iterdir()), card))

    # Recent Transformers call HfApi methods; 5.9 imports huggingface_hub's module-level functions.
    for owner in (huggingface_hub.HfApi, transformers.trainer):
        monkeypatch.setattr(owner, "create_repo", create_repo, raising=False)
        monkeypatch.setattr(owner, "upload_folder", upload_folder, raising=False)
    _, out = _run(tmp_path, "--push_to_hub", "--hub_model_id", "someone/sar-digits", "--save_strategy", "no")
    _train_logs(out)
    assert calls["create_repo"] == ["someone/sar-digits"]
    # Trainer.save_model pushes too (as in Transformers' own example scripts); the last push is the final one.
    assert calls["upload_folder"] and {repo_id for repo_id, _, _ in calls["upload_folder"]} == {"someone/sar-digits"}
    _, files, card = calls["upload_folder"][-1]
    assert {"model.safetensors", "config.json", "preprocessor_config.json", "README.md"} <= set(files)
    assert "spatial-entropy" in card and "peak λ (`sar_weight`): 0.01" in card


@pytest.mark.slow
def test_image_folder_run(tmp_path):
    train = _image_folder(tmp_path / "train")
    validation = _image_folder(tmp_path / "validation", per_class=2)
    (train / "eel" / "broken.png").write_bytes(b"truncated")
    results, out = _run(
        tmp_path, "--train_dir", str(train), "--validation_dir", str(validation), "--skip_bad_images",
        "--per_device_train_batch_size", "6", "--cache_dir", str(tmp_path / "cache"),
    )  # fmt: skip
    assert results["skipped_images"] == 1
    assert results["train_samples"] == 18 and results["eval_samples"] == 6
    assert "eval_top5_accuracy" not in results  # 3 classes
    config = json.loads((out / "config.json").read_text())
    assert list(config["id2label"].values()) == ["cat", "dog", "eel"]
    assert _state(out)["global_step"] == 3
    _train_logs(out)


@pytest.mark.slow
def test_resume_continues_the_schedule(tmp_path):
    args = [
        "--max_steps",
        "8",
        "--save_strategy",
        "steps",
        "--save_steps",
        "2",
        "--eval_strategy",
        "no",
        "--sar_granularity",
        "step",
        "--sar_warmup_epochs",
        "0.5",
        "--per_device_train_batch_size",
        "8",
        "--augment",
        "False",
    ]  # fmt: skip  (Accelerate draws the next batch's crops before a save)
    _, out = _run(tmp_path, *args)
    full = _state(out)["log_history"]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-6", "checkpoint-8"]  # save_total_limit 2

    # Kill while saving step 8: its folder lacks trainer_state.json; the final files never came.
    (out / "checkpoint-8" / "trainer_state.json").unlink()
    for name in ("trainer_state.json", "all_results.json", "model.safetensors"):
        (out / name).unlink()
    state6 = out / "checkpoint-6" / "trainer_state.json"
    state = json.loads(state6.read_text())
    state["log_history"][0]["marker"] = True  # survives only if the run really resumes from here
    state6.write_text(json.dumps(state))

    results, _ = _run(tmp_path, *args, "--resume_from_checkpoint", "True")
    resumed = _state(out)
    assert resumed["global_step"] == 8 and resumed["log_history"][0].get("marker")

    def weights(history):
        return [(e["step"], e["sar/weight"]) for e in history if "sar/weight" in e]

    assert [s for s, _ in weights(full)] == list(range(1, 9))
    assert weights(resumed["log_history"]) == weights(full)
    values = [w for _, w in weights(full)]
    assert values[0] == 0 and max(values) == pytest.approx(0.01) and 0 < values[-1] < 0.01  # warm-up, cosine

    # The weights, optimizer, data order and augmentation came back: the same losses after the resume.
    def losses(history):
        return {e["step"]: e["loss"] for e in history if "loss" in e}

    assert losses(resumed["log_history"]) == pytest.approx(losses(full), rel=1e-5)
    assert (out / "model.safetensors").is_file() and np.isfinite(results["test_accuracy"])


@pytest.mark.slow
def test_load_best_model_at_end_restores_every_weight(tmp_path):
    from safetensors.torch import load_file

    # The highest eval loss marks the *worst* epoch as best, so that it differs from the last one.
    args = ["--num_train_epochs", "2", "--load_best_model_at_end", "True", "--metric_for_best_model", "loss",
            "--greater_is_better", "True", "--augment", "False"]  # fmt: skip
    _, out = _run(tmp_path, *args)
    _train_logs(out)
    best = _state(out)["best_model_checkpoint"]
    assert best is not None and best.endswith("checkpoint-4")
    final, saved = load_file(out / "model.safetensors"), load_file(os.path.join(best, "model.safetensors"))
    last = load_file(out / "checkpoint-8" / "model.safetensors")
    assert final.keys() == saved.keys() and all((final[k] == saved[k]).all() for k in final)
    assert any((final[k] != last[k]).any() for k in final)


def test_resume_from_a_half_written_checkpoint_is_refused(tmp_path):
    (tmp_path / "out" / "checkpoint-4").mkdir(parents=True)
    with pytest.raises(ValueError, match="is not a complete checkpoint"):
        _run(tmp_path, "--resume_from_checkpoint", str(tmp_path / "out" / "checkpoint-4"))
    with pytest.raises(ValueError, match="holds no complete checkpoint"):
        _run(tmp_path, "--resume_from_checkpoint", "True")


@pytest.mark.slow
def test_checkpoint_with_other_labels_needs_ignore_mismatched_sizes(tmp_path):
    from transformers import AutoModelForImageClassification, ViTConfig, ViTForImageClassification

    from sar_hf.data import vit_image_processor_class

    base = tmp_path / "base"
    config = ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, num_labels=3)  # fmt: skip
    ViTForImageClassification(config).save_pretrained(base)
    vit_image_processor_class()(size={"height": 16, "width": 16}).save_pretrained(base)
    with pytest.raises(ValueError, match="classifies 3 classes and the data has 10; pass --ignore_mismatched_sizes"):
        _run(tmp_path, "--model_name_or_path", str(base))
    results, out = _run(tmp_path, "--model_name_or_path", str(base), "--ignore_mismatched_sizes", "--max_steps", "2")
    model = AutoModelForImageClassification.from_pretrained(out)
    assert isinstance(model, sar_hf.SARViTForImageClassification)
    assert model.classifier.out_features == 10 and np.isfinite(results["eval_accuracy"])


def test_the_process_group_is_destroyed_at_the_end(tmp_path):
    import torch.distributed as dist

    end_distributed()  # no group: nothing to do
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        end_distributed()
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _free_port() -> str:
    """A free port for the rendezvous, so that parallel runs do not collide."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


def _launcher(name: str) -> list[str]:
    """The launcher command of a two-process run on the CPU, up to the script."""
    executable = shutil.which(name, path=os.path.dirname(sys.executable)) or shutil.which(name)
    if name == "accelerate":
        config = ROOT / "examples" / "accelerate_configs" / "two_cpu_processes.yaml"
        return [executable, "launch", "--config_file", str(config), "--main_process_port", _free_port()]
    return [executable, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", _free_port()]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["accelerate", "torchrun"])
def test_two_processes(tmp_path, launcher):
    """`sar-hf train` as two real processes (DDP over gloo), in the form the README gives: `-m sar_hf train`."""
    out = tmp_path / "out"
    command = [
        *_launcher(launcher), "-m", "sar_hf", "train",
        *TINY, "--per_device_train_batch_size", "8", "--use_cpu", "--ddp_backend", "gloo", "--output_dir", str(out),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env["GLOO_SOCKET_IFNAME"] = "lo"  # loopback: no hostname lookup in a closed sandbox
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "world size: 2" in done.stdout + done.stderr
    state = _state(out)
    # 64 images in batches of 8 on each of 2 processes: 4 optimizer steps (8 with one process).
    assert state["global_step"] == 4
    train_logs = _train_logs(out)
    assert len(train_logs) == 4 and all({"sar/entropy", "sar/ce_loss", "sar/weight"} <= set(e) for e in train_logs)

    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(out)
    assert isinstance(model, sar_hf.SARViTForImageClassification)


# --------------------------------------------------------------------------------------------
# DeiT's recipe

ONE_STEP = [
    "--max_steps",
    "1",
    "--do_eval",
    "False",
    "--eval_strategy",
    "no",
    "--save_strategy",
    "no",
    "--per_device_train_batch_size",
    "24",
    "--augment",
    "False",
]  # fmt: skip  (no crops: one batch per run)


def _check_mixup(x, y, mixed, targets, smoothing):
    """Each image is (1 − w) x_i + w x_j for one w and some partner j (itself, at times), and its target says so."""
    flat, out = x.flatten(1).double(), mixed.flatten(1).double()
    towards = flat[None] - flat[:, None]  # [i, j] = x_j − x_i
    share = ((out - flat)[:, None] * towards).sum(-1) / towards.pow(2).sum(-1).clamp(min=1e-12)  # least squares
    error = (flat[:, None] + share[..., None] * towards - out[:, None]).abs().amax(-1)
    error.fill_diagonal_(float("inf"))
    partner = error.argmin(1)
    assert error.min(1).values.max() < 1e-4
    weights = share.gather(1, partner[:, None]).squeeze(1)
    itself = (out - flat).abs().amax(-1) < 1e-6  # paired with itself: unchanged, whatever w
    partner[itself] = itself.nonzero().squeeze(1)
    weights[itself] = weights[~itself][0]
    assert float(weights.max() - weights.min()) < 1e-4 and 0 < float(weights[0]) < 1  # one λ for the batch
    _check_targets(y, partner, weights, targets, smoothing)


def _check_cutmix(x, y, mixed, targets, smoothing):
    """One box for the batch: inside it each image shows its partner's pixels, and w is the box's area."""
    import torch

    changed = (mixed != x).any(1).any(0)  # [H, W], over the batch
    rows, cols = torch.nonzero(changed, as_tuple=True)
    box = torch.zeros_like(changed)
    box[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] = True
    assert torch.equal(mixed[..., ~box], x[..., ~box])
    inside = mixed[..., box].flatten(1)  # [B, 3 * box pixels]
    matches = (inside[:, None] == x[..., box].flatten(1)[None]).all(-1)  # [i, j]: i shows j's pixels
    assert matches.any(1).all()
    partner = matches.float().argmax(1)
    _check_targets(y, partner, torch.full((len(y),), float(box.float().mean())), targets, smoothing)


def _check_targets(y, partner, weights, targets, smoothing):
    import torch
    import torch.nn.functional as F

    classes = targets.shape[1]

    def smoothed(labels):
        return F.one_hot(labels, classes).double() * (1 - smoothing) + smoothing / classes

    expected = (1 - weights[:, None]) * smoothed(y) + weights[:, None] * smoothed(y[partner])
    torch.testing.assert_close(targets.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_each_augmentation_flag_changes_the_batch_that_reaches_the_model(tmp_path, batches):
    import torch

    train = _image_folder(tmp_path / "train", per_class=8)

    def first_batch(*flags):
        batches.clear()
        _run(tmp_path, *ONE_STEP, "--train_dir", str(train), "--train_val_split", "0", *flags, name="-".join(flags))
        return next((pixel_values, labels) for training, pixel_values, labels in batches if training)

    x, y = first_batch()
    assert y.dtype == torch.long and y.shape == (24,)
    for flags in (["--randaugment_ops", "2"], ["--random_erasing_prob", "1"]):
        pixel_values, labels = first_batch(*flags)
        assert torch.equal(labels, y) and (pixel_values - x).abs().amax() > 0.1, flags
    mixed, targets = first_batch("--mixup_alpha", "0.8", "--label_smoothing_factor", "0.1")
    assert targets.shape == (24, 3) and targets.is_floating_point()
    _check_mixup(x, y, mixed, targets, smoothing=0.1)
    mixed, targets = first_batch("--cutmix_alpha", "1.0")
    _check_cutmix(x, y, mixed, targets, smoothing=0.0)


@pytest.mark.slow
def test_recipe_deit_end_to_end_and_reproducible(tmp_path, batches):
    """`--recipe deit` on the tiny preset: soft targets, the SAR term, evaluation untouched, one seed one run."""
    import torch
    from safetensors.torch import load_file

    from sar_hf.data import load_image_processor

    def run(name, *extra):
        batches.clear()
        results, out = _run(tmp_path, "--recipe", "deit", *extra, name=name)
        return results, out, list(batches)

    results, out, seen = run("first")
    train = [(x, labels) for training, x, labels in seen if training]
    evaluation = [(x, labels) for training, x, labels in seen if not training]
    assert len(train) == 4 and all(labels.shape == (16, 10) for _, labels in train)  # soft targets
    assert np.isfinite(results["test_accuracy"]) and np.isfinite(results["eval_sar/entropy"])
    logs = _train_logs(out)
    for entry in logs:  # Trainer's loss: the soft cross-entropy plus λ·SE
        assert entry["loss"] == pytest.approx(entry["sar/ce_loss"] + entry["sar/weight"] * entry["sar/entropy"])
    # Evaluation sees the saved image processor's pixels, nothing else.
    model_args, data_args, _, _, training_args = parse_args([*TINY, "--output_dir", str(out)])
    validation = load_data(model_args, data_args, training_args)[0]["validation"]
    processor = load_image_processor(str(out))
    expected = processor(list(validation["image"]), return_tensors="pt")["pixel_values"]
    for pixel_values, labels in evaluation[:2]:  # the epoch's evaluation, then the final one
        torch.testing.assert_close(pixel_values, expected)
        assert torch.equal(labels, torch.tensor(validation["label"]))

    no_eval = ["--do_eval", "False", "--eval_strategy", "no"]
    _, again, seen_again = run("again", *no_eval)
    for (a, labels_a), (b, labels_b) in zip(train, [(x, lab) for t, x, lab in seen_again if t], strict=True):
        assert torch.equal(a, b) and torch.equal(labels_a, labels_b)
    assert [e["loss"] for e in _train_logs(again)] == [e["loss"] for e in logs]
    first, second = load_file(out / "model.safetensors"), load_file(again / "model.safetensors")
    assert all(torch.equal(first[k], second[k]) for k in first)
    _, _, other = run("other-seed", "--seed", "7", *no_eval)
    assert not torch.equal(train[0][0], next(x for t, x, _ in other if t))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["deit", "dinov2_with_registers", "beit"])
def test_other_vit_family_checkpoints_keep_their_class(tmp_path, family):
    import transformers

    config_class, model_class, processor_name = {
        "deit": ("DeiTConfig", "DeiTForImageClassification", "DeiTImageProcessor"),
        "dinov2_with_registers": (
            "Dinov2WithRegistersConfig", "Dinov2WithRegistersForImageClassification", "BitImageProcessor"
        ),
        "beit": ("BeitConfig", "BeitForImageClassification", "BeitImageProcessor"),
    }[family]  # fmt: skip
    config = getattr(transformers, config_class)(
        image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
        num_labels=10,
    )  # fmt: skip
    base = tmp_path / family
    getattr(transformers, model_class)(config).save_pretrained(base)
    processor_class = getattr(transformers, processor_name + "Pil", None) or getattr(transformers, processor_name)
    size = {"height": 16, "width": 16}
    processor_class(size=size, crop_size=size, do_center_crop=False).save_pretrained(base)

    with pytest.raises(ValueError, match=f"--sar_no_skip_no_norm rebuilds the last block of a ViT.*'{family}'"):
        _run(tmp_path, "--model_name_or_path", str(base), "--sar_no_skip_no_norm")
    results, out = _run(tmp_path, "--model_name_or_path", str(base), "--max_steps", "3", "--save_strategy", "no")
    _train_logs(out)
    assert np.isfinite(results["eval_accuracy"]) and np.isfinite(results["eval_sar/entropy"])
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == family and saved["architectures"] == [model_class]
    # Plain Transformers loads it as that class, every weight present.
    model, info = getattr(transformers, model_class).from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and model.config.id2label[3] == "3"


# --------------------------------------------------------------------------------------------
# The script's flow in seconds: `train.main` in this process on a dozen in-memory images

QUICK = [
    "--model_preset", "tiny",
    "--per_device_train_batch_size", "4",
    "--per_device_eval_batch_size", "64",
    "--num_train_epochs", "1",
    "--eval_strategy", "no",
    "--save_strategy", "no",
    "--logging_steps", "1",
    "--report_to", "none",
    "--disable_tqdm", "True",
    "--dataloader_pin_memory", "False",
    "--attention_figure_images", "0",
]  # fmt: skip
CLASSES = ["ant", "bee", "cat"]


def _images(labels, offset):
    """8×8 grey images whose top-left pixel numbers them (`offset + i`), the rest a ramp to tell crops apart."""
    from datasets import ClassLabel, Dataset, Features, Image

    ramp = np.add.outer(np.arange(8), np.arange(8)).astype(np.uint8) * 16
    images = []
    for i in range(len(labels)):
        pixels = ramp.copy()
        pixels[0, 0] = offset + i
        images.append(PILImage.fromarray(pixels))
    features = Features({"image": Image(), "label": ClassLabel(names=CLASSES)})
    return Dataset.from_dict({"image": images, "label": labels}, features=features)


def _number(image):
    return int(np.asarray(image)[0, 0])


@pytest.fixture
def quick(monkeypatch, tmp_path):
    """`quick(*flags, splits=..., skipped=...)` runs `train.main` on in-memory splits (12 training images of three
    classes, 6 validation, 6 test by default) and returns `(results, output_dir, seen)`; `seen` holds the trainer,
    the keyword arguments of the image transform, the model card's or the push's, and the attention figure's."""
    import logging

    import transformers
    from datasets import DatasetDict

    from sar_hf.scripts import deit_recipe
    from sar_hf.scripts import train as script

    seen = {}

    def recording(cls):
        class Recording(cls):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                seen["trainer"] = self
                seen["verbosity"] = transformers_logging().get_verbosity()

            def init_hf_repo(self, *args, **kwargs):  # --push_to_hub creates the repo at once: not here
                seen["repo"] = self.args.hub_model_id

            def create_model_card(self, **kwargs):
                seen["card"] = kwargs
                return super().create_model_card(**kwargs)

            def push_to_hub(self, **kwargs):  # no Hub here: record what would be pushed
                seen["push"] = kwargs

        return Recording

    monkeypatch.setattr(script, "SARTrainer", recording(sar_hf.SARTrainer))
    monkeypatch.setattr(script, "MixingTrainer", recording(deit_recipe.MixingTrainer))

    def image_transform(*args, **kwargs):
        seen["transform"] = (args, kwargs)
        return sar_hf.data.ImageTransform(*args, **kwargs)

    monkeypatch.setattr(script, "ImageTransform", image_transform)
    monkeypatch.setattr(script, "save_attention_figure", lambda *args: seen.setdefault("figure", args))
    main_process_first = transformers.TrainingArguments.main_process_first

    def first(self, *args, **kwargs):  # the text that the other processes log while they wait
        seen.setdefault("waits", []).append(kwargs.get("desc"))
        return main_process_first(self, *args, **kwargs)

    monkeypatch.setattr(transformers.TrainingArguments, "main_process_first", first)
    # The levels that the script sets on its loggers, put back afterwards.
    for name in (script.__name__, "sar_hf"):
        monkeypatch.setattr(logging.getLogger(name), "level", logging.getLogger(name).level)
    verbosity = transformers_logging().get_verbosity()

    def run(*flags, splits=None, skipped=None, name="out"):
        if splits is None:
            splits = {"train": [0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2], "validation": [2, 1, 0, 2, 1, 0],
                      "test": [1, 1, 2, 2, 0, 0]}  # fmt: skip
        dataset = DatasetDict({key: _images(labels, 100 * k) for k, (key, labels) in enumerate(splits.items())})

        def load_data(*args):
            seen["load_data"] = args
            return dataset, dict(skipped or {})

        monkeypatch.setattr(script, "load_data", load_data)
        seen["dataset"] = dataset
        output_dir = tmp_path / name
        try:
            results = script.main([*QUICK, "--output_dir", str(output_dir), *flags])
        finally:
            transformers_logging().set_verbosity(verbosity)
        return results, output_dir, seen

    return run


def transformers_logging():
    import transformers

    return transformers.utils.logging


def test_a_run_trains_scores_both_splits_and_saves_what_it_reports(quick, capsys, caplog):
    import logging

    from sar_hf.data import collate_fn, processor_size

    caplog.set_level(logging.WARNING, logger="sar_hf.scripts.train")

    results, out, seen = quick("--sar_weight", "0.5", "--sar_schedule", "constant", "--sar_warmup_epochs", "0.25",
                               "--sar_granularity", "step", "--attention_figure_images", "2",
                               skipped={"train": 2, "validation": 1})  # fmt: skip
    trainer = seen["trainer"]
    assert type(trainer).__mro__[1] is sar_hf.SARTrainer
    # The data: loaded once, on the main process first, from the parsed arguments.
    model_args, data_args, training_args = seen["load_data"]
    assert training_args is trainer.args and data_args.description == "scikit-learn digits"
    assert model_args.model_preset == "tiny" and seen["waits"][0] == "loading and checking the dataset"
    # What the trainer was given.
    assert trainer.train_dataset is seen["dataset"]["train"] and trainer.eval_dataset is seen["dataset"]["validation"]
    assert trainer.compute_metrics is compute_metrics and trainer.data_collator is collate_fn
    processor = trainer.processing_class
    assert processor.do_convert_rgb is True and processor.size == {"height": 16, "width": 16}
    callbacks = [c for c in trainer.callback_handler.callbacks if isinstance(c, sar_hf.SARCallback)]
    assert len(callbacks) == 1
    callback = callbacks[0]
    assert (callback.sar_weight, callback.schedule, callback.warmup_epochs, callback.granularity) == (
        0.5, "constant", 0.25, "step"
    )  # fmt: skip
    assert trainer.args.warmup_steps == TRAINING_DEFAULTS["warmup_steps"]  # no --warmup_epochs: left alone
    # The training transform: the processor's size and normalisation, crops from --crop_scale_min, no flips
    # of the (bundled, by default) digits.
    args, kwargs = seen["transform"]
    assert args == (processor_size(processor), processor.image_mean, processor.image_std)
    assert kwargs == {"augment": True, "hflip": False, "crop_scale": (0.7, 1.0), "resample": processor.resample}

    # 12 images in batches of 4: three steps, each logging the SAR term at the constant λ.
    logs = _train_logs(out)
    assert [entry["step"] for entry in logs] == [1, 2, 3] and {entry["sar/weight"] for entry in logs} == {0.5}
    assert results["train_samples"] == 12 and results["skipped_images"] == 3
    assert results["eval_samples"] == 6 and results["test_samples"] == 6
    for prefix in ("eval", "test"):
        assert {f"{prefix}_accuracy", f"{prefix}_loss", f"{prefix}_sar/entropy"} <= set(results)
        assert f"{prefix}_top5_accuracy" not in results  # 3 classes
    # Each split scored on its own images: the accuracy of the saved model's predictions there.
    model = sar_hf.SARViTForImageClassification.from_pretrained(out).eval()
    for prefix, split in (("eval", "validation"), ("test", "test")):
        images = seen["dataset"][split]
        images.reset_format()
        pixels = processor(list(images["image"]), return_tensors="pt")["pixel_values"]
        import torch

        with torch.no_grad():
            predicted = model(pixels).logits.argmax(-1).numpy()
        assert results[f"{prefix}_accuracy"] == pytest.approx(np.mean(predicted == np.array(images["label"])))
    # What it reports is what it saved, and what it prints.
    saved = json.loads((out / "all_results.json").read_text())
    assert saved == pytest.approx(results)
    assert json.loads((out / "train_results.json").read_text())["skipped_images"] == 3
    assert json.loads((out / "test_results.json").read_text())["test_samples"] == 6
    printed = capsys.readouterr().out
    assert f"final eval accuracy: {results['eval_accuracy']:.4f}\n" in printed
    assert f"final test accuracy: {results['test_accuracy']:.4f}\n" in printed
    for split in ("train", "eval", "test"):  # Trainer's table of each split's metrics, under the split's name
        assert f"***** {split} metrics *****\n" in printed
    # No precision flag, so no warning that one runs in float32 (which the line before it says).
    assert "mixed precision: no (float32)" in caplog.text and "was given, but" not in caplog.text
    # The card: a model trained from scratch on the bundled digits.
    assert seen["card"] == {"finetuned_from": None, "tasks": "image-classification",
                            "dataset": "scikit-learn digits", "tags": ["image-classification", "vision"]}  # fmt: skip
    assert "push" not in seen
    # The figure: one test image per class (the test split's first 0, then its first 1), of the λ given.
    models, pictures, _, _ = seen["figure"]
    assert list(models) == ["SAR λ=0.5"] and [_number(image) for image in pictures] == [204, 200]
    assert trainer.model.config.name_or_path == str(out)  # a folder: the card reads "trained from scratch"
    card = (out / "README.md").read_text()
    assert "trained from scratch on the scikit-learn digits dataset" in card


def test_warm_up_in_epochs_the_figure_and_the_log(quick, capsys, monkeypatch):
    """`--warmup_epochs` becomes optimizer steps; the figure shows one validation image per class when there is no
    test split; the script logs to stdout in its own format, at INFO, and says when --fp16 runs in float32."""
    import logging
    import re

    monkeypatch.setattr(logging.root, "handlers", [])  # as in a console: basicConfig installs the script's handler
    results, out, seen = quick("--warmup_epochs", "0.5", "--attention_figure_images", "2", "--fp16", "--use_cpu",
                               splits={"train": [0, 1, 2] * 4, "validation": [2, 1, 0, 2, 1, 0]})  # fmt: skip
    trainer = seen["trainer"]
    assert trainer.args.warmup_steps == 2  # 3 steps an epoch: round(1.5)
    assert "test_accuracy" not in results and "test_samples" not in results
    models, pictures, processor, path = seen["figure"]
    assert list(models) == ["SAR λ=0.01"] and models["SAR λ=0.01"] is trainer.model
    assert [_number(image) for image in pictures] == [102, 101]  # the first 0, then the first 1
    assert processor is trainer.processing_class and path == os.path.join(str(out), "attention_maps.png")
    printed = "\n" + capsys.readouterr().out  # every line starts after a newline
    line = r"\n\d\d/\d\d/\d\d\d\d \d\d:\d\d:\d\d - {} - sar_hf.scripts.train - {}"  # month/day/year first
    assert re.search(line.format("INFO", r"Data: scikit-learn digits, 3 classes, train 12, validation 6\n"), printed)
    assert re.search(line.format("INFO", r"Learning-rate warm-up: 0.5 epochs = 2 optimizer steps\n"), printed)
    assert re.search(line.format("INFO", r"Model: preset 'tiny' \(SARViTForImageClassification\), 0.02M parameters, "
                                 r"16 px images, 4 px patches\n"), printed)  # fmt: skip
    assert re.search(line.format("WARNING", r"--fp16 was given, but Accelerate runs float32 on cpu.\n"), printed)
    assert re.search(line.format("WARNING", r"Process rank: 0, device: cpu, world size: 1, distributed: not_parallel, "
                                 r"mixed precision: no \(float32\)\n"), printed)  # fmt: skip
    assert logging.getLogger("sar_hf").level == logging.INFO and logging.getLogger("sar_hf.scripts.train").level == 20
    assert f"final eval accuracy: {results['eval_accuracy']:.4f}\n" in printed and "final test" not in printed
    assert re.search(line.format("INFO", re.escape(f"Attention maps of 2 images: {path}\n")), printed)


def test_mixup_trains_with_the_mixing_trainer_and_the_models_own_loss(quick):
    results, _, seen = quick("--mixup_alpha", "0.8", "--label_smoothing_factor", "0.1", "--do_eval", "False")
    trainer = seen["trainer"]
    assert type(trainer).__mro__[1] is sar_hf.scripts.deit_recipe.MixingTrainer
    assert trainer.compute_loss_func.__wrapped__ is trainer.model.sar_loss  # SARTrainer wraps it to add the term
    mix = trainer.batch_mix
    assert (mix.num_classes, mix.label_smoothing, mix.cutmix) == (3, 0.1, None) and mix.mixup is not None
    assert trainer.eval_dataset is None and results["train_samples"] == 12
    assert not any(key.startswith(("eval_", "test_")) for key in results)  # neither split scored
    assert "figure" not in seen  # --attention_figure_images 0: no figure


def test_without_a_validation_or_test_split_the_figure_shows_training_images(quick):
    """`--train_val_split 0` on a folder with no other split: the attention maps are drawn on training images."""
    _, _, seen = quick("--attention_figure_images", "2", "--do_eval", "False", "--max_steps", "1",
                       splits={"train": [2, 1, 0, 2, 1, 0]})  # fmt: skip
    _, pictures, _, _ = seen["figure"]
    assert [_number(image) for image in pictures] == [2, 1]  # the first 0 (index 2), then the first 1 (index 1)


def test_the_final_accuracy_reaches_a_piped_stdout_at_once(quick, monkeypatch):
    """Piped (`sar-hf train ... | tee log`), stdout is block-buffered: the final accuracy is flushed when printed, so
    it is not lost if the process is then killed (a gloo group aborts a rank at exit now and then)."""
    import io
    import sys

    raw = io.BytesIO()
    piped = io.TextIOWrapper(raw, encoding="utf-8", line_buffering=False, write_through=False)
    monkeypatch.setattr(sys, "stdout", piped)
    results, _, _ = quick("--max_steps", "1")
    assert f"final test accuracy: {results['test_accuracy']:.4f}\n" in raw.getvalue().decode()


def test_the_parameter_count_is_logged_in_millions_rounded_to_the_nearest_hundredth(quick, monkeypatch, caplog):
    """2,065,002 parameters (the tiny preset on 146 px images in one 146 px patch, 42 classes) are 2.07M."""
    import logging

    names = [f"class {i}" for i in range(42)]
    monkeypatch.setitem(globals(), "CLASSES", names)
    caplog.set_level(logging.INFO, logger="sar_hf.scripts.train")
    _, _, seen = quick("--image_size", "146", "--patch_size", "146", "--max_steps", "1", "--do_eval", "False",
                       splits={"train": list(range(42))})  # fmt: skip
    assert sum(p.numel() for p in seen["trainer"].model.parameters()) == 2_065_002
    assert "(SARViTForImageClassification), 2.07M parameters, 146 px images, 146 px patches" in caplog.text


def test_bf16_that_accelerate_runs_in_float32_is_warned_about(quick, monkeypatch, caplog):
    """Where Accelerate runs `--bf16` in float32 (on torch_xla without bf16, faked here), the log says so, as for
    `--fp16` on a CPU."""
    import logging

    from sar_hf.scripts import train as script

    monkeypatch.setattr(script, "precision_in_use", lambda accelerator: "no (float32)")
    caplog.set_level(logging.WARNING, logger="sar_hf.scripts.train")
    quick("--bf16", "--use_cpu", "--max_steps", "1", "--do_eval", "False")
    assert "--bf16 was given, but Accelerate runs float32 on cpu." in caplog.messages


def test_prediction_only_scores_the_test_split_and_pushes_the_card(quick):
    import logging

    results, out, seen = quick("--do_train", "False", "--do_eval", "False", "--do_predict", "True", "--push_to_hub",
                               "--hub_model_id", "someone/sar", "--log_level", "error")  # fmt: skip
    trainer = seen["trainer"]
    assert trainer.train_dataset is None and trainer.eval_dataset is None
    assert {key for key in results if key != "epoch"} == {key for key in results if key.startswith("test_")}
    assert results["test_samples"] == 6
    assert not (out / "train_results.json").exists() and not (out / "model.safetensors").exists()
    assert seen["push"] == {"finetuned_from": None, "tasks": "image-classification",
                            "dataset": "scikit-learn digits", "tags": ["image-classification", "vision"]}  # fmt: skip
    assert "card" not in seen
    assert seen["verbosity"] == logging.ERROR and logging.getLogger("sar_hf").level == logging.ERROR


def test_the_card_names_a_hub_checkpoint_and_the_users_dataset(quick, monkeypatch, tmp_path):
    """A checkpoint from the Hub is named as the base model; a folder is not, nor a --train_dir."""
    from sar_hf.scripts import train as script
    from sar_hf.scripts import utils

    def build_model(model_args, sar_args, labels):  # the tiny preset, standing in for a Hub checkpoint
        model_args, _, sar_args, _, _ = parse_args(["--model_preset", "tiny"])
        return utils.build_model(model_args, sar_args, labels)

    monkeypatch.setattr(script, "build_model", build_model)
    _, out, seen = quick("--model_name_or_path", "someone/vit", "--dataset_name", "someone/images", "--max_steps", "1")
    assert seen["card"] == {"finetuned_from": "someone/vit", "tasks": "image-classification",
                            "dataset": "someone/images", "tags": ["image-classification", "vision"]}  # fmt: skip
    assert seen["trainer"].model.config.name_or_path != str(out)
    assert seen["transform"][1]["hflip"] is True  # a user's images are flipped
    (tmp_path / "checkpoint").mkdir()
    flags = ["--max_steps", "1", "--hflip", "False", "--crop_scale_min", "0.5", "--augment", "False"]
    _, _, seen = quick("--model_name_or_path", str(tmp_path / "checkpoint"), "--train_dir", str(tmp_path), *flags)
    assert seen["card"]["finetuned_from"] is None and seen["card"]["dataset"] is None
    assert seen["transform"][1] == {"augment": False, "hflip": False, "crop_scale": (0.5, 1.0), "resample": 2}


def test_a_rerun_in_the_same_folder_resumes_from_its_checkpoint(quick):
    flags = ["--save_strategy", "steps", "--save_steps", "2", "--do_eval", "False"]
    _, out, _ = quick(*flags, "--max_steps", "2")
    state = out / "checkpoint-2" / "trainer_state.json"
    saved = json.loads(state.read_text())
    saved["log_history"][0]["marker"] = True  # survives only if the second run starts from this checkpoint
    state.write_text(json.dumps(saved))
    _, _, seen = quick(*flags, "--max_steps", "3")
    history = _state(out)["log_history"]
    assert history[0].get("marker") and [e["step"] for e in history if "loss" in e] == [1, 2, 3]
    assert seen["trainer"].state.global_step == 3
