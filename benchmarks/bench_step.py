# /// script
# requires-python = ">=3.10"
# dependencies = ["sar_hf", "torch", "transformers", "accelerate"]
# ///
"""The cost of SAR in one training step: the plain model vs SAR under SDPA vs SAR under eager attention.

One step is forward, backward and an AdamW step, on identical weights and data for:

* ``plain``: the model with SDPA attention and its own cross-entropy (the baseline);
* ``sar``: the same with the SAR term at `sar_weight` 0.01 (`SARViTForImageClassification` for
  ViT, `SpatialEntropyLoss(model)` for the others): SDPA kept in every layer, the [CLS] scores
  captured where the kernel consumes q and k;
* ``sar-eager``: SAR with eager attention, where the capture reads the [CLS] row of the N×N
  attention probabilities (the path eager-only models take).

Models (`--models`): ``vit_s16`` (ViT-S/16), ``deit_s16`` (DeiT-S/16, the paper's backbone, with
its distillation token) and ``dinov2_s14_reg4`` (DINOv2-S/14 with 4 registers), all at 224 px,
batch 16, 1000 classes; and ``small`` (the small default model of the training script; its shape
and batch are options).

    python benchmarks/bench_step.py --device cpu --repeats 12
    python benchmarks/bench_step.py --models vit_s16 deit_s16 --device cuda --bf16 --repeats 50
    python benchmarks/bench_step.py --models small --repeats 2 --output /tmp/check  # a quick check

Time: all variants live in one process; after `--warmup` untimed rounds, every round times one
step of each variant, round-robin with the starting variant rotated each round, so that drift
and noise (other jobs, clocks) hit all variants alike. The ratio is the median over rounds of
`variant / plain` within the same round (paired); the table also gives median times.

Peak memory: every variant runs again in a fresh subprocess (no allocator state shared
between variants), with `--warmup` steps first so that AdamW's state exists, then one measured
step. On CUDA, "peak" is `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`. On
the CPU there are no allocator statistics and `tracemalloc` does not see torch's allocations, so
the step's rise is measured as the kernel's peak RSS (`VmHWM`, reset through
`/proc/self/clear_refs` just before the step: exact, no sampling; a 1 ms `VmRSS` sampling thread
is the fallback where `clear_refs` is not writable) minus the RSS just before the step. glibc's
mmap threshold is fixed for the worker (`MALLOC_MMAP_THRESHOLD_`) so that freed tensors go back
to the kernel instead of being reused silently from the heap, which would hide part of the rise.
"peak" is then the tensors that live across steps (parameters, AdamW state, the batch: counted
exactly, identical for all variants) plus that rise; unlike "RSS minus the bare process" it does
not count library code and data that one variant happens to touch (scipy, oneDNN kernels).
"step rise" alone (activations, gradients) is the stricter comparison.

Results go to `benchmarks/results/bench_step_<device>.{md,json}` with the machine, versions and date.
"""

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import (
    DeiTConfig,
    DeiTForImageClassification,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersForImageClassification,
    ViTConfig,
    ViTForImageClassification,
)

import sar_hf
from sar_hf import SARViTConfig, SARViTForImageClassification, SpatialEntropyLoss

