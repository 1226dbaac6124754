"""`SpatialEntropyLoss`: the term on top of each cross-entropy, against hand computations.

The cross-entropy is computed here from the logits by hand (log-softmax and a gather), the
spatial entropy from the eager twin's attention maps in float64 (`references.py`). DeiT (with a
distillation token) on 16x24 images (a 4x6 grid) stands for the generic path.
"""

import math
import re

import pytest
import torch
from references import eager_cls_log_probs, eager_twin, reference_entropy
from tiny import TINY
from transformers import DeiTConfig, DeiTForImageClassification

from sar_hf import SpatialEntropyLoss

BATCH, CLASSES, GRID = 3, 3, (4, 6)
WEIGHT = 0.5


def deit(seed: int = 0) -> DeiTForImageClassification:
    torch.manual_seed(seed)
    return DeiTForImageClassification(DeiTConfig(**TINY)).train()


def batch(seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(BATCH, 3, 16, 24, generator=generator)
    labels = torch.randint(0, CLASSES, (BATCH,), generator=generator)
    return pixel_values, labels


def reference_terms(model, pixel_values, labels):
    """(per-image cross-entropies [B] by hand, the float64 spatial entropy) of a twin with `model`'s weights."""
    twin = eager_twin(model)
    logits = twin(pixel_values, interpolate_pos_encoding=True).logits.detach().double()
    nll = -logits.log_softmax(-1).gather(1, labels[:, None]).squeeze(1)
    log_probs = eager_cls_log_probs(twin, pixel_values, -1, GRID[0] * GRID[1], interpolate_pos_encoding=True)
    return nll, reference_entropy(log_probs, GRID)


def test_the_models_own_loss_gets_the_term():
    model = deit()
    SpatialEntropyLoss(model, sar_weight=WEIGHT)
    pixel_values, labels = batch()
    nll, entropy = reference_terms(model, pixel_values, labels)
    out = model(pixel_values, labels=labels, interpolate_pos_encoding=True)
    assert out.loss.item() == pytest.approx(nll.mean().item() + WEIGHT * entropy, abs=1e-5)
    logged = model.sar_loss.sar_stats.pop(training=True)  # the model's cross-entropy, logged apart
    assert logged["ce_loss"] == pytest.approx(nll.mean().item(), abs=1e-5)


def test_gradient_accumulation_normalises_both_terms_over_the_accumulated_batch():
    """With Trainer's `num_items_in_batch` (here 10 items, this batch holding 3), the cross-entropy is
    a sum over 10 and the entropy (a mean over this batch's maps) counts for 3/10 of the step."""
    model = deit()
    loss_fn = SpatialEntropyLoss(model, sar_weight=WEIGHT)
    pixel_values, labels = batch()
    nll, entropy = reference_terms(model, pixel_values, labels)
    loss = loss_fn(model(pixel_values, interpolate_pos_encoding=True), labels, num_items_in_batch=torch.tensor(10))
    assert loss.item() == pytest.approx(nll.sum().item() / 10 + WEIGHT * entropy * BATCH / 10, abs=1e-5)
    # The model-path hook scales the same way.
    out = model(pixel_values, labels=labels, interpolate_pos_encoding=True, num_items_in_batch=torch.tensor(10))
    assert out.loss.item() == pytest.approx(loss.item(), abs=1e-6)


def test_ignored_labels_and_soft_targets_are_counted_as_trainer_counts_them():
    model = deit()
    loss_fn = SpatialEntropyLoss(model, sar_weight=WEIGHT)
    pixel_values, labels = batch()
    nll, entropy = reference_terms(model, pixel_values, labels)
    ignored = labels.clone()
    ignored[0] = -100  # Trainer counts 2 items here, of 8 in the accumulated batch
    loss = loss_fn(model(pixel_values, interpolate_pos_encoding=True), ignored, num_items_in_batch=8)
    assert loss.item() == pytest.approx(nll[1:].sum().item() / 8 + WEIGHT * entropy * 2 / 8, abs=1e-5)

    soft = torch.nn.functional.one_hot(labels, CLASSES).float() * 0.7 + 0.1  # rows sum to 1
    twin_logits = eager_twin(model)(pixel_values, interpolate_pos_encoding=True).logits.detach().double()
    soft_nll = -(soft.double() * twin_logits.log_softmax(-1)).sum(-1)
    # Trainer counts every element of [B, classes] soft targets: B·classes here, twice that accumulated.
    loss = loss_fn(model(pixel_values, interpolate_pos_encoding=True), soft, num_items_in_batch=2 * BATCH * CLASSES)
    assert loss.item() == pytest.approx(soft_nll.sum().item() / (2 * BATCH) + WEIGHT * entropy / 2, abs=1e-5)
    loss = loss_fn(model(pixel_values, interpolate_pos_encoding=True), soft)
    assert loss.item() == pytest.approx(soft_nll.mean().item() + WEIGHT * entropy, abs=1e-5)


def test_the_term_is_added_once_per_forward_pass():
    model = deit()
    loss_fn = SpatialEntropyLoss(model, sar_weight=WEIGHT)
    pixel_values, labels = batch()
    out = model(pixel_values, labels=labels, interpolate_pos_encoding=True)  # the hook used the scores
    assert loss_fn.penalty(labels) is None
    with pytest.raises(RuntimeError, match="No \\[CLS\\] scores were captured"):
        loss_fn(out, labels)


def test_evaluation_adds_nothing_and_logs_apart():
    model = deit().eval()
    loss_fn = SpatialEntropyLoss(model, sar_weight=WEIGHT)
    pixel_values, labels = batch()
    nll, entropy = reference_terms(model, pixel_values, labels)
    loss = loss_fn(model(pixel_values, interpolate_pos_encoding=True), labels)
    assert loss.item() == pytest.approx(nll.mean().item(), abs=1e-5)
    assert loss_fn.sar_stats.pop(training=True) is None
    loss_fn.sar_stats.count_evaluation_pass()  # as SARCallback does at each of Trainer's prediction steps
    assert loss_fn.sar_stats.pop(training=False)["entropy"] == pytest.approx(entropy, abs=1e-5)


def test_a_scheduled_weight_overrides_the_configured_one():
    model = deit()
    loss_fn = SpatialEntropyLoss(model, sar_weight=WEIGHT)
    pixel_values, labels = batch()
    nll, entropy = reference_terms(model, pixel_values, labels)
    loss_fn.scheduled_sar_weight = 0.0
    assert loss_fn(model(pixel_values, interpolate_pos_encoding=True), labels).item() == pytest.approx(
        nll.mean().item(), abs=1e-5
    )
    loss_fn.scheduled_sar_weight = 2.0
    assert loss_fn(model(pixel_values, interpolate_pos_encoding=True), labels).item() == pytest.approx(
        nll.mean().item() + 2.0 * entropy, abs=1e-5
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sar_weight": -1.0}, "sar_weight"),
        ({"sar_weight": float("nan")}, "sar_weight"),
        ({"sar_weight": float("inf")}, "sar_weight"),
        ({"sar_weight": True}, "sar_weight"),
        ({"sar_layer": True}, "sar_layer"),
        ({"sar_layer": -3}, "sar_layer"),
        ({"sar_weight": None}, "reads `config.sar_weight`, which DeiTForImageClassification lacks"),
        ({"sar_layer": 2}, "sar_layer"),
    ],
)
def test_bad_settings_are_value_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SpatialEntropyLoss(deit(), **kwargs)


