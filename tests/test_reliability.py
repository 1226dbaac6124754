"""Faults that must lose nothing: a training process killed with SIGKILL, and what loading runs.

The other reliability cases live beside the code they exercise (bad input in test_entropy /
test_configuration / test_loss / test_modeling, bad data in test_data / test_run_sar, non-finite
scores in test_trainer); README.md's reliability table points at each.
"""

import ast
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import torch
from tiny import TINY

import sar_hf
from sar_hf.checkpoints import last_complete_checkpoint

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


def test_the_package_never_unpickles():
    """No `pickle`, no `torch.load` without `weights_only=True`, no `trust_remote_code` in sar_hf."""
    for path in (ROOT / "sar_hf").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [alias.name for alias in node.names] + [getattr(node, "module", None) or ""]
                assert not any(name.split(".")[0] in ("pickle", "dill", "joblib") for name in names), path
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "load":
                if getattr(node.func.value, "id", None) == "torch":
                    weights_only = [k for k in node.keywords if k.arg == "weights_only"]
                    assert weights_only and weights_only[0].value.value is True, f"{path}:{node.lineno}"
            if isinstance(node, ast.keyword) and node.arg == "trust_remote_code":
                raise AssertionError(f"{path}: trust_remote_code")


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
