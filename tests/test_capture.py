"""`CLSScoreCapture` and `SpatialEntropyLoss` on every supported ViT-family classifier.

References are independent of the package: each model's eager-attention twin (same weights,
`output_attentions=True`) gives the [CLS] row of the attention probabilities, whose log equals
the captured pre-softmax scores up to one constant per row; the loss is recomputed from those
log-probabilities in float64 with `scipy.ndimage.label`, map by map. Bias tables, class, register
and distillation tokens are randomised so that a capture that left them out would be caught.
"""

import copy
import re
import sys

import pytest
import torch
from references import assert_equal_up_to_row_constants, eager_cls_log_probs, eager_twin, reference_entropy
from tiny import TINY
from transformers import (
    BeitConfig,
    BeitForImageClassification,
    CLIPConfig,
    CLIPForImageClassification,
    ConvNextConfig,
    ConvNextForImageClassification,
    Data2VecVisionConfig,
    Data2VecVisionForImageClassification,
    DeiTConfig,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    Dinov2Config,
    Dinov2ForImageClassification,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersForImageClassification,
    IJepaConfig,
    IJepaForImageClassification,
    SiglipConfig,
    SiglipForImageClassification,
    SwinConfig,
    SwinForImageClassification,
    ViTConfig,
    ViTForImageClassification,
    ViTMAEConfig,
    ViTMAEModel,
    ViTModel,
    ViTMSNConfig,
    ViTMSNForImageClassification,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from sar_hf import CLSScoreCapture, SARViTConfig, SARViTForImageClassification, SpatialEntropyLoss

SIZES = {k: TINY[k] for k in ("image_size", "patch_size", "hidden_size", "num_hidden_layers", "num_attention_heads")}
VISION = {**SIZES, "intermediate_size": 37, "initializer_range": 0.2}
TEXT = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 37}
BATCH, HEIGHT, WIDTH = 3, 16, 24  # a 4x6 patch grid: rows and columns cannot be swapped unnoticed

# name -> (build, extra tokens before the patches besides [CLS], forward kwargs for non-square images)
MODELS = {
    "vit": (
        lambda: ViTForImageClassification(ViTConfig(**VISION, num_labels=3)),
        0,
        {"interpolate_pos_encoding": True},
    ),
    "deit": (
        lambda: DeiTForImageClassification(DeiTConfig(**VISION, num_labels=3)),
        1,
        {"interpolate_pos_encoding": True},
    ),
    "deit-teacher": (
        lambda: DeiTForImageClassificationWithTeacher(DeiTConfig(**VISION, num_labels=3)),
        1,
        {"interpolate_pos_encoding": True},
    ),
    "dinov2": (lambda: Dinov2ForImageClassification(Dinov2Config(**SIZES, mlp_ratio=1, num_labels=3)), 0, {}),
    "dinov2-registers": (
        lambda: Dinov2WithRegistersForImageClassification(
            Dinov2WithRegistersConfig(**SIZES, mlp_ratio=1, num_register_tokens=4, num_labels=3)
        ),
        4,
        {},
    ),
    "beit": (
        lambda: BeitForImageClassification(
            BeitConfig(**VISION, use_relative_position_bias=True, drop_path_rate=0.0, num_labels=3)
        ),
        0,
        {"interpolate_pos_encoding": True},
    ),
    "beit-shared-bias": (
        lambda: BeitForImageClassification(
            BeitConfig(**VISION, use_shared_relative_position_bias=True, drop_path_rate=0.0, num_labels=3)
        ),
        0,
        {"interpolate_pos_encoding": True},
    ),
    "vit-msn": (
        lambda: ViTMSNForImageClassification(ViTMSNConfig(**VISION, num_labels=3)),
        0,
        {"interpolate_pos_encoding": True},
    ),
    "clip": (
        lambda: CLIPForImageClassification(CLIPConfig(vision_config=VISION, text_config=TEXT, num_labels=3)),
        0,
        {"interpolate_pos_encoding": True},
    ),
}


# DeiT's teacher class computes no loss: the capture serves it (for pictures), the loss refuses it.
LOSS_MODELS = sorted(set(MODELS) - {"deit-teacher"})


def build(name: str, seed: int = 0):
    """The model of `name` with random weights, bias tables and special tokens, in eval mode."""
    torch.manual_seed(seed)
    model = MODELS[name][0]().eval()
    with torch.no_grad():
        for parameter_name, parameter in model.named_parameters():
            if any(key in parameter_name for key in ("bias_table", "token", "class_embedding", "lambda")):
                parameter.normal_(0, 1)
    return model