@pytest.mark.parametrize("weight", [-1.0, math.nan, math.inf])
@pytest.mark.parametrize("where", ["loss", "schedule", "config"])
def test_a_bad_weight_is_a_value_error_when_training_reads_it_wherever_it_was_set(where, weight):
    from sar_hf import SARViTConfig, SARViTForImageClassification

    pixel_values, labels = batch()
    if where == "config":  # the SAR ViT reads `config.sar_weight` at every step
        model = SARViTForImageClassification(SARViTConfig(**TINY)).train()
        model.config.sar_weight = weight
    else:
        model = deit()
        SpatialEntropyLoss(model, sar_weight=WEIGHT)
        setattr(model.sar_loss, "sar_weight" if where == "loss" else "scheduled_sar_weight", weight)
    with torch.no_grad():  # evaluation reads no λ
        model.eval()(pixel_values, labels=labels, interpolate_pos_encoding=True)
    model.train()
    with pytest.raises(ValueError, match=r"`sar_weight` must be a finite number >= 0"):
        model(pixel_values, labels=labels, interpolate_pos_encoding=True)  # the term joins the model's loss
    with pytest.raises(ValueError, match=r"`sar_weight` must be a finite number >= 0"):
        model(pixel_values, interpolate_pos_encoding=True)  # the guard reads λ at the end of the pass


