# /// script
# requires-python = ">=3.10"
# dependencies = ["sar_hf[examples]", "torch", "transformers", "accelerate"]
# ///
"""The wall time of `run_sar.py --recipe deit` against the same run without it.

Both runs are the training script's digits default (the `small` preset, 30 epochs, evaluation
every epoch, the test split and the attention picture at the end), each in a fresh subprocess;
the recipe run adds only `--recipe deit` (RandAugment and random erasing in the data transform,
mixup/cutmix on the device, soft targets, label smoothing, DeiT's learning rate and warm-up).
Runs go in pairs, plain and recipe, the order alternating from pair to pair so that drift and
other jobs on the machine hit both alike. The ratio is the median over pairs of recipe/plain
within the pair, for the whole run (the wall time a user waits: start-up, data, training,
evaluation, saving), for Trainer's training loop alone (`train_runtime`), and for the CPU time
(user + system) that the run's process used: on a machine shared with other jobs, wall time
stretches with their load, and CPU time with the threads' spinning when cores are free. The
target is a ratio of at most 1.15.

Because both drift with other jobs, the script also times what the recipe adds, per batch of 64
digits, round-robin in one process (`--component_rounds`; the starting item rotated each round):
the data transform without and with RandAugment and random erasing, mixup/cutmix with the soft
targets on the device, and one training step of the `small` model (forward with the SAR term,
backward, AdamW). The estimated training-loop ratio is (recipe transform + mixing + step) /
(plain transform + step), from the medians.

    python benchmarks/bench_recipe.py --device cpu --pairs 2
    python benchmarks/bench_recipe.py --device cuda --pairs 3
    python benchmarks/bench_recipe.py --pairs 1 --output /tmp/check -- --model_preset tiny --num_train_epochs 1
    python benchmarks/bench_recipe.py --pairs 0 --component_rounds 50   # the component timings alone

Arguments after `--` go to both runs. Results go to `benchmarks/results/bench_recipe_<device>.{md,json}`
with the machine, its load average around each run, versions and date.
"""

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "run_sar.py"
TARGET = 1.15
VARIANTS = {"plain": [], "recipe": ["--recipe", "deit"]}
MEASURES = ("wall", "train", "cpu")  # the run's wall time, Trainer's training loop, the process's CPU time