def pixels(seed: int = 1, height: int = HEIGHT, width: int = WIDTH) -> torch.Tensor:
    return torch.randn(BATCH, 3, height, width, generator=torch.Generator().manual_seed(seed))


# -- the captured scores, the loss and the kernel, for every model ------------------------------


@pytest.mark.parametrize("layer", [-1, 0])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_captured_scores_are_the_eager_log_probabilities_up_to_a_row_constant(name, layer):
    model = build(name)
    twin = eager_twin(model)
    capture = CLSScoreCapture(model, layer)
    pixel_values, kwargs = pixels(), MODELS[name][2]
    with torch.no_grad():
        model(pixel_values, **kwargs)
    scores, grid_size, training = capture.pop()
    assert grid_size == (HEIGHT // 4, WIDTH // 4) and not training
    assert_equal_up_to_row_constants(scores, eager_cls_log_probs(twin, pixel_values, layer, 24, **kwargs))
    # The other layer's maps differ: the test can tell the layers apart.
    other = eager_cls_log_probs(twin, pixel_values, 1 - layer % 2, 24, **kwargs)
    assert (scores.double() - other).std(-1).max() > 1e-2


@pytest.mark.parametrize("name", sorted(MODELS))
def test_several_layers_are_captured_in_one_pass(name):
    """A capture of layers [1, 0] gives each layer's scores in that order, from one SDPA pass, beside
    a single-layer capture of layer 1 on the same pass (the two marks never meet)."""
    model = build(name)
    twin = eager_twin(model)
    every = CLSScoreCapture(model, [1, 0])
    pixel_values, kwargs = pixels(), MODELS[name][2]
    with torch.no_grad():
        model(pixel_values, **kwargs)
    scores, grid_size, training = every.pop()
    assert scores.shape == (BATCH, 2, 4, 24) and grid_size == (HEIGHT // 4, WIDTH // 4) and not training
    for position, layer in enumerate([1, 0]):
        expected = eager_cls_log_probs(twin, pixel_values, layer, 24, **kwargs)
        assert_equal_up_to_row_constants(scores[:, position], expected)
    assert every.modules == (every.modules[0], every.modules[1]) and every.modules[0] is not every.modules[1]
    with pytest.raises(AttributeError, match="several layers has `modules`"):
        _ = every.module
    every.remove()
    one = CLSScoreCapture(model, -1)  # every mark was removed: the layers are free again
    assert one.module is every.modules[0]


def test_several_layers_must_be_distinct_free_and_in_range():
    model = build("deit")
    for layers in ([0, -2], []):
        with pytest.raises(ValueError, match="`layer` must name distinct layers"):
            CLSScoreCapture(model, layers)
    with pytest.raises(ValueError, match="must index one of the 2 layers"):
        CLSScoreCapture(model, [0, 2])
    SpatialEntropyLoss(model)  # captures the last layer
    with pytest.raises(ValueError, match="Layer -1 of DeiTForImageClassification is already captured"):
        CLSScoreCapture(model, [0, -1])
    first = CLSScoreCapture(model, [0])
    with torch.no_grad():
        model(pixels(), interpolate_pos_encoding=True)
    assert first.pop().scores.shape == (BATCH, 1, 4, 24)  # a list of one layer keeps the layer axis
    assert model.sar_loss.capture.pop().scores.shape == (BATCH, 4, 24)


@pytest.mark.parametrize("name", LOSS_MODELS)
def test_the_loss_equals_a_float64_reference_on_the_eager_maps(name):
    model = build(name)
    twin = eager_twin(model)
    loss_fn = SpatialEntropyLoss(model, sar_weight=0.5)
    pixel_values, kwargs = pixels(), MODELS[name][2]
    with torch.no_grad():
        model(pixel_values, **kwargs)
        _, entropy, skipped = loss_fn.penalty()
    reference = reference_entropy(eager_cls_log_probs(twin, pixel_values, -1, 24, **kwargs), (4, 6))
    assert entropy.item() == pytest.approx(reference, abs=1e-5) and skipped.item() == 0


@pytest.mark.parametrize("name", LOSS_MODELS)
def test_every_layer_keeps_sdpa_and_the_loss_trains_the_regularised_layer(name, monkeypatch):
    model = build(name).train()
    loss_fn = SpatialEntropyLoss(model, sar_weight=1.0)
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting_sdpa(query, *args, **kwargs):
        calls.append(query.shape)
        return sdpa(query, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting_sdpa)
    model(pixels(), **MODELS[name][2])
    penalty, _, _ = loss_fn.penalty()
    assert len(calls) == 2  # both layers, through SDPA, in the forward pass alone
    penalty.backward()
    attention = loss_fn.capture.module
    # Transformers 5.9's DINOv2 still names its projections `query` and `key`.
    for projection in (
        getattr(attention, "q_proj", None) or attention.query,
        getattr(attention, "k_proj", None) or attention.key,
    ):
        assert projection.weight.grad.abs().sum() > 0


# -- models the capture refuses, with the reason ---------------------------------------------------


@pytest.mark.parametrize(
    ("build_refused", "reason"),
    [
        (lambda: SwinForImageClassification(SwinConfig(embed_dim=16, depths=[1], num_heads=[2])), "windows"),
        (
            lambda: ConvNextForImageClassification(ConvNextConfig(num_stages=1, hidden_sizes=[8], depths=[1])),
            "no attention",
        ),
        (lambda: IJepaForImageClassification(IJepaConfig(**VISION)), r"no \[CLS\] token"),
        (
            lambda: SiglipForImageClassification(SiglipConfig(vision_config=VISION, text_config=TEXT)),
            r"no \[CLS\] token",
        ),
        (lambda: ViTMAEModel(ViTMAEConfig(**VISION)), "shuffles its patches"),
        (lambda: Data2VecVisionForImageClassification(Data2VecVisionConfig(**VISION)), "registry"),
    ],
    ids=["swin", "convnext", "ijepa", "siglip", "vit-mae", "data2vec-vision"],
)
def test_unsupported_models_are_refused_with_the_reason(build_refused, reason):
    model = build_refused()
    with pytest.raises(ValueError, match=rf"^{type(model).__name__}\b.*{reason}"):  # the class, then why
        CLSScoreCapture(model)  # which SpatialEntropyLoss builds


@pytest.mark.parametrize(
    ("build_refused", "instead"),
    [
        (lambda: DeiTForImageClassificationWithTeacher(DeiTConfig(**VISION)), "DeiTForImageClassification"),
        (lambda: ViTModel(ViTConfig(**VISION)), "ViTForImageClassification"),
    ],
    ids=["deit-teacher", "vit-encoder"],
)
def test_a_model_that_computes_no_loss_is_refused_naming_the_class_to_use(build_refused, instead):
    model = build_refused()
    message = rf"^{type(model).__name__} computes no loss \(its forward takes no `labels`\).* as {instead}, which"
    with pytest.raises(ValueError, match=message):
        SpatialEntropyLoss(model)
    assert not hasattr(model, "sar_loss")
    CLSScoreCapture(model)  # refused before anything was attached: the layer is free


def test_a_model_that_computes_no_loss_and_has_no_classifier_class_is_refused_without_advice():
    # CLIP's vision tower: its config has no image-classification class to suggest.
    from transformers import CLIPVisionConfig, CLIPVisionModel

    model = CLIPVisionModel(CLIPVisionConfig(**VISION))
    message = (
        r'^CLIPVisionModel computes no loss \(its forward takes no `labels`\).*"The model did not return a loss"\.$'
    )
    with pytest.raises(ValueError, match=message):
        SpatialEntropyLoss(model)


def test_a_model_whose_parameters_sit_at_the_top_level_is_refused_the_same_way():
    class Pooling(torch.nn.Module):  # attention settings, no [CLS] token, a parameter name without a dot
        def __init__(self):
            super().__init__()
            self.config = ViTConfig(**VISION)
            self.scale = torch.nn.Parameter(torch.ones(1))

    with pytest.raises(ValueError, match=r"^Pooling has no \[CLS\] token"):
        CLSScoreCapture(Pooling())


def test_layer_out_of_range_and_a_second_capture_are_value_errors():
    model = build("deit")
    with pytest.raises(ValueError, match="must index one of the 2 layers"):
        SpatialEntropyLoss(model, sar_layer=2)
    SpatialEntropyLoss(model)
    with pytest.raises(ValueError, match="already captured"):
        CLSScoreCapture(model)


# -- eager attention ----------------------------------------------------------------------------------


def test_eager_attention_is_captured_before_its_dropout():
    """Eager attention (here with attention dropout 0.1, in training) gives layer 0 the same scores
    as SDPA in eval mode: they are taken from q and k, before the softmax and its dropout."""
    model = build("deit")
    eager = eager_twin(model).train()
    for module in eager.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.1
    sdpa_scores, eager_scores = (SpatialEntropyLoss(m, sar_layer=0).capture for m in (model, eager))
    pixel_values = pixels()
    with torch.no_grad():
        model(pixel_values, interpolate_pos_encoding=True)
        eager(pixel_values, interpolate_pos_encoding=True)
    scores, _, _ = sdpa_scores.pop()
    captured, _, training = eager_scores.pop()
    assert training and eager.config._attn_implementation == "eager"
    with torch.no_grad():  # the dropout is on: two passes differ
        assert not torch.equal(*(eager(pixel_values, interpolate_pos_encoding=True).logits for _ in range(2)))
    torch.testing.assert_close(captured, scores, rtol=1e-5, atol=1e-5)


# -- PEFT ----------------------------------------------------------------------------------------


def test_lora_adapters_are_in_the_scores_and_get_the_gradient():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = SARViTForImageClassification(SARViTConfig(**TINY, sar_weight=1.0))
    lora = peft.LoraConfig(
        target_modules=["q_proj", "k_proj", "v_proj"], modules_to_save=["classifier"], init_lora_weights=False
    )
    model = peft.get_peft_model(base, lora).train()
    pixel_values, labels = pixels(height=16, width=16), torch.tensor([0, 1, 2])
    out = model(pixel_values=pixel_values, labels=labels)

    merged = copy.deepcopy(model).merge_and_unload()  # the adapters folded into plain Linear weights
    plain = ViTForImageClassification(ViTConfig(**TINY, attn_implementation="eager"))
    plain.load_state_dict(merged.state_dict())
    reference = reference_entropy(eager_cls_log_probs(plain.train(), pixel_values, -1, 16), (4, 4))
    assert out.spatial_entropy.item() == pytest.approx(reference, abs=1e-5)
    # Without the adapters' delta the entropy differs: the test sees whether they were captured.
    with model.disable_adapter(), torch.no_grad():
        without = model(pixel_values=pixel_values, labels=labels).spatial_entropy
    assert abs(without.item() - reference) > 1e-3

    model.zero_grad()
    out.spatial_entropy.backward()
    attention = base.vit.layers[-1].attention
    for projection in (attention.q_proj, attention.k_proj):
        assert projection.lora_A["default"].weight.grad.abs().sum() > 0
        assert projection.lora_B["default"].weight.grad.abs().sum() > 0
    assert base.vit.layers[-1].attention.q_proj.base_layer.weight.grad is None  # frozen by PEFT


def test_a_capture_of_a_peft_model_sits_on_its_base_model():
    # So it keeps working when the base model is called by itself, as after `merge_and_unload()`.
    peft = pytest.importorskip("peft")
    base = build("deit")
    capture = CLSScoreCapture(peft.get_peft_model(base, peft.LoraConfig(target_modules=["q_proj"])))
    pixel_values = pixels()
    with torch.no_grad():
        base(pixel_values, interpolate_pos_encoding=True)
    scores, grid_size, _ = capture.pop()
    assert grid_size == (4, 6)
    assert_equal_up_to_row_constants(
        scores, eager_cls_log_probs(eager_twin(base), pixel_values, -1, 24, interpolate_pos_encoding=True)
    )


# -- the guard: a training pass that needs its term must use its scores before its backward ------------

THREE_WAYS = r"call the model with `labels`.*`Trainer\(compute_loss_func=...\)`.*`sar_hf.SARTrainer`"


def guarded(name: str, weight: float = 0.5):
    """A model in training mode with its SAR loss: DeiT with `SpatialEntropyLoss`, or the SAR ViT."""
    if name == "sar-vit":
        torch.manual_seed(0)
        return SARViTForImageClassification(SARViTConfig(**TINY, sar_weight=weight)).train()
    model = build(name).train()
    SpatialEntropyLoss(model, sar_weight=weight)
    return model


def own_loss(model, pixel_values=None) -> torch.Tensor:
    """What a loop of one's own does: the model without labels, then its own cross-entropy."""
    pixel_values = pixels(height=16, width=16) if pixel_values is None else pixel_values
    logits = model(pixel_values=pixel_values).logits
    return torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2]))