# -- edges pinned by mutation testing (issue 12) -----------------------------------------------------


def test_a_zero_weight_is_valid_and_adds_nothing():
    model = deit()
    loss_fn = SpatialEntropyLoss(model, sar_weight=0.0)
    pixel_values, labels = batch()
    nll, entropy = reference_terms(model, pixel_values, labels)
    loss = loss_fn(model(pixel_values, interpolate_pos_encoding=True), labels)
    assert loss.item() == pytest.approx(nll.mean().item(), abs=1e-5)
    # The entropy is still logged, computed without a graph since it trains nothing.
    assert loss_fn.sar_stats.pop(training=True)["entropy"] == pytest.approx(entropy, abs=1e-5)
    model(pixel_values, interpolate_pos_encoding=True)
    _, logged, _ = loss_fn.penalty(labels)
    assert not logged.requires_grad


def test_setting_sar_weight_changes_the_term():
    model = deit()
    loss_fn = SpatialEntropyLoss(model, sar_weight=WEIGHT)
    loss_fn.sar_weight = 2.0
    assert loss_fn.sar_weight == 2.0
    pixel_values, labels = batch()
    nll, entropy = reference_terms(model, pixel_values, labels)
    loss = loss_fn(model(pixel_values, interpolate_pos_encoding=True), labels)
    assert loss.item() == pytest.approx(nll.mean().item() + 2.0 * entropy, abs=1e-5)


def test_the_logged_cross_entropy_is_the_batch_mean_under_accumulation():
    """The cross-entropy in the logs is this batch's mean whatever Trainer normalises the loss by."""
    model = deit()
    loss_fn = SpatialEntropyLoss(model, sar_weight=WEIGHT)
    pixel_values, labels = batch()
    nll, entropy = reference_terms(model, pixel_values, labels)
    loss_fn(model(pixel_values, interpolate_pos_encoding=True), labels, num_items_in_batch=torch.tensor(10))
    logged = loss_fn.sar_stats.pop(training=True)
    assert logged["ce_loss"] == pytest.approx(nll.mean().item(), abs=1e-5)
    assert logged["entropy"] == pytest.approx(entropy, abs=1e-5)


def test_tuple_outputs_get_the_term():
    model = deit()
    SpatialEntropyLoss(model, sar_weight=WEIGHT)
    pixel_values, labels = batch()
    nll, entropy = reference_terms(model, pixel_values, labels)
    loss, logits, *_ = model(pixel_values, labels=labels, interpolate_pos_encoding=True, return_dict=False)
    assert loss.item() == pytest.approx(nll.mean().item() + WEIGHT * entropy, abs=1e-5)
    twin_logits = eager_twin(model)(pixel_values, interpolate_pos_encoding=True).logits
    torch.testing.assert_close(logits, twin_logits, rtol=1e-5, atol=1e-5)


