"""The Triton kernels (`sar_hf.triton_kernels`) against scipy's labels and the float64 reference loss.

On a GPU machine they run on the GPU (`benchmarks/run_gpu.sh` runs this file first). Without one
they run in Triton's interpreter (set up in conftest.py), one program after another on CPU tensors,
so the maps here are few; `test_kernels_compile_for_a_gpu` builds the real GPU binaries, which the
interpreter never does.
"""

import contextlib
import logging
import os
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest
import torch
from test_components import (
    ADVERSARIAL,
    ADVERSARIAL_GRIDS,
    CONNECTIVITIES,
    assert_same_partition,
    random_mask,
    reference_labels,
    slow_comb,
)
from test_entropy import SHAPES, assert_matches_reference, non_finite_batch, reference, scores_for
from test_export_entropy import assert_same_loss_and_grads, model_and_input
from torch._library import custom_ops
from torch.utils._python_dispatch import TorchDispatchMode

from sar_hf import components, connected_components, spatial_entropy

triton = pytest.importorskip("triton")
triton_kernels = pytest.importorskip("sar_hf.triton_kernels")

KERNELS = ("_label_kernel", "_entropy_kernel", "_reduce_kernel", "_entropy_backward_kernel")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU through the interpreter

# -- labels -----------------------------------------------------------------------------------


@pytest.mark.parametrize("connectivity", CONNECTIVITIES)
@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_adversarial_masks_match_scipy(name, connectivity):
    # Snakes, spirals, checkerboards, diagonals, stripes, empty and full, from 1x1 to 64x64 and 1xn, nx1.
    for grid in ADVERSARIAL_GRIDS:
        mask = ADVERSARIAL[name](*grid)
        labels, count = connected_components(
            torch.from_numpy(mask).to(DEVICE), connectivity, "triton", return_counts=True
        )
        assert_same_partition(labels, mask, connectivity)
        assert count.item() == reference_labels(mask, connectivity).max()


@pytest.mark.parametrize("connectivity", CONNECTIVITIES)
def test_the_slowest_comb_that_fits_matches_scipy(connectivity):
    # test_components.py's comb whose trees merge slowest, at the largest size the kernels hold (7x269).
    mask = slow_comb(5, 3)
    assert mask.size <= components.MAX_TRITON_PIXELS
    assert_same_partition(
        connected_components(torch.from_numpy(mask).to(DEVICE), connectivity, "triton"), mask, connectivity
    )


@pytest.mark.parametrize("connectivity", CONNECTIVITIES)
@pytest.mark.parametrize("grid", [(14, 14), (7, 13), (1, 17), (17, 1), (64, 64)], ids=lambda g: f"{g[0]}x{g[1]}")
def test_random_masks_get_scipys_labels(grid, connectivity):
    # Every density from empty to full in one batch [2, 6, gh, gw]; both number regions in raster
    # order of their first pixel, so the labels are not only the same partition but equal.
    rng = np.random.default_rng(grid[0] * 100 + grid[1])
    densities = np.linspace(0, 1, 12).reshape(2, 6, 1, 1)
    mask = torch.from_numpy(rng.random((2, 6, *grid)) < densities)
    labels, counts = connected_components(mask.to(DEVICE), connectivity, "triton", return_counts=True)
    assert_same_partition(labels, mask.numpy(), connectivity)
    expected, expected_counts = connected_components(mask.to(DEVICE), connectivity, "scipy", return_counts=True)
    assert torch.equal(labels, expected) and torch.equal(counts, expected_counts)
    # torch.equal does not compare dtypes: the labels and counts are int64, as scipy's
    assert labels.dtype == expected.dtype == torch.int64 and counts.dtype == expected_counts.dtype


def test_one_launch_labels_every_map(monkeypatch):
    launches = count_launches(monkeypatch)
    connected_components(torch.from_numpy(random_mask(np.random.default_rng(1), (3, 4, 9, 9), 0.5)), 8, "triton")
    assert launches == ["_label_kernel"]


