# /// script
# requires-python = ">=3.10"
# dependencies = ["sar_hf[examples]"]
# ///
"""The small-data evidence: plain ViT against SAR on the digits and the cluttered digits, paired by seed.

For every dataset, training fraction, seed and variant it runs `examples/run_sar.py` with the same
epoch budget, recipe, data subset and initialisation (only the SAR settings differ), then scores the
final model on the dataset's fixed held-out test split:

* test accuracy;
* the mean spatial entropy of the test images' [CLS] maps (all heads of the regularised layer);
* object localisation: the Jaccard index between each head's attention map, thresholded to keep
  60% of its mass (as DINO and the paper's VOC evaluation do), and the object's patches (those
  that hold any of the digit's ink: the plain digits' pixels > 0, the cluttered digits' mask);
  averaged over heads and images.

The budget is in epochs, so every fraction makes the same number of passes over its data; the
validation accuracy is logged ten times per run, and the report plots the baseline's curves. The
plateau check trains the baseline at the smallest fraction again with twice the epochs, for every
seed, and reports what the doubled budget changes; it runs first (with the budget's baseline runs
that it compares against), so that a short budget shows before the rest is spent. Each SAR row
carries its paired difference from the baseline (same dataset, fraction and seed) with a 95%
paired t interval.

Runs are appended to `runs.jsonl` as they finish, so an interrupted study resumes where it stopped
(delete `claims/` first), and several processes can share the work: each claims a run before it
starts it. The report (`README.md`, `summary.json`, `evidence.png`, `plateau.png`, and the
attention pictures of one seed's models on the cluttered digits) is rebuilt from that file at the
end of each invocation.

    # the whole study, one process per core (about two hours on 2 CPU cores):
    OMP_NUM_THREADS=1 python benchmarks/evidence.py & OMP_NUM_THREADS=1 python benchmarks/evidence.py; wait
    python benchmarks/evidence.py --seeds 0 1 --fractions 0.1 --epochs 2 --output /tmp/evidence  # a quick look
"""

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch
from scipy import stats as scipy_stats

import sar_hf
from sar_hf.data import load_image_processor
from sar_hf.visualization import cls_attention, save_attention_figure

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
import run_sar  # noqa: E402

VARIANTS = {
    "baseline": ["--sar_weight", "0"],
    "sar-0.01": ["--sar_weight", "0.01"],  # the paper's λ
    "sar-0.1": ["--sar_weight", "0.1"],
}
COLOURS = {"baseline": "C0", "sar-0.01": "C1", "sar-0.1": "C2"}  # the same colour for a variant in every panel
DATASETS = ("digits", "cluttered-digits")
MASS_KEPT = 0.6
CONFIDENCE = 0.95


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.25, 0.5])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--epochs", type=int, default=50, help="Epochs of every run (the same for every fraction).")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--picture_seed", type=int, default=0, help="Seed whose smallest-fraction models are kept.")
    parser.add_argument(
        "--plateau_check",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="First train the baseline at the smallest fraction with the budget and with twice its epochs, for "
        "every seed.",
    )
    parser.add_argument("--output", default="benchmarks/results/evidence")
    return parser.parse_args(argv)


def train_one(key: dict, output_dir: str) -> dict:
    """Trains one model with examples/run_sar.py; returns its test accuracy and validation curve."""
    args = [
        "--output_dir", output_dir,
        "--dataset_name", key["dataset"],
        "--train_fraction", str(key["fraction"]),
        "--seed", str(key["seed"]),
        "--num_train_epochs", str(key["epochs"]),
        "--per_device_train_batch_size", str(key["batch_size"]),
        "--eval_strategy", "steps",
        "--eval_steps", "0.1",  # ten points on the validation curve
        "--save_strategy", "no",
        "--logging_steps", "1000",
        "--report_to", "none",
        "--attention_figure_images", "0",
        "--no_verify_images",  # built in memory
        "--disable_tqdm", "true",
        "--dataloader_pin_memory", str(torch.cuda.is_available()),
        *VARIANTS[key["variant"]],
    ]  # fmt: skip
    start = time.perf_counter()
    results = run_sar.main(args)
    with open(os.path.join(output_dir, "trainer_state.json")) as f:
        history = json.load(f)["log_history"]
    curve = [[entry["epoch"], entry["eval_accuracy"]] for entry in history if "eval_accuracy" in entry]
    return {
        "train_seconds": time.perf_counter() - start,
        "test_accuracy": results["test_accuracy"],
        "validation_curve": curve,
    }


