"""The training script's steps in `sar_hf/scripts/utils.py`, called in this process on tiny models.

`build_model` from a preset and from saved checkpoints (a ViT, another ViT family, a checkpoint
without an image processor), and the small helpers the script uses for its figure and its logs.
The end-to-end runs are in test_run_sar.py.
"""

import json
import logging
import types

import numpy as np
import pytest
import torch
import transformers
from accelerate.utils import DistributedType
from datasets import ClassLabel, Dataset, Features, Image
from PIL import Image as PILImage

from sar_hf import SARViTForImageClassification, SpatialEntropyLoss
from sar_hf.data import vit_image_processor_class
from sar_hf.modeling_sar_vit import ViTLayerNoSkipNoNorm
from sar_hf.scripts import utils
from sar_hf.scripts.arguments import MODEL_PRESETS, parse_args

LABELS = ["ant", "bee", "cat"]
# The tiny checkpoints' architecture (image 16 px, patch 4, 2 layers 32 wide).
SMALL = dict(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
             intermediate_size=37)  # fmt: skip


def _args(*flags):
    model_args, _, sar_args, _, _ = parse_args(list(flags))
    return model_args, sar_args


def _rebuilt_blocks(model):
    """How many of the model's blocks are the authors' variant without skip and norm (the last one, if any)."""
    return sum(isinstance(module, ViTLayerNoSkipNoNorm) for module in model.modules())