def test_labels_and_counts_are_made_on_the_maps_device():
    # On a GPU an output buffer left on the default device (the host) hands the kernel a host pointer.
    # Here the default device is meta meanwhile, so a buffer made without the maps' device is a meta
    # tensor that the launch cannot read.
    mask = torch.from_numpy(random_mask(np.random.default_rng(4), (3, 5, 7), 0.5))
    with torch.device("meta"):
        labels, counts = triton_kernels.label_maps(mask.to(DEVICE), 8)
    assert labels.device == counts.device == mask.to(DEVICE).device
    expected, expected_counts = connected_components(mask, 8, "scipy", return_counts=True)
    assert torch.equal(labels.cpu(), expected) and torch.equal(counts.cpu(), expected_counts)


def test_grids_beyond_the_kernels_fall_back_to_propagation_once(monkeypatch, caplog):
    launches = count_launches(monkeypatch)
    calls = []
    monkeypatch.setattr(components, "_label_propagation", record(calls, components._label_propagation))
    mask = random_mask(np.random.default_rng(2), (2, 65, 64), 0.5)  # 4160 pixels
    logging.Logger.warning_once.cache_clear()  # Transformers' "once" is per process: as if none came before
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            assert_same_partition(connected_components(torch.from_numpy(mask), 8, "triton"), mask, 8)
    assert launches == [] and len(calls) == 2
    assert [r.getMessage() for r in caplog.records].count(FALLBACK_MESSAGE) == 1
    # The largest grid the kernels hold still runs them.
    connected_components(torch.zeros(1, 64, 64, dtype=torch.bool), 8, "triton")
    assert launches == ["_label_kernel"]


FALLBACK_MESSAGE = (
    "Maps of 4160 patches exceed the 4096 that the Triton kernels hold; labelling them with the 'propagation' "
    "algorithm instead."
)


def test_auto_picks_triton_where_it_runs(monkeypatch):
    cuda, cpu, meta = torch.device("cuda", 0), torch.device("cpu"), torch.device("meta")
    capability = [(9, 0)]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: capability[0])
    monkeypatch.setattr(torch.version, "hip", None)

    def auto(device, pixels=196):
        monkeypatch.setattr(components, "_TRITON_RUNS_ON", {})  # read the device afresh
        return components.resolve_algorithm("auto", device, pixels)

    assert [auto(cuda), auto(cuda, 4097), auto(cpu), auto(meta)] == ["triton", "propagation", "scipy", "propagation"]
    capability[0] = (6, 0)  # a P100: Triton does not compile for it
    assert auto(cuda) == "propagation"
    capability[0] = (8, 0)
    monkeypatch.setattr(torch.version, "hip", "6.2")  # ROCm: untested
    assert auto(cuda) == "propagation"
    monkeypatch.setattr(torch.version, "hip", None)
    torch.use_deterministic_algorithms(True)  # the kernels' atomic adds are not deterministic
    try:
        assert auto(cuda) == "propagation"
    finally:
        torch.use_deterministic_algorithms(False)
    monkeypatch.setattr(components, "_TRITON_INSTALLED", False)
    assert auto(cuda) == "propagation"
    with pytest.raises(ImportError, match=r"pip install 'sar_hf\[triton\]'"):
        components.resolve_algorithm("triton", cuda, 196)


def test_the_fallback_warning_stays_out_of_compiled_graphs():
    torch._dynamo.reset()
    mask = torch.from_numpy(random_mask(np.random.default_rng(3), (1, 65, 64), 0.5))
    labels = torch.compile(lambda m: connected_components(m, 8, "triton"), fullgraph=True)(mask)
    assert_same_partition(labels, mask.numpy(), 8)


@pytest.mark.parametrize("interpret", [None, "0"])
def test_cpu_tensors_outside_the_interpreter_are_refused(interpret):
    # Triton decides when the kernels are defined (at the import) whether its interpreter runs them.
    done = run_in_a_fresh_process(CPU_CALLS, interpret)
    assert done.returncode == 0, done.stderr[-3000:]
    refusal = "algorithm='triton' runs on CUDA tensors, got a cpu tensor; use algorithm='auto'"
    assert done.stdout.splitlines() == [f"ValueError {refusal}", f"ValueError {refusal}"], done.stdout


