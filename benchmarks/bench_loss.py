"""Forward + backward time of `sar_hf.spatial_entropy` against the structure of the authors' release.

The reference, `reference_spatial_entropy`, is the `BlobLoss` of the authors' release
(`attention_losses.py`, Peruzzo et al., https://arxiv.org/abs/2206.04636), for any grid:

1. the mean, the mask and `relu(s - m) + 1e-9`, once for the whole batch;
2. a Python loop over the (image, head) maps, each labelled on the CPU by OpenCV's
   `cv2.connectedComponents` (8-connectivity, 16-bit labels, as the release calls it);
3. one dense 0/1 mask per region, stacked;
4. one gathered, batched sum, `x[b_idx, h_idx] * masks`, for the region masses and the total;
5. the entropy, and the release's `math.isfinite` check of the loss.

OpenCV comes from the `bench` extra (`pip install -e ".[bench]"`); where it is missing,
`scipy.ndimage.label` takes its place and the results say so. Every row checks that the
reference and `sar_hf` give the same loss.

Usage:
    python benchmarks/bench_loss.py                      # CPU, writes benchmarks/results/bench_loss_cpu.{md,json}
    python benchmarks/bench_loss.py --device cuda --compile   # GPU (benchmarks/run_gpu.sh), ..._cuda.{md,json}
    python benchmarks/bench_loss.py --repeats 3 --no-smooth --no-sweep   # a quick look

Each row alternates the implementations in one process and reports the median of `--repeats`
timed runs after one warm-up: the reference, `spatial_entropy` with its default (`auto`) labelling,
and `spatial_entropy` with each labelling algorithm the device runs (scipy and propagation; Triton
on CUDA when it is installed). "Labels" columns time the labelling alone
(`sar_hf.connected_components`), for information. On CUDA, each algorithm's row also counts the
kernels launched by one forward + backward (`torch.profiler`) and the host synchronisations
(`torch.cuda.set_sync_debug_mode`, with the Python line that caused each), and `--compile` adds
`torch.compile` and CUDA-graph timings at one shape.
"""

import argparse
import datetime
import importlib.util
import json
import math
import os
import platform
import statistics
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import scipy
import scipy.ndimage
import torch
import torch.nn.functional as F

import sar_hf

try:  # the release's labeller, from the `bench` extra
    import cv2
except ImportError:
    cv2 = None

SHAPES = [(64, 6, 14, 14), (256, 6, 14, 14), (64, 12, 14, 14), (64, 6, 32, 32), (16, 6, 64, 64)]
SWEEP_SIDES = [8, 16, 24, 32, 48, 64]
SWEEP_BATCH = (16, 6)
COMPILE_SHAPE = (256, 6, 14, 14)
EIGHT = np.ones((3, 3), dtype=bool)
REFERENCE_LABELLER = (
    f"OpenCV {cv2.__version__} `cv2.connectedComponents`" if cv2 is not None else "`scipy.ndimage.label` (no OpenCV)"
)


