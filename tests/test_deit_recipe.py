"""sar_hf.scripts.deit_recipe: DeiT's augmentations on batches, checked against independent calculations, and
the recipe's flags and learning-rate rule."""

import numpy as np
import pytest
import torch
from PIL import Image as PILImage
from scipy import stats

from sar_hf.data import ImageTransform
from sar_hf.scripts.deit_recipe import (
    RECIPES,
    MixupCutmix,
    RecipeArguments,
    TrainImageTransform,
    recipe_learning_rate,
)

MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


def _images(n=16, size=(12, 10), seed=0):
    rng = np.random.default_rng(seed)
    return [PILImage.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


def _transform(**kwargs):
    return TrainImageTransform(ImageTransform((16, 16), MEAN, STD, augment=True, hflip=True), **kwargs)


def _seeded(function, seed=0):
    torch.manual_seed(seed)
    return function()


def test_without_batch_operations_it_is_the_per_image_transform():
    images = _images()
    per_image = ImageTransform((16, 16), MEAN, STD, augment=True, hflip=True)
    expected = _seeded(lambda: torch.stack([per_image(image) for image in images]))
    torch.testing.assert_close(_seeded(lambda: _transform()(images)), expected)


def test_randaugment_changes_some_images_of_a_batch_and_is_reproducible():
    images = _images(32)
    plain = _seeded(lambda: _transform()(images))
    augment = _transform(randaugment_ops=2, randaugment_magnitude=9, randaugment_magnitude_std=0.5)
    first, second = _seeded(lambda: augment(images)), _seeded(lambda: augment(images))
    torch.testing.assert_close(first, second)
    changed = (first - plain).flatten(1).abs().amax(1) > 1e-4
    # Each image takes each of the batch's two operations with probability 0.5: some take neither.
    assert 0 < changed.sum() < len(images)
    low, high = (-torch.tensor(MEAN) / torch.tensor(STD)), (1 - torch.tensor(MEAN)) / torch.tensor(STD)
    assert (first >= low.view(3, 1, 1) - 1e-5).all() and (first <= high.view(3, 1, 1) + 1e-5).all()  # [0, 1] pixels


def test_randaugment_magnitude_is_drawn_per_batch_and_clipped():
    augment = _transform(randaugment_ops=1, randaugment_magnitude=9.5, randaugment_magnitude_std=2.0)
    magnitudes = []
    for seed in range(20):
        torch.manual_seed(seed)
        augment(_images(2))
        magnitudes.append(augment.randaugment.m)
    assert len(set(magnitudes)) > 1 and max(magnitudes) == 30  # clipped at kornia's top (timm's 10)
    fixed = _transform(randaugment_ops=1)  # DeiT's magnitude 9 and no spread by default
    for seed in range(2):
        _seeded(lambda: fixed(_images(2)), seed)
        assert fixed.randaugment.m == 27


def test_randaugment_magnitude_is_normal_clipped_at_0():
    """timm's `mstd`: each batch's magnitude is N(m, std) clipped to 0..10, here m = 2, std = 2 (16% of draws at 0)."""
    augment = _transform(randaugment_ops=1, randaugment_magnitude=2.0, randaugment_magnitude_std=2.0)

    class Recorder(torch.nn.Module):  # stands in for kornia's RandAugment: keeps the magnitude that it is given
        m = None

        def forward(self, pixels):
            magnitudes.append(self.m / 3)  # kornia's 0..30 -> timm's 0..10
            return pixels

    magnitudes = []
    augment.randaugment = Recorder()
    torch.manual_seed(0)
    for _ in range(400):
        augment._augment(torch.zeros(1, 3, 2, 2))
    magnitudes = np.array(magnitudes)
    assert magnitudes.min() == 0 and magnitudes.max() <= 10
    at_zero = int((magnitudes == 0).sum())
    assert stats.binomtest(at_zero, len(magnitudes), stats.norm.cdf(0, 2, 2)).pvalue > 1e-3
    above = stats.truncnorm((0 - 2) / 2, (10 - 2) / 2, loc=2, scale=2)  # the draws that were not clipped
    assert stats.kstest(magnitudes[magnitudes > 0], above.cdf).pvalue > 1e-3


def test_random_erasing_sets_one_box_per_image_to_the_mean_colour():
    images = _images(12)
    plain = _seeded(lambda: _transform()(images))
    erased = _seeded(lambda: _transform(random_erasing_prob=1.0)(images))
    for before, after in zip(plain, erased, strict=True):
        changed = (before != after).any(0)  # [H, W]
        rows, cols = torch.nonzero(changed, as_tuple=True)
        assert rows.numel() > 0
        box = torch.zeros_like(changed)
        box[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] = True
        assert torch.equal(box, changed | (box & (after == 0).all(0)))  # a rectangle (pixels already 0 may hide)
        assert (after[:, box] == 0).all()  # 0 after normalisation: the mean colour
        assert 0.02 - 1 / 16 <= box.float().mean() <= 1 / 3 + 1 / 16  # kornia's area range, up to rounding
    none = _seeded(lambda: _transform(random_erasing_prob=0.0)(images))
    torch.testing.assert_close(none, plain)


def _distinct(batch=8, side=6):
    """Images whose pixels all differ, classes 0..B-1 (so that a partner is known from its class)."""
    pixel_values = torch.randperm(batch * 3 * side * side, generator=torch.Generator().manual_seed(0)).float()
    return pixel_values.view(batch, 3, side, side) / pixel_values.numel(), torch.arange(batch)


def _partners(targets, labels, smoothing, num_classes):
    """From soft targets: each image's partner and the partner's share w (independently of kornia's output)."""
    raw = (targets - smoothing / num_classes) / (1 - smoothing)  # undo the smoothing: (1 - w) e_y + w e_y'
    partner, weight = [], []
    for i, row in enumerate(raw):
        others = row.clone()
        others[labels[i]] = 0
        j = int(others.argmax())
        w = float(others[j])
        partner.append(j if w > 1e-6 else i)
        weight.append(w)
        torch.testing.assert_close(row.sum(), torch.tensor(1.0))
    return torch.tensor(partner), torch.tensor(weight)


def test_mixup_is_the_convex_combination_its_soft_targets_state():
    images, labels = _distinct()
    mixup = MixupCutmix(8, mixup_alpha=0.8, label_smoothing=0.1)
    mixed, targets = _seeded(lambda: mixup(images, labels))
    assert targets.shape == (8, 8) and targets.min() >= 0.1 / 8 - 1e-7
    partner, weight = _partners(targets, labels, 0.1, 8)
    assert (partner != torch.arange(8)).any() and len(set(weight[partner != torch.arange(8)].tolist())) == 1
    expected = (1 - weight.view(-1, 1, 1, 1)) * images + weight.view(-1, 1, 1, 1) * images[partner]
    torch.testing.assert_close(mixed, expected)


def test_mixup_lambda_follows_beta_alpha_alpha():
    mixup = MixupCutmix(2, mixup_alpha=0.3)
    images, labels = _distinct(batch=2, side=1)
    torch.manual_seed(0)
    lambdas = []
    while len(lambdas) < 400:
        _, targets = mixup(images, labels)
        partner, weight = _partners(targets, labels, 0.0, 2)
        if partner[0] == 1:  # paired with the other image, not itself
            lambdas.append(float(weight[0]))
    assert stats.kstest(lambdas, stats.beta(0.3, 0.3).cdf).pvalue > 1e-3
    assert stats.kstest(lambdas, stats.uniform().cdf).pvalue < 1e-3  # kornia's own draw would be uniform


def test_cutmix_pastes_a_box_whose_area_is_the_partner_share():
    images, labels = _distinct(batch=8, side=10)
    cutmix = MixupCutmix(8, cutmix_alpha=1.0)
    boxes = []
    for seed in range(5):
        mixed, targets = _seeded(lambda: cutmix(images, labels), seed)
        partner, weight = _partners(targets, labels, 0.0, 8)
        for i in range(8):
            if partner[i] == i:
                torch.testing.assert_close(mixed[i], images[i])
                continue
            pasted = (mixed[i] == images[partner[i]]).all(0)
            assert (pasted | (mixed[i] == images[i]).all(0)).all()  # every pixel is one image's or the other's
            rows, cols = torch.nonzero(pasted, as_tuple=True)
            box = (int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1)
            assert pasted.sum() == (box[1] - box[0]) * (box[3] - box[2])  # a rectangle
            assert float(pasted.float().mean()) == pytest.approx(float(weight[i]))  # the partner's share
            boxes.append((seed, box))
        assert len({box for s, box in boxes if s == seed}) <= 1  # one box for the batch (DeiT's batch mode)


def test_cutmix_lambda_follows_beta_alpha_alpha():
    """The box's share of the area is 1 − λ, λ ~ Beta(α, α); at α = 0.3 most boxes are tiny or nearly whole, so
    few shares fall between 0.25 and 0.75 (Beta(0.3, 0.3): 22%; kornia's default α = 1: 50%)."""
    cutmix = MixupCutmix(8, cutmix_alpha=0.3)
    images, labels = _distinct(batch=8, side=32)
    torch.manual_seed(0)
    shares = []
    for _ in range(150):
        _, targets = cutmix(images, labels)
        shares.append(float((1 - targets[labels, labels]).max()))  # any image whose partner is another one
    middle = sum(0.25 < share < 0.75 for share in shares)
    beta = stats.beta(0.3, 0.3)
    assert stats.binomtest(middle, len(shares), beta.cdf(0.75) - beta.cdf(0.25)).pvalue > 1e-3


@pytest.mark.parametrize("switch_prob, cutmix_expected", [(0.0, False), (1.0, True)])
def test_switch_probability_chooses_between_mixup_and_cutmix(switch_prob, cutmix_expected):
    images, labels = _distinct()
    both = MixupCutmix(8, mixup_alpha=1.0, cutmix_alpha=1.0, switch_prob=switch_prob)
    for seed in range(4):
        mixed, _ = _seeded(lambda: both(images, labels), seed)
        own_or_other = [(mixed[i] == images[i]).all(0) | (mixed[i] == images).all(1).any(0) for i in range(8)]
        assert all(mask.all() for mask in own_or_other) == cutmix_expected


@pytest.mark.parametrize("mixup_alpha, cutmix_alpha, switch_prob", [(1.0, 0.0, 0.5), (1.0, 1.0, 0.0), (1.0, 1.0, 0.5)])
def test_a_draw_equal_to_the_switch_probability_is_mixup(monkeypatch, mixup_alpha, cutmix_alpha, switch_prob):
    """Cutmix when the draw u ~ U[0, 1) is below the switch probability: u = p (0 can be drawn) is mixup, and
    mixup alone never reaches for the cutmix that it does not have."""
    import sar_hf.scripts.deit_recipe as recipe

    mix = MixupCutmix(8, mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, switch_prob=switch_prob)

    class Torch:  # torch, with the switch's draw fixed at the switch probability (kornia's own draws untouched)
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def rand(*size, **kwargs):
            return torch.full(size[0] if size and isinstance(size[0], tuple) else size, switch_prob)

    monkeypatch.setattr(recipe, "torch", Torch())
    images, labels = _distinct()
    mixed, targets = _seeded(lambda: mix(images, labels))
    partner, weight = _partners(targets, labels, 0.0, 8)
    expected = (1 - weight.view(-1, 1, 1, 1)) * images + weight.view(-1, 1, 1, 1) * images[partner]
    torch.testing.assert_close(mixed, expected)  # a convex combination: mixup


def test_targets_fold_the_smoothing_in():
    mix = MixupCutmix(5, mixup_alpha=1.0, label_smoothing=0.2)
    targets = mix.soft_targets(torch.tensor([1.0, 3.0]), torch.tensor([1.0, 0.0]), torch.tensor([0.3, 0.25]))
    expected = torch.tensor([[0.04, 0.84, 0.04, 0.04, 0.04], [0.04 + 0.2, 0.04, 0.04, 0.04 + 0.6, 0.04]])
    torch.testing.assert_close(targets, expected)


def test_same_seed_same_batches():
    images, labels = _distinct()
    mix = MixupCutmix(8, mixup_alpha=0.8, cutmix_alpha=1.0)
    first = [_seeded(lambda: mix(images, labels), seed) for seed in range(4)]
    again = [_seeded(lambda: mix(images, labels), seed) for seed in range(4)]
    for (a, ta), (b, tb) in zip(first, again, strict=True):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(ta, tb)
    assert any(not torch.equal(first[0][1], other[1]) for other in first[1:])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_mixing_runs_on_the_device_and_draws_as_on_the_cpu():
    images, labels = _distinct()
    mix = MixupCutmix(8, mixup_alpha=0.8, cutmix_alpha=1.0)
    for seed in range(4):
        cpu = _seeded(lambda: mix(images, labels), seed)
        gpu = _seeded(lambda: mix(images.cuda(), labels.cuda()), seed)
        assert gpu[0].device.type == "cuda" and gpu[1].device.type == "cuda"
        torch.testing.assert_close(gpu[0].cpu(), cpu[0])
        torch.testing.assert_close(gpu[1].cpu(), cpu[1])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mixup_alpha=-0.1), r"`mixup_alpha` must be in \[0, inf\), got -0.1."),
        (dict(cutmix_alpha=float("inf")), r"`cutmix_alpha` must be in \[0, inf\), got inf."),
        (dict(mixup_alpha=float("nan")), r"`mixup_alpha` must be in \[0, inf\), got nan."),
        (dict(mixup_alpha=1.0, switch_prob=1.5), r"`switch_prob` must be in \[0, 1\], got 1.5."),
        (dict(mixup_alpha=1.0, switch_prob=-0.5), r"`switch_prob` must be in \[0, 1\], got -0.5."),
        (dict(mixup_alpha=1.0, label_smoothing=-0.1), r"`label_smoothing` must be in \[0, 1\], got -0.1."),
        (dict(mixup_alpha=1.0, label_smoothing=1.5), r"`label_smoothing` must be in \[0, 1\], got 1.5."),
        (dict(), r"MixupCutmix needs `mixup_alpha` or `cutmix_alpha` above 0."),
    ],
)
def test_bad_mixing_settings(kwargs, message):
    with pytest.raises(ValueError, match=f"^{message}$"):  # the whole message: what a user reads
        MixupCutmix(10, **kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(randaugment_ops=16), r"`randaugment_ops` must be in \[0, 15\], got 16."),
        (
            dict(randaugment_ops=2, randaugment_magnitude=10.5),
            r"`randaugment_magnitude` must be in \[0, 10\], got 10.5.",
        ),
        (dict(randaugment_magnitude_std=-1), r"`randaugment_magnitude_std` must be in \[0, inf\), got -1."),
        (dict(random_erasing_prob=1.2), r"`random_erasing_prob` must be in \[0, 1\], got 1.2."),
    ],
)
def test_bad_image_augmentation_settings(kwargs, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        _transform(**kwargs)


def test_the_ends_of_every_range_are_accepted():
    """The bounds are inclusive: 0 and 1 for the probabilities, all 15 operations, magnitudes 0 and 10."""
    for ops, magnitude, erasing in [(15, 10.0, 1.0), (0, 0.0, 0.0), (1, 0.0, 1.0)]:
        transform = _transform(randaugment_ops=ops, randaugment_magnitude=magnitude, random_erasing_prob=erasing)
        assert transform(_images(2)).shape == (2, 3, 16, 16)
    for switch_prob, smoothing in [(0.0, 0.0), (1.0, 1.0)]:
        MixupCutmix(10, mixup_alpha=1.0, cutmix_alpha=1.0, switch_prob=switch_prob, label_smoothing=smoothing)


def test_batch_operations_run_on_one_cpu_thread_and_restore_the_thread_count(monkeypatch):
    transform = _transform(randaugment_ops=1)
    mix = MixupCutmix(8, mixup_alpha=1.0)
    seen = []
    for module in (transform.randaugment, mix.mixup):
        forward = module.forward
        monkeypatch.setattr(
            module, "forward", lambda *a, _f=forward, **k: seen.append(torch.get_num_threads()) or _f(*a, **k)
        )
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # so that one thread inside is not the default
    try:
        transform(_images(2))
        mix(*_distinct())
        assert seen == [1, 1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_the_learning_rate_scales_with_the_global_batch():
    """5e-4 for 512 images a step, whatever splits them: devices, processes, accumulated batches."""
    from types import SimpleNamespace

    for per_device, processes, accumulation in [(512, 1, 1), (64, 8, 1), (16, 8, 4), (128, 1, 4)]:
        args = SimpleNamespace(
            per_device_train_batch_size=per_device, world_size=processes, gradient_accumulation_steps=accumulation
        )
        assert recipe_learning_rate("deit", args) == pytest.approx(5e-4)
    args = SimpleNamespace(per_device_train_batch_size=64, world_size=2, gradient_accumulation_steps=1)
    assert recipe_learning_rate("deit", args) == pytest.approx(1.25e-4)


def test_recipe_arguments_build_the_augmentations_they_name():
    """Every flag reaches the transform and the mixing it builds (none parsed and then dropped)."""
    values = {key: value for key, value in RECIPES["deit"].items() if key in RecipeArguments.__dataclass_fields__}
    recipe = RecipeArguments(**{**values, "mixup_switch_prob": 0.3, "randaugment_magnitude": 7.0})
    assert recipe.mixes_batches and not RecipeArguments().mixes_batches
    image_transform = ImageTransform((16, 16), MEAN, STD, augment=True, hflip=True)
    transform = recipe.train_transform(image_transform)
    assert (transform.randaugment.n, transform.magnitude, transform.magnitude_std) == (2, 7.0, 0.5)
    assert transform.erasing.p == 0.25
    images = _images(8)
    expected = TrainImageTransform(image_transform, 2, 7.0, 0.5, 0.25)  # the same flags, given by hand
    torch.testing.assert_close(_seeded(lambda: transform(images)), _seeded(lambda: expected(images)))
    mix = recipe.batch_mix(10, label_smoothing=0.1)
    assert (mix.switch_prob, mix.label_smoothing, mix.num_classes) == (0.3, 0.1, 10)
    assert mix.mixup_lambda.concentration0 == pytest.approx(0.8) and mix.cutmix is not None
    assert RecipeArguments(cutmix_alpha=1.0).batch_mix(3, 0.0).switch_prob == 1.0  # cutmix alone: always cutmix


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(recipe="vit"), r"--recipe must be one of \['deit'\], got 'vit'."),
        (dict(warmup_epochs=-1.0), r"--warmup_epochs must be in \[0, inf\), got -1.0."),
        (dict(warmup_epochs=float("nan")), r"--warmup_epochs must be in \[0, inf\), got nan."),
        (dict(randaugment_ops=16), r"--randaugment_ops must be in \[0, 15\], got 16."),
        (dict(randaugment_magnitude=-1.0), r"--randaugment_magnitude must be in \[0, 10\], got -1.0."),
        (dict(randaugment_magnitude=11.0), r"--randaugment_magnitude must be in \[0, 10\], got 11.0."),
        (dict(randaugment_magnitude_std=-0.5), r"--randaugment_magnitude_std must be in \[0, inf\), got -0.5."),
        (dict(random_erasing_prob=1.5), r"--random_erasing_prob must be in \[0, 1\], got 1.5."),
        (dict(mixup_alpha=-1.0), r"--mixup_alpha must be in \[0, inf\), got -1.0."),
        (dict(cutmix_alpha=float("inf")), r"--cutmix_alpha must be in \[0, inf\), got inf."),
        (dict(mixup_switch_prob=-0.1), r"--mixup_switch_prob must be in \[0, 1\], got -0.1."),
    ],
)
def test_bad_recipe_flags_are_refused_when_parsed(kwargs, message):
    """The flags are checked as they are parsed, before any data is loaded, and the message names the flag."""
    with pytest.raises(ValueError, match=f"^{message}$"):
        RecipeArguments(**kwargs)