@pytest.fixture
def calls(monkeypatch):
    """The keyword arguments of every loading call that `build_model` makes, by the function's name."""
    seen = {}

    def record(owner, name, key):
        original = getattr(owner, name)

        def recording(*args, **kwargs):
            seen.setdefault(key, []).append((args, kwargs))
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, recording)

    record(utils.AutoConfig, "from_pretrained", "AutoConfig")
    record(utils.SARViTForImageClassification, "from_pretrained", "SARViT")
    record(utils.AutoModelForImageClassification, "from_pretrained", "AutoModel")
    record(utils, "load_image_processor", "processor")
    return seen


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny checkpoints of three classes: a ViT with its processor, a DeiT without one, a CLIP without one."""
    root = tmp_path_factory.mktemp("checkpoints")
    torch.manual_seed(0)
    vit = transformers.ViTForImageClassification(transformers.ViTConfig(**SMALL, num_labels=3))
    vit.save_pretrained(root / "vit")
    processor = vit_image_processor_class()(size={"height": 16, "width": 16}, do_convert_rgb=False)
    processor.save_pretrained(root / "vit")
    transformers.DeiTForImageClassification(transformers.DeiTConfig(**SMALL, num_labels=3)).save_pretrained(
        root / "deit"
    )
    clip = transformers.CLIPConfig(
        vision_config=dict(SMALL, image_size=20), text_config=dict(hidden_size=32, intermediate_size=37,
        num_hidden_layers=1, num_attention_heads=2), num_labels=3,
    )  # fmt: skip
    transformers.CLIPForImageClassification(clip).save_pretrained(root / "clip")
    processor.__class__(size={"height": 24, "width": 24}).save_pretrained(root / "processor-24")  # on its own
    return root


# --------------------------------------------------------------------------------------------
# From scratch


def test_a_preset_from_scratch_takes_every_setting_of_the_preset_and_the_flags():
    model, processor = utils.build_model(*_args("--model_preset", "tiny", "--sar_weight", "0.3", "--sar_layer", "0"),
                                         LABELS)  # fmt: skip
    assert type(model) is SARViTForImageClassification
    config = model.config
    for key, value in MODEL_PRESETS["tiny"].items():
        assert getattr(config, key) == value, key
    # Attention dropout would change the scores the loss reads; no dropout at all, as in DeiT's recipe.
    assert (config.hidden_dropout_prob, config.attention_probs_dropout_prob) == (0.0, 0.0)
    assert config.id2label == {0: "ant", 1: "bee", 2: "cat"} and config.label2id == {"ant": 0, "bee": 1, "cat": 2}
    assert model.classifier.out_features == 3
    assert (config.sar_weight, config.sar_layer, config.sar_no_skip_no_norm) == (0.3, 0, False)
    assert _rebuilt_blocks(model) == 0
    assert isinstance(processor, vit_image_processor_class())
    assert processor.size == {"height": 16, "width": 16} and processor.do_convert_rgb is True
    pixels = processor(PILImage.new("L", (30, 10), 128), return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 16, 16)


def test_a_preset_with_its_own_sizes_and_the_authors_last_block():
    flags = ("--model_preset", "vit-tiny", "--image_size", "24", "--patch_size", "6", "--sar_no_skip_no_norm")
    model, processor = utils.build_model(*_args(*flags), LABELS[:2])
    config = model.config
    assert (config.image_size, config.patch_size, config.hidden_size, config.layer_norm_eps) == (24, 6, 192, 1e-6)
    assert (config.num_hidden_layers, config.num_attention_heads, config.intermediate_size) == (12, 3, 768)
    assert config.sar_no_skip_no_norm and _rebuilt_blocks(model) == 1
    assert (config.sar_weight, config.sar_layer) == (0.01, -1)
    assert processor.size == {"height": 24, "width": 24} and processor.do_convert_rgb is True
    assert MODEL_PRESETS["vit-tiny"]["image_size"] == 224  # the preset itself is left as it was


def test_a_preset_with_an_image_processor_of_its_own(checkpoints, calls, tmp_path):
    flags = ("--model_preset", "tiny", "--image_processor_name", str(checkpoints / "processor-24"))
    model, processor = utils.build_model(*_args(*flags, "--cache_dir", str(tmp_path)), LABELS)
    assert processor.size == {"height": 24, "width": 24} and processor.do_convert_rgb is True
    assert model.config.image_size == 16  # the preset's, whatever the processor says
    assert calls["processor"] == [((str(checkpoints / "processor-24"),), {"cache_dir": str(tmp_path)})]


# --------------------------------------------------------------------------------------------
# From a checkpoint


def test_a_vit_checkpoint_becomes_a_sar_vit_with_its_weights_and_the_hub_settings(checkpoints, calls, tmp_path):
    path = str(checkpoints / "vit")
    flags = ("--model_name_or_path", path, "--sar_weight", "0.2", "--sar_layer", "1", "--cache_dir", str(tmp_path),
             "--model_revision", "v1", "--token", "secret")  # fmt: skip
    model, processor = utils.build_model(*_args(*flags), LABELS)
    assert type(model) is SARViTForImageClassification
    saved = transformers.ViTForImageClassification.from_pretrained(path).state_dict()
    assert model.state_dict().keys() == saved.keys()
    assert all(torch.equal(model.state_dict()[name], value) for name, value in saved.items())
    assert (model.config.sar_weight, model.config.sar_layer, model.config.sar_no_skip_no_norm) == (0.2, 1, False)
    assert model.config.id2label == {0: "ant", 1: "bee", 2: "cat"} and model.config.label2id["cat"] == 2
    assert processor.size == {"height": 16, "width": 16} and processor.do_convert_rgb is True  # saved False
    hub = {"cache_dir": str(tmp_path), "revision": "v1", "token": "secret"}
    assert calls["AutoConfig"] == [((path,), hub)]
    (args, kwargs), *_ = calls["SARViT"]
    assert args == (path,)
    assert kwargs == {"sar_no_skip_no_norm": False, "sar_weight": 0.2, "sar_layer": 1,
                      "ignore_mismatched_sizes": False, "id2label": model.config.id2label,
                      "label2id": model.config.label2id, **hub}  # fmt: skip
    assert calls["processor"] == [((path,), hub)]
    assert "AutoModel" not in calls


def test_a_vit_checkpoint_with_the_authors_last_block(checkpoints):
    model, _ = utils.build_model(*_args("--model_name_or_path", str(checkpoints / "vit"), "--sar_no_skip_no_norm"),
                                 LABELS)  # fmt: skip
    assert model.config.sar_no_skip_no_norm and _rebuilt_blocks(model) == 1


def test_another_number_of_classes_needs_ignore_mismatched_sizes(checkpoints, caplog):
    path = str(checkpoints / "vit")
    labels = ["a", "b", "c", "d"]
    with pytest.raises(ValueError, match=f"{path} classifies 3 classes and the data has 4; pass --ignore_mism"):
        utils.build_model(*_args("--model_name_or_path", path), labels)
    with caplog.at_level(logging.WARNING, logger=utils.__name__):
        model, _ = utils.build_model(*_args("--model_name_or_path", path, "--ignore_mismatched_sizes"), labels)
    assert f"the classifier of {path} has 3 outputs and the data 4 classes" in caplog.text
    assert model.classifier.out_features == 4 and model.config.id2label[3] == "d"
    saved = transformers.ViTForImageClassification.from_pretrained(path)
    assert torch.equal(model.vit.embeddings.patch_embeddings.projection.weight,
                       saved.vit.embeddings.patch_embeddings.projection.weight)  # fmt: skip
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=utils.__name__):
        utils.build_model(*_args("--model_name_or_path", path, "--ignore_mismatched_sizes"), LABELS)
    assert "--ignore_mismatched_sizes" not in caplog.text  # the sizes fit: nothing is initialised anew


def test_another_vit_family_keeps_its_class_with_the_loss_attached(checkpoints, calls, caplog, tmp_path):
    path = str(checkpoints / "deit")
    flags = ("--model_name_or_path", path, "--sar_weight", "0.2", "--sar_layer", "0", "--cache_dir", str(tmp_path))
    with caplog.at_level(logging.WARNING, logger=utils.__name__):
        model, processor = utils.build_model(*_args(*flags), LABELS)
    assert type(model) is transformers.DeiTForImageClassification
    assert isinstance(model.sar_loss, SpatialEntropyLoss)
    assert (model.sar_loss.sar_weight, model.sar_loss.sar_layer) == (0.2, 0)
    assert model.config.id2label == {0: "ant", 1: "bee", 2: "cat"}
    hub = {"cache_dir": str(tmp_path), "revision": "main", "token": None}
    assert calls["AutoModel"] == [((path,), {"id2label": model.config.id2label, "label2id": model.config.label2id,
                                             "ignore_mismatched_sizes": False, **hub})]  # fmt: skip
    assert "SARViT" not in calls
    # Saved without an image processor: a ViT one for its size, converting to RGB, and a warning that says so.
    assert f"{path} has no image processor; using a ViTImageProcessor for its 16 px." in caplog.messages
    assert isinstance(processor, vit_image_processor_class())
    assert processor.size == {"height": 16, "width": 16} and processor.do_convert_rgb is True
    with pytest.raises(ValueError, match=f"--sar_no_skip_no_norm rebuilds the last block of a ViT .*; {path} is a "
                       "'deit' model, which keeps its own blocks"):  # fmt: skip
        utils.build_model(*_args("--model_name_or_path", path, "--sar_no_skip_no_norm"), LABELS)


def test_a_clip_checkpoint_without_a_processor_gets_one_for_its_vision_size(checkpoints, caplog):
    """CLIP keeps `image_size` in its vision config (20 px here); the stand-in processor reads it there."""
    with caplog.at_level(logging.WARNING, logger=utils.__name__):
        model, processor = utils.build_model(*_args("--model_name_or_path", str(checkpoints / "clip")), LABELS)
    assert type(model) is transformers.CLIPForImageClassification and hasattr(model, "sar_loss")
    assert processor.size == {"height": 20, "width": 20} and "using a ViTImageProcessor for its 20 px" in caplog.text


def test_a_named_image_processor_that_cannot_be_loaded_is_an_error(checkpoints, tmp_path):
    """Only the checkpoint's own missing processor is replaced; one the user named must exist."""
    flags = ("--model_name_or_path", str(checkpoints / "deit"), "--image_processor_name", str(tmp_path / "none"))
    with pytest.raises(OSError):
        utils.build_model(*_args(*flags), LABELS)
    model, processor = utils.build_model(
        *_args("--model_name_or_path", str(checkpoints / "deit"), "--image_processor_name",
               str(checkpoints / "processor-24")), LABELS)  # fmt: skip
    assert processor.size == {"height": 24, "width": 24} and processor.do_convert_rgb is True


