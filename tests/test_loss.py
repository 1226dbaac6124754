"""`SpatialEntropyLoss`, the generic path: any classifier with eager attention maps.

References are computed here from each model's own `q_proj`/`k_proj` weights applied by hand to
the input of the regularised layer's attention, leaving out the tokens before the patches
([CLS], DeiT's distillation token, DINOv2's registers) by hand.
"""

import pytest
import torch
import torch.nn.functional as F
import transformers
from tiny import TINY, TinyImages
from transformers import (
    BeitConfig,
    BeitForImageClassification,
    ConvNextConfig,
    ConvNextForImageClassification,
    DeiTConfig,
    DeiTForImageClassification,
    SwinConfig,
    SwinForImageClassification,
    Trainer,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
)

from sar_hf import SARCallback, SARViTConfig, SARViTForImageClassification, SpatialEntropyLoss, spatial_entropy

EAGER = {"attn_implementation": "eager", "output_attentions": True}
GRID = (4, 4)
BATCH = 3


def batch(seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(BATCH, 3, 16, 16, generator=generator)
    labels = torch.randint(0, 3, (BATCH,), generator=generator)
    return pixel_values, labels


def hand_scores(model, attention_module, pixel_values, prefix_tokens: int) -> torch.Tensor:
    """(q_cls · k_j) / sqrt(d) for the patch tokens j, from the attention's input: [B, heads, n]."""
    seen = {}
    handle = attention_module.register_forward_pre_hook(lambda module, args: seen.setdefault("x", args[0]))
    model(pixel_values)
    handle.remove()
    x = seen["x"]
    heads, d = 4, 8
    # Transformers renamed the projections over time (`attention.query` -> `q_proj`).
    inner = getattr(attention_module, "attention", attention_module)
    q_proj = getattr(attention_module, "q_proj", None) or inner.query
    k_proj = getattr(attention_module, "k_proj", None) or inner.key
    q = q_proj(x)[:, 0].reshape(BATCH, heads, d)
    k = k_proj(x)[:, prefix_tokens:].reshape(BATCH, -1, heads, d)
    return (q.unsqueeze(1) * k).sum(-1).transpose(1, 2) / d**0.5


def entropy_seen_by(loss_fn, model, pixel_values, labels, weight=0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, the spatial-entropy term recovered from it) of one training-mode call."""
    loss_fn.sar_weight = weight
    out = model(pixel_values)
    loss = loss_fn(out, labels)
    return loss, (loss - F.cross_entropy(out.logits, labels)) / weight


# -- agreement with the fast path --------------------------------------------------------------


@pytest.mark.parametrize("sar_layer", [-1, 0])
def test_plain_eager_vit_matches_the_fast_path(sar_layer):
    torch.manual_seed(0)
    fast = SARViTForImageClassification(SARViTConfig(**TINY, sar_weight=0.5, sar_layer=sar_layer)).train()
    plain = ViTForImageClassification(ViTConfig(**TINY, **EAGER)).train()
    plain.load_state_dict(fast.state_dict())
    loss_fn = SpatialEntropyLoss(plain, sar_weight=0.5, sar_layer=sar_layer)
    pixel_values, labels = batch()

    expected = fast(pixel_values, labels=labels)
    loss, _ = entropy_seen_by(loss_fn, plain, pixel_values, labels)
    logged = loss_fn.sar_stats.pop(training=True)
    assert logged["entropy"] == pytest.approx(expected.spatial_entropy.item(), abs=1e-5)
    assert logged["ce_loss"] == pytest.approx(expected.ce_loss.item(), abs=1e-6)
    assert logged["skipped_maps"] == 0
    torch.testing.assert_close(loss, expected.loss, rtol=0, atol=1e-5)


# -- other ViT-family models -------------------------------------------------------------------


def deit():
    model = DeiTForImageClassification(DeiTConfig(**TINY, **EAGER))
    return model, model.deit.layers[-1].attention, 2  # [CLS], distillation token


def dinov2_with_registers():
    config = transformers.Dinov2WithRegistersConfig(**TINY, num_register_tokens=3, **EAGER)
    model = transformers.Dinov2WithRegistersForImageClassification(config)
    return model, model.dinov2_with_registers.encoder.layer[-1].attention, 1 + 3  # [CLS], registers


def beit():
    model = BeitForImageClassification(BeitConfig(**TINY, **EAGER))
    return model, model.beit.layers[-1].attention, 1


MODELS = [deit, beit]
if hasattr(transformers, "Dinov2WithRegistersForImageClassification"):
    MODELS.append(dinov2_with_registers)


@pytest.mark.parametrize("build", MODELS, ids=lambda build: build.__name__)
def test_vit_family_models_against_hand_computed_scores(build):
    torch.manual_seed(0)
    model, attention, prefix = build()
    model.train()
    loss_fn = SpatialEntropyLoss(model)
    assert loss_fn.num_prefix_tokens == prefix
    pixel_values, labels = batch()
    with torch.no_grad():
        reference = spatial_entropy(hand_scores(model, attention, pixel_values, prefix), GRID)
        loss, entropy = entropy_seen_by(loss_fn, model, pixel_values, labels)
    assert reference.item() > 0
    torch.testing.assert_close(entropy, reference, rtol=0, atol=1e-5)
    assert loss_fn.sar_stats.pop(training=True)["entropy"] == pytest.approx(reference.item(), abs=1e-5)
    if prefix > 1:  # counting one prefix token fewer would read it as the first patch: it shows
        shifted = hand_scores(model, attention, pixel_values, prefix - 1)[..., :-1]
        assert abs(spatial_entropy(shifted, GRID).item() - reference.item()) > 1e-4


def test_evaluation_returns_the_cross_entropy_and_logs_apart():
    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(**TINY, **EAGER)).eval()
    loss_fn = SpatialEntropyLoss(model, sar_weight=0.5)
    pixel_values, labels = batch()
    out = model(pixel_values)
    torch.testing.assert_close(loss_fn(out, labels), F.cross_entropy(out.logits, labels))
    assert loss_fn.sar_stats.pop(training=True) is None
    assert loss_fn.sar_stats.pop(training=False)["entropy"] > 0


# -- what it refuses ---------------------------------------------------------------------------


def swin():
    config = SwinConfig(image_size=16, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[2, 2], window_size=2)
    return SwinForImageClassification(config)


def convnext():
    return ConvNextForImageClassification(
        ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
    )


@pytest.mark.parametrize("build", [swin, convnext], ids=lambda build: build.__name__)
def test_windowed_and_convolutional_models_are_refused_with_the_reason(build):
    with pytest.raises(ValueError, match=r"no global attention from a \[CLS\] token to a patch grid"):
        SpatialEntropyLoss(build())


@pytest.mark.parametrize(
    "config_kwargs",
    [{"attn_implementation": "sdpa", "output_attentions": False}, {"attn_implementation": "eager"}],
    ids=["sdpa", "no-output-attentions"],
)
def test_models_without_attention_maps_are_refused_naming_eager(config_kwargs):
    model = ViTForImageClassification(ViTConfig(**TINY, **config_kwargs))
    with pytest.raises(ValueError, match=r'attn_implementation="eager", output_attentions=True'):
        SpatialEntropyLoss(model)


def test_outputs_without_attentions_are_refused_naming_eager():
    model = ViTForImageClassification(ViTConfig(**TINY, **EAGER))
    loss_fn = SpatialEntropyLoss(model)
    pixel_values, labels = batch()
    out = model(pixel_values, output_attentions=False)
    with pytest.raises(ValueError, match=r'attn_implementation="eager", output_attentions=True'):
        loss_fn(out, labels)


@pytest.mark.parametrize(("kwargs", "match"), [({"sar_weight": -1.0}, "sar_weight"), ({"sar_layer": 2}, "sar_layer")])
def test_bad_settings_are_value_errors(kwargs, match):
    model = ViTForImageClassification(ViTConfig(**TINY, **EAGER))
    with pytest.raises(ValueError, match=match):
        SpatialEntropyLoss(model, **kwargs)


# -- inside Trainer ----------------------------------------------------------------------------


def test_as_compute_loss_func_in_trainer(tmp_path):
    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(**TINY, **EAGER))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    loss_fn = SpatialEntropyLoss(model, sar_weight=0.05)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        num_train_epochs=2,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    callback = SARCallback(schedule="constant", loss_fn=loss_fn)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=TinyImages(),
        eval_dataset=TinyImages(4, seed=1),
        compute_loss_func=loss_fn,
        callbacks=[callback],
    )
    trainer.train()
    metrics = trainer.evaluate()

    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 4
    for entry in logs:
        assert entry["sar/weight"] == 0.05
        assert entry["sar/entropy"] > 0 and entry["sar/skipped_maps"] == 0
        # The logged loss is the training loss: cross-entropy plus the weighted entropy.
        assert entry["loss"] == pytest.approx(entry["sar/ce_loss"] + 0.05 * entry["sar/entropy"], abs=1e-5)
    assert metrics["eval_sar/entropy"] > 0
    assert any(not torch.equal(before[name], p) for name, p in model.named_parameters() if "q_proj" in name)
