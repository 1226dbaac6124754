"""ViT for image classification with the spatial-entropy regulariser (SAR).

Paper: https://arxiv.org/abs/2206.04636. The model is [`ViTForImageClassification`] plus:

* two forward hooks on the `q_proj` and `k_proj` of the regularised layer, which turn the
  queries and keys that the layer computes anyway into the pre-softmax [CLS]-to-patch scores
  `[B, heads, gh*gw]`. Every layer keeps its attention kernel (SDPA, flash, ...); no N×N matrix
  is built for the loss.
* `loss = cross_entropy + config.sar_weight * spatial_entropy` when labels are given in training.
* optionally the authors' "no skip, no norm" last block.
"""

from dataclasses import dataclass

import torch
from transformers import ViTForImageClassification
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.models.vit.modeling_vit import ViTLayer
from transformers.utils import logging

from .configuration_sar_vit import SARViTConfig
from .entropy import spatial_entropy
from .stats import SARStats

logger = logging.get_logger(__name__)


@dataclass
class SARImageClassifierOutput(ImageClassifierOutput):
    """
    [`ImageClassifierOutput`] plus the two terms of the SAR loss, returned when `labels` are given.

    ce_loss (`torch.FloatTensor` of shape `()`):
        The classification loss, as [`ViTForImageClassification`] computes it.
    spatial_entropy (`torch.FloatTensor` of shape `()`):
        Mean spatial entropy (nats) of the [CLS] maps of the regularised layer, over images and heads.
    skipped_maps (`torch.LongTensor` of shape `()`):
        Maps left out of that mean because a score was not finite.
    """

    ce_loss: torch.FloatTensor | None = None
    spatial_entropy: torch.FloatTensor | None = None
    skipped_maps: torch.LongTensor | None = None


class ViTLayerNoSkipNoNorm(ViTLayer):
    """The authors' last block: no residual around attention, no LayerNorm before the MLP."""

    def __init__(self, config):
        super().__init__(config)
        del self.layernorm_after  # unused; keeping it would leave DDP with a parameter without gradient

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        hidden_states, _ = self.attention(self.layernorm_before(hidden_states), attention_mask, **kwargs)
        hidden_states = self.dropout(hidden_states)
        return hidden_states + self.dropout(self.mlp(hidden_states))