VARIANTS = ("plain", "sar", "sar-eager")
S16 = {
    "image_size": 224,
    "patch_size": 16,
    "hidden_size": 384,
    "num_hidden_layers": 12,
    "num_attention_heads": 6,
    "intermediate_size": 1536,
    "layer_norm_eps": 1e-6,
    "num_labels": 1000,
}
DINOV2_S14_REG4 = {
    "image_size": 224,
    "patch_size": 14,
    "hidden_size": 384,
    "num_hidden_layers": 12,
    "num_attention_heads": 6,
    "mlp_ratio": 4,
    "num_register_tokens": 4,
    "num_labels": 1000,
}
# family -> (config class, plain classifier class); ViT's SAR variant is SARViTForImageClassification.
FAMILIES = {
    "vit": (ViTConfig, ViTForImageClassification),
    "deit": (DeiTConfig, DeiTForImageClassification),
    "dinov2_registers": (Dinov2WithRegistersConfig, Dinov2WithRegistersForImageClassification),
}
MODELS = ("vit_s16", "deit_s16", "dinov2_s14_reg4", "small")
# What issue 8 asks of the SDPA path (time ratio per model; peak memory ratio for all).
TIME_TARGETS = {"vit_s16": 1.03, "deit_s16": 1.03, "dinov2_s14_reg4": 1.03, "small": 1.10}
MEMORY_TARGET = 1.02
RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=20, help="timed rounds (one step of every variant each)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first (also before memory)")
    parser.add_argument("--sar-weight", type=float, default=0.01)
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=16, help="batch of the 224 px models")
    small = parser.add_argument_group("the small model")
    small.add_argument("--small-image", type=int, default=32)
    small.add_argument("--small-patch", type=int, default=4)
    small.add_argument("--small-hidden", type=int, default=192)
    small.add_argument("--small-layers", type=int, default=4)
    small.add_argument("--small-heads", type=int, default=4)
    small.add_argument("--small-intermediate", type=int, default=384)
    small.add_argument("--small-labels", type=int, default=10)
    small.add_argument("--small-batch", type=int, default=64)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument(
        "--time-target", type=float, default=None, help="the SDPA path's time ratio to meet (default: issue 8's)"
    )
    parser.add_argument(
        "--memory-target", type=float, default=MEMORY_TARGET, help="the SDPA path's peak-memory ratio to meet"
    )
    parser.add_argument(
        "--output", type=Path, default=None, help="path stem of the .md/.json (default results/bench_step_<device>)"
    )
    parser.add_argument("--memory-worker", nargs=2, metavar=("VARIANT", "SPEC_JSON"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    return args


def model_specs(args) -> dict[str, dict]:
    small = {
        "image_size": args.small_image,
        "patch_size": args.small_patch,
        "hidden_size": args.small_hidden,
        "num_hidden_layers": args.small_layers,
        "num_attention_heads": args.small_heads,
        "intermediate_size": args.small_intermediate,
        "num_labels": args.small_labels,
    }
    specs = {
        "vit_s16": {"family": "vit", "config": S16, "batch": args.batch},
        "deit_s16": {"family": "deit", "config": S16, "batch": args.batch},
        "dinov2_s14_reg4": {"family": "dinov2_registers", "config": DINOV2_S14_REG4, "batch": args.batch},
        "small": {"family": "vit", "config": small, "batch": args.small_batch},
    }
    return {name: specs[name] for name in args.models}


# -- one training step ---------------------------------------------------------------------------


def build_model(family: str, config: dict, variant: str, sar_weight: float):
    """The model of one variant; the SAR variants add λ·SE to the loss the model computes from labels."""
    attention = "eager" if variant == "sar-eager" else "sdpa"
    if family == "vit" and variant != "plain":
        return SARViTForImageClassification(
            SARViTConfig(**config, sar_weight=sar_weight, attn_implementation=attention)
        )
    config_class, model_class = FAMILIES[family]
    model = model_class(config_class(**config, attn_implementation=attention))
    if variant != "plain":
        SpatialEntropyLoss(model, sar_weight=sar_weight)
    return model


class Step:
    """One variant: its model, optimizer and data, and `__call__` = one training step (returns the loss)."""

    def __init__(self, variant: str, spec: dict, state: dict, args):
        self.device = torch.device(args.device)
        model = build_model(spec["family"], spec["config"], variant, args.sar_weight)
        model.load_state_dict(state)
        self.model = model.to(self.device).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        generator = torch.Generator().manual_seed(args.seed + 1)
        size, batch = spec["config"]["image_size"], spec["batch"]
        self.pixel_values = torch.randn(batch, 3, size, size, generator=generator).to(self.device)
        self.labels = torch.randint(0, spec["config"]["num_labels"], (batch,), generator=generator).to(self.device)
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if args.bf16 else nullcontext()

    def __call__(self) -> torch.Tensor:
        with self.autocast:
            loss = self.model(pixel_values=self.pixel_values, labels=self.labels).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def reference_state(spec: dict, seed: int) -> dict:
    torch.manual_seed(seed)
    return build_model(spec["family"], spec["config"], "plain", 0.0).state_dict()


def time_variants(spec: dict, args) -> tuple[dict[str, list[float]], dict[str, float]]:
    """(step times in s per variant, the first step's loss per variant: same weights and data)."""
    state = reference_state(spec, args.seed)
    steps = {variant: Step(variant, spec, state, args) for variant in VARIANTS}
    del state
    first_loss = {variant: step().item() for variant, step in steps.items()}
    for _ in range(args.warmup):
        for step in steps.values():
            step()
            step.sync()
    times = {variant: [] for variant in VARIANTS}
    for round_ in range(args.repeats):
        shift = round_ % len(VARIANTS)
        for variant in VARIANTS[shift:] + VARIANTS[:shift]:
            step = steps[variant]
            gc.collect()
            step.sync()
            start = time.perf_counter()
            step()
            step.sync()
            times[variant].append(time.perf_counter() - start)
    return times, first_loss


# -- peak memory (in a fresh subprocess per variant) ---------------------------------------------


def _rss_bytes(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


class _PeakRSS:
    """Peak RSS over a `with` block: the kernel's VmHWM reset by clear_refs, else 1 ms sampling."""

    def __enter__(self):
        try:
            with open("/proc/self/clear_refs", "w") as clear:
                clear.write("5")  # reset VmHWM to the current RSS
            self.method, self._thread = "VmHWM", None
        except OSError:
            self.method, self._stop, self.sampled = "sampled", threading.Event(), _rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.001):
            self.sampled = max(self.sampled, _rss_bytes())

    def __exit__(self, *exc):
        if self._thread is None:
            self.peak = _rss_bytes("VmHWM")
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.sampled, _rss_bytes())


def memory_worker(variant: str, spec_json: str, args) -> None:
    """Runs in a subprocess: prints one JSON line with this variant's memory figures in bytes."""
    spec = json.loads(spec_json)
    device = torch.device(args.device)
    step = Step(variant, spec, load_file(spec["weights"]), args)
    for _ in range(max(args.warmup, 1)):  # AdamW allocates its state in the first step
        step()
    step.sync()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        step.sync()
        peak = torch.cuda.max_memory_allocated(device)
        result = {"peak": peak, "step": peak - before, "method": "max_memory_allocated"}
    else:
        tensors = [*step.model.parameters(), step.pixel_values, step.labels]
        tensors += [t for state in step.optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
        state_bytes = sum(t.numel() * t.element_size() for t in tensors)
        before = _rss_bytes()
        with _PeakRSS() as meter:
            step()
        rise = meter.peak - before
        result = {"peak": state_bytes + rise, "step": rise, "method": meter.method, "state": state_bytes}
        result.update(rss_before=before, rss_peak=meter.peak)
    print(json.dumps(result))


def memory_worker_command(variant: str, spec_json: str, args) -> list[str]:
    """The command line of the subprocess that measures `variant`: this script with the settings that
    the step depends on (device, warm-up, seed, λ, bf16, threads; the shape is in `spec_json`)."""
    forwarded = ["--device", args.device, "--warmup", str(args.warmup), "--seed", str(args.seed)]
    forwarded += ["--sar-weight", str(args.sar_weight)] + (["--bf16"] if args.bf16 else [])
    if args.threads:
        forwarded += ["--threads", str(args.threads)]
    return [sys.executable, __file__, *forwarded, "--memory-worker", variant, spec_json]


def measure_memory(spec: dict, args) -> dict[str, dict]:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "weights.safetensors")
        save_file(reference_state(spec, args.seed), weights)
        spec = json.dumps({**spec, "weights": weights})
        # A fixed threshold (no glibc dynamic raise) keeps large blocks mmapped: freed means unmapped.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
        for variant in VARIANTS:
            command = memory_worker_command(variant, spec, args)
            done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
            if done.returncode != 0:
                raise RuntimeError(f"memory worker for {variant} failed:\n{done.stderr[-4000:]}")
            results[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    return results


# -- report --------------------------------------------------------------------------------------


def summarise(times: dict[str, list[float]], first_loss: dict[str, float], memory: dict[str, dict] | None):
    summary = {}
    for variant, values in times.items():
        paired = [v / p for v, p in zip(values, times["plain"], strict=True)]
        row = {
            "first_step_loss": first_loss[variant],
            "times_ms": [1e3 * v for v in values],
            "median_ms": 1e3 * statistics.median(values),
            "min_ms": 1e3 * min(values),
            "time_ratio": statistics.median(paired),
            "time_ratio_of_medians": statistics.median(values) / statistics.median(times["plain"]),
        }
        if memory is not None:
            row["memory"] = memory[variant]
            row["peak_MiB"] = memory[variant]["peak"] / 2**20
            row["step_MiB"] = memory[variant]["step"] / 2**20
            row["peak_ratio"] = memory[variant]["peak"] / memory["plain"]["peak"]
            row["step_ratio"] = memory[variant]["step"] / memory["plain"]["step"]
        summary[variant] = row
    return summary


def table(summary: dict[str, dict]) -> str:
    memory = "peak_MiB" in summary["plain"]
    head = "| variant | median step (ms) | min (ms) | time ratio |"
    rule = "|---|---:|---:|---:|"
    if memory:
        head += " peak (MiB) | peak ratio | step rise (MiB) | step-rise ratio |"
        rule += "---:|---:|---:|---:|"
    lines = [head, rule]
    for variant, row in summary.items():
        line = f"| {variant} | {row['median_ms']:.1f} | {row['min_ms']:.1f} | {row['time_ratio']:.3f} |"
        if memory:
            line += (
                f" {row['peak_MiB']:.1f} | {row['peak_ratio']:.3f} | {row['step_MiB']:.1f} | {row['step_ratio']:.3f} |"
            )
        lines.append(line)
    return "\n".join(lines)


def verdict(name: str, summary: dict[str, dict], time_target: float | None, memory_target: float) -> str:
    fast = summary["sar"]
    target = TIME_TARGETS.get(name) if time_target is None else time_target
    parts = []
    if target is not None:
        ok = "meets" if fast["time_ratio"] <= target else "misses"
        parts.append(f"SDPA-path time ratio {fast['time_ratio']:.3f} {ok} the target <= {target}")
    if "peak_ratio" in fast:
        ok = "meets" if fast["peak_ratio"] <= memory_target else "misses"
        parts.append(f"peak-memory ratio {fast['peak_ratio']:.3f} {ok} the target <= {memory_target}")
    return "; ".join(parts) + "."


def environment(args) -> dict:
    import accelerate
    import transformers

    machine = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if torch.device(args.device).type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": machine,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "accelerate": accelerate.__version__,
            "sar_hf": getattr(sar_hf, "__version__", None) or _package_version("sar_hf"),
        },
    }


