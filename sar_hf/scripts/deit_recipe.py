"""DeiT's training recipe (Touvron et al., https://arxiv.org/abs/2012.12877, Table 9), which the SAR paper trains with.

The whole recipe is here: its values (`RECIPES`, which `--recipe deit` sets), the flags that set
them one by one ([`RecipeArguments`]), its learning-rate rule (5e-4 for a global batch of 512
images, scaled linearly), and its augmentations. DeiT uses timm's RandAugment
(`rand-m9-mstd0.5-inc1`), random erasing, mixup and cutmix; timm needs torchvision, which does not
install beside every torch build, and kornia does. The augmentations run in two stages:

* [`TrainImageTransform`]: per image, [`ImageTransform`]'s crop and flip; then, on the batch that the
  data loader fetches, kornia's `RandAugment` (on `[0, 1]` pixels), normalisation and
  `RandomErasing`. It runs where the data loader runs (its workers, or the main process).
* [`MixupCutmix`]: kornia's `RandomMixUpV2` or `RandomCutMixV2` on a whole batch, on the device the
  batch is on, and the soft targets `[B, classes]` that the mixed images call for, with label
  smoothing folded in (as timm's `Mixup` makes them for its `SoftTargetCrossEntropy`).
  [`MixingTrainer`] mixes each training batch there, before Trainer counts its labels.

Every random draw comes from torch's global generator (kornia draws its parameters on the CPU),
which Trainer seeds from `--seed` and restores when it resumes, so a seed gives the same batches
on any device. Where this departs from DeiT's recipe:

* kornia's RandAugment draws its operations (and here the magnitude) once per call, i.e. once per
  batch; each image then takes each operation with probability 0.5 (timm's per-operation
  probability), so the images of a batch differ, but they draw from the same two operations.
  kornia's ranges are its own (translations reach 10% of the side, timm's 45%).
* Random erasing fills the box with 0 after normalisation (the mean colour, timm's `const` mode);
  DeiT fills it with per-pixel noise (`pixel` mode), which kornia does not offer.
* Mixup and cutmix pair each image with a random other one of the batch (timm: the batch reversed).
* Left out: stochastic depth (Transformers' ViT has no drop path); repeated augmentation (DeiT's
  sampler shows each image three times per batch across the GPUs; Trainer's samplers have no such
  mode); the EMA of the weights (Trainer keeps none; DeiT reports small gains that vanish after
  fine-tuning).
"""

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from kornia.augmentation import RandomCutMixV2, RandomErasing, RandomMixUpV2
from kornia.augmentation.auto import RandAugment
from kornia.augmentation.auto.rand_augment.rand_augment import default_policy

from ..data import ImageTransform
from ..trainer import SARTrainer

#: The operations RandAugment picks from: kornia's default policy, the 15 of timm's `inc1` set.
RANDAUGMENT_OPERATIONS = len(default_policy)
#: timm's RandAugment scale: magnitudes 0..10 (DeiT: 9).
RANDAUGMENT_MAX_MAGNITUDE = 10.0
_KORNIA_MAX_MAGNITUDE = 30.0  # kornia's RandAugment scale
#: timm applies each of the operations that RandAugment picks with this probability.
RANDAUGMENT_OPERATION_PROB = 0.5
#: Named sets of flag values (`--recipe`); a flag given explicitly wins. The learning rate is not
#: among them: it scales with the global batch (`recipe_learning_rate`).
RECIPES = {
    "deit": {
        "randaugment_ops": 2,
        "randaugment_magnitude": 9.0,
        "randaugment_magnitude_std": 0.5,
        "mixup_alpha": 0.8,
        "cutmix_alpha": 1.0,
        "mixup_switch_prob": 0.5,
        "random_erasing_prob": 0.25,
        "label_smoothing_factor": 0.1,
        "weight_decay": 0.05,
        "lr_scheduler_type": "cosine",
        "warmup_epochs": 5.0,
    }
}
#: DeiT's linear scaling rule: a learning rate of 5e-4 for a global batch of 512 images.
LEARNING_RATE_PER_IMAGE = {"deit": 5e-4 / 512}


