"""One capture of the pre-softmax [CLS]-to-patch scores, taken where attention consumes q and k.

Transformers' ViT-family classifiers (ViT, DeiT, DINOv2 with or without registers, BEiT, ViT-MSN,
CLIP's image classifier) look their attention kernel up in the registry `ALL_ATTENTION_FUNCTIONS`
by `config._attn_implementation`, falling back to their modeling file's own
`eager_attention_forward`, and call it with the attention module itself, q and k of shape
`[B, heads, N, d]` (after any adapter such as LoRA, and any rotary embedding) and an additive mask
that carries relative position biases (BEiT). The capture wraps that kernel once, under its own
name (in the registry, or in the modeling file for eager attention), so that the masking
utilities and flash kernels, which look implementations up by name, see nothing new. The wrapper
records *views* of q's [CLS] row, k and the mask when the calling module is one that a capture
marked (one layer for the loss; every layer at once for `sar-hf inspect`), then runs the kernel
untouched: every layer keeps SDPA (or flash, flex, eager), and nothing N×N is built for the loss.
The scores are formed after the forward pass, outside the layer, so gradient checkpointing
replays the layer exactly, and attention dropout, which acts on the probabilities, never reaches
them.

The capture is also the one place that sees every forward pass and every use of its scores, so
it is where a dropped SAR term is caught, whoever computed the loss: a training pass that needed
its term and whose scores were never popped stops its own backward with an error.
"""

import functools
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

_MARK = "_sar_capture"  # the attribute that marks the captured attention module


class CapturedScores(NamedTuple):
    """The [CLS] scores of one forward pass: `scores` `[B, heads, gh*gw]` (`[B, layers, heads, gh*gw]`
    for a capture of several layers), `grid_size` `(gh, gw)`, and whether the model was in training mode."""

    scores: torch.Tensor
    grid_size: tuple[int, int]
    training: bool


class _Pass:
    """One forward pass of the model: its patch grid and mode, what each marked layer recorded, and
    whether its scores were popped."""

    __slots__ = ("grid_size", "recorded", "training", "used")

    def __init__(self, grid_size: tuple[int, int], training: bool):
        self.grid_size = grid_size
        self.training = training
        self.recorded = {}  # attention module -> its [CLS] query, keys, mask and scaling
        self.used = False