def test_scores_without_a_gradient_in_training_are_warned_about(monkeypatch):
    import sar_hf.loss

    warnings = []
    monkeypatch.setattr(sar_hf.loss.logger, "warning_once", lambda message: warnings.append(message))
    model = deit()
    loss_fn = SpatialEntropyLoss(model, sar_weight=WEIGHT)
    pixel_values, labels = batch()
    model(pixel_values, interpolate_pos_encoding=True)
    loss_fn.penalty(labels)  # scores with their gradient: nothing to say
    with torch.no_grad():  # no gradient wanted: nothing to say either
        model(pixel_values, interpolate_pos_encoding=True)
        loss_fn.penalty(labels)
    loss_fn.scheduled_sar_weight = 0.0  # λ = 0 trains nothing
    model.requires_grad_(False)
    model(pixel_values, interpolate_pos_encoding=True)
    loss_fn.penalty(labels)
    assert warnings == []
    loss_fn.scheduled_sar_weight = None
    model(pixel_values, interpolate_pos_encoding=True)  # frozen weights: the scores carry no gradient
    loss_fn.penalty(labels)
    assert len(warnings) == 1 and "no gradient" in warnings[0]
    # It recommends a training argument of the installed Transformers that is not a deprecated alias.
    from transformers import TrainingArguments

    argument = re.search(r"TrainingArguments\((\w+)=\{'use_reentrant': False\}\)", warnings[0]).group(1)
    assert "deprecated" not in TrainingArguments.__dataclass_fields__[argument].metadata["help"].lower()


def test_soft_targets_are_counted_per_class_with_fewer_images_than_classes():
    model = deit()
    loss_fn = SpatialEntropyLoss(model, sar_weight=WEIGHT)
    pixel_values, labels = batch()
    pixel_values, labels = pixel_values[:2], labels[:2]  # 2 images, 3 classes
    soft = torch.nn.functional.one_hot(labels, CLASSES).float() * 0.7 + 0.1
    twin = eager_twin(model)
    twin_logits = twin(pixel_values, interpolate_pos_encoding=True).logits.detach().double()
    soft_nll = -(soft.double() * twin_logits.log_softmax(-1)).sum(-1)
    log_probs = eager_cls_log_probs(twin, pixel_values, -1, GRID[0] * GRID[1], interpolate_pos_encoding=True)
    entropy = reference_entropy(log_probs, GRID)
    # Trainer counts 2·3 elements here, 4·3 in the accumulated batch.
    loss = loss_fn(model(pixel_values, interpolate_pos_encoding=True), soft, num_items_in_batch=4 * CLASSES)
    assert loss.item() == pytest.approx(soft_nll.sum().item() / 4 + WEIGHT * entropy / 2, abs=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="labels on the host and a model on a GPU")
def test_labels_follow_the_logits_to_their_device():
    model = deit().cuda()
    loss_fn = SpatialEntropyLoss(model, sar_weight=WEIGHT)
    pixel_values, labels = batch()
    nll, entropy = reference_terms(model.cpu(), pixel_values, labels)
    model.cuda()
    loss = loss_fn(model(pixel_values.cuda(), interpolate_pos_encoding=True), labels)
    assert loss.item() == pytest.approx(nll.mean().item() + WEIGHT * entropy, abs=1e-4)


def test_labels_follow_the_logits_to_any_device(monkeypatch):
    # The meta device stands in for a GPU: host labels must reach the cross-entropy on the logits' device.
    devices = []
    cross_entropy = torch.nn.functional.cross_entropy

    def recording(logits, labels, **kwargs):
        devices.append(labels.device.type)
        return cross_entropy(logits, labels, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", recording)
    loss_fn = SpatialEntropyLoss(deit(), sar_weight=WEIGHT)
    with pytest.raises(RuntimeError, match=r"No \[CLS\] scores were captured"):  # made-up outputs
        loss_fn({"logits": torch.randn(3, 4, device="meta")}, torch.tensor([0, 1, 2]))
    assert devices == ["meta"]


def test_a_peft_model_gets_the_loss_on_its_base_model():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(deit(), peft.LoraConfig(target_modules=["q_proj", "k_proj"]))
    loss_fn = SpatialEntropyLoss(model, sar_weight=WEIGHT)
    assert model.get_base_model().sar_loss is loss_fn


def test_the_default_weight_is_the_papers_and_the_layer_is_kept():
    assert SpatialEntropyLoss(deit()).sar_weight == 0.01
    assert SpatialEntropyLoss(deit(), sar_layer=0).sar_layer == 0
