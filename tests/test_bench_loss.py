"""benchmarks/bench_loss.py in-process on tiny CPU shapes: its reference loss, its rows and ratios, its report
and its command line, each against a hand computation or an independent reference (scipy, float64 loops).

The timings are made exact by a scripted clock (`ScriptedClock`), so that every figure of a row can be
computed by hand; the CUDA-only parts (profiler counts, CUDA graphs) are reached through stand-ins where
the logic around them runs on a CPU."""

import argparse
import datetime
import json
import math
import os
import platform
import re
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy
import scipy.ndimage
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import sar_hf
from benchmarks import bench_loss
from tests.references import reference_entropy

EIGHT = np.ones((3, 3), dtype=bool)


class ScriptedClock:
    """A clock whose every (start, end) pair of readings spans the next of `durations` seconds."""

    def __init__(self, durations):
        self.durations = list(durations)
        self.now = 1000.0
        self.readings = 0

    def __call__(self):
        if self.readings % 2 == 1:
            self.now += self.durations.pop(0)
        self.readings += 1
        return self.now


def scipy_regions(mask2d):
    """(labels, count) of one 2-D 0/1 map, 8-connectivity."""
    return scipy.ndimage.label(np.asarray(mask2d) > 0, structure=EIGHT)


# -- the reference loss ---------------------------------------------------------------------------


@pytest.mark.parametrize("smooth", [False, True], ids=["noise", "smooth"])
def test_the_reference_is_the_float64_loop_and_has_sar_hfs_gradient(smooth):
    shape = (2, 3, 5, 7)  # batch and heads differ: the mean over maps divides by 6, not 5 or 2/3
    scores = bench_loss.make_scores(shape, smooth, "cpu", seed=3)
    leaf = scores.clone().requires_grad_()
    loss = bench_loss.reference_spatial_entropy(leaf, shape[2:])
    assert loss.item() == pytest.approx(reference_entropy(scores, shape[2:]), rel=1e-5)
    loss.backward()
    twin = scores.clone().requires_grad_()
    sar_hf.spatial_entropy(twin, shape[2:]).backward()
    torch.testing.assert_close(leaf.grad, twin.grad, rtol=1e-4, atol=1e-7)


def test_the_reference_keeps_the_releases_epsilon_and_masked_total():
    # Scores of order 1e-9: the 1e-9 added to every relu is then a third of a region's mass, and the
    # total over the mask differs from the total over the whole map (1e-9 per pixel below the mean).
    a = 1e-9
    one = torch.tensor([[4 * a, 0, 0, 0], [0, 0, 0, 0], [0, 0, 2 * a, 3 * a]], dtype=torch.float32)
    scores = one.reshape(1, 1, 12)
    expected = reference_entropy(scores, (3, 4))
    got = bench_loss.reference_spatial_entropy(scores, (3, 4)).item()
    assert got == pytest.approx(expected, rel=1e-4)
    # the same map without the epsilon, or with all 12 pixels in the total, is far from it
    x = (scores.double() - scores.double().mean()).clamp(min=0).reshape(-1)
    regions = [x[0], x[10] + x[11]]
    p = np.array([float(r) for r in regions]) / float(x.sum())
    assert abs(got - float(-(p * np.log(p)).sum())) > 1e-3


def test_a_pixel_at_its_maps_mean_is_not_foreground():
    # 3×3 map, mean exactly 1: the two 4s touch only the centre pixel (= the mean); counted as
    # foreground it would join them into one region, of entropy 0.
    scores = torch.tensor([[4.0, 0, 0], [0, 1, 0], [0, 0, 4]]).reshape(1, 1, 9)
    assert scores.mean().item() == 1.0
    got = bench_loss.reference_spatial_entropy(scores, (3, 3)).item()
    assert got == pytest.approx(reference_entropy(scores, (3, 3)), rel=1e-6)
    assert got == pytest.approx(math.log(2), rel=1e-6)  # two separate pixels of equal mass


def test_the_reference_of_maps_without_any_region_is_zero():
    # Constant maps have no pixel above their mean: no region anywhere, an entropy of 0 (as sar_hf
    # and the float64 loop say). The reference used to index with empty float tensors and fail.
    scores = torch.zeros(2, 3, 6)
    assert bench_loss.reference_spatial_entropy(scores, (2, 3)).item() == 0.0
    assert sar_hf.spatial_entropy(scores, (2, 3)).item() == 0.0


def test_the_reference_refuses_a_loss_that_is_not_finite():
    scores = torch.tensor([3e38, -3e38, -3e38, -3e38]).reshape(1, 1, 4)  # relu(s - m) overflows to inf
    with pytest.raises(FloatingPointError, match="^the reference loss is not finite$"):
        bench_loss.reference_spatial_entropy(scores, (2, 2))


def test_the_reference_regions_are_one_mask_per_region_in_map_order():
    masks = torch.zeros(2, 2, 3, 4, dtype=torch.long)
    masks[0, 1] = torch.tensor([[1, 0, 0, 1], [0, 1, 0, 1], [0, 0, 0, 0]])  # 2 regions (diagonal joined)
    masks[1, 0] = torch.tensor([[0, 0, 0, 0], [0, 0, 0, 0], [1, 0, 0, 1]])  # 2 regions
    masks[1, 1] = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]])  # 1 region
    b_idx, h_idx, regions = bench_loss._reference_regions(masks.reshape(2, 2, 12), (3, 4))
    expected_b, expected_h, expected = [], [], []
    for b in range(2):
        for h in range(2):
            labels, n = scipy_regions(masks[b, h].numpy())
            for k in range(1, n + 1):
                expected_b.append(b)
                expected_h.append(h)
                expected.append((labels == k).reshape(-1).astype(np.int64))
    assert b_idx.tolist() == expected_b == [0, 0, 1, 1, 1]
    assert h_idx.tolist() == expected_h == [1, 1, 0, 0, 1]
    assert regions.dtype == torch.long and b_idx.dtype == h_idx.dtype == torch.long
    assert np.array_equal(regions.numpy(), np.stack(expected))


def test_no_region_gives_empty_index_tensors_of_the_right_kind():
    b_idx, h_idx, regions = bench_loss._reference_regions(torch.zeros(1, 2, 6, dtype=torch.long), (2, 3))
    assert b_idx.shape == h_idx.shape == (0,) and b_idx.dtype == h_idx.dtype == torch.long
    assert regions.shape == (0, 6) and regions.dtype == torch.long


def test_the_reference_regions_are_made_on_the_masks_device():
    # A mask on another device (here `meta`, standing in for CUDA): labelled on the host, sent back.
    host = torch.tensor([[[1, 0, 0, 1]]])
    mask = types.SimpleNamespace(device=torch.device("meta"), cpu=lambda: host)
    b_idx, h_idx, regions = bench_loss._reference_regions(mask, (1, 4))
    assert b_idx.device.type == h_idx.device.type == regions.device.type == "meta"
    assert b_idx.shape == h_idx.shape == (2,) and regions.shape == (2, 4) and regions.dtype == torch.long


def test_labelling_one_map_is_scipys_8_connected_regions_plus_one():
    mask = np.array([[1, 0, 0, 1], [0, 1, 0, 1], [0, 0, 0, 0], [1, 1, 0, 0]], dtype=np.int64)
    n, labels = bench_loss._label_one(mask)
    expected, count = scipy_regions(mask)
    assert count == 3 and n == 4  # the release's `range(1, n)` walks the regions
    assert np.array_equal(labels, expected)


class FakeOpenCV:
    """`cv2.connectedComponents`' contract, computed by scipy: a one-channel uint8 image, connectivity 4
    or 8, CV_16U or CV_32S labels; returns (regions + 1, labels)."""

    __version__ = "0.0-fake"
    CV_16U = 2
    CV_32S = 4

    def __init__(self):
        self.calls = []

    def connectedComponents(self, image, labels=None, connectivity=8, ltype=4):  # noqa: N802 (OpenCV's name)
        assert isinstance(image, np.ndarray) and image.dtype == np.uint8 and set(np.unique(image)) <= {0, 1}
        assert image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1)
        assert connectivity in (4, 8) and ltype in (self.CV_16U, self.CV_32S)
        self.calls.append((image.shape, connectivity, ltype))
        structure = EIGHT if connectivity == 8 else scipy.ndimage.generate_binary_structure(2, 1)
        found, n = scipy.ndimage.label(image.reshape(image.shape[:2]), structure=structure)
        return n + 1, found.astype(np.uint16 if ltype == self.CV_16U else np.int32)