class SARViTForImageClassification(ViTForImageClassification):
    config: SARViTConfig
    config_class = SARViTConfig

    def __init__(self, config: SARViTConfig):
        config.check_sar_settings()
        super().__init__(config)
        if config.sar_no_skip_no_norm:
            self.vit.layers[-1] = ViTLayerNoSkipNoNorm(config)
            self.post_init()  # initialise the new block like the others
        self.add_model_tags(["sar", "spatial-entropy"])  # for the card that `push_to_hub` writes
        self.sar_stats = SARStats()
        # λ of the current step, set by SARCallback's schedule; None means `config.sar_weight`, which
        # stays the configured (peak) value so that checkpoints save it rather than a scheduled one.
        self.scheduled_sar_weight: float | None = None
        self._cls_query = None  # [B, heads*head_dim], set by the q_proj hook while capturing
        self._patch_keys = None  # [B, gh*gw, heads*head_dim], set by the k_proj hook while capturing
        self._capturing = False
        attention = self.vit.layers[config.sar_layer_index].attention
        attention.q_proj.register_forward_hook(self._capture_cls_query)
        attention.k_proj.register_forward_hook(self._capture_patch_keys)

    # The hooks only keep views of the outputs and compute nothing: under gradient checkpointing the
    # layer runs again in backward with capture off, and the two runs must save the same tensors.
    def _capture_cls_query(self, module, args, query):
        if self._capturing:
            self._cls_query = query[:, 0]  # [B, N, heads*d] -> the [CLS] row

    def _capture_patch_keys(self, module, args, key):
        if self._capturing:
            self._patch_keys = key[:, 1:]  # [B, N, heads*d] -> the patches, no [CLS]

    def _pop_cls_logits(self) -> torch.Tensor:
        """The captured [CLS] query and patch keys -> pre-softmax scores `[B, heads, gh*gw]`."""
        query, key, self._cls_query, self._patch_keys = self._cls_query, self._patch_keys, None, None
        attention = self.vit.layers[self.config.sar_layer_index].attention
        heads, head_dim = attention.num_attention_heads, attention.head_dim
        query = query.reshape(-1, heads, head_dim)  # 'b (h d) -> b h d'
        key = key.reshape(key.shape[0], -1, heads, head_dim)  # 'b n (h d) -> b n h d'
        # Only the [CLS] row: B·heads·n·d multiply-adds, nothing N×N. A product and a sum (not an
        # einsum, which would save a contiguous copy of the keys) keep only views for backward.
        return (query.unsqueeze(1) * key).sum(-1).transpose(1, 2) * attention.scaling

    def cls_attention_logits(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool | None = None):
        """Pre-softmax [CLS]-to-patch scores of the regularised layer.

        Args:
            pixel_values (`torch.FloatTensor` of shape `[B, C, H, W]`).

        Returns:
            `(logits, output, grid_size)`: the scores `[B, heads, gh*gw]`, the model's output and
            `(gh, gw)`, the patch grid of these images.
        """
        grid_size = self._grid_size(pixel_values)
        output, logits = self._forward_capturing(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        return logits, output, grid_size

    def _forward_capturing(self, *args, **kwargs):
        """`(ViT's output, [CLS] scores [B, heads, gh*gw])` of one forward pass with the hooks on."""
        self._capturing = True
        try:
            output = super().forward(*args, **kwargs)
        finally:
            self._capturing = False
        return output, self._pop_cls_logits()

    def _grid_size(self, pixel_values: torch.Tensor) -> tuple[int, int]:
        if pixel_values is None or pixel_values.dim() != 4:
            shape = None if pixel_values is None else tuple(pixel_values.shape)
            raise ValueError(f"`pixel_values` must have shape [batch, channels, height, width], got {shape}.")
        patch = self.config.patch_size
        ph, pw = (patch, patch) if isinstance(patch, int) else patch
        height, width = pixel_values.shape[-2:]
        if height % ph or width % pw:
            raise ValueError(
                f"Images of {height}x{width} pixels do not tile into {ph}x{pw} patches; resize them to a "
                f"multiple of the patch size (e.g. {height // ph * ph or ph}x{width // pw * pw or pw})."
            )
        return height // ph, width // pw

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> SARImageClassifierOutput:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
            Class indices. When given, the output also carries `ce_loss`, `spatial_entropy` and
            `skipped_maps`, and in training `loss = ce_loss + λ * spatial_entropy`, with λ the
            scheduled `self.scheduled_sar_weight` or else `config.sar_weight`.
        """
        if labels is None:  # inference (e.g. a pipeline): exactly ViT, no SAR work at all
            output = super().forward(pixel_values, None, interpolate_pos_encoding, attention_mask, **kwargs)
            return SARImageClassifierOutput(**output)

        grid_size = self._grid_size(pixel_values)
        output, cls_logits = self._forward_capturing(
            pixel_values, labels, interpolate_pos_encoding, attention_mask, **kwargs
        )

        weight = self.config.sar_weight if self.scheduled_sar_weight is None else self.scheduled_sar_weight
        regularise = self.training and weight > 0
        if regularise and torch.is_grad_enabled() and not cls_logits.requires_grad:
            logger.warning_once(
                "The [CLS] scores have no gradient, so the spatial entropy cannot train the model; reentrant "
                "gradient checkpointing does this: use `gradient_checkpointing_kwargs={'use_reentrant': False}`."
            )
        with torch.set_grad_enabled(regularise and torch.is_grad_enabled()):
            entropy, skipped = spatial_entropy(cls_logits, grid_size, return_skipped=True)
        ce_loss = loss = output.loss
        # With `num_items_in_batch` (gradient accumulation) Trainer's CE is a sum over this batch
        # divided by the items of the whole accumulated batch; the entropy is scaled to match.
        share = labels.shape[0] / kwargs["num_items_in_batch"] if "num_items_in_batch" in kwargs else 1.0
        if regularise:
            loss = ce_loss + weight * entropy * share
        self.sar_stats.update(self.training, entropy, ce_loss / share, skipped)
        return SARImageClassifierOutput(
            loss=loss,
            logits=output.logits,
            hidden_states=output.hidden_states,
            attentions=output.attentions,
            ce_loss=ce_loss,
            spatial_entropy=entropy,
            skipped_maps=skipped,
        )


__all__ = ["SARImageClassifierOutput", "SARViTForImageClassification", "ViTLayerNoSkipNoNorm"]