@pytest.mark.parametrize("checkpointing", [None, "reentrant", "non-reentrant"])
@pytest.mark.parametrize("name", ["deit", "sar-vit", "lora"])
def test_a_backward_without_the_term_is_an_error_naming_the_three_ways(name, checkpointing):
    if name == "lora":
        peft = pytest.importorskip("peft")
        model = peft.get_peft_model(guarded("deit"), peft.LoraConfig(target_modules=["q_proj", "k_proj"])).train()
    else:
        model = guarded(name)
    if checkpointing is not None:
        model.gradient_checkpointing_enable({"use_reentrant": checkpointing == "reentrant"})
        if name == "lora":  # reentrant checkpointing of a frozen base needs inputs with a gradient
            model.enable_input_require_grads()
    loss = own_loss(model)
    with pytest.raises(RuntimeError, match=rf"never used.*λ = 0.5.*{THREE_WAYS}"):
        loss.backward()
    # It stops before backward reaches any weight: nothing was computed for an optimizer to apply.
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name", ["deit", "sar-vit"])
def test_the_guard_holds_for_tuple_outputs(name):
    # `return_dict=False`: the output is a tuple, whose logits are the tensor the guard hooks.
    model = guarded(name)
    logits = model(pixel_values=pixels(height=16, width=16), return_dict=False)[0]
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2]))
    with pytest.raises(RuntimeError, match=rf"never used.*λ = 0.5.*{THREE_WAYS}"):
        loss.backward()


