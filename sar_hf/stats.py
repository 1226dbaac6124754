"""Running sums of the SAR terms between two logs, kept on the device (no host sync per step)."""

import torch

_FIELDS = ("entropy", "ce_loss", "skipped_maps")


class SARStats:
    """Sums the spatial entropy, cross-entropy and skipped-map count of the forward passes of each phase.

    Training and evaluation passes are kept apart, so that an evaluation in the middle of a
    logging window does not mix into the training figures. [`SARCallback`] reads and resets
    them at each log, and decides which passes count:

    * training passes count as they come; `reset` at the start of training drops those made
      before it;
    * an evaluation pass counts once `count_evaluation_pass` says that it was a step of an
      evaluation or prediction (Trainer runs the model once per prediction step), so that
      inference of your own, before, between or after them, never mixes into their figures.
    """

    def __init__(self):
        self._sums = {True: None, False: None}
        self._evaluation_pass = None  # the last evaluation pass, until it is counted

    def update(self, training: bool, entropy: torch.Tensor, ce_loss: torch.Tensor | None, skipped: torch.Tensor):
        """Add one forward pass: 0-dim `entropy` (nats), `ce_loss` (nats, or None) and `skipped` (maps)."""
        if torch.compiler.is_exporting():  # `torch.export` traces with fake tensors: nothing to log
            return
        ce = torch.full_like(entropy, float("nan")) if ce_loss is None else ce_loss.float()
        row = torch.stack([entropy.float(), ce, skipped.float(), torch.ones_like(entropy, dtype=torch.float)])
        if training:
            self._add(True, row.detach())
        else:
            self._evaluation_pass = row.detach()

    def count_evaluation_pass(self):
        """Counts the last evaluation pass (once) in the evaluation figures."""
        row, self._evaluation_pass = self._evaluation_pass, None
        if row is not None:
            self._add(False, row)

    def reset(self):
        """Drops every pass not yet popped."""
        self._sums = {True: None, False: None}
        self._evaluation_pass = None

    def _add(self, training: bool, row: torch.Tensor):
        current = self._sums[training]
        self._sums[training] = row if current is None else current + row.to(current.device)

    def pop(self, training: bool) -> dict[str, float] | None:
        """Means per forward pass since the last pop, averaged over processes; None if there were none.

        Every process must call it at the same time when training is distributed.
        """
        sums, self._sums[training] = self._sums[training], None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if sums is None:  # this process saw no batch; it still takes part, with a row like `update`'s
                sums = torch.zeros(len(_FIELDS) + 1, dtype=torch.float, device=_reduction_device())
            sums = sums.to(_reduction_device())
            torch.distributed.all_reduce(sums)
        if sums is None or sums[-1] == 0:
            return None
        means = (sums[:-1] / sums[-1]).tolist()
        # NaN means "no labels were given" (pure inference): leave that field out.
        return {name: value for name, value in zip(_FIELDS, means, strict=True) if value == value}


def _reduction_device() -> torch.device:
    backend = torch.distributed.get_backend()
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


__all__ = ["SARStats"]
