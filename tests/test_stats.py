"""`SARStats`: the means per phase against numpy's, and the sums that processes reduce.

The reduction is checked in this one process, on a one-process gloo group: what a process that
saw no pass gives `all_reduce` must be what one that saw passes gives, or the collective fails
or hangs across real processes (the two-process run is in `test_callbacks.py`).
"""

import gc
import weakref

import numpy as np
import pytest
import torch

from sar_hf import SARStats
from sar_hf import stats as stats_module


def passes(seed: int, count: int, labelled: bool = True):
    """`count` forward passes' (entropy, ce_loss, skipped), as `SpatialEntropyLoss` hands them over."""
    generator = torch.Generator().manual_seed(seed)
    entropy = torch.rand(count, generator=generator) * 3
    ce = torch.rand(count, generator=generator) * 5
    skipped = torch.randint(0, 4, (count,), generator=generator)  # int64, as spatial_entropy counts them
    return [(entropy[i], ce[i] if labelled else None, skipped[i]) for i in range(count)]


def means(recorded) -> dict[str, float]:
    entropy, ce, skipped = (np.array([float(p[i]) for p in recorded]) for i in range(3))
    return {"entropy": entropy.mean(), "ce_loss": ce.mean(), "skipped_maps": skipped.mean()}


@pytest.mark.parametrize("count", [1, 2, 7])
def test_training_means_per_pass(count):
    stats = SARStats()
    recorded = passes(count, count)
    for entropy, ce, skipped in recorded:
        stats.update(True, entropy, ce, skipped)
    assert stats.pop(training=True) == pytest.approx(means(recorded), rel=1e-6)
    assert stats.pop(training=True) is None  # popped: the next window starts empty


def test_nothing_recorded_pops_none():
    stats = SARStats()
    assert stats.pop(training=True) is None
    assert stats.pop(training=False) is None


def test_half_and_double_precision_terms_are_summed_in_single_precision():
    stats, half, double = SARStats(), torch.tensor([1.5, 2.25]).half(), torch.tensor([0.5, 0.75]).double()
    stats.update(True, half[0].bfloat16(), half[1], torch.tensor(1))
    stats.update(True, double[0], double[1], torch.tensor(0, dtype=torch.int32))
    assert stats.pop(training=True) == {"entropy": 1.0, "ce_loss": 1.5, "skipped_maps": 0.5}


def test_without_labels_the_cross_entropy_is_left_out():
    stats = SARStats()
    recorded = passes(0, 3, labelled=False)
    for entropy, ce, skipped in recorded:
        stats.update(True, entropy, ce, skipped)
    expected = means([(e, 0.0, s) for e, _, s in recorded])
    del expected["ce_loss"]
    assert stats.pop(training=True) == pytest.approx(expected, rel=1e-6)


def test_an_evaluation_pass_counts_once_when_its_step_says_so():
    stats = SARStats()
    stats.update(False, torch.tensor(9.0), None, torch.tensor(0))  # inference of the user's: never counted
    stats.update(False, torch.tensor(1.0), torch.tensor(2.0), torch.tensor(3))  # an evaluation step's
    stats.count_evaluation_pass()
    stats.count_evaluation_pass()  # no pass since: nothing more
    stats.update(False, torch.tensor(3.0), torch.tensor(4.0), torch.tensor(1))
    assert stats.pop(training=True) is None  # evaluation passes stay out of the training figures
    stats.count_evaluation_pass()
    stats.update(False, torch.tensor(9.0), None, torch.tensor(0))  # after the last step: left out
    assert stats.pop(training=False) == {"entropy": 2.0, "ce_loss": 3.0, "skipped_maps": 2.0}
    assert stats.pop(training=False) is None


def test_training_and_evaluation_are_kept_apart():
    stats = SARStats()
    training, evaluation = passes(1, 4), passes(2, 3)
    for (entropy, ce, skipped), other in zip(training, evaluation + [None], strict=True):
        stats.update(True, entropy, ce, skipped)
        if other is not None:
            stats.update(False, *other)
            stats.count_evaluation_pass()
    assert stats.pop(training=False) == pytest.approx(means(evaluation), rel=1e-6)
    assert stats.pop(training=True) == pytest.approx(means(training), rel=1e-6)


def test_reset_drops_both_phases_and_the_pending_evaluation_pass():
    stats = SARStats()
    stats.update(True, torch.tensor(9.0), torch.tensor(9.0), torch.tensor(9))
    stats.update(False, torch.tensor(9.0), None, torch.tensor(9))
    stats.count_evaluation_pass()
    stats.update(False, torch.tensor(9.0), None, torch.tensor(9))  # pending
    stats.reset()
    stats.count_evaluation_pass()  # the pass pending before the reset is gone
    assert stats.pop(training=True) is None
    assert stats.pop(training=False) is None
    stats.update(True, torch.tensor(1.0), torch.tensor(2.0), torch.tensor(0))
    assert stats.pop(training=True) == {"entropy": 1.0, "ce_loss": 2.0, "skipped_maps": 0.0}


@pytest.mark.parametrize("training", [True, False], ids=["training", "evaluation"])
def test_the_sums_keep_no_graph_alive(training):
    # Kept across a logging window, a graph would hold every step's attention maps.
    stats = SARStats()
    scores = torch.rand(64, requires_grad=True)
    attention = scores.softmax(0)
    alive = weakref.ref(attention)  # saved by the product below for its backward
    entropy = -(attention * attention.log()).sum()
    stats.update(training, entropy, entropy * 2, torch.tensor(0))
    stats.count_evaluation_pass()
    expected = {"entropy": entropy.item(), "ce_loss": 2 * entropy.item(), "skipped_maps": 0.0}
    del attention, entropy
    gc.collect()
    assert alive() is None
    assert stats.pop(training) == pytest.approx(expected)