# --------------------------------------------------------------------------------------------
# Small helpers


def test_vision_config_is_clips_vision_config_and_any_other_config_itself():
    clip = transformers.CLIPConfig(vision_config=dict(image_size=20, patch_size=5))
    assert utils.vision_config(clip) is clip.vision_config and utils.vision_config(clip).image_size == 20
    vit = transformers.ViTConfig(image_size=24)
    assert utils.vision_config(vit) is vit


def test_square_vit_processor_resizes_any_image_to_a_square():
    processor = utils._square_vit_processor(20)
    assert isinstance(processor, vit_image_processor_class()) and processor.size == {"height": 20, "width": 20}
    assert processor(PILImage.new("RGB", (40, 10)), return_tensors="pt")["pixel_values"].shape == (1, 3, 20, 20)


@pytest.mark.parametrize(
    "distributed_type, native_amp, mixed_precision, expected",
    [
        (DistributedType.NO, True, "bf16", "bf16"),
        (DistributedType.MULTI_GPU, True, "fp16", "fp16"),
        (DistributedType.NO, False, "fp16", "no (float32)"),  # --fp16 on a CPU
        (DistributedType.NO, False, "no", "no (float32)"),
        (DistributedType.DEEPSPEED, True, "bf16", "as the DeepSpeed config sets it"),
        (DistributedType.DEEPSPEED, False, "no", "as the DeepSpeed config sets it"),
    ],
)
def test_precision_in_use(distributed_type, native_amp, mixed_precision, expected):
    accelerator = types.SimpleNamespace(
        distributed_type=distributed_type, native_amp=native_amp, mixed_precision=mixed_precision
    )
    assert utils.precision_in_use(accelerator) == expected