@pytest.mark.parametrize("interpret", ["yes"])  # "1" is how conftest.py runs the rest
def test_the_interpreter_runs_cpu_tensors_however_triton_is_told_to_use_it(interpret):
    # Every spelling that Triton reads as true (1, true, on, yes, y, in any case) puts the kernels in its
    # interpreter, and then CPU tensors are theirs to run.
    done = run_in_a_fresh_process(CPU_CALLS, interpret)
    assert done.returncode == 0, done.stderr[-3000:]
    labels, loss = done.stdout.splitlines()
    mask = np.array([[1, 0, 1], [0, 0, 0], [1, 1, 0]], dtype=bool)
    assert labels == str(reference_labels(mask, 8)[None].tolist())
    scores = torch.tensor([[[5.0, 0.0, 1.0, 0.0, 0.0, 0.0, 4.0, 4.0, 0.0]]], dtype=torch.float64)
    assert float(loss) == pytest.approx(reference(scores, (3, 3)).item(), rel=1e-6)


CPU_CALLS = textwrap.dedent(
    """
    import torch
    from sar_hf import connected_components, spatial_entropy

    mask = torch.tensor([[[1, 0, 1], [0, 0, 0], [1, 1, 0]]], dtype=torch.bool)
    scores = torch.tensor([[[5.0, 0.0, 1.0, 0.0, 0.0, 0.0, 4.0, 4.0, 0.0]]])
    for call in (lambda: connected_components(mask, 8, "triton").tolist(),
                 lambda: spatial_entropy(scores, (3, 3), algorithm="triton").item()):
        try:
            print(call())
        except ValueError as error:
            print("ValueError", str(error).split(" (scipy")[0])
    """
)


def run_in_a_fresh_process(
    code: str, interpret: str | None = None, timeout: float = 300, **env: str
) -> subprocess.CompletedProcess:
    """`code` run by a new interpreter whose TRITON_INTERPRET is `interpret` (None: not set), with `env` added."""
    env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, **env}
    if interpret is not None:
        env["TRITON_INTERPRET"] = interpret
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)


# -- the loss ---------------------------------------------------------------------------------


@pytest.mark.parametrize("smooth", [False, True], ids=["noise", "smooth"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_loss_and_gradient_match_the_float64_reference(shape, smooth):
    scores = scores_for(shape, seed=4, smooth=smooth).to(DEVICE).requires_grad_()
    per_map = spatial_entropy(scores, shape[2:], reduction="none", algorithm="triton")
    assert per_map.dtype == torch.float32
    assert_matches_reference(per_map.cpu(), reference(scores.cpu(), shape[2:]), rtol=1e-6)
    loss = spatial_entropy(scores, shape[2:], algorithm="triton")
    assert_matches_reference(loss.cpu(), reference(scores.cpu(), shape[2:]).mean(), rtol=1e-6)
    # The float64 gradient of the eager path (itself checked against finite differences of the
    # reference in test_entropy.py).
    (grad,) = torch.autograd.grad(loss, scores)
    double = scores.detach().cpu().double().requires_grad_()
    (expected,) = torch.autograd.grad(spatial_entropy(double, shape[2:], algorithm="scipy"), double)
    assert grad.dtype == torch.float32
    if shape[2] * shape[3] > 1:
        assert expected.abs().max() > 0  # not vacuous
    torch.testing.assert_close(grad.cpu().double(), expected, rtol=1e-6, atol=1e-6 * expected.abs().max().item())


@pytest.mark.parametrize("connectivity", CONNECTIVITIES)
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_float64_gradient_equals_the_eager_one(reduction, connectivity):
    # In float64 the kernels compute in float64, and their analytic backward gives the eager path's
    # gradient (which test_entropy.py checks by gradcheck) to rounding: same formula, another order.
    scores = scores_for((2, 3, 6, 7), dtype=torch.float64, seed=7).to(DEVICE).requires_grad_()
    grads = []
    for algorithm in ("triton", "scipy"):
        loss = spatial_entropy(scores, (6, 7), reduction, algorithm, connectivity)
        assert loss.dtype == torch.float64
        grads.append(torch.autograd.grad(loss.sum(), scores)[0])
    assert grads[1].abs().max() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-14)


def test_non_finite_maps_are_skipped_and_counted():
    shape = (3, 4, 6, 6)
    scores, bad, expected = non_finite_batch()
    scores, bad = scores.to(DEVICE), bad.to(DEVICE)
    leaf = scores.clone().requires_grad_()
    per_map, skipped = spatial_entropy(leaf, shape[2:], "none", "triton", return_skipped=True)
    assert skipped.item() == 4 and skipped.dtype == torch.int64
    assert (per_map[bad] == 0).all()
    assert_matches_reference(per_map[~bad].cpu(), expected[~bad.cpu().numpy()], rtol=1e-6)
    per_map.sum().backward(retain_graph=True)
    assert torch.isfinite(leaf.grad).all() and (leaf.grad[bad] == 0).all() and (leaf.grad[~bad] != 0).any()
    # A skipped map's gradient is 0 even where its incoming gradient is not finite, as on the eager path.
    (grad,) = torch.autograd.grad(per_map, leaf, torch.where(bad, float("inf"), 1.0))
    assert (grad[bad] == 0).all() and torch.isfinite(grad).all()
    mean, skipped = spatial_entropy(scores, shape[2:], "mean", "triton", return_skipped=True)
    assert skipped.item() == 4
    assert_matches_reference(mean.cpu(), expected[~bad.cpu().numpy()].mean(), rtol=1e-6)  # over the 8 valid maps
    everything_bad, skipped = spatial_entropy(
        torch.full((2, 3, 16), float("nan"), device=DEVICE), (4, 4), "mean", "triton", return_skipped=True
    )
    assert everything_bad.item() == 0 and skipped.item() == 6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_scores_are_read_as_they_are(dtype):
    # The kernels read half-precision scores directly (no cast launched), compute in float32 and
    # return the gradient in the scores' dtype, as the eager path does.
    shape = (2, 3, 14, 14)
    scores = scores_for(shape, seed=3).to(DEVICE, dtype).requires_grad_()
    got = spatial_entropy(scores, shape[2:], "none", "triton")
    assert got.dtype == torch.float32
    assert_matches_reference(got.cpu(), reference(scores.cpu(), shape[2:]), rtol=1e-6)
    (grad,) = torch.autograd.grad(got.sum(), scores)
    eager = scores.detach().clone().requires_grad_()
    (expected,) = torch.autograd.grad(spatial_entropy(eager, shape[2:], "none", "scipy").sum(), eager)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad, expected)  # the same float32 gradient, rounded to `dtype`


