"""Faults that must lose nothing: a training process killed with SIGKILL, and what loading runs.

The other reliability cases live beside the code they exercise (bad input in test_entropy /
test_configuration / test_loss / test_modeling, bad data in test_data / test_run_sar, non-finite
scores in test_trainer); README.md's reliability table points at each.
"""

import io
import json
import os
import pathlib
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import TINY, TinyImages
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    TrainingArguments,
    ViTForImageClassification,
    ViTImageProcessor,
    pipeline,
)

import sar_hf
from sar_hf.checkpoints import last_complete_checkpoint
from sar_hf.data import load_image_processor

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import run_sar  # noqa: E402

RUN = [
    "--model_preset", "tiny",
    "--max_train_samples", "64",
    "--max_eval_samples", "64",
    "--per_device_train_batch_size", "8",
    "--max_steps", "40",
    "--save_strategy", "steps",
    "--save_steps", "4",
    "--save_total_limit", "3",
    "--eval_strategy", "no",
    "--logging_steps", "1",
    "--sar_granularity", "step",
    "--sar_warmup_epochs", "1",
    "--augment", "False",  # Accelerate draws the next batch's crops before a save
    "--report_to", "none",
    "--attention_figure_images", "0",
    "--dataloader_pin_memory", "False",
]  # fmt: skip


def _weights(history):
    return {entry["step"]: entry["sar/weight"] for entry in history if "sar/weight" in entry}


@pytest.mark.slow
def test_sigkill_mid_run_resumes_and_loses_only_the_unsaved_steps(tmp_path):
    killed = tmp_path / "killed"
    command = [sys.executable, str(ROOT / "examples" / "run_sar.py"), *RUN, "--output_dir", str(killed)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while last_complete_checkpoint(str(killed)) is None or not killed.joinpath("checkpoint-12").exists():
            assert process.poll() is None, process.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 5 minutes"
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert not (killed / "model.safetensors").exists()  # the run really died before its end
    survivor = last_complete_checkpoint(str(killed))
    saved_step = int(pathlib.Path(survivor).name.split("-")[1])
    assert saved_step >= 8

    resumed = run_sar.main([*RUN, "--output_dir", str(killed), "--resume_from_checkpoint", "True"])
    uninterrupted = run_sar.main([*RUN, "--output_dir", str(tmp_path / "whole")])

    history = json.loads((killed / "trainer_state.json").read_text())["log_history"]
    whole = json.loads((tmp_path / "whole" / "trainer_state.json").read_text())["log_history"]
    # Nothing before the last complete checkpoint is redone; every later step is.
    new_steps = sorted(entry["step"] for entry in history if "loss" in entry and entry["step"] > saved_step)
    assert new_steps == list(range(saved_step + 1, 41))
    # The λ schedule after the resume is that of the uninterrupted run, step by step.
    assert _weights(history) == pytest.approx(_weights(whole))
    assert sorted(_weights(history)) == list(range(1, 41))
    # Same seed, same data order, same weights: the same model, up to float reordering.
    assert resumed["eval_accuracy"] == pytest.approx(uninterrupted["eval_accuracy"], abs=0.05)
    assert resumed["test_accuracy"] == pytest.approx(uninterrupted["test_accuracy"], abs=0.05)
    assert sar_hf.SARViTForImageClassification.from_pretrained(killed).config.sar_weight == 0.01


def _refusing(name: str, calls: list):
    """A stand-in for an unpickling function: records `name` in `calls`, then raises."""

    def refuse(*args, **kwargs):
        calls.append(name)
        raise pickle.UnpicklingError(f"{name} was called: loading what sar_hf writes must not unpickle")

    return refuse


@pytest.fixture
def unpickling(monkeypatch) -> list:
    """Makes every way to unpickle raise `UnpicklingError` and records each attempt in the returned
    list, so that a caller that swallows the error is caught too. Only `torch.load(...,
    weights_only=True)` goes through: its unpickler rebuilds tensors and plain containers and runs no
    code, and Trainer reads its optimizer, scheduler and RNG state with it when it resumes."""
    calls = []
    for module, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (np, "load")):
        monkeypatch.setattr(module, name, _refusing(f"{module.__name__}.{name}", calls))
    torch_load, refuse = torch.load, _refusing("torch.load without weights_only=True", calls)

    def load(*args, **kwargs):
        return torch_load(*args, **kwargs) if kwargs.get("weights_only") is True else refuse(*args, **kwargs)

    monkeypatch.setattr(torch, "load", load)
    monkeypatch.setattr(torch.serialization, "load", load)
    return calls