def reference_spatial_entropy(scores: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
    """[B, heads, gh*gw] float32 -> scalar: the authors' `BlobLoss`, step by step (see the module docstring)."""
    batch, heads, _ = scores.shape
    m = torch.mean(scores, dim=-1, keepdim=True)
    with torch.no_grad():
        mask = (scores > m).long()
        b_idx, h_idx, regions = _reference_regions(mask, grid_size)
    x = torch.relu(scores - m) + torch.tensor(1e-9)
    mass = torch.sum(x[b_idx, h_idx] * regions, dim=-1)
    total = torch.sum(x[b_idx, h_idx] * mask[b_idx, h_idx], dim=-1)
    p = mass / total
    loss = torch.sum(-(p * torch.log(p))) / (batch * heads)
    if not math.isfinite(loss.item()):  # the release returns None here; the check reads the loss on the host
        raise FloatingPointError("the reference loss is not finite")
    return loss


def _reference_regions(mask: torch.Tensor, grid_size: tuple[int, int]):
    """The release's `CComponents`: ([R] image index, [R] head index, [R, gh*gw] int64 0/1 region masks)."""
    gh, gw = grid_size
    maps = mask.cpu().numpy()
    b_idx, h_idx, regions = [], [], []
    for b in range(maps.shape[0]):
        for h in range(maps.shape[1]):
            n, labels = _label_one(maps[b, h].reshape(gh, gw))
            for k in range(1, n):
                b_idx.append(b)
                h_idx.append(h)
                regions.append(torch.tensor((labels == k) * 1.0).reshape(-1).long())
    device = mask.device
    stacked = torch.stack(regions) if regions else torch.zeros(0, gh * gw, dtype=torch.long)
    b_idx, h_idx = (torch.tensor(i, dtype=torch.long, device=device) for i in (b_idx, h_idx))  # long even if empty
    return b_idx, h_idx, stacked.to(device)


def _label_one(mask: np.ndarray) -> tuple[int, np.ndarray]:
    """One [gh, gw] 0/1 map -> (regions + 1, labels), as the release's `opencv_cc`."""
    if cv2 is None:
        labels, n = scipy.ndimage.label(mask > 0, structure=EIGHT)
        return n + 1, labels
    image = ((mask[:, :, None] > 0) * 1).astype("uint8")
    return cv2.connectedComponents(image, connectivity=8, ltype=cv2.CV_16U)


def make_scores(shape, smooth: bool, device: str, seed: int = 0) -> torch.Tensor:
    """Random normal float32 scores [B, heads, gh*gw]; `smooth` blurs each map into blobs."""
    b, h, gh, gw = shape
    generator = torch.Generator().manual_seed(seed)
    s = torch.randn(b * h, 1, gh, gw, generator=generator)
    if smooth:
        # A Gaussian of ~1/8 of the side gives a few blobs per map, like trained [CLS] maps.
        sigma = max(min(gh, gw) / 8, 0.75)
        radius = int(3 * sigma)
        t = torch.arange(-radius, radius + 1, dtype=torch.float32)
        kernel = torch.exp(-(t**2) / (2 * sigma**2))
        kernel = kernel / kernel.sum()
        s = F.pad(s, (radius, radius, 0, 0), mode="replicate") if gw > 1 else s
        s = F.conv2d(s, kernel.view(1, 1, 1, -1)) if gw > 1 else s
        s = F.pad(s, (0, 0, radius, radius), mode="replicate") if gh > 1 else s
        s = F.conv2d(s, kernel.view(1, 1, -1, 1)) if gh > 1 else s
    return s.reshape(b, h, gh * gw).to(device)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# Wall-clock time by default; `--cpu-time` switches to the CPU time of this thread, which other
# processes on a shared machine do not inflate (with one torch thread all the work runs on it).
CLOCK = time.perf_counter


def _time_loss(fn, scores: torch.Tensor, device: str) -> tuple[float, float]:
    """Seconds for forward + backward of `fn(scores)`, and the loss value."""
    leaf = scores.detach().clone().requires_grad_()
    _sync(device)
    start = CLOCK()
    loss = fn(leaf)
    loss.backward()
    _sync(device)
    return CLOCK() - start, loss.item()


def _time_labels(mask: torch.Tensor, algorithm: str, device: str) -> float:
    _sync(device)
    start = CLOCK()
    sar_hf.connected_components(mask, 8, algorithm=algorithm)
    _sync(device)
    return CLOCK() - start


def _time_reference_labels(mask: torch.Tensor) -> float:
    """Seconds of the reference's labelling alone: its per-map loop over `_label_one`, on host 0/1 maps."""
    maps = mask.cpu().numpy().astype(np.int64)
    start = CLOCK()
    for one in maps:
        _label_one(one)
    return CLOCK() - start


def cpu_idle_fraction(seconds: float = 1.0) -> float:
    """Share of the machine's CPU time left idle over `seconds` (Linux; 1.0 elsewhere)."""
    try:
        before = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        time.sleep(seconds)
        after = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 1.0
    delta = [a - b for a, b in zip(after, before, strict=True)]
    return (delta[3] + delta[4]) / max(sum(delta), 1)  # idle + iowait


def wait_for_quiet(max_wait_s: float, threshold: float = 0.9) -> float:
    """Wait (at most `max_wait_s`) until other processes leave the CPUs idle; return the idle share."""
    deadline = time.monotonic() + max_wait_s
    idle = cpu_idle_fraction()
    while idle < threshold and time.monotonic() < deadline:
        idle = cpu_idle_fraction()
    return idle


def algorithms_on(device: str) -> list[str]:
    """The labelling algorithms that `spatial_entropy` runs on `device`."""
    has_triton = device == "cuda" and importlib.util.find_spec("triton") is not None
    return ["scipy", "propagation", *(["triton"] if has_triton else [])]


def bench_shape(shape, smooth: bool, device: str, repeats: int, max_wait_s: float = 0.0) -> dict:
    grid = shape[2:]
    idle = wait_for_quiet(max_wait_s) if max_wait_s > 0 else None
    scores = make_scores(shape, smooth, device)
    mask = (scores > scores.mean(dim=-1, keepdim=True)).reshape(-1, *grid)
    algorithms = algorithms_on(device)
    losses = {
        "reference": lambda s: reference_spatial_entropy(s, grid),
        **{f"sar_hf_{a}": lambda s, a=a: sar_hf.spatial_entropy(s, grid, algorithm=a) for a in algorithms},
    }
    labellers = {f"labels_{a}": lambda a=a: _time_labels(mask, a, device) for a in algorithms}
    labellers["labels_reference"] = lambda: _time_reference_labels(mask)
    times = {key: [] for key in [*losses, *labellers]}
    values = {}
    for _ in range(repeats + 1):  # the first round warms up and is dropped (below)
        for key, fn in losses.items():
            t, values[key] = _time_loss(fn, scores, device)
            times[key].append(t)
        for key, fn in labellers.items():
            times[key].append(fn())
    labels = sar_hf.connected_components(mask.cpu(), 8, algorithm="scipy")
    regions = labels.amax(dim=(-2, -1)).double()
    median = {key: statistics.median(runs[1:]) for key, runs in times.items()}
    # "sar_hf" is the default, `algorithm="auto"`: the row of the algorithm it picks, timed once.
    auto = f"sar_hf_{sar_hf.components.resolve_algorithm('auto', scores.device, grid[0] * grid[1])}"
    median["sar_hf"], values["sar_hf"] = median[auto], values[auto]
    loss_ref = values["reference"]
    row = {
        "shape": list(shape),
        "scores": "smooth" if smooth else "noise",
        "mean_regions_per_map": regions.mean().item(),
        "loss_reference": loss_ref,
        "loss_sar_hf": values["sar_hf"],
        "loss_rel_diff": _rel_diff(values["sar_hf"], loss_ref),
        **{f"{key}_ms": 1e3 * value for key, value in median.items()},
        "speedup": median["reference"] / median["sar_hf"],
        # The most any exact implementation could gain if all but its labelling were free, with the
        # faster of the two labellers at hand (one scipy call, or the reference's own OpenCV loop).
        "labelling_ceiling": median["reference"] / min(median["labels_scipy"], median["labels_reference"]),
        "runs": repeats,
        "cpu_idle_before": idle,
        "algorithms": {},
    }
    for a in algorithms:
        fn = losses[f"sar_hf_{a}"]
        row["algorithms"][a] = {
            "ms": 1e3 * median[f"sar_hf_{a}"],
            "loss_rel_diff": _rel_diff(values[f"sar_hf_{a}"], loss_ref),
            "labels_equal_scipy": torch.equal(sar_hf.connected_components(mask, 8, algorithm=a).cpu(), labels),
            "kernel_launches": count_kernel_launches(fn, scores) if device == "cuda" else None,
            "back_to_back_ms": 1e3 * time_back_to_back(fn, scores) if device == "cuda" else None,
            **(host_syncs(fn, scores) if device == "cuda" else {"host_syncs": None, "host_sync_sites": []}),
        }
    return row


def _rel_diff(value: float, reference: float) -> float:
    return abs(value - reference) / max(abs(reference), 1e-12)


def _forward_backward(fn, scores: torch.Tensor):
    """A callable running one forward + backward of `fn` on a fresh leaf, its gradient seed made beforehand
    (so that the seed's own fill kernel is not counted)."""
    leaf = scores.detach().clone().requires_grad_()
    seed = torch.ones((), device=scores.device)
    return lambda: torch.autograd.grad(fn(leaf), leaf, seed)


def count_kernel_launches(fn, scores: torch.Tensor) -> int:
    """GPU kernels (and memsets/copies) run by one forward + backward of `fn`, from `torch.profiler`.

    The profiler is first calibrated on one `x + 1` (one kernel), since it is known to drop GPU
    events in some set-ups; a calibration that does not count 1 is an error, not a figure.
    """
    x = scores.detach()
    calibration = _gpu_events(lambda: x + 1)
    if calibration != 1:
        raise RuntimeError(f"torch.profiler counted {calibration} GPU events for one `x + 1`; launch counts unusable")
    return _gpu_events(_forward_backward(fn, scores))


def _gpu_events(step) -> int:
    step()  # anything lazy (Triton's compilation, cuBLAS handles) happens outside the count
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profile:
        step()
        torch.cuda.synchronize()
    return sum(event.device_type == torch.autograd.DeviceType.CUDA for event in profile.events())


def time_back_to_back(fn, scores: torch.Tensor, calls: int = 50) -> float:
    """Seconds per forward + backward of `fn` over `calls` calls issued back to back, one synchronisation
    at the end: the rate a training loop sees, where the host runs ahead of the GPU (the per-call rows
    also count one host-device round trip)."""
    step = _forward_backward(fn, scores)
    step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls


def host_syncs(fn, scores: torch.Tensor) -> dict:
    """Synchronisations of one CUDA forward + backward of `fn`, as `torch.cuda.set_sync_debug_mode` reports
    them, each with the four innermost Python lines that caused it. The backward runs on this thread
    (autograd's device threads would replay their warnings at its end, from autograd's own frames)."""
    step = _forward_backward(fn, scores)
    sites = []

    def where(message, *args, **kwargs):
        if "synchroniz" in str(message):
            frames = [f for f in traceback.extract_stack() if not f.filename.endswith(("warnings.py", __file__))]
            sites.append(" <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.line}" for f in frames[-4:][::-1]))

    with warnings.catch_warnings(), torch.autograd.set_multithreading_enabled(False):
        warnings.simplefilter("always")
        warnings.showwarning = where
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return {"host_syncs": len(sites), "host_sync_sites": sites}