def test_recipe_flags_at_the_ends_of_their_ranges_are_accepted():
    RecipeArguments(recipe="deit", warmup_epochs=0.5)  # a fraction of an epoch
    RecipeArguments(warmup_epochs=0.0, randaugment_ops=15, randaugment_magnitude=10.0, random_erasing_prob=1.0)
    RecipeArguments(randaugment_magnitude=0.0, mixup_switch_prob=1.0, mixup_alpha=0.0, cutmix_alpha=0.0)
    RecipeArguments(mixup_switch_prob=0.0)


def test_the_old_import_path_keeps_working():
    import sar_hf.augmentation as old

    assert (old.MixupCutmix, old.TrainImageTransform) == (MixupCutmix, TrainImageTransform)


def test_randaugment_keeps_pixels_in_0_1():
    """As timm's operations on 8-bit images keep them. kornia rotates a white image a rounding error above 1
    (bilinear weights that sum to 1 + 1 ulp), and an inversion or solarisation after that takes it below 0: these
    seeds draw such a pair of operations for a batch (and kornia's m = 13, a rotation of 13 degrees)."""
    white = [PILImage.new("RGB", (32, 32), "white")] * 16
    transform = TrainImageTransform(
        ImageTransform((32, 32), [0.0] * 3, [1.0] * 3), randaugment_ops=2, randaugment_magnitude=13 / 3
    )
    for seed in (600, 1114, 1280):
        pixels = _seeded(lambda: transform(white), seed)  # mean 0, std 1: the pixels as RandAugment leaves them
        assert pixels.min() == 0 and pixels.max() == 1, seed


