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
stretches with their load while CPU time stays close to the work done. The target is a ratio of
at most 1.15.

    python benchmarks/bench_recipe.py --device cpu --pairs 2
    python benchmarks/bench_recipe.py --device cuda --pairs 3
    python benchmarks/bench_recipe.py --pairs 1 --output /tmp/check -- --model_preset tiny --num_train_epochs 1

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
    summary, info = report["summary"], report["machine"]
    lines = [
        f"# `run_sar.py --recipe deit` against the same run without it ({report['device']})",
        "",
        f"- date: {report['date']}",
        f"- command: `{report['command']}`",
        f"- machine: {info['platform']}, cpu_count {info['cpu_count']}, torch_threads {info['torch_threads']}"
        + (f", GPU {info['gpu']}" if "gpu" in info else ""),
        "- versions: " + ", ".join(f"{name} {version}" for name, version in info["versions"].items()),
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
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = " ".join(["bench_recipe.py", *argv])
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--pairs", type=int, default=2, help="Pairs of runs (plain and recipe).")
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
        "summary": summarise(runs),
    }
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