def bench_compiled(shape, device: str, repeats: int) -> list[dict]:
    """Eager, `torch.compile(fullgraph=True)` and (CUDA) CUDA-graph timings at one shape, noise and smooth.

    A variant that fails to compile or run is reported with its error instead of a time.
    """
    grid = shape[2:]
    modes = {"eager": None, "compile": "default"}
    if device == "cuda":
        modes["compile + CUDA graphs"] = "reduce-overhead"
    rows = []
    for smooth in (False, True):
        scores = make_scores(shape, smooth, device)
        expected = sar_hf.spatial_entropy(scores, grid).item()
        for name, mode in modes.items():
            fn = lambda s: sar_hf.spatial_entropy(s, grid)  # noqa: E731
            row = {"shape": list(shape), "scores": "smooth" if smooth else "noise", "variant": name}
            try:
                if mode is not None:
                    torch._dynamo.reset()
                    fn = torch.compile(fn, fullgraph=True, mode=mode)
                first, loss = _time_loss(fn, scores, device)  # compiles
                runs = [_time_loss(fn, scores, device)[0] for _ in range(repeats + 2)][2:]  # graphs recorded
                row.update(
                    first_call_s=first, ms=1e3 * statistics.median(runs), loss_rel_diff=_rel_diff(loss, expected)
                )
            except Exception as error:  # reported, not fatal: this section documents what works
                row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
            rows.append(row)
    return rows