def _mixing_trainer(tmp_path, batch_mix, *args, **kwargs):
    from tiny import TINY
    from transformers import TrainingArguments

    from sar_hf import SARViTConfig, SARViTForImageClassification
    from sar_hf.scripts.deit_recipe import MixingTrainer

    model = SARViTForImageClassification(SARViTConfig(**TINY))
    training_args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, save_strategy="no")
    if args:  # positionally, as Trainer(model, args, data_collator, train_dataset) takes them
        return MixingTrainer(model, training_args, *args, batch_mix=batch_mix, **kwargs), model, training_args
    return MixingTrainer(model=model, args=training_args, batch_mix=batch_mix, **kwargs), model, training_args


def test_the_mixing_trainer_mixes_each_batch_of_an_optimizer_step_and_keeps_its_other_keys(tmp_path):
    """What `get_batch_samples` hands Trainer: the first `num_batches` batches, each mixed by `batch_mix` (images and
    soft targets replaced, any other key kept); the rest stays in the iterator for the next step."""
    seen = []

    def mix(pixel_values, labels):  # a mixing that shows what it was given
        seen.append((pixel_values, labels))
        return pixel_values.flip(-1), torch.nn.functional.one_hot(labels, 3).float() * 0.5

    trainer, *_ = _mixing_trainer(tmp_path, mix)
    batches = [
        {"pixel_values": torch.randn(2, 3, 16, 16), "labels": torch.tensor([k % 3, (k + 1) % 3]), "index": k}
        for k in range(3)
    ]
    iterator = iter(batches)
    samples, _ = trainer.get_batch_samples(iterator, 2, trainer.args.device)
    assert next(iterator) is batches[2] and len(samples) == 2 and len(seen) == 2
    for batch, sample, (pixel_values, labels) in zip(batches[:2], samples, seen, strict=True):
        assert torch.equal(pixel_values, batch["pixel_values"]) and torch.equal(labels, batch["labels"])
        assert sorted(sample) == ["index", "labels", "pixel_values"] and sample["index"] == batch["index"]
        torch.testing.assert_close(sample["pixel_values"], batch["pixel_values"].flip(-1), rtol=0, atol=0)
        expected = torch.zeros(2, 3)
        expected[torch.arange(2), batch["labels"]] = 0.5
        torch.testing.assert_close(sample["labels"], expected, rtol=0, atol=0)


def test_the_mixing_trainer_takes_the_trainers_arguments_by_position(tmp_path):
    """`MixingTrainer(model, args, data_collator, train_dataset, batch_mix=...)`, as Trainer takes them."""
    from tiny import TinyImages

    data = TinyImages(4)
    mix = MixupCutmix(3, mixup_alpha=1.0)
    trainer, model, training_args = _mixing_trainer(tmp_path, mix, None, data)
    assert trainer.model is model and trainer.args is training_args and trainer.train_dataset is data
    assert trainer.batch_mix is mix