def test_figure_images_are_one_per_class_in_class_order_then_the_rest_in_order():
    labels = [2, 0, 2, 1, 0, 1, 2]
    images = [PILImage.new("L", (4, 4), 10 * i) for i in range(len(labels))]
    features = Features({"picture": Image(), "target": ClassLabel(names=["a", "b", "c"])})
    split = Dataset.from_dict({"picture": images, "target": labels}, features=features)

    def drawn(count):
        chosen = utils.figure_images(split, "picture", "target", count)
        assert all(isinstance(image, PILImage.Image) for image in chosen)
        return [int(np.asarray(image)[0, 0]) // 10 for image in chosen]

    assert drawn(3) == [1, 3, 0]  # the first 0, the first 1, the first 2
    assert drawn(2) == [1, 3]
    assert drawn(5) == [1, 3, 0, 2, 4]
    assert drawn(20) == [1, 3, 0, 2, 4, 5, 6]
    # A class missing from the split is passed over: rows 0, 2, 3 hold classes 2, 2, 1.
    chosen = utils.figure_images(split.select([0, 2, 3]), "picture", "target", 3)
    assert [int(np.asarray(image)[0, 0]) // 10 for image in chosen] == [3, 0, 2]


# --------------------------------------------------------------------------------------------
# Which checkpoint a run resumes from


def _checkpoint(output_dir, step, complete=True):
    from safetensors.torch import save_file

    folder = output_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    save_file({"w": torch.zeros(2)}, str(folder / "model.safetensors"))
    if complete:  # Trainer writes trainer_state.json last
        (folder / "trainer_state.json").write_text(f'{{"global_step": {step}}}')
    return str(folder)


def _resolve(output_dir, resume=None, do_train=True, overwrite=False, should_save=True):
    training_args = types.SimpleNamespace(
        resume_from_checkpoint=resume, output_dir=str(output_dir), do_train=do_train, should_save=should_save
    )
    return utils.resolve_checkpoint(types.SimpleNamespace(overwrite_output_dir=overwrite), training_args)


@pytest.fixture
def run_folder(tmp_path):
    """An output folder with complete checkpoints at steps 4 and 8 and a half-written one at step 12."""
    out = tmp_path / "out"
    paths = {step: _checkpoint(out, step) for step in (4, 8)}
    paths[12] = _checkpoint(out, 12, complete=False)
    (out / "checkpoint-99").write_text("a file, not a checkpoint")
    (out / "runs").mkdir()
    return out, paths


def test_a_rerun_resumes_from_the_last_complete_checkpoint(run_folder, caplog):
    out, paths = run_folder
    with caplog.at_level(logging.WARNING):
        assert _resolve(out) == paths[8]
    assert f"Checkpoint detected, resuming training at {paths[8]}. To train from scratch" in caplog.text
    for resume in (True, "True", "true", "LAST", "auto", "1", "yes"):
        assert _resolve(out, resume) == paths[8], resume
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=utils.__name__):
        assert _resolve(out, "true") == paths[8]
    assert "Checkpoint detected" not in caplog.text  # asked for: no warning
    # Not training, or told not to resume: no checkpoint.
    assert _resolve(out, do_train=False) is None and _resolve(out, "true", do_train=False) is None
    for resume in (False, "False", "false", "NONE", "no", "0", ""):  # False: a .json file's `false`
        assert _resolve(out, resume) is None, resume


def test_a_json_files_false_means_not_to_resume(run_folder, tmp_path):
    """`"resume_from_checkpoint": false` in a .json file of arguments reaches the script as a bool (it was refused as
    "not a folder"); `true` as one too."""
    out, paths = run_folder
    for value, expected in ((False, None), (True, paths[8])):
        path = tmp_path / "run.json"
        path.write_text(json.dumps({"resume_from_checkpoint": value, "output_dir": str(out)}))
        model_args, _, _, _, training_args = parse_args([str(path)])
        assert training_args.resume_from_checkpoint is value
        assert utils.resolve_checkpoint(model_args, training_args) == expected


def test_a_named_checkpoint_is_taken_when_complete(run_folder):
    out, paths = run_folder
    assert _resolve(out, paths[4]) == paths[4]
    assert _resolve(out, paths[4], do_train=False) == paths[4]  # e.g. to evaluate it
    with pytest.raises(ValueError, match=f"--resume_from_checkpoint '{paths[12]}' is not a complete checkpoint"):
        _resolve(out, paths[12])
    missing = str(out / "checkpoint-5")
    with pytest.raises(ValueError, match=f"--resume_from_checkpoint '{missing}' is not a folder."):
        _resolve(out, missing)


def test_resuming_a_folder_without_checkpoints(tmp_path):
    assert _resolve(tmp_path / "new") is None and _resolve(tmp_path) is None
    _checkpoint(tmp_path, 3, complete=False)
    with pytest.raises(ValueError, match=f"--resume_from_checkpoint True: '{tmp_path}' holds no complete checkpoint."):
        _resolve(tmp_path, "True")
    assert _resolve(tmp_path) is None


def test_overwrite_output_dir_deletes_the_checkpoints_and_starts_afresh(run_folder, caplog):
    out, paths = run_folder
    with pytest.raises(
        ValueError, match="^--resume_from_checkpoint and --overwrite_output_dir contradict each other.$"
    ):
        _resolve(out, "True", overwrite=True)
    assert _resolve(out, overwrite=True, should_save=False) is None  # not the main process: it deletes nothing
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-12", "checkpoint-4", "checkpoint-8", "checkpoint-99",
                                                     "runs"]  # fmt: skip
    assert _resolve(out, overwrite=True, do_train=False) is None
    assert len(list(out.glob("checkpoint-*"))) == 4
    with caplog.at_level(logging.WARNING, logger=utils.__name__):
        assert _resolve(out, overwrite=True) is None
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-99", "runs"]  # only checkpoint folders go
    assert f"--overwrite_output_dir: deleting {paths[8]}" in caplog.messages
    assert _resolve(out / "never-made", overwrite=True) is None and not (out / "never-made").exists()


