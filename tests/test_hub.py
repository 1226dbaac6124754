"""Checkpoints: what `save_pretrained` writes and what loads it (Auto classes, pipeline, plain ViT).

Everything stays in `tmp_path`; nothing is downloaded.
"""

import json

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image
from tiny import TINY
from transformers import (
    AutoModel,
    AutoModelForImageClassification,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
    ViTModel,
    configuration_utils,
    pipeline,
)
from transformers.testing_utils import CaptureLogger

import sar_hf
from sar_hf import SARCallback, SARTrainer, SARViTConfig, SARViTForImageClassification, SARViTModel

TINY = {**TINY, "id2label": {0: "cat", 1: "dog", 2: "fox"}, "label2id": {"cat": 0, "dog": 1, "fox": 2}}
SETTINGS = {"sar_weight": 0.05, "sar_layer": 0}


def make_model(**settings) -> SARViTForImageClassification:
    torch.manual_seed(0)
    return SARViTForImageClassification(SARViTConfig(**TINY, **{**SETTINGS, **settings})).eval()


def pixels(seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_save_pretrained_writes_safetensors_and_the_sar_config(tmp_path):
    make_model().save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert not (tmp_path / "pytorch_model.bin").exists()
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "sar-vit"
    assert config["architectures"] == ["SARViTForImageClassification"]
    assert {key: config[key] for key in ("sar_weight", "sar_layer", "sar_no_skip_no_norm")} == {
        **SETTINGS,
        "sar_no_skip_no_norm": False,
    }


@pytest.mark.parametrize("no_skip", [False, True], ids=["standard", "no-skip-no-norm"])
def test_auto_model_loads_the_sar_model_with_its_weights(tmp_path, no_skip):
    model = make_model(sar_no_skip_no_norm=no_skip)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert type(loaded) is SARViTForImageClassification
    assert loaded.config.sar_no_skip_no_norm is no_skip and loaded.config.sar_layer == 0
    assert torch.equal(loaded.eval()(pixels()).logits, model(pixels()).logits)


def test_pipeline_classifies_with_a_saved_sar_model(tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path)
    processor = ViTImageProcessor(size={"height": 16, "width": 16})
    processor.save_pretrained(tmp_path)

    classifier = pipeline("image-classification", model=str(tmp_path), device="cpu")
    assert type(classifier.model) is SARViTForImageClassification
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8))
    predictions = classifier(image, top_k=3)

    with torch.no_grad():
        probs = model(processor(image, return_tensors="pt").pixel_values).logits.softmax(-1)[0]
    expected = {TINY["id2label"][i]: p.item() for i, p in enumerate(probs)}
    assert {p["label"]: p["score"] for p in predictions} == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("no_skip", [False, True], ids=["standard", "no-skip-no-norm"])
