"""Trainer callback that schedules λ and logs the SAR terms."""

import math
from collections.abc import Callable

from transformers import TrainerCallback
from transformers.utils import logging

from .configuration_sar_vit import check_sar_weight
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
    schedule leaves λ at 0 on more than half of the steps, or never reaches its peak (a warm-up
    longer than the run), and how far it gets.

    Logged (means over the logging window and over processes): `sar/entropy`, `sar/ce_loss`,
    `sar/weight`, `sar/skipped_maps` (non-finite maps left out per forward pass), and
    `<prefix>_sar/entropy` for each `evaluate` and `predict` (in the metrics they return);
    `sar/weight` only when the term was computed in that window. Only the passes of training
    and of Trainer's prediction steps count: inference of your own before, between or after
    them stays out of every figure. With label smoothing or a `compute_loss_func`, Trainer calls
    the model without labels and only [`SARTrainer`] adds the term; a plain `Trainer` then stops
    at the first backward that lacks it ([`CLSScoreCapture`]). Use [`SARTrainer`] also so that
    the reporting integrations (TensorBoard, W&B, ...) see the `sar/*` values; a plain `Trainer`
    puts them in `state.log_history` only.

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
        self.sar_weight = None if sar_weight is None else check_sar_weight(sar_weight)
        self.schedule = schedule
        self.warmup_epochs = warmup_epochs
        self.granularity = granularity
        self.loss_fn = loss_fn
        self.current_weight = None

    def weight_at(self, global_step: int, max_steps: int, num_train_epochs: float) -> float:
        """λ for the optimizer step `global_step` (0-based) of a run of `max_steps` steps."""
        epoch, epochs = _epochs_done(global_step, max_steps, num_train_epochs)
        if callable(self.schedule):
            return float(self.schedule(epoch, epochs))
        if self.schedule == "constant":
            return self.sar_weight
        epoch, warmup, end = self._warmup_cosine_clock(epoch, epochs)
        if epoch < warmup:
            return self.sar_weight * epoch / warmup
        progress = min(1.0, (epoch - warmup) / max(end - warmup, 1e-12))
        return self.sar_weight * 0.5 * (1.0 + math.cos(math.pi * progress))

    def _warmup_cosine_clock(self, epoch: float, epochs: float) -> tuple[float, float, float]:
        """`(e, W, E_end)` of the warm-up + cosine schedule `epoch` epochs into a run of `epochs`."""
        warmup = self.warmup_for(epochs)
        if self.granularity_for(epochs) == "epoch":
            return math.floor(epoch + 1e-9), warmup, math.ceil(epochs - 1e-9) - 1
        return epoch, warmup, epochs

    def granularity_for(self, num_train_epochs: float) -> str:
        """`"epoch"` or `"step"`: the granularity used in a run of `num_train_epochs` epochs."""
        if self.granularity != "auto":
            return self.granularity
        return "epoch" if num_train_epochs >= _EPOCH_GRANULARITY_FROM else "step"

    def warmup_for(self, num_train_epochs: float) -> float:
        """The warm-up, in epochs, of a run of `num_train_epochs` epochs."""
        return num_train_epochs / 10 if self.warmup_epochs is None else self.warmup_epochs

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
        target = self._target(model)
        target.sar_stats.reset()  # passes made before training are no part of its logs
        peak = target.sar_weight  # read, and so checked, even when the callback has its own: checkpoints save it
        if self.sar_weight is None:
            self.sar_weight = peak
        self._set_weight(state, model)
        if self.sar_weight > 0:
            self._warn_about_the_schedule(state)

    def _warn_about_the_schedule(self, state):
        """Warns when λ is 0 on more than half of the steps, or when the run ends in the warm-up."""
        steps, epochs = state.max_steps, state.num_train_epochs
        weights = [self.weight_at(step, steps, epochs) for step in range(steps)]
        problems = []
        zero = sum(weight == 0 for weight in weights)
        if zero > steps / 2:
            problems.append(f"leaves λ at 0 on {zero} of the {steps} steps")
        if self.schedule == "warmup_cosine" and steps > 0:
            last, warmup, _ = self._warmup_cosine_clock(*_epochs_done(steps - 1, steps, epochs))
            if last < warmup:
                highest = max(weights)
                problems.append(
                    f"never reaches its peak λ = {self.sar_weight}: the run ends in the warm-up, with λ at most "
                    f"{highest:.3g} ({highest / self.sar_weight:.0%} of the peak)"
                )
        if problems:
            logger.warning(
                f"The SAR schedule {' and '.join(problems)} (granularity {self.granularity_for(epochs)!r}, "
                f"warm-up {self.warmup_for(epochs):g} of {epochs:g} epochs); use a shorter `warmup_epochs` or "
                "`granularity='step'` to apply the regulariser."
            )

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self._set_weight(state, model)

    def on_prediction_step(self, args, state, control, model=None, **kwargs):
        # Trainer runs the model once per prediction step: the last evaluation pass is this step's.
        self._target(model).sar_stats.count_evaluation_pass()

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._target(model).scheduled_sar_weight = None  # outside training, the configured weight holds

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if logs is None or model is None:
            return
        stats = self._target(model).sar_stats
        prefix = _metric_prefix(logs)
        if prefix == "train":  # the end-of-training summary
            return
        if prefix is not None:  # an evaluation's metrics
            new = _evaluation_figures(stats, prefix)
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

    def on_predict(self, args, state, control, metrics=None, model=None, **kwargs):
        # `predict` logs nothing: its figures go into the metrics that it returns.
        if metrics is not None and model is not None and (prefix := _metric_prefix(metrics)) is not None:
            metrics.update(_evaluation_figures(self._target(model).sar_stats, prefix))


def _epochs_done(global_step: int, max_steps: int, num_train_epochs: float) -> tuple[float, float]:
    """(fractional epochs done before `global_step`, the run's length in epochs)."""
    epochs = max(num_train_epochs, 1e-12)
    return global_step * epochs / max(max_steps, 1), epochs


def _metric_prefix(metrics: dict) -> str | None:
    """`"eval"`, `"test"`, ...: the key prefix of an evaluation's metrics (`train` for the training
    summary), read from its `<prefix>_runtime`; None for a training log."""
    return next((key[: -len("_runtime")] for key in metrics if key.endswith("_runtime")), None)


def _evaluation_figures(stats, prefix: str) -> dict[str, float]:
    means = stats.pop(training=False)
    return {} if means is None else {f"{prefix}_sar/entropy": means["entropy"]}


__all__ = ["SARCallback"]
