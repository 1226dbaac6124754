"""The augmentations of DeiT's training recipe, on batched tensors with kornia.

DeiT (Touvron et al., https://arxiv.org/abs/2012.12877), whose recipe the SAR paper trains with, uses
timm's RandAugment (`rand-m9-mstd0.5-inc1`), random erasing, mixup and cutmix; timm needs
torchvision, which does not install beside every torch build, and kornia does. Two stages:

* [`TrainImageTransform`]: per image, [`ImageTransform`]'s crop and flip; then, on the batch that the
  data loader fetches, kornia's `RandAugment` (on `[0, 1]` pixels), normalisation and
  `RandomErasing`. It runs where the data loader runs (its workers, or the main process).
* [`MixupCutmix`]: kornia's `RandomMixUpV2` or `RandomCutMixV2` on a whole batch, on the device the
  batch is on, and the soft targets `[B, classes]` that the mixed images call for, with label
  smoothing folded in (as timm's `Mixup` makes them for its `SoftTargetCrossEntropy`).

Every random draw comes from torch's global generator (kornia draws its parameters on the CPU),
which Trainer seeds from `--seed` and restores when it resumes, so a seed gives the same batches
on any device. Where this departs from timm's recipe:

* kornia's RandAugment draws its operations (and here the magnitude) once per call, i.e. once per
  batch; each image then takes each operation with probability 0.5 (timm's per-operation
  probability), so the images of a batch differ, but they draw from the same two operations.
  kornia's ranges are its own (translations reach 10% of the side, timm's 45%).
* Random erasing fills the box with 0 after normalisation (the mean colour, timm's `const` mode);
  DeiT fills it with per-pixel noise (`pixel` mode), which kornia does not offer.
* Mixup and cutmix pair each image with a random other one of the batch (timm: the batch reversed).
"""

import contextlib
import math

import torch
import torch.nn.functional as F
from kornia.augmentation import RandomCutMixV2, RandomErasing, RandomMixUpV2
from kornia.augmentation.auto import RandAugment
from kornia.augmentation.auto.rand_augment.rand_augment import default_policy

from .data import ImageTransform

#: The operations RandAugment picks from: kornia's default policy, the 15 of timm's `inc1` set.
RANDAUGMENT_OPERATIONS = len(default_policy)
#: timm's RandAugment scale: magnitudes 0..10 (DeiT: 9).
RANDAUGMENT_MAX_MAGNITUDE = 10.0
_KORNIA_MAX_MAGNITUDE = 30.0  # kornia's RandAugment scale
#: timm applies each of the operations that RandAugment picks with this probability.
RANDAUGMENT_OPERATION_PROB = 0.5


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device | str = "cpu"):
    """Runs torch on one CPU thread within the block (on the CPU; elsewhere it changes nothing).

    A batch here is small (e.g. 64×3×32×32) and kornia runs hundreds of small kernels on it; with
    several intra-op threads, each kernel wakes them all, which gains nothing at this size and
    costs much when other processes hold the cores (8× slower on 2 busy cores). DataLoader
    workers run with one thread anyway.
    """
    if torch.device(device).type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _check_probability(name: str, value: float) -> None:
    if not 0 <= value <= 1:
        raise ValueError(f"`{name}` must be a probability in [0, 1], got {value}.")