def machine_info(device: str) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": os.getloadavg()[0],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "scipy": scipy.__version__,
        "numpy": np.__version__,
        "reference_labeller": REFERENCE_LABELLER,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def _row(r: dict) -> str:
    b, h, gh, gw = r["shape"]
    return (
        f"| {b}×{h}, {gh}×{gw} | {r['scores']} | {r['mean_regions_per_map']:.1f} | {r['reference_ms']:.1f} "
        f"| {r['sar_hf_ms']:.2f} | **{r['speedup']:.1f}×** | {r['labels_scipy_ms']:.2f} "
        f"| {r['labels_propagation_ms']:.2f} | {r['labels_reference_ms']:.2f} | {r['labelling_ceiling']:.1f}× "
        f"| {r['loss_rel_diff']:.0e} "
        f"| {'–' if r['cpu_idle_before'] is None else format(r['cpu_idle_before'], '.0%')} |"
    )


def _algorithm_row(r: dict) -> str:
    b, h, gh, gw = r["shape"]
    cells = []
    for a in ALL_ALGORITHMS:
        one = r["algorithms"].get(a)
        if one is None:
            cells.append("– | – | – | – | –")
            continue
        launches = "–" if one["kernel_launches"] is None else one["kernel_launches"]
        syncs = "–" if one["host_syncs"] is None else one["host_syncs"]
        same = "yes" if one["labels_equal_scipy"] else "**no**"
        back_to_back = "–" if one.get("back_to_back_ms") is None else f"{one['back_to_back_ms']:.3f}"
        cells.append(f"{one['ms']:.3f} | {back_to_back} | {launches} | {syncs} | {same}")
    return f"| {b}×{h}, {gh}×{gw} | {r['scores']} | " + " | ".join(cells) + " |"