def run_once(variant: str, device: str, extra: list[str], output_dir: Path) -> dict:
    """One training-script run in a subprocess: its wall time (s), Trainer's `train_runtime` and accuracies."""
    command = [sys.executable, str(SCRIPT), "--output_dir", str(output_dir), "--report_to", "none", "--disable_tqdm",
               "true", *(["--use_cpu"] if device == "cpu" else []), *VARIANTS[variant], *extra]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    load_before = os.getloadavg()[0]
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=output_dir.parent, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - children.ru_utime) + (after.ru_stime - children.ru_stime)
    if done.returncode != 0:
        raise RuntimeError(f"{variant} run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    results = json.loads((output_dir / "all_results.json").read_text())
    return {
        "variant": variant,
        "wall_seconds": wall,
        "cpu_seconds": cpu,
        "train_seconds": results["train_runtime"],
        "test_accuracy": results.get("test_accuracy"),
        "eval_accuracy": results.get("eval_accuracy"),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg()[0],
    }


def component_costs(device: str, rounds: int, batch_size: int = 64) -> dict:
    """Median milliseconds per batch of each piece the recipe adds, and of a training step, timed round-robin."""
    from sar_hf import SARViTConfig, SARViTForImageClassification
    from sar_hf.data import ImageTransform, load_digits_dataset
    from sar_hf.scripts.arguments import MODEL_PRESETS
    from sar_hf.scripts.deit_recipe import RECIPES, MixupCutmix, TrainImageTransform

    recipe = RECIPES["deit"]
    images = load_digits_dataset()["train"]["image"][:batch_size]
    per_image = ImageTransform((32, 32), [0.5] * 3, [0.5] * 3, augment=True)  # the digits default's crops
    plain = TrainImageTransform(per_image)
    augmented = TrainImageTransform(
        per_image,
        recipe["randaugment_ops"],
        recipe["randaugment_magnitude"],
        recipe["randaugment_magnitude_std"],
        recipe["random_erasing_prob"],
    )
    mix = MixupCutmix(10, recipe["mixup_alpha"], recipe["cutmix_alpha"], recipe["mixup_switch_prob"], 0.1)
    model = SARViTForImageClassification(SARViTConfig(**MODEL_PRESETS["small"], num_labels=10)).to(device)
    optimizer = torch.optim.AdamW(model.parameters())
    pixel_values = plain(images).to(device)
    labels = torch.randint(0, 10, (batch_size,), device=device)

    def step():
        model(pixel_values, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    pieces = {
        "plain transform": lambda: plain(images),
        "recipe transform": lambda: augmented(images),
        "mixup/cutmix": lambda: mix(pixel_values, labels),
        "training step": step,
    }
    times = {name: [] for name in pieces}
    for round_ in range(rounds + 1):  # the first round warms up
        names = list(pieces)[round_ % len(pieces) :] + list(pieces)[: round_ % len(pieces)]
        for name in names:
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            pieces[name]()
            if device == "cuda":
                torch.cuda.synchronize()
            if round_:
                times[name].append(1e3 * (time.perf_counter() - start))
    ms = {name: statistics.median(values) for name, values in times.items()}
    plain_batch = ms["plain transform"] + ms["training step"]
    recipe_batch = ms["recipe transform"] + ms["mixup/cutmix"] + ms["training step"]
    return {"batch_size": batch_size, "rounds": rounds, "median_ms": ms, "estimated_ratio": recipe_batch / plain_batch}


def machine() -> dict:
    from importlib.metadata import version

    info = {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "versions": {
            "python": platform.python_version(),
            **{name: version(name) for name in ("torch", "transformers", "accelerate", "kornia", "sar_hf")},
        },
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def summarise(runs: list[dict]) -> dict:
    """Median over pairs of recipe/plain (whole run, training loop, CPU time), and each variant's median times.

    `runs` holds the pairs one after the other, each pair in either order."""
    pairs = [runs[i : i + 2] for i in range(0, len(runs), 2)]
    by_variant = [{run["variant"]: run for run in pair} for pair in pairs]
    summary = {
        f"{measure}_ratio": statistics.median(
            p["recipe"][f"{measure}_seconds"] / p["plain"][f"{measure}_seconds"] for p in by_variant
        )
        for measure in MEASURES
    }
    for variant in VARIANTS:
        mine = [run for run in runs if run["variant"] == variant]
        summary[variant] = {
            **{f"median_{m}_seconds": statistics.median(run[f"{m}_seconds"] for run in mine) for m in MEASURES},
            "test_accuracy": [run["test_accuracy"] for run in mine],
        }
    return summary


def markdown(report: dict) -> str:
    info = report["machine"]
    lines = [
        f"# `run_sar.py --recipe deit` against the same run without it ({report['device']})",
        "",
        f"- date: {report['date']}",
        f"- command: `{report['command']}`",
        f"- machine: {info['platform']}, cpu_count {info['cpu_count']}, torch_threads {info['torch_threads']}"
        + (f", GPU {info['gpu']}" if "gpu" in info else ""),
        "- versions: " + ", ".join(f"{name} {version}" for name, version in info["versions"].items()),
    ]
    if report["runs"]:
        lines += runs_markdown(report)
    components = report["components"]
    if components:
        lines += [
            f"## What the recipe adds per batch of {components['batch_size']} (round-robin, "
            f"{components['rounds']} rounds, medians)",
            "",
            "| piece | ms per batch |",
            "|---|---:|",
            *(f"| {name} | {ms:.2f} |" for name, ms in components["median_ms"].items()),
            "",
            f"Estimated training-loop ratio {components['estimated_ratio']:.3f} "
            f"({'meets' if components['estimated_ratio'] <= TARGET else 'misses'} the target <= {TARGET}).",
            "",
        ]
    return "\n".join(lines)


def runs_markdown(report: dict) -> list[str]:
    summary = report["summary"]
    lines = [
        f"- {report['pairs']} pairs, order alternating; arguments to both runs: "
        f"`{' '.join(report['extra']) or '(none)'}`",
        "- ratio: median over pairs of recipe/plain within the pair",
        "",
        "| variant | median wall (s) | median training loop (s) | median CPU (s) | test accuracy |",
        "|---|---:|---:|---:|---|",
    ]
    for variant in VARIANTS:
        row = summary[variant]
        accuracies = ", ".join(f"{a:.3f}" for a in row["test_accuracy"] if a is not None)
        times = " | ".join(f"{row[f'median_{m}_seconds']:.1f}" for m in MEASURES)
        lines.append(f"| {variant} | {times} | {accuracies} |")
    lines += [
        "",
        "| run | variant | wall (s) | training loop (s) | CPU (s) | load average before / after |",
        "|---:|---|---:|---:|---:|---|",
    ]
    for i, run in enumerate(report["runs"]):
        times = " | ".join(f"{run[f'{m}_seconds']:.1f}" for m in MEASURES)
        load = f"{run['load_average_before']:.2f} / {run['load_average_after']:.2f}"
        lines.append(f"| {i} | {run['variant']} | {times} | {load} |")
    lines += [
        "",
        ", ".join(
            f"{name} ratio {summary[f'{m}_ratio']:.3f} ({'meets' if summary[f'{m}_ratio'] <= TARGET else 'misses'} "
            f"the target <= {TARGET})"
            for m, name in zip(MEASURES, ("whole-run time", "training-loop time", "CPU time"), strict=True)
        )
        + ".",
        "",
    ]
    return lines


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = " ".join(["bench_recipe.py", *argv])
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--pairs", type=int, default=2, help="Pairs of runs (plain and recipe).")
    parser.add_argument(
        "--component_rounds", type=int, default=50, help="Rounds of the per-batch component timings (0: none)."
    )
    parser.add_argument("--output", type=Path, help="Result stem (default: benchmarks/results/bench_recipe_<device>).")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no GPU is visible to torch.")
    stem = args.output or ROOT / "benchmarks" / "results" / f"bench_recipe_{args.device}"
    runs = []
    with tempfile.TemporaryDirectory() as workdir:
        for pair in range(args.pairs):
            order = list(VARIANTS) if pair % 2 == 0 else list(VARIANTS)[::-1]
            for variant in order:
                runs.append(run_once(variant, args.device, extra, Path(workdir) / f"{pair}-{variant}"))
                print(json.dumps(runs[-1]), flush=True)
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "device": args.device,
        "pairs": args.pairs,
        "extra": extra,
        "machine": machine(),
        "runs": runs,
        "summary": summarise(runs) if runs else None,
        "components": component_costs(args.device, args.component_rounds) if args.component_rounds else None,
    }
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
