"""Moved to `sar_hf.scripts.deit_recipe` (DeiT's recipe, in one module); this path keeps working."""

from .scripts.deit_recipe import (
    RANDAUGMENT_MAX_MAGNITUDE,
    RANDAUGMENT_OPERATIONS,
    MixupCutmix,
    TrainImageTransform,
)

__all__ = ["MixupCutmix", "RANDAUGMENT_MAX_MAGNITUDE", "RANDAUGMENT_OPERATIONS", "TrainImageTransform"]