ALL_ALGORITHMS = ("scipy", "propagation", "triton")


def _compiled_row(r: dict) -> str:
    b, h, gh, gw = r["shape"]
    if "error" in r:
        return f"| {b}×{h}, {gh}×{gw} | {r['scores']} | {r['variant']} | fails: {r['error']} | | |"
    return (
        f"| {b}×{h}, {gh}×{gw} | {r['scores']} | {r['variant']} | {r['ms']:.3f} | {r['first_call_s']:.1f} "
        f"| {r['loss_rel_diff']:.0e} |"
    )


def to_markdown(results: dict) -> str:
    info = results["machine"]
    header = (
        "| B×heads, grid | scores | regions/map | reference (ms) | sar_hf (ms) | speedup "
        "| labels scipy (ms) | labels propagation (ms) | labels reference (ms) | labelling ceiling "
        "| loss rel. diff | CPU idle before |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    per_algorithm = (
        "| B×heads, grid | scores | "
        + " | ".join(
            f"{a} (ms) | {a} back to back (ms) | {a} launches | {a} host syncs | {a} labels = scipy"
            for a in ALL_ALGORITHMS
        )
        + " |\n|---|---|"
        + "---:|---:|---:|---:|---|" * len(ALL_ALGORITHMS)
    )
    lines = [
        f"# `spatial_entropy` forward + backward, {results['device']}",
        "",
        f"Machine: {info['cpu']}, {info['cpu_cores']} cores ({info['torch_threads']} torch thread"
        + ("s)" if info["torch_threads"] != 1 else ")")
        + (f", {info['gpu']} (CUDA {info['cuda']})" if "gpu" in info else "")
        + f". Python {info['python']}, torch {info['torch']}, scipy {info['scipy']}, numpy {info['numpy']}."
        + f" {info['date']}. One-minute load average {info['load_average_at_start']:.2f} at the start,"
        + f" {info['load_average_at_end']:.2f} at the end (other work on the machine slows the multi-threaded"
        + " torch ops of sar_hf far more than the reference's small single-threaded ones).",
        "",
        f"Median of {results['repeats']} runs after one warm-up ({results['clock']}), the two "
        "implementations alternated in one process. *reference*: the structure of the authors' release "
        "(`BlobLoss`): the mean, mask and relu batched; each map labelled on the CPU by "
        f"{info['reference_labeller']} in a Python loop; one dense 0/1 mask per region; one gathered "
        "batched sum. *sar_hf*: `sar_hf.spatial_entropy` (the `auto` labelling: one `scipy.ndimage.label` "
        "call for all maps of a CPU tensor; on CUDA the fused Triton kernels when Triton is installed, "
        "propagation otherwise). Float32 scores, 8-connectivity. "
        "*noise*: standard normal scores (many small regions); *smooth*: the same scores blurred with a "
        "Gaussian of σ = side/8 (a few blobs per map, like trained attention). The *labels* columns time "
        "`sar_hf.connected_components` alone, for information, and *labels reference* the reference's own "
        "labelling loop alone. *labelling ceiling* = reference / the faster of those two labellings: the "
        "speedup an exact implementation would reach if everything but its labelling cost nothing. "
        "The per-algorithm table times `spatial_entropy(..., algorithm=a)` forward + backward in the same "
        "rounds; on CUDA, *back to back* is the time per call over 50 calls issued without waiting (what a "
        "training loop sees), and it counts the GPU kernels (and memsets/copies) of one forward + backward "
        "(`torch.profiler`, checked on one `x + 1` first) and its host synchronisations; *labels = scipy* "
        "checks that the algorithm gives scipy's labels exactly.",
        "",
        "## Listed shapes",
        "",
        header,
        *[_row(r) for r in results["shapes"]],
        "",
        "### Per algorithm",
        "",
        per_algorithm,
        *[_algorithm_row(r) for r in results["shapes"]],
    ]
    sites = sorted(
        {(a, site) for r in results["shapes"] for a, one in r["algorithms"].items() for site in one["host_sync_sites"]}
    )
    if sites:
        lines += ["", "Host synchronisations, where they happened:", "", *[f"- {a}: `{site}`" for a, site in sites]]
    if results["sweep"]:
        b, h = SWEEP_BATCH
        lines += ["", f"## Grid side sweep at B×heads = {b}×{h}", "", header, *[_row(r) for r in results["sweep"]]]
    if results.get("compiled"):
        lines += [
            "",
            "## torch.compile and CUDA graphs",
            "",
            "`torch.compile(spatial_entropy, fullgraph=True)`, default mode and (CUDA) `reduce-overhead`, whose "
            "CUDA graphs replay the whole forward and backward. Median forward + backward after the first call "
            "(which compiles) and, for CUDA graphs, after the two calls that record them.",
            "",
            "| B×heads, grid | scores | variant | forward + backward (ms) | first call (s) "
            "| loss rel. diff to eager |",
            "|---|---|---|---:|---:|---:|",
            *[_compiled_row(r) for r in results["compiled"]],
        ]
    lines += ["", "## Summary", ""]
    for title, rows in (("listed shapes", results["shapes"]), ("sweep", results["sweep"])):
        for scores in ("noise", "smooth"):
            picked = [r for r in rows if r["scores"] == scores]
            if picked:
                worst = min(picked, key=lambda r: r["speedup"])
                b, h, gh, gw = worst["shape"]
                lowest = min(picked, key=lambda r: r["labelling_ceiling"])
                lines.append(
                    f"- {title}, {scores} scores: smallest speedup {worst['speedup']:.1f}× ({b}×{h}, {gh}×{gw}); "
                    f"lowest labelling ceiling {lowest['labelling_ceiling']:.1f}× "
                    f"({lowest['shape'][0]}×{lowest['shape'][1]}, {lowest['shape'][2]}×{lowest['shape'][3]})."
                )
    lines.append("")
    return "\n".join(lines)