def test_the_guard_hooks_the_output_itself_when_a_model_returns_one_tensor():
    from sar_hf.capture import _first_grad_tensor

    logits = torch.zeros(2, 3, requires_grad=True)
    assert _first_grad_tensor(logits) is logits
    assert _first_grad_tensor((torch.zeros(2), logits)) is logits
    assert _first_grad_tensor(torch.zeros(2, 3)) is None


def test_an_accelerate_loop_without_the_term_is_an_error_and_takes_no_step():
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = guarded("deit")
    before = [p.detach().clone() for p in model.parameters()]
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(RuntimeError, match=THREE_WAYS):
        accelerator.backward(own_loss(model))
        optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize("name", ["deit", "sar-vit"])
def test_each_way_of_applying_the_term_passes_the_guard(name):
    model = guarded(name)
    pixel_values, labels = pixels(height=16, width=16), torch.tensor([0, 1, 2])
    model(pixel_values=pixel_values, labels=labels).loss.backward()  # the model adds the term
    model.sar_loss(model(pixel_values=pixel_values), labels).backward()  # the loss as compute_loss_func
    (own_loss(model) + model.sar_loss.penalty(labels)[0]).backward()  # one's own loss plus the term
    assert model.sar_loss.capture.module.q_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["deit", "sar-vit"])
