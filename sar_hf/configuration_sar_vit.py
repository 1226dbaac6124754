"""Configuration of a ViT trained with the spatial-entropy regulariser (SAR)."""

import math

from huggingface_hub.dataclasses import strict
from transformers import ViTConfig

PAPER_URL = "https://arxiv.org/abs/2206.04636"


def check_sar_weight(weight: float) -> float:
    """`weight` if it is a valid λ (a finite number >= 0, not a bool); ValueError otherwise."""
    if isinstance(weight, bool) or not math.isfinite(weight) or weight < 0:
        raise ValueError(f"`sar_weight` must be a finite number >= 0, got {weight!r}.")
    return weight


@strict
class SARViTConfig(ViTConfig):
    r"""
    A [`ViTConfig`] plus the settings of the spatial-entropy regulariser of *Spatial Entropy as an
    Inductive Bias for Vision Transformers* (Peruzzo et al., 2024, https://arxiv.org/abs/2206.04636).
    Everything that changes what the model computes lives here, so it survives `save_pretrained`
    and the Hub; the λ schedule lives in [`SARCallback`].

    sar_weight (`float`, *optional*, defaults to 0.01):
        λ, the weight of the spatial entropy in `loss = cross_entropy + λ * spatial_entropy`. The
        paper uses 0.01 for every dataset; with 0 the model computes exactly what
        [`ViTForImageClassification`] computes. [`SARCallback`] overwrites it during training with
        its schedule.
    sar_layer (`int`, *optional*, defaults to -1):
        Index of the encoder layer whose [CLS] attention is regularised; negative counts from the
        end. The paper regularises the last layer, where the maps are most semantic.
    sar_no_skip_no_norm (`bool`, *optional*, defaults to `False`):
        The authors' best variant: the last block has no residual connection around attention
        and no LayerNorm before its MLP (the MLP residual and the final LayerNorm stay). It makes
        the regularised maps shape the [CLS] output directly. A model trained with it no longer
        loads into a plain [`ViTForImageClassification`].

    Example:

    ```python
    >>> from sar_hf import SARViTConfig, SARViTForImageClassification

    >>> config = SARViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, sar_weight=0.01)
    >>> model = SARViTForImageClassification(config)
    ```"""

    model_type = "sar-vit"
    # The SAR terms are training diagnostics, not predictions: Trainer leaves them out of `predict`.
    keys_to_ignore_at_inference = ["ce_loss", "spatial_entropy", "skipped_maps"]

    sar_weight: float | int = 0.01
    sar_layer: int = -1
    sar_no_skip_no_norm: bool = False

    def __post_init__(self, **kwargs):
        # A plain `vit` config read into this class brings its own `model_type`; the class's wins.
        kwargs.pop("model_type", None)
        unknown = sorted(key for key in kwargs if key.startswith("sar_"))
        super().__post_init__(**kwargs)
        if unknown:
            raise ValueError(
                f"Unknown SAR setting(s) {unknown}; SARViTConfig knows `sar_weight`, `sar_layer` and "
                "`sar_no_skip_no_norm`."
            )
        self.check_sar_settings()

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        """[`PreTrainedConfig.get_config_dict`], with a plain ViT checkpoint's config read as a SAR one.
        Every ViT setting means the same here, so the config takes this class's `model_type`, and
        Transformers does not warn that a `vit` config instantiates a `sar-vit` model: that is the
        recommended start, `SARViTForImageClassification.from_pretrained("google/vit-...")`."""
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        if config_dict.get("model_type") == ViTConfig.model_type:
            config_dict = {**config_dict, "model_type": cls.model_type}
        return config_dict, kwargs

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        """[`PreTrainedConfig.from_dict`], then the SAR checks. Transformers sets the overrides given to
        `from_pretrained` (of this class, of `AutoConfig` and of the models) after `__post_init__`, so
        they are checked here, once all of them are set."""
        loaded = super().from_dict(config_dict, **kwargs)
        config = loaded[0] if isinstance(loaded, tuple) else loaded  # `return_unused_kwargs=True`
        config.check_sar_settings()
        return loaded

    # Not a `validate_*` method: `@strict` would wrap its ValueError in its own error type.
    def check_sar_settings(self):
        """Raises a ValueError for an impossible `sar_weight` or `sar_layer`. The model calls it again,
        since a setting may also be changed on a config object after it was made."""
        check_sar_weight(self.sar_weight)
        layers = self.num_hidden_layers
        if isinstance(self.sar_layer, bool) or not -layers <= self.sar_layer < layers:
            raise ValueError(
                f"`sar_layer` must index one of the {layers} layers (0..{layers - 1}, or -{layers}..-1 "
                f"from the end), got {self.sar_layer!r}."
            )

    @property
    def sar_layer_index(self) -> int:
        """`sar_layer` as a non-negative layer index."""
        return self.sar_layer % self.num_hidden_layers


__all__ = ["PAPER_URL", "SARViTConfig", "check_sar_weight"]