def _shape(text: str) -> tuple[int, int, int, int]:
    try:
        b, h, gh, gw = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a shape is BxHEADSxGHxGW, e.g. 64x6x14x14; got {text!r}") from None
    return b, h, gh, gw


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per row (median reported)")
    parser.add_argument(
        "--shapes", type=_shape, nargs="+", default=None, help="B x heads x gh x gw (default: the listed shapes)"
    )
    parser.add_argument("--no-smooth", action="store_true", help="only the random-normal scores")
    parser.add_argument("--no-sweep", action="store_true", help="skip the grid-side sweep")
    default_compile = "x".join(map(str, COMPILE_SHAPE))
    parser.add_argument(
        "--compile",
        type=_shape,
        nargs="?",
        const=COMPILE_SHAPE,
        default=None,
        metavar="SHAPE",
        help=f"also time torch.compile (CUDA graphs too on CUDA) at SHAPE (default {default_compile})",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="time with this thread's CPU time (CPU only; sets one torch thread): robust to other jobs",
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        help="before each row, wait up to this many seconds for other processes to leave the CPUs idle",
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="results folder")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")

    if args.cpu_time:
        if args.device != "cpu":
            parser.error("--cpu-time: CPU only")
        global CLOCK
        CLOCK = time.thread_time
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = [False] if args.no_smooth else [False, True]
    results = {
        "device": args.device,
        "repeats": args.repeats,
        "clock": "thread CPU time" if args.cpu_time else "wall clock",
        "machine": machine_info(args.device),
    }
    sweep = [] if args.no_sweep else [(*SWEEP_BATCH, side, side) for side in SWEEP_SIDES]
    for key, shapes in (("shapes", args.shapes or SHAPES), ("sweep", sweep)):
        results[key] = [
            bench_shape(shape, smooth, args.device, args.repeats, args.wait_quiet)
            for shape in shapes
            for smooth in variants
        ]
    results["compiled"] = bench_compiled(args.compile, args.device, args.repeats) if args.compile else []
    results["machine"]["load_average_at_end"] = os.getloadavg()[0]

    markdown = to_markdown(results)
    print(markdown)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"bench_loss_{args.device}.md").write_text(markdown)
    (args.out / f"bench_loss_{args.device}.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