def test_evaluation_no_grad_and_a_zero_weight_never_trip_the_guard(name):
    model = guarded(name)
    own_loss(model.eval()).backward()  # evaluation mode, even with gradients
    with torch.no_grad():
        own_loss(model.train())
    model.sar_loss.scheduled_sar_weight = 0.0  # as the warm-up's first step
    own_loss(model).backward()
    model.sar_loss.scheduled_sar_weight = None
    zero = guarded(name, weight=0.0)
    own_loss(zero).backward()
    bare = build("vit").train()  # a capture of one's own guards nothing
    CLSScoreCapture(bare)
    own_loss(bare).backward()


def test_discarding_the_scores_lets_a_backward_go_without_the_term_on_purpose():
    # Input gradients (an adversarial example, say) of a model in training mode.
    model = guarded("deit")
    pixel_values = pixels(height=16, width=16).requires_grad_()
    loss = own_loss(model, pixel_values)
    model.sar_loss.capture.pop()  # these scores are not wanted
    (gradient,) = torch.autograd.grad(loss, pixel_values)
    assert gradient.abs().sum() > 0


def test_a_pass_replaced_by_a_later_one_before_its_backward_is_caught():
    # Two passes, one backward: the first pass's scores were overwritten unused by the second's.
    model = guarded("deit")
    pixel_values, labels = pixels(height=16, width=16), torch.tensor([0, 1, 2])
    dropped = own_loss(model, pixel_values)
    used = model(pixel_values=pixel_values, labels=labels).loss
    with pytest.raises(RuntimeError, match=THREE_WAYS):
        (dropped + used).backward()
    # The other way round, each pass used its own scores.
    model.zero_grad()
    used = model(pixel_values=pixel_values, labels=labels).loss
    (used + model.sar_loss(model(pixel_values=pixel_values), labels)).backward()


def test_a_deep_copy_of_the_model_is_guarded_by_its_own_weight():
    model = guarded("deit")
    twin = copy.deepcopy(model)
    twin.sar_loss.scheduled_sar_weight = 0.0
    own_loss(twin).backward()  # λ = 0 for the copy: nothing to guard
    with pytest.raises(RuntimeError, match=THREE_WAYS):
        own_loss(model).backward()