def test_passes_traced_by_torch_export_are_not_recorded(monkeypatch):
    stats = SARStats()
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    stats.update(True, torch.tensor(1.0), torch.tensor(1.0), torch.tensor(0))
    stats.update(False, torch.tensor(1.0), None, torch.tensor(0))
    stats.count_evaluation_pass()
    assert stats.pop(training=True) is None
    assert stats.pop(training=False) is None


@pytest.fixture
def one_process_group(monkeypatch):
    """A gloo group of one process; yields the list of the tensors given to `all_reduce`."""
    if torch.distributed.is_initialized():
        pytest.skip("a process group already exists")
    torch.distributed.init_process_group(backend="gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    reduced, all_reduce = [], torch.distributed.all_reduce

    def recording_all_reduce(tensor, *args, **kwargs):
        reduced.append(tensor.clone())
        return all_reduce(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.distributed, "all_reduce", recording_all_reduce)
    try:
        yield reduced
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("default_dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("training", [True, False], ids=["training", "evaluation"])
def test_a_process_that_saw_no_pass_reduces_a_zero_row_like_the_others(one_process_group, training, default_dtype):
    reduced = one_process_group
    previous = torch.get_default_dtype()
    torch.set_default_dtype(default_dtype)  # a script's choice; the sums stay in single precision
    try:
        busy, idle = SARStats(), SARStats()
        recorded = passes(3, 2)
        for entropy, ce, skipped in recorded:
            busy.update(training, entropy.clone().requires_grad_(), ce, skipped)
            busy.count_evaluation_pass()
        assert busy.pop(training) == pytest.approx(means(recorded), rel=1e-6)  # the mean of one process
        assert idle.pop(training) is None  # every process saw no pass: None on all of them
    finally:
        torch.set_default_dtype(previous)
    assert len(reduced) == 2
    row, zeros = reduced
    assert (zeros.shape, zeros.dtype, zeros.device) == (row.shape, row.dtype, row.device)
    assert not zeros.any()
    assert not row.requires_grad


def test_every_process_reduces_even_with_nothing_recorded(one_process_group):
    stats = SARStats()
    stats.update(False, torch.tensor(1.0), None, torch.tensor(0))  # not counted: no evaluation step
    assert stats.pop(training=True) is None
    assert stats.pop(training=False) is None
    assert len(one_process_group) == 2  # one collective per pop, or the other processes would wait


@pytest.mark.parametrize(("backend", "expected"), [("nccl", torch.device("cuda", 1)), ("gloo", torch.device("cpu"))])
def test_the_sums_are_reduced_where_the_backend_reduces(monkeypatch, backend, expected):
    # NCCL reduces tensors on this process's GPU only, gloo on the CPU.
    monkeypatch.setattr(torch.distributed, "get_backend", lambda group=None: backend)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert stats_module._reduction_device() == expected


def test_a_pass_with_zero_cross_entropy_still_counts():
    # A batch classified with certainty: the cross-entropy underflows to 0 in single precision.
    stats = SARStats()
    stats.update(True, torch.tensor(0.5), torch.tensor(0.0), torch.tensor(1))
    assert stats.pop(training=True) == {"entropy": 0.5, "ce_loss": 0.0, "skipped_maps": 1.0}


def test_a_pass_on_another_device_joins_the_sums_where_they_are():
    # A model moved to the CPU within a logging window (after steps on a GPU): its next pass's row joins
    # the sums on their device. The meta device stands in for the GPU; it mixes with no CPU tensor.
    stats = SARStats()
    stats.update(True, *(torch.tensor(value, device="meta") for value in (1.0, 2.0, 0)))
    stats.update(True, torch.tensor(3.0), torch.tensor(4.0), torch.tensor(1))
    assert (stats._sums[True].device.type, stats._sums[True].shape) == ("meta", (4,))


class _GPUTensor(torch.Tensor):
    """A CPU tensor that reports a GPU, standing in for a CUDA tensor on a machine without one: `.to` the
    CPU gives a plain CPU tensor (a copy), `.to` any other device (or None) leaves it where it is."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    @property
    def device(self):
        return torch.device("cuda", 0)

    def to(self, device=None, *args, **kwargs):
        if device is not None and torch.device(device).type == "cpu":
            return self.as_subclass(torch.Tensor).clone()
        return self


def test_sums_kept_on_a_gpu_are_reduced_on_the_cpu_under_gloo(one_process_group, monkeypatch):
    # gloo reduces on the CPU (`_reduction_device`), so sums that training kept on a GPU move there first.
    stats = SARStats()
    stats.update(True, torch.tensor(1.5), torch.tensor(0.5), torch.tensor(2))
    stats._sums[True] = torch.Tensor._make_subclass(_GPUTensor, stats._sums[True])  # as if made on a GPU
    devices, all_reduce = [], torch.distributed.all_reduce

    def device_recording_all_reduce(tensor, *args, **kwargs):
        devices.append(tensor.device)
        return all_reduce(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.distributed, "all_reduce", device_recording_all_reduce)
    assert stats.pop(training=True) == {"entropy": 1.5, "ce_loss": 0.5, "skipped_maps": 2.0}
    assert devices == [torch.device("cpu")]
