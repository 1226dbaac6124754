"""`SARViTForImageClassification` (the fast path) against plain ViTs with the same weights.

The references are computed here, not by the package: the [CLS] row of an eager-attention ViT's
attention probabilities (`output_attentions=True`), or the pre-softmax scores from the layer's own
`q_proj`/`k_proj` applied by hand. Only `sar_hf.spatial_entropy` (tested on its own elsewhere)
is shared. Weights are drawn with `initializer_range=0.2` so that the scores spread over O(1)
and no patch sits within rounding error of the mean.
"""

import copy
import inspect

import pytest
import torch
import torch.nn.functional as F
from tiny import TINY
from transformers import ViTConfig, ViTForImageClassification
from transformers.models.vit import modeling_vit

from sar_hf import SARViTConfig, SARViTForImageClassification, spatial_entropy
from sar_hf.modeling_sar_vit import SARImageClassifierOutput

GRID = (4, 4)
BATCH = 3


def make_model(seed: int = 0, **settings) -> SARViTForImageClassification:
    torch.manual_seed(seed)
    return SARViTForImageClassification(SARViTConfig(**TINY, **settings))


def plain_twin(model, **config_kwargs) -> ViTForImageClassification:
    """A plain ViT with the same architecture settings and weights as `model`."""
    plain = ViTForImageClassification(ViTConfig(**TINY, **config_kwargs))
    plain.load_state_dict(model.state_dict())
    return plain.train(model.training)


def batch(seed: int = 1, height: int = 16, width: int = 16):
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(BATCH, 3, height, width, generator=generator)
    labels = torch.randint(0, TINY["num_labels"], (BATCH,), generator=generator)
    return pixel_values, labels


def eager_cls_log_probs(model, pixel_values, layer=-1, **forward_kwargs) -> torch.Tensor:
    """log of the [CLS]-to-patch attention probabilities of an eager plain ViT: [B, heads, gh*gw]."""
    eager = plain_twin(model, attn_implementation="eager", output_attentions=True)
    attentions = eager(pixel_values, **forward_kwargs).attentions
    assert attentions[layer].shape[-1] == attentions[layer].shape[-2]  # a real N×N map
    return attentions[layer][:, :, 0, 1:].log()


def hand_cls_scores(model, pixel_values, layer=-1) -> torch.Tensor:
    """Pre-softmax (q_cls · k_j) / sqrt(d) over patches j, from the layer's input and weights by hand."""
    plain = plain_twin(model)
    block = plain.vit.layers[layer]
    seen = {}
    handle = block.register_forward_pre_hook(lambda module, args: seen.setdefault("input", args[0]))
    plain(pixel_values)
    handle.remove()
    hidden = block.layernorm_before(seen["input"])
    heads, d = TINY["num_attention_heads"], TINY["hidden_size"] // TINY["num_attention_heads"]
    q = block.attention.q_proj(hidden)[:, 0].reshape(BATCH, heads, d)
    k = block.attention.k_proj(hidden)[:, 1:].reshape(BATCH, -1, heads, d)
    return (q.unsqueeze(1) * k).sum(-1).transpose(1, 2) / d**0.5


# -- outputs -----------------------------------------------------------------------------------


def test_output_fields():
    model = make_model().train()
    pixel_values, labels = batch()
    out = model(pixel_values, labels=labels)
    assert isinstance(out, SARImageClassifierOutput)
    assert out.logits.shape == (BATCH, TINY["num_labels"])
    assert out.ce_loss.shape == out.spatial_entropy.shape == out.loss.shape == ()
    assert out.spatial_entropy.dtype == torch.float32
    assert out.skipped_maps.dtype == torch.int64 and out.skipped_maps.item() == 0
    torch.testing.assert_close(out.ce_loss, F.cross_entropy(out.logits, labels), rtol=0, atol=1e-6)
    assert 0 < out.spatial_entropy.item() < torch.log(torch.tensor(16.0)).item()  # at most 16 regions
    assert out.attentions is None  # nothing N×N is returned either