class TrainImageTransform:
    """PIL images -> a normalised training batch `[B, 3, H, W]`: crop and flip, RandAugment, random erasing.

    Args:
        image_transform ([`ImageTransform`]):
            The per-image crop, flip, resize and normalisation (its `augment` and `hflip` apply).
        randaugment_ops (`int`, *optional*, defaults to 0):
            Operations RandAugment applies per batch (0: no RandAugment; DeiT: 2), out of
            `RANDAUGMENT_OPERATIONS` (15).
        randaugment_magnitude (`float`, *optional*, defaults to 9):
            Their strength on timm's scale, 0..10 (DeiT: 9).
        randaugment_magnitude_std (`float`, *optional*, defaults to 0):
            Standard deviation of the magnitude, drawn anew for every batch and clipped to 0..10
            (timm's `mstd`; DeiT: 0.5).
        random_erasing_prob (`float`, *optional*, defaults to 0):
            Probability that an image has a random box (2-33% of its area) set to the mean colour
            (DeiT: 0.25).

    Example:

    ```python
    >>> transform = TrainImageTransform(ImageTransform((32, 32), [0.5] * 3, [0.5] * 3, augment=True), 2, 9, 0.5, 0.25)
    >>> transform([PIL.Image.new("L", (8, 8))] * 4).shape
    torch.Size([4, 3, 32, 32])
    ```
    """

    def __init__(
        self,
        image_transform: ImageTransform,
        randaugment_ops: int = 0,
        randaugment_magnitude: float = 9.0,
        randaugment_magnitude_std: float = 0.0,
        random_erasing_prob: float = 0.0,
    ):
        if not 0 <= randaugment_ops <= RANDAUGMENT_OPERATIONS:
            raise ValueError(f"`randaugment_ops` must be in [0, {RANDAUGMENT_OPERATIONS}], got {randaugment_ops}.")
        if not 0 <= randaugment_magnitude <= RANDAUGMENT_MAX_MAGNITUDE:
            raise ValueError(f"`randaugment_magnitude` must be in [0, 10], got {randaugment_magnitude}.")
        if not randaugment_magnitude_std >= 0:
            raise ValueError(f"`randaugment_magnitude_std` must be >= 0, got {randaugment_magnitude_std}.")
        _check_probability("random_erasing_prob", random_erasing_prob)
        self.image_transform = image_transform
        self.magnitude = randaugment_magnitude
        self.magnitude_std = randaugment_magnitude_std
        self.randaugment = None
        if randaugment_ops:
            self.randaugment = RandAugment(n=randaugment_ops, m=15)  # `m` is set for every batch in `__call__`
            for policy in self.randaugment.children():  # one kornia augmentation per candidate operation
                policy[0].op.p = RANDAUGMENT_OPERATION_PROB
        # `value=0` after normalisation is the mean colour.
        self.erasing = RandomErasing(p=random_erasing_prob, value=0.0) if random_erasing_prob else None

    def __call__(self, images) -> torch.Tensor:
        with _one_cpu_thread():
            return self._augment(torch.stack([self.image_transform.pixels(image) for image in images]))

    def _augment(self, pixels: torch.Tensor) -> torch.Tensor:
        """`[B, 3, H, W]` pixels in `[0, 1]` -> RandAugment, normalisation, random erasing."""
        if self.randaugment is not None:
            magnitude = self.magnitude
            if self.magnitude_std:
                magnitude += self.magnitude_std * torch.randn(()).item()
                magnitude = min(max(magnitude, 0.0), RANDAUGMENT_MAX_MAGNITUDE)
            self.randaugment.m = magnitude * _KORNIA_MAX_MAGNITUDE / RANDAUGMENT_MAX_MAGNITUDE
            pixels = self.randaugment(pixels).clamp(0, 1)  # as timm's operations on 8-bit images keep them
        pixels = self.image_transform.normalize(pixels)
        if self.erasing is not None:
            pixels = self.erasing(pixels)
        return pixels