def test_the_unpickling_guard_refuses_each_way_to_unpickle(tmp_path, unpickling):
    torch.save({"step": 1}, tmp_path / "state.pt")
    np.save(tmp_path / "array.npy", np.arange(3))
    attempts = {
        "torch.load(weights_only=False)": lambda: torch.load(tmp_path / "state.pt", weights_only=False),
        "torch.load()": lambda: torch.load(tmp_path / "state.pt"),  # torch < 2.6 defaults to unpickling
        "pickle.loads": lambda: pickle.loads(pickle.dumps(1)),
        "pickle.load": lambda: pickle.load(io.BytesIO(pickle.dumps(1))),
        "pickle.Unpickler": lambda: pickle.Unpickler(io.BytesIO(pickle.dumps(1))).load(),
        "numpy.load": lambda: np.load(tmp_path / "array.npy", allow_pickle=True),
    }
    for name, attempt in attempts.items():
        with pytest.raises(pickle.UnpicklingError):
            attempt()
        assert len(unpickling) == list(attempts).index(name) + 1, name
    assert torch.load(tmp_path / "state.pt", weights_only=True) == {"step": 1}


def test_loading_what_the_package_writes_unpickles_nothing(tmp_path, unpickling, monkeypatch):
    """Every artifact the package writes, read back the ways it is read: SARTrainer's checkpoints and
    its resume, the checkpoint checks, a saved model's weights, config and image processor (the SAR
    classes, the Auto classes, plain ViT, `pipeline`, `load_image_processor`)."""
    resumed_from = []
    load_from_checkpoint = sar_hf.SARTrainer._load_from_checkpoint

    def spy(self, folder, *args, **kwargs):
        resumed_from.append(pathlib.Path(folder).name)
        return load_from_checkpoint(self, folder, *args, **kwargs)

    monkeypatch.setattr(sar_hf.SARTrainer, "_load_from_checkpoint", spy)
    processor = ViTImageProcessor(size={"height": 16, "width": 16})

    def train(steps: int, resume: str | None = None) -> sar_hf.SARTrainer:
        torch.manual_seed(0)
        model = sar_hf.SARViTForImageClassification(sar_hf.SARViTConfig(**TINY))
        args = TrainingArguments(
            output_dir=str(tmp_path / "run"),
            max_steps=steps,
            per_device_train_batch_size=4,
            save_strategy="steps",
            save_steps=2,
            report_to="none",
            use_cpu=True,
            disable_tqdm=True,
        )
        trainer = sar_hf.SARTrainer(model=model, args=args, train_dataset=TinyImages(), processing_class=processor)
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    train(4)
    checkpoint = last_complete_checkpoint(str(tmp_path / "run"))
    assert pathlib.Path(checkpoint).name == "checkpoint-4"
    train(6, resume=checkpoint).save_model(str(tmp_path / "model"))  # weights, config, image processor
    assert resumed_from == ["checkpoint-4"]
    no_skip = sar_hf.SARViTForImageClassification(sar_hf.SARViTConfig(**TINY, sar_no_skip_no_norm=True))
    no_skip.save_pretrained(tmp_path / "no-skip")

    for folder in (tmp_path / "model", tmp_path / "no-skip"):
        for model_class in (sar_hf.SARViTForImageClassification, AutoModelForImageClassification, AutoModel):
            assert type(model_class.from_pretrained(folder).config) is sar_hf.SARViTConfig
        assert type(AutoConfig.from_pretrained(folder)) is sar_hf.SARViTConfig
    folder = str(tmp_path / "model")
    ViTForImageClassification.from_pretrained(folder)
    assert load_image_processor(folder).size == processor.size
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8))
    assert len(pipeline("image-classification", model=folder, device="cpu")(image)) > 0
    assert len(pipeline("image-feature-extraction", model=folder, device="cpu")(image)) == 1
    assert unpickling == []


def test_identical_images_give_empty_masks_and_a_finite_loss():
    """A batch of identical constant images: every patch token, hence every score, is the same."""
    torch.manual_seed(0)
    model = sar_hf.SARViTForImageClassification(sar_hf.SARViTConfig(**TINY, sar_weight=0.1)).train()
    with torch.no_grad():
        model.vit.embeddings.position_embeddings.zero_()  # nothing tells the patches apart
    output = model(torch.full((4, 3, 16, 16), 0.5), labels=torch.tensor([0, 1, 2, 0]))
    assert output.spatial_entropy.item() == 0.0 and output.skipped_maps.item() == 0
    assert torch.isfinite(output.loss)
    output.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