def test_with_opencv_one_map_is_labelled_as_the_release_calls_it(monkeypatch):
    fake = FakeOpenCV()
    monkeypatch.setattr(bench_loss, "cv2", fake)
    mask = np.array([[1, 0, 2], [0, 1, 0], [0, 0, 0]], dtype=np.int64)  # any non-zero is foreground
    n, labels = bench_loss._label_one(mask)
    assert fake.calls == [((3, 3, 1), 8, FakeOpenCV.CV_16U)]  # 8-connectivity, 16-bit labels
    assert n == 2 and labels.dtype == np.uint16
    assert np.array_equal(labels, scipy_regions(mask)[0])
    scores = bench_loss.make_scores((2, 2, 4, 5), False, "cpu", seed=1)
    got = bench_loss.reference_spatial_entropy(scores, (4, 5)).item()
    assert got == pytest.approx(reference_entropy(scores, (4, 5)), rel=1e-5)


# -- the scores -----------------------------------------------------------------------------------


def blurred(shape, seed):
    """The smooth scores by scipy: a Gaussian of σ = max(min side / 8, 0.75), cut at 3σ, edges repeated."""
    b, h, gh, gw = shape
    noise = torch.randn(b * h, 1, gh, gw, generator=torch.Generator().manual_seed(seed)).double().numpy()
    sigma = max(min(gh, gw) / 8, 0.75)
    truncate = int(3 * sigma) / sigma  # scipy's radius is int(truncate * σ + 0.5)
    out = np.stack([scipy.ndimage.gaussian_filter(m[0], sigma, mode="nearest", truncate=truncate) for m in noise])
    return torch.from_numpy(out).float().reshape(b, h, gh * gw)


@pytest.mark.parametrize(
    "shape", [(2, 3, 16, 16), (1, 2, 12, 20), (1, 1, 4, 6), (2, 1, 32, 24), (1, 2, 2, 6), (1, 2, 6, 2)]
)
def test_smooth_scores_are_the_noise_blurred_by_a_gaussian_of_an_eighth_of_the_side(shape):
    got = bench_loss.make_scores(shape, True, "cpu", seed=5)
    torch.testing.assert_close(got, blurred(shape, 5), rtol=0, atol=2e-6)


def test_noise_scores_are_standard_normal_from_the_seed():
    shape = (3, 2, 4, 5)
    got = bench_loss.make_scores(shape, False, "cpu", seed=7)
    assert got.shape == (3, 2, 20) and got.dtype == torch.float32
    expected = torch.randn(6, 1, 4, 5, generator=torch.Generator().manual_seed(7)).reshape(3, 2, 20)
    assert torch.equal(got, expected)
    assert torch.equal(bench_loss.make_scores(shape, False, "cpu"), bench_loss.make_scores(shape, False, "cpu", 0))
    assert not torch.equal(bench_loss.make_scores(shape, False, "cpu", 1), bench_loss.make_scores(shape, False, "cpu"))
    big = bench_loss.make_scores((64, 6, 14, 14), False, "cpu")
    assert abs(big.mean().item()) < 0.02 and big.std().item() == pytest.approx(1.0, abs=0.02)


def test_smooth_scores_of_a_one_pixel_wide_grid_are_blurred_along_its_length_only():
    for shape in [(1, 2, 1, 9), (1, 2, 9, 1)]:
        b, h, gh, gw = shape
        noise = torch.randn(b * h, 1, gh, gw, generator=torch.Generator().manual_seed(0)).double().numpy()
        sigma = 0.75  # min side 1: the floor
        expected = np.stack(
            [scipy.ndimage.gaussian_filter1d(m.reshape(-1), sigma, mode="nearest", truncate=2 / sigma) for m in noise]
        )
        got = bench_loss.make_scores(shape, True, "cpu")
        torch.testing.assert_close(got, torch.from_numpy(expected).float().reshape(b, h, gh * gw), rtol=0, atol=2e-6)


def test_scores_are_made_on_the_cpu_then_sent_to_the_device():
    got = bench_loss.make_scores((2, 2, 3, 3), True, "meta")
    assert got.device.type == "meta" and got.shape == (2, 2, 9)


# -- timing helpers -------------------------------------------------------------------------------


def test_synchronising_waits_for_cuda_only(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: calls.append(a))
    bench_loss._sync("cpu")
    assert calls == []
    bench_loss._sync("cuda")
    assert calls == [()]


def test_timing_a_loss_times_its_forward_and_backward_on_a_fresh_leaf(monkeypatch):
    monkeypatch.setattr(bench_loss, "CLOCK", ScriptedClock([0.25]))
    scores = torch.tensor([[[1.0, 2.0, 3.0]]])
    grads = []

    def fn(leaf):
        assert leaf is not scores and leaf.requires_grad and leaf.is_leaf
        leaf.register_hook(grads.append)
        return (leaf * torch.tensor([1.0, 10.0, 100.0])).sum()

    seconds, value = bench_loss._time_loss(fn, scores, "cpu")
    assert seconds == 0.25 and value == 321.0 and isinstance(value, float)
    assert grads[0].tolist() == [[[1.0, 10.0, 100.0]]] and scores.grad is None


def test_timing_the_labels_runs_the_algorithm_asked_with_8_connectivity(monkeypatch):
    monkeypatch.setattr(bench_loss, "CLOCK", ScriptedClock([0.5]))
    seen = []
    monkeypatch.setattr(sar_hf, "connected_components", lambda *args, **kwargs: seen.append((args[1:], kwargs)))
    mask = torch.zeros(2, 3, 3, dtype=torch.bool)
    assert bench_loss._time_labels(mask, "propagation", "cpu") == 0.5
    assert seen == [((8,), {"algorithm": "propagation"})]


def test_cuda_timings_wait_for_the_gpu_before_each_clock_reading(monkeypatch):
    log = []
    clock = ScriptedClock([0.5, 0.25])
    monkeypatch.setattr(bench_loss, "CLOCK", lambda: log.append("clock") or clock())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: log.append("sync"))
    monkeypatch.setattr(sar_hf, "connected_components", lambda *args, **kwargs: log.append("labels"))
    assert bench_loss._time_labels(torch.zeros(1, 2, 2, dtype=torch.bool), "scipy", "cuda") == 0.5
    assert log == ["sync", "clock", "labels", "sync", "clock"]
    log.clear()
    seconds, _ = bench_loss._time_loss(lambda s: log.append("loss") or s.sum(), torch.ones(1, 1, 2), "cuda")
    assert seconds == 0.25 and log == ["sync", "clock", "loss", "sync", "clock"]


def test_timing_the_reference_labels_labels_every_map_once(monkeypatch):
    monkeypatch.setattr(bench_loss, "CLOCK", ScriptedClock([0.125]))
    seen = []
    monkeypatch.setattr(bench_loss, "_label_one", lambda one: seen.append(one.copy()))
    mask = torch.rand(3, 2, 4, generator=torch.Generator().manual_seed(0)) > 0.5
    assert bench_loss._time_reference_labels(mask) == 0.125
    assert len(seen) == 3 and all(one.dtype == np.int64 for one in seen)
    assert np.array_equal(np.stack(seen), mask.numpy().astype(np.int64))


# -- how quiet the machine is -----------------------------------------------------------------------


class FakeStat:
    """Stands in for `Path`: reading any file returns the next of `texts` (an exception is raised)."""

    def __init__(self, texts):
        self.texts = list(texts)
        self.paths = []

    def __call__(self, path):
        self.paths.append(str(path))
        return self

    def read_text(self):
        text = self.texts.pop(0)
        if isinstance(text, Exception):
            raise text
        return text


def fake_time(monkeypatch, **functions):
    namespace = types.SimpleNamespace(
        **{name: getattr(bench_loss.time, name) for name in ("perf_counter", "thread_time", "monotonic", "sleep")}
    )
    for name, fn in functions.items():
        setattr(namespace, name, fn)
    monkeypatch.setattr(bench_loss, "time", namespace)
    return namespace


def test_the_idle_share_is_idle_plus_iowait_over_all_cpu_time(monkeypatch):
    #      user nice system idle iowait irq softirq steal guest guest_nice
    before = "cpu  100 5 50 1000 20 3 2 1 0 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n"
    after = "cpu  160 5 70 1090 30 3 2 1 0 0\ncpu0 9 9 9 9 9 9 9 9 9 9\n"
    stat = FakeStat([before, after])
    monkeypatch.setattr(bench_loss, "Path", stat)
    slept = []
    fake_time(monkeypatch, sleep=slept.append)
    # deltas: user 60, system 20, idle 90, iowait 10: (90 + 10) / 180
    assert bench_loss.cpu_idle_fraction(0.3) == pytest.approx(100 / 180)
    assert slept == [0.3] and stat.paths == ["/proc/stat", "/proc/stat"]
    stat.texts = [before, after]
    bench_loss.cpu_idle_fraction()
    assert slept == [0.3, 1.0]