def recipe_learning_rate(recipe: str, training_args) -> float:
    """The recipe's learning rate for the global batch: per device × processes × accumulated batches."""
    batch = training_args.per_device_train_batch_size * training_args.world_size
    return LEARNING_RATE_PER_IMAGE[recipe] * batch * training_args.gradient_accumulation_steps


def check_range(name: str, value: float, low: float, high: float = math.inf) -> None:
    """Raises a `ValueError` naming `name` unless `value` is a finite number in `[low, high]`."""
    if not (low <= value <= high and math.isfinite(value)):
        interval = f"[{low:g}, {high:g}]" if math.isfinite(high) else f"[{low:g}, inf)"
        raise ValueError(f"{name} must be in {interval}, got {value}.")


#: The recipe's flags and their ranges; `RecipeArguments`, `TrainImageTransform` and `MixupCutmix` check them.
LIMITS = {
    "randaugment_ops": (0, RANDAUGMENT_OPERATIONS),
    "randaugment_magnitude": (0, RANDAUGMENT_MAX_MAGNITUDE),
    "randaugment_magnitude_std": (0, math.inf),
    "random_erasing_prob": (0, 1),
    "mixup_alpha": (0, math.inf),
    "cutmix_alpha": (0, math.inf),
    "mixup_switch_prob": (0, 1),
}


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
        for name, value in (
            ("randaugment_ops", randaugment_ops),
            ("randaugment_magnitude", randaugment_magnitude),
            ("randaugment_magnitude_std", randaugment_magnitude_std),
            ("random_erasing_prob", random_erasing_prob),
        ):
            check_range(f"`{name}`", value, *LIMITS[name])
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
        check_range("`mixup_alpha`", mixup_alpha, *LIMITS["mixup_alpha"])
        check_range("`cutmix_alpha`", cutmix_alpha, *LIMITS["cutmix_alpha"])
        if not mixup_alpha and not cutmix_alpha:
            raise ValueError("MixupCutmix needs `mixup_alpha` or `cutmix_alpha` above 0.")
        check_range("`switch_prob`", switch_prob, 0, 1)
        check_range("`label_smoothing`", label_smoothing, 0, 1)
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


class MixingTrainer(SARTrainer):
    """[`SARTrainer`] that mixes every training batch (mixup or cutmix) on the device, before Trainer counts it.

    Trainer draws the batches of an optimizer step in `get_batch_samples`, already on the device
    (Accelerate places them there), and counts their labels to normalise the loss under gradient
    accumulation. Mixing them there lets the model see the mixed images and Trainer count the soft
    targets `[B, classes]` as it counts any labels; the loss is `compute_loss_func` (a soft-target
    cross-entropy) plus the SAR term that [`SARTrainer`] adds. Evaluation batches never come here.

    Args:
        batch_mix ([`MixupCutmix`]): `(pixel_values, labels) -> (mixed pixel_values, soft targets)`.
    """

    def __init__(self, *args, batch_mix: MixupCutmix, **kwargs):
        super().__init__(*args, **kwargs)
        self.batch_mix = batch_mix

    def _mix(self, batch: dict) -> dict:
        pixel_values, labels = (batch[key].to(self.args.device) for key in ("pixel_values", "labels"))
        pixel_values, labels = self.batch_mix(pixel_values, labels)
        return {**batch, "pixel_values": pixel_values, "labels": labels}

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        return super().get_batch_samples(map(self._mix, epoch_iterator), num_batches, device)