def test_a_failed_pass_is_not_guarded_and_the_next_one_is():
    model = guarded("deit")
    handle = model.classifier.register_forward_hook(lambda *args: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        own_loss(model)
    handle.remove()
    with pytest.raises(RuntimeError, match=THREE_WAYS):
        own_loss(model).backward()


# -- gradient checkpointing and torch.compile ---------------------------------------------------------


def test_non_reentrant_gradient_checkpointing_gives_identical_losses_and_gradients():
    def loss_and_gradients(checkpointing: bool):
        model = build("deit").train()
        loss_fn = SpatialEntropyLoss(model, sar_weight=1.0)
        if checkpointing:
            model.gradient_checkpointing_enable({"use_reentrant": False})
        labels = torch.tensor([0, 1, 2])
        outputs = model(pixels(height=16, width=16))
        loss = loss_fn(outputs, labels)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    (loss, gradients), (checkpointed, checkpointed_gradients) = loss_and_gradients(False), loss_and_gradients(True)
    assert torch.equal(loss, checkpointed)
    assert gradients.keys() == checkpointed_gradients.keys()
    for name in gradients:
        torch.testing.assert_close(checkpointed_gradients[name], gradients[name], rtol=1e-6, atol=1e-7)


def test_torch_compile_of_the_model_trains():
    torch.manual_seed(0)
    model = SARViTForImageClassification(SARViTConfig(**TINY, sar_weight=1.0)).train()
    compiled = torch.compile(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.vit.layers[-1].attention.q_proj.weight.detach().clone()
    pixel_values, labels = pixels(height=16, width=16), torch.tensor([0, 1, 2])
    for _ in range(2):
        out = compiled(pixel_values=pixel_values, labels=labels)
        assert torch.isfinite(out.loss) and out.spatial_entropy > 0
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    assert not torch.equal(model.vit.layers[-1].attention.q_proj.weight, before)
    eager_loss = model(pixel_values=pixel_values, labels=labels).loss
    torch.testing.assert_close(
        compiled(pixel_values=pixel_values, labels=labels).loss, eager_loss, rtol=1e-5, atol=1e-5
    )


def test_torch_compile_of_a_forward_without_labels_then_sar_loss():
    # Trainer(torch_compile=True, compute_loss_func=model.sar_loss): the compiled forward gets no labels, so its
    # scores are still pending when it ends; the guard stays out of the graph, and the loss matches eager.
    torch.manual_seed(0)
    model = SARViTForImageClassification(SARViTConfig(**TINY, sar_weight=1.0)).train()
    compiled = torch.compile(model)  # as Trainer compiles it
    pixel_values, labels = pixels(height=16, width=16), torch.tensor([0, 1, 2])
    loss = model.sar_loss(compiled(pixel_values=pixel_values), labels)
    loss.backward()
    grad = model.vit.layers[-1].attention.q_proj.weight.grad.clone()
    model.zero_grad()
    eager = model.sar_loss(model(pixel_values=pixel_values), labels)
    eager.backward()
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, model.vit.layers[-1].attention.q_proj.weight.grad, rtol=1e-4, atol=1e-6)


# -- FSDP ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["sar-vit", "deit"])
def test_fully_sharded_models_give_the_unsharded_loss_and_gradient(tmp_path, model):
    """Two gloo ranks shard the model with FSDP2 (`fully_shard`): the capture still finds its layer,
    each rank's loss is the unsharded model's, and the gradient is the ranks' mean."""
    from pathlib import Path

    from ranks import run_two_ranks

    ranks = run_two_ranks(Path(__file__).with_name("fsdp_worker.py"), tmp_path, {"model": model})
    for rank in ranks:
        assert rank["sharded"]["module"].startswith("FSDP")  # really sharded
        assert rank["sharded"]["loss"] == pytest.approx(rank["unsharded"]["loss"], abs=1e-6)
    mean = (torch.tensor(ranks[0]["unsharded"]["grad"]) + torch.tensor(ranks[1]["unsharded"]["grad"])) / 2
    assert mean.abs().sum() > 0
    for rank in ranks:
        torch.testing.assert_close(torch.tensor(rank["sharded"]["grad"]), mean, rtol=1e-5, atol=1e-6)


# -- the capture's own edges (pinned by mutation testing, issue 12) -----------------------------------


def test_pop_before_any_forward_and_after_remove_finds_nothing():
    model = build("deit")
    first = CLSScoreCapture(model)
    assert first.pop() is None and not first.pending
    first.remove()
    first.remove()  # a second remove is harmless
    with torch.no_grad():
        model(pixels(), interpolate_pos_encoding=True)
    assert first.pop() is None  # detached: the pass was not seen
    second = CLSScoreCapture(model)  # the layer is free again
    first.remove()  # removing twice leaves the new capture's mark alone
    with pytest.raises(ValueError, match="already captured"):
        CLSScoreCapture(model)
    with torch.no_grad():
        model(pixels(), interpolate_pos_encoding=True)
    assert second.pending and second.pop().scores.shape == (BATCH, 4, 24)


@pytest.mark.parametrize(("layer", "index"), [(1, 1), (-2, 0), (0, 0), (-1, 1)])
def test_each_layer_index_captures_that_encoder_layer(layer, index):
    model = build("deit")
    capture = CLSScoreCapture(model, layer)
    assert any(module is capture.module for module in model.deit.layers[index].modules())


def test_a_kernel_called_without_scaling_gets_sdpas_default():
    """SDPA scales by 1/sqrt(head_dim) when it gets no `scaling`; the captured scores must too."""
    model = build("deit")
    twin = eager_twin(model)
    loss_fn = SpatialEntropyLoss(model)
    loss_fn.capture.module.scaling = None  # the model's SDPA call now passes scaling=None
    assert_captured_like_eager_at_24_patches(model, loss_fn, twin)


@pytest.mark.parametrize("tokens", [6, 4])  # 4: as many tokens as query heads
def test_grouped_keys_and_boolean_masks_give_the_hand_scores(tokens):
    """Grouped keys (two key heads for four query heads) and a boolean mask (True = attend), as the
    registry's kernels may receive them; the reference repeats the keys by indexing and adds -inf by hand."""
    from sar_hf.capture import _cls_scores

    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, 4, tokens, 8, generator=generator)  # [B, heads, 1 + patches, d]
    key = torch.randn(2, 2, tokens, 8, generator=generator)  # two key heads
    mask = torch.rand(2, 1, tokens, tokens, generator=generator) > 0.3
    scores = _cls_scores(query[:, :, :1], key, mask, 0.5, num_patches=tokens - 1)
    expanded = key[:, [0, 0, 1, 1]]  # query heads 0, 1 share key head 0; 2, 3 share key head 1
    expected = torch.einsum("bhd,bhnd->bhn", query[:, :, 0], expanded[:, :, 1:]) * 0.5
    expected = torch.where(mask[:, :, 0, 1:], expected, torch.tensor(float("-inf")))
    torch.testing.assert_close(scores, expected)