@pytest.mark.parametrize("sar_layer", [-1, 1, 0, -2])
def test_entropy_matches_eager_attention_reference(sar_layer):
    model = make_model(sar_layer=sar_layer).train()
    pixel_values, labels = batch()
    out = model(pixel_values, labels=labels)
    layer = model.config.sar_layer_index
    reference = spatial_entropy(eager_cls_log_probs(model, pixel_values, layer), GRID)
    torch.testing.assert_close(out.spatial_entropy, reference, rtol=0, atol=1e-5)
    # The other layer's maps give another entropy: the test can tell the layers apart.
    other = spatial_entropy(eager_cls_log_probs(model, pixel_values, 1 - layer), GRID)
    assert abs(other.item() - out.spatial_entropy.item()) > 1e-3


@pytest.mark.parametrize("sar_layer", [-1, 0])
def test_captured_scores_are_the_pre_softmax_scores(sar_layer):
    model = make_model(sar_layer=sar_layer).eval()
    pixel_values, _ = batch()
    with torch.no_grad():
        model(pixel_values)
        scores, grid, _ = model.sar_loss.capture.pop()
        reference = hand_cls_scores(model, pixel_values, sar_layer)
    assert grid == GRID
    torch.testing.assert_close(scores, reference, rtol=1e-5, atol=1e-5)


# -- the loss ----------------------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_zero_weight_is_exactly_plain_vit(training):
    model = make_model(sar_weight=0).train(training)
    plain = plain_twin(model)
    pixel_values, labels = batch()
    out, ref = model(pixel_values, labels=labels), plain(pixel_values, labels=labels)
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=1e-6)
    assert out.spatial_entropy is not None  # still reported
    out.loss.backward()
    ref.loss.backward()
    for (name, ours), theirs in zip(model.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("weight", [0.01, 0.5])
def test_training_loss_adds_the_weighted_entropy(weight):
    model = make_model(sar_weight=weight).train()
    pixel_values, labels = batch()
    out = model(pixel_values, labels=labels)
    torch.testing.assert_close(out.loss, out.ce_loss + weight * out.spatial_entropy, rtol=0, atol=1e-6)
    assert out.spatial_entropy.item() > 0  # so the two sides really differ from ce_loss alone
    assert out.spatial_entropy.requires_grad


def test_evaluation_loss_is_the_cross_entropy_and_entropy_has_no_graph():
    model = make_model(sar_weight=0.5).eval()
    pixel_values, labels = batch()
    out = model(pixel_values, labels=labels)
    assert torch.equal(out.loss, out.ce_loss)
    assert out.spatial_entropy.item() > 0
    assert not out.spatial_entropy.requires_grad


def test_entropy_gradient_reaches_the_regularised_projections_and_matches_eager():
    model = make_model(sar_weight=0.5).train()
    pixel_values, labels = batch()
    out = model(pixel_values, labels=labels)
    (out.loss - out.ce_loss).backward()  # only the entropy term

    eager = plain_twin(model, attn_implementation="eager", output_attentions=True)
    log_probs = eager(pixel_values).attentions[-1][:, :, 0, 1:].log()
    (0.5 * spatial_entropy(log_probs, GRID)).backward()

    last = model.vit.layers[-1].attention
    for name in ("q_proj", "k_proj"):
        grad = getattr(last, name).weight.grad
        assert grad is not None and grad.abs().sum() > 0, name
        reference = getattr(eager.vit.layers[-1].attention, name).weight.grad
        torch.testing.assert_close(grad, reference, rtol=1e-3, atol=1e-6, msg=name)
    # The entropy does not depend on the values nor on the classifier.
    assert last.v_proj.weight.grad is None or last.v_proj.weight.grad.abs().sum() == 0
    assert model.classifier.weight.grad is None or model.classifier.weight.grad.abs().sum() == 0


def test_entropy_of_the_first_layer_leaves_later_layers_alone():
    model = make_model(sar_layer=0).train()
    pixel_values, labels = batch()
    model(pixel_values, labels=labels).spatial_entropy.backward()
    assert model.vit.layers[0].attention.q_proj.weight.grad.abs().sum() > 0
    assert model.vit.layers[0].attention.k_proj.weight.grad.abs().sum() > 0
    later = model.vit.layers[1].attention.q_proj.weight.grad
    assert later is None or later.abs().sum() == 0


def test_num_items_in_batch_scales_both_terms_like_trainer_expects():
    model = make_model(sar_weight=0.3).train()
    pixel_values, labels = batch()
    plain_out = model(pixel_values, labels=labels)
    model.sar_loss.sar_stats.pop(training=True)
    num_items = torch.tensor(10)
    out = model(pixel_values, labels=labels, num_items_in_batch=num_items)
    ce_sum = F.cross_entropy(out.logits, labels, reduction="sum")
    expected = ce_sum / 10 + 0.3 * plain_out.spatial_entropy * BATCH / 10
    torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=1e-6)
    # The logged cross-entropy is still the batch mean.
    logged = model.sar_loss.sar_stats.pop(training=True)
    assert logged["ce_loss"] == pytest.approx(plain_out.ce_loss.item(), abs=1e-5)
    assert logged["entropy"] == pytest.approx(plain_out.spatial_entropy.item(), abs=1e-6)


