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
validation accuracy is logged ten times per run, and the report plots the baseline's curves to show
that it has plateaued. Each SAR row carries its paired difference from the baseline (same dataset,
fraction and seed) with a 95% paired t interval.

Runs are appended to `runs.jsonl` as they finish, so an interrupted study resumes where it stopped
(delete `claims/` first), and several processes can share the work: each claims a run before it
starts it. The report (`README.md`, `summary.json`, `evidence.png`, `plateau.png`, and the
attention pictures of one seed's models on the cluttered digits) is rebuilt from that file at the
end of each invocation.

    # the whole study, one process per core (about two hours on 2 CPU cores):
    OMP_NUM_THREADS=1 python benchmarks/evidence.py & OMP_NUM_THREADS=1 python benchmarks/evidence.py; wait
    python benchmarks/evidence.py --seeds 0 --fractions 0.1 --epochs 2   # a quick look
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


@torch.no_grad()
def attention_metrics(model, processor, test) -> dict:
    """Mean spatial entropy and Jaccard index of the model's [CLS] maps on the test images."""
    size = run_sar.processor_size(processor)
    transform = run_sar.ImageTransform(size, processor.image_mean, processor.image_std)
    mask_column = "mask" if "mask" in test.column_names else "image"  # plain digits: the ink is the mask
    entropies, jaccards = [], []
    for start in range(0, len(test), 256):
        batch = test[start : start + 256]
        pixel_values = torch.stack([transform(image) for image in batch["image"]])
        scores, grid_size = cls_attention(model, pixel_values)  # [B, heads, gh*gw]
        entropies.append(sar_hf.spatial_entropy(scores, grid_size, reduction="none").flatten())
        masks = torch.stack([torch.from_numpy(np.asarray(m.convert("L")) > 0) for m in batch[mask_column]])
        jaccards.append(attention_jaccard(scores, object_patches(masks, grid_size)).flatten())
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


def run_study(args) -> list[dict]:
    os.makedirs(args.output, exist_ok=True)
    runs_path = os.path.join(args.output, "runs.jsonl")
    for dataset in args.datasets:
        test = run_sar.BUNDLED_DATASETS[dataset][1]()["test"]
        for fraction in args.fractions:
            for seed in args.seeds:
                for variant in args.variants:
                    run = {"dataset": dataset, "fraction": fraction, "seed": seed, "variant": variant}
                    run.update(epochs=args.epochs, batch_size=args.batch_size)
                    if run_key(run) in read_runs(runs_path) or not claim(args.output, run_key(run)):
                        continue
                    with tempfile.TemporaryDirectory() as output_dir:
                        run.update(train_one(run, output_dir))
                        model = sar_hf.SARViTForImageClassification.from_pretrained(output_dir)
                        processor = load_image_processor(output_dir)
                        run.update(attention_metrics(model, processor, test))
                        if fraction == min(args.fractions) and seed == args.picture_seed:
                            kept = os.path.join(args.output, "models", dataset, variant)
                            model.save_pretrained(kept)
                            processor.save_pretrained(kept)
                    print(json.dumps(run), flush=True)
                    with open(runs_path, "a") as f:
                        f.write(json.dumps(run) + "\n")
    budget = (args.epochs, args.batch_size)
    return [run for run in read_runs(runs_path).values() if (run["epochs"], run["batch_size"]) == budget]


def summarize(runs: list[dict]) -> list[dict]:
    """One row per (dataset, fraction, variant): means over seeds, and each SAR variant's paired
    differences from the baseline of the same seeds with their `CONFIDENCE` t intervals."""
    rows = []
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
                    "dataset": dataset, "fraction": fraction, "variant": variant, "n": len(seeds),
                    "accuracy_mean": float(np.mean(accuracy)), "accuracy_std": float(np.std(accuracy, ddof=1))
                    if len(accuracy) > 1 else float("nan"),
                    "entropy_mean": float(np.mean([r["test_entropy"] for r in seeds.values()])),
                    "jaccard_mean": float(np.mean([r["test_jaccard"] for r in seeds.values()])),
                }  # fmt: skip
                paired = sorted(set(seeds) & set(baseline))
                if variant != "baseline" and paired:
                    for metric, name in (
                        ("test_accuracy", ""),
                        ("test_entropy", "entropy_"),
                        ("test_jaccard", "jaccard_"),
                    ):
                        mean, low, high = paired_interval(
                            [seeds[s][metric] for s in paired], [baseline[s][metric] for s in paired]
                        )
                        row.update({f"{name}diff_vs_baseline": mean, f"{name}ci95_low": low, f"{name}ci95_high": high})
                    row["n_paired"] = len(paired)
                rows.append(row)
    return rows