class MixupCutmix:
    r"""Mixup or cutmix on a batch, with the soft targets that the mixed images call for.

    Per batch (timm's `mode="batch"`, as DeiT): cutmix with probability `switch_prob` when both are
    on, else mixup. Mixup draws one `λ ~ Beta(α, α)` and shows every image as `(1 − λ) x + λ x'`
    with `x'` its partner; cutmix draws one `λ ~ Beta(α, α)` and pastes a box of `1 − λ` of the
    area (sides `⌊√(1 − λ)·side⌋`, kornia's) from each partner. With `w` the partner's share
    of the pixels (λ for mixup, the box's area fraction for cutmix), `ε` the label smoothing and
    `C` the classes, the target of an image of class y with a partner of class y' is

        t = (1 − w) · s(y) + w · s(y'),   s(y) = (1 − ε) · onehot(y) + ε / C.

    Args:
        num_classes (`int`): `C`.
        mixup_alpha (`float`, *optional*, defaults to 0): α of mixup's Beta (0: no mixup; DeiT: 0.8).
        cutmix_alpha (`float`, *optional*, defaults to 0): α of cutmix's Beta (0: no cutmix; DeiT: 1.0).
        switch_prob (`float`, *optional*, defaults to 0.5): probability of cutmix when both are on.
        label_smoothing (`float`, *optional*, defaults to 0): `ε` (DeiT: 0.1).

    Example:

    ```python
    >>> mix = MixupCutmix(10, mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1)
    >>> pixel_values, targets = mix(pixel_values, labels)  # [B, 3, H, W], [B] -> [B, 3, H, W], [B, 10]
    ```
    """

    def __init__(
        self,
        num_classes: int,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        switch_prob: float = 0.5,
        label_smoothing: float = 0.0,
    ):
        for name, alpha in (("mixup_alpha", mixup_alpha), ("cutmix_alpha", cutmix_alpha)):
            if not (math.isfinite(alpha) and alpha >= 0):
                raise ValueError(f"`{name}` must be a finite number >= 0, got {alpha}.")
        if not mixup_alpha and not cutmix_alpha:
            raise ValueError("MixupCutmix needs `mixup_alpha` or `cutmix_alpha` above 0.")
        _check_probability("switch_prob", switch_prob)
        _check_probability("label_smoothing", label_smoothing)
        self.num_classes = num_classes
        self.switch_prob = switch_prob if mixup_alpha and cutmix_alpha else float(not mixup_alpha)
        self.label_smoothing = label_smoothing
        self.mixup_lambda = torch.distributions.Beta(mixup_alpha, mixup_alpha) if mixup_alpha else None
        # kornia draws mixup's λ uniformly; `__call__` replaces it with the Beta draw of mixup's paper.
        self.mixup = RandomMixUpV2(data_keys=["input", "class"]) if mixup_alpha else None
        # One box for the whole batch; `use_correct_lambda`: the third column is 1 − the box's area fraction.
        self.cutmix = None
        if cutmix_alpha:
            self.cutmix = RandomCutMixV2(
                beta=cutmix_alpha, same_on_batch=True, use_correct_lambda=True, data_keys=["input", "class"]
            )

    def __call__(self, pixel_values: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`pixel_values` `[B, C, H, W]` and class indices `[B]` -> mixed images and soft targets `[B, classes]`."""
        with _one_cpu_thread(pixel_values.device):
            return self._mix(pixel_values, labels)

    def _mix(self, pixel_values: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.rand(()).item() < self.switch_prob:
            pixel_values, mixed = self.cutmix(pixel_values, labels)  # [1, B, 3]: (y, y', 1 − box area)
            label, partner, own = mixed[0].unbind(-1)
            weight = 1 - own
        else:
            params = self.mixup.forward_parameters(pixel_values.shape)
            params["mixup_lambdas"] = self.mixup_lambda.sample().expand(pixel_values.shape[0]).contiguous()
            pixel_values, mixed = self.mixup(pixel_values, labels, params=params)  # [B, 3]: (y, y', λ)
            label, partner, weight = mixed.unbind(-1)
        return pixel_values, self.soft_targets(label, partner, weight)

    def soft_targets(self, label: torch.Tensor, partner: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """`(1 − w) s(y) + w s(y')` for class indices `y`, `y'` `[B]` and partner shares `w` `[B]` -> `[B, C]`."""
        smooth = self.label_smoothing

        def smoothed(classes):
            return F.one_hot(classes.long(), self.num_classes).float() * (1 - smooth) + smooth / self.num_classes

        weight = weight.float().unsqueeze(-1)
        return (1 - weight) * smoothed(label) + weight * smoothed(partner)


__all__ = ["MixupCutmix", "RANDAUGMENT_MAX_MAGNITUDE", "RANDAUGMENT_OPERATIONS", "TrainImageTransform"]