def test_without_labels_no_sar_fields_and_the_same_logits():
    model = make_model().train()
    pixel_values, labels = batch()
    with_labels = model(pixel_values, labels=labels)
    model.sar_loss.sar_stats.pop(training=True)
    out = model(pixel_values)
    assert out.loss is None and out.ce_loss is None and out.spatial_entropy is None and out.skipped_maps is None
    assert torch.equal(out.logits, with_labels.logits)
    assert torch.equal(out.logits, plain_twin(model)(pixel_values).logits)
    assert model.sar_loss.sar_stats.pop(training=True) is None  # no SAR work was done
    # The scores stay captured (views of q and k) for a Trainer that computes the loss itself.
    assert model.sar_loss.capture.pending


# -- the attention kernel ----------------------------------------------------------------------


def test_fast_path_keeps_sdpa_in_every_layer(monkeypatch):
    model = make_model().train()
    assert model.config._attn_implementation == "sdpa"
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting_sdpa(*args, **kwargs):
        calls.append(args[0].shape)
        return sdpa(*args, **kwargs)

    def no_eager(*args, **kwargs):
        raise AssertionError("eager attention was used")

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting_sdpa)
    monkeypatch.setattr(modeling_vit, "eager_attention_forward", no_eager)
    pixel_values, labels = batch()
    out = model(pixel_values, labels=labels)
    out.loss.backward()
    assert len(calls) == TINY["num_hidden_layers"]
    assert model.config._attn_implementation == "sdpa"  # not switched for the loss


# -- image sizes -------------------------------------------------------------------------------


def test_non_square_images_use_the_grid_of_the_input():
    model = make_model().train()
    pixel_values, labels = batch(height=16, width=24)
    out = model(pixel_values, labels=labels, interpolate_pos_encoding=True)
    with torch.no_grad():
        model(pixel_values, interpolate_pos_encoding=True)
        scores, grid, _ = model.sar_loss.capture.pop()
    assert grid == (4, 6) and scores.shape == (BATCH, TINY["num_attention_heads"], 24)
    log_probs = eager_cls_log_probs(model, pixel_values, interpolate_pos_encoding=True)
    torch.testing.assert_close(out.spatial_entropy, spatial_entropy(log_probs, (4, 6)), rtol=0, atol=1e-5)


@pytest.mark.parametrize(("height", "width"), [(18, 16), (16, 15)])
def test_sizes_that_do_not_tile_into_patches_are_a_value_error(height, width):
    model = make_model().train()
    pixel_values, labels = batch(height=height, width=width)
    with pytest.raises(ValueError, match=f"Images of {height}x{width} pixels do not tile into 4x4 patches"):
        model(pixel_values, labels=labels, interpolate_pos_encoding=True)


# -- the "no skip, no norm" block ----------------------------------------------------------------