@pytest.mark.parametrize(
    ("scale", "dtype"), [(1e38, torch.float32), (1e-42, torch.float32), (1e300, torch.float64), (6e4, torch.float16)]
)
def test_extreme_magnitudes_stay_finite_and_exact(scale, dtype):
    # Rows beyond 2**60 are scaled down by a power of two built from the exponent bits.
    shape = (1, 2, 8, 8)
    scores = (scores_for(shape, dtype=torch.float64, seed=6).clamp(-1.0, 1.0) * scale).to(dtype)
    leaf = scores.to(DEVICE).requires_grad_()
    per_map = spatial_entropy(leaf, shape[2:], "none", "triton")
    assert_matches_reference(per_map.cpu(), reference(scores, shape[2:]), rtol=1e-6)
    per_map.sum().backward()
    assert torch.isfinite(leaf.grad).all() and (leaf.grad != 0).any()


@pytest.mark.parametrize("algorithm", ["triton", "scipy"])
def test_single_region_and_empty_maps_give_positive_zero(algorithm):
    one_region = torch.tensor([[[0.0, 0.0, 1.0, 1.0]]])
    constant = torch.zeros(1, 1, 4)
    got = spatial_entropy(torch.cat([one_region, constant], dim=1).to(DEVICE), (2, 2), "none", algorithm)
    assert got.tolist() == [[0.0, 0.0]] and not torch.signbit(got).any()


def test_empty_batch():
    scores = torch.randn(0, 6, 196, device=DEVICE, requires_grad=True)
    assert spatial_entropy(scores, (14, 14), "none", "triton").shape == (0, 6)
    loss, skipped = spatial_entropy(scores, (14, 14), "mean", "triton", return_skipped=True)
    assert loss.item() == 0.0 and skipped.item() == 0
    loss.backward()
    assert scores.grad.shape == scores.shape


# -- launches, host reads, graphs ---------------------------------------------------------------


def test_the_loss_on_grids_beyond_the_kernels_falls_back_to_propagation(monkeypatch):
    launches = count_launches(monkeypatch)
    scores = scores_for((1, 2, 65, 64), seed=5)  # 4160 patches, more than the kernels hold
    got = spatial_entropy(scores.to(DEVICE), (65, 64), "none", "triton")
    assert launches == []
    assert_matches_reference(got.cpu(), reference(scores, (65, 64)), rtol=1e-6)