# --------------------------------------------------------------------------------------------
# load_data: the checked splits, on in-memory data


def _rows(labels, start=0, label_names=("a", "b"), extra=True):
    """Rows whose "image" column numbers them (`start + i`), with a ClassLabel and another column to be dropped."""
    from datasets import Value

    features = {"image": Value("int64"), "label": ClassLabel(names=list(label_names))}
    data = {"image": list(range(start, start + len(labels))), "label": list(labels)}
    if extra:
        features["other"] = Value("string")
        data["other"] = ["x"] * len(labels)
    return Dataset.from_dict(data, features=Features(features))


def _load(monkeypatch, splits, *flags):
    """`load_data` of the script on `splits` (in place of what `load_image_dataset` would read): `(dataset,
    skipped, calls)`, where `calls` holds the arguments that `load_image_dataset` was given."""
    from datasets import DatasetDict

    calls = []

    def load_image_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return DatasetDict(splits)

    monkeypatch.setattr(utils, "load_image_dataset", load_image_dataset)
    model_args, data_args, _, _, training_args = parse_args(list(flags))
    dataset, skipped = utils.load_data(model_args, data_args, training_args)
    return dataset, skipped, calls


def _ids(split):
    return list(split.with_format(None)["image"])


def test_load_data_reads_the_dataset_or_folders_named_with_the_hub_settings(monkeypatch):
    splits = {"train": _rows([0, 1] * 4), "validation": _rows([0, 1])}
    calls = _load(monkeypatch, splits, "--no_verify_images")[2]
    assert calls == [(("digits", None, None, None), {"cache_dir": None, "token": None})]  # the bundled default
    flags = ["--dataset_name", "someone/images", "--dataset_config_name", "small", "--cache_dir", "/cache",
             "--token", "secret", "--no_verify_images"]  # fmt: skip
    calls = _load(monkeypatch, splits, *flags)[2]
    assert calls == [(("someone/images", "small", None, None), {"cache_dir": "/cache", "token": "secret"})]
    calls = _load(
        monkeypatch, splits, "--train_dir", "own/train", "--validation_dir", "own/val", "--no_verify_images"
    )[2]
    assert calls == [((None, None, "own/train", "own/val"), {"cache_dir": None, "token": None})]


