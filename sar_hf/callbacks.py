"""Trainer callback that schedules λ and logs the SAR terms."""

import math
from collections.abc import Callable

from transformers import TrainerCallback
from transformers.utils import logging

from .loss import find_sar_loss

logger = logging.get_logger(__name__)

SCHEDULES = ("warmup_cosine", "constant")
GRANULARITIES = ("auto", "epoch", "step")
# "auto" steps λ per epoch from this many epochs on (the paper's 100-epoch runs, as the authors'
# release does), and per optimizer step in shorter runs, where a per-epoch λ would be 0 on a large
# share of the steps: the first epoch of the warm-up and the last of the cosine.
_EPOCH_GRANULARITY_FROM = 10


class SARCallback(TrainerCallback):
    r"""
    Schedules the SAR weight λ and logs the SAR terms into the Trainer's logs.

    Schedules, with `e` the progress in epochs, `E` the number of epochs, `W` the warm-up
    epochs and `λ*` the peak weight:

    * `"warmup_cosine"` (the paper's): `λ = λ* · e / W` while `e < W`, then
      `λ = λ* · ½ (1 + cos(π (e − W) / (E_end − W)))`, which reaches 0 at the end. Per epoch, `e`
      is the integer epoch index and `E_end = E − 1` (the last epoch, as the authors' release);
      per step, `e` is fractional and `E_end = E`.
    * `"constant"`: `λ = λ*`.
    * a callable `schedule(epoch, num_epochs) -> λ` with fractional epochs.

    λ is a function of `state.global_step` and `state.max_steps` alone, so a run resumed from a
    checkpoint continues the schedule exactly. It is written onto `scheduled_sar_weight` of the
    model's [`SpatialEntropyLoss`] (`model.sar_loss`, found through DDP, FSDP and PEFT); the
    configured `sar_weight`, which checkpoints save, stays the peak. A warning says when the
    schedule leaves λ at 0 on more than half of the steps.

    Logged (means over the logging window and over processes): `sar/entropy`, `sar/ce_loss`,
    `sar/weight`, `sar/skipped_maps` (non-finite maps left out per forward pass), and
    `<prefix>_sar/entropy` after each evaluation; `sar/weight` only when the term was computed
    in that window. A training step that ends without the term added to its loss raises an error:
    with label smoothing or a `compute_loss_func`, Trainer calls the model without labels, and
    only [`SARTrainer`] then adds the term. Use [`SARTrainer`] also so that the reporting
    integrations (TensorBoard, W&B, ...) see the `sar/*` values; a plain `Trainer` puts them in
    `state.log_history` only.

    Args:
        sar_weight (`float`, *optional*):
            Peak λ. Defaults to the loss's (`config.sar_weight` for [`SARViTForImageClassification`]).
        schedule (`str` or callable, *optional*, defaults to `"warmup_cosine"`).
        warmup_epochs (`float`, *optional*):
            Defaults to a tenth of the run, as the paper's 10 warm-up epochs of 100.
        granularity (`str`, *optional*, defaults to `"auto"`):
            `"epoch"` changes λ at epoch boundaries, `"step"` at every optimizer step; `"auto"` is
            `"epoch"` for runs of 10 epochs or more and `"step"` for shorter ones, so that λ > 0 on
            all but a few steps of any run.
        loss_fn ([`SpatialEntropyLoss`], *optional*):
            The loss to drive; defaults to `model.sar_loss`.

    Example:

    ```python
    >>> trainer = SARTrainer(model=model, args=args, train_dataset=train, callbacks=[SARCallback(warmup_epochs=5)])
    ```
    """

    def __init__(
        self,
        sar_weight: float | None = None,
        schedule: str | Callable[[float, float], float] = "warmup_cosine",
        warmup_epochs: float | None = None,
        granularity: str = "auto",
        loss_fn=None,
    ):
        if not callable(schedule) and schedule not in SCHEDULES:
            raise ValueError(f"`schedule` must be one of {SCHEDULES} or a callable, got {schedule!r}.")
        if granularity not in GRANULARITIES:
            raise ValueError(f"`granularity` must be one of {GRANULARITIES}, got {granularity!r}.")
        if warmup_epochs is not None and not warmup_epochs >= 0:
            raise ValueError(f"`warmup_epochs` must be >= 0, got {warmup_epochs}.")
        if sar_weight is not None and (not math.isfinite(sar_weight) or sar_weight < 0):
            raise ValueError(f"`sar_weight` must be a finite number >= 0, got {sar_weight!r}.")
        self.sar_weight = sar_weight
        self.schedule = schedule
        self.warmup_epochs = warmup_epochs
        self.granularity = granularity
        self.loss_fn = loss_fn
        self.current_weight = None
        # Set by SARTrainer, which adds the term to any loss Trainer computes.
        self.trainer_adds_term = False

    def weight_at(self, global_step: int, max_steps: int, num_train_epochs: float) -> float:
        """λ for the optimizer step `global_step` (0-based) of a run of `max_steps` steps."""
        epochs = max(num_train_epochs, 1e-12)
        epoch = global_step * epochs / max(max_steps, 1)  # fractional epochs done
        if callable(self.schedule):
            return float(self.schedule(epoch, epochs))
        if self.schedule == "constant":
            return self.sar_weight
        warmup = epochs / 10 if self.warmup_epochs is None else self.warmup_epochs
        end = epochs
        if self.granularity_for(epochs) == "epoch":
            epoch, end = math.floor(epoch + 1e-9), math.ceil(epochs - 1e-9) - 1
        if epoch < warmup:
            return self.sar_weight * epoch / warmup
        progress = min(1.0, (epoch - warmup) / max(end - warmup, 1e-12))
        return self.sar_weight * 0.5 * (1.0 + math.cos(math.pi * progress))

    def granularity_for(self, num_train_epochs: float) -> str:
        """`"epoch"` or `"step"`: the granularity used in a run of `num_train_epochs` epochs."""
        if self.granularity != "auto":
            return self.granularity
        return "epoch" if num_train_epochs >= _EPOCH_GRANULARITY_FROM else "step"

    def _target(self, model):
        target = self.loss_fn if self.loss_fn is not None else find_sar_loss(model)
        if target is None:
            raise ValueError(
                f"SARCallback needs a model with a SAR loss: a SARViTForImageClassification, or a model passed to "
                f"`SpatialEntropyLoss(model)` first; got {type(model).__name__}."
            )
        return target

    def _set_weight(self, state, model):
        self.current_weight = self.weight_at(state.global_step, state.max_steps, state.num_train_epochs)
        self._target(model).scheduled_sar_weight = self.current_weight

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if args.label_smoothing_factor > 0 and not self.trainer_adds_term:
            raise ValueError(
                "With `label_smoothing_factor > 0`, Trainer computes the loss itself and calls the model without "
                "labels, so a plain Trainer would train without the SAR term. Use `sar_hf.SARTrainer`, which adds "
                "λ·spatial_entropy to whatever loss Trainer computes."
            )
        target = self._target(model)
        if self.sar_weight is None:
            self.sar_weight = target.sar_weight
        self._set_weight(state, model)
        weights = (self.weight_at(step, state.max_steps, state.num_train_epochs) for step in range(state.max_steps))
        zero = sum(weight == 0 for weight in weights)
        if self.sar_weight > 0 and zero > state.max_steps / 2:
            logger.warning(
                f"The SAR schedule leaves λ at 0 on {zero} of the {state.max_steps} steps (granularity "
                f"{self.granularity_for(state.num_train_epochs)!r}, warm-up {self.warmup_epochs} epochs of "
                f"{state.num_train_epochs}); use `granularity='step'` or a shorter warm-up to apply the regulariser."
            )

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self._set_weight(state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self._target(model).capture.pending and model.training:
            raise RuntimeError(
                "This training step's loss was computed without the SAR term: Trainer called the model without "
                "labels (a `compute_loss_func` or label smoothing) and nothing added λ·spatial_entropy. Use "
                "`sar_hf.SARTrainer`, which adds it to whatever loss Trainer computes."
            )

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._target(model).scheduled_sar_weight = None  # outside training, the configured weight holds

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if logs is None or model is None:
            return
        stats = self._target(model).sar_stats
        evaluation = next((k[: -len("_runtime")] for k in logs if k.endswith("_runtime")), None)
        if evaluation == "train":  # the end-of-training summary
            return
        if evaluation is not None:
            means = stats.pop(training=False)
            new = {} if means is None else {f"{evaluation}_sar/entropy": means["entropy"]}
        elif "loss" in logs:
            means = stats.pop(training=True)
            if means is None:  # no training forward computed the term in this window
                return
            new = {f"sar/{name}": value for name, value in means.items()}
            new["sar/weight"] = self.current_weight
        else:
            return
        logs.update(new)
        # Trainer appended a copy of `logs` to the history just before calling us.
        if state.log_history and set(logs) - set(new) <= set(state.log_history[-1]):
            state.log_history[-1].update(new)


__all__ = ["SARCallback"]