def test_every_launch_gets_the_warps_of_its_block_and_no_fused_multiply_adds(monkeypatch):
    # 4 pixels per thread from 512 pixels on (a warp is 32 threads), 4 warps at least, and no contraction into
    # fused multiply-adds, which would round the entropy otherwise than the eager float32 operations.
    options = []
    launcher = type(triton_kernels._label_kernel)
    run = launcher.run

    def recorded(self, *args, **kwargs):
        options.append((self.fn.__name__, kwargs.get("num_warps"), kwargs.get("enable_fp_fusion")))
        return run(self, *args, **kwargs)

    monkeypatch.setattr(launcher, "run", recorded)
    for grid in [(9, 9), (64, 64)]:
        connected_components(torch.zeros(1, *grid, dtype=torch.bool, device=DEVICE), 8, "triton")
    scores = torch.randn(1, 1, 64 * 64, device=DEVICE, requires_grad=True)
    spatial_entropy(scores, (64, 64), algorithm="triton").backward()
    assert options == [
        ("_label_kernel", 4, False),
        ("_label_kernel", 32, False),
        ("_entropy_kernel", 32, False),
        ("_reduce_kernel", 8, False),  # 1024 maps per step
        ("_entropy_backward_kernel", 32, False),
    ]


def test_launches_on_a_gpu_go_to_the_gpu_of_the_tensor():
    # Triton launches on the current CUDA device; on a machine with several GPUs the launchers must make the
    # tensor's GPU current, whatever TRITON_INTERPRET says. The context is built here for a tensor that claims
    # the second GPU (building it needs no GPU).
    tensor = types.SimpleNamespace(device=torch.device("cuda", 1))
    context = triton_kernels._launching(tensor)
    assert isinstance(context, torch.cuda.device) and context.idx == 1


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_three_launches_and_no_other_tensor_work(monkeypatch, reduction):
    # Forward: the maps, then the mean (or the skipped count) over them; backward: one. Nothing else
    # computes on a tensor: only allocations and views reach the dispatcher, so nothing reads a
    # value on the host (which would show as `_local_scalar_dense` or a copy) and nothing else launches.
    launches = count_launches(monkeypatch)
    scores = scores_for((4, 6, 14, 14), dtype=torch.bfloat16, seed=1).to(DEVICE).requires_grad_()
    # The gradient `per_map.sum()` hands back: one value expanded over the maps (stride 0).
    seed = torch.ones((), device=DEVICE).expand(() if reduction == "mean" else (4, 6))
    with TensorOps() as ops:
        loss = spatial_entropy(scores, (14, 14), reduction, "triton")
        assert launches == ["_entropy_kernel", "_reduce_kernel"]
        torch.autograd.grad(loss, scores, seed)
    assert launches == ["_entropy_kernel", "_reduce_kernel", "_entropy_backward_kernel"]
    assert ops.work == [], ops.work


@pytest.mark.parametrize("return_skipped", [False, True])
def test_compile_fullgraph_matches_eager(return_skipped):
    torch._dynamo.reset()
    module, x = model_and_input(seed=1, return_skipped=return_skipped, algorithm="triton")
    eager, _ = model_and_input(seed=1, return_skipped=return_skipped, algorithm="scipy")
    assert_same_loss_and_grads(torch.compile(module, fullgraph=True), eager, x)


def test_export_keeps_the_fused_loss_as_one_node():
    module, x = model_and_input(seed=3, algorithm="triton")
    program = torch.export.export(module, (x,))
    targets = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    assert targets.count("sar_hf.spatial_entropy_triton.default") == 1
    assert_same_loss_and_grads(program.module(), module, x)  # the registered backward, through the graph