def test_an_unreadable_or_unchanged_proc_stat_reads_as_idle_or_zero(monkeypatch):
    fake_time(monkeypatch, sleep=lambda s: None)
    monkeypatch.setattr(bench_loss, "Path", FakeStat([OSError("no /proc")]))
    assert bench_loss.cpu_idle_fraction() == 1.0
    monkeypatch.setattr(bench_loss, "Path", FakeStat(["cpu 1 2 3 4\n", "cpu 1 2 x 4\n"]))
    assert bench_loss.cpu_idle_fraction() == 1.0
    monkeypatch.setattr(bench_loss, "Path", FakeStat(["cpu 1 2 3 4 5\n", "cpu 1 2 3 4 5\n"]))
    assert bench_loss.cpu_idle_fraction() == 0.0  # no time passed: no division by zero
    monkeypatch.setattr(bench_loss, "Path", FakeStat(["cpu 1 2 3 4 5\n", "cpu 1 2 3 5 5\n"]))
    assert bench_loss.cpu_idle_fraction() == 1.0  # one tick, idle


def test_waiting_for_quiet_stops_when_idle_enough_or_at_the_deadline(monkeypatch):
    now = [0.0]
    fake_time(monkeypatch, monotonic=lambda: now[0])

    def sampler(shares):
        def sample():
            now[0] += 1.0
            return shares.pop(0)

        return sample

    monkeypatch.setattr(bench_loss, "cpu_idle_fraction", sampler([0.5, 0.85, 0.9, 0.2]))
    assert bench_loss.wait_for_quiet(100.0) == 0.9  # 0.9 is quiet enough: stops there
    now[0] = 0.0
    monkeypatch.setattr(bench_loss, "cpu_idle_fraction", sampler([0.5, 0.6, 0.7, 0.95]))
    assert bench_loss.wait_for_quiet(2.0) == 0.6  # deadline at 2 s: samples at 1 s and 2 s
    now[0] = 0.0
    monkeypatch.setattr(bench_loss, "cpu_idle_fraction", sampler([0.5, 0.75, 0.95]))
    assert bench_loss.wait_for_quiet(100.0, threshold=0.7) == 0.75


# -- the algorithms and one row ---------------------------------------------------------------------


def test_the_cpu_runs_scipy_and_propagation_and_cuda_adds_triton_where_installed(monkeypatch):
    assert bench_loss.algorithms_on("cpu") == ["scipy", "propagation"]
    asked = []
    monkeypatch.setattr(bench_loss.importlib.util, "find_spec", lambda name: asked.append(name) or object())
    assert bench_loss.algorithms_on("cuda") == ["scipy", "propagation", "triton"]
    assert asked == ["triton"]
    assert bench_loss.algorithms_on("cpu") == ["scipy", "propagation"]
    monkeypatch.setattr(bench_loss.importlib.util, "find_spec", lambda name: None)
    assert bench_loss.algorithms_on("cuda") == ["scipy", "propagation"]


def test_the_relative_difference_is_against_the_reference():
    assert bench_loss._rel_diff(1.1, 1.0) == pytest.approx(0.1)
    assert bench_loss._rel_diff(-2.5, -2.0) == pytest.approx(0.25)
    assert bench_loss._rel_diff(0.9, -1.0) == pytest.approx(1.9)
    assert bench_loss._rel_diff(3e-12, 0.0) == pytest.approx(3.0)  # a zero reference: against 1e-12
    assert bench_loss._rel_diff(2.0, 2.0) == 0.0


# Seconds of each timed call in one round, in the order bench_shape makes them on a CPU: the losses
# (reference, scipy, propagation), then the labellings (scipy, propagation, the reference's loop).
KEYS = ["reference", "sar_hf_scipy", "sar_hf_propagation", "labels_scipy", "labels_propagation", "labels_reference"]
WARM_UP = [50.0, 40.0, 30.0, 20.0, 10.0, 5.0]
ROUNDS = {
    "reference": [0.9, 0.3, 0.5],
    "sar_hf_scipy": [0.02, 0.05, 0.01],
    "sar_hf_propagation": [0.04, 0.08, 0.03],
    "labels_scipy": [0.006, 0.002, 0.004],
    "labels_propagation": [0.007, 0.009, 0.008],
    "labels_reference": [0.003, 0.001, 0.0025],
}


def script(rounds):
    return WARM_UP + [rounds[key][r] for r in range(3) for key in KEYS]


@pytest.mark.parametrize("faster_labeller", ["labels_reference", "labels_scipy"])
def test_a_rows_times_and_ratios_are_medians_after_the_warm_up(monkeypatch, faster_labeller):
    rounds = dict(ROUNDS)
    if faster_labeller == "labels_scipy":
        rounds["labels_scipy"], rounds["labels_reference"] = ROUNDS["labels_reference"], ROUNDS["labels_scipy"]
    monkeypatch.setattr(bench_loss, "CLOCK", ScriptedClock(script(rounds)))
    shape = (2, 3, 5, 6)
    row = bench_loss.bench_shape(shape, True, "cpu", repeats=3)
    # medians of the three timed rounds, by hand
    medians = {"reference": 0.5, "sar_hf_scipy": 0.02, "sar_hf_propagation": 0.04, "labels_propagation": 0.008}
    medians["labels_scipy"] = 0.004 if faster_labeller == "labels_reference" else 0.0025
    medians["labels_reference"] = 0.0025 if faster_labeller == "labels_reference" else 0.004
    for key, value in medians.items():
        assert row[f"{key}_ms"] == pytest.approx(1e3 * value), key
    assert row["sar_hf_ms"] == pytest.approx(20.0)  # auto on a CPU is scipy
    assert row["speedup"] == pytest.approx(0.5 / 0.02)
    assert row["labelling_ceiling"] == pytest.approx(0.5 / 0.0025)  # reference / the faster labelling
    assert row["algorithms"]["scipy"]["ms"] == pytest.approx(20.0)
    assert row["algorithms"]["propagation"]["ms"] == pytest.approx(40.0)
    assert row["runs"] == 3 and row["shape"] == [2, 3, 5, 6] and row["scores"] == "smooth"
    assert row["cpu_idle_before"] is None


def test_a_rows_losses_regions_and_labels_follow_from_its_scores():
    shape = (2, 3, 5, 7)
    row = bench_loss.bench_shape(shape, False, "cpu", repeats=1)
    scores = bench_loss.make_scores(shape, False, "cpu")
    expected = reference_entropy(scores, shape[2:])
    assert row["scores"] == "noise" and row["runs"] == 1
    assert row["loss_reference"] == pytest.approx(expected, rel=1e-5)
    assert row["loss_sar_hf"] == pytest.approx(expected, rel=1e-5)
    assert row["loss_sar_hf"] == sar_hf.spatial_entropy(scores, shape[2:], algorithm="scipy").item()
    assert row["loss_rel_diff"] == bench_loss._rel_diff(row["loss_sar_hf"], row["loss_reference"])
    mask = (scores > scores.mean(-1, keepdim=True)).reshape(-1, 5, 7)
    counts = [scipy_regions(m.numpy())[1] for m in mask]
    assert row["mean_regions_per_map"] == pytest.approx(np.mean(counts))
    assert set(row["algorithms"]) == {"scipy", "propagation"}
    for a, one in row["algorithms"].items():
        loss = sar_hf.spatial_entropy(scores, shape[2:], algorithm=a).item()
        assert one["loss_rel_diff"] == pytest.approx(abs(loss - row["loss_reference"]) / row["loss_reference"])
        assert one["labels_equal_scipy"] is True
        assert one["kernel_launches"] is None and one["back_to_back_ms"] is None
        assert one["host_syncs"] is None and one["host_sync_sites"] == []
    assert all(row[f"{key}_ms"] > 0 for key in KEYS)


def test_a_row_says_when_an_algorithm_labels_differently_from_scipy(monkeypatch):
    real = sar_hf.connected_components

    def wrong_propagation(mask, connectivity=8, algorithm="auto"):
        labels = real(mask, connectivity, algorithm=algorithm)
        return labels * 2 if algorithm == "propagation" else labels

    monkeypatch.setattr(sar_hf, "connected_components", wrong_propagation)
    row = bench_loss.bench_shape((1, 2, 4, 4), False, "cpu", repeats=1)
    assert row["algorithms"]["scipy"]["labels_equal_scipy"] is True
    assert row["algorithms"]["propagation"]["labels_equal_scipy"] is False