def test_auto_model_round_trips_the_encoder_of_a_sar_checkpoint(tmp_path, no_skip):
    model = make_model(sar_no_skip_no_norm=no_skip)
    model.save_pretrained(tmp_path / "classifier")
    encoder, info = AutoModel.from_pretrained(tmp_path / "classifier", output_loading_info=True)
    assert type(encoder) is SARViTModel and encoder.config.sar_no_skip_no_norm is no_skip
    # As for ViT: the classifier's checkpoint has no pooler, and its head is not the encoder's.
    assert info["missing_keys"] == {"pooler.dense.weight", "pooler.dense.bias"}
    assert info["unexpected_keys"] == {"classifier.weight", "classifier.bias"}
    with torch.no_grad():
        expected = model.vit(pixels()).last_hidden_state
        assert torch.equal(encoder.eval()(pixels()).last_hidden_state, expected)

    encoder.save_pretrained(tmp_path / "encoder")
    again, info = AutoModel.from_pretrained(tmp_path / "encoder", output_loading_info=True)
    assert type(again) is SARViTModel and not any(info[key] for key in ("missing_keys", "unexpected_keys"))
    for (name, tensor), reloaded in zip(encoder.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(tensor, reloaded), name


def test_an_encoder_checkpoint_loads_into_the_classifier_as_vits_does(tmp_path):
    """The same weights reported missing (the new head; with 5.9, whose renaming leaves out an encoder's
    weights when a classifier loads them, the encoder's too) and unexpected (the pooler) as for ViT."""
    torch.manual_seed(0)
    SARViTModel(SARViTConfig(**TINY)).save_pretrained(tmp_path / "sar")
    ViTModel(ViTConfig(**TINY)).save_pretrained(tmp_path / "vit")
    _, info = SARViTForImageClassification.from_pretrained(tmp_path / "sar", output_loading_info=True)
    _, vit_info = ViTForImageClassification.from_pretrained(tmp_path / "vit", output_loading_info=True)
    assert {"classifier.weight", "classifier.bias"} <= info["missing_keys"]
    for key in ("missing_keys", "unexpected_keys"):
        assert info[key] == vit_info[key], key


@pytest.mark.parametrize(
    ("sar_class", "vit_class"),
    [(SARViTForImageClassification, ViTForImageClassification), (SARViTModel, ViTModel)],
    ids=["classifier", "encoder"],
)
def test_sar_and_plain_vit_checkpoints_name_their_weights_alike_and_load_into_each_other(
    tmp_path, sar_class, vit_class
):
    """Transformers 5 renamed ViT's weights and converts between the old names (which it still
    writes, and which checkpoints on the Hub have) and the new ones; SAR checkpoints follow suit."""
    torch.manual_seed(0)
    vit_class(ViTConfig(**TINY)).save_pretrained(tmp_path / "vit")
    sar_class(SARViTConfig(**TINY)).save_pretrained(tmp_path / "sar")
    names = [safetensors.torch.load_file(tmp_path / name / "model.safetensors").keys() for name in ("vit", "sar")]
    assert sorted(names[0]) == sorted(names[1])
    for folder, model_class in ((tmp_path / "vit", sar_class), (tmp_path / "sar", vit_class)):
        _, info = model_class.from_pretrained(folder, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], (folder.name, info)


def test_plain_vit_loads_a_standard_sar_checkpoint_with_identical_logits(tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path)
    plain, info = ViTForImageClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert type(plain) is ViTForImageClassification
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert torch.equal(plain.eval()(pixels()).logits, model(pixels()).logits)


def test_plain_vit_cannot_reproduce_a_no_skip_no_norm_checkpoint(tmp_path):
    """Behaviour, documented: a plain ViT *loads* a no-skip checkpoint without an error, but its
    last block has the residual and the LayerNorm that the checkpoint was trained without. The
    LayerNorm's weights are reported missing (and newly initialised) in the loading info, which is
    the signal to watch for; the logits differ."""
    model = make_model(sar_no_skip_no_norm=True)
    model.save_pretrained(tmp_path)
    plain, info = ViTForImageClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert set(info["missing_keys"]) == {"vit.layers.1.layernorm_after.weight", "vit.layers.1.layernorm_after.bias"}
    assert not info["unexpected_keys"]
    assert not torch.allclose(plain.eval()(pixels()).logits, model(pixels()).logits, atol=1e-3)


def test_sar_model_from_a_plain_vit_checkpoint(tmp_path):
    torch.manual_seed(0)
    plain = ViTForImageClassification(ViTConfig(**TINY)).eval()
    plain.save_pretrained(tmp_path)

    # The recommended start says nothing about a `vit` config instantiating a `sar-vit` model.
    with CaptureLogger(configuration_utils.logger) as log:
        model, info = SARViTForImageClassification.from_pretrained(tmp_path, sar_weight=0.05, output_loading_info=True)
    assert "to instantiate a model of type" not in log.out
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert isinstance(model.config, SARViTConfig) and model.config.sar_weight == 0.05
    plain_state = plain.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, plain_state[name]), name
    assert torch.equal(model.eval()(pixels()).logits, plain(pixels()).logits)

    model.save_pretrained(tmp_path / "sar")  # saved again, it is a SAR checkpoint
    assert type(AutoModelForImageClassification.from_pretrained(tmp_path / "sar")) is SARViTForImageClassification


@pytest.mark.parametrize("override", [{"sar_weight": -1.0}, {"sar_layer": 2}])
def test_bad_overrides_in_from_pretrained_are_value_errors(tmp_path, override):
    make_model().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=next(iter(override))):
        SARViTForImageClassification.from_pretrained(tmp_path, **override)


def test_model_tags():
    assert {"sar", "spatial-entropy"} <= set(make_model().model_tags)


def test_sar_trainer_model_card(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    callback = SARCallback(sar_weight=0.02, warmup_epochs=3, granularity="step")
    trainer = SARTrainer(model=make_model(sar_no_skip_no_norm=True), args=args, callbacks=[callback])
    trainer.create_model_card(model_name="tiny-sar", tags="my-tag")
    card = (tmp_path / "README.md").read_text()

    header = card.split("---")[1]  # the YAML metadata
    assert "library_name: transformers" in header
    for tag in ("sar", "spatial-entropy", "my-tag"):
        assert f"- {tag}\n" in header, tag
    assert "https://arxiv.org/abs/2206.04636" in card
    assert "peak λ (`sar_weight`): 0.02" in card
    assert "- λ schedule: linear warm-up over 3 epochs, then cosine decay to 0 (λ updated per step)\n" in card
    assert "- `sar_layer`: 0" in card
    assert "- `sar_no_skip_no_norm`: True" in card
    assert sar_hf.__name__ in card


def test_model_card_before_training_gives_the_models_peak_weight(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    SARTrainer(model=make_model(), args=args).create_model_card()
    assert "peak λ (`sar_weight`): 0.05" in (tmp_path / "README.md").read_text()