def report(runs: list[dict], args, seconds: float) -> None:
    """Writes summary.json, README.md, evidence.png, plateau.png and the attention pictures into args.output."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summarize(runs)
    with open(os.path.join(args.output, "summary.json"), "w") as f:
        json.dump(rows, f, indent=1)
    datasets = list(dict.fromkeys(row["dataset"] for row in rows))
    seeds = sorted({r["seed"] for r in runs})

    def interval(row, name=""):
        if f"{name}diff_vs_baseline" not in row:
            return "—"
        return f"{row[f'{name}diff_vs_baseline']:+.4f} [{row[f'{name}ci95_low']:+.4f}, {row[f'{name}ci95_high']:+.4f}]"

    lines = [
        "# Evidence: plain ViT against SAR on the digits and the cluttered digits",
        "",
        f"Generated by `python benchmarks/evidence.py` on {datetime.date.today()}; {seconds / 60:.0f} min of "
        "training summed over runs (two processes in parallel, one thread each).",
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
        f"{CONFIDENCE:.0%} paired t interval (mean ± t·sd/√n over the seeds' differences); mean spatial entropy "
        "of the test maps in nats (lower = fewer, more compact regions) and its paired difference; the "
        f"Jaccard index of each map thresholded to keep {MASS_KEPT:.0%} of its mass against the object's "
        "patches (the digit's ink) and its paired difference.",
        "",
    ]
    for dataset in datasets:
        lines += [
            f"## {run_sar.BUNDLED_DATASETS[dataset][0]}",
            "",
            "| fraction | variant | n | accuracy | Δ accuracy [95% CI] | entropy | Δ entropy [95% CI] | Jaccard | "
            "Δ Jaccard [95% CI] |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for row in (r for r in rows if r["dataset"] == dataset):
            lines.append(
                f"| {row['fraction']:.0%} | {row['variant']} | {row['n']} | {row['accuracy_mean']:.4f} ± "
                f"{row['accuracy_std']:.4f} | {interval(row)} | {row['entropy_mean']:.4f} | "
                f"{interval(row, 'entropy_')} | {row['jaccard_mean']:.4f} | {interval(row, 'jaccard_')} |"
            )
        lines.append("")
    lines += [
        "![accuracy and paired differences](evidence.png)",
        "",
        "The baseline's validation accuracy over training (mean over seeds), to show that the epoch budget "
        "lets it plateau at every fraction:",
        "",
        "![validation curves](plateau.png)",
        "",
    ]

    figure, axes = plt.subplots(2, len(datasets), figsize=(5.5 * len(datasets), 8), squeeze=False)
    for column, dataset in enumerate(datasets):
        cells = [r for r in rows if r["dataset"] == dataset]
        for variant in VARIANTS:
            mine = [r for r in cells if r["variant"] == variant]
            if not mine:
                continue
            fractions = [r["fraction"] for r in mine]
            axes[0, column].errorbar(
                fractions, [r["accuracy_mean"] for r in mine], yerr=[r["accuracy_std"] for r in mine],
                marker="o", capsize=3, label=variant,
            )  # fmt: skip
            if variant != "baseline" and all("diff_vs_baseline" in r for r in mine):
                diffs = np.array([r["diff_vs_baseline"] for r in mine])
                bounds = np.array([[r["ci95_low"], r["ci95_high"]] for r in mine]).T
                axes[1, column].errorbar(
                    fractions, diffs, yerr=np.abs(bounds - diffs), marker="o", capsize=3, label=variant
                )
        axes[0, column].set_title(f"{dataset}: test accuracy (mean ± std)")
        axes[1, column].set_title(f"{dataset}: paired Δ accuracy vs baseline ({CONFIDENCE:.0%} CI)")
        axes[1, column].axhline(0, color="grey", linewidth=0.8)
        for axis in axes[:, column]:
            axis.set_xscale("log")
            fractions = sorted({r["fraction"] for r in cells})
            axis.set_xticks(fractions, [f"{f:.0%}" for f in fractions])
            axis.set_xlabel("training fraction")
            axis.legend()
    figure.tight_layout()
    figure.savefig(os.path.join(args.output, "evidence.png"), dpi=100)
    plt.close(figure)

    figure, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4), squeeze=False)
    for column, dataset in enumerate(datasets):
        for fraction in sorted({r["fraction"] for r in runs if r["dataset"] == dataset}):
            curves = [
                r["validation_curve"] for r in runs
                if (r["dataset"], r["fraction"], r["variant"]) == (dataset, fraction, "baseline")
            ]  # fmt: skip
            points = min(len(curve) for curve in curves) if curves else 0
            if points:
                mean = np.mean([[accuracy for _, accuracy in curve[:points]] for curve in curves], axis=0)
                epochs = [epoch for epoch, _ in curves[0][:points]]
                axes[0, column].plot(epochs, mean, marker="o", label=f"{fraction:.0%} of the data")
        axes[0, column].set_title(f"{dataset}: baseline validation accuracy")
        axes[0, column].set_xlabel("epoch")
        axes[0, column].legend()
    figure.tight_layout()
    figure.savefig(os.path.join(args.output, "plateau.png"), dpi=100)
    plt.close(figure)

    for dataset in datasets:
        models_dir = os.path.join(args.output, "models", dataset)
        shown = [v for v in VARIANTS if os.path.isdir(os.path.join(models_dir, v))]
        if not shown:
            continue
        models = {v: sar_hf.SARViTForImageClassification.from_pretrained(os.path.join(models_dir, v)) for v in shown}
        processor = load_image_processor(os.path.join(models_dir, shown[0]))
        test = run_sar.BUNDLED_DATASETS[dataset][1]()["test"]
        images = [test[i]["image"] for i in range(3)]
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
    start = time.perf_counter()
    runs = run_study(args)
    report(runs, args, sum(r["train_seconds"] for r in runs) or time.perf_counter() - start)


if __name__ == "__main__":
    main()