def _package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_worker:
        memory_worker(*args.memory_worker, args)
        return {}

    report = {
        **environment(args),
        "settings": {k: v for k, v in vars(args).items() if k not in ("output", "memory_worker")},
    }
    report["results"] = {}
    markdown = [
        f"# One training step: plain model vs SAR ({args.device})",
        "",
        f"- date: {report['date']}",
        f"- command: `{report['command']}`",
        "- machine: " + ", ".join(f"{k} {v}" for k, v in report["machine"].items()),
        "- versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
        f"- {args.warmup} warm-up rounds, {args.repeats} timed rounds (round-robin, rotated); sar_weight "
        f"{args.sar_weight}; autocast {'bf16' if args.bf16 else 'none'}",
        "- time ratio: median over rounds of variant/plain in the same round; peak: see the script's docstring",
    ]
    for name, spec in model_specs(args).items():
        print(f"[{name}] timing {args.repeats} rounds ...", file=sys.stderr, flush=True)
        times, first_loss = time_variants(spec, args)
        memory = None
        if not args.no_memory:
            print(f"[{name}] peak memory, one subprocess per variant ...", file=sys.stderr, flush=True)
            memory = measure_memory(spec, args)
        summary = summarise(times, first_loss, memory)
        report["results"][name] = {**spec, "variants": summary}
        shape = spec["config"]
        title = (
            f"## {name}: {shape['image_size']} px, patch {shape['patch_size']}, hidden {shape['hidden_size']}, "
            f"{shape['num_hidden_layers']} layers, {shape['num_attention_heads']} heads, batch {spec['batch']}"
        )
        method = f" (memory: {memory['plain']['method']})" if memory else ""
        section = [
            title,
            "",
            table(summary),
            "",
            verdict(name, summary, args.time_target, args.memory_target) + method,
        ]
        print("\n".join(section) + "\n")
        markdown += ["", *section]

    stem = args.output or RESULTS / f"bench_step_{torch.device(args.device).type}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".md").write_text("\n".join(markdown) + "\n", encoding="utf-8")
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {stem.with_suffix('.md')} and .json", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