def test_keys_without_a_cls_token_are_refused():
    from sar_hf.capture import _check_tokens

    _check_tokens(17, 16)
    with pytest.raises(ValueError, match="do not match the patch grid"):
        _check_tokens(16, 16)


def test_the_wrapped_kernel_hands_over_a_mask_given_by_keyword():
    from sar_hf.capture import _MARK, _capturing

    seen = []

    class Recorder:
        def record(self, module, query, key, mask, scaling):
            seen.append((mask, scaling))

    module = torch.nn.Module()
    setattr(module, _MARK, Recorder())
    kernel = _capturing(lambda module, query, key, value, *args, **kwargs: "out")
    mask = torch.zeros(1, 1, 3, 3)
    assert kernel(module, None, None, None, attention_mask=mask, scaling=0.25) == "out"
    assert kernel(module, None, None, None, mask) == "out"
    assert seen[0][0] is mask and seen[0][1] == 0.25 and seen[1][0] is mask and seen[1][1] is None
    assert kernel(torch.nn.Module(), None, None, None, mask) == "out" and len(seen) == 2  # unmarked module


@pytest.mark.parametrize("shape", [(3, 16, 24), (1, 3, 1, 16, 24), None])
def test_pixel_values_that_are_not_a_batch_of_images_are_a_value_error(shape):
    model = build("deit")
    CLSScoreCapture(model)
    # The message names the shape it got (None for no tensor at all).
    message = f"[batch, channels, height, width] to find the patch grid, got {shape}."
    with pytest.raises(ValueError, match=re.escape(message)):
        model(None if shape is None else torch.randn(*shape), interpolate_pos_encoding=True)


def test_a_patch_size_given_as_a_pair_sets_the_grid():
    # Non-square patches on non-square images: 16x24 pixels in 2x4 patches are an 8x6 grid.
    config = ViTConfig(**{**VISION, "image_size": (16, 24), "patch_size": (2, 4)}, num_labels=3)
    model = ViTForImageClassification(config).eval()
    capture = CLSScoreCapture(model)
    pixel_values = pixels()
    with torch.no_grad():
        model(pixel_values)
    scores, grid_size, _ = capture.pop()
    assert grid_size == (8, 6)
    assert_equal_up_to_row_constants(scores, eager_cls_log_probs(eager_twin(model), pixel_values, -1, 48))


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_the_kernel_is_wrapped_once_however_many_passes(implementation):
    model = build("deit")
    model.set_attn_implementation(implementation)
    capture = CLSScoreCapture(model)
    with torch.no_grad():
        for _ in range(3):
            model(pixels(), interpolate_pos_encoding=True)
    if implementation == "eager":  # the modeling file's own function, which the registry falls back to
        kernel = sys.modules[type(capture.module).__module__].eager_attention_forward
    else:
        kernel = ALL_ATTENTION_FUNCTIONS[implementation]
    assert hasattr(kernel, "sar_wraps") and not hasattr(kernel.sar_wraps, "sar_wraps")