@dataclass
class RecipeArguments:
    """The flags of the training recipe: a named recipe, the learning-rate warm-up in epochs, and DeiT's augmentations.

    Each augmentation is off by default; `--recipe deit` sets DeiT's values at once, and a flag
    given explicitly wins over it.
    """

    recipe: str | None = field(
        default=None,
        metadata={
            "help": "Set the flags of a published recipe at once; a flag given explicitly wins. deit: RandAugment "
            "(2 operations, magnitude 9, std 0.5), mixup 0.8, cutmix 1.0 (switch probability 0.5), random erasing "
            "0.25, label smoothing 0.1, AdamW with learning rate 5e-4 * global batch / 512, weight decay 0.05, "
            "5 warm-up epochs and cosine decay.",
            "choices": list(RECIPES),
        },
    )
    warmup_epochs: float | None = field(
        default=None,
        metadata={
            "help": "Learning-rate warm-up in epochs, turned into optimizer steps once the size of the training set "
            "is known; replaces --warmup_steps (DeiT: 5)."
        },
    )
    randaugment_ops: int = field(
        default=0,
        metadata={
            "help": "RandAugment (kornia's): this many random operations per batch of training images, each applied "
            "to an image with probability 0.5. 0: off; DeiT: 2."
        },
    )
    randaugment_magnitude: float = field(
        default=9.0, metadata={"help": "RandAugment's strength on timm's scale, 0 to 10 (DeiT: 9)."}
    )
    randaugment_magnitude_std: float = field(
        default=0.0, metadata={"help": "Standard deviation of RandAugment's magnitude, drawn per batch (DeiT: 0.5)."}
    )
    random_erasing_prob: float = field(
        default=0.0,
        metadata={
            "help": "Probability that a training image has a random box (2-33%% of its area) set to the mean colour. "
            "0: off; DeiT: 0.25."
        },
    )
    mixup_alpha: float = field(
        default=0.0,
        metadata={
            "help": "Mixup: mix each training batch with λ ~ Beta(alpha, alpha), on its device, and train on soft "
            "targets. 0: off; DeiT: 0.8."
        },
    )
    cutmix_alpha: float = field(
        default=0.0,
        metadata={
            "help": "Cutmix: paste a box of 1 − λ of the area, λ ~ Beta(alpha, alpha), from another image of the "
            "batch, and train on soft targets. 0: off; DeiT: 1.0."
        },
    )
    mixup_switch_prob: float = field(
        default=0.5,
        metadata={"help": "With both mixup and cutmix on, the probability that a batch gets cutmix (DeiT: 0.5)."},
    )

    def __post_init__(self):
        if self.recipe is not None and self.recipe not in RECIPES:
            raise ValueError(f"--recipe must be one of {list(RECIPES)}, got {self.recipe!r}.")
        if self.warmup_epochs is not None:
            check_range("--warmup_epochs", self.warmup_epochs, 0)
        for name, (low, high) in LIMITS.items():
            check_range(f"--{name}", getattr(self, name), low, high)

    @property
    def mixes_batches(self) -> bool:
        """Whether training batches are mixed (mixup or cutmix), which makes their targets soft."""
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    def train_transform(self, image_transform: ImageTransform) -> TrainImageTransform:
        """The training transform: `image_transform`'s crops and flips, then RandAugment and random erasing."""
        return TrainImageTransform(
            image_transform,
            randaugment_ops=self.randaugment_ops,
            randaugment_magnitude=self.randaugment_magnitude,
            randaugment_magnitude_std=self.randaugment_magnitude_std,
            random_erasing_prob=self.random_erasing_prob,
        )

    def batch_mix(self, num_classes: int, label_smoothing: float) -> MixupCutmix:
        """Mixup/cutmix of the training batches, with soft targets over `num_classes` smoothed by `label_smoothing`."""
        return MixupCutmix(
            num_classes,
            mixup_alpha=self.mixup_alpha,
            cutmix_alpha=self.cutmix_alpha,
            switch_prob=self.mixup_switch_prob,
            label_smoothing=label_smoothing,
        )


__all__ = [
    "LEARNING_RATE_PER_IMAGE",
    "LIMITS",
    "MixingTrainer",
    "MixupCutmix",
    "RANDAUGMENT_MAX_MAGNITUDE",
    "RANDAUGMENT_OPERATIONS",
    "RECIPES",
    "RecipeArguments",
    "TrainImageTransform",
    "check_range",
    "recipe_learning_rate",
]
