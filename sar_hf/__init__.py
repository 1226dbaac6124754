"""sar_hf: the spatial-entropy regulariser (SAR) of Peruzzo et al. for Hugging Face ViTs.

Importing the package registers `SARViTConfig` ("sar-vit") with the Auto classes, so that
`AutoConfig`, `AutoModelForImageClassification`, `AutoModel` (the encoder) and `pipeline` load SAR
checkpoints.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageClassification, ViTModel
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping

from .callbacks import SARCallback
from .capture import CLSScoreCapture
from .components import connected_components
from .configuration_sar_vit import SARViTConfig
from .entropy import spatial_entropy
from .loss import SpatialEntropyLoss
from .modeling_sar_vit import SARImageClassifierOutput, SARViTForImageClassification, SARViTModel
from .stats import SARStats
from .trainer import SARTrainer

AutoConfig.register(SARViTConfig.model_type, SARViTConfig, exist_ok=True)
AutoModel.register(SARViTConfig, SARViTModel, exist_ok=True)
AutoModelForImageClassification.register(SARViTConfig, SARViTForImageClassification, exist_ok=True)
# The SAR encoder stores its weights as ViT's does: checkpoints in either layout of ViT's weight names
# (before and after Transformers 5 renamed them) load, and SAR checkpoints are saved like ViT's.
register_checkpoint_conversion_mapping(
    SARViTModel.__name__, get_checkpoint_conversion_mapping(ViTModel.__name__), overwrite=True
)

__all__ = [
    "CLSScoreCapture",
    "SARCallback",
    "SARImageClassifierOutput",
    "SARStats",
    "SARTrainer",
    "SARViTConfig",
    "SARViTForImageClassification",
    "SARViTModel",
    "SpatialEntropyLoss",
    "connected_components",
    "spatial_entropy",
]