def test_a_diagonal_only_map_is_one_region_in_a_row(monkeypatch):
    # 8-connectivity throughout: a checkerboard's foreground is one region (4-connectivity: eight).
    board = torch.tensor([[1.0, 0, 1, 0], [0, 1, 0, 1], [1, 0, 1, 0], [0, 1, 0, 1]]).reshape(1, 1, 16)
    monkeypatch.setattr(bench_loss, "make_scores", lambda shape, smooth, device: board.clone())
    row = bench_loss.bench_shape((1, 1, 4, 4), False, "cpu", repeats=1)
    assert row["mean_regions_per_map"] == 1.0
    assert all(one["labels_equal_scipy"] for one in row["algorithms"].values())
    assert row["loss_reference"] == pytest.approx(0.0, abs=1e-6)


def test_a_rows_regions_leave_out_pixels_at_their_maps_mean(monkeypatch):
    # mean exactly 1: the centre pixel (= the mean) would join the two 4s into one region
    at_mean = torch.tensor([[4.0, 0, 0], [0, 1, 0], [0, 0, 4]]).reshape(1, 1, 9)
    monkeypatch.setattr(bench_loss, "make_scores", lambda shape, smooth, device: at_mean.clone())
    row = bench_loss.bench_shape((1, 1, 3, 3), False, "cpu", repeats=1)
    assert row["mean_regions_per_map"] == 2.0 and row["loss_reference"] == pytest.approx(math.log(2), rel=1e-6)


def test_the_default_rows_timing_is_the_algorithm_auto_picks(monkeypatch):
    monkeypatch.setattr(bench_loss, "CLOCK", ScriptedClock(script(ROUNDS)))
    asked = []

    real = sar_hf.components.resolve_algorithm

    def pick(algorithm, device, num_pixels):  # auto picks propagation; the others stay themselves
        if algorithm != "auto":
            return real(algorithm, device, num_pixels)
        asked.append((algorithm, device, num_pixels))
        return "propagation"

    monkeypatch.setattr(sar_hf.components, "resolve_algorithm", pick)
    row = bench_loss.bench_shape((2, 1, 3, 5), False, "cpu", repeats=3)
    assert asked == [("auto", torch.device("cpu"), 15)]
    assert row["sar_hf_ms"] == pytest.approx(40.0) and row["speedup"] == pytest.approx(0.5 / 0.04)
    scores = bench_loss.make_scores((2, 1, 3, 5), False, "cpu")
    assert row["loss_sar_hf"] == sar_hf.spatial_entropy(scores, (3, 5), algorithm="propagation").item()


def test_a_row_waits_for_quiet_only_when_asked(monkeypatch):
    waited = []
    monkeypatch.setattr(bench_loss, "wait_for_quiet", lambda seconds: waited.append(seconds) or 0.875)
    row = bench_loss.bench_shape((1, 1, 3, 3), False, "cpu", repeats=1, max_wait_s=0.25)
    assert waited == [0.25] and row["cpu_idle_before"] == 0.875
    row = bench_loss.bench_shape((1, 1, 3, 3), False, "cpu", repeats=1)
    assert waited == [0.25] and row["cpu_idle_before"] is None


def test_a_cuda_row_counts_launches_syncs_and_back_to_back_time_of_each_algorithm(monkeypatch):
    # The CUDA columns' wiring, with the GPU parts stood in for: each is asked about its own algorithm's loss.
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    real_make, real_on, real_time_loss, real_time_labels = (
        bench_loss.make_scores,
        bench_loss.algorithms_on,
        bench_loss._time_loss,
        bench_loss._time_labels,
    )
    devices = []  # every part of the row is asked to run on CUDA

    def on(record, fn, device_at):
        return lambda *args: devices.append((record, args[device_at])) or fn(*args[:device_at], "cpu")

    monkeypatch.setattr(bench_loss, "make_scores", on("scores", real_make, 2))
    monkeypatch.setattr(bench_loss, "_time_loss", on("loss", real_time_loss, 2))
    monkeypatch.setattr(bench_loss, "_time_labels", on("labels", real_time_labels, 2))
    # Triton's kernels need a GPU: the CPU algorithms only
    monkeypatch.setattr(bench_loss, "algorithms_on", on("algorithms", lambda d: real_on(d)[:2], 0))
    shape = (1, 2, 4, 4)
    scores = real_make(shape, False, "cpu")
    real_entropy = sar_hf.spatial_entropy
    algorithms = []

    def entropy(s, grid, algorithm="auto"):
        algorithms.append(algorithm)
        return real_entropy(s, grid, algorithm=algorithm)

    monkeypatch.setattr(sar_hf, "spatial_entropy", entropy)
    figures = {"scipy": (11, 0.002, 3), "propagation": (22, 0.004, 5)}

    def which(fn, got):  # the algorithm of the loss `fn`, on the row's scores
        assert torch.equal(got, scores)
        algorithms.clear()
        fn(got)
        return algorithms[0]

    monkeypatch.setattr(bench_loss, "count_kernel_launches", lambda fn, s: figures[which(fn, s)][0])
    monkeypatch.setattr(bench_loss, "time_back_to_back", lambda fn, s: figures[which(fn, s)][1])

    def syncs(fn, s):
        a = which(fn, s)
        return {"host_syncs": figures[a][2], "host_sync_sites": [f"{a}.py:1 x"]}

    monkeypatch.setattr(bench_loss, "host_syncs", syncs)
    row = bench_loss.bench_shape(shape, False, "cuda", repeats=1)
    assert {device for _, device in devices} == {"cuda"}
    assert {record for record, _ in devices} == {"scores", "loss", "labels", "algorithms"}
    for a, (launches, seconds, count) in figures.items():
        one = row["algorithms"][a]
        assert one["kernel_launches"] == launches and one["back_to_back_ms"] == pytest.approx(1e3 * seconds)
        assert one["host_syncs"] == count and one["host_sync_sites"] == [f"{a}.py:1 x"]


# -- the CUDA counters, where a CPU can reach them --------------------------------------------------


def test_one_forward_backward_step_gives_the_gradient_of_the_loss():
    scores = torch.tensor([[[1.0, -2.0, 3.0]]])
    step = bench_loss._forward_backward(lambda s: (s**2).sum(), scores)
    (grad,) = step()
    assert grad.tolist() == [[[2.0, -4.0, 6.0]]] and scores.grad is None
    assert step()[0].tolist() == grad.tolist()


