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
    fixed = _transform(randaugment_ops=1, randaugment_magnitude=9)
    fixed(_images(2))
    assert fixed.randaugment.m == 27


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


@pytest.mark.parametrize("switch_prob, cutmix_expected", [(0.0, False), (1.0, True)])
def test_switch_probability_chooses_between_mixup_and_cutmix(switch_prob, cutmix_expected):
    images, labels = _distinct()
    both = MixupCutmix(8, mixup_alpha=1.0, cutmix_alpha=1.0, switch_prob=switch_prob)
    for seed in range(4):
        mixed, _ = _seeded(lambda: both(images, labels), seed)
        own_or_other = [(mixed[i] == images[i]).all(0) | (mixed[i] == images).all(1).any(0) for i in range(8)]
        assert all(mask.all() for mask in own_or_other) == cutmix_expected


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
        (dict(mixup_alpha=-0.1), r"`mixup_alpha` must be in \[0, inf\), got -0.1"),
        (dict(cutmix_alpha=float("inf")), r"`cutmix_alpha` must be in \[0, inf\), got inf"),
        (dict(mixup_alpha=float("nan")), r"`mixup_alpha` must be in \[0, inf\), got nan"),
        (dict(mixup_alpha=1.0, switch_prob=1.5), r"`switch_prob` must be in \[0, 1\], got 1.5"),
        (dict(mixup_alpha=1.0, label_smoothing=-0.1), r"`label_smoothing` must be in \[0, 1\]"),
        (dict(), "needs `mixup_alpha` or `cutmix_alpha` above 0"),
    ],
)
def test_bad_mixing_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MixupCutmix(10, **kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(randaugment_ops=16), r"`randaugment_ops` must be in \[0, 15\]"),
        (dict(randaugment_ops=2, randaugment_magnitude=10.5), r"`randaugment_magnitude` must be in \[0, 10\]"),
        (dict(randaugment_magnitude_std=-1), r"`randaugment_magnitude_std` must be in \[0, inf\)"),
        (dict(random_erasing_prob=1.2), r"`random_erasing_prob` must be in \[0, 1\]"),
    ],
)
def test_bad_image_augmentation_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _transform(**kwargs)


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
    transform = recipe.train_transform(ImageTransform((16, 16), MEAN, STD))
    assert (transform.randaugment.n, transform.magnitude, transform.magnitude_std) == (2, 7.0, 0.5)
    assert transform.erasing.p == 0.25
    mix = recipe.batch_mix(10, label_smoothing=0.1)
    assert (mix.switch_prob, mix.label_smoothing, mix.num_classes) == (0.3, 0.1, 10)
    assert mix.mixup_lambda.concentration0 == pytest.approx(0.8) and mix.cutmix is not None
    assert RecipeArguments(cutmix_alpha=1.0).batch_mix(3, 0.0).switch_prob == 1.0  # cutmix alone: always cutmix


def test_the_old_import_path_keeps_working():
    import sar_hf.augmentation as old

    assert (old.MixupCutmix, old.TrainImageTransform) == (MixupCutmix, TrainImageTransform)