def test_a_failed_forward_pass_stops_recording():
    # The pass ends even when it raises: a later call of the layer outside a forward pass (as a
    # gradient-checkpointing replay is) must not replace the scores that the pass recorded.
    model = build("deit")
    capture = CLSScoreCapture(model)
    pixel_values = pixels()
    handle = model.classifier.register_forward_hook(lambda *args: 1 / 0)
    with torch.no_grad(), pytest.raises(ZeroDivisionError):
        model(pixel_values, interpolate_pos_encoding=True)
    handle.remove()
    assert capture.pending
    with torch.no_grad():
        capture.module(torch.randn(BATCH, 10, VISION["hidden_size"]))
    scores, _, _ = capture.pop()
    assert_equal_up_to_row_constants(
        scores, eager_cls_log_probs(eager_twin(model), pixel_values, -1, 24, interpolate_pos_encoding=True)
    )


def test_a_first_training_pass_refused_before_it_starts_raises_only_its_own_error():
    # The pass's end hook runs even when its start refused the images, before there is any pass to guard.
    import warnings

    model = guarded("deit")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="Images of 18x24 pixels do not tile into 4x4 patches"):
            model(pixels(height=18, width=24), interpolate_pos_encoding=True)


@pytest.mark.parametrize(("height", "width"), [(18, 24), (16, 22)])
def test_images_that_do_not_tile_into_patches_are_a_value_error(height, width):
    model = build("deit")
    CLSScoreCapture(model)
    with pytest.raises(ValueError, match=f"Images of {height}x{width} pixels do not tile into 4x4 patches"):
        model(pixels(height=height, width=width), interpolate_pos_encoding=True)


def test_a_layer_that_bypasses_the_registry_is_a_runtime_error(monkeypatch):
    model = build("deit")
    capture = CLSScoreCapture(model)
    with torch.no_grad():
        model(pixels(), interpolate_pos_encoding=True)  # a pass that records; its scores are left unpopped
    # The marked layer now attends by itself (as a custom attention class would): nothing is recorded.
    monkeypatch.setattr(capture.module, "forward", lambda hidden_states, *args, **kwargs: (hidden_states, None))
    with torch.no_grad():
        model(pixels(), interpolate_pos_encoding=True)
    with pytest.raises(RuntimeError, match="without passing through the attention-function registry"):
        capture.pop()


def test_an_eager_layer_from_a_file_without_the_eager_function_runs_and_pop_says_why_there_are_no_scores(monkeypatch):
    # An attention class from elsewhere (remote code) that attends eagerly by itself, in a file with no
    # `eager_attention_forward` to wrap: the forward pass runs, and `pop` explains the missing scores.
    model = build("deit")
    model.set_attn_implementation("eager")
    capture = CLSScoreCapture(model)
    monkeypatch.setattr(type(capture.module), "__module__", __name__)  # this file has no eager_attention_forward
    monkeypatch.setattr(capture.module, "forward", lambda hidden_states, *args, **kwargs: (hidden_states, None))
    with torch.no_grad():
        assert torch.isfinite(model(pixels(), interpolate_pos_encoding=True).logits).all()
    with pytest.raises(RuntimeError, match="without passing through the attention-function registry or its"):
        capture.pop()


def test_a_layer_with_its_own_scaling_is_captured_with_it():
    model = build("deit")
    loss_fn = SpatialEntropyLoss(model)
    loss_fn.capture.module.scaling = 0.3  # not 1/sqrt(head_dim); the eager twin copies it
    twin = eager_twin(model)
    assert_captured_like_eager_at_24_patches(model, loss_fn, twin)


def assert_captured_like_eager_at_24_patches(model, loss_fn, twin):
    """One no-grad pass on `pixels()` at an interpolated size (24 patches): the captured scores against the
    eager twin's [CLS] log-probabilities, equal up to a constant per row."""
    pixel_values = pixels()
    with torch.no_grad():
        model(pixel_values, interpolate_pos_encoding=True)
    scores, _, _ = loss_fn.capture.pop()
    assert_equal_up_to_row_constants(
        scores, eager_cls_log_probs(twin, pixel_values, -1, 24, interpolate_pos_encoding=True)
    )