class CLSScoreCapture:
    r"""
    Captures the pre-softmax scores `q_cls · k_j · scaling + mask_cls,j` of the [CLS] query against
    the patch keys of one attention layer, or of several in the same pass, at every forward pass of
    `model`.

    Tokens that come before the patch grid (DeiT's distillation token, DINOv2's registers) are
    left out: the patches are the last `gh*gw` tokens, with `(gh, gw)` read from each batch's
    image size and the patch size.

    Given `weight`, the capture guards the term: a pass in training mode with gradients on and
    `weight() > 0` must have its scores popped before backward reaches the model's output;
    otherwise that backward raises a `RuntimeError` that says how to apply the term. Evaluation,
    `torch.no_grad()`, λ = 0 and passes traced by `torch.compile` or `torch.export` are left alone.

    Args:
        model ([`PreTrainedModel`]):
            A ViT-family image classifier (or a PEFT model wrapping one).
        layer (`int` or `Sequence[int]`, *optional*, defaults to -1):
            The encoder layer whose attention is captured; negative counts from the end. A sequence
            of distinct layers captures each of them in the one forward pass, and the scores gain a
            layer axis, in the order given (as indexing a tensor with a list keeps the axis).
        weight (`Callable[[], float]`, *optional*):
            λ of the current training step, read at the end of each training pass; without it
            nothing is guarded.

    Raises:
        `ValueError` for models whose attention has no [CLS] row over a patch grid (no [CLS]
        token: IJEPA, SigLIP; windowed: Swin; shuffled patches: ViT-MAE; no attention: ConvNeXt),
        for models whose attention does not go through the registry (Data2VecVision), for a
        `layer` out of range, repeated, or already captured.

    Example:

    ```python
    >>> capture = CLSScoreCapture(model)
    >>> logits = model(pixel_values).logits
    >>> scores, grid_size, training = capture.pop()  # [B, heads, gh*gw], (gh, gw)
    >>> every_layer = CLSScoreCapture(model, layer=range(model.config.num_hidden_layers))
    >>> model(pixel_values)
    >>> scores = every_layer.pop().scores  # [B, layers, heads, gh*gw], from the one pass
    ```
    """

    def __init__(self, model, layer: int | Sequence[int] = -1, weight: Callable[[], float] | None = None):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT
        config = getattr(base.config, "vision_config", base.config)  # CLIP keeps its vision settings apart
        attention = _attention_modules(base, config)
        self._several = not isinstance(layer, int)
        layers = list(layer) if self._several else [layer]
        indices = [_layer_index(index, config.num_hidden_layers) for index in layers]
        if not indices or len(set(indices)) != len(indices):
            raise ValueError(f"`layer` must name distinct layers, got {layers}.")
        self.modules = tuple(attention[index] for index in indices)
        for index, module in zip(layers, self.modules, strict=True):
            if getattr(module, _MARK, None) is not None:
                raise ValueError(
                    f"Layer {index} of {type(base).__name__} is already captured (e.g. by its `sar_loss`); reuse "
                    "that capture instead of building a second one."
                )
        patch = config.patch_size
        self.patch_size = (patch, patch) if isinstance(patch, int) else tuple(patch)
        self._weight = weight
        self._pass = None  # the current or last forward pass
        self._running = False
        for module in self.modules:
            setattr(module, _MARK, self)
        self._handles = [
            base.register_forward_pre_hook(self._begin, with_kwargs=True),
            base.register_forward_hook(self._end, always_call=True),
        ]

    @property
    def module(self):
        """The captured attention module, of a capture of one layer (`modules` holds those of several)."""
        if self._several:
            raise AttributeError("A capture of several layers has `modules`, one per layer, not one `module`.")
        return self.modules[0]

    @property
    def pending(self) -> bool:
        """True between the end of a forward pass and the `pop` of its scores."""
        return self._pass is not None and not self._running and not self._pass.used

    def pop(self) -> CapturedScores | None:
        """The scores of the current or last forward pass, once; None if there is none left to pop.

        Inside the model's forward (after the layer ran) it pops the scores of that pass, as
        [`SARViTForImageClassification`] does; afterwards, those of the pass that just ended.

        Returns:
            [`CapturedScores`]: `scores` `[B, heads, gh*gw]` (`[B, layers, heads, gh*gw]` for several
            layers) in the dtype attention ran in (formed from the layers' own q and k, with their
            gradient), `grid_size`, `training`.
        """
        current = self._pass
        if current is None or current.used:
            return None
        current.used = True
        recorded, current.recorded = current.recorded, {}
        missed = next((module for module in self.modules if module not in recorded), None)
        if missed is not None:
            raise RuntimeError(
                f"{type(missed).__name__} ran without passing through the attention-function registry or its "
                f"`eager_attention_forward`, so no [CLS] scores were captured (attention implementation "
                f"{missed.config._attn_implementation!r}). Register custom kernels with "
                "`AttentionInterface.register` before the forward pass."
            )
        gh, gw = current.grid_size
        scores = [_cls_scores(*recorded[module], num_patches=gh * gw) for module in self.modules]
        return CapturedScores(torch.stack(scores, dim=1) if self._several else scores[0], (gh, gw), current.training)

    def remove(self):
        """Detaches the capture from the model."""
        for handle in self._handles:
            handle.remove()
        for module in self.modules:
            if getattr(module, _MARK, None) is self:
                delattr(module, _MARK)

    # -- hooks ---------------------------------------------------------------------------------

    def _begin(self, model, args, kwargs):
        pixel_values = kwargs.get("pixel_values", args[0] if args else None)
        # A pass whose scores were never popped is replaced: its own backward still finds it unused.
        self._pass = _Pass(self._grid_of(pixel_values), model.training)
        self._running = True
        for module in self.modules:
            _wrap_kernel(module)

    def _end(self, model, args, output):
        self._running = False
        current = self._pass  # None when the first pass failed in `_begin`
        # Dynamo cannot trace a hook on an intermediate tensor: compiled and exported passes go unguarded.
        if self._weight is None or current is None or current.used or torch.compiler.is_compiling():
            return
        if not (current.training and torch.is_grad_enabled()):
            return
        # Backward through any loss of this pass starts at its output (None after a failed pass).
        tensor = _first_grad_tensor(output)
        if tensor is not None and (weight := self._weight()) > 0:
            tensor.register_hook(functools.partial(_check_used, current, weight))

    def record(self, module, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, scaling: float | None):
        """Called by the wrapped kernel with a marked module, its q, k `[B, heads, N, d]` and mask."""
        # Only during the model's own forward pass, before its scores are popped: gradient
        # checkpointing runs the layer again in backward, and that replay must not replace what the
        # loss already used.
        if self._running and not self._pass.used:
            scaling = query.shape[-1] ** -0.5 if scaling is None else scaling  # SDPA's default
            self._pass.recorded[module] = (query[:, :, :1], key, mask, scaling)

    def _grid_of(self, pixel_values) -> tuple[int, int]:
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4:
            shape = getattr(pixel_values, "shape", None)
            raise ValueError(
                f"SAR needs `pixel_values` of shape [batch, channels, height, width] to find the patch grid, "
                f"got {None if shape is None else tuple(shape)}."
            )
        (height, width), (ph, pw) = pixel_values.shape[-2:], self.patch_size
        if height % ph or width % pw:
            raise ValueError(
                f"Images of {height}x{width} pixels do not tile into {ph}x{pw} patches; resize them to a "
                f"multiple of the patch size (e.g. {height // ph * ph or ph}x{width // pw * pw or pw})."
            )
        return height // ph, width // pw