def object_patches(masks: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
    """`bool [B, gh*gw]`: the patches that hold any of the object, from `[B, H, W]` masks of the whole image.

    The image processors resize the whole image to the model's input, so patch (i, j) covers the
    same fraction of the mask: its area average over that cell is > 0 where the cell holds ink.
    """
    cover = torch.nn.functional.interpolate(masks[:, None].float(), size=grid_size, mode="area")
    return (cover > 0).flatten(1)


def object_masks(split) -> torch.Tensor:
    """`bool [N, H, W]`: the object of every image of a split (plain digits: the ink, pixels > 0)."""
    column = "mask" if "mask" in split.column_names else "image"
    return torch.stack([torch.from_numpy(np.asarray(image.convert("L")) > 0) for image in split[column]])


@torch.no_grad()
def attention_metrics(model, processor, test) -> dict:
    """Mean spatial entropy and Jaccard index of the model's [CLS] maps on the test images."""
    size = run_sar.processor_size(processor)
    transform = run_sar.ImageTransform(size, processor.image_mean, processor.image_std)
    entropies, jaccards = [], []
    for start in range(0, len(test), 256):
        batch = test.select(range(start, min(start + 256, len(test))))
        pixel_values = torch.stack([transform(image) for image in batch["image"]])
        scores, grid_size = cls_attention(model, pixel_values)  # [B, heads, gh*gw]
        entropies.append(sar_hf.spatial_entropy(scores, grid_size, reduction="none").flatten())
        jaccards.append(attention_jaccard(scores, object_patches(object_masks(batch), grid_size)).flatten())
    return {
        "test_entropy": torch.cat(entropies).mean().item(),
        "test_jaccard": torch.cat(jaccards).mean().item(),
    }


def attention_jaccard(scores: torch.Tensor, ink: torch.Tensor) -> torch.Tensor:
    """Jaccard index `[B, heads]` between each map's attention and the object's mask.

    The attention of a map is the smallest set of patches that holds `MASS_KEPT` of its softmax.

    Args:
        scores (`torch.Tensor` of shape `[B, heads, n]`): pre-softmax [CLS]-to-patch scores.
        ink (`torch.BoolTensor` of shape `[B, n]`): the patches that the object covers.
    """
    attention = scores.softmax(-1)
    order = attention.argsort(-1, descending=True)
    sorted_attention = attention.gather(-1, order)
    # A patch is kept while the mass before it is still short of MASS_KEPT.
    keep_sorted = (sorted_attention.cumsum(-1) - sorted_attention) < MASS_KEPT
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    ink = ink[:, None]  # the same mask for every head
    union = (keep | ink).sum(-1).clamp(min=1)
    return (keep & ink).sum(-1) / union


def fixed_map_jaccard(data, grid_size: tuple[int, int]) -> float:
    """The mean Jaccard of one fixed map on every test image of `data` (a bundled `DatasetDict`): how
    often each patch holds the object in the training images, used as the map of every image. A
    model's attention that had learnt only where objects usually lie, and nothing of the image,
    would score this."""
    frequency = object_patches(object_masks(data["train"]), grid_size).float().mean(0)
    test = object_patches(object_masks(data["test"]), grid_size)
    scores = frequency.clamp_min(1e-6).log().expand(len(test), 1, -1)
    return attention_jaccard(scores, test).mean().item()


def paired_interval(values, baseline, confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """`(mean, low, high)` of the paired differences `values - baseline`, with a two-sided t interval.

    The interval is `mean ± t_{(1+confidence)/2, n-1} · sd / sqrt(n)` with `sd` the sample standard
    deviation (ddof 1) of the `n` differences; `nan` bounds for fewer than two pairs.
    """
    differences = np.asarray(values, float) - np.asarray(baseline, float)
    mean = float(differences.mean())
    if len(differences) < 2:
        return mean, float("nan"), float("nan")
    half = scipy_stats.t.ppf((1 + confidence) / 2, len(differences) - 1) * differences.std(ddof=1)
    half /= np.sqrt(len(differences))
    return mean, mean - half, mean + half


def run_key(run: dict) -> tuple:
    return tuple(run[name] for name in ("dataset", "fraction", "seed", "variant", "epochs", "batch_size"))


def read_runs(runs_path: str) -> dict:
    """The finished runs, keyed by `run_key`."""
    done = {}
    if os.path.exists(runs_path):
        with open(runs_path) as f:
            for line in f:
                run = json.loads(line)
                done[run_key(run)] = run
    return done


def claim(output: str, key: tuple) -> bool:
    """True for the one process that creates the claim file of `key` (so workers share the list)."""
    os.makedirs(os.path.join(output, "claims"), exist_ok=True)
    try:
        os.close(os.open(os.path.join(output, "claims", "_".join(map(str, key))), os.O_CREAT | os.O_EXCL))
        return True
    except FileExistsError:
        return False


def planned_runs(args) -> list[dict]:
    """The study's runs, in order. With the plateau check, first the baseline at the smallest fraction
    with the budget and with twice its epochs, for every dataset and seed: they say whether the
    budget suffices before the rest is spent. Then every (fraction, dataset, seed, variant) left."""
    budget = {"epochs": args.epochs, "batch_size": args.batch_size}
    plan = [
        {"dataset": dataset, "fraction": fraction, "seed": seed, "variant": variant, **budget}
        for fraction in args.fractions
        for dataset in args.datasets
        for seed in args.seeds
        for variant in args.variants
    ]
    if not args.plateau_check:
        return plan
    check = [
        {"dataset": dataset, "fraction": min(args.fractions), "seed": seed, "variant": "baseline",
         "epochs": epochs, "batch_size": args.batch_size}
        for dataset in args.datasets
        for seed in args.seeds
        for epochs in (args.epochs, 2 * args.epochs)
    ]  # fmt: skip
    return check + [run for run in plan if run not in check]


def picture_models_dir(args, dataset: str) -> str:
    """Where the picture seed's smallest-fraction models of `dataset` are kept, one folder per variant."""
    name = f"{dataset}_{min(args.fractions)}_seed{args.picture_seed}_{args.epochs}ep_batch{args.batch_size}"
    return os.path.join(args.output, "models", name)


def run_study(args) -> list[dict]:
    """Runs every planned run that no finished or claimed run covers; returns all finished runs."""
    os.makedirs(args.output, exist_ok=True)
    runs_path = os.path.join(args.output, "runs.jsonl")
    tests = {}
    for run in planned_runs(args):
        if run_key(run) in read_runs(runs_path) or not claim(args.output, run_key(run)):
            continue
        if run["dataset"] not in tests:
            tests[run["dataset"]] = run_sar.BUNDLED_DATASETS[run["dataset"]][1]()["test"]
        with tempfile.TemporaryDirectory() as output_dir:
            run.update(train_one(run, output_dir))
            model = sar_hf.SARViTForImageClassification.from_pretrained(output_dir)
            processor = load_image_processor(output_dir)
            run.update(attention_metrics(model, processor, tests[run["dataset"]]))
            pictured = (run["fraction"], run["seed"], run["epochs"]) == (
                min(args.fractions),
                args.picture_seed,
                args.epochs,
            )
            if pictured:
                kept = os.path.join(picture_models_dir(args, run["dataset"]), run["variant"])
                model.save_pretrained(kept)
                processor.save_pretrained(kept)
        print(json.dumps(run), flush=True)
        with open(runs_path, "a") as f:
            f.write(json.dumps(run) + "\n")
    return list(read_runs(runs_path).values())


def _finite(value):
    """`value` as a float, or None where it is not finite (JSON has no NaN)."""
    return float(value) if value is not None and np.isfinite(value) else None


def summarize(runs: list[dict]) -> list[dict]:
    """One row per (dataset, fraction, variant) of runs at one budget: means over seeds and, for each
    SAR variant, the paired differences from the baseline over the seeds both finished, with their
    `CONFIDENCE` t intervals (None for the baseline itself, and where fewer than two pairs exist)."""
    rows = []
    metrics = (("test_accuracy", ""), ("test_entropy", "entropy_"), ("test_jaccard", "jaccard_"))
    for dataset in [d for d in DATASETS if any(r["dataset"] == d for r in runs)]:
        for fraction in sorted({r["fraction"] for r in runs if r["dataset"] == dataset}):
            cell = [r for r in runs if r["dataset"] == dataset and r["fraction"] == fraction]
            by_variant = {v: {r["seed"]: r for r in cell if r["variant"] == v} for v in VARIANTS}
            baseline = by_variant["baseline"]
            for variant, seeds in by_variant.items():
                if not seeds:
                    continue
                accuracy = [r["test_accuracy"] for r in seeds.values()]
                row = {
                    "dataset": dataset,
                    "fraction": fraction,
                    "variant": variant,
                    "n": len(seeds),
                    "accuracy_mean": float(np.mean(accuracy)),
                    "accuracy_std": _finite(np.std(accuracy, ddof=1)) if len(accuracy) > 1 else None,
                    "entropy_mean": float(np.mean([r["test_entropy"] for r in seeds.values()])),
                    "jaccard_mean": float(np.mean([r["test_jaccard"] for r in seeds.values()])),
                }
                paired = sorted(set(seeds) & set(baseline)) if variant != "baseline" else []
                row["n_paired"] = len(paired)
                for metric, name in metrics:
                    mean = low = high = None
                    if paired:
                        mean, low, high = map(
                            _finite,
                            paired_interval([seeds[s][metric] for s in paired], [baseline[s][metric] for s in paired]),
                        )
                    row.update({f"{name}diff_vs_baseline": mean, f"{name}ci95_low": low, f"{name}ci95_high": high})
                rows.append(row)
    return rows


def baseline_runs(runs: list[dict], dataset: str, fraction: float, epochs: int, args) -> list[dict]:
    """The baseline's runs of `dataset` at `fraction`, trained for `epochs` at the study's batch size."""
    key = (dataset, fraction, "baseline", epochs, args.batch_size)
    return [r for r in runs if (r["dataset"], r["fraction"], r["variant"], r["epochs"], r["batch_size"]) == key]


def plateau_rows(runs: list[dict], args) -> list[dict]:
    """Per dataset: the baseline at the smallest fraction after the budget and after twice the
    epochs, over the seeds that have both, and the paired difference (twice minus once)."""
    rows = []
    for dataset in args.datasets:
        once, twice = (
            {r["seed"]: r["test_accuracy"] for r in baseline_runs(runs, dataset, min(args.fractions), epochs, args)}
            for epochs in (args.epochs, 2 * args.epochs)
        )
        seeds = sorted(set(once) & set(twice))
        if seeds:
            mean, low, high = map(_finite, paired_interval([twice[s] for s in seeds], [once[s] for s in seeds]))
            rows.append({
                "dataset": dataset, "fraction": min(args.fractions), "n": len(seeds),
                "accuracy_budget": float(np.mean([once[s] for s in seeds])),
                "accuracy_twice_the_epochs": float(np.mean([twice[s] for s in seeds])),
                "diff": mean, "ci95_low": low, "ci95_high": high,
            })  # fmt: skip
    return rows


def _interval(mean, low, high) -> str:
    if mean is None:
        return "—"
    if low is None:
        return f"{mean:+.4f}"
    return f"{mean:+.4f} [{low:+.4f}, {high:+.4f}]"


def report(runs: list[dict], args) -> None:
    """Writes summary.json, README.md, evidence.png, plateau.png and the attention pictures into args.output."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budget = [r for r in runs if (r["epochs"], r["batch_size"]) == (args.epochs, args.batch_size)]
    doubled = [r for r in runs if (r["epochs"], r["batch_size"]) == (2 * args.epochs, args.batch_size)]
    rows = summarize(budget)
    if not rows:
        print(f"No finished runs at {args.epochs} epochs, batch {args.batch_size} in {args.output}: no report.")
        return
    with open(os.path.join(args.output, "summary.json"), "w") as f:
        json.dump(rows, f, indent=1, allow_nan=False)
    datasets = list(dict.fromkeys(row["dataset"] for row in rows))
    seeds = sorted({r["seed"] for r in budget})
    preset = run_sar.MODEL_PRESETS["small"]
    grid_size = (preset["image_size"] // preset["patch_size"],) * 2
    data = {dataset: run_sar.BUNDLED_DATASETS[dataset][1]() for dataset in datasets}  # built once for the report

    lines = [
        "# Evidence: plain ViT against SAR on the digits and the cluttered digits",
        "",
        f"Generated by `{args.command}` on {datetime.date.today()}; training time summed over the runs: "
        f"{sum(r['train_seconds'] for r in budget) / 60:.0f} min for the {len(budget)} runs at the budget, "
        f"{sum(r['train_seconds'] for r in doubled) / 60:.0f} min for the plateau check's {len(doubled)}.",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; Python "
        f"{platform.python_version()}, torch {torch.__version__}, transformers {run_sar.transformers.__version__}.",
        "",
        f"Every run: the `small` preset from scratch, {args.epochs} epochs at batch {args.batch_size} (the same "
        "number of passes for every fraction), the script's plain recipe, on a stratified fraction of the "
        f"training split; seeds {seeds}, and the same seed gives every variant the same data subset and "
        "initialisation. Scored on the fixed held-out test split (digits: 360 images; cluttered digits: 720 "
        "canvases of the 360 test digits). `baseline` is plain ViT (λ = 0); `sar-0.01` (the paper's λ) and "
        "`sar-0.1` add the spatial entropy under the paper's warm-up and cosine schedule.",
        "",
        "Columns: test accuracy (mean ± std over seeds); its paired difference from the baseline with a "
        f"{CONFIDENCE:.0%} paired t interval (mean ± t·sd/√n over the seeds' differences; *pairs* seeds that "
        "both variants finished); mean spatial entropy of the test maps in nats (lower = fewer, more compact "
        f"regions); the Jaccard index of each map thresholded to keep {MASS_KEPT:.0%} of its mass against the "
        "object's patches (those holding any of the digit's ink); and their paired differences. The intervals "
        "cover the variation over training seeds (data subset and initialisation) on a fixed test set, not "
        "the sampling of the test set; the cluttered test set's two canvases per digit are not independent.",
        "",
    ]
    for dataset in datasets:
        lines += [
            f"## {run_sar.BUNDLED_DATASETS[dataset][0]}",
            "",
            "| fraction | variant | n | accuracy | Δ accuracy [95% CI] | pairs | entropy | Δ entropy [95% CI] "
            "| Jaccard | Δ Jaccard [95% CI] |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in (r for r in rows if r["dataset"] == dataset):
            std = "—" if row["accuracy_std"] is None else f"{row['accuracy_std']:.4f}"
            cells = [
                f"{row['fraction']:.0%}", row["variant"], str(row["n"]), f"{row['accuracy_mean']:.4f} ± {std}",
                _interval(row["diff_vs_baseline"], row["ci95_low"], row["ci95_high"]), str(row["n_paired"] or "—"),
                f"{row['entropy_mean']:.4f}",
                _interval(row["entropy_diff_vs_baseline"], row["entropy_ci95_low"], row["entropy_ci95_high"]),
                f"{row['jaccard_mean']:.4f}",
                _interval(row["jaccard_diff_vs_baseline"], row["jaccard_ci95_low"], row["jaccard_ci95_high"]),
            ]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
        prior = fixed_map_jaccard(data[dataset], grid_size)
        lines += [
            "",
            f"For scale: one fixed map, how often each patch holds the object in the training images, scores "
            f"a Jaccard of {prior:.4f} on these test images.",
            "",
        ]
    lines += ["![accuracy and paired differences](evidence.png)", ""]

    plateau = plateau_rows(runs, args)
    lines += [
        "## Does the baseline plateau?",
        "",
        f"The baseline's validation accuracy over training (mean over seeds; dashed: {2 * args.epochs} epochs):",
        "",
        "![validation curves](plateau.png)",
        "",
    ]
    if plateau:
        lines += [
            f"The baseline at the smallest fraction, trained again with {2 * args.epochs} epochs (same seeds, "
            "same schedule shape), against the budget; Δ = twice minus once, paired t interval:",
            "",
            f"| dataset | fraction | n | test accuracy, {args.epochs} epochs | {2 * args.epochs} epochs "
            "| Δ [95% CI] |",
            "|---|---|---|---|---|---|",
        ]
        for row in plateau:
            difference = _interval(row["diff"], row["ci95_low"], row["ci95_high"])
            lines.append(
                f"| {row['dataset']} | {row['fraction']:.0%} | {row['n']} | {row['accuracy_budget']:.4f} "
                f"| {row['accuracy_twice_the_epochs']:.4f} | {difference} |"
            )
        lines.append("")

    figure, axes = plt.subplots(2, len(datasets), figsize=(5.5 * len(datasets), 8), squeeze=False)
    for column, dataset in enumerate(datasets):
        cells = [r for r in rows if r["dataset"] == dataset]
        fractions = sorted({r["fraction"] for r in cells})
        for variant in VARIANTS:
            mine = [r for r in cells if r["variant"] == variant]
            if not mine:
                continue
            axes[0, column].errorbar(
                [r["fraction"] for r in mine], [r["accuracy_mean"] for r in mine],
                yerr=[r["accuracy_std"] or 0 for r in mine], marker="o", capsize=3, label=variant,
                color=COLOURS[variant],
            )  # fmt: skip
            paired = [r for r in mine if r["ci95_low"] is not None]
            if paired:
                diffs = np.array([r["diff_vs_baseline"] for r in paired])
                bounds = np.array([[r["ci95_low"], r["ci95_high"]] for r in paired]).T
                axes[1, column].errorbar(
                    [r["fraction"] for r in paired], diffs, yerr=np.abs(bounds - diffs), marker="o", capsize=3,
                    label=variant, color=COLOURS[variant],
                )  # fmt: skip
        axes[0, column].set_title(f"{dataset}: test accuracy (mean ± std)")
        axes[1, column].set_title(f"{dataset}: paired Δ accuracy vs baseline ({CONFIDENCE:.0%} CI)")
        axes[1, column].axhline(0, color="grey", linewidth=0.8)
        for axis in axes[:, column]:
            axis.set_xscale("log")
            axis.set_xticks(fractions, [f"{f:.0%}" for f in fractions])
            axis.minorticks_off()
            axis.set_xlabel("training fraction")
            if axis.get_legend_handles_labels()[0]:
                axis.legend()
    figure.tight_layout()
    figure.savefig(os.path.join(args.output, "evidence.png"), dpi=100)
    plt.close(figure)

    figure, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4), squeeze=False)
    for column, dataset in enumerate(datasets):
        for fraction in sorted({r["fraction"] for r in budget if r["dataset"] == dataset}):
            for epochs, style in ((args.epochs, "-"), (2 * args.epochs, "--")):
                curves = [r["validation_curve"] for r in baseline_runs(runs, dataset, fraction, epochs, args)]
                points = min((len(curve) for curve in curves), default=0)
                if points:
                    mean = np.mean([[accuracy for _, accuracy in curve[:points]] for curve in curves], axis=0)
                    label = f"{fraction:.0%} of the data" + (f", {epochs} epochs" if epochs != args.epochs else "")
                    axes[0, column].plot(
                        [epoch for epoch, _ in curves[0][:points]], mean, style, marker="o", label=label
                    )
        axes[0, column].set_title(f"{dataset}: baseline validation accuracy")
        axes[0, column].set_xlabel("epoch")
        axes[0, column].legend()
    figure.tight_layout()
    figure.savefig(os.path.join(args.output, "plateau.png"), dpi=100)
    plt.close(figure)

    for dataset in datasets:
        models_dir = picture_models_dir(args, dataset)
        shown = [v for v in VARIANTS if os.path.isdir(os.path.join(models_dir, v))]
        if not shown:
            continue
        models = {v: sar_hf.SARViTForImageClassification.from_pretrained(os.path.join(models_dir, v)) for v in shown}
        processor = load_image_processor(os.path.join(models_dir, shown[0]))
        images = [data[dataset]["test"][i]["image"] for i in range(3)]
        name = f"attention_maps_{dataset}.png"
        save_attention_figure(models, images, processor, os.path.join(args.output, name))
        lines += [
            f"Attention of seed {args.picture_seed}'s models at {min(args.fractions):.0%} of the {dataset}, on the "
            "same test images (each map titled with its spatial entropy):",
            "",
            f"![attention, {dataset}]({name})",
            "",
        ]
    with open(os.path.join(args.output, "README.md"), "w") as f:
        f.write("\n".join(lines))


def main(argv=None):
    args = parse_args(argv)
    args.command = " ".join(["python benchmarks/evidence.py", *(sys.argv[1:] if argv is None else argv)])
    report(run_study(args), args)


if __name__ == "__main__":
    main()
