"""ViT for image classification with the spatial-entropy regulariser (SAR).

Paper: https://arxiv.org/abs/2206.04636. The model is [`ViTForImageClassification`] plus:

* a [`SpatialEntropyLoss`] (`model.sar_loss`) that captures the pre-softmax [CLS]-to-patch scores
  `[B, heads, gh*gw]` of the regularised layer where its attention kernel consumes q and k. Every
  layer keeps its attention kernel (SDPA, flash, ...); no N×N matrix is built for the loss.
* `loss = cross_entropy + λ * spatial_entropy` when labels are given in training.
* optionally the authors' "no skip, no norm" last block, which [`SARViTModel`], the encoder that
  `AutoModel` loads from a SAR checkpoint, holds too.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import ViTForImageClassification, ViTModel
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.models.vit.modeling_vit import ViTLayer, ViTPreTrainedModel
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs
from transformers.utils.generic import can_return_tuple

from .configuration_sar_vit import SARViTConfig
from .loss import SpatialEntropyLoss


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


class SARViTModel(ViTModel):
    """The encoder of a SAR checkpoint: [`ViTModel`], with the authors' last block if
    `config.sar_no_skip_no_norm`. `AutoModel` loads it from a SAR checkpoint (e.g. for the
    `image-feature-extraction` pipeline); it computes no SAR term."""

    config: SARViTConfig
    config_class = SARViTConfig

    def __init__(self, config: SARViTConfig, add_pooling_layer: bool = True, use_mask_token: bool = False):
        config.check_sar_settings()
        super().__init__(config, add_pooling_layer=add_pooling_layer, use_mask_token=use_mask_token)
        if config.sar_no_skip_no_norm:
            self.layers[-1] = ViTLayerNoSkipNoNorm(config)
            self.post_init()  # initialise the new block like the others


class SARViTForImageClassification(ViTForImageClassification):
    """[`ViTForImageClassification`] whose loss adds λ·spatial entropy in training (see the module docstring)."""

    config: SARViTConfig
    config_class = SARViTConfig

    def __init__(self, config: SARViTConfig):
        # `ViTForImageClassification.__init__` with a `SARViTModel` as the encoder: the same modules under
        # the same names, so plain ViT and SAR checkpoints load into each other.
        ViTPreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.vit = SARViTModel(config, add_pooling_layer=False)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.post_init()
        self.add_model_tags(["sar", "spatial-entropy"])  # for the card that `push_to_hub` writes
        # λ is read from `config.sar_weight` at every step, so that edits to the config take effect.
        self.sar_loss = SpatialEntropyLoss(self, sar_weight=None, sar_layer=config.sar_layer)

    # `return_dict=False` (argument or config) gives a tuple, as every Transformers model does.
    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SARImageClassifierOutput:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
            Class indices. When given, the output also carries `ce_loss`, `spatial_entropy` and
            `skipped_maps`, and in training `loss = ce_loss + λ * spatial_entropy`, with λ the
            scheduled `sar_loss.scheduled_sar_weight` or else `config.sar_weight`. Without labels
            the model computes exactly what [`ViTForImageClassification`] computes; the scores stay
            captured for [`SARTrainer`], which adds the term to the loss that it computes.
        """
        output = super().forward(
            pixel_values, labels, interpolate_pos_encoding, attention_mask, return_dict=True, **kwargs
        )
        if labels is None:
            return SARImageClassifierOutput(**output)
        penalty, entropy, skipped = self.sar_loss.penalty(labels, kwargs.get("num_items_in_batch"), output.loss)
        return SARImageClassifierOutput(
            loss=output.loss + penalty,
            logits=output.logits,
            hidden_states=output.hidden_states,
            attentions=output.attentions,
            ce_loss=output.loss,
            spatial_entropy=entropy,
            skipped_maps=skipped,
        )


__all__ = ["SARImageClassifierOutput", "SARViTForImageClassification", "SARViTModel", "ViTLayerNoSkipNoNorm"]
