# /// script
# requires-python = ">=3.10"
# dependencies = ["sar_hf[examples]"]
# ///
"""The small-data evidence: plain ViT against SAR on the digits and the cluttered digits, paired by seed,
at an epoch budget where the baseline has stopped learning.

The budget is chosen by the data first. The baseline at the smallest fraction is trained for E and 2E
epochs with every seed, dataset and recipe; while doubling gains (on any dataset or recipe, a mean
paired gain in test accuracy above 0.01 or a 95% upper bound above 0.02), E doubles, up to
--max_epochs. Then every (seed, fraction, dataset, recipe, variant) is trained at that budget with the
training script (`sar-hf train`; within a seed, every variant has the same data subset, initialisation
and recipe: only the SAR settings differ) and scored on the dataset's fixed held-out test split:

* test accuracy;
* the mean spatial entropy of the test images' [CLS] maps (all heads of the regularised layer);
* object localisation against the object's patches (those that hold any of the digit's ink: the
  plain digits' pixels > 0, the cluttered digits' mask), averaged over heads and images: the Jaccard
  index of each map thresholded to keep 60% of its mass (as DINO and the paper's VOC evaluation do),
  and the mass on the object, the share of the map's above-mean attention (the softmax mass of the
  patches whose score is above the map's mean, the loss's mask) that falls on the object's patches.

Each SAR row carries its paired difference from the baseline of its recipe (same dataset, fraction
and seed) with a 95% paired t interval.

Runs are appended to `runs.jsonl` as they finish, so an interrupted study resumes where it stopped
(delete `claims/` first). `--workers N` starts N processes that share the device, one CPU thread
each; each claims a run before it starts it, as separate invocations on one output folder do.

With `--time_budget_s`, the search starts with one run per worker (its first round's first seeds),
the timing probe: the finished runs give the seconds per pass over a training split, and a set of
runs is predicted to take its passes times that (times 1.25 for the SAR and DeiT runs' dearer
steps), spread over the workers, plus its longest run. Seeds are cut before fractions, the last
first and down to --min_seeds: the search's seeds until its first round and the smallest study
(--min_seeds seeds at the smallest fraction) fit the time left; the search doubles only while its
next round and the smallest study fit; then the study's seeds, and its fractions (the largest
first), until it fits. The log and the report say what was cut. The budget that the search chose
is kept in `budget.json`, for `--report_only`.

The report (`README.md`, `summary.json`, `evidence.png`, `plateau.png`, and the attention pictures of
one seed's models at the smallest fraction) is rebuilt from `runs.jsonl` at the end of each invocation.

    python benchmarks/evidence.py --device cuda --workers 16 --time_budget_s 420   # one GPU: run_evidence_gpu.sh
    python benchmarks/evidence.py --workers 2 --datasets digits --recipes plain --seeds 0 1 \\
        --fractions 0.1 --epochs 2 --max_epochs 4 --output /tmp/evidence              # a quick look
"""

import argparse
import contextlib
import datetime
import functools
import json
import math
import multiprocessing
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch
import transformers
from scipy import stats as scipy_stats

import sar_hf
from sar_hf.data import BUNDLED_DATASETS, ImageTransform, load_image_processor, processor_size
from sar_hf.scripts.arguments import MODEL_PRESETS, TRAINING_DEFAULTS
from sar_hf.scripts.deit_recipe import LEARNING_RATE_PER_IMAGE
from sar_hf.scripts.train import main as train_main
from sar_hf.visualization import cls_attention, save_attention_figure