def test_load_data_keeps_the_three_splits_and_the_two_columns_named(monkeypatch):
    """A dataset's own validation split is kept as it is (not carved again from train); other splits and columns
    are dropped; string labels become one ClassLabel shared by every split; a split of one image is enough."""
    from datasets import Value

    def renamed(ds, labels):
        ds = ds.rename_columns({"image": "img", "label": "y"}).remove_columns("y")
        return ds.add_column("y", labels, feature=Value("string"))

    splits = {
        "unlabeled": _rows([0, 1], 100),
        "test": renamed(_rows([1], 50), ["cat"]),
        "validation": renamed(_rows([0, 1], 20), ["dog", "cat"]),
        "train": renamed(_rows([0, 1] * 4), ["cat", "dog"] * 4),
    }
    flags = ["--image_column_name", "img", "--label_column_name", "y", "--no_verify_images"]
    dataset, skipped, _ = _load(monkeypatch, splits, *flags)
    assert list(dataset) == ["train", "validation", "test"] and skipped == {}
    for split in dataset.values():
        assert split.column_names == ["img", "y"] and split.features["y"] == ClassLabel(names=["cat", "dog"])
    ids = {name: list(split.with_format(None)["img"]) for name, split in dataset.items()}
    assert ids == {"train": list(range(8)), "validation": [20, 21], "test": [50]}
    assert list(dataset["validation"].with_format(None)["y"]) == [1, 0]  # dog, cat


def test_load_data_without_a_train_split_is_an_error(monkeypatch):
    with pytest.raises(ValueError) as raised:
        _load(monkeypatch, {"validation": _rows([0, 1]), "test": _rows([0, 1])}, "--no_verify_images")
    assert str(raised.value) == "The dataset has no 'train' split; its splits are ['validation', 'test']."


def test_load_data_refuses_an_empty_split_and_a_train_split_of_one_class(monkeypatch):
    splits = {"train": _rows([0, 1] * 3), "test": _rows([])}
    with pytest.raises(ValueError) as raised:
        _load(monkeypatch, splits, "--no_verify_images")
    assert str(raised.value) == "The 'test' split is empty."
    # One class: refused even when not training, since the classes come from the train split.
    for flags in ([], ["--do_train", "False"]):
        with pytest.raises(ValueError, match=r"^The 'train' split has only one class \(\['b'\]\)"):
            _load(monkeypatch, {"train": _rows([1] * 4), "validation": _rows([0, 1])}, "--no_verify_images", *flags)


def test_load_data_carves_the_validation_split_from_train_with_the_runs_seed(monkeypatch):
    labels = [0] * 60 + [1] * 40
    splits = {"train": _rows(labels)}

    def carve(*flags):
        dataset, _, _ = _load(monkeypatch, splits, "--no_verify_images", *flags)
        return _ids(dataset["train"]), _ids(dataset["validation"])

    train, validation = carve()
    assert len(validation) == 15 and sorted(train + validation) == list(range(100))  # --train_val_split 0.15
    assert sum(labels[i] for i in validation) == 6  # stratified: 9 of class 0, 6 of class 1
    assert carve() == (train, validation) and carve("--seed", "7") != (train, validation)
    train, validation = carve("--train_val_split", "0.3")
    assert len(validation) == 30 and sum(labels[i] for i in validation) == 12
    # 0: no validation split, which --do_eval needs.
    dataset, _, _ = _load(
        monkeypatch,
        splits,
        "--no_verify_images",
        "--train_val_split",
        "0",
        "--do_eval",
        "False",
        "--eval_strategy",
        "no",
    )
    assert list(dataset) == ["train"] and _ids(dataset["train"]) == list(range(100))
    with pytest.raises(ValueError) as raised:
        _load(monkeypatch, splits, "--no_verify_images", "--train_val_split", "0")
    assert str(raised.value) == (
        "--do_eval needs a validation split: give --validation_dir or a --train_val_split above 0."
    )