def test_no_skip_no_norm_block_has_no_layernorm_after_and_matches_a_hand_reference():
    model = make_model(sar_no_skip_no_norm=True).eval()
    names = set(model.state_dict())
    assert not any(name.startswith("vit.layers.1.layernorm_after") for name in names)
    assert "vit.layers.0.layernorm_after.weight" in names  # earlier blocks are unchanged

    pixel_values, labels = batch()
    with torch.no_grad():
        out = model(pixel_values, labels=labels)
        vit = model.vit
        hidden = vit.layers[0](vit.embeddings(pixel_values))  # a standard block
        last = vit.layers[1]
        # The last block by hand: attention on the normalised input, no residual around it ...
        x = F.layer_norm(hidden, (32,), last.layernorm_before.weight, last.layernorm_before.bias, 1e-12)
        att = last.attention
        heads, d = 4, 8

        def split(t):
            return t.reshape(BATCH, -1, heads, d).transpose(1, 2)  # 'b n (h d) -> b h n d'

        q = split(F.linear(x, att.q_proj.weight, att.q_proj.bias))
        k = split(F.linear(x, att.k_proj.weight, att.k_proj.bias))
        v = split(F.linear(x, att.v_proj.weight, att.v_proj.bias))
        mixed = torch.softmax(q @ k.transpose(-1, -2) / d**0.5, dim=-1) @ v
        a = F.linear(mixed.transpose(1, 2).reshape(BATCH, -1, 32), att.o_proj.weight, att.o_proj.bias)
        # ... and the MLP straight on it (no LayerNorm), with its residual.
        mlp = F.linear(
            F.gelu(F.linear(a, last.mlp.fc1.weight, last.mlp.fc1.bias)), last.mlp.fc2.weight, last.mlp.fc2.bias
        )
        y = F.layer_norm(a + mlp, (32,), vit.layernorm.weight, vit.layernorm.bias, 1e-12)
        logits = F.linear(y[:, 0], model.classifier.weight, model.classifier.bias)
    torch.testing.assert_close(out.logits, logits, rtol=1e-5, atol=1e-5)
    # Not the standard block: a standard model with these weights (and a fresh LayerNorm) differs.
    standard = make_model()
    standard.load_state_dict(model.state_dict(), strict=False)
    assert not torch.allclose(standard.eval()(pixel_values).logits, out.logits, atol=1e-3)