VARIANTS = {
    "baseline": ["--sar_weight", "0"],
    "sar-0.01": ["--sar_weight", "0.01"],  # the paper's λ
    "sar-0.1": ["--sar_weight", "0.1"],
}
RECIPES = {"plain": [], "deit": ["--recipe", "deit"]}  # the script's defaults; DeiT's recipe
COLOURS = {"baseline": "C0", "sar-0.01": "C1", "sar-0.1": "C2"}  # the same colour for a variant in every panel
LINES = {"plain": "-", "deit": "--"}
DATASETS = ("digits", "cluttered-digits")
MASS_KEPT = 0.6
CONFIDENCE = 0.95
#: The baseline has plateaued at E when twice the epochs gain at most PLATEAU_MEAN in test accuracy
#: on average over the seeds, with the CONFIDENCE upper bound at most PLATEAU_HIGH.
PLATEAU_MEAN, PLATEAU_HIGH = 0.01, 0.02
#: The time plan measures baseline runs; a SAR step costs 1.16x a plain one on an H200
#: (bench_step_cuda.md) and the DeiT recipe about 1.05x on the CPU (bench_recipe_cpu.md).
PLAN_MARGIN = 1.25
METRICS = (("test_accuracy", ""), ("test_entropy", "entropy_"), ("test_jaccard", "jaccard_"), ("test_mass", "mass_"))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.5])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument(
        "--epochs",
        type=int,
        default=160,
        help="The first budget that the search tries (80 to 160 epochs still gained about 0.05 on the CPU); "
        "the budget itself with --no-plateau_check. The same for every fraction.",
    )
    parser.add_argument(
        "--max_epochs",
        type=int,
        default=640,
        help="The largest budget: the search stops doubling there (640: runs of up to 1,280 epochs; the gain "
        "of doubling fell from 0.12 at 50 epochs to 0.05 at 80 on the CPU).",
    )
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument(
        "--model_preset", default="small", choices=list(MODEL_PRESETS), help="The model, from scratch."
    )
    parser.add_argument("--picture_seed", type=int, default=0, help="Seed whose smallest-fraction models are kept.")
    parser.add_argument(
        "--plateau_check",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Choose the budget by the search; without it, --epochs is the budget.",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="Processes that share the device, one CPU thread each (1: this process, with torch's threads).",
    )
    parser.add_argument(
        "--time_budget_s", type=float, help="Fit the search and the study into this many seconds (see above)."
    )
    parser.add_argument(
        "--min_seeds",
        type=int,
        default=5,
        help="The time plan keeps at least this many seeds before it drops fractions.",
    )
    parser.add_argument(
        "--report_only",
        action="store_true",
        help="Run nothing: rebuild the report from runs.jsonl at the budget that the last search chose.",
    )
    parser.add_argument("--output", default="benchmarks/results/evidence/gpu")
    args = parser.parse_args(argv)
    if args.time_budget_s is not None and not args.plateau_check:
        parser.error("--time_budget_s plans from the search's first round; it needs --plateau_check.")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no GPU.")
    return args


def log(message: str) -> None:
    print(f"evidence: {message}", flush=True)


def train_one(key: dict, output_dir: str, args) -> dict:
    """Trains one model with the training script (`sar-hf train`); returns its test accuracy and validation curve."""
    flags = [
        "--output_dir", output_dir,
        "--model_preset", args.model_preset,
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
        "--dataloader_pin_memory", str(args.device == "cuda"),
        *(["--use_cpu"] if args.device == "cpu" else []),  # Trainer takes a GPU wherever it sees one
        *RECIPES[key["recipe"]],
        *VARIANTS[key["variant"]],
    ]  # fmt: skip
    start = time.perf_counter()
    results = train_main(flags)
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
    """Mean spatial entropy, Jaccard index and mass on the object of the model's [CLS] maps on the test images."""
    transform = ImageTransform(processor_size(processor), processor.image_mean, processor.image_std)
    entropies, jaccards, masses = [], [], []
    for start in range(0, len(test), 256):
        batch = test.select(range(start, min(start + 256, len(test))))
        pixel_values = torch.stack([transform(image) for image in batch["image"]])
        scores, grid_size = cls_attention(model, pixel_values)  # [B, heads, gh*gw], on the model's device
        ink = object_patches(object_masks(batch), grid_size).to(scores.device)
        entropies.append(sar_hf.spatial_entropy(scores, grid_size, reduction="none").flatten())
        jaccards.append(attention_jaccard(scores, ink).flatten())
        masses.append(mass_on_object(scores, ink).flatten())
    return {
        "test_entropy": torch.cat(entropies).mean().item(),
        "test_jaccard": torch.cat(jaccards).mean().item(),
        "test_mass": torch.cat(masses).mean().item(),
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


def mass_on_object(scores: torch.Tensor, ink: torch.Tensor) -> torch.Tensor:
    """Share `[B, heads]` of each map's above-mean attention that falls on the object's patches.

    The above-mean patches are those whose score is above the map's mean score (the loss's mask,
    SPEC step 2); their attention is their softmax over all patches. The share is
    `sum(attention on above-mean object patches) / sum(attention on above-mean patches)`, in [0, 1],
    and 0 where no patch is above the mean (a constant map).

    Args:
        scores (`torch.Tensor` of shape `[B, heads, n]`): pre-softmax [CLS]-to-patch scores.
        ink (`torch.BoolTensor` of shape `[B, n]`): the patches that the object covers.
    """
    above = scores.softmax(-1) * (scores > scores.mean(-1, keepdim=True))
    # The numerator is 0 wherever the denominator is, so any positive floor gives those maps 0.
    return (above * ink[:, None]).sum(-1) / above.sum(-1).clamp(min=torch.finfo(above.dtype).tiny)


def fixed_map_scores(data, grid_size: tuple[int, int]) -> tuple[float, float]:
    """The mean Jaccard and mass on the object of one fixed map on every test image of `data` (a bundled
    `DatasetDict`): how often each patch holds the object in the training images, used as the map of
    every image. A model's attention that had learnt only where objects usually lie, and nothing of
    the image, would score this."""
    frequency = object_patches(object_masks(data["train"]), grid_size).float().mean(0)
    test = object_patches(object_masks(data["test"]), grid_size)
    scores = frequency.clamp_min(1e-6).log().expand(len(test), 1, -1)
    return attention_jaccard(scores, test).mean().item(), mass_on_object(scores, test).mean().item()


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
    return tuple(run[name] for name in ("dataset", "fraction", "seed", "recipe", "variant", "epochs", "batch_size"))


def read_runs(runs_path: str) -> dict:
    """The finished runs, keyed by `run_key`."""
    done = {}
    if os.path.exists(runs_path):
        with open(runs_path) as f:
            for line in f:
                run = json.loads(line)
                done[run_key(run)] = run
    return done


def runs_file(args) -> str:
    return os.path.join(args.output, "runs.jsonl")


def claim_file(output: str, key: tuple) -> str:
    return os.path.join(output, "claims", "_".join(map(str, key)))


def claim(output: str, key: tuple) -> bool:
    """True for the one process that creates the claim file of `key` (so workers share the list)."""
    os.makedirs(os.path.join(output, "claims"), exist_ok=True)
    try:
        os.close(os.open(claim_file(output, key), os.O_CREAT | os.O_EXCL))
        return True
    except FileExistsError:
        return False


def plateau_runs(args, epochs: int, seeds: list[int]) -> list[dict]:
    """The search's round at budget `epochs`: the baseline at the smallest fraction with twice and with
    `epochs` epochs (the longer first, so that they do not end the round), every dataset, recipe and seed."""
    return [
        {"dataset": dataset, "fraction": min(args.fractions), "seed": seed, "recipe": recipe,
         "variant": "baseline", "epochs": e, "batch_size": args.batch_size}
        for e in (2 * epochs, epochs)
        for dataset in args.datasets
        for recipe in args.recipes
        for seed in seeds
    ]  # fmt: skip


def study_runs(args, epochs: int, seeds: list[int], fractions: list[float]) -> list[dict]:
    """The study's runs at `epochs`, seed by seed (an interrupted study holds whole seeds), the largest
    fraction first within a seed (so that the longest runs do not end it)."""
    return [
        {"dataset": dataset, "fraction": fraction, "seed": seed, "recipe": recipe, "variant": variant,
         "epochs": epochs, "batch_size": args.batch_size}
        for seed in seeds
        for fraction in sorted(fractions, reverse=True)
        for dataset in args.datasets
        for recipe in args.recipes
        for variant in args.variants
    ]  # fmt: skip


def picture_models_dir(args, dataset: str, epochs: int) -> str:
    """Where the picture seed's smallest-fraction models of `dataset` are kept, one folder per recipe and variant."""
    name = f"{dataset}_{min(args.fractions)}_seed{args.picture_seed}_{epochs}ep_batch{args.batch_size}"
    return os.path.join(args.output, "models", name)


def work(args, runs: list[dict]) -> None:
    """One worker: trains and scores every run of `runs` that no process has finished or claimed, and
    appends each to runs.jsonl as it finishes."""
    tests = {}
    for run in runs:
        if run_key(run) in read_runs(runs_file(args)) or not claim(args.output, run_key(run)):
            continue
        if run["dataset"] not in tests:
            tests[run["dataset"]] = BUNDLED_DATASETS[run["dataset"]][1]()["test"]
        with tempfile.TemporaryDirectory() as output_dir:
            trained = train_one(run, output_dir, args)
            model = sar_hf.SARViTForImageClassification.from_pretrained(output_dir).to(args.device)
            processor = load_image_processor(output_dir)
            record = {**run, **trained, **attention_metrics(model, processor, tests[run["dataset"]])}
            if (run["fraction"], run["seed"]) == (min(args.fractions), args.picture_seed):
                kept = os.path.join(
                    picture_models_dir(args, run["dataset"], run["epochs"]), run["recipe"], run["variant"]
                )
                model.save_pretrained(kept)
                processor.save_pretrained(kept)
        log(f"{run_key(run)}: test accuracy {record['test_accuracy']:.4f}, {record['train_seconds']:.0f} s")
        with open(runs_file(args), "a") as f:
            f.write(json.dumps(record) + "\n")


def worker_pool(args):
    """The `args.workers` processes that share the device, one CPU thread each, as a context manager;
    for one worker, None (this process, with torch's threads)."""
    if args.workers == 1:
        return contextlib.nullcontext()
    # Spawned, not forked: a forked child cannot use CUDA. They live for the whole study, so that each
    # imports torch and starts CUDA once.
    context = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(args.workers, mp_context=context, initializer=torch.set_num_threads, initargs=(1,))


def run_batch(args, runs: list[dict], pool=None) -> list[dict]:
    """Trains and scores the runs of `runs` not finished yet on `pool` (see `worker_pool`); returns every
    finished run once all of `runs` are (waiting for those that another invocation claimed)."""
    pending = [run for run in runs if run_key(run) not in read_runs(runs_file(args))]
    if pool is None:
        work(args, pending)
    elif pending:
        # Each worker takes the whole list and claims its runs one by one; a worker's error is raised here.
        list(pool.map(work, [args] * args.workers, [pending] * args.workers))
    while True:
        finished = read_runs(runs_file(args))
        missing = [run_key(run) for run in runs if run_key(run) not in finished]
        if not missing:
            return list(finished.values())
        unclaimed = [key for key in missing if not os.path.exists(claim_file(args.output, key))]
        if unclaimed:  # the workers were to claim every run: a bug, not a run to wait for
            raise RuntimeError(f"no worker claimed {unclaimed}")
        log(f"waiting for {len(missing)} runs claimed by another process (delete {args.output}/claims if none runs)")
        time.sleep(30)


def training_passes(run: dict) -> float:
    """Epochs times fraction: the passes over the whole training split, in proportion to the optimizer steps."""
    return run["epochs"] * run["fraction"]


def seconds_per_pass(finished: list[dict]) -> float:
    """Training seconds per pass over a training split, over the finished runs."""
    return sum(run["train_seconds"] for run in finished) / sum(map(training_passes, finished))


def predicted_seconds(args, runs: list[dict], finished: list[dict]) -> float:
    """Wall seconds that the runs of `runs` (each counted once) not in `finished` would take on `args.workers` workers.

    Each takes its passes times the seconds per pass of the finished runs (each timed while the
    workers shared the device), times PLAN_MARGIN; the workers take the runs as they come, which ends
    within their sum over the workers plus the longest run.
    """
    per_pass = seconds_per_pass(finished)
    done = {run_key(run) for run in finished}
    todo = {run_key(run): run for run in runs if run_key(run) not in done}  # a run that two lists share, once
    seconds = [PLAN_MARGIN * per_pass * training_passes(run) for run in todo.values()]
    return sum(seconds) / args.workers + max(seconds, default=0.0)


def fits(args, runs: list[dict], finished: list[dict]) -> bool:
    """Whether `runs` are predicted to end within the time left (always, without --time_budget_s)."""
    return args.time_budget_s is None or predicted_seconds(args, runs, finished) <= seconds_left(args)


def seconds_left(args) -> float:
    return max(0.0, args.started + args.time_budget_s - time.monotonic())  # runs all finished fit at 0 s


def plateau_rows(runs: list[dict], args, epochs: int) -> list[dict]:
    """Per dataset and recipe: the baseline at the smallest fraction after `epochs` and after twice as
    many, over the seeds that have both, and the paired gain (twice minus once)."""
    rows = []
    for dataset in args.datasets:
        for recipe in args.recipes:
            once, twice = (
                {r["seed"]: r["test_accuracy"] for r in baseline_runs(runs, dataset, recipe, min(args.fractions), e)}
                for e in (epochs, 2 * epochs)
            )
            seeds = sorted(set(once) & set(twice) & set(args.seeds))
            if seeds:
                gain, low, high = map(_finite, paired_interval([twice[s] for s in seeds], [once[s] for s in seeds]))
                rows.append({
                    "dataset": dataset, "recipe": recipe, "fraction": min(args.fractions), "n": len(seeds),
                    "epochs": epochs, "accuracy_mean": float(np.mean([once[s] for s in seeds])),
                    "gain_mean": gain, "ci95_low": low, "ci95_high": high,
                })  # fmt: skip
    return rows


def plateaued(row: dict) -> bool:
    return row["ci95_high"] is not None and row["gain_mean"] <= PLATEAU_MEAN and row["ci95_high"] <= PLATEAU_HIGH


def search_budget(args, run) -> int:
    """The budget: the first E (from --epochs, doubling) at which the baseline has plateaued on every
    dataset and recipe, else the last one tried (at --max_epochs, or where the time budget stopped).

    `run(runs)` trains the runs of `runs` not finished yet and returns every finished run. With a time
    budget, the first round starts with one run per worker (its first seeds), the timing probe; then
    the search's seeds are cut (the last first, down to --min_seeds) until its first round and the
    smallest study (--min_seeds seeds at the smallest fraction) fit the time left.
    """
    epochs, seeds = args.epochs, list(args.seeds)

    def smallest_study(epochs):
        return study_runs(args, epochs, args.seeds[: args.min_seeds], [min(args.fractions)])

    if args.time_budget_s is not None:
        probe = math.ceil(args.workers / len(plateau_runs(args, epochs, seeds[:1])))  # seeds: a run per worker
        finished = run(plateau_runs(args, epochs, seeds[:probe]))
        while len(seeds) > args.min_seeds and not fits(
            args, plateau_runs(args, epochs, seeds) + smallest_study(epochs), finished
        ):
            seeds.pop()
        log(f"probe: {seconds_per_pass(finished):.1f} s per pass over a training split in a run, {args.workers} "
            f"workers; the search trains seeds {seeds}")  # fmt: skip
    while True:
        finished = run(plateau_runs(args, epochs, seeds))
        rows = plateau_rows(finished, args, epochs)
        if rows and all(map(plateaued, rows)):
            log(f"the baseline has plateaued at {epochs} epochs")
            return epochs
        if 2 * epochs > args.max_epochs:
            log(f"no plateau by {epochs} epochs, the cap (--max_epochs {args.max_epochs}): the budget is {epochs}")
            return epochs
        if not fits(args, plateau_runs(args, 2 * epochs, seeds) + smallest_study(2 * epochs), finished):
            log(f"no plateau by {epochs} epochs; {2 * epochs} would leave the study no time: the budget is {epochs}")
            return epochs
        epochs *= 2


def fit_study(args, epochs: int, finished: list[dict]) -> tuple[list[int], list[float]]:
    """The seeds and fractions of the study at `epochs` that are predicted to fit the time left: seeds
    are dropped (the last first) down to --min_seeds before fractions (the largest first)."""
    seeds, fractions = list(args.seeds), sorted(args.fractions)
    while fractions and not fits(args, study_runs(args, epochs, seeds, fractions), finished):
        if len(seeds) > args.min_seeds:
            seeds.pop()
        else:
            fractions.pop()
    if (seeds, fractions) != (args.seeds, sorted(args.fractions)):
        predicted = predicted_seconds(args, study_runs(args, epochs, seeds, fractions), finished)
        whole = predicted_seconds(args, study_runs(args, epochs, args.seeds, args.fractions), finished)
        log(f"to fit the time left ({seconds_left(args):.0f} s), the study at {epochs} epochs keeps seeds {seeds} and "
            f"fractions {fractions} of {sorted(args.fractions)}: about {predicted:.0f} s (the whole design: "
            f"{whole:.0f} s)")  # fmt: skip
    return seeds, fractions


def _finite(value):
    """`value` as a float, or None where it is not finite (JSON has no NaN)."""
    return float(value) if value is not None and np.isfinite(value) else None


def summarize(runs: list[dict]) -> list[dict]:
    """One row per (dataset, fraction, recipe, variant) of runs at one budget, each over the seeds that
    every variant of its (dataset, fraction, recipe) finished: means over those seeds and, for each
    SAR variant, the paired differences from the baseline with their `CONFIDENCE` t intervals (None
    for the baseline itself, and where fewer than two pairs exist)."""
    rows = []
    for dataset in [d for d in DATASETS if any(r["dataset"] == d for r in runs)]:
        for fraction in sorted({r["fraction"] for r in runs if r["dataset"] == dataset}):
            for recipe in RECIPES:
                cell = [r for r in runs if (r["dataset"], r["fraction"], r["recipe"]) == (dataset, fraction, recipe)]
                by_variant = {v: {r["seed"]: r for r in cell if r["variant"] == v} for v in VARIANTS}
                by_variant = {v: by_seed for v, by_seed in by_variant.items() if by_seed}
                # The same seeds for every variant, so that the means differ as the paired differences do.
                seeds = sorted(set.intersection(*map(set, by_variant.values()))) if by_variant else []
                if not seeds:
                    continue
                baseline = by_variant.get("baseline")
                for variant, by_seed in by_variant.items():
                    accuracy = [by_seed[s]["test_accuracy"] for s in seeds]
                    row = {
                        "dataset": dataset, "fraction": fraction, "recipe": recipe, "variant": variant,
                        "n": len(seeds), "accuracy_mean": float(np.mean(accuracy)),
                        "accuracy_std": _finite(np.std(accuracy, ddof=1)) if len(seeds) > 1 else None,
                    }  # fmt: skip
                    for metric, name in METRICS[1:]:
                        row[f"{name}mean"] = float(np.mean([by_seed[s][metric] for s in seeds]))
                    paired = variant != "baseline" and baseline is not None
                    row["n_paired"] = len(seeds) if paired else 0
                    for metric, name in METRICS:
                        mean = low = high = None
                        if paired:
                            mean, low, high = map(
                                _finite,
                                paired_interval(
                                    [by_seed[s][metric] for s in seeds], [baseline[s][metric] for s in seeds]
                                ),
                            )
                        row.update({f"{name}diff_vs_baseline": mean, f"{name}ci95_low": low, f"{name}ci95_high": high})
                    rows.append(row)
    return rows


def baseline_runs(runs: list[dict], dataset: str, recipe: str, fraction: float, epochs: int) -> list[dict]:
    """The baseline's runs of `dataset` with `recipe` at `fraction`, trained for `epochs`."""
    key = (dataset, recipe, fraction, "baseline", epochs)
    return [r for r in runs if (r["dataset"], r["recipe"], r["fraction"], r["variant"], r["epochs"]) == key]


def _interval(mean, low, high) -> str:
    if mean is None:
        return "—"
    if low is None:
        return f"{mean:+.4f}"
    return f"{mean:+.4f} [{low:+.4f}, {high:+.4f}]"


def save_figure(figure, axes, path: str) -> None:
    """A legend on each axis that has labelled artists, then `figure` as a 100 dpi PNG at `path`."""
    import matplotlib.pyplot as plt  # as `report` imports it: only where figures are made

    for axis in axes.flat:
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def report(runs: list[dict], args, budget: int) -> None:
    """Writes summary.json, README.md, evidence.png, plateau.png and the attention pictures into args.output."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in runs if r["batch_size"] == args.batch_size]
    at_budget = [r for r in runs if r["epochs"] == budget]
    rows = summarize(at_budget)
    if not rows:
        log(f"no finished runs at {budget} epochs, batch {args.batch_size} in {args.output}: no report.")
        return
    tried = [args.epochs]  # the budgets that the search tried
    while tried[-1] < budget:
        tried.append(2 * tried[-1])
    plateau = [row for epochs in tried for row in plateau_rows(runs, args, epochs)] if args.plateau_check else []
    with open(os.path.join(args.output, "summary.json"), "w") as f:
        json.dump({"budget_epochs": budget, "plateau": plateau, "rows": rows}, f, indent=1, allow_nan=False)
    datasets = list(dict.fromkeys(row["dataset"] for row in rows))
    preset = MODEL_PRESETS[args.model_preset]
    grid_size = (preset["image_size"] // preset["patch_size"],) * 2
    data = {dataset: BUNDLED_DATASETS[dataset][1]() for dataset in datasets}  # built once for the report
    reached = [row for row in plateau if row["epochs"] == budget]
    if not args.plateau_check:
        why = "set by `--no-plateau_check` (no search)"
    elif reached and all(map(plateaued, reached)):
        why = "the first budget at which the baseline had plateaued on every dataset and recipe"
    elif 2 * budget > args.max_epochs:
        why = f"**not a plateau**: the search reached its cap (`--max_epochs {args.max_epochs}`) still gaining"
    else:
        why = "**not a plateau**: the search stopped there to leave the study time (`--time_budget_s`)"
    fractions = sorted({row["fraction"] for row in rows})
    fewest, most = min(row["n"] for row in rows), max(row["n"] for row in rows)
    held = f"{fewest}" if fewest == most else f"{fewest} to {most}"
    held += " seeds per cell at " + ", ".join(f"{f:.0%}" for f in fractions)
    asked = f"{len(args.seeds)} seeds at " + ", ".join(f"{f:.0%}" for f in sorted(args.fractions))
    seconds = sum(r["train_seconds"] for r in runs)

    lines = [
        "# Evidence at a plateau: plain ViT against SAR on the digits and the cluttered digits",
        "",
        f"Generated by `{args.command}` on {datetime.date.today()}, in {(time.monotonic() - args.started) / 60:.1f} "
        f"min of wall time on {args.device} with {args.workers} worker(s)"
        + (f" (time budget {args.time_budget_s:.0f} s)" if args.time_budget_s is not None else "")
        + f"; training time summed over the runs: {seconds / 60:.0f} min for {len(runs)} runs, of which "
        f"{sum(r['train_seconds'] for r in at_budget) / 60:.0f} min for the {len(at_budget)} at the budget.",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
        + (f", {torch.cuda.get_device_name()}" if args.device == "cuda" else "")
        + f"; Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}.",
        "",
        f"Budget: **{budget} epochs** at batch {args.batch_size} for every run and fraction, {why}. The search "
        f"trains the baseline at {min(args.fractions):.0%} of the data for E and 2E epochs with every seed from "
        f"E = {args.epochs}, and doubles E until, on every dataset and recipe, the paired gain of 2E over E has a "
        f"mean ≤ {PLATEAU_MEAN} and a {CONFIDENCE:.0%} upper bound ≤ {PLATEAU_HIGH}, up to "
        f"E = {args.max_epochs}.",
        "",
        f"Every run: the `{args.model_preset}` preset from scratch, on a stratified fraction of the training "
        "split; the same seed gives every variant the same data subset and initialisation. Scored on the fixed "
        "held-out test split (digits: 360 images; cluttered digits: 720 canvases of the 360 test digits). "
        "`baseline` is plain ViT (λ = 0); `sar-0.01` (the paper's λ) and `sar-0.1` add the spatial entropy under "
        "the paper's warm-up and cosine schedule. Recipes: `plain` is the script's defaults (AdamW at learning "
        f"rate {TRAINING_DEFAULTS['learning_rate']:.2g}, mild crops); `deit` is `--recipe deit` "
        "(RandAugment, mixup/cutmix, random erasing, label smoothing, and DeiT's learning rate scaled to the "
        f"batch: {LEARNING_RATE_PER_IMAGE['deit'] * args.batch_size:.2g}). The design asked for "
        f"{asked}; the tables hold {held} (the time plan drops seeds before fractions; `n` is what finished).",
        "",
        "Columns: test accuracy (mean ± std over seeds); its paired difference from the baseline of the same "
        f"recipe with a {CONFIDENCE:.0%} paired t interval (mean ± t·sd/√n over the seeds' differences; every "
        "variant of a cell over the seeds that all of them finished); mean spatial entropy of the test maps in "
        "nats (lower = fewer, more compact regions); the Jaccard index of each map thresholded to keep "
        f"{MASS_KEPT:.0%} of its mass against the object's patches (those holding any of the digit's ink); the "
        "mass on the object, the share of each map's above-mean attention (the softmax mass of the patches whose "
        "score is above the map's mean, the loss's mask) that falls on the object's patches; and their paired "
        "differences. The intervals cover the variation over training seeds (data subset and initialisation) "
        "on a fixed test set, not the sampling of the test set; the cluttered test set's two canvases per "
        "digit are not independent.",
        "",
    ]
    for dataset in datasets:
        lines += [
            f"## {BUNDLED_DATASETS[dataset][0]}",
            "",
            "| fraction | recipe | variant | n | accuracy | Δ accuracy [95% CI] | entropy | Δ entropy [95% CI] "
            "| Jaccard | Δ Jaccard [95% CI] | mass on object | Δ mass [95% CI] |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in (r for r in rows if r["dataset"] == dataset):
            std = "—" if row["accuracy_std"] is None else f"{row['accuracy_std']:.4f}"
            cells = [
                f"{row['fraction']:.0%}", row["recipe"], row["variant"], str(row["n"]),
                f"{row['accuracy_mean']:.4f} ± {std}",
                _interval(row["diff_vs_baseline"], row["ci95_low"], row["ci95_high"]),
            ]  # fmt: skip
            for name in ("entropy_", "jaccard_", "mass_"):
                cells += [
                    f"{row[f'{name}mean']:.4f}",
                    _interval(row[f"{name}diff_vs_baseline"], row[f"{name}ci95_low"], row[f"{name}ci95_high"]),
                ]
            lines.append("| " + " | ".join(cells) + " |")
        jaccard, mass = fixed_map_scores(data[dataset], grid_size)
        lines += [
            "",
            f"For scale: one fixed map, how often each patch holds the object in the training images, scores a "
            f"Jaccard of {jaccard:.4f} and a mass on the object of {mass:.4f} on these test images.",
            "",
        ]
    lines += ["![accuracy and paired differences](evidence.png)", ""]

    lines += [
        "## The budget search: does the baseline plateau?",
        "",
        f"The baseline at {min(args.fractions):.0%} of the data with E and 2E epochs (same seeds, same schedule "
        "shape); gain = 2E minus E, paired by seed, with its t interval:",
        "",
        "| dataset | recipe | fraction | n | E | test accuracy at E | gain at 2E [95% CI] | plateau |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in plateau:
        gain = _interval(row["gain_mean"], row["ci95_low"], row["ci95_high"])
        lines.append(
            f"| {row['dataset']} | {row['recipe']} | {row['fraction']:.0%} | {row['n']} | {row['epochs']} "
            f"| {row['accuracy_mean']:.4f} | {gain} | {'yes' if plateaued(row) else 'no'} |"
        )
    lines += [
        "",
        "The baseline's validation accuracy over training (mean over seeds), at the budget (solid) and in the "
        "search's other runs (dotted):",
        "",
        "![validation curves](plateau.png)",
        "",
    ]

    figure, axes = plt.subplots(2, len(datasets), figsize=(5.5 * len(datasets), 8), squeeze=False)
    for column, dataset in enumerate(datasets):
        for recipe in RECIPES:
            for variant in VARIANTS:
                mine = [r for r in rows if (r["dataset"], r["recipe"], r["variant"]) == (dataset, recipe, variant)]
                style = dict(marker="o", capsize=3, color=COLOURS[variant], linestyle=LINES[recipe])
                if mine:
                    axes[0, column].errorbar(
                        [r["fraction"] for r in mine], [r["accuracy_mean"] for r in mine],
                        yerr=[r["accuracy_std"] or 0 for r in mine], label=f"{variant}, {recipe}", **style,
                    )  # fmt: skip
                paired = [r for r in mine if r["ci95_low"] is not None]
                if paired:
                    diffs = np.array([r["diff_vs_baseline"] for r in paired])
                    bounds = np.array([[r["ci95_low"], r["ci95_high"]] for r in paired]).T
                    axes[1, column].errorbar(
                        [r["fraction"] for r in paired], diffs, yerr=np.abs(bounds - diffs),
                        label=f"{variant}, {recipe}", **style,
                    )  # fmt: skip
        axes[0, column].set_title(f"{dataset}: test accuracy (mean ± std)")
        axes[1, column].set_title(f"{dataset}: paired Δ accuracy vs baseline ({CONFIDENCE:.0%} CI)")
        axes[1, column].axhline(0, color="grey", linewidth=0.8)
        for axis in axes[:, column]:
            axis.set_xscale("log")
            axis.set_xticks(fractions, [f"{f:.0%}" for f in fractions])
            axis.minorticks_off()
            axis.set_xlabel("training fraction")
    save_figure(figure, axes, os.path.join(args.output, "evidence.png"))

    recipes = [recipe for recipe in RECIPES if any(row["recipe"] == recipe for row in rows)]
    figure, axes = plt.subplots(
        len(recipes), len(datasets), figsize=(5.5 * len(datasets), 4 * len(recipes)), squeeze=False
    )
    for (row, recipe), (column, dataset) in ((r, c) for r in enumerate(recipes) for c in enumerate(datasets)):
        axis = axes[row, column]
        groups = sorted(
            {(r["fraction"], r["epochs"]) for r in runs if (r["dataset"], r["recipe"]) == (dataset, recipe)}
        )
        for fraction, epochs in groups:
            curves = [r["validation_curve"] for r in baseline_runs(runs, dataset, recipe, fraction, epochs)]
            points = min((len(curve) for curve in curves), default=0)
            if points:
                mean = np.mean([[accuracy for _, accuracy in curve[:points]] for curve in curves], axis=0)
                axis.plot(
                    [epoch for epoch, _ in curves[0][:points]], mean, "-" if epochs == budget else ":",
                    marker="o", markersize=3, label=f"{fraction:.0%}, {epochs} epochs",
                )  # fmt: skip
        axis.set_title(f"{dataset}, {recipe}: baseline validation accuracy")
        axis.set_xlabel("epoch")
    save_figure(figure, axes, os.path.join(args.output, "plateau.png"))

    for dataset in datasets:
        models_dir = picture_models_dir(args, dataset, budget)
        shown = [
            (recipe, variant) for recipe in RECIPES for variant in VARIANTS
            if os.path.isdir(os.path.join(models_dir, recipe, variant))
        ]  # fmt: skip
        if not shown:
            continue
        models = {
            f"{variant}, {recipe}": sar_hf.SARViTForImageClassification.from_pretrained(
                os.path.join(models_dir, recipe, variant)
            )
            for recipe, variant in shown
        }
        processor = load_image_processor(os.path.join(models_dir, *shown[0]))
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
    args.started = time.monotonic()
    os.makedirs(args.output, exist_ok=True)

    budget_file = os.path.join(args.output, "budget.json")  # the search's choice, for --report_only
    if args.report_only:
        with open(budget_file) as f:
            budget = json.load(f)["budget_epochs"]
    else:
        with worker_pool(args) as pool:
            run = functools.partial(run_batch, args, pool=pool)
            budget = search_budget(args, run) if args.plateau_check else args.epochs
            with open(budget_file, "w") as f:
                json.dump({"budget_epochs": budget}, f)
            seeds, fractions = fit_study(args, budget, list(read_runs(runs_file(args)).values()))
            run(study_runs(args, budget, seeds, fractions))
    report(list(read_runs(runs_file(args)).values()), args, budget)


if __name__ == "__main__":
    main()