def test_a_fraction_of_train_is_drawn_with_the_runs_seed(monkeypatch):
    splits = {"train": _rows([0, 1] * 20), "validation": _rows([0, 1], 100)}

    def subset(*flags):
        return _ids(_load(monkeypatch, splits, "--no_verify_images", "--train_fraction", "0.5", *flags)[0]["train"])

    first = subset()
    assert len(first) == 20 and subset() == first and subset("--seed", "7") != first


def test_max_samples_draw_from_train_and_validation_with_the_runs_seed(monkeypatch):
    """`--max_train_samples` and `--max_eval_samples` take that many images at random (seeded) from their split;
    the test split is never cut; a limit above a split's size keeps all of it."""
    splits = {"train": _rows([0, 1] * 10), "validation": _rows([0, 1] * 5, 100), "test": _rows([0, 1] * 5, 200)}

    def limited(*flags):
        dataset = _load(monkeypatch, splits, "--no_verify_images", *flags)[0]
        return {name: _ids(split) for name, split in dataset.items()}

    ids = limited("--max_train_samples", "6", "--max_eval_samples", "4")
    assert (len(ids["train"]), len(ids["validation"]), ids["test"]) == (6, 4, list(range(200, 210)))
    assert set(ids["train"]) <= set(range(20)) and set(ids["validation"]) <= set(range(100, 110))
    assert ids["train"] != list(range(6))  # at random, not the first ones
    assert limited("--max_train_samples", "6", "--max_eval_samples", "4") == ids
    other = limited("--max_train_samples", "6", "--max_eval_samples", "4", "--seed", "7")
    assert other["train"] != ids["train"] and other["validation"] != ids["validation"]
    ids = limited("--max_train_samples", "50", "--max_eval_samples", "1")
    assert sorted(ids["train"]) == list(range(20)) and len(ids["validation"]) == 1
    # Without a validation split, the limit on it has nothing to cut.
    dataset = _load(monkeypatch, {"train": splits["train"]}, "--no_verify_images", "--train_val_split", "0",
                    "--do_eval", "False", "--eval_strategy", "no", "--max_eval_samples", "3")[0]  # fmt: skip
    assert list(dataset) == ["train"] and len(dataset["train"]) == 20
    # A limit that leaves one class to train on is refused when training, not when only evaluating.
    with pytest.raises(ValueError, match=r"^The 'train' split has only one class"):
        limited("--max_train_samples", "1")
    assert len(limited("--max_train_samples", "1", "--do_train", "False")["train"]) == 1


def test_unreadable_images_are_skipped_when_asked_and_counted(monkeypatch):
    from datasets import Image as ImageFeature

    def images(labels, broken=()):
        rows = []
        for i, _ in enumerate(labels):
            if i in broken:
                rows.append({"bytes": b"not an image", "path": f"broken-{i}.png"})
            else:
                rows.append(PILImage.new("L", (4, 4), i))
        features = Features({"image": ImageFeature(), "label": ClassLabel(names=["a", "b"])})
        return Dataset.from_dict({"image": rows, "label": list(labels)}, features=features)

    splits = {"train": images([0, 1, 0, 1, 0, 1], broken=(2,)), "validation": images([0, 1])}
    with pytest.raises(ValueError, match=r"^1 image\(s\) of the 'train' split cannot be read: broken-2.png"):
        _load(monkeypatch, splits)
    dataset, skipped, _ = _load(monkeypatch, splits, "--skip_bad_images")
    assert skipped == {"train": 1, "validation": 0} and len(dataset["train"]) == 5
    assert [np.asarray(image)[0, 0] for image in dataset["train"]["image"]] == [0, 1, 3, 4, 5]
    assert _load(monkeypatch, splits, "--no_verify_images")[1] == {}  # not checked: nothing skipped
    # A split left empty by the skipping is an error.
    splits["validation"] = images([0, 1], broken=(0, 1))
    with pytest.raises(ValueError) as raised:
        _load(monkeypatch, splits, "--skip_bad_images")
    assert str(raised.value) == "The 'validation' split is empty after skipping unreadable images and subsetting."
