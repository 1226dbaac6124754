"""`sar_hf.spatial_entropy` against a slow float64 loop that follows SPEC steps 2-7 literally."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sar_hf import components, spatial_entropy

EIGHT = scipy.ndimage.generate_binary_structure(2, 2)
FOUR = scipy.ndimage.generate_binary_structure(2, 1)


def reference_map(scores: np.ndarray, grid: tuple[int, int], connectivity: int = 8) -> tuple[float, int]:
    """One map, SPEC steps 2-6 in float64: (entropy, number of regions)."""
    s = np.asarray(scores, dtype=np.float64)
    m = s.mean()  # step 2
    mask = s > m
    labels, n = scipy.ndimage.label(mask.reshape(grid), structure=EIGHT if connectivity == 8 else FOUR)  # step 3
    labels = labels.reshape(-1)
    x = np.maximum(s - m, 0.0) + 1e-9  # step 4
    total = math.fsum(x[mask])
    entropy = 0.0
    for r in range(1, n + 1):
        p = math.fsum(x[labels == r]) / total  # step 5
        entropy -= p * math.log(p)  # step 6
    return entropy, n


def reference(scores, grid, connectivity=8) -> np.ndarray:
    """[B, H, n] -> [B, H] float64 entropies, one map at a time."""
    s = scores.detach().double().numpy() if isinstance(scores, torch.Tensor) else np.asarray(scores)
    out = np.zeros(s.shape[:2])
    for b in range(s.shape[0]):
        for h in range(s.shape[1]):
            out[b, h] = reference_map(s[b, h], grid, connectivity)[0]
    return out


def region_counts(scores: torch.Tensor, grid) -> np.ndarray:
    s = scores.detach().double().numpy()
    return np.array([[reference_map(row, grid)[1] for row in rows] for rows in s])


def assert_matches_reference(got: torch.Tensor, expected: np.ndarray, rtol: float) -> None:
    # `rtol` bounds the error relative to each entropy; the tiny `atol` only covers entropies
    # that are themselves ~0 (one dominant region), where a relative bound means nothing.
    np.testing.assert_allclose(got.detach().double().numpy(), expected, rtol=rtol, atol=rtol * 1e-2)


SHAPES = [(2, 3, 14, 14), (1, 1, 1, 1), (3, 2, 1, 16), (2, 2, 16, 1), (2, 6, 7, 13), (1, 2, 32, 32), (1, 1, 64, 64)]


def scores_for(shape, dtype=torch.float32, seed=0, smooth=False):
    b, h, gh, gw = shape
    generator = torch.Generator().manual_seed(seed)
    s = torch.randn(b * h, 1, gh, gw, generator=generator, dtype=torch.float64)
    if smooth:  # blob-shaped maps, closer to trained attention than white noise
        s = torch.nn.functional.avg_pool2d(s, 5, stride=1, padding=2, count_include_pad=False)
    return s.reshape(b, h, gh * gw).to(dtype)


# -- exactness --------------------------------------------------------------------------------


@pytest.mark.parametrize("smooth", [False, True], ids=["noise", "smooth"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference_float32(shape, smooth):
    scores = scores_for(shape, seed=sum(shape), smooth=smooth)
    grid = shape[2:]
    expected = reference(scores, grid)
    per_map = spatial_entropy(scores, grid, reduction="none")
    assert per_map.shape == shape[:2] and per_map.dtype == torch.float32
    assert_matches_reference(per_map, expected, rtol=1e-5)
    mean = spatial_entropy(scores, grid)
    assert mean.shape == () and mean.dtype == torch.float32
    assert_matches_reference(mean, expected.mean(), rtol=1e-5)


@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference_float64(shape, connectivity):
    scores = scores_for(shape, dtype=torch.float64, seed=sum(shape) + 1)
    grid = shape[2:]
    per_map = spatial_entropy(scores, grid, reduction="none", connectivity=connectivity)
    assert per_map.dtype == torch.float64
    assert_matches_reference(per_map, reference(scores, grid, connectivity), rtol=1e-10)


def test_reference_itself_on_a_hand_made_map():
    # A 3x3 grid with mean 1 and a diagonal mask: one 8-region, three 4-regions.
    s = np.array([4.0, 0, 0, 0, 2, 0, 0, 0, 3])
    x = np.array([3.0, 1.0, 2.0]) + 1e-9
    p = x / x.sum()
    assert reference_map(s, (3, 3), 8) == (0.0, 1)
    assert reference_map(s, (3, 3), 4)[0] == pytest.approx(-(p * np.log(p)).sum(), rel=1e-12)
    got = spatial_entropy(torch.tensor(s).reshape(1, 1, 9), (3, 3), reduction="none", connectivity=4)
    assert got.item() == pytest.approx(-(p * np.log(p)).sum(), rel=1e-12)
    assert spatial_entropy(torch.tensor(s).reshape(1, 1, 9), (3, 3)).item() == 0.0


def test_score_equal_to_mean_is_not_in_the_mask():
    # Step 2 is a strict `>`: the middle score equals the mean and must split the two peaks.
    s = torch.tensor([[[2.0, 1.0, 2.0, 0.0, 0.0]]])  # mean exactly 1
    assert spatial_entropy(s, (1, 5)).item() == pytest.approx(math.log(2), rel=1e-6)
    assert spatial_entropy(s.double(), (5, 1)).item() == pytest.approx(math.log(2), rel=1e-12)


def test_scores_close_to_their_mean_keep_the_eps_of_step_4():
    # float32 scores 0.25 + k * 2^-20 with sum(k) = 0: the mean is exactly 0.25 and every s - m
    # is exact, so only the handling of the 1e-9 of step 4 can move the result (by ~1e-4 here,
    # if it were rounded away). Regions: the corner (k = 8) and the bottom row's 3 pixels (k = 1).
    k = torch.tensor([8, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 0, 1, 1, 1], dtype=torch.float32)
    scores = (0.25 + k * 2.0**-20).reshape(1, 1, 16)
    got = spatial_entropy(scores, (4, 4))
    assert_matches_reference(got.reshape(1, 1), reference(scores, (4, 4)), rtol=1e-6)


def test_grid_orientation_is_row_major():
    # Two equal peaks: separate regions (entropy log 2) or one region (0), by grid layout.
    apart_then_joined = torch.tensor([[[5.0, 0.0, 5.0, 0.0, 0.0, 0.0]]])  # (0,0)+(0,2) | (0,0)+(1,0)
    assert spatial_entropy(apart_then_joined, (2, 3)).item() == pytest.approx(math.log(2), rel=1e-6)
    assert spatial_entropy(apart_then_joined, (3, 2)).item() == 0.0
    diagonal_then_apart = torch.tensor([[[5.0, 0.0, 0.0, 0.0, 5.0, 0.0]]])  # (0,0)+(1,1) | (0,0)+(2,0)
    assert spatial_entropy(diagonal_then_apart, (2, 3)).item() == 0.0
    assert spatial_entropy(diagonal_then_apart, (3, 2)).item() == pytest.approx(math.log(2), rel=1e-6)


# -- gradients --------------------------------------------------------------------------------


@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("shape", [(2, 2, 5, 5), (1, 3, 3, 7), (1, 1, 1, 6)], ids=lambda s: "x".join(map(str, s)))
def test_gradcheck_float64(shape, reduction, connectivity):
    # The analytic backward of `_RegionEntropy` against finite differences.
    scores = scores_for(shape, dtype=torch.float64, seed=7).requires_grad_()
    fn = lambda s: spatial_entropy(s, shape[2:], reduction=reduction, connectivity=connectivity)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (scores,))


def test_gradient_matches_finite_differences_of_reference():
    shape = (1, 2, 5, 5)
    scores = scores_for(shape, dtype=torch.float64, seed=11).requires_grad_()
    spatial_entropy(scores, shape[2:]).backward()
    base = scores.detach().numpy()
    step = 1e-6
    numeric = np.zeros_like(base)
    for idx in np.ndindex(base.shape):
        up, down = base.copy(), base.copy()
        up[idx] += step
        down[idx] -= step
        numeric[idx] = (reference(up, shape[2:]).mean() - reference(down, shape[2:]).mean()) / (2 * step)
    assert np.abs(numeric).max() > 1e-3  # the check below is not vacuous
    np.testing.assert_allclose(scores.grad.numpy(), numeric, rtol=1e-5, atol=1e-7)


# -- dtypes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_input_gives_float32(dtype):
    shape = (2, 3, 14, 14)
    scores = scores_for(shape, seed=3).to(dtype)
    got = spatial_entropy(scores, shape[2:], reduction="none")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, spatial_entropy(scores.float(), shape[2:], reduction="none"))
    assert_matches_reference(got, reference(scores, shape[2:]), rtol=1e-5)
    leaf = scores.clone().requires_grad_()
    spatial_entropy(leaf, shape[2:]).backward()
    assert leaf.grad.dtype == dtype and torch.isfinite(leaf.grad.float()).all()


def test_autocast_bfloat16_runs_in_float32():
    generator = torch.Generator().manual_seed(5)
    q = torch.randn(2, 3, 1, 16, generator=generator, requires_grad=True)
    k = torch.randn(2, 3, 49, 16, generator=generator)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = (q @ k.transpose(-1, -2)).squeeze(-2) / 4.0
        assert scores.dtype == torch.bfloat16  # autocast really is on
        loss = spatial_entropy(scores, (7, 7))
        float_input = spatial_entropy(scores.float(), (7, 7), reduction="none")
    assert loss.dtype == torch.float32 and float_input.dtype == torch.float32
    expected = reference(scores, (7, 7))
    assert_matches_reference(loss, expected.mean(), rtol=1e-5)
    assert_matches_reference(float_input, expected, rtol=1e-5)
    loss.backward()
    assert q.grad is not None and torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0


# -- non-finite and degenerate maps -----------------------------------------------------------


def non_finite_batch():
    """([3, 4, 36] scores with NaN, +inf and -inf in four maps, [3, 4] bool: those maps,
    [3, 4] float64 reference entropies of the scores before the damage)."""
    clean = scores_for((3, 4, 6, 6), seed=9)
    scores = clean.clone()
    scores[0, 1, 5] = float("nan")
    scores[1, 0, 0] = float("inf")
    scores[2, 3, 35] = float("-inf")
    scores[2, 2, :] = float("nan")
    bad = torch.zeros(3, 4, dtype=torch.bool)
    bad[0, 1] = bad[1, 0] = bad[2, 3] = bad[2, 2] = True
    return scores, bad, reference(clean, (6, 6))


def test_non_finite_maps_are_skipped():
    shape = (3, 4, 6, 6)
    scores, bad, expected = non_finite_batch()

    leaf = scores.clone().requires_grad_()
    per_map, skipped = spatial_entropy(leaf, shape[2:], reduction="none", return_skipped=True)
    assert skipped.item() == 4 and skipped.dtype == torch.int64
    assert (per_map[bad] == 0).all()
    assert_matches_reference(per_map[~bad], expected[~bad.numpy()], rtol=1e-5)
    per_map.sum().backward()
    assert torch.isfinite(leaf.grad).all()
    assert (leaf.grad[bad] == 0).all() and (leaf.grad[~bad] != 0).any()

    leaf.grad = None
    mean, skipped = spatial_entropy(leaf, shape[2:], return_skipped=True)
    assert skipped.item() == 4
    assert_matches_reference(mean, expected[~bad.numpy()].mean(), rtol=1e-5)  # mean over the 8 valid maps
    mean.backward()
    assert torch.isfinite(leaf.grad).all()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_all_maps_non_finite_give_zero(value):
    scores = torch.full((2, 3, 16), value, requires_grad=True)
    loss, skipped = spatial_entropy(scores, (4, 4), return_skipped=True)
    assert loss.item() == 0.0 and skipped.item() == 6
    loss.backward()
    assert torch.isfinite(scores.grad).all()


def test_without_return_skipped_only_the_entropy():
    out = spatial_entropy(scores_for((1, 2, 3, 3)), (3, 3))
    assert isinstance(out, torch.Tensor) and out.shape == ()


def test_empty_batch():
    scores = torch.randn(0, 6, 196, requires_grad=True)
    assert spatial_entropy(scores, (14, 14), reduction="none").shape == (0, 6)
    loss, skipped = spatial_entropy(scores, (14, 14), return_skipped=True)
    assert loss.item() == 0.0 and skipped.item() == 0
    loss.backward()
    assert scores.grad.shape == scores.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_constant_row_has_empty_mask_and_zero_entropy(dtype):
    scores = scores_for((2, 2, 5, 5), dtype=dtype, seed=2)
    scores[0, 1] = 3.25
    scores[1, 0] = -1e20
    leaf = scores.clone().requires_grad_()
    per_map = spatial_entropy(leaf, (5, 5), reduction="none")
    assert per_map[0, 1] == 0 and per_map[1, 0] == 0
    assert (per_map[0, 0] > 0) and (per_map[1, 1] > 0)
    # The empty map still counts in the mean (it is valid, just 0).
    torch.testing.assert_close(spatial_entropy(leaf, (5, 5)), per_map.mean())
    per_map.sum().backward()
    assert torch.isfinite(leaf.grad).all()


def test_shift_invariance():
    shape = (4, 3, 9, 11)
    scores = scores_for(shape, dtype=torch.float64, seed=4)
    shift = torch.linspace(-100, 100, 12, dtype=torch.float64).reshape(4, 3, 1)
    base = spatial_entropy(scores, shape[2:], reduction="none")
    torch.testing.assert_close(spatial_entropy(scores + shift, shape[2:], reduction="none"), base, rtol=1e-9, atol=0)
    # float32 with exactly representable shifts, and log-softmax (SPEC: same loss).
    scores32 = scores.float()
    base32 = spatial_entropy(scores32, shape[2:], reduction="none")
    torch.testing.assert_close(spatial_entropy(scores32 - 2.0, shape[2:], reduction="none"), base32, rtol=1e-5, atol=0)
    log_probs = torch.log_softmax(scores32, dim=-1)
    torch.testing.assert_close(spatial_entropy(log_probs, shape[2:], reduction="none"), base32, rtol=1e-4, atol=0)


@pytest.mark.parametrize("smooth", [False, True], ids=["noise", "smooth"])
def test_bounds_zero_to_log_regions(smooth):
    shape = (4, 6, 12, 12)
    scores = scores_for(shape, seed=8, smooth=smooth)
    per_map = spatial_entropy(scores, shape[2:], reduction="none").double().numpy()
    regions = region_counts(scores, shape[2:])
    assert (per_map >= 0).all()
    assert (per_map <= np.log(np.maximum(regions, 1)) + 1e-6).all()
    assert (regions > 1).any() and (per_map > 0.5).any()  # the bound is tested on real entropies


# -- magnitudes -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scale", "dtype"),
    [(1e30, torch.float32), (1e38, torch.float32), (1e-30, torch.float32), (1e-42, torch.float32)]
    + [(1e300, torch.float64), (1e-300, torch.float64), (6e4, torch.float16), (1e38, torch.bfloat16)],
)
def test_extreme_magnitudes_stay_finite_and_exact(scale, dtype):
    shape = (2, 3, 8, 8)
    unit = scores_for(shape, dtype=torch.float64, seed=6).clamp(-1.0, 1.0)
    scores = (unit * scale).to(dtype)
    assert torch.isfinite(scores).all()
    leaf = scores.clone().requires_grad_()
    per_map, skipped = spatial_entropy(leaf, shape[2:], reduction="none", return_skipped=True)
    assert skipped.item() == 0
    assert torch.isfinite(per_map).all()
    assert_matches_reference(per_map, reference(scores, shape[2:]), rtol=1e-5)
    per_map.sum().backward()
    assert torch.isfinite(leaf.grad).all()


def test_huge_scores_are_not_the_same_as_ties():
    # 1e38 - mean overflows float32 if computed naively; the map has two clear regions.
    s = torch.zeros(1, 1, 9)
    s[0, 0, 0] = 3e38
    s[0, 0, 8] = 3e38
    assert spatial_entropy(s, (3, 3)).item() == pytest.approx(math.log(2), rel=1e-6)


def test_gradient_of_a_rescaled_row_is_rescaled():
    # Rows beyond 2**60 are scaled by a power of two inside; the backward must undo it exactly:
    # H(c*s) = H(s) (up to the 1e-9), so dH/d(c*s) = dH/ds / c.
    shape = (2, 3, 6, 6)
    unit = scores_for(shape, dtype=torch.float64, seed=12)
    grads = []
    for scale in (1.0, 2.0**100, 1e250):
        leaf = (unit * scale).requires_grad_()
        spatial_entropy(leaf, shape[2:]).backward()
        grads.append(leaf.grad * scale)
    assert grads[0].abs().max() > 1e-3
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(grads[2], grads[0], rtol=1e-6, atol=1e-12)


# -- region slots -----------------------------------------------------------------------------


@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize("grid", [(14, 14), (7, 13), (1, 9), (9, 1), (32, 32)], ids=lambda g: f"{g[0]}x{g[1]}")
def test_as_many_regions_as_the_grid_holds(grid, connectivity):
    # The fullest masks (isolated pixels on every other row and column; a checkerboard for
    # 4-connectivity) fill every region slot: equal masses, so the entropy is log(regions).
    gh, gw = grid
    rows, cols = np.indices(grid)
    peaks = (rows + cols) % 2 == 0 if connectivity == 4 else (rows % 2 == 0) & (cols % 2 == 0)
    scores = torch.from_numpy(np.where(peaks, 1.0, 0.0).reshape(1, 1, -1))
    regions = components.max_regions(gh, gw, connectivity)
    assert reference_map(scores[0, 0].numpy(), grid, connectivity)[1] == regions
    got = spatial_entropy(scores, grid, reduction="none", connectivity=connectivity)
    assert got.item() == pytest.approx(math.log(regions), rel=1e-12, abs=1e-12)
    assert_matches_reference(got, reference(scores, grid, connectivity), rtol=1e-10)


# -- argument errors --------------------------------------------------------------------------


def test_wrong_grid_size_names_both_numbers():
    scores = torch.randn(2, 3, 196)
    with pytest.raises(ValueError) as info:
        spatial_entropy(scores, (15, 14))
    assert "210" in str(info.value) and "196" in str(info.value)
    with pytest.raises(ValueError) as info:
        spatial_entropy(scores, (14, 15))
    assert "210" in str(info.value) and "196" in str(info.value)


@pytest.mark.parametrize("grid", [(0, 196), (-14, -14), (14, 0), (14,), "14x14", None])
def test_bad_grid_raises(grid):
    # The grid's own message, not the size check's that follows it: (0, 196) has 0 patches either way.
    with pytest.raises(ValueError, match="grid_size.*positive"):
        spatial_entropy(torch.randn(1, 1, 196), grid)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_non_float_tensor_raises_type_error(dtype):
    with pytest.raises(TypeError, match=f"floating-point tensor, got {dtype};"):
        spatial_entropy(torch.ones(1, 1, 4).to(dtype), (2, 2))


def test_other_argument_errors():
    with pytest.raises(TypeError, match="got list;"):
        spatial_entropy([[[0.0, 1.0, 2.0, 3.0]]], (2, 2))
    with pytest.raises(ValueError, match="shape"):
        spatial_entropy(torch.randn(4, 4), (2, 2))
    with pytest.raises(ValueError, match="reduction"):
        spatial_entropy(torch.randn(1, 1, 4), (2, 2), reduction="sum")
    with pytest.raises(ValueError, match="connectivity"):
        spatial_entropy(torch.randn(1, 1, 4), (2, 2), connectivity=6)


# -- properties -------------------------------------------------------------------------------

FLOAT_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
SPECIAL = [float("nan"), float("inf"), float("-inf"), 1e38, -1e38, 1e-30, -1e-30, 0.0, 65504.0]


@st.composite
def score_batches(draw):
    b, h = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    gh, gw = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    scale = draw(st.sampled_from([1e-30, 1e-3, 1.0, 1e4, 1e30]))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    values = torch.randn(b, h, gh * gw, generator=generator, dtype=torch.float64) * scale
    n_special = draw(st.integers(0, 4))
    for _ in range(n_special):
        idx = (draw(st.integers(0, b - 1)), draw(st.integers(0, h - 1)), draw(st.integers(0, gh * gw - 1)))
        values[idx] = draw(st.sampled_from(SPECIAL))
    return values.to(dtype), (gh, gw)


def near_mean(row: np.ndarray, tol: float) -> bool:
    """Whether a score lies so close to the mean that float rounding may flip its mask bit."""
    m = row.mean()
    return bool(np.any(np.abs(row - m) <= tol * np.abs(row).max()))


@settings(deadline=None, max_examples=80)
@given(batch=score_batches())
def test_property_finite_bounded_and_exact(batch):
    scores, grid = batch
    leaf = scores.clone().requires_grad_()
    per_map, skipped = spatial_entropy(leaf, grid, reduction="none", return_skipped=True)
    assert per_map.dtype == (torch.float64 if scores.dtype == torch.float64 else torch.float32)
    assert torch.isfinite(per_map).all()
    as64 = scores.double().numpy()
    finite = np.isfinite(as64).all(axis=-1)
    assert skipped.item() == (~finite).sum()
    got = per_map.detach().double().numpy()
    assert (got[~finite] == 0).all()
    tol = 1e-12 if scores.dtype == torch.float64 else 1e-5
    for b, h in zip(*np.nonzero(finite), strict=True):
        expected, regions = reference_map(as64[b, h], grid)
        assert 0 <= got[b, h] <= math.log(max(regions, 1)) + 1e-5
        if not near_mean(as64[b, h], tol):
            assert got[b, h] == pytest.approx(expected, rel=1e-5, abs=1e-7)
    mean = spatial_entropy(leaf, grid)
    assert mean.item() == pytest.approx(got[finite].mean() if finite.any() else 0.0, rel=1e-5, abs=1e-7)
    mean.backward()
    assert torch.isfinite(leaf.grad.double()).all()


# -- the benchmark's reference and the GPU script -----------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def bench_loss():
    from benchmarks import bench_loss

    return bench_loss


@pytest.mark.slow
@pytest.mark.parametrize("smooth", [False, True], ids=["noise", "smooth"])
@pytest.mark.parametrize("shape", [(4, 3, 14, 14), (2, 2, 7, 13), (2, 3, 32, 32)], ids=lambda s: "x".join(map(str, s)))
def test_benchmark_reference_equals_spatial_entropy(bench_loss, shape, smooth):
    # The authors' structure (per-map OpenCV or scipy labelling, dense region masks, one gathered
    # sum) and sar_hf agree on the loss and its gradient; both against the float64 loop.
    scores = bench_loss.make_scores(shape, smooth, "cpu", seed=sum(shape))
    grads = []
    for fn in (bench_loss.reference_spatial_entropy, spatial_entropy):
        leaf = scores.clone().requires_grad_()
        loss = fn(leaf, shape[2:])
        loss.backward()
        assert loss.item() == pytest.approx(reference(scores, shape[2:]).mean(), rel=1e-5)
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-7)


@pytest.mark.slow
def test_gpu_script_runs_on_the_cpu(tmp_path):
    # benchmarks/run_gpu.sh on tiny settings, less the training-step part (tested with bench_step).
    out = tmp_path / "results"
    run = subprocess.run(
        [
            "bash",
            str(ROOT / "benchmarks" / "run_gpu.sh"),
            "--device",
            "cpu",
            "--quick",
            "--no-step",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHON": sys.executable},  # this interpreter, not whichever .venv the script finds
    )
    assert run.returncode == 0, run.stdout + run.stderr
    results = json.loads((out / "bench_loss_cpu.json").read_text())
    assert [row["scores"] for row in results["shapes"]] == ["noise", "smooth"]
    for row in results["shapes"]:
        assert row["loss_rel_diff"] < 1e-5 and row["algorithms"]["propagation"]["labels_equal_scipy"]
        assert row["speedup"] > 0
    compiled = {(row["scores"], row["variant"]): row for row in results["compiled"]}
    assert set(compiled) == {(scores, variant) for scores in ("noise", "smooth") for variant in ("eager", "compile")}
    assert all("error" not in row and row["loss_rel_diff"] < 1e-5 for row in compiled.values())
    assert "## torch.compile and CUDA graphs" in (out / "bench_loss_cpu.md").read_text()
    assert "== 1. spatial_entropy, every algorithm, against the authors' structure:" in run.stdout  # timed


@pytest.mark.parametrize("algorithm", ["scipy", "propagation"])
def test_the_chosen_labelling_algorithm_is_the_one_that_runs(algorithm, monkeypatch):
    # Both give the same entropy, so only the call shows which one ran (a user picks one for speed).
    import sar_hf.components as components

    calls = []
    for name in ("_label_scipy", "_label_propagation"):
        original = getattr(components, name)
        monkeypatch.setattr(components, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    spatial_entropy(torch.randn(2, 3, 16), (4, 4), algorithm=algorithm)
    assert set(calls) == {f"_label_{algorithm}"}
