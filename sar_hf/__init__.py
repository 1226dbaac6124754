"""sar_hf: the spatial-entropy regulariser (SAR) of Peruzzo et al. for Hugging Face ViTs.

Importing the package registers `SARViTConfig` ("sar-vit") with the Auto classes, so that
`AutoConfig`, `AutoModelForImageClassification` and `pipeline` load SAR checkpoints.
"""

from transformers import AutoConfig, AutoModelForImageClassification

from .callbacks import SARCallback
from .capture import CLSScoreCapture
from .components import connected_components
from .configuration_sar_vit import SARViTConfig
from .entropy import spatial_entropy
from .loss import SpatialEntropyLoss
from .modeling_sar_vit import SARImageClassifierOutput, SARViTForImageClassification
from .stats import SARStats
from .trainer import SARTrainer

AutoConfig.register(SARViTConfig.model_type, SARViTConfig, exist_ok=True)
AutoModelForImageClassification.register(SARViTConfig, SARViTForImageClassification, exist_ok=True)

__all__ = [
    "CLSScoreCapture",
    "SARCallback",
    "SARImageClassifierOutput",
    "SARStats",
    "SARTrainer",
    "SARViTConfig",
    "SARViTForImageClassification",
    "SpatialEntropyLoss",
    "connected_components",
    "spatial_entropy",
]