@pytest.mark.parametrize("no_skip", [False, True], ids=["standard", "no-skip-no-norm"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(no_skip):
    model = make_model(sar_weight=0.5, sar_no_skip_no_norm=no_skip).train()
    checkpointed = copy.deepcopy(model)
    checkpointed.gradient_checkpointing_enable()
    assert checkpointed.is_gradient_checkpointing
    pixel_values, labels = batch()

    out = model(pixel_values, labels=labels)
    out.loss.backward()
    out_ckpt = checkpointed(pixel_values, labels=labels)
    out_ckpt.loss.backward()

    assert out_ckpt.spatial_entropy.item() > 0
    torch.testing.assert_close(out_ckpt.spatial_entropy, out.spatial_entropy, rtol=0, atol=1e-6)
    torch.testing.assert_close(out_ckpt.loss, out.loss, rtol=0, atol=1e-6)
    q_grad = checkpointed.vit.layers[-1].attention.q_proj.weight.grad
    assert q_grad is not None and q_grad.abs().sum() > 0
    for (name, ours), theirs in zip(checkpointed.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_on_cpu_gives_a_finite_float32_entropy(dtype):
    model = make_model(sar_weight=0.5).train()
    pixel_values, labels = batch()
    with torch.autocast("cpu", dtype=dtype):
        out = model(pixel_values, labels=labels)
    assert out.logits.dtype == dtype  # autocast did run
    assert out.spatial_entropy.dtype == torch.float32
    assert torch.isfinite(out.spatial_entropy) and out.spatial_entropy.item() > 0
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert torch.isfinite(model.vit.layers[-1].attention.q_proj.weight.grad).all()


# -- Transformers' conventions: tuples, the forward's signature --------------------------------


@pytest.mark.parametrize("with_labels", [False, True], ids=["inference", "training"])
def test_return_dict_false_gives_the_outputs_tuple(with_labels):
    # (Only as an argument: plain ViT itself fails with `config.return_dict = False`, in ViTModel.)
    model = make_model(sar_weight=0.5).train()
    pixel_values, labels = batch()
    labels = labels if with_labels else None
    expected = model(pixel_values, labels=labels).to_tuple()
    output = model(pixel_values, labels=labels, return_dict=False)
    # The fields that are not None: loss, logits, ce_loss, spatial_entropy, skipped_maps; or the logits.
    assert type(output) is tuple and len(output) == len(expected) == (5 if with_labels else 1)
    for ours, theirs in zip(output, expected, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_forward_signature_is_vits():
    """Tools read the signature: `Unpack[TransformersKwargs]` says that the model takes (and can
    return) `output_attentions`, `output_hidden_states` and the rest."""
    ours = inspect.signature(SARViTForImageClassification.forward).parameters
    vit = inspect.signature(ViTForImageClassification.forward).parameters
    assert list(ours) == list(vit)
    assert ours["kwargs"].annotation == vit["kwargs"].annotation
    model = make_model(attn_implementation="eager").eval()
    out = model(batch()[0], output_attentions=True, output_hidden_states=True)
    assert len(out.attentions) == len(out.hidden_states) - 1 == TINY["num_hidden_layers"]


# -- torch.export and torch.compile -------------------------------------------------------------


def loss_and_gradients(forward, model, pixel_values, labels):
    """`(loss, {name: gradient})` of one training forward (`forward`: the model, or its exported or compiled
    twin) and backward, read from the parameters of `model`."""
    model.zero_grad()
    loss = forward(pixel_values=pixel_values, labels=labels).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_same_loss_and_gradients(model, twin, twin_parameters):
    """`twin` gives the loss and the gradients (in `twin_parameters`) of `model` in eager mode, within 1e-5."""
    pixel_values, labels = batch()
    loss, gradients = loss_and_gradients(model, model, pixel_values, labels)
    assert loss.item() > 0
    twin_loss, twin_gradients = loss_and_gradients(twin, twin_parameters, pixel_values, labels)
    torch.testing.assert_close(twin_loss, loss, rtol=0, atol=1e-5)
    assert twin_gradients.keys() == gradients.keys()
    for name, gradient in gradients.items():
        torch.testing.assert_close(twin_gradients[name], gradient, rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("no_skip", [False, True], ids=["standard", "no-skip-no-norm"])
def test_torch_export_of_the_training_forward_matches_eager(no_skip):
    model = make_model(sar_weight=0.5, sar_no_skip_no_norm=no_skip).train()
    pixel_values, labels = batch()
    exported = torch.export.export(model, (), {"pixel_values": pixel_values, "labels": labels}).module()
    assert_same_loss_and_gradients(model, exported, exported)  # the same parameter names as the model's


def test_fullgraph_torch_compile_of_the_training_forward_matches_eager():
    model = make_model(sar_weight=0.5).train()
    # aot_eager: Dynamo's single graph and AOTAutograd's forward and backward graphs, without the C++
    # build of the inductor backend (20 s or more on CI's CPU), which gives the same result.
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    assert_same_loss_and_gradients(model, compiled, model)  # the compiled model trains the model's parameters


def test_exporting_leaves_the_running_sar_figures_usable():
    model = make_model(sar_weight=0.5).train()
    pixel_values, labels = batch()
    torch.export.export(model, (), {"pixel_values": pixel_values, "labels": labels})
    out = model(pixel_values=pixel_values, labels=labels)
    assert model.sar_loss.sar_stats.pop(training=True)["entropy"] == pytest.approx(out.spatial_entropy.item())


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_no_skip_no_norm_block_leaves_out_the_tokens_the_attention_mask_masks(attn_implementation):
    """A token that `attention_mask` masks is no key of the last block either: its [CLS] row, by hand from the
    block's input with those keys left out, gives the logits; without the mask they differ."""
    model = make_model(sar_no_skip_no_norm=True, attn_implementation=attn_implementation).eval()
    pixel_values, labels = batch()
    mask = torch.ones(BATCH, 17, dtype=torch.long)
    mask[:, 3:9] = 0  # six patches left out
    last = model.vit.layers[-1]
    seen = {}
    handle = last.register_forward_pre_hook(lambda module, args: seen.update(input=args[0]))  # None: args kept
    with torch.no_grad():
        out = model(pixel_values, labels=labels, attention_mask=mask)
        handle.remove()
        x = F.layer_norm(seen["input"], (32,), last.layernorm_before.weight, last.layernorm_before.bias, 1e-12)
        att, heads, d = last.attention, TINY["num_attention_heads"], 32 // TINY["num_attention_heads"]
        q = F.linear(x[:, :1], att.q_proj.weight, att.q_proj.bias).reshape(BATCH, 1, heads, d).transpose(1, 2)
        k = F.linear(x, att.k_proj.weight, att.k_proj.bias).reshape(BATCH, -1, heads, d).transpose(1, 2)
        v = F.linear(x, att.v_proj.weight, att.v_proj.bias).reshape(BATCH, -1, heads, d).transpose(1, 2)
        scores = (q @ k.transpose(-1, -2) / d**0.5).masked_fill(mask[:, None, None, :] == 0, -torch.inf)
        a = F.linear(
            (scores.softmax(-1) @ v).transpose(1, 2).reshape(BATCH, 1, 32), att.o_proj.weight, att.o_proj.bias
        )
        y = a + last.mlp(a)  # no LayerNorm before the MLP, its residual kept
        y = F.layer_norm(y, (32,), model.vit.layernorm.weight, model.vit.layernorm.bias, 1e-12)
        logits = F.linear(y[:, 0], model.classifier.weight, model.classifier.bias)
        unmasked = model(pixel_values).logits
    torch.testing.assert_close(out.logits, logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(unmasked, logits, atol=1e-3)


@pytest.mark.parametrize("num_labels", [0, 1, 3])
def test_the_head_is_vits_for_every_number_of_labels(num_labels):
    """No labels: the [CLS] features are the logits (ViT's `nn.Identity` head); one label: a regression
    head of one output. Either way the plain ViT with the same weights gives the same logits."""
    torch.manual_seed(0)
    model = SARViTForImageClassification(SARViTConfig(**{**TINY, "num_labels": num_labels})).eval()
    plain = ViTForImageClassification(ViTConfig(**{**TINY, "num_labels": num_labels})).eval()
    plain.load_state_dict(model.state_dict())
    pixel_values, _ = batch()
    with torch.no_grad():
        logits = model(pixel_values).logits
        torch.testing.assert_close(logits, plain(pixel_values).logits)
    assert logits.shape == (BATCH, num_labels or TINY["hidden_size"])
    assert model.num_labels == plain.num_labels == num_labels


def test_the_encoder_takes_vits_mask_token_and_puts_the_authors_block_last():
    """`SARViTModel` passes ViT's options on (`use_mask_token` for masked image modelling), and the authors'
    block replaces the last of three layers, not the second."""
    from transformers import ViTModel
    from transformers.models.vit.modeling_vit import ViTLayer

    from sar_hf import SARViTModel
    from sar_hf.modeling_sar_vit import ViTLayerNoSkipNoNorm

    settings = {**TINY, "num_hidden_layers": 3}
    torch.manual_seed(0)
    model = SARViTModel(SARViTConfig(**settings), use_mask_token=True).eval()
    plain = ViTModel(ViTConfig(**settings), use_mask_token=True).eval()
    plain.load_state_dict(model.state_dict())
    pixel_values, _ = batch()
    masked = torch.zeros(BATCH, 16, dtype=torch.bool)
    masked[:, ::3] = True
    with torch.no_grad():
        out = model(pixel_values, bool_masked_pos=masked).last_hidden_state
        torch.testing.assert_close(out, plain(pixel_values, bool_masked_pos=masked).last_hidden_state)
        assert not torch.allclose(out, model(pixel_values).last_hidden_state, atol=1e-3)

    layers = SARViTModel(SARViTConfig(**settings, sar_no_skip_no_norm=True)).layers
    assert [type(layer) for layer in layers] == [ViTLayer, ViTLayer, ViTLayerNoSkipNoNorm]


def test_no_skip_no_norm_block_hands_the_forwards_attention_arguments_to_its_kernel():
    """Keyword arguments of the forward pass that steer the attention kernel (here SDPA's `is_causal`) reach
    the attention of the authors' last block as they reach ViT's blocks, and change the logits."""
    model = make_model(sar_no_skip_no_norm=True).eval()
    pixel_values, _ = batch()
    seen = []
    handles = [
        layer.attention.register_forward_pre_hook(
            lambda module, args, kwargs: seen.append(kwargs.get("is_causal")), with_kwargs=True
        )
        for layer in model.vit.layers
    ]
    with torch.no_grad():
        out = model(pixel_values, is_causal=True).logits
    for handle in handles:
        handle.remove()
    assert seen == [True, True]  # every block's attention was asked for a causal pass
    assert not torch.allclose(out, model(pixel_values).logits, atol=1e-3)
