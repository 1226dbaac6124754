"""A Trainer that adds the SAR term to whatever loss it computes, and logs it where integrations see it."""

import copy
import functools
import os
from importlib.metadata import version

from transformers import Trainer
from transformers.utils import logging

from .callbacks import SARCallback
from .configuration_sar_vit import PAPER_URL
from .loss import find_sar_loss

logger = logging.get_logger(__name__)

_CARD_TAGS = ["sar", "spatial-entropy", "vision", "image-classification"]
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


class SARTrainer(Trainer):
    """[`Trainer`] that adds λ·spatial_entropy to whatever loss it computes, with a [`SARCallback`] first.

    The model carries its SAR loss: a [`SARViTForImageClassification`], or any ViT-family classifier
    passed to `SpatialEntropyLoss(model)` first. Trainer computes the loss in one of three places,
    and the term is added in each, with the same normalisation as the loss it joins:

    * the model, when it gets the labels (it adds the term itself);
    * the label smoother (`label_smoothing_factor > 0`) or a `compute_loss_func` (soft targets such
      as mixup, a custom loss): Trainer calls the model without labels, and this class wraps them
      so that they add the term.

    A training pass whose loss still lacks the term raises an error in its backward
    ([`CLSScoreCapture`]) instead of training without it.

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
        if self.model is not None and find_sar_loss(self.model) is None:
            raise ValueError(
                f"SARTrainer needs a model with a SAR loss: a SARViTForImageClassification, or a model passed to "
                f"`SpatialEntropyLoss(model)` first; got {type(self.model).__name__}."
            )
        handler = self.callback_handler
        sar = next((cb for cb in handler.callbacks if isinstance(cb, SARCallback)), None) or SARCallback()
        if sar in handler.callbacks:
            handler.callbacks.remove(sar)
        handler.callbacks.insert(0, sar)
        self.sar_callback = sar
        if self.compute_loss_func is not None:
            self.compute_loss_func = self._adding_sar_term(self.compute_loss_func)
        if self.label_smoother is not None:
            self.label_smoother = self._adding_sar_term(self.label_smoother)

    def _adding_sar_term(self, loss_fn):
        """`loss_fn(outputs, labels, ...)` plus the term of the forward pass that gave `outputs`."""

        @functools.wraps(loss_fn)
        def loss_with_sar_term(outputs, labels, *args, **kwargs):
            loss = loss_fn(outputs, labels, *args, **kwargs)
            # None when `loss_fn` (e.g. SpatialEntropyLoss itself) has already added it.
            term = find_sar_loss(self.model).penalty(labels, kwargs.get("num_items_in_batch"), loss)
            return loss if term is None else loss + term[0]

        return loss_with_sar_term

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
        sar_loss = find_sar_loss(self.model)
        config = self.accelerator.unwrap_model(self.model).config
        settings = {"sar_layer": sar_loss.sar_layer}
        if hasattr(config, "sar_no_skip_no_norm"):
            settings["sar_no_skip_no_norm"] = config.sar_no_skip_no_norm
        cb = self.sar_callback
        if cb.schedule == "warmup_cosine":
            epochs = self.state.num_train_epochs or self.args.num_train_epochs  # before training: the one asked for
            schedule = (
                f"linear warm-up over {cb.warmup_for(epochs):g} epochs, then cosine decay to 0 "
                f"(λ updated per {cb.granularity_for(epochs)})"
            )
        else:
            schedule = cb.schedule if isinstance(cb.schedule, str) else "custom"
        # Before training the callback has no peak yet: it will take the loss's.
        peak = cb.sar_weight if cb.sar_weight is not None else sar_loss.sar_weight
        path = f"{self.args.output_dir}/README.md"
        with open(path, "a", encoding="utf-8") as card:
            card.write(
                "\n## Spatial-entropy regularisation (SAR)\n\n"
                "Trained with the spatial-entropy regulariser of *Spatial Entropy as an Inductive Bias for Vision "
                f"Transformers* (Peruzzo et al., Machine Learning 113(9), 2024; [arXiv 2206.04636]({PAPER_URL})), "
                f"using sar_hf {version('sar_hf')}.\n\n"
                f"- peak λ (`sar_weight`): {peak}\n"
                f"- λ schedule: {schedule}\n"
                + "".join(f"- `{k}`: {v}\n" for k, v in settings.items())
                + "\nLoad it with `import sar_hf` first, then the usual Auto classes or `pipeline`.\n"
            )


__all__ = ["SARTrainer"]
