"""The README runs as written: its Python blocks, the training script's commands, and its paths.

Nothing is downloaded. Every Hub id that the README's code names is served from a Hub cache made
here, as a download would have left it (`HF_HUB_CACHE`, with the Hub offline), by a tiny random
stand-in of the same kind: the same class (`architectures`, `model_type`), an image processor,
and no classifier head (ViT in21k) or one for other classes than the data's (DINOv2). What the
README leaves to the reader is defined here: `training_args`, `train`, `val`, the image
`my-image.png`, `a.png` and `b.png`, and the folders `path/to/train` and `path/to/val` of images.
"""

import pathlib
import re
import runpy
import shlex
import sys

import huggingface_hub
import numpy as np
import pytest
import torch
from PIL import Image
from tiny import TINY, TinyImages
from transformers import (
    Dinov2Config,
    Dinov2ForImageClassification,
    TrainingArguments,
    ViTConfig,
    ViTImageProcessor,
    ViTModel,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
SIZES = {k: TINY[k] for k in ("image_size", "patch_size", "hidden_size", "num_hidden_layers", "num_attention_heads")}

# Hub id -> the tiny stand-in of its model.
STAND_INS = {
    "google/vit-base-patch16-224-in21k": lambda: ViTModel(ViTConfig(**SIZES, intermediate_size=37)),
    "facebook/dinov2-small-imagenet1k-1-layer": lambda: Dinov2ForImageClassification(
        Dinov2Config(**SIZES, mlp_ratio=1, num_labels=5)
    ),
}
# What makes a run of the training script take seconds: a step, a few images; evaluation as asked.
QUICK = [
    "--max_steps", "1",
    "--max_train_samples", "16",
    "--max_eval_samples", "8",
    "--per_device_train_batch_size", "8",
    "--per_device_eval_batch_size", "128",
    "--report_to", "none",
    "--attention_figure_images", "0",
    "--dataloader_pin_memory", "False",
]  # fmt: skip


def fenced_blocks(language: str) -> list[tuple[int, str]]:
    """`(line, code)` of every block fenced as ```language in the README."""
    return [
        (README.count("\n", 0, match.start()) + 2, match.group(1))
        for match in re.finditer(rf"^```{language}\n(.*?)^```$", README, flags=re.MULTILINE | re.DOTALL)
    ]


def commands(code: str) -> list[str]:
    """The shell commands of a block: continuation lines joined, comments and blank lines left out."""
    lines = re.sub(r"\\\n\s*", "", code).splitlines()
    return [line.split(" #", 1)[0].strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def mentioned_hub_ids() -> set[str]:
    """The Hub ids in quotes or after `--model_name_or_path` in the README's code."""
    code = "".join(block for _, block in fenced_blocks("python") + fenced_blocks("bash"))
    quoted = re.findall(r"""["']([\w.-]+/[\w.-]+)["']""", code)
    flagged = re.findall(r"--model_name_or_path ([\w.-]+/[\w.-]+)", code)
    return {name for name in quoted + flagged if not name.startswith(("path/", "outputs/", "examples/"))}


def image_folder(root: pathlib.Path, per_class: int = 6):
    """Images of three classes, one subfolder each, as `--train_dir` reads them."""
    rng = np.random.default_rng(0)
    for k, name in enumerate(("cat", "dog", "eel")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 60, (12, 10, 3), dtype=np.uint8) + np.uint8(90 * k)
            Image.fromarray(pixels).save(root / name / f"{i}.png")


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An offline Hub cache holding a stand-in for each id of `STAND_INS`, and the reader's files in
    the working folder."""
    cache = tmp_path / "hub"
    for repo_id, build in STAND_INS.items():
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        commit = "0" * 40
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(commit)
        torch.manual_seed(0)
        build().save_pretrained(repo / "snapshots" / commit)
        ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(repo / "snapshots" / commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for name in ("my-image.png", "a.png", "b.png"):
        Image.fromarray(np.random.default_rng(1).integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(name)
    image_folder(work / "path" / "to" / "train")
    image_folder(work / "path" / "to" / "val", per_class=2)
    return work


def test_every_hub_id_in_the_readmes_code_has_a_stand_in():
    assert mentioned_hub_ids() == set(STAND_INS)


PYTHON_BLOCKS = fenced_blocks("python")


@pytest.mark.parametrize(("line", "code"), PYTHON_BLOCKS, ids=[f"line-{line}" for line, _ in PYTHON_BLOCKS])
def test_python_block_runs_as_written(hub, line, code):
    args = TrainingArguments(
        output_dir=str(hub / "trainer"),
        max_steps=2,
        per_device_train_batch_size=4,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    if "AutoImageProcessor" in code and not auto_image_processor_loads():
        pytest.skip("this Transformers release's AutoImageProcessor needs torchvision, which is not installed here")
    namespace = {"training_args": args, "train": TinyImages(8), "val": TinyImages(4, seed=1)}
    exec(compile(code, f"README.md, block at line {line}", "exec"), namespace)
    if "trainer" in namespace:  # the regulariser trained and was logged
        history = namespace["trainer"].state.log_history
        assert any("sar/entropy" in entry for entry in history)
    if "predictions" in namespace:  # the saved folder serves `pipeline`
        predictions = namespace["predictions"]
        assert predictions and {"label", "score"} <= set(predictions[0])


def auto_image_processor_loads() -> bool:
    """Whether `AutoImageProcessor` loads here: some Transformers releases (5.9) require torchvision for it,
    which does not install beside this project's CPU torch (users' installs have it)."""
    from transformers import AutoImageProcessor

    try:
        AutoImageProcessor.from_pretrained("google/vit-base-patch16-224-in21k")  # from the `hub` fixture
    except ImportError:
        return False
    return True


TRAINING_SCRIPT = README[README.index("## The training script") :].split("\n## ")[0]
SCRIPT_COMMANDS = [
    command for _, code in re.findall(r"(```bash\n)(.*?)```", TRAINING_SCRIPT, re.DOTALL) for command in commands(code)
]


@pytest.mark.slow
def test_the_training_scripts_commands_run_as_written(hub):
    """Each command of "The training script", in order (the pictures use the models trained before
    them), with `QUICK` appended to the training runs. `...` stands for the reader's own flags."""
    ran = []
    for command in SCRIPT_COMMANDS:
        argv = shlex.split(command)
        if "..." in argv:  # `--push_to_hub` needs a Hub account
            continue
        assert argv[0] == "python" and (ROOT / argv[1]).is_file(), command
        if argv[1] == "examples/run_sar.py":
            argv += QUICK
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(sys, "argv", argv[1:])
            runpy.run_path(str(ROOT / argv[1]), run_name="__main__")
        ran.append(argv[1])
    assert ran.count("examples/run_sar.py") == 6 and ran.count("examples/visualize_attention.py") == 1
    for folder in ("sar-digits", "baseline-digits", "sar-cluttered-digits", "sar-digits-deit", "my-sar-vit"):
        assert (hub / "outputs" / folder / "model.safetensors").is_file(), folder
    assert (hub / "outputs" / "my-sar-dinov2" / "config.json").is_file()
    assert (hub / "attention.png").is_file()


def test_the_readme_names_no_file_outside_the_repository():
    assert "../" not in README
    paths = set(re.findall(r"(?<![\w/.~-])((?:[\w.-]+/)+[\w.-]+\.\w+)(?![\w/])", README))
    in_repository = {
        path for path in paths if path.split("/")[0] in {"sar_hf", "tests", "examples", "benchmarks", "scripts", ".ci"}
    }
    assert in_repository and all((ROOT / path).exists() for path in in_repository), sorted(in_repository)
    # Paths under any other top-level name are outputs of the commands, placeholders, or Hub ids.
    assert {path.split("/")[0] for path in paths - in_repository} <= {"outputs", "path", "you"}
