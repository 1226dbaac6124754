"""The SAR loss for any Transformers image classifier that returns its attention maps."""

import math

import torch
import torch.nn.functional as F

from .entropy import spatial_entropy
from .stats import SARStats


class SpatialEntropyLoss:
    r"""
    `cross_entropy + sar_weight * spatial_entropy` as a `Trainer(compute_loss_func=...)`, for ViT,
    DeiT, BEiT, DINOv2 and other classifiers with a [CLS] token.

    It reads the [CLS] row of one layer's attention probabilities from `outputs.attentions`; their
    log gives the same loss as the pre-softmax scores (the loss ignores a per-row shift). That
    needs eager attention, which materialises every N×N map and is markedly slower than SDPA (see
    `benchmarks/results/`): for ViT checkpoints prefer [`SARViTForImageClassification`], which
    keeps the fast kernel. Attention dropout must be 0 for the maps to equal the scores.

    Args:
        model ([`PreTrainedModel`]):
            The classifier, loaded with `attn_implementation="eager"` and `output_attentions=True`.
        sar_weight (`float`, *optional*, defaults to 0.01):
            λ; [`SARCallback`] schedules it during training.
        sar_layer (`int`, *optional*, defaults to -1):
            Which layer's attention is regularised (negative counts from the end).
        grid_size (`tuple[int, int]`, *optional*):
            The patch grid `(gh, gw)`; inferred from the config (or a square token count) if omitted.

    Example:

    ```python
    >>> model = AutoModelForImageClassification.from_pretrained(
    ...     "facebook/deit-small-patch16-224", attn_implementation="eager", output_attentions=True
    ... )
    >>> loss_fn = SpatialEntropyLoss(model)
    >>> trainer = Trainer(model, args, compute_loss_func=loss_fn, callbacks=[SARCallback(loss_fn=loss_fn)], ...)
    ```
    """

    def __init__(self, model, sar_weight: float = 0.01, sar_layer: int = -1, grid_size=None):
        config = model.config
        name = type(model).__name__
        if getattr(config, "window_size", None) is not None or not hasattr(config, "num_attention_heads"):
            raise ValueError(
                f"{name} has no global attention from a [CLS] token to a patch grid (windowed or convolutional "
                "models such as Swin or ConvNeXt), so its spatial entropy is undefined. Use a ViT-family model."
            )
        if config._attn_implementation != "eager" or not config.output_attentions:
            raise ValueError(
                f"{name} must return its attention maps: load it with "
                '`from_pretrained(..., attn_implementation="eager", output_attentions=True)` (it runs '
                f"{config._attn_implementation!r} attention with output_attentions={config.output_attentions}). "
                "For ViT, SARViTForImageClassification keeps the fast kernel instead."
            )
        if not math.isfinite(sar_weight) or sar_weight < 0:
            raise ValueError(f"`sar_weight` must be a finite number >= 0, got {sar_weight!r}.")
        layers = config.num_hidden_layers
        if not -layers <= sar_layer < layers:
            raise ValueError(f"`sar_layer` must index one of the {layers} layers, got {sar_layer}.")
        self.sar_weight = sar_weight
        self.scheduled_sar_weight: float | None = None  # λ of the current step, set by SARCallback
        self.sar_layer = sar_layer
        self.grid_size = grid_size
        self.config = config
        # Tokens before the patches: [CLS], DeiT's distillation token, DINOv2's registers.
        has_distillation = any(n.endswith("distillation_token") for n, _ in model.named_parameters())
        self.num_prefix_tokens = 1 + int(has_distillation) + (getattr(config, "num_register_tokens", 0) or 0)
        self.sar_stats = SARStats()
        self._model = model

    def __call__(self, outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
        """The training loss for one batch; also records the SAR terms for [`SARCallback`]."""
        attentions = outputs.get("attentions")
        if not attentions:
            raise ValueError(
                "The model returned no attention maps; call it with `output_attentions=True` under eager attention "
                '(`from_pretrained(..., attn_implementation="eager", output_attentions=True)`).'
            )
        cls_logits, grid_size = self.cls_logits(attentions[self.sar_layer])
        logits = outputs["logits"]
        reduction = "sum" if num_items_in_batch is not None else "mean"
        ce_loss = F.cross_entropy(logits, labels.to(logits.device), reduction=reduction)
        share = 1.0
        if num_items_in_batch is not None:  # normalised over the whole accumulated batch, as Trainer expects
            ce_loss = ce_loss / num_items_in_batch
            share = labels.shape[0] / num_items_in_batch
        training = self._model.training
        weight = self.sar_weight if self.scheduled_sar_weight is None else self.scheduled_sar_weight
        with torch.set_grad_enabled(training and weight > 0 and torch.is_grad_enabled()):
            entropy, skipped = spatial_entropy(cls_logits, grid_size, return_skipped=True)
        self.sar_stats.update(training, entropy, ce_loss / share, skipped)
        if not training or weight == 0:
            return ce_loss
        return ce_loss + weight * entropy * share

    def cls_logits(self, attention: torch.Tensor):
        """[B, heads, N, N] attention probabilities -> ([B, heads, gh*gw] log-probabilities, (gh, gw))."""
        if attention.dim() != 4 or attention.shape[-1] != attention.shape[-2]:
            raise ValueError(
                f"Expected attention maps [batch, heads, tokens, tokens], got {tuple(attention.shape)}: the model "
                "has no [CLS]-to-patch-grid attention."
            )
        patches = attention[:, :, 0, self.num_prefix_tokens :]
        grid_size = self.grid_size or _infer_grid(self.config, patches.shape[-1])
        tiny = torch.finfo(patches.dtype).tiny  # a probability that underflowed to 0 stays finite
        return torch.log(patches.float().clamp(min=tiny)), grid_size


def _infer_grid(config, num_patches: int) -> tuple[int, int]:
    image, patch = getattr(config, "image_size", None), getattr(config, "patch_size", None)
    if image is not None and patch is not None:
        ih, iw = (image, image) if isinstance(image, int) else image
        ph, pw = (patch, patch) if isinstance(patch, int) else patch
        if (ih // ph) * (iw // pw) == num_patches:
            return ih // ph, iw // pw
    side = math.isqrt(num_patches)
    if side * side == num_patches:
        return side, side
    raise ValueError(
        f"Cannot tell the patch grid of {num_patches} patch tokens; "
        "pass `grid_size=(rows, cols)` to SpatialEntropyLoss."
    )


__all__ = ["SpatialEntropyLoss"]
