"""sar_hf: the spatial-entropy regulariser (SAR) of Peruzzo et al. for Hugging Face ViTs."""

from .components import connected_components
from .entropy import spatial_entropy

__all__ = sorted(["connected_components", "spatial_entropy"])