def _first_grad_tensor(output) -> torch.Tensor | None:
    """The first tensor of a model's output (`ModelOutput`, tuple or tensor) that has a gradient."""
    values = output.values() if isinstance(output, Mapping) else output if isinstance(output, tuple) else (output,)
    return next((v for v in values if isinstance(v, torch.Tensor) and v.requires_grad), None)


def _check_used(current: _Pass, weight: float, grad: torch.Tensor):
    """Gradient hook on a training pass's output: its backward must not run before its scores were used."""
    if not current.used:
        raise RuntimeError(
            f"This training pass's [CLS] scores were never used, so its loss lacks the SAR term "
            f"λ·spatial_entropy (λ = {weight}). Apply the term in one of three ways: call the model with "
            "`labels` (the term joins the loss it computes); compute the loss with `model.sar_loss(outputs, "
            "labels)`, which also serves as `Trainer(compute_loss_func=...)`; or train with `sar_hf.SARTrainer`, "
            "which adds the term to whatever loss Trainer computes (label smoothing, a `compute_loss_func`). A "
            "loop with its own loss adds `model.sar_loss.penalty(labels)[0]` to it. A backward that must not "
            "train the term (input gradients for an attack, say) runs the pass in `model.eval()`, or discards "
            "its scores first with `model.sar_loss.capture.pop()`."
        )


def _cls_scores(query, key, mask, scaling, num_patches: int) -> torch.Tensor:
    """A marked layer's [CLS] query `[B, h, 1, d]`, keys `[B, h, N, d]` and mask -> scores `[B, h, num_patches]`."""
    _check_tokens(key.shape[-2], num_patches)
    if key.shape[1] != query.shape[1]:  # grouped keys: each serves several query heads
        key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    # Only the [CLS] row: B·heads·n·d multiply-adds. A product and a sum (not an einsum or a matmul,
    # which would save contiguous copies) keep only views of q and k for backward.
    scores = (query * key[:, :, -num_patches:]).sum(-1) * scaling  # [B, h, 1, d] * [B, h, n, d] -> [B, h, n]
    if mask is not None:
        row = mask[..., 0, -num_patches:]
        if row.dtype == torch.bool:  # True = attend
            row = torch.zeros_like(row, dtype=scores.dtype).masked_fill(~row, float("-inf"))
        scores = scores + row
    return scores