def test_kernels_compile_for_a_gpu(tmp_path):
    # The interpreter runs the kernels' Python; only Triton's compiler checks that they lower to a GPU
    # (types of loop-carried values, bitcasts, atomics, registers). It runs here without a GPU, to PTX and
    # a cubin for an H100/H200 (sm_90), with the launch options of each block size the launchers use, for
    # each dtype the kernels read and both connectivities.
    script = textwrap.dedent(
        """
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia.compiler import CUDAOptions
        from triton.compiler import ASTSource
        from sar_hf import triton_kernels as k

        def build(kernel, block, signature, **constexprs):
            signature = {**signature, "BLOCK": "constexpr", **{name: "constexpr" for name in constexprs}}
            src = ASTSource(fn=kernel, signature=signature, constexprs={**constexprs, "BLOCK": block})
            options = k._options(block)
            # A GPU launch refuses options the backend does not know (compile() alone ignores them).
            assert set(options) <= set(CUDAOptions.__dataclass_fields__), options
            binary = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
            assert binary.asm["cubin"], kernel
            # No multiply and add contracted into an fma, which rounds otherwise than the eager path (the
            # fma.rn.ftz.f32 of Triton's approximate log are its own).
            assert "fma.rn.f32" not in binary.asm["ptx"], kernel
            print(kernel.fn.__name__)

        label = {"mask_ptr": "*u8", "labels_ptr": "*i64", "counts_ptr": "*i64", "gh": "i32", "gw": "i32"}
        build(k._label_kernel, 256, label, CONNECTIVITY=4)
        build(k._label_kernel, 4096, label, CONNECTIVITY=8)
        for scores, dtype, block in (("bf16", "fp32", 256), ("fp16", "fp32", 1024), ("fp32", "fp32", 4096),
                                     ("fp64", "fp64", 256)):
            build(k._entropy_kernel, block, {"scores_ptr": f"*{scores}", "entropy_ptr": f"*{dtype}",
                  "valid_ptr": "*u8", "weight_ptr": f"*{dtype}", "advantage_ptr": f"*{dtype}", "parents_ptr": "*i32",
                  "gh": "i32", "gw": "i32"}, CONNECTIVITY=8)
            build(k._entropy_backward_kernel, block, {"grad_ptr": f"*{dtype}", "grad_stride": "i32",
                  "skipped_ptr": "*i64", "weight_ptr": f"*{dtype}", "advantage_ptr": f"*{dtype}",
                  "out_ptr": f"*{scores}", "M": "i32", "n": "i32"}, MEAN=scores == "fp32")
        for dtype in ("fp32", "fp64"):
            build(k._reduce_kernel, k._REDUCE_BLOCK, {"entropy_ptr": f"*{dtype}", "valid_ptr": "*u8",
                  "mean_ptr": f"*{dtype}", "skipped_ptr": "*i64", "M": "i32"}, MEAN=True)
        """
    )
    done = run_in_a_fresh_process(script, timeout=600, TRITON_CACHE_DIR=str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    assert set(done.stdout.split()) == set(KERNELS)


# -- helpers ----------------------------------------------------------------------------------


def count_launches(monkeypatch) -> list[str]:
    """The names of the kernels launched from now on (the interpreter's or the GPU's launcher)."""
    launches = []
    launcher = type(triton_kernels._label_kernel)
    run = launcher.run

    def counted(self, *args, **kwargs):
        launches.append(self.fn.__name__)
        with launching():
            return run(self, *args, **kwargs)

    monkeypatch.setattr(launcher, "run", counted)
    return launches


def record(calls, fn):
    def recorded(*args, **kwargs):
        calls.append(fn.__name__)
        return fn(*args, **kwargs)

    return recorded


class TensorOps(TorchDispatchMode):
    """Records the operators that compute on tensors, inside the package's own operators too (their
    Python runs under this mode), except inside kernel launches (where the interpreter moves the
    arguments to the host and back); allocations and views are not work."""

    FREE = {
        "empty",
        "empty_like",
        "empty_strided",
        "new_empty",
        "view",
        "_unsafe_view",
        "reshape",
        "alias",
        "detach",
        "as_strided",
    }
    launching = False

    def __init__(self):
        super().__init__()
        self.work = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "sar_hf":  # an operator that launches kernels: look inside it
            with self:
                return custom_ops.OPDEFS[func.name()]._init_fn(*args, **kwargs)
        if not (TensorOps.launching or func.overloadpacket.__name__ in self.FREE):
            self.work.append(str(func))
        return func(*args, **kwargs)


@contextlib.contextmanager
def launching():
    TensorOps.launching = True
    try:
        yield
    finally:
        TensorOps.launching = False
