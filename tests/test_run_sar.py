"""examples/run_sar.py end to end on tiny models and offline data made in tmp_path.

The script's `main(args)` is called in this process (as Transformers' example tests do), except
for the two-process run, which goes through `accelerate launch` in a subprocess.
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

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import run_sar  # noqa: E402

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
    results = run_sar.main([*TINY, "--output_dir", str(output_dir), "--cache_dir", str(tmp_path / "cache"), *extra])
    return results, output_dir


def _state(output_dir):
    return json.loads((output_dir / "trainer_state.json").read_text())


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
    model_args, data_args, sar_args, training_args = run_sar.parse_args([])
    assert model_args.model_preset == "small" and model_args.model_name_or_path is None
    assert data_args.uses_digits and data_args.train_val_split == 0.15 and data_args.train_fraction == 1.0
    assert (sar_args.sar_weight, sar_args.sar_schedule, sar_args.sar_granularity) == (0.01, "warmup_cosine", "epoch")
    assert training_args.output_dir == "outputs/sar-digits"
    assert training_args.do_train and training_args.do_eval and not training_args.remove_unused_columns
    assert training_args.learning_rate == run_sar.TRAINING_DEFAULTS["learning_rate"]
    # Own data goes elsewhere by default; every default can be overridden.
    args = ["--train_dir", "x", "--learning_rate", "5e-5", "--eval_strategy", "no", "--do_eval", "False"]
    _, _, _, training_args = run_sar.parse_args(args)
    assert training_args.output_dir == "outputs/sar-vit"
    assert training_args.learning_rate == 5e-5 and not training_args.do_eval


def test_json_config_file(tmp_path):
    config = {
        "output_dir": str(tmp_path / "run"),
        "sar_weight": 0.05,
        "sar_schedule": "constant",
        "train_fraction": 0.5,
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    model_args, data_args, sar_args, training_args = run_sar.parse_args([str(path)])
    assert (sar_args.sar_weight, sar_args.sar_schedule, data_args.train_fraction) == (0.05, "constant", 0.5)
    assert training_args.output_dir == str(tmp_path / "run")
    assert training_args.num_train_epochs == run_sar.TRAINING_DEFAULTS["num_train_epochs"]
    path.write_text(json.dumps({**config, "sar_schedule": "linear"}))
    with pytest.raises(ValueError, match="--sar_schedule must be one of"):
        run_sar.parse_args([str(path)])


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
        (["--dataset_name", "x", "--train_dir", "y"], "either --dataset_name or --train_dir"),
        (["--validation_dir", "y"], "--validation_dir needs a --train_dir"),
        (["--max_train_samples", "0"], "--max_train_samples must be at least 1"),
    ],
)
def test_invalid_arguments(tmp_path, args, message):
    with pytest.raises(ValueError, match=message):
        run_sar.main([*args, "--output_dir", str(tmp_path)])


def test_compute_metrics():
    logits = np.eye(8)[[0, 1, 2, 3]] + np.linspace(0, 0.5, 8)  # then classes 7, 6, 5, 4 rank next
    assert compute_metrics((logits, np.array([0, 1, 7, 0]))) == {"accuracy": 0.5, "top5_accuracy": 0.75}
    assert compute_metrics(((np.array([[0.2, 0.8], [0.9, 0.1]]), None), np.array([1, 1]))) == {"accuracy": 0.5}


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


@pytest.mark.slow
def test_digits_default_run(tmp_path):
    results, out = _run(tmp_path, "--attention_figure_images", "3")
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
    train_logs = [entry for entry in _state(out)["log_history"] if "loss" in entry]
    assert len(train_logs) == 4 and all("sar/entropy" in e and "sar/weight" in e for e in train_logs)
    # One row per image, an image column plus a map and a region column per head (2 in `tiny`).
    from sar_hf.visualization import CELL_INCHES, DPI

    with PILImage.open(out / "attention_maps.png") as picture:
        assert picture.size == (CELL_INCHES * DPI * (1 + 2 * 2), CELL_INCHES * DPI * 3)

    from transformers import AutoModelForImageClassification, pipeline

    model = AutoModelForImageClassification.from_pretrained(out)
    assert isinstance(model, sar_hf.SARViTForImageClassification)
    assert model.config.sar_weight == 0.01  # the peak λ, not the schedule's last value
    assert model.config.id2label[3] == "3"
    predictions = pipeline("image-classification", model=str(out))(PILImage.new("L", (8, 8)))
    assert len(predictions) == 5


@pytest.mark.slow
def test_sar_weight_zero_is_the_baseline(tmp_path):
    results, out = _run(tmp_path, "--sar_weight", "0", "--save_strategy", "no")
    train_logs = [entry for entry in _state(out)["log_history"] if "loss" in entry]
    assert train_logs and all(entry["sar/weight"] == 0 for entry in train_logs)
    for entry in train_logs:  # the loss is the cross-entropy alone; the entropy is still measured
        assert entry["loss"] == pytest.approx(entry["sar/ce_loss"], rel=1e-3)
        assert entry["sar/entropy"] > 0
    assert json.loads((out / "config.json").read_text())["sar_weight"] == 0


@pytest.mark.slow
def test_bf16_mixed_precision(tmp_path, monkeypatch):
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
    results, out = _run(tmp_path, "--bf16", "--use_cpu", "--save_strategy", "no")
    assert seen and set(seen) == {"torch.bfloat16"}
    train_logs = [entry for entry in _state(out)["log_history"] if "loss" in entry]
    assert train_logs and all(np.isfinite(entry["sar/entropy"]) for entry in train_logs)
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
    _run(tmp_path, "--push_to_hub", "--hub_model_id", "someone/sar-digits", "--save_strategy", "no")
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

    base = tmp_path / "base"
    config = ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, num_labels=3)  # fmt: skip
    ViTForImageClassification(config).save_pretrained(base)
    run_sar._vit_image_processor(16).save_pretrained(base)
    with pytest.raises(ValueError, match="classifies 3 classes and the data has 10; pass --ignore_mismatched_sizes"):
        _run(tmp_path, "--model_name_or_path", str(base))
    results, out = _run(tmp_path, "--model_name_or_path", str(base), "--ignore_mismatched_sizes", "--max_steps", "2")
    model = AutoModelForImageClassification.from_pretrained(out)
    assert isinstance(model, sar_hf.SARViTForImageClassification)
    assert model.classifier.out_features == 10 and np.isfinite(results["eval_accuracy"])


@pytest.mark.slow
def test_two_processes(tmp_path):
    """Two real processes (DDP over gloo) through the repository's Accelerate config."""
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    out = tmp_path / "out"
    with socket.socket() as probe:  # a free port for the rendezvous, so that parallel runs do not collide
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    command = [
        accelerate, "launch",
        "--config_file", str(ROOT / "examples" / "accelerate_configs" / "two_cpu_processes.yaml"),
        "--main_process_port", port, str(ROOT / "examples" / "run_sar.py"),
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
    train_logs = [entry for entry in state["log_history"] if "loss" in entry]
    assert len(train_logs) == 4 and all({"sar/entropy", "sar/ce_loss", "sar/weight"} <= set(e) for e in train_logs)

    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(out)
    assert isinstance(model, sar_hf.SARViTForImageClassification)