def _check_tokens(tokens: int, num_patches: int):
    if tokens <= num_patches:
        raise ValueError(
            f"The attention sees {tokens} tokens, but the images have {num_patches} patches plus a [CLS] token; "
            "the model's tokens do not match the patch grid of its `patch_size`."
        )


def _capturing(kernel):
    """`kernel` that first hands the marked module's q, k and mask to its capture."""

    @functools.wraps(kernel)
    def attention(module, query, key, value, *args, **kwargs):
        capture = getattr(module, _MARK, None)
        if capture is not None:
            mask = args[0] if args else kwargs.get("attention_mask")
            capture.record(module, query, key, mask, kwargs.get("scaling"))
        return kernel(module, query, key, value, *args, **kwargs)

    attention.sar_wraps = kernel
    return attention


def _wrap_kernel(module):
    """Wraps the kernel that `module` will call, once (again if someone registers a new one)."""
    name = module.config._attn_implementation
    if name in (None, "eager"):  # the registry falls back to the modeling file's own function
        modeling = sys.modules[type(module).__module__]
        kernel = getattr(modeling, "eager_attention_forward", None)
        if kernel is not None and not hasattr(kernel, "sar_wraps"):
            modeling.eager_attention_forward = _capturing(kernel)
        return
    kernel = ALL_ATTENTION_FUNCTIONS.get(name)
    if kernel is not None and not hasattr(kernel, "sar_wraps"):
        AttentionInterface.register(name, _capturing(kernel))


def _layer_index(layer: int, layers: int) -> int:
    if isinstance(layer, bool) or not -layers <= layer < layers:
        raise ValueError(
            f"`sar_layer` must index one of the {layers} layers (-{layers}..{layers - 1}), got {layer!r}."
        )
    return layer % layers


def _attention_modules(model, config) -> list:
    """The modules that call the attention registry, in layer order; ValueError with the reason if
    the model has no [CLS]-to-patch-grid attention that the capture can see."""
    name = type(model).__name__
    if not hasattr(config, "num_attention_heads"):
        raise ValueError(f"{name} has no attention (a convolutional model?), so its spatial entropy is undefined.")
    if getattr(config, "window_size", None) is not None:
        raise ValueError(
            f"{name} attends within windows (as Swin does): there is no global attention from a [CLS] token to "
            "the patch grid, so its spatial entropy is undefined."
        )
    if getattr(config, "mask_ratio", None) is not None:
        raise ValueError(
            f"{name} shuffles its patches and drops most of them (ViT-MAE's random masking), so its tokens do not "
            "lie on the patch grid."
        )
    if not any(n.rsplit(".", 1)[-1] in ("cls_token", "class_embedding") for n, _ in model.named_parameters()):
        raise ValueError(
            f"{name} has no [CLS] token (as IJEPA and SigLIP pool their patches instead), so there is no [CLS] "
            "attention to regularise."
        )
    # Every attention module that the registry kernels serve declares `is_causal` (SDPA reads it).
    modules = [m for m in model.modules() if getattr(m, "is_causal", None) is False and hasattr(m, "config")]
    if len(modules) != config.num_hidden_layers:
        raise ValueError(
            f"{name}'s attention layers do not call Transformers' attention-function registry (found {len(modules)} "
            f"such modules for {config.num_hidden_layers} layers; Data2VecVision, for one, picks its own SDPA or "
            "eager class), so SAR cannot take their [CLS] scores. Use a ViT, DeiT, DINOv2, BEiT, ViT-MSN or CLIP "
            "classifier."
        )
    return modules


__all__ = ["CLSScoreCapture", "CapturedScores"]
