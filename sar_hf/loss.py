"""The SAR term λ·spatial_entropy for any ViT-family classifier, added wherever the cross-entropy is."""

import functools
import inspect

import torch
import torch.nn.functional as F
from accelerate.utils import extract_model_from_parallel
from transformers import TrainingArguments
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING
from transformers.utils import logging

from .capture import CLSScoreCapture
from .configuration_sar_vit import check_sar_weight
from .entropy import spatial_entropy
from .stats import SARStats

logger = logging.get_logger(__name__)

# Transformers 5.24 renamed gradient checkpointing to activation checkpointing (the old names warn).
_CHECKPOINTING_KWARGS = next(
    name
    for name in ("activation_checkpointing_kwargs", "gradient_checkpointing_kwargs")
    if hasattr(TrainingArguments, name)
)


class SpatialEntropyLoss:
    r"""
    The spatial-entropy regulariser of one model: `cross_entropy + sar_weight * spatial_entropy`.

    It captures the pre-softmax [CLS]-to-patch scores of one layer where the attention kernel
    consumes q and k ([`CLSScoreCapture`]), so the model keeps its default attention (SDPA, flash)
    in every layer. Building it attaches it to the model as `model.sar_loss`; from then on the
    term is added to the loss wherever the cross-entropy is computed:

    * by the model itself, when it is called with `labels` (a forward hook adds the term to
      `outputs.loss`, as [`SARViTForImageClassification`] does in its forward);
    * by this object, used as `Trainer(compute_loss_func=...)`;
    * by Trainer's label smoother or any other `compute_loss_func` (soft targets such as mixup),
      through [`SARTrainer`].

    Each forward pass's scores are used once, so the term is never added twice; a training pass
    whose scores were never used raises an error in its backward instead of training without the
    term ([`CLSScoreCapture`]), in Trainer and in a loop of your own alike.

    Args:
        model ([`PreTrainedModel`]):
            A ViT, DeiT, DINOv2 (with or without registers), BEiT, ViT-MSN or CLIP image classifier,
            as loaded by default, or a PEFT model wrapping one. It must compute a loss from `labels`
            (`DeiTForImageClassificationWithTeacher`, for one, does not: use `DeiTForImageClassification`).
        sar_weight (`float`, *optional*, defaults to 0.01):
            λ, the paper's value; [`SARCallback`] schedules it during training. `None` reads the
            model's `config.sar_weight` at every step (as [`SARViTForImageClassification`] does).
            Training checks the λ it reads, wherever it was set: negative or non-finite is a `ValueError`.
        sar_layer (`int`, *optional*, defaults to -1):
            Which layer's attention is regularised (negative counts from the end).

    Example:

    ```python
    >>> model = AutoModelForImageClassification.from_pretrained("facebook/deit-small-patch16-224")
    >>> SpatialEntropyLoss(model, sar_weight=0.01)
    >>> trainer = SARTrainer(model=model, args=args, train_dataset=train)  # adds λ·SE to Trainer's loss
    ```
    """

    def __init__(self, model, sar_weight: float | None = 0.01, sar_layer: int = -1):
        target = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT
        if sar_weight is not None:
            check_sar_weight(sar_weight)
        elif not hasattr(target.config, "sar_weight"):
            raise ValueError(f"`sar_weight=None` reads `config.sar_weight`, which {type(target).__name__} lacks.")
        _check_computes_a_loss(target)
        # A partial, not a lambda: a deep copy of the model (an eager twin, say) then reads its own loss's λ.
        self.capture = CLSScoreCapture(target, sar_layer, weight=functools.partial(getattr, self, "weight"))
        self.sar_layer = sar_layer
        self._sar_weight = sar_weight
        self._config = target.config
        self.scheduled_sar_weight: float | None = None  # λ of the current step, set by SARCallback
        self.sar_stats = SARStats()
        target.sar_loss = self
        target.register_forward_hook(self._add_to_model_loss, with_kwargs=True)

    @property
    def sar_weight(self) -> float:
        """The configured (peak) λ; a `ValueError` if it is negative or not finite (the config may
        have been edited since)."""
        return check_sar_weight(self._config.sar_weight if self._sar_weight is None else self._sar_weight)

    @sar_weight.setter
    def sar_weight(self, value: float):
        self._sar_weight = value

    @property
    def weight(self) -> float:
        """λ of the current training step: the scheduled one while [`SARCallback`] runs, else `sar_weight`."""
        scheduled = self.scheduled_sar_weight
        return self.sar_weight if scheduled is None else check_sar_weight(scheduled)

    def penalty(self, labels=None, num_items_in_batch=None, ce_loss=None):
        """λ·SE of the forward pass just run, scaled like a loss normalised by `num_items_in_batch`.

        Pops the captured scores (so a second call for the same pass returns None) and records the
        SAR terms for [`SARCallback`]. The term is 0 outside training or with λ = 0.

        Args:
            labels (`torch.Tensor`, *optional*): this batch's labels; with `num_items_in_batch` they
                give the batch's share of the accumulated batch, counted as Trainer counts them
                (every element that is not -100).
            num_items_in_batch (`int` or `torch.Tensor`, *optional*): Trainer's item count of the
                whole accumulated batch, when the loss is normalised by it.
            ce_loss (`torch.Tensor`, *optional*): the loss the term is added to, for the logs.

        Returns:
            `(penalty, entropy, skipped)`: the 0-dim term to add, the mean spatial entropy (nats) and
            the number of maps left out for non-finite scores; or None if no scores are pending.
        """
        captured = self.capture.pop()
        if captured is None:
            return None
        weight = self.weight if captured.training else 0.0  # outside training the term is 0 whatever λ is
        applied = weight > 0
        if applied and torch.is_grad_enabled() and not captured.scores.requires_grad:
            logger.warning_once(
                "The [CLS] scores have no gradient, so the spatial entropy cannot train the model; reentrant "
                f"checkpointing does this: use the non-reentrant kind, `TrainingArguments({_CHECKPOINTING_KWARGS}="
                "{'use_reentrant': False})`."
            )
        with torch.set_grad_enabled(applied and torch.is_grad_enabled()):
            entropy, skipped = spatial_entropy(captured.scores, captured.grid_size, return_skipped=True)
        share = 1.0
        if num_items_in_batch is not None and labels is not None:
            share = labels.ne(-100).sum().to(entropy.device) / num_items_in_batch
        self.sar_stats.update(captured.training, entropy, None if ce_loss is None else ce_loss / share, skipped)
        penalty = weight * entropy * share if applied else entropy.new_zeros(())
        return penalty, entropy, skipped

    def __call__(self, outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
        """`cross_entropy + λ·SE` for one batch, as a `Trainer(compute_loss_func=...)`.

        Args:
            outputs: the model's output (with `logits` `[B, classes]`).
            labels (`torch.Tensor`): class indices `[B]` (-100 is ignored) or soft targets `[B, classes]`.
            num_items_in_batch (*optional*): Trainer's item count of the accumulated batch; the
                cross-entropy is then normalised by it, as Trainer expects.
        """
        logits = outputs["logits"]
        labels = labels.to(logits.device)
        if num_items_in_batch is None:
            ce_loss = F.cross_entropy(logits, labels)
        else:  # Trainer counts every element of soft targets: `classes` per image
            items = num_items_in_batch / (logits.shape[-1] if labels.is_floating_point() else 1)
            ce_loss = F.cross_entropy(logits, labels, reduction="sum") / items
        term = self.penalty(labels, num_items_in_batch, ce_loss)
        if term is None:
            raise RuntimeError(
                "No [CLS] scores were captured for these outputs: build SpatialEntropyLoss with the model that "
                "produced them."
            )
        return ce_loss + term[0]

    def _add_to_model_loss(self, model, args, kwargs, output):
        """Forward hook: adds the term to the loss that the model computed from `labels`."""
        labels = kwargs.get("labels")
        loss = output[0] if isinstance(output, tuple) else getattr(output, "loss", None)
        if labels is None or loss is None:  # inference, or Trainer kept the labels for its own loss
            return None
        term = self.penalty(labels, kwargs.get("num_items_in_batch"), loss)
        if term is None:  # the model added the term itself
            return None
        if isinstance(output, tuple):
            return (loss + term[0], *output[1:])
        output["loss"] = loss + term[0]
        return output


def _check_computes_a_loss(model):
    """ValueError, naming the class to use instead, if `model`'s forward takes no `labels`."""
    if "labels" in inspect.signature(model.forward).parameters:
        return
    # The classes that `AutoModelForImageClassification` may give for this config (DeiT has two).
    classes = MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING.get(type(model.config), ())
    classes = classes if isinstance(classes, tuple) else (classes,)
    usable = [c.__name__ for c in classes if "labels" in inspect.signature(c.forward).parameters]
    advice = f" Fine-tune the checkpoint as {usable[0]}, which does (with a new classifier head)." if usable else ""
    raise ValueError(
        f"{type(model).__name__} computes no loss (its forward takes no `labels`), so there is no loss for "
        f'the SAR term to join and Trainer would fail with "The model did not return a loss".{advice}'
    )


def find_sar_loss(model) -> SpatialEntropyLoss | None:
    """The [`SpatialEntropyLoss`] attached to `model`, through DDP, FSDP, `torch.compile` and PEFT."""
    # PEFT models forward attribute lookups to the model they wrap.
    return getattr(extract_model_from_parallel(model), "sar_loss", None)


__all__ = ["SpatialEntropyLoss", "find_sar_loss"]
