"""A Trainer that carries a SARCallback where every reporting integration sees its logs."""

import copy
import os

from transformers import Trainer
from transformers.utils import logging

from .callbacks import SARCallback
from .configuration_sar_vit import PAPER_URL

logger = logging.get_logger(__name__)

_CARD_TAGS = ["sar", "spatial-entropy", "vision", "image-classification"]
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


class SARTrainer(Trainer):
    """[`Trainer`] with a [`SARCallback`] placed first among the callbacks.

    Callbacks see `logs` in order, and the reporting integrations (TensorBoard, W&B, ...) come
    before user callbacks; placing the SAR callback first lets them all record the `sar/*` values.
    A `SARCallback` given in `callbacks` is used (and moved); otherwise a default one is added.

    It also reads checkpoint weights back through `from_pretrained`. Transformers 5 saves ViT
    weights under their legacy names (`vit.encoder.layer.0.attention.attention.query.weight`),
    while `Trainer` reads them back for `resume_from_checkpoint` and `load_best_model_at_end` with
    a plain `load_state_dict(strict=False)`, which skips every renamed weight with only a warning
    (huggingface/transformers#43701): training would go on from the initialisation.
    `from_pretrained` renames them. DeepSpeed and FSDP checkpoints keep Trainer's own loading.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        handler = self.callback_handler
        sar = next((cb for cb in handler.callbacks if isinstance(cb, SARCallback)), None) or SARCallback()
        if sar in handler.callbacks:
            handler.callbacks.remove(sar)
        handler.callbacks.insert(0, sar)
        self.sar_callback = sar

    def _load_weights(self, folder: str, model=None) -> bool:
        """Loads a checkpoint's weights into the model, strictly; False if Trainer should do it."""
        unwrapped = self.accelerator.unwrap_model(self.model if model is None else model)
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            return False
        if not any(os.path.isfile(os.path.join(folder, name)) for name in _WEIGHTS):
            return False
        logger.info(f"Loading the weights of {folder}.")
        saved = type(unwrapped).from_pretrained(folder, config=copy.deepcopy(unwrapped.config))
        unwrapped.load_state_dict(saved.state_dict())  # strict: every weight must come back
        return True

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if not self._load_weights(resume_from_checkpoint, model):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self):
        if not self._load_weights(self.state.best_model_checkpoint):
            super()._load_best_model()

    def create_model_card(self, *args, tags=None, **kwargs):
        """Trainer's card, tagged `sar`/`spatial-entropy`, with the paper and the SAR settings."""
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        super().create_model_card(*args, tags=tags + [t for t in _CARD_TAGS if t not in tags], **kwargs)
        if not self.is_world_process_zero():
            return
        config = self.accelerator.unwrap_model(self.model).config
        settings = {k: getattr(config, k) for k in ("sar_layer", "sar_no_skip_no_norm") if hasattr(config, k)}
        cb = self.sar_callback
        schedule = cb.schedule if isinstance(cb.schedule, str) else "custom"
        # Before training the callback has no peak yet: it will take the model's.
        peak = cb.sar_weight if cb.sar_weight is not None else getattr(config, "sar_weight", None)
        path = f"{self.args.output_dir}/README.md"
        with open(path, "a", encoding="utf-8") as card:
            card.write(
                "\n## Spatial-entropy regularisation (SAR)\n\n"
                f"Trained with the spatial-entropy regulariser of [Peruzzo et al., 2024]({PAPER_URL}) "
                "using [sar_hf](https://github.com/sar-hf/sar_hf).\n\n"
                f"- peak λ (`sar_weight`): {peak}\n"
                f"- λ schedule: {schedule} ({cb.granularity}), warm-up epochs: {cb.warmup_epochs}\n"
                + "".join(f"- `{k}`: {v}\n" for k, v in settings.items())
                + "\nLoad it with `import sar_hf` first, then the usual Auto classes or `pipeline`.\n"
            )


__all__ = ["SARTrainer"]