class AtenOps(TorchDispatchMode):
    """Records the ATen operators run inside it (what a profiler would count as kernels on a GPU)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def test_a_steps_gradient_seed_is_made_beforehand_so_its_fill_is_not_counted():
    scores = torch.tensor([[[1.0, -2.0, 3.0]]])
    step = bench_loss._forward_backward(lambda s: (s**2).sum(), scores)
    with AtenOps() as inside:
        step()
    leaf = scores.clone().requires_grad_()
    with AtenOps() as implicit:  # what autograd runs when it makes the seed itself
        torch.autograd.grad((leaf**2).sum(), leaf)
    assert "aten.ones_like" in implicit.ops
    assert not {"aten.ones_like", "aten.ones", "aten.fill_", "aten.full"} & set(inside.ops)
    assert len(inside.ops) == len(implicit.ops) - 1


def test_a_steps_gradient_seed_is_made_on_the_scores_device_so_no_copy_is_counted(monkeypatch):
    # A host-made seed for a CUDA loss costs a host-to-device copy inside every counted step; the
    # meta device stands in for CUDA (autograd itself accepts a CPU seed there, so the seed is read).
    seeds = []
    monkeypatch.setattr(torch.autograd, "grad", lambda output, leaf, seed: seeds.append(seed))
    scores = torch.zeros(1, 1, 3, device="meta")
    bench_loss._forward_backward(lambda s: s.sum(), scores)()
    assert [seed.device.type for seed in seeds] == ["meta"] and seeds[0].shape == ()


class FakeProfile:
    """`torch.profiler.profile` stood in for: it keeps its activities and returns the given events."""

    def __init__(self, kinds):
        self.events_of_a_run = [types.SimpleNamespace(device_type=kind) for kind in kinds]
        self.activities = []

    def __call__(self, activities):
        self.activities.append(activities)
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def events(self):
        return self.events_of_a_run


def test_gpu_events_are_the_cuda_events_of_one_profiled_step_after_a_warm_up(monkeypatch):
    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
    profile = FakeProfile([cpu, cuda, cpu, cuda, cuda])
    calls, synced = [], []
    monkeypatch.setattr(torch.profiler, "profile", profile)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: synced.append(len(calls)))
    assert bench_loss._gpu_events(lambda: calls.append(1)) == 3
    activity = torch.profiler.ProfilerActivity
    assert profile.activities == [[activity.CPU, activity.CUDA]]  # CUDA events need CUDA activity
    assert len(calls) == 2 and synced == [1, 2]  # the warm-up's work is done before the profile starts


def test_launch_counts_need_a_profiler_that_counts_one_kernel_for_x_plus_1(monkeypatch):
    counts = []

    def events(step):
        result = step()
        counts.append(result)
        return answers.pop(0)

    scores = torch.tensor([[[1.0, 2.0]]])
    fn = lambda s: (3 * s).sum()  # noqa: E731
    answers = [1, 37]
    monkeypatch.setattr(bench_loss, "_gpu_events", events)
    assert bench_loss.count_kernel_launches(fn, scores) == 37
    assert counts[0].tolist() == [[[2.0, 3.0]]]  # the calibration is `x + 1`
    assert counts[1][0].tolist() == [[[3.0, 3.0]]]  # then one forward + backward of fn
    for wrong in (0, 2):
        answers = [wrong, 37]
        message = f"^torch.profiler counted {wrong} GPU events for one `x \\+ 1`; launch counts unusable$"
        with pytest.raises(RuntimeError, match=message):
            bench_loss.count_kernel_launches(fn, scores)


def test_back_to_back_time_is_per_call_after_one_warm_up(monkeypatch):
    synced, calls = [], []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: synced.append(len(calls)))
    readings = iter([10.0, 12.0])
    fake_time(monkeypatch, perf_counter=lambda: next(readings))
    scores = torch.tensor([[[1.0, 2.0]]])

    def fn(s):
        calls.append(1)
        return s.sum()

    assert bench_loss.time_back_to_back(fn, scores) == pytest.approx(2.0 / 50)
    assert len(calls) == 51 and synced == [1, 51]  # warm-up, synchronised; 50 calls, one sync at the end
    calls.clear()
    synced.clear()
    readings = iter([0.0, 1.0])
    assert bench_loss.time_back_to_back(fn, scores, calls=4) == 0.25
    assert len(calls) == 5 and synced == [1, 5]


def test_host_syncs_are_the_sync_warnings_of_one_step_with_their_lines(monkeypatch):
    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    scores = torch.tensor([[[1.0, 2.0]]])

    def fn(s):
        assert modes == ["warn"]
        warnings.warn("called a synchronizing CUDA operation", stacklevel=1)  # line A
        warnings.warn("called a synchronizing CUDA operation", stacklevel=1)  # line A again: each is counted
        warnings.warn("something else entirely", stacklevel=1)  # not a synchronisation
        return s.sum()

    with warnings.catch_warnings(record=True) as outside:
        warnings.simplefilter("always")
        found = bench_loss.host_syncs(fn, scores)
        warnings.warn("after the step", stacklevel=1)
    assert modes == ["warn", "default"]
    assert found["host_syncs"] == 2 and len(found["host_sync_sites"]) == 2
    first = found["host_sync_sites"][0].split(" <- ")
    assert first[0].startswith("test_bench_loss.py:") and "called a synchronizing CUDA operation" in first[0]
    assert "line A" in first[0]
    assert all("bench_loss.py" not in site.split(":")[0] or site.startswith("test_") for site in first)
    assert 1 < len(first) <= 4
    assert [str(w.message) for w in outside] == ["after the step"]  # the filters are put back


def test_host_sync_sites_name_four_frames_innermost_first(monkeypatch):
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda mode: None)

    def level3():
        warnings.warn("synchronizing", stacklevel=1)

    def level2():
        level3()

    def level1():
        level2()

    def fn(s):
        level1()
        return s.sum()

    found = bench_loss.host_syncs(fn, torch.ones(1, 1, 2))
    frames = found["host_sync_sites"][0].split(" <- ")
    assert len(frames) == 4
    assert [f.split(" ", 1)[1] for f in frames] == [
        'warnings.warn("synchronizing", stacklevel=1)',
        "level3()",
        "level2()",
        "level1()",
    ]
    assert all(f.startswith("test_bench_loss.py:") for f in frames)


def test_host_syncs_put_the_debug_mode_back_when_the_step_fails(monkeypatch):
    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)

    def fn(s):
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        bench_loss.host_syncs(fn, torch.ones(1, 1, 2))
    assert modes == ["warn", "default"]


def test_host_syncs_keep_the_backward_on_the_calling_thread(monkeypatch):
    # On CUDA, autograd's device thread would replay the backward's sync warnings from its own frames.
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda mode: None)
    seen = []

    class Spy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, s):
            return s.sum()

        @staticmethod
        def backward(ctx, grad):
            seen.append(torch.autograd.is_multithreading_enabled())
            return grad.expand(2)

    bench_loss.host_syncs(Spy.apply, torch.ones(2))
    assert seen == [False] and torch.autograd.is_multithreading_enabled()


# -- the graph variants (torch.compile stood in for) -------------------------------------------------


def stand_in_graphs(monkeypatch, fail=None):
    """torch.compile returns the function itself (or raises `fail`); records its arguments."""
    asked, resets = [], []

    def compiler(fn, fullgraph=False, mode=None):
        asked.append((fullgraph, mode))
        if fail is not None:
            raise fail
        return fn

    monkeypatch.setattr(torch, "compile", compiler)
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(1))
    return asked, resets


def test_the_graph_variants_rows_are_medians_after_their_recording_calls(monkeypatch):
    asked, resets = stand_in_graphs(monkeypatch)
    # per variant: the first call, two recording calls, then `repeats` timed calls
    per_variant = [7.0, 3.0, 2.0, 0.004, 0.001, 0.002]
    monkeypatch.setattr(bench_loss, "CLOCK", ScriptedClock(per_variant * 4))
    shape = (1, 2, 4, 5)
    made = []
    real_make = bench_loss.make_scores
    monkeypatch.setattr(bench_loss, "make_scores", lambda *args: made.append(args) or real_make(*args))
    rows = bench_loss.bench_compiled(shape, "cpu", repeats=3)
    assert made == [(shape, False, "cpu"), (shape, True, "cpu")]  # noise, then smooth scores, on the device
    assert [(r["scores"], r["variant"]) for r in rows] == [
        ("noise", "eager"), ("noise", "compile"), ("smooth", "eager"), ("smooth", "compile"),
    ]  # fmt: skip
    assert asked == [(True, "default"), (True, "default")] and len(resets) == 2
    for r in rows:
        assert r["shape"] == [1, 2, 4, 5] and "error" not in r
        assert r["first_call_s"] == 7.0 and r["ms"] == pytest.approx(2.0)
        assert r["loss_rel_diff"] == 0.0


def test_the_graph_variants_on_cuda_add_cuda_graphs_and_compare_to_eager(monkeypatch):
    asked, _ = stand_in_graphs(monkeypatch)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    real_make, real_time_loss = bench_loss.make_scores, bench_loss._time_loss
    devices = []
    monkeypatch.setattr(
        bench_loss, "make_scores", lambda s, smooth, d: devices.append(d) or real_make(s, smooth, "cpu")
    )
    monkeypatch.setattr(bench_loss, "_time_loss", lambda fn, s, d: devices.append(d) or real_time_loss(fn, s, "cpu"))
    shift = {"n": 0}
    real_entropy = sar_hf.spatial_entropy

    def drifting(scores, grid):  # each later call 1% higher: the rows show their difference to eager
        shift["n"] += 1
        return real_entropy(scores, grid) * (1 + 0.01 * (shift["n"] > 1))

    monkeypatch.setattr(sar_hf, "spatial_entropy", drifting)
    rows = bench_loss.bench_compiled((1, 2, 5, 5), "cuda", repeats=1)
    assert real_entropy(real_make((1, 2, 5, 5), False, "cpu"), (5, 5)).item() > 0.1
    assert [r["variant"] for r in rows[:3]] == ["eager", "compile", "compile + CUDA graphs"]
    assert asked[:2] == [(True, "default"), (True, "reduce-overhead")]
    assert set(devices) == {"cuda"} and len(devices) == 2 + 6 * 4  # scores twice; 1 + 2 + 1 timed calls each
    assert rows[0]["loss_rel_diff"] == pytest.approx(0.01, rel=1e-4)


def test_a_graph_variant_that_fails_is_reported_with_its_first_error_line(monkeypatch):
    stand_in_graphs(monkeypatch, fail=RuntimeError("x" * 300 + "\nsecond line"))
    rows = bench_loss.bench_compiled((1, 1, 3, 3), "cpu", repeats=1)
    failed = [r for r in rows if r["variant"] == "compile"]
    assert len(failed) == 2 and all(r["error"] == "RuntimeError: " + "x" * 200 for r in failed)
    assert all("ms" not in r for r in failed)
    assert all("error" not in r and r["ms"] > 0 for r in rows if r["variant"] == "eager")


# -- the machine ------------------------------------------------------------------------------------


def test_the_machine_is_described_by_its_versions_and_cpu(monkeypatch):
    monkeypatch.setattr(bench_loss.os, "getloadavg", lambda: (1.25, 2.5, 3.75))
    before = datetime.datetime.now(datetime.timezone.utc).replace(second=0, microsecond=0)
    info = bench_loss.machine_info("cpu")
    after = datetime.datetime.now(datetime.timezone.utc)
    assert info["cpu_cores"] == os.cpu_count() and info["torch_threads"] == torch.get_num_threads()
    assert info["load_average_at_start"] == 1.25
    assert info["python"] == platform.python_version() and info["torch"] == torch.__version__
    assert info["scipy"] == scipy.__version__ and info["numpy"] == np.__version__
    assert info["reference_labeller"] == bench_loss.REFERENCE_LABELLER
    date = datetime.datetime.strptime(info["date"], "%Y-%m-%d %H:%M UTC").replace(tzinfo=datetime.timezone.utc)
    assert before <= date <= after
    assert "gpu" not in info and "cuda" not in info
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []  # Linux
    names = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
    assert info["cpu"] == (names[0] if names else platform.processor() or platform.machine())


def test_the_cpu_is_the_first_model_name_or_the_platforms(monkeypatch):
    monkeypatch.setattr(
        bench_loss, "Path", FakeStat(["processor\t: 0\nmodel name\t: Chip: X 9000 \nmodel name\t: Other\n"])
    )
    assert bench_loss.machine_info("cpu")["cpu"] == "Chip: X 9000"
    monkeypatch.setattr(bench_loss.platform, "processor", lambda: "")
    monkeypatch.setattr(bench_loss.platform, "machine", lambda: "arm64")
    monkeypatch.setattr(bench_loss, "Path", FakeStat(["processor\t: 0\n"]))
    assert bench_loss.machine_info("cpu")["cpu"] == "arm64"
    monkeypatch.setattr(bench_loss, "Path", FakeStat([OSError("no /proc")]))
    assert bench_loss.machine_info("cpu")["cpu"] == "arm64"
    monkeypatch.setattr(bench_loss.platform, "processor", lambda: "x86_64")
    monkeypatch.setattr(bench_loss, "Path", FakeStat([OSError("no /proc")]))
    assert bench_loss.machine_info("cpu")["cpu"] == "x86_64"


def test_a_cuda_machine_names_its_gpu_and_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU 80GB")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    info = bench_loss.machine_info("cuda")
    assert info["gpu"] == "Fake GPU 80GB" and info["cuda"] == "12.8"


# -- the report -------------------------------------------------------------------------------------


def row(shape, scores, speedup, ceiling, idle=None, **extra):
    return {
        "shape": shape,
        "scores": scores,
        "mean_regions_per_map": 3.27,
        "reference_ms": 123.456,
        "sar_hf_ms": 4.567,
        "speedup": speedup,
        "labels_scipy_ms": 1.234,
        "labels_propagation_ms": 2.346,
        "labels_reference_ms": 9.876,
        "labelling_ceiling": ceiling,
        "loss_rel_diff": 3.2e-8,
        "cpu_idle_before": idle,
        "algorithms": {
            "scipy": {"ms": 4.5678, "kernel_launches": None, "host_syncs": None, "labels_equal_scipy": True,
                      "back_to_back_ms": None, "host_sync_sites": []},
            "propagation": {"ms": 12.0, "kernel_launches": None, "host_syncs": None, "labels_equal_scipy": True,
                            "host_sync_sites": []},  # an older result, without back-to-back times
        },
        **extra,
    }  # fmt: skip


def test_a_table_row_shows_every_column_of_its_result():
    assert bench_loss._row(row([64, 6, 14, 14], "noise", 27.03, 100.04, idle=0.934)) == (
        "| 64×6, 14×14 | noise | 3.3 | 123.5 | 4.57 | **27.0×** | 1.23 | 2.35 | 9.88 | 100.0× | 3e-08 | 93% |"
    )
    assert bench_loss._row(row([16, 12, 7, 9], "smooth", 1.96, 0.5)) == (
        "| 16×12, 7×9 | smooth | 3.3 | 123.5 | 4.57 | **2.0×** | 1.23 | 2.35 | 9.88 | 0.5× | 3e-08 | – |"
    )
    assert bench_loss._row(row([1, 2, 3, 4], "noise", 5.0, 6.0, idle=0.0)).endswith("| 0% |")


def test_an_algorithm_row_shows_each_algorithms_cells_or_dashes():
    r = row([64, 6, 14, 14], "noise", 2.0, 3.0)
    r["algorithms"]["triton"] = {
        "ms": 0.1234, "back_to_back_ms": 0.0456, "kernel_launches": 17, "host_syncs": 2,
        "labels_equal_scipy": False, "host_sync_sites": [],
    }  # fmt: skip
    assert bench_loss._algorithm_row(r) == (
        "| 64×6, 14×14 | noise | 4.568 | – | – | – | yes | 12.000 | – | – | – | yes "
        "| 0.123 | 0.046 | 17 | 2 | **no** |"
    )
    del r["algorithms"]["triton"]
    r["algorithms"]["scipy"].update(kernel_launches=0, host_syncs=0, back_to_back_ms=0.0)
    assert bench_loss._algorithm_row(r) == (
        "| 64×6, 14×14 | noise | 4.568 | 0.000 | 0 | 0 | yes | 12.000 | – | – | – | yes | – | – | – | – | – |"
    )


def test_a_graph_variant_row_shows_its_time_or_its_error():
    ok = {"shape": [256, 6, 14, 14], "scores": "smooth", "variant": "compile", "ms": 1.23456, "first_call_s": 12.34,
          "loss_rel_diff": 0.0}  # fmt: skip
    assert bench_loss._compiled_row(ok) == "| 256×6, 14×14 | smooth | compile | 1.235 | 12.3 | 0e+00 |"
    failed = {
        "shape": [2, 3, 4, 5],
        "scores": "noise",
        "variant": "compile + CUDA graphs",
        "error": "RuntimeError: boom",
    }
    assert bench_loss._compiled_row(failed) == (
        "| 2×3, 4×5 | noise | compile + CUDA graphs | fails: RuntimeError: boom | | |"
    )


def machine(threads=1, gpu=False):
    info = {
        "cpu": "Xeon Fake", "cpu_cores": 2, "torch_threads": threads, "load_average_at_start": 1.5,
        "load_average_at_end": 2.25, "python": "3.11.7", "torch": "2.13.0", "scipy": "1.17.1", "numpy": "2.1.0",
        "reference_labeller": "`scipy.ndimage.label` (no OpenCV)", "date": "2026-12-02 10:00 UTC",
    }  # fmt: skip
    if gpu:
        info.update(gpu="H200", cuda="12.8")
    return info


def results(**changes):
    shapes = [
        row([64, 6, 14, 14], "noise", 5.0, 7.0),
        row([64, 6, 14, 14], "smooth", 4.0, 9.0),
        row([16, 6, 64, 64], "noise", 2.5, 8.0),
        row([64, 6, 32, 32], "noise", 9.0, 3.1),
        row([16, 12, 8, 8], "smooth", 6.0, 2.0),
    ]
    shapes[2]["algorithms"]["scipy"]["host_sync_sites"] = ["b.py:2 y", "a.py:1 x"]
    shapes[3]["algorithms"]["scipy"]["host_sync_sites"] = ["a.py:1 x"]  # the same site again: listed once
    shapes[4]["algorithms"]["propagation"]["host_sync_sites"] = ["a.py:0 z"]
    out = {
        "device": "cpu",
        "repeats": 3,
        "clock": "wall clock",
        "machine": machine(),
        "shapes": shapes,
        "sweep": [row([16, 6, 8, 8], "noise", 1.5, 4.0), row([16, 6, 16, 16], "noise", 3.5, 2.5)],
        "compiled": [],
    }
    out.update(changes)
    return out


def assert_blocks_are_set_apart(lines):
    """Markdown renders headings, tables, lists and paragraphs apart only with a blank line between them."""
    kind = ["blank" if not x else "heading" if x.startswith("#") else "table" if x.startswith("|") else "list"
            if x.startswith("- ") else "text" for x in lines]  # fmt: skip
    for before, after in zip(kind[:-1], kind[1:], strict=True):
        assert "blank" in (before, after) or before == after in ("table", "list"), (before, after)
    assert "heading" not in kind[-2:] and kind[-1] == "blank"


def test_the_report_lists_every_row_in_its_tables_and_sections():
    r = results()
    md = bench_loss.to_markdown(r)
    lines = md.split("\n")
    assert_blocks_are_set_apart(lines)
    assert lines[0] == "# `spatial_entropy` forward + backward, cpu" and md.endswith(".\n")
    assert lines[2] == (
        "Machine: Xeon Fake, 2 cores (1 torch thread). Python 3.11.7, torch 2.13.0, scipy 1.17.1, numpy 2.1.0. "
        "2026-12-02 10:00 UTC. One-minute load average 1.50 at the start, 2.25 at the end (other work on the "
        "machine slows the multi-threaded torch ops of sar_hf far more than the reference's small "
        "single-threaded ones)."
    )
    assert lines[4].startswith("Median of 3 runs after one warm-up (wall clock), the two implementations")
    assert "labelled on the CPU by `scipy.ndimage.label` (no OpenCV) in a Python loop" in lines[4]
    listed = lines.index("## Listed shapes")
    assert lines[listed + 2].startswith("| B×heads, grid | scores | regions/map |")
    assert lines[listed + 4 : listed + 9] == [bench_loss._row(x) for x in r["shapes"]]
    per = lines.index("### Per algorithm")
    assert lines[per + 2].startswith("| B×heads, grid | scores | scipy (ms) | scipy back to back (ms) |")
    assert lines[per + 3] == "|---|---|" + "---:|---:|---:|---:|---|" * 3
    assert lines[per + 4 : per + 9] == [bench_loss._algorithm_row(x) for x in r["shapes"]]
    sync = lines.index("Host synchronisations, where they happened:")
    assert lines[sync + 2 : sync + 6] == [
        "- propagation: `a.py:0 z`",
        "- scipy: `a.py:1 x`",
        "- scipy: `b.py:2 y`",
        "",
    ]
    sweep = lines.index("## Grid side sweep at B×heads = 16×6")
    assert lines[sweep + 2] == lines[listed + 2] and lines[sweep + 3] == lines[listed + 3]
    assert lines[sweep + 4 : sweep + 7] == [bench_loss._row(x) for x in r["sweep"]] + [""]
    assert "## torch.compile and CUDA graphs" not in lines
    summary = lines.index("## Summary")
    assert lines[summary + 2 :] == [
        "- listed shapes, noise scores: smallest speedup 2.5× (16×6, 64×64); "
        "lowest labelling ceiling 3.1× (64×6, 32×32).",
        "- listed shapes, smooth scores: smallest speedup 4.0× (64×6, 14×14); "
        "lowest labelling ceiling 2.0× (16×12, 8×8).",
        "- sweep, noise scores: smallest speedup 1.5× (16×6, 8×8); lowest labelling ceiling 2.5× (16×6, 16×16).",
        "",
    ]


def test_the_report_of_a_gpu_run_with_graph_variants_and_no_sweep():
    graphs = [
        {"shape": [256, 6, 14, 14], "scores": "noise", "variant": "eager", "ms": 2.0, "first_call_s": 0.1,
         "loss_rel_diff": 0.0},
        {"shape": [256, 6, 14, 14], "scores": "noise", "variant": "compile", "error": "RuntimeError: boom"},
    ]  # fmt: skip
    shapes = [row([64, 6, 14, 14], "smooth", 4.0, 9.0)]
    r = results(device="cuda", machine=machine(threads=4, gpu=True), sweep=[], compiled=graphs, shapes=shapes)
    md = bench_loss.to_markdown(r)
    lines = md.split("\n")
    assert_blocks_are_set_apart(lines)
    assert lines[0] == "# `spatial_entropy` forward + backward, cuda"
    assert lines[2].startswith("Machine: Xeon Fake, 2 cores (4 torch threads), H200 (CUDA 12.8). Python 3.11.7,")
    assert not any(line.startswith("## Grid side sweep") for line in lines)
    assert "Host synchronisations, where they happened:" not in lines
    graph = lines.index("## torch.compile and CUDA graphs")
    assert lines[graph + 6 : graph + 8] == [bench_loss._compiled_row(x) for x in graphs]
    assert lines[graph + 8 : graph + 10] == ["", "## Summary"]
    assert lines[-2:] == [
        "- listed shapes, smooth scores: smallest speedup 4.0× (64×6, 14×14); "
        "lowest labelling ceiling 9.0× (64×6, 14×14).",
        "",
    ]


# -- the command line -------------------------------------------------------------------------------


def test_a_shape_is_four_numbers_joined_by_x():
    assert bench_loss._shape("64x6x14x14") == (64, 6, 14, 14)
    assert bench_loss._shape("2X3X4X5") == (2, 3, 4, 5)
    for bad in ("64x6x14", "64x6x14x14x1", "axbxcxd", "64,6,14,14"):
        with pytest.raises(
            argparse.ArgumentTypeError,
            match=f"^a shape is BxHEADSxGHxGW, e.g. 64x6x14x14; got {re.escape(repr(bad))}$",
        ):
            bench_loss._shape(bad)


class Recorder:
    """Stands in for bench_shape and bench_compiled: records the calls and returns rows to_markdown can show."""

    def __init__(self, monkeypatch):
        self.rows, self.graphs = [], []
        monkeypatch.setattr(bench_loss, "bench_shape", self.bench_shape)
        monkeypatch.setattr(bench_loss, "bench_compiled", self.bench_compiled)
        loads = iter((0.5 + 0.25 * i, 0.0, 0.0) for i in range(100))  # 0.5 at the start, 0.75 at the end, ...
        monkeypatch.setattr(bench_loss.os, "getloadavg", lambda: next(loads))

    def bench_shape(self, shape, smooth, device, repeats, max_wait_s=0.0):
        self.rows.append((tuple(shape), smooth, device, repeats, max_wait_s))
        return row(list(shape), "smooth" if smooth else "noise", 2.0 + len(self.rows), 3.0)

    def bench_compiled(self, shape, device, repeats):
        self.graphs.append((tuple(shape), device, repeats))
        return [{"shape": list(shape), "scores": "noise", "variant": "eager", "ms": 1.0, "first_call_s": 0.5,
                 "loss_rel_diff": 0.0}]  # fmt: skip


def test_main_runs_the_listed_shapes_and_the_sweep_with_both_scores_and_writes_both_files(
    monkeypatch, tmp_path, capsys
):
    monkeypatch.setattr(bench_loss, "SHAPES", [(2, 3, 4, 5), (1, 2, 3, 3)])
    monkeypatch.setattr(bench_loss, "SWEEP_SIDES", [4, 6])
    runs = Recorder(monkeypatch)
    out = tmp_path / "a" / "b"
    got = bench_loss.main(["--repeats", "2", "--out", str(out)])
    assert runs.rows == [
        ((2, 3, 4, 5), False, "cpu", 2, 0.0), ((2, 3, 4, 5), True, "cpu", 2, 0.0),
        ((1, 2, 3, 3), False, "cpu", 2, 0.0), ((1, 2, 3, 3), True, "cpu", 2, 0.0),
        ((16, 6, 4, 4), False, "cpu", 2, 0.0), ((16, 6, 4, 4), True, "cpu", 2, 0.0),
        ((16, 6, 6, 6), False, "cpu", 2, 0.0), ((16, 6, 6, 6), True, "cpu", 2, 0.0),
    ]  # fmt: skip
    assert runs.graphs == [] and got["compiled"] == []
    assert got["device"] == "cpu" and got["repeats"] == 2 and got["clock"] == "wall clock"
    assert [r["shape"] for r in got["shapes"]] == [[2, 3, 4, 5]] * 2 + [[1, 2, 3, 3]] * 2
    assert [r["shape"] for r in got["sweep"]] == [[16, 6, 4, 4]] * 2 + [[16, 6, 6, 6]] * 2
    assert got["machine"]["load_average_at_start"] == 0.5 and got["machine"]["load_average_at_end"] == 0.75
    assert got["machine"]["cpu_cores"] == os.cpu_count()
    assert sorted(p.name for p in out.iterdir()) == ["bench_loss_cpu.json", "bench_loss_cpu.md"]
    assert json.loads((out / "bench_loss_cpu.json").read_text()) == got
    assert (out / "bench_loss_cpu.json").read_text().endswith("}\n")
    assert (out / "bench_loss_cpu.json").read_text().startswith('{\n  "device": "cpu",\n')
    md = (out / "bench_loss_cpu.md").read_text()
    assert md == bench_loss.to_markdown(got)
    assert capsys.readouterr().out == md + "\n"


def test_main_runs_only_what_its_options_ask(monkeypatch, tmp_path):
    runs = Recorder(monkeypatch)
    args = ["--shapes", "2x3x4x5", "1x1x3x3", "--no-smooth", "--no-sweep", "--repeats", "4", "--wait-quiet", "1.5"]
    got = bench_loss.main([*args, "--out", str(tmp_path)])
    assert runs.rows == [((2, 3, 4, 5), False, "cpu", 4, 1.5), ((1, 1, 3, 3), False, "cpu", 4, 1.5)]
    assert got["sweep"] == [] and got["repeats"] == 4
    md = (tmp_path / "bench_loss_cpu.md").read_text()
    assert "## Grid side sweep" not in md and "| 2×3, 4×5 | noise |" in md


def test_main_times_the_graph_variants_at_the_default_or_given_shape(monkeypatch, tmp_path):
    runs = Recorder(monkeypatch)
    got = bench_loss.main(["--no-sweep", "--shapes", "1x1x3x3", "--compile", "--repeats", "3", "--out", str(tmp_path)])
    assert runs.graphs == [((256, 6, 14, 14), "cpu", 3)] and got["compiled"][0]["shape"] == [256, 6, 14, 14]
    assert "## torch.compile and CUDA graphs" in (tmp_path / "bench_loss_cpu.md").read_text()
    runs = Recorder(monkeypatch)
    bench_loss.main(["--no-sweep", "--shapes", "1x1x3x3", "--compile", "2x2x5x5", "--out", str(tmp_path)])
    assert runs.graphs == [((2, 2, 5, 5), "cpu", 5)]  # five runs by default
    assert runs.rows[0][3] == 5


def test_main_with_cpu_time_switches_the_clock_and_runs_one_thread(monkeypatch, tmp_path):
    runs = Recorder(monkeypatch)
    monkeypatch.setattr(bench_loss, "CLOCK", bench_loss.CLOCK)  # put back after the test
    set_to = []
    monkeypatch.setattr(torch, "set_num_threads", set_to.append)
    args = ["--no-sweep", "--no-smooth", "--shapes", "1x1x3x3", "--cpu-time", "--threads", "4", "--out", str(tmp_path)]
    got = bench_loss.main(args)
    assert bench_loss.CLOCK is bench_loss.time.thread_time and set_to == [1]  # one thread, whatever --threads says
    assert got["clock"] == "thread CPU time"
    assert "(thread CPU time)" in (tmp_path / "bench_loss_cpu.md").read_text()
    assert len(runs.rows) == 1


def test_main_sets_the_torch_threads_asked(monkeypatch, tmp_path):
    Recorder(monkeypatch)
    threads = torch.get_num_threads()
    set_to = []
    monkeypatch.setattr(torch, "set_num_threads", set_to.append)
    bench_loss.main(["--no-sweep", "--no-smooth", "--shapes", "1x1x3x3", "--threads", "3", "--out", str(tmp_path)])
    assert set_to == [3]
    bench_loss.main(["--no-sweep", "--no-smooth", "--shapes", "1x1x3x3", "--out", str(tmp_path)])
    assert set_to == [3] and torch.get_num_threads() == threads


def test_main_on_cuda_names_its_files_after_the_device(monkeypatch, tmp_path):
    runs = Recorder(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    got = bench_loss.main(
        ["--device", "cuda", "--no-sweep", "--no-smooth", "--shapes", "1x1x3x3", "--out", str(tmp_path)]
    )
    assert runs.rows == [((1, 1, 3, 3), False, "cuda", 5, 0.0)]
    assert got["device"] == "cuda" and got["machine"]["gpu"] == "Fake GPU"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench_loss_cuda.json", "bench_loss_cuda.md"]


def test_main_writes_to_the_results_folder_beside_the_script_by_default(monkeypatch, tmp_path):
    Recorder(monkeypatch)
    monkeypatch.setattr(bench_loss, "__file__", str(tmp_path / "bench_loss.py"))
    bench_loss.main(["--no-sweep", "--no-smooth", "--shapes", "1x1x3x3"])
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["bench_loss_cpu.json", "bench_loss_cpu.md"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--device", "cuda"], "--device cuda: no CUDA device is available"),
        (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
        (["--shapes", "1x2x3"], "argument --shapes: a shape is BxHEADSxGHxGW, e.g. 64x6x14x14; got '1x2x3'"),
        (["--repeats", "two"], "argument --repeats: invalid int value: 'two'"),
        (["--threads", "1.5"], "argument --threads: invalid int value: '1.5'"),
        (["--wait-quiet", "soon"], "argument --wait-quiet: invalid float value: 'soon'"),
        (["--compile", "big"], "argument --compile: a shape is BxHEADSxGHxGW, e.g. 64x6x14x14; got 'big'"),
    ],
    ids=["no-cuda", "device", "shapes", "repeats", "threads", "wait-quiet", "graph-shape"],  # mutmut skips "compile"
)
def test_main_refuses_bad_arguments_with_the_reason(monkeypatch, capsys, argv, message):
    Recorder(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_:
        bench_loss.main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and f"error: {message}" in err
    if "invalid" not in message:  # our own messages, whole
        assert err.endswith(f"error: {message}")


def test_main_refuses_cpu_time_on_cuda(monkeypatch, capsys):
    Recorder(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(SystemExit):
        bench_loss.main(["--device", "cuda", "--cpu-time"])
    assert capsys.readouterr().err.strip().endswith("error: --cpu-time: CPU only")


def test_main_help_opens_with_the_scripts_summary_and_explains_each_option(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "1000")
    with pytest.raises(SystemExit):
        bench_loss.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Forward + backward time of `sar_hf.spatial_entropy` against the structure of the authors' release." in text
    assert (
        "The reference, `reference_spatial_entropy`" not in text and "Usage:" not in text
    )  # its first paragraph only
    for option, words in [
        ("--device {cpu,cuda}", ""),
        ("--repeats REPEATS", "timed runs per row (median reported)"),
        ("--shapes SHAPES [SHAPES ...]", "B x heads x gh x gw (default: the listed shapes)"),
        ("--no-smooth", "only the random-normal scores"),
        ("--no-sweep", "skip the grid-side sweep"),
        ("--compile [SHAPE]", "also time torch.compile (CUDA graphs too on CUDA) at SHAPE (default 256x6x14x14)"),
        ("--threads THREADS", "torch intra-op threads (default: torch's)"),
        ("--cpu-time", "time with this thread's CPU time (CPU only; sets one torch thread): robust to other jobs"),
        (
            "--wait-quiet WAIT_QUIET",
            "before each row, wait up to this many seconds for other processes to leave the CPUs idle",
        ),
        ("--out OUT", "results folder"),
    ]:
        assert f"{option} {words}".strip() in text, option


def test_main_end_to_end_on_tiny_shapes_writes_a_report_that_matches_its_json(monkeypatch, tmp_path):
    monkeypatch.setattr(bench_loss, "SHAPES", [(2, 2, 4, 5)])
    monkeypatch.setattr(bench_loss, "SWEEP_SIDES", [3])
    monkeypatch.setattr(bench_loss, "SWEEP_BATCH", (2, 3))
    got = bench_loss.main(["--repeats", "1", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "bench_loss_cpu.json").read_text())
    assert saved == got
    md = (tmp_path / "bench_loss_cpu.md").read_text()
    assert md == bench_loss.to_markdown(saved)
    rows = saved["shapes"] + saved["sweep"]
    assert [(r["shape"], r["scores"]) for r in rows] == [
        ([2, 2, 4, 5], "noise"), ([2, 2, 4, 5], "smooth"), ([2, 3, 3, 3], "noise"), ([2, 3, 3, 3], "smooth"),
    ]  # fmt: skip
    for r in rows:
        assert bench_loss._row(r) in md
        assert (bench_loss._algorithm_row(r) in md) == (r in saved["shapes"])  # per algorithm: listed shapes
        scores = bench_loss.make_scores(tuple(r["shape"]), r["scores"] == "smooth", "cpu")
        assert r["loss_reference"] == pytest.approx(reference_entropy(scores, r["shape"][2:]), rel=1e-5)
        assert r["loss_rel_diff"] < 1e-5 and r["runs"] == 1
    assert "## Grid side sweep at B×heads = 2×3" in md
