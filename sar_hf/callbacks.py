"""Trainer callback that schedules λ and logs the SAR terms."""

import math
from collections.abc import Callable

from accelerate.utils import extract_model_from_parallel
from transformers import TrainerCallback

SCHEDULES = ("warmup_cosine", "constant")


class SARCallback(TrainerCallback):
    r"""
    Schedules the SAR weight λ and logs the SAR terms into the Trainer's logs.

    Schedules, with `e` the progress in epochs, `E` the number of epochs, `W` the warm-up
    epochs and `λ*` the peak weight:

    * `"warmup_cosine"` (the paper's): `λ = λ* · e / W` while `e < W`, then
      `λ = λ* · ½ (1 + cos(π (e − W) / (E_end − W)))`, which reaches 0 at the end. With the default
      per-epoch granularity `e` is the integer epoch index and `E_end = E − 1` (the last epoch, as
      the authors' release); per step, `e` is fractional and `E_end = E`.
    * `"constant"`: `λ = λ*`.
    * a callable `schedule(epoch, num_epochs) -> λ` with fractional epochs.

    λ is a function of `state.global_step` and `state.max_steps` alone, so a run resumed from a
    checkpoint continues the schedule exactly. It is written onto `scheduled_sar_weight` of the
    model ([`SARViTForImageClassification`], DDP/FSDP unwrapped) or of `loss_fn`
    ([`SpatialEntropyLoss`]); the configured `sar_weight`, which checkpoints save, stays the peak.

    Logged (means over the logging window and over processes): `sar/entropy`, `sar/ce_loss`,
    `sar/weight`, `sar/skipped_maps` (non-finite maps left out per forward pass), and
    `<prefix>_sar/entropy` after each evaluation. Use [`SARTrainer`] so that the reporting
    integrations (TensorBoard, W&B, ...) see them too; a plain `Trainer` puts them in
    `state.log_history` only.

    Args:
        sar_weight (`float`, *optional*):
            Peak λ. Defaults to the model's `config.sar_weight` (or the loss's) at the start of training.
        schedule (`str` or callable, *optional*, defaults to `"warmup_cosine"`).
        warmup_epochs (`float`, *optional*, defaults to 10):
            The paper warms up for 10 epochs of a 100-epoch run; scale it with short runs.
        granularity (`str`, *optional*, defaults to `"epoch"`):
            `"epoch"` changes λ at epoch boundaries, `"step"` at every optimizer step.
        loss_fn ([`SpatialEntropyLoss`], *optional*):
            The loss to drive instead of the model (generic path).

    Example:

    ```python
    >>> trainer = SARTrainer(model=model, args=args, train_dataset=train, callbacks=[SARCallback(warmup_epochs=5)])
    ```
    """

    def __init__(
        self,
        sar_weight: float | None = None,
        schedule: str | Callable[[float, float], float] = "warmup_cosine",
        warmup_epochs: float = 10,
        granularity: str = "epoch",
        loss_fn=None,
    ):
        if not callable(schedule) and schedule not in SCHEDULES:
            raise ValueError(f"`schedule` must be one of {SCHEDULES} or a callable, got {schedule!r}.")
        if granularity not in ("epoch", "step"):
            raise ValueError(f"`granularity` must be 'epoch' or 'step', got {granularity!r}.")
        if warmup_epochs < 0:
            raise ValueError(f"`warmup_epochs` must be >= 0, got {warmup_epochs}.")
        if sar_weight is not None and (not math.isfinite(sar_weight) or sar_weight < 0):
            raise ValueError(f"`sar_weight` must be a finite number >= 0, got {sar_weight!r}.")
        self.sar_weight = sar_weight
        self.schedule = schedule
        self.warmup_epochs = warmup_epochs
        self.granularity = granularity
        self.loss_fn = loss_fn
        self.current_weight = None

    def weight_at(self, global_step: int, max_steps: int, num_train_epochs: float) -> float:
        """λ for the optimizer step `global_step` (0-based) of a run of `max_steps` steps."""
        epochs = max(num_train_epochs, 1e-12)
        epoch = global_step * epochs / max(max_steps, 1)  # fractional epochs done
        if callable(self.schedule):
            return float(self.schedule(epoch, epochs))
        if self.schedule == "constant":
            return self.sar_weight
        end = epochs
        if self.granularity == "epoch":
            epoch, end = math.floor(epoch + 1e-9), math.ceil(epochs - 1e-9) - 1
        if epoch < self.warmup_epochs:
            return self.sar_weight * epoch / self.warmup_epochs
        progress = min(1.0, (epoch - self.warmup_epochs) / max(end - self.warmup_epochs, 1e-12))
        return self.sar_weight * 0.5 * (1.0 + math.cos(math.pi * progress))

    def _target(self, model):
        if self.loss_fn is not None:
            return self.loss_fn
        model = extract_model_from_parallel(model)
        if not hasattr(model, "sar_stats"):
            raise ValueError(
                f"SARCallback needs a SARViTForImageClassification or `loss_fn=SpatialEntropyLoss(...)`, "
                f"got {type(model).__name__} and no loss_fn."
            )
        return model

    def _set_weight(self, state, model):
        target = self._target(model)
        self.current_weight = self.weight_at(state.global_step, state.max_steps, state.num_train_epochs)
        target.scheduled_sar_weight = self.current_weight

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.sar_weight is None:
            target = self._target(model)
            self.sar_weight = target.sar_weight if target is self.loss_fn else target.config.sar_weight
        self._set_weight(state, model)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self._set_weight(state, model)

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
            means = stats.pop(training=True) or {}
            new = {f"sar/{name}": value for name, value in means.items()}
            new["sar/weight"] = self.current_weight
        else:
            return
        logs.update(new)
        # Trainer appended a copy of `logs` to the history just before calling us.
        if state.log_history and set(logs) - set(new) <= set(state.log_history[-1]):
            state.log_history[-1].update(new)


__all__ = ["SARCallback"]
