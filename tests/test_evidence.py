"""benchmarks/evidence.py in parts: the budget search against a stubbed run function, the time plan,
the workers that share a device, the rows paired within a recipe, the mass on the object, and (with
training stood in for) the report, the runs' bookkeeping and `main`."""

import json
import os
import pathlib
import re
import time

import numpy as np
import pytest
import torch

from benchmarks import evidence

ROOT = pathlib.Path(__file__).resolve().parents[1]

SEARCH = ["--datasets", "digits", "cluttered-digits", "--recipes", "plain", "deit", "--seeds", "0", "1", "2",
          "--fractions", "0.5", "0.1", "--epochs", "2"]  # fmt: skip


def stub_run(accuracy, seconds=lambda r: 10.0):
    """A run function that "trains" every requested run at once with `accuracy(run)`, in `seconds(run)`
    (10 s each unless told), and the list of the epochs and seeds that each call asked for."""
    requested, finished = [], {}

    def run(runs):
        requested.append((sorted({r["epochs"] for r in runs}), sorted({r["seed"] for r in runs})))
        for r in runs:
            finished.setdefault(evidence.run_key(r), {**r, "test_accuracy": accuracy(r), "train_seconds": seconds(r)})
        return list(finished.values())

    return run, requested


def saturating(r):
    """Learns until 4 epochs on the plain digits, until 8 elsewhere; the seed shifts every run alike."""
    until = 4 if (r["dataset"], r["recipe"]) == ("digits", "plain") else 8
    return 0.5 * min(r["epochs"], until) / until + 0.01 * r["seed"]


def noisy_at_4(r):
    """From 2 to 4 epochs the seeds gain +0.035, -0.025 and +0.005: a mean of 0.005, within the
    limit, but with an upper bound of about 0.08 (sd 0.03, t(2 df) = 4.3); no gain after 4."""
    return 0.5 + (r["epochs"] >= 4) * [0.035, -0.025, 0.005][r["seed"]]


def gains_0015_at_2(r):
    """Doubling 2 epochs gains 0.015 in every seed (no spread: the interval is that point), then nothing."""
    return 0.5 + 0.015 * (r["epochs"] >= 4)


PLATEAU = "the baseline has plateaued at {budget} epochs"
CAP = "no plateau by {budget} epochs, the cap (--max_epochs {budget}): the budget is {budget}"


@pytest.mark.parametrize(
    "accuracy, max_epochs, requested, budget, why",
    [
        # Doubles until every dataset and recipe has plateaued (the plain digits at 4, the rest at 8).
        (saturating, 64, [[2, 4], [4, 8], [8, 16]], 8, PLATEAU),
        # The cap: the budget never exceeds --max_epochs, plateau or not.
        (saturating, 4, [[2, 4], [4, 8]], 4, CAP),
        (lambda r: 0.1 * r["epochs"], 8, [[2, 4], [4, 8], [8, 16]], 8, CAP),
        # A flat start is a plateau at once.
        (lambda r: 0.5, 64, [[2, 4]], 2, PLATEAU),
        # The upper bound counts, not only the mean.
        (noisy_at_4, 64, [[2, 4], [4, 8]], 4, PLATEAU),
        # So does the mean: 0.015 > 0.01 with a bound of 0.015 <= 0.02.
        (gains_0015_at_2, 64, [[2, 4], [4, 8]], 4, PLATEAU),
    ],
)
def test_the_budget_search_doubles_until_every_baseline_plateaus_or_the_cap(
    accuracy, max_epochs, requested, budget, why, capsys
):
    """... and its last word in the log says which of the two ended it."""
    args = evidence.parse_args([*SEARCH, "--max_epochs", str(max_epochs)])
    run, asked = stub_run(accuracy)
    assert evidence.search_budget(args, run) == budget
    assert asked == [(epochs, [0, 1, 2]) for epochs in requested]
    assert capsys.readouterr().out.splitlines()[-1] == "evidence: " + why.format(budget=budget)
    # Each round is the baseline at the smallest fraction, every dataset, recipe and seed, twice the epochs first.
    round_one = evidence.plateau_runs(args, 2, args.seeds)
    assert [r["epochs"] for r in round_one] == [4] * 12 + [2] * 12
    assert {(r["fraction"], r["variant"]) for r in round_one} == {(0.1, "baseline")}
    assert len({evidence.run_key(r) for r in round_one}) == 2 * 2 * 2 * 3


@pytest.mark.parametrize(
    "seconds, requested, budget", [(100, [[2, 4]] * 2, 2), (1e6, [[2, 4], [2, 4], [4, 8], [8, 16]], 8)]
)
def test_the_search_stops_doubling_when_the_next_round_and_the_smallest_study_would_not_fit(
    seconds, requested, budget
):
    """With a time budget the first round starts with the probe (seed 0: eight runs, one worker).
    Round one: 24 runs of 2 or 4 epochs at 10% (0.2 or 0.4 passes over the training split), 10 s
    each, so 240 s over 7.2 passes, 33 s per pass. The next round's 12 new runs of 8 epochs (0.8
    passes each) alone need 1.25 x 33 x 9.6 = 400 s on one worker: with 100 s the budget stays at 2
    epochs, not a plateau; with plenty of time the search goes on as without a time budget."""
    args = evidence.parse_args([*SEARCH, "--max_epochs", "64", "--time_budget_s", str(seconds)])
    args.started = time.monotonic()
    run, asked = stub_run(saturating)
    assert evidence.search_budget(args, run) == budget
    assert [epochs for epochs, _ in asked] == requested
    assert [seeds for _, seeds in asked] == [[0]] + [[0, 1, 2]] * (len(requested) - 1)


# One dataset, recipe and fraction (10%), seeds 0 and 1 (--min_seeds), one worker; every run takes 10 s
# per pass over the training split, so the plan counts 12.5 s per pass. After round one (2 and 4
# epochs; the probe was seed 0's) the next round and the smallest study at 4 epochs add the baseline at
# 8 epochs (2 runs of 0.8 passes: 20 s) and sar-0.1 at 4 (2 x 0.4 passes: 10 s): 30 s plus the
# longest run, 10 s, is 40 s. With 45 s that fits and the search doubles to 4 epochs, where the next
# round (16 epochs) would not; with 38 s it stays at 2. Planning 3E (70 s, or 60 s for the study
# alone) would stop at 2 with 45 s; planning E / 2 (17.5 s, or 35 s) would double with 38 s.
@pytest.mark.parametrize("seconds, requested, budget", [(45, [[2, 4], [2, 4], [4, 8]], 4), (38, [[2, 4]] * 2, 2)])
def test_the_search_doubles_exactly_while_the_next_round_and_the_smallest_study_fit(
    seconds, requested, budget, capsys
):
    args = evidence.parse_args([
        "--datasets", "digits", "--recipes", "plain", "--variants", "baseline", "sar-0.1", "--seeds", "0", "1",
        "--fractions", "0.1", "--epochs", "2", "--max_epochs", "64", "--min_seeds", "2", "--time_budget_s",
        str(seconds),
    ])  # fmt: skip
    args.started = time.monotonic()
    run, asked = stub_run(lambda r: 0.1 * r["epochs"], seconds=lambda r: 10 * evidence.training_passes(r))
    assert evidence.search_budget(args, run) == budget
    assert asked == [(requested[0], [0])] + [(epochs, [0, 1]) for epochs in requested[1:]]
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"evidence: no plateau by {budget} epochs; {2 * budget} would leave the study no time: the budget is {budget}"
    )


# The search's seeds: the probe is seed 0 (two runs, two workers), 10 s per run of 0.2 or 0.4 passes,
# 33 s per pass; a run takes 1.25 x 33 x passes: 16.7 s at 4 epochs, 8.3 s at 2. Round one for S
# seeds adds S - 1 seeds of 25 s; the smallest study at 2 epochs adds sar-0.1 for seeds 0 and 1
# (16.7 s; its baselines are round one's). Predicted wall: (25 (S - 1) + 16.7) / 2 + 16.7 s, the
# longest run: 87.5 s for 6 seeds, 75 for 5, 62.5 for 4, 50 for 3, 37.5 for 2 (--min_seeds).
@pytest.mark.parametrize(
    "seconds, seeds", [(100, [0, 1, 2, 3, 4, 5]), (80, [0, 1, 2, 3, 4]), (60, [0, 1, 2]), (30, [0, 1])]
)
def test_the_search_cuts_its_seeds_to_fit_after_the_probe(seconds, seeds):
    args = evidence.parse_args([
        "--datasets", "digits", "--recipes", "plain", "--variants", "baseline", "sar-0.1", "--seeds", "0", "1", "2",
        "3", "4", "5", "--fractions", "0.5", "0.1", "--epochs", "2", "--min_seeds", "2", "--workers", "2",
        "--time_budget_s", str(seconds),
    ])  # fmt: skip
    args.started = time.monotonic()
    run, asked = stub_run(lambda r: 0.5)  # a plateau at once
    assert evidence.search_budget(args, run) == 2
    assert asked == [([2, 4], [0]), ([2, 4], seeds)]


def test_the_predicted_wall_time_against_a_hand_computation():
    """One finished run: 10 epochs at 10% (1 pass) in 2 s. To do: 10 epochs at 50% (5 passes, listed
    twice, counted once) and at 30% (3 passes), and the finished run again (nothing): 1.25 x 2 s per
    pass gives 12.5 s and 7.5 s; on two workers (12.5 + 7.5) / 2 plus the longest, 12.5: 22.5 s."""
    args = evidence.parse_args(["--workers", "2"])
    run = {"dataset": "digits", "seed": 0, "recipe": "plain", "variant": "baseline", "epochs": 10, "batch_size": 16}
    done = {**run, "fraction": 0.1, "train_seconds": 2.0}
    half, third = {**run, "fraction": 0.5}, {**run, "fraction": 0.3}
    assert evidence.predicted_seconds(args, [half, third, half, done], [done]) == pytest.approx(22.5)


# Time plan: one finished baseline run, 10 epochs at 10% in 1 s, so 1 s per pass; the study's runs
# take 1.25 s per pass: 6.25 s at 50%, 1.25 s at 10%, two variants per seed, two workers. Predicted
# wall (sum / 2 + the longest run, 6.25 s), less the finished run (1.25 s):
#   4 seeds, both fractions: (4 x 15 - 1.25) / 2 + 6.25 = 35.6 s
#   3 seeds:                 (3 x 15 - 1.25) / 2 + 6.25 = 28.1 s
#   2 seeds (--min_seeds):   (2 x 15 - 1.25) / 2 + 6.25 = 20.6 s
#   2 seeds, 10% only:       (4 x 1.25 - 1.25) / 2 + 1.25 = 3.1 s
@pytest.mark.parametrize(
    "seconds, seeds, fractions, about",
    [
        (40, [0, 1, 2, 3], [0.1, 0.5], None),
        (30, [0, 1, 2], [0.1, 0.5], 28),
        (25, [0, 1], [0.1, 0.5], 21),
        (20, [0, 1], [0.1], 3),  # seeds go down to --min_seeds before a fraction goes
        (3, [0, 1], [], 0),
    ],
)
def test_the_time_plan_cuts_seeds_before_fractions(seconds, seeds, fractions, about, capsys):
    """The plan logs what it cut and what the rest would take (the whole design: 35.6 s); with nothing
    cut it logs nothing."""
    args = evidence.parse_args([
        "--datasets", "digits", "--recipes", "plain", "--variants", "baseline", "sar-0.1", "--seeds", "0", "1", "2",
        "3", "--fractions", "0.5", "0.1", "--min_seeds", "2", "--workers", "2", "--time_budget_s", str(seconds),
    ])  # fmt: skip
    args.started = time.monotonic()
    done = {"dataset": "digits", "fraction": 0.1, "seed": 0, "recipe": "plain", "variant": "baseline",
            "epochs": 10, "batch_size": 16, "train_seconds": 1.0}  # fmt: skip
    assert evidence.fit_study(args, 10, [done]) == (seeds, fractions)
    cut = (
        f"evidence: to fit the time left ({seconds} s), the study at 10 epochs keeps seeds {seeds} and fractions "
        f"{fractions} of [0.1, 0.5]: about {about} s (the whole design: 36 s)\n"
    )
    assert capsys.readouterr().out == ("" if about is None else cut)


def test_rows_pair_each_variant_with_its_recipes_baseline_over_the_seeds_all_variants_finished():
    """The plain baseline has seeds 0-3 (the search's), everything else seeds 0-1: every row of a cell
    is over seeds 0 and 1, and the DeiT SAR run is compared with the DeiT baseline."""
    accuracy = {("plain", "baseline"): [0.5, 0.6, 0.9, 0.9], ("plain", "sar-0.1"): [0.55, 0.7],
                ("deit", "baseline"): [0.3, 0.4], ("deit", "sar-0.1"): [0.2, 0.2]}  # fmt: skip
    runs = [
        {"dataset": "digits", "fraction": 0.1, "seed": seed, "recipe": recipe, "variant": variant, "epochs": 8,
         "batch_size": 16, "test_accuracy": value, "test_entropy": 0.1 * seed, "test_jaccard": 0.2,
         "test_mass": 0.5 + 0.1 * (variant != "baseline")}
        for (recipe, variant), values in accuracy.items()
        for seed, value in enumerate(values)
    ]  # fmt: skip
    rows = {(row["recipe"], row["variant"]): row for row in evidence.summarize(runs)}
    assert [key for key in rows] == [
        ("plain", "baseline"),
        ("plain", "sar-0.1"),
        ("deit", "baseline"),
        ("deit", "sar-0.1"),
    ]
    assert all(row["n"] == 2 for row in rows.values())
    assert rows["plain", "baseline"]["accuracy_mean"] == pytest.approx(0.55)  # not 0.725 over four seeds
    assert rows["plain", "sar-0.1"]["diff_vs_baseline"] == pytest.approx(0.075)  # (0.05 + 0.1) / 2
    assert rows["deit", "sar-0.1"]["diff_vs_baseline"] == pytest.approx(-0.15)  # (-0.1 - 0.2) / 2
    assert rows["deit", "sar-0.1"]["mass_diff_vs_baseline"] == pytest.approx(0.1)
    assert rows["deit", "baseline"]["diff_vs_baseline"] is None and rows["deit", "baseline"]["n_paired"] == 0


def test_the_mass_on_the_object_against_a_hand_made_map():
    """Softmax mass 0.4, 0.3, 0.2, 0.1 over four patches. The mean of the log scores is
    log(0.4 * 0.3 * 0.2 * 0.1) / 4 = log 0.2213, so patches 0 and 1 are above it, with mass 0.7.
    Against the object {1, 2}: 0.3 of that 0.7 is on it, 3/7 (the whole map puts 0.5 there);
    the object {0, 1} holds all of it, {2, 3} none."""
    scores = torch.tensor([0.4, 0.3, 0.2, 0.1]).log()[None, None]  # [B=1, heads=1, n=4]
    object_12 = torch.tensor([[False, True, True, False]])
    assert evidence.mass_on_object(scores, object_12).item() == pytest.approx(3 / 7)
    assert evidence.mass_on_object(scores, torch.tensor([[True, True, False, False]])).item() == pytest.approx(1)
    assert evidence.mass_on_object(scores, torch.tensor([[False, False, True, True]])).item() == 0
    # A constant map has no patch above its mean: 0, not the object's share of the patches.
    assert evidence.mass_on_object(torch.zeros(1, 1, 4), object_12).item() == 0
    # One value per image and head, each against its own image's object: the map reversed puts
    # 0.4 + 0.3 above the mean on patches 3 and 2.
    maps = torch.stack([scores[0, 0], scores[0, 0].flip(-1)])[None].expand(2, 2, 4)
    objects = torch.tensor([[True, True, False, False], [False, True, True, False]])
    expected = torch.tensor([[1.0, 0.0], [3 / 7, 3 / 7]])
    torch.testing.assert_close(evidence.mass_on_object(maps, objects), expected)


@pytest.mark.slow
def test_two_workers_on_the_cpu_share_the_runs_through_their_claims(tmp_path, monkeypatch):
    """Two runs, two worker processes: each run is trained and recorded once, by the workers (this
    process trains nothing: its train_one would fail), and a second call finds them all done."""

    def not_here(*args, **kwargs):
        raise AssertionError("the parent process trained a run")

    monkeypatch.setattr(evidence, "train_one", not_here)
    args = evidence.parse_args([
        "--device", "cpu", "--workers", "2", "--datasets", "digits", "--recipes", "plain", "--variants", "baseline",
        "--seeds", "0", "1", "--fractions", "0.05", "--model_preset", "tiny", "--output", str(tmp_path),
    ])  # fmt: skip
    runs = evidence.study_runs(args, 1, args.seeds, args.fractions)
    with evidence.worker_pool(args) as pool:
        finished = evidence.run_batch(args, runs, pool)
        assert len(evidence.run_batch(args, runs, pool)) == 2  # all done: nothing runs again
    assert sorted(evidence.run_key(r) for r in finished) == sorted(evidence.run_key(r) for r in runs)
    lines = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert sorted(line["seed"] for line in lines) == [0, 1]
    assert len(list((tmp_path / "claims").iterdir())) == 2
    for line in lines:
        assert 0 <= line["test_accuracy"] <= 1 and 0 <= line["test_mass"] <= 1 and line["test_entropy"] >= 0
        assert line["validation_curve"][-1][0] == pytest.approx(1)


def test_the_study_runs_each_run_once_seed_by_seed_the_largest_fraction_first():
    args = evidence.parse_args([*SEARCH, "--variants", "baseline", "sar-0.1"])
    runs = evidence.study_runs(args, 8, [0, 1], [0.1, 0.5])
    assert len({evidence.run_key(r) for r in runs}) == len(runs) == 2 * 2 * 2 * 2 * 2
    assert [(r["seed"], r["fraction"]) for r in runs[::8]] == [(0, 0.5), (0, 0.1), (1, 0.5), (1, 0.1)]
    assert {r["epochs"] for r in runs} == {8}


def test_each_run_trains_with_its_own_seed_and_settings(tmp_path, monkeypatch):
    """A run's seed is the training script's `--seed`: the script draws the data subset and the
    initialisation from it, so the paired intervals over seeds measure that variation only if each
    run trains with its own seed (with one seed for all, every seed's model would be the same and the
    intervals a sham). The script is stubbed by one that parses the flags as `sar-hf train` does,
    builds the `tiny` preset as it does (`set_seed`, then `build_model`) and saves it untrained; the
    workers then score those models (on 16 test digits) as they score trained ones."""
    from transformers import set_seed

    from sar_hf.scripts.arguments import parse_args
    from sar_hf.scripts.utils import build_model

    trained = []

    def train(flags):
        model_args, data_args, sar_args, recipe_args, training_args = parse_args(flags)
        trained.append((
            data_args.dataset_name, data_args.train_fraction, training_args.seed, training_args.num_train_epochs,
            training_args.per_device_train_batch_size, sar_args.sar_weight, recipe_args.recipe,
        ))  # fmt: skip
        set_seed(training_args.seed)
        model, processor = build_model(model_args, sar_args, [str(digit) for digit in range(10)])
        model.save_pretrained(training_args.output_dir)
        processor.save_pretrained(training_args.output_dir)
        history = {"log_history": [{"epoch": training_args.num_train_epochs, "eval_accuracy": 0.1}]}
        (pathlib.Path(training_args.output_dir) / "trainer_state.json").write_text(json.dumps(history))
        return {"test_accuracy": 0.1}

    monkeypatch.setattr(evidence, "train_main", train)
    name, build = evidence.BUNDLED_DATASETS["digits"]
    test = build()["test"].select(range(16))  # scored on 16 test digits, not 360
    monkeypatch.setitem(evidence.BUNDLED_DATASETS, "digits", (name, lambda: {"test": test}))
    args = evidence.parse_args([
        "--datasets", "digits", "--recipes", "plain", "deit", "--variants", "baseline", "sar-0.1", "--seeds", "3",
        "4", "--fractions", "0.1", "--batch_size", "8", "--model_preset", "tiny", "--output", str(tmp_path),
    ])  # fmt: skip
    runs = evidence.study_runs(args, 3, args.seeds, args.fractions)
    evidence.work(args, runs)
    weight, recipe = {"baseline": 0.0, "sar-0.1": 0.1}, {"plain": None, "deit": "deit"}
    assert trained == [
        (r["dataset"], r["fraction"], r["seed"], r["epochs"], r["batch_size"], weight[r["variant"]],
         recipe[r["recipe"]])
        for r in runs
    ]  # fmt: skip
    assert sorted({seed for _, _, seed, *_ in trained}) == [3, 4]
    # What the tables show: within a seed every recipe and variant starts from the same model (paired);
    # the two seeds' models differ.
    entropy = {}
    for line in (tmp_path / "runs.jsonl").read_text().splitlines():
        record = json.loads(line)
        entropy.setdefault(record["seed"], set()).add(record["test_entropy"])
    assert len(entropy[3]) == len(entropy[4]) == 1 and entropy[3] != entropy[4]


def test_the_paired_interval_is_scipys_paired_t_interval_not_an_unpaired_one():
    """Baselines spread widely over the seeds (0.5 to 0.9) and each SAR run lies 0.02 or 0.03 above
    its own seed's baseline. Paired, the gain is clearly positive; unpaired (Welch's interval on the
    two samples) the spread between seeds swamps it and the interval holds 0, so an unpaired
    interval would report no effect where there is one. The reference is scipy's paired t test."""
    from scipy import stats

    baseline = [0.5, 0.6, 0.7, 0.8, 0.9]
    values = [0.53, 0.62, 0.73, 0.82, 0.93]
    for confidence in (0.95, 0.8):
        mean, low, high = evidence.paired_interval(values, baseline, confidence)
        reference = stats.ttest_rel(values, baseline).confidence_interval(confidence)
        assert mean == pytest.approx(0.026)
        assert (low, high) == pytest.approx((reference.low, reference.high), rel=1e-9)
        assert low > 0
        unpaired = stats.ttest_ind(values, baseline, equal_var=False).confidence_interval(confidence)
        assert unpaired.low < 0 < unpaired.high  # the example tells the two apart
    # The rows of the tables pair the same way, by seed (the runs listed in another order).
    runs = [
        {"dataset": "digits", "fraction": 0.1, "seed": seed, "recipe": "plain", "variant": variant, "epochs": 8,
         "batch_size": 16, "test_accuracy": accuracy[seed], "test_entropy": 1.0, "test_jaccard": 0.2, "test_mass": 0.5}
        for variant, accuracy in (("sar-0.1", values), ("baseline", baseline))
        for seed in (4, 2, 0, 3, 1)
    ]  # fmt: skip
    row = next(row for row in evidence.summarize(runs) if row["variant"] == "sar-0.1")
    reference = stats.ttest_rel(values, baseline).confidence_interval(0.95)
    assert (row["ci95_low"], row["ci95_high"]) == pytest.approx((reference.low, reference.high), rel=1e-9)


def test_the_fixed_map_is_learnt_from_the_training_masks_and_scored_on_the_test_masks():
    """8x8 images on a 4x4 grid (2x2 pixels a patch). Training objects: three in patch 0, one in
    patch 15, so the fixed map is 0.75 on patch 0, 0.25 on patch 15 and (almost) 0 elsewhere; keeping
    60% of its mass keeps patch 0 alone, and its above-mean patches are 0 and 15. Test objects:
    {15} (Jaccard 0, mass on the object 0.25) and {0, 15} (Jaccard 1/2, mass 1): means 0.25 and
    0.625. A map learnt from the test masks (0.5 on patch 0, 1 on patch 15) would score 0.75 and
    5/6: it knows where the test objects lie."""
    import datasets
    from PIL import Image

    def images(*inked):
        split = []
        for pixels in inked:
            image = Image.new("L", (8, 8))
            for pixel in pixels:
                image.putpixel(pixel, 255)
            split.append(image)
        return datasets.Dataset.from_dict({"image": split}, features=datasets.Features({"image": datasets.Image()}))

    corner, far_corner = (0, 0), (7, 7)
    data = datasets.DatasetDict({
        "train": images([corner], [corner], [far_corner], [corner]),
        "test": images([far_corner], [corner, far_corner]),
    })  # fmt: skip
    assert evidence.fixed_map_scores(data, (4, 4)) == pytest.approx((0.25, 0.625))


def image_split(columns):
    """A split with an Image column per entry of `columns` (name -> list of PIL images)."""
    import datasets

    features = datasets.Features({name: datasets.Image() for name in columns})
    return datasets.Dataset.from_dict(columns, features=features)


def test_object_masks_are_any_ink_of_an_image_in_any_mode_or_the_mask_column():
    """4x4 images. The faintest ink (grey level 1) is ink; a colour image's red pixel is ink too, and
    its mask is [H, W] like the others. Where a split has a `mask` column (the cluttered digits) the
    object is the mask, not the image: the clutter fills the whole canvas, the digit one pixel."""
    from PIL import Image

    faint, red = Image.new("L", (4, 4)), Image.new("RGB", (4, 4))
    faint.putpixel((1, 2), 1)  # (x, y): row 2, column 1
    red.putpixel((3, 0), (255, 0, 0))
    expected = torch.zeros(2, 4, 4, dtype=torch.bool)
    expected[0, 2, 1] = expected[1, 0, 3] = True
    assert torch.equal(evidence.object_masks(image_split({"image": [faint, red]})), expected)

    clutter, digit = Image.new("L", (4, 4), 200), Image.new("L", (4, 4))
    digit.putpixel((1, 2), 255)
    assert torch.equal(evidence.object_masks(image_split({"image": [clutter], "mask": [digit]})), expected[:1])


def test_the_jaccard_keeps_the_fewest_patches_that_hold_60_percent():
    """A map of masses 0.6 and 0.4 (exact in float32): the first patch alone holds 60%, so it alone is
    kept, and against an object that is that patch the Jaccard index is 1, not 1/2. Five equal patches
    (0.2 each): three hold 60%, so against an object of all five the index is 3/5, not 4/5."""
    peaked = torch.tensor([0.6, 0.4]).log()[None, None]
    assert evidence.attention_jaccard(peaked, torch.tensor([[True, False]])).item() == 1
    assert evidence.attention_jaccard(peaked, torch.tensor([[False, True]])).item() == 0
    flat = torch.zeros(1, 1, 5)
    assert evidence.attention_jaccard(flat, torch.ones(1, 5, dtype=torch.bool)).item() == pytest.approx(3 / 5)


def test_each_maps_above_mean_patches_are_its_own_whatever_else_is_in_the_batch():
    """Adding a constant to a map's scores leaves its softmax, and so its mass on the object, as it
    was: a map shifted up by 10 beside the same map unshifted still scores 3/7 against the object
    {1, 2} (see above), as it does alone. A mean over the whole batch would put every patch of the
    shifted map above it (mass 0.5) and none of the other (0)."""
    scores = torch.tensor([0.4, 0.3, 0.2, 0.1]).log()
    maps = torch.stack([scores, scores + 10])[:, None]  # [B=2, heads=1, n=4]
    objects = torch.tensor([[False, True, True, False]]).expand(2, 4)
    torch.testing.assert_close(evidence.mass_on_object(maps, objects), torch.full((2, 1), 3 / 7))


def test_two_pairs_already_give_scipys_interval():
    """Two seeds are the fewest with a t interval (1 degree of freedom): differences 0.1 and 0.3, mean
    0.2, sd 0.1414, t(0.975, 1) = 12.71, so 0.2 ± 1.271; scipy's paired t test gives the same."""
    from scipy import stats

    mean, low, high = evidence.paired_interval([0.6, 0.8], [0.5, 0.5])
    reference = stats.ttest_rel([0.6, 0.8], [0.5, 0.5]).confidence_interval(0.95)
    assert (mean, low, high) == pytest.approx((0.2, reference.low, reference.high), rel=1e-9)
    assert (low, high) == pytest.approx((0.2 - 1.2706, 0.2 + 1.2706), abs=1e-4)


def test_a_finished_plan_fits_when_the_time_is_up():
    """Runs that are all finished take no time: a resumed study past its time budget (0 s left) still
    fits its search round and its study as planned, rather than cutting seeds it has already run."""
    args = evidence.parse_args(["--workers", "2", "--time_budget_s", "10"])
    args.started = time.monotonic() - 60  # the budget ran out 50 s ago
    assert evidence.seconds_left(args) == 0
    done = {"dataset": "digits", "fraction": 0.1, "seed": 0, "recipe": "plain", "variant": "baseline", "epochs": 10,
            "batch_size": 16, "train_seconds": 2.0}  # fmt: skip
    assert evidence.predicted_seconds(args, [done], [done]) == 0
    assert evidence.fits(args, [done], [done])
    assert not evidence.fits(args, [{**done, "seed": 1}], [done])


def test_the_plateau_rows_pair_the_seeds_that_ran_both_budgets():
    """At 4 epochs the baseline has seeds 0-3 (the study's, at the budget) and seed 9 (another
    invocation's, not asked for); at 8 epochs seeds 0 and 1 (the search's) and 9. The row pairs seeds
    0 and 1 alone: gains 0.1 and 0.3, mean 0.2, scipy's paired interval; accuracy at 4 epochs 0.45."""
    from scipy import stats

    args = evidence.parse_args(["--datasets", "digits", "--recipes", "plain", "--seeds", "0", "1", "2", "3",
                                "--fractions", "0.5", "0.1"])  # fmt: skip
    accuracy = {(4, 0): 0.4, (4, 1): 0.5, (4, 2): 0.9, (4, 3): 0.9, (4, 9): 0.0, (8, 0): 0.5, (8, 1): 0.8, (8, 9): 1.0}
    runs = [
        {"dataset": "digits", "fraction": 0.1, "seed": seed, "recipe": "plain", "variant": "baseline",
         "epochs": epochs, "batch_size": 16, "test_accuracy": value}
        for (epochs, seed), value in accuracy.items()
    ]  # fmt: skip
    runs += [{**runs[0], "fraction": 0.5}, {**runs[0], "variant": "sar-0.1"}, {**runs[0], "recipe": "deit"}]
    (row,) = evidence.plateau_rows(runs, args, 4)
    reference = stats.ttest_rel([0.5, 0.8], [0.4, 0.5]).confidence_interval(0.95)
    assert row == pytest.approx({
        "dataset": "digits", "recipe": "plain", "fraction": 0.1, "n": 2, "epochs": 4, "accuracy_mean": 0.45,
        "gain_mean": 0.2, "ci95_low": reference.low, "ci95_high": reference.high,
    })  # fmt: skip
    assert evidence.plateau_rows(runs, args, 8) == []  # no run at 16 epochs


@pytest.mark.parametrize(
    "gain, high, plateaued",
    [(0.01, 0.02, True), (-0.05, 0.0, True), (0.0101, 0.015, False), (0.005, 0.0201, False), (0.0, None, False)],
)
def test_a_plateau_is_a_mean_gain_of_at_most_001_with_an_upper_bound_of_at_most_002(gain, high, plateaued):
    """As the report states it: mean ≤ 0.01 and upper bound ≤ 0.02 (both limits included); a gain
    without an interval (one seed) is no evidence of a plateau."""
    assert evidence.plateaued({"gain_mean": gain, "ci95_low": None, "ci95_high": high}) is plateaued


def test_the_report_cells_of_a_difference_and_its_interval():
    """A baseline's row has no difference (a dash); a difference over one seed has no interval; else
    the signed difference with its bounds, four decimals each."""
    assert evidence._interval(None, None, None) == "—"
    assert evidence._interval(0.1, None, None) == "+0.1000"
    assert evidence._interval(-0.02, -0.05, 0.25) == "-0.0200 [-0.0500, +0.2500]"


def test_the_rows_hold_every_metrics_mean_and_a_one_seed_cell_has_no_interval():
    """Plain recipe at 10%: the baseline finished seed 0 and sar-0.1 seed 1 only, so no seed is paired
    and the cell has no rows (the DeiT rows after it still come). At 50%, one seed (0) for both plain
    variants: the means are that seed's values, the difference is one number and its interval and
    the standard deviation are None (JSON has no NaN). DeiT at 10%: two seeds, paired, with the
    means of every metric over them."""
    metrics = {"test_entropy": 1.0, "test_jaccard": 0.2, "test_mass": 0.5}
    run = {"dataset": "digits", "epochs": 8, "batch_size": 16}
    runs = [
        {**run, "fraction": 0.1, "recipe": "plain", "variant": "baseline", "seed": 0, "test_accuracy": 0.5, **metrics},
        {**run, "fraction": 0.1, "recipe": "plain", "variant": "sar-0.1", "seed": 1, "test_accuracy": 0.6, **metrics},
        {**run, "fraction": 0.5, "recipe": "plain", "variant": "baseline", "seed": 0, "test_accuracy": 0.7, **metrics},
        {**run, "fraction": 0.5, "recipe": "plain", "variant": "sar-0.1", "seed": 0, "test_accuracy": 0.75,
         "test_entropy": 0.5, "test_jaccard": 0.4, "test_mass": 0.75},
    ]  # fmt: skip
    for seed, values in ((0, (0.3, 2.0, 0.1, 0.4)), (1, (0.5, 3.0, 0.3, 0.6))):
        for variant, shift in (("baseline", 0.0), ("sar-0.1", 0.1)):
            accuracy, entropy, jaccard, mass = (value + shift for value in values)
            runs.append({**run, "fraction": 0.1, "recipe": "deit", "variant": variant, "seed": seed,
                         "test_accuracy": accuracy, "test_entropy": entropy, "test_jaccard": jaccard,
                         "test_mass": mass})  # fmt: skip
    rows = {(row["fraction"], row["recipe"], row["variant"]): row for row in evidence.summarize(runs)}
    assert list(rows) == [(0.1, "deit", "baseline"), (0.1, "deit", "sar-0.1"), (0.5, "plain", "baseline"),
                          (0.5, "plain", "sar-0.1")]  # fmt: skip
    one = rows[0.5, "plain", "sar-0.1"]
    assert (one["n"], one["n_paired"], one["accuracy_mean"], one["accuracy_std"]) == (1, 1, 0.75, None)
    assert (one["entropy_mean"], one["jaccard_mean"], one["mass_mean"]) == (0.5, 0.4, 0.75)
    assert one["diff_vs_baseline"] == pytest.approx(0.05) and one["ci95_low"] is None and one["ci95_high"] is None
    assert one["entropy_diff_vs_baseline"] == pytest.approx(-0.5) and one["mass_diff_vs_baseline"] == 0.25
    json.dumps(list(rows.values()), allow_nan=False)  # strict JSON, as summary.json is written
    deit = rows[0.1, "deit", "sar-0.1"]
    assert (deit["n"], deit["n_paired"]) == (2, 2)
    assert [deit[key] for key in ("accuracy_mean", "entropy_mean", "jaccard_mean", "mass_mean")] == pytest.approx(
        [0.5, 2.6, 0.3, 0.6]
    )
    assert deit["accuracy_std"] == pytest.approx(0.1 * 2**0.5)  # the sample sd (ddof 1) of 0.4 and 0.6
    for name in ("", "entropy_", "jaccard_", "mass_"):  # every seed gains 0.1 on every metric: sd 0
        assert deit[f"{name}diff_vs_baseline"] == pytest.approx(0.1)
        assert deit[f"{name}ci95_low"] == pytest.approx(0.1) and deit[f"{name}ci95_high"] == pytest.approx(0.1)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), None])
def test_a_value_that_is_not_finite_is_written_as_none(value):
    assert evidence._finite(value) is None


def test_a_finite_value_is_written_as_a_python_float():
    import numpy as np

    assert evidence._finite(np.float32(0.25)) == 0.25 and type(evidence._finite(np.float32(0.25))) is float


# The report, the runs' bookkeeping and `main`, in process: training, the models and the attention
# pictures are stood in for, so that every number the report shows follows from hand-made runs.


def inked(*objects, size=8):
    """An Image split of `size`-pixel grey images, each inked at its list of (x, y) pixels."""
    from PIL import Image

    split = []
    for pixels in objects:
        image = Image.new("L", (size, size))
        for pixel in pixels:
            image.putpixel(pixel, 255)
        split.append(image)
    return image_split({"image": split})


CORNER, FAR = (0, 0), (7, 7)  # patches 0 and 15 of the tiny preset's 4x4 grid (2x2 pixels a patch on 8x8)


def bundled(monkeypatch):
    """Small stand-ins for the two bundled datasets. On the 4x4 grid: the digits' training objects are
    three in patch 0 and one in patch 15, so one fixed map keeps patch 0 alone (60% of its mass) and
    has patches 0 and 15 above its mean, 0.75 and 0.25 of its mass; its test objects {15}, {0, 15}, {0}
    score Jaccard 0, 1/2, 1 (mean 0.5) and mass on the object 0.25, 1, 0.75 (mean 2/3). The cluttered
    digits' training objects are three in patch 15 and one in patch 0 (the map keeps patch 15, mass
    0.75 there); the test objects {15}, {15}, {0} score 1, 1, 0 (2/3) and 0.75, 0.75, 0.25 (7/12)."""
    import datasets

    data = {
        "digits": datasets.DatasetDict({
            "train": inked([CORNER], [CORNER], [FAR], [CORNER]), "test": inked([FAR], [CORNER, FAR], [CORNER]),
        }),
        "cluttered-digits": datasets.DatasetDict({
            "train": inked([FAR], [FAR], [CORNER], [FAR]), "test": inked([FAR], [FAR], [CORNER]),
        }),
    }  # fmt: skip
    built = []
    for name, dataset in data.items():

        def build(name=name, dataset=dataset):
            built.append(name)
            return dataset

        monkeypatch.setitem(evidence.BUNDLED_DATASETS, name, (evidence.BUNDLED_DATASETS[name][0], build))
    return data, built


class FakeModel:
    """A "trained model" that knows the folder it was loaded from (where `train_one`'s stand-in wrote
    the run's key); saving it copies that key."""

    def __init__(self, folder):
        self.key = json.loads((pathlib.Path(folder) / "key.json").read_text())
        self.device = None

    @classmethod
    def from_pretrained(cls, folder):
        return cls(folder)

    def to(self, device):
        self.device = device
        return self

    def save_pretrained(self, folder):
        pathlib.Path(folder).mkdir(parents=True, exist_ok=True)
        (pathlib.Path(folder) / "key.json").write_text(json.dumps(self.key))


class FakeProcessor:
    def __init__(self, folder):
        self.folder = folder

    def save_pretrained(self, folder):
        pathlib.Path(folder).mkdir(parents=True, exist_ok=True)
        (pathlib.Path(folder) / "processor.json").write_text("{}")


def stand_ins(monkeypatch, accuracy, seconds=lambda key: 10.0):
    """`train_one`, the model, its processor, its attention metrics and the attention pictures, stood
    in for: a run "trains" in no time to `accuracy(key)` with `seconds(key)` of training, and its
    metrics are fixed by its key. Returns the keys trained, in order, and the pictures drawn."""
    import types

    trained, pictures = [], []

    def train_one(key, output_dir, args):
        trained.append(dict(key))
        (pathlib.Path(output_dir) / "key.json").write_text(json.dumps(key))
        return {"train_seconds": seconds(key), "test_accuracy": accuracy(key),
                "validation_curve": [[key["epochs"], accuracy(key)]]}  # fmt: skip

    def attention_metrics(model, processor, test):
        assert model.device == "cpu" and len(test) == 3
        return {"test_entropy": 1.0 + 0.1 * model.key["seed"], "test_jaccard": 0.5, "test_mass": 0.5}

    def save_attention_figure(models, images, processor, path):
        pictures.append(({name: model.key for name, model in models.items()}, images, processor.folder, path))

    monkeypatch.setattr(evidence, "train_one", train_one)
    monkeypatch.setattr(evidence, "attention_metrics", attention_metrics)
    monkeypatch.setattr(evidence, "sar_hf", types.SimpleNamespace(SARViTForImageClassification=FakeModel))
    monkeypatch.setattr(evidence, "load_image_processor", FakeProcessor)
    monkeypatch.setattr(evidence, "save_attention_figure", save_attention_figure)
    return trained, pictures


def test_a_runs_key_and_the_files_of_an_output_folder(tmp_path):
    args = evidence.parse_args(["--output", str(tmp_path)])
    run = {"seed": 3, "dataset": "digits", "variant": "sar-0.1", "fraction": 0.2, "recipe": "deit", "epochs": 8,
           "batch_size": 16, "test_accuracy": 0.5}  # fmt: skip
    key = ("digits", 0.2, 3, "deit", "sar-0.1", 8, 16)
    assert evidence.run_key(run) == key
    assert evidence.runs_file(args) == str(tmp_path / "runs.jsonl")
    assert evidence.claim_file(str(tmp_path), key) == str(tmp_path / "claims" / "digits_0.2_3_deit_sar-0.1_8_16")
    assert evidence.read_runs(evidence.runs_file(args)) == {}  # nothing yet
    lines = [run, {**run, "seed": 4}, {**run, "test_accuracy": 0.7}]  # a run written again: the last one counts
    (tmp_path / "runs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert evidence.read_runs(evidence.runs_file(args)) == {key: lines[2], (*key[:2], 4, *key[3:]): lines[1]}


def test_a_run_is_claimed_once_whoever_asks(tmp_path):
    key = ("digits", 0.1, 0, "plain", "baseline", 4, 8)
    assert evidence.claim(str(tmp_path), key)
    assert (tmp_path / "claims" / "digits_0.1_0_plain_baseline_4_8").is_file()
    assert not evidence.claim(str(tmp_path), key)  # another worker, or another invocation
    assert evidence.claim(str(tmp_path), (*key[:2], 1, *key[3:]))
    assert sorted(path.name for path in (tmp_path / "claims").iterdir()) == [
        "digits_0.1_0_plain_baseline_4_8", "digits_0.1_1_plain_baseline_4_8",
    ]  # fmt: skip


def test_the_log_prefixes_every_line_and_flushes_it(monkeypatch):
    """Flushed at once: a study stopped by its time limit (run_evidence_gpu.sh's `timeout`) keeps its log."""
    import io

    class Stream(io.StringIO):
        flushed = []

        def flush(self):
            self.flushed.append(self.getvalue())

    monkeypatch.setattr("sys.stdout", Stream())
    evidence.log("a message")
    assert Stream.flushed == ["evidence: a message\n"]


def test_the_picture_models_of_a_dataset_lie_under_the_output(tmp_path):
    args = evidence.parse_args([
        "--fractions", "0.5", "0.2", "0.3", "--picture_seed", "7", "--batch_size", "12", "--output", str(tmp_path),
    ])  # fmt: skip
    assert evidence.picture_models_dir(args, "cluttered-digits", 40) == str(
        tmp_path / "models" / "cluttered-digits_0.2_seed7_40ep_batch12"
    )


def test_one_worker_is_this_process_and_more_are_spawned_processes_of_one_thread(monkeypatch):
    """Spawned, not forked (a forked child cannot use CUDA), each set to one torch thread."""
    made = []

    class Executor:
        def __init__(self, *args, **kwargs):
            made.append((args, kwargs))

    monkeypatch.setattr(evidence, "ProcessPoolExecutor", Executor)
    with evidence.worker_pool(evidence.parse_args([])) as pool:
        assert pool is None and made == []
    assert isinstance(evidence.worker_pool(evidence.parse_args(["--workers", "3"])), Executor)
    ((args, kwargs),) = made
    assert args == (3,) and kwargs["initializer"] is torch.set_num_threads and kwargs["initargs"] == (1,)
    assert kwargs["mp_context"].get_start_method() == "spawn"


def batch_args(tmp_path, *extra):
    return evidence.parse_args([
        "--datasets", "digits", "--recipes", "plain", "--variants", "baseline", "sar-0.1", "--seeds", "0", "1",
        "--fractions", "0.5", "0.1", "--batch_size", "8", "--picture_seed", "1", "--output", str(tmp_path), *extra,
    ])  # fmt: skip


def records(tmp_path):
    return [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]


def test_a_worker_trains_each_unclaimed_run_once_and_keeps_the_picture_seeds_smallest_fraction(
    tmp_path, monkeypatch, capsys
):
    """Eight runs: one already finished, one claimed by another process, the other six trained in order,
    each appended with its key, its training results and its metrics, and logged. The test split is
    built once. The picture seed's (1) runs at the smallest fraction (10%) are kept, one folder per
    recipe and variant."""
    _, built = bundled(monkeypatch)
    trained, _ = stand_ins(monkeypatch, accuracy=lambda key: 0.25 * (1 + key["seed"]) + key["fraction"])
    args = batch_args(tmp_path)
    runs = evidence.study_runs(args, 4, args.seeds, args.fractions)
    done = {**runs[0], "test_accuracy": 0.9}
    (tmp_path / "runs.jsonl").write_text(json.dumps(done) + "\n")
    assert evidence.claim(str(tmp_path), evidence.run_key(runs[5]))
    evidence.work(args, runs)
    assert trained == [runs[i] for i in (1, 2, 3, 4, 6, 7)]
    assert built == ["digits"]
    expected = [done] + [
        {**run, "train_seconds": 10.0, "test_accuracy": 0.25 * (1 + run["seed"]) + run["fraction"],
         "validation_curve": [[4, 0.25 * (1 + run["seed"]) + run["fraction"]]],
         "test_entropy": 1.0 + 0.1 * run["seed"], "test_jaccard": 0.5, "test_mass": 0.5}
        for run in trained
    ]  # fmt: skip
    assert records(tmp_path) == expected
    out = capsys.readouterr().out.splitlines()
    assert out == [
        f"evidence: {evidence.run_key(run)}: test accuracy {record['test_accuracy']:.4f}, 10 s"
        for run, record in zip(trained, expected[1:], strict=True)
    ]
    kept = tmp_path / "models" / "digits_0.1_seed1_4ep_batch8"
    assert sorted(str(path.relative_to(kept)) for path in kept.glob("*/*/*.json")) == [
        "plain/baseline/key.json", "plain/baseline/processor.json",
        "plain/sar-0.1/key.json", "plain/sar-0.1/processor.json",
    ]  # fmt: skip
    for variant in ("baseline", "sar-0.1"):
        key = json.loads((kept / "plain" / variant / "key.json").read_text())
        assert (key["seed"], key["fraction"], key["variant"]) == (1, 0.1, variant)
    assert [path.name for path in (tmp_path / "models").iterdir()] == [kept.name]


class SerialPool:
    """A pool whose workers run one after the other in this process."""

    def __init__(self):
        self.calls = []

    def map(self, function, *iterables):
        self.calls.append((function, *iterables))
        return map(function, *iterables)


def test_a_batch_runs_what_is_not_finished_on_every_worker_and_returns_every_finished_run(tmp_path, monkeypatch):
    """Two workers take the pending runs (those not finished before) from one list, claiming each: every
    run trains once. The batch returns every finished run, also one that it was not asked for, in the
    order they finished; asked again it trains nothing."""
    bundled(monkeypatch)
    trained, _ = stand_ins(monkeypatch, accuracy=lambda key: 0.5)
    args = batch_args(tmp_path, "--workers", "2")
    runs = evidence.study_runs(args, 4, args.seeds, args.fractions)
    other = {**runs[0], "epochs": 2, "test_accuracy": 0.1}
    done = {**runs[2], "test_accuracy": 0.9}
    (tmp_path / "runs.jsonl").write_text(json.dumps(other) + "\n" + json.dumps(done) + "\n")
    pool = SerialPool()
    finished = evidence.run_batch(args, runs, pool)
    pending = [run for run in runs if run != runs[2]]
    assert pool.calls == [(evidence.work, [args, args], [pending, pending])]
    assert trained == pending
    assert finished == records(tmp_path) and finished[:2] == [other, done]
    assert [evidence.run_key(r) for r in finished[2:]] == [evidence.run_key(r) for r in pending]
    assert evidence.run_batch(args, runs, pool) == finished
    assert len(pool.calls) == 1 and len(trained) == len(pending)  # nothing was pending: no worker started


def test_one_worker_runs_the_batch_in_this_process(tmp_path, monkeypatch):
    bundled(monkeypatch)
    trained, _ = stand_ins(monkeypatch, accuracy=lambda key: 0.5)
    args = batch_args(tmp_path)
    runs = evidence.study_runs(args, 4, [0], [0.1])
    assert [evidence.run_key(r) for r in evidence.run_batch(args, runs)] == [evidence.run_key(r) for r in runs]
    assert trained == runs


def test_a_batch_waits_for_the_runs_another_process_claimed(tmp_path, monkeypatch, capsys):
    """A run claimed by another invocation is not trained here: the batch waits 30 s at a time until
    it appears in runs.jsonl. A run that nobody claimed after the workers finished is a bug: an error
    that names it."""
    import types

    bundled(monkeypatch)
    trained, _ = stand_ins(monkeypatch, accuracy=lambda key: 0.5)
    args = batch_args(tmp_path)
    runs = evidence.study_runs(args, 4, [0], [0.1])
    assert evidence.claim(args.output, evidence.run_key(runs[1]))
    slept = []

    def sleep(seconds):  # the other process finishes its run during the second wait
        slept.append(seconds)
        if len(slept) == 2:
            with open(tmp_path / "runs.jsonl", "a") as f:
                f.write(json.dumps({**runs[1], "test_accuracy": 0.2}) + "\n")

    monkeypatch.setattr(evidence, "time", types.SimpleNamespace(sleep=sleep, perf_counter=time.perf_counter))
    finished = evidence.run_batch(args, runs)
    assert trained == runs[:1] and slept == [30, 30]
    assert [r["test_accuracy"] for r in finished] == [0.5, 0.2]
    waiting = f"evidence: waiting for 1 runs claimed by another process (delete {tmp_path}/claims if none runs)"
    assert capsys.readouterr().out.splitlines()[-2:] == [waiting, waiting]

    monkeypatch.setattr(evidence, "work", lambda args, runs: None)  # a worker that skips a run
    lost = {**runs[0], "seed": 5}
    with pytest.raises(RuntimeError, match=f"^no worker claimed {re.escape(str([evidence.run_key(lost)]))}$"):
        evidence.run_batch(args, [*runs, lost])


REPORT = ["--datasets", "digits", "cluttered-digits", "--recipes", "plain", "deit", "--variants", "baseline",
          "sar-0.1", "--seeds", "0", "1", "2", "--fractions", "0.5", "0.1", "--epochs", "2", "--max_epochs", "8",
          "--batch_size", "8", "--model_preset", "tiny", "--picture_seed", "1"]  # fmt: skip
METRIC_NAMES = ("test_accuracy", "test_entropy", "test_jaccard", "test_mass")
PAIRS = (("digits", "plain"), ("digits", "deit"), ("cluttered-digits", "plain"), ("cluttered-digits", "deit"))


def report_study():
    """A finished study at 4 epochs, batch 8, and the search that chose it (from E = 2).

    The search: the baseline at 10%, seeds 0-2, at 2, 4 and 8 epochs (60 s, 36 s and 120 s each); doubling
    2 gains 0.1, 0.12, 0.08 (no plateau), doubling 4 gains 0.004, 0.009, -0.001 (mean 0.004, sd 0.005,
    upper bound 0.004 + 4.303 x 0.005 / √3 = 0.0164: a plateau, on every dataset and recipe). Seeds 0 and 1
    of the plain digits also ran 16 epochs (240 s each; seed 1's validation curve has one point).
    The study (36 s a run): every cell has the same seeds for each of its variants: 3 at 10%, 2 for
    the plain digits at 50%, 1 for the plain cluttered digits at 50%; the cluttered digits' DeiT cell
    has its baseline only. Not in the study: a SAR run at 8 epochs (24 s), and a run at batch 16.
    Batch 8: 54 runs, 3636 s (61 min); 27 at the budget, 972 s (16 min).

    Returns the runs, the study's values `cells[dataset, fraction, recipe][variant][seed]` (metric ->
    value) and the search's `accuracy[dataset, recipe][epochs]` (one per seed)."""
    rng = np.random.default_rng(23)
    runs, accuracy, cells = [], {}, {}

    def add(dataset, fraction, seed, recipe, variant, epochs, values, seconds, **extra):
        a = values["test_accuracy"]
        runs.append({
            "dataset": dataset, "fraction": fraction, "seed": seed, "recipe": recipe, "variant": variant,
            "epochs": epochs, "batch_size": 8, "train_seconds": seconds, **values,
            "validation_curve": [[epochs / 2, a - 0.1], [epochs, a]], **extra,
        })  # fmt: skip

    for (dataset, recipe), base in zip(PAIRS, (0.5, 0.4, 0.3, 0.2), strict=True):
        at = accuracy[dataset, recipe] = {2: [base + shift for shift in (0.0, 0.02, 0.04)]}
        at[4] = [a + gain for a, gain in zip(at[2], (0.1, 0.12, 0.08), strict=True)]
        at[8] = [a + gain for a, gain in zip(at[4], (0.004, 0.009, -0.001), strict=True)]
        for epochs, seconds in ((2, 60.0), (8, 120.0)):
            for seed in range(3):
                metrics = {
                    "test_accuracy": at[epochs][seed],
                    "test_entropy": 1.0,
                    "test_jaccard": 0.5,
                    "test_mass": 0.5,
                }
                add(dataset, 0.1, seed, recipe, "baseline", epochs, metrics, seconds)
    sixteen = accuracy["digits", "plain"][16] = [a + 0.05 for a in accuracy["digits", "plain"][8][:2]]
    metrics = {"test_entropy": 1.0, "test_jaccard": 0.5, "test_mass": 0.5}
    add("digits", 0.1, 0, "plain", "baseline", 16, {"test_accuracy": sixteen[0], **metrics}, 240.0)
    add("digits", 0.1, 1, "plain", "baseline", 16, {"test_accuracy": sixteen[1], **metrics}, 240.0,
        validation_curve=[[8, sixteen[1] - 0.1]])  # fmt: skip
    design = {
        ("digits", 0.1, "plain"): (3, ("baseline", "sar-0.1")), ("digits", 0.5, "plain"): (2, ("baseline", "sar-0.1")),
        ("digits", 0.1, "deit"): (3, ("baseline", "sar-0.1")),
        ("cluttered-digits", 0.1, "plain"): (3, ("baseline", "sar-0.1")),
        ("cluttered-digits", 0.5, "plain"): (1, ("baseline", "sar-0.1")),
        ("cluttered-digits", 0.1, "deit"): (3, ("baseline",)),
    }  # fmt: skip
    for (dataset, fraction, recipe), (seeds, variants) in design.items():
        cell = cells[dataset, fraction, recipe] = {}
        for variant in variants:
            for seed in range(seeds):
                values = {
                    "test_accuracy": round(rng.uniform(0.3, 0.9), 3), "test_entropy": round(rng.uniform(1, 3), 3),
                    "test_jaccard": round(rng.uniform(0, 1), 3), "test_mass": round(rng.uniform(0, 1), 3),
                }  # fmt: skip
                if (fraction, variant) == (0.1, "baseline"):  # the search's run at 4 epochs
                    values["test_accuracy"] = accuracy[dataset, recipe][4][seed]
                cell.setdefault(variant, {})[seed] = values
                add(dataset, fraction, seed, recipe, variant, 4, values, 36.0)
    add("digits", 0.5, 0, "plain", "sar-0.1", 8, {"test_accuracy": 0.0, **metrics}, 24.0)
    runs.append({**runs[-2], "batch_size": 16, "train_seconds": 600.0, "test_accuracy": 0.0, "seed": 0})
    return runs, cells, accuracy


def interval_cell(mean, low, high):
    if mean is None:
        return "—"
    return f"{mean:+.4f}" if low is None else f"{mean:+.4f} [{low:+.4f}, {high:+.4f}]"


def reference_rows(cells):
    """Each study row from its seeds' values, by hand and with scipy's paired t test, in table order."""
    import statistics

    from scipy import stats

    rows = []
    for dataset in ("digits", "cluttered-digits"):
        for fraction in (0.1, 0.5):
            for recipe in ("plain", "deit"):
                variants = cells.get((dataset, fraction, recipe), {})
                for variant, by_seed in variants.items():
                    seeds = sorted(by_seed)
                    row = {"dataset": dataset, "fraction": fraction, "recipe": recipe, "variant": variant,
                           "n": len(seeds)}  # fmt: skip
                    for metric in METRIC_NAMES:
                        values = [by_seed[s][metric] for s in seeds]
                        row[metric] = statistics.mean(values)
                        row[metric, "std"] = statistics.stdev(values) if len(seeds) > 1 else None
                        row[metric, "diff"] = None, None, None
                        if variant != "baseline":
                            baseline = [variants["baseline"][s][metric] for s in seeds]
                            diff = statistics.mean(v - b for v, b in zip(values, baseline, strict=True))
                            low = high = None
                            if len(seeds) > 1:
                                low, high = stats.ttest_rel(values, baseline).confidence_interval(0.95)
                            row[metric, "diff"] = diff, low, high
                    rows.append(row)
    return rows


def table_line(row):
    std = row["test_accuracy", "std"]
    cells = [f"{row['fraction']:.0%}", row["recipe"], row["variant"], str(row["n"]),
             f"{row['test_accuracy']:.4f} ± " + ("—" if std is None else f"{std:.4f}"),
             interval_cell(*row["test_accuracy", "diff"])]  # fmt: skip
    for metric in METRIC_NAMES[1:]:
        cells += [f"{row[metric]:.4f}", interval_cell(*row[metric, "diff"])]
    return "| " + " | ".join(cells) + " |"


def reference_plateau(accuracy):
    from scipy import stats

    rows = []
    for epochs in (2, 4):
        for dataset, recipe in PAIRS:
            once, twice = accuracy[dataset, recipe][epochs], accuracy[dataset, recipe][2 * epochs]
            gain = float(np.mean(np.subtract(twice, once)))
            low, high = stats.ttest_rel(twice, once).confidence_interval(0.95)
            rows.append({"dataset": dataset, "recipe": recipe, "fraction": 0.1, "n": 3, "epochs": epochs,
                         "accuracy_mean": float(np.mean(once)), "gain_mean": gain, "ci95_low": low,
                         "ci95_high": high})  # fmt: skip
    return rows


TABLE_HEAD = [
    "| fraction | recipe | variant | n | accuracy | Δ accuracy [95% CI] | entropy | Δ entropy [95% CI] | Jaccard "
    "| Δ Jaccard [95% CI] | mass on object | Δ mass [95% CI] |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|",
]


def scale(jaccard, mass):
    return (
        "For scale: one fixed map, how often each patch holds the object in the training images, scores a "
        f"Jaccard of {jaccard} and a mass on the object of {mass} on these test images."
    )


def keep_figures(monkeypatch):
    """save_figure as it is, keeping each figure and its axes by file name."""
    saved, save = {}, evidence.save_figure

    def keep(figure, axes, path):
        save(figure, axes, path)
        saved[pathlib.Path(path).name] = figure, axes

    monkeypatch.setattr(evidence, "save_figure", keep)
    return saved


def test_the_report_follows_from_the_runs(tmp_path, monkeypatch):
    """Every number of the README (the tables' means, standard deviations, paired differences and
    intervals, the plateau table and its verdicts, the fixed map's scores, the runs and minutes), the
    rows of summary.json and what the two figures plot follow from the runs of `report_study`, by hand
    and with scipy; the attention pictures show the picture seed's models at the smallest fraction."""
    import datetime
    import platform

    import matplotlib
    import transformers
    from matplotlib import font_manager
    from PIL import Image

    data, built = bundled(monkeypatch)
    _, pictures = stand_ins(monkeypatch, accuracy=None)
    saved = keep_figures(monkeypatch)
    args = evidence.parse_args([*REPORT, "--workers", "2", "--time_budget_s", "420", "--output", str(tmp_path)])
    args.command, args.started = "python benchmarks/evidence.py --the-command", time.monotonic() - 87.5
    models = tmp_path / "models"
    for folder in (
        "cluttered-digits_0.1_seed1_4ep_batch8/plain/sar-0.1",
        "cluttered-digits_0.1_seed1_4ep_batch8/deit/baseline",
        "digits_0.1_seed0_4ep_batch8/plain/sar-0.1",
        "digits_0.1_seed1_8ep_batch8/plain/baseline",
    ):
        (models / folder).mkdir(parents=True)
        (models / folder / "key.json").write_text(json.dumps(folder))
    runs, cells, accuracy = report_study()
    evidence.report(runs, args, 4)
    assert built == ["digits", "cluttered-digits"]  # once each

    rows, plateau = reference_rows(cells), reference_plateau(accuracy)
    verdicts = ["no"] * 4 + ["yes"] * 4
    lines = (tmp_path / "README.md").read_text().split("\n")
    assert lines[0] == "# Evidence at a plateau: plain ViT against SAR on the digits and the cluttered digits"
    generated = re.fullmatch(
        rf"Generated by `python benchmarks/evidence.py --the-command` on {datetime.date.today()}, in (\d\.\d) min of "
        r"wall time on cpu with 2 worker\(s\) \(time budget 420 s\); training time summed over the runs: 61 min for "
        r"54 runs, of which 16 min for the 27 at the budget\.",
        lines[2],
    )  # fmt: skip
    assert generated and 1.45 < float(generated[1]) < 1.65  # 87.5 s before, plus the report's own time
    assert lines[3] == (
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; Python "
        f"{platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}."
    )
    assert lines[5] == (
        "Budget: **4 epochs** at batch 8 for every run and fraction, the first budget at which the baseline had "
        "plateaued on every dataset and recipe. The search trains the baseline at 10% of the data for E and 2E "
        "epochs with every seed from E = 2, and doubles E until, on every dataset and recipe, the paired gain of "
        "2E over E has a mean ≤ 0.01 and a 95% upper bound ≤ 0.02, up to E = 8."
    )
    assert lines[7].endswith(
        "scaled to the batch: 7.8e-06). The design asked for 3 seeds at 10%, 50%; the tables hold 1 to 3 seeds per "
        "cell at 10%, 50% (the time plan drops seeds before fractions; `n` is what finished)."
    )
    start = lines.index("## scikit-learn digits")
    digits = [table_line(row) for row in rows if row["dataset"] == "digits"]
    cluttered = [table_line(row) for row in rows if row["dataset"] == "cluttered-digits"]
    assert len(digits) == 6 and len(cluttered) == 5
    plateau_lines = [
        f"| {row['dataset']} | {row['recipe']} | 10% | 3 | {row['epochs']} | {row['accuracy_mean']:.4f} | "
        f"{interval_cell(row['gain_mean'], row['ci95_low'], row['ci95_high'])} | {verdict} |"
        for row, verdict in zip(plateau, verdicts, strict=True)
    ]
    assert lines[start:] == [
        "## scikit-learn digits", "", *TABLE_HEAD, *digits, "", scale("0.5000", "0.6667"), "",
        "## cluttered scikit-learn digits", "", *TABLE_HEAD, *cluttered, "", scale("0.6667", "0.5833"), "",
        "![accuracy and paired differences](evidence.png)", "",
        "## The budget search: does the baseline plateau?", "",
        "The baseline at 10% of the data with E and 2E epochs (same seeds, same schedule shape); gain = 2E minus E, "
        "paired by seed, with its t interval:", "",
        "| dataset | recipe | fraction | n | E | test accuracy at E | gain at 2E [95% CI] | plateau |",
        "|---|---|---|---|---|---|---|---|", *plateau_lines, "",
        "The baseline's validation accuracy over training (mean over seeds), at the budget (solid) and in the "
        "search's other runs (dotted):", "",
        "![validation curves](plateau.png)", "",
        "Attention of seed 1's models at 10% of the cluttered-digits, on the same test images (each map titled "
        "with its spatial entropy):", "",
        "![attention, cluttered-digits](attention_maps_cluttered-digits.png)", "",
    ]  # fmt: skip

    # summary.json: the same rows and plateau rows, strict JSON, one key a line.
    text = (tmp_path / "summary.json").read_text()
    summary = json.loads(text)
    assert text == json.dumps(summary, indent=1)
    assert list(summary) == ["budget_epochs", "plateau", "rows"] and summary["budget_epochs"] == 4
    assert summary["plateau"] == [pytest.approx(row) for row in plateau]
    assert len(summary["rows"]) == len(rows)
    for got, row in zip(summary["rows"], rows, strict=True):
        assert [got[key] for key in ("dataset", "fraction", "recipe", "variant", "n")] == [
            row[key] for key in ("dataset", "fraction", "recipe", "variant", "n")
        ]
        assert got["accuracy_std"] == pytest.approx(row["test_accuracy", "std"])
        for metric, name in zip(METRIC_NAMES, ("", "entropy_", "jaccard_", "mass_"), strict=True):
            assert got[f"{name}mean" if name else "accuracy_mean"] == pytest.approx(row[metric])
            diff = [got[f"{name}{key}"] for key in ("diff_vs_baseline", "ci95_low", "ci95_high")]
            assert diff == pytest.approx(list(row[metric, "diff"]))

    # The attention pictures: the picture seed's models at 10% and the budget, each from its folder,
    # recipe by recipe; none for the digits (its kept models are of another seed or budget), which
    # does not end the pictures of the datasets after it.
    folder = "cluttered-digits_0.1_seed1_4ep_batch8"
    ((shown, images, processor, path),) = pictures
    assert shown == {"sar-0.1, plain": f"{folder}/plain/sar-0.1", "baseline, deit": f"{folder}/deit/baseline"}
    assert processor == str(models / folder / "plain" / "sar-0.1")
    assert path == str(tmp_path / "attention_maps_cluttered-digits.png")
    assert [np.asarray(image).tolist() for image in images] == [
        np.asarray(image).tolist() for image in data["cluttered-digits"]["test"]["image"]
    ]

    # evidence.png: per dataset, accuracy (mean ± std) per recipe and variant over the fractions, and
    # the paired differences with their intervals where there are any; 100 dpi.
    small = font_manager.FontProperties(size="small").get_size_in_points()
    figure, axes = saved["evidence.png"]
    assert axes.shape == (2, 2) and tuple(figure.get_size_inches()) == (11, 8)
    with Image.open(tmp_path / "evidence.png") as png:
        assert png.size == (1100, 800)
    assert not matplotlib.pyplot.fignum_exists(figure.number)
    colours, styles = {"baseline": "C0", "sar-0.1": "C2"}, {"plain": "-", "deit": "--"}
    for column, dataset in enumerate(("digits", "cluttered-digits")):
        top, bottom = axes[:, column]
        expected_top, expected_bottom = [], []
        for recipe in ("plain", "deit"):
            for variant in ("baseline", "sar-0.1"):
                mine = [
                    row
                    for row in rows
                    if (row["dataset"], row["recipe"], row["variant"]) == (dataset, recipe, variant)
                ]
                if mine:
                    x = [row["fraction"] for row in mine]
                    y = [row["test_accuracy"] for row in mine]
                    std = [row["test_accuracy", "std"] or 0 for row in mine]
                    expected_top.append(
                        (f"{variant}, {recipe}", x, [(m - s, m + s) for m, s in zip(y, std, strict=True)], y)
                    )
                paired = [row for row in mine if row["test_accuracy", "diff"][1] is not None]
                if paired:
                    diff = [row["test_accuracy", "diff"] for row in paired]
                    x = [row["fraction"] for row in paired]
                    expected_bottom.append((f"{variant}, {recipe}", x, [(low, high) for _, low, high in diff],
                                            [mean for mean, _, _ in diff]))  # fmt: skip
        for axis, expected in ((top, expected_top), (bottom, expected_bottom)):
            assert [container.get_label() for container in axis.containers] == [label for label, *_ in expected]
            for container, (label, x, bars, y) in zip(axis.containers, expected, strict=True):
                line, caps, (segments,) = container.lines
                variant, recipe = label.split(", ")
                assert line.get_xdata().tolist() == x and line.get_ydata().tolist() == pytest.approx(y)
                assert (line.get_color(), line.get_linestyle(), line.get_marker()) == (
                    colours[variant],
                    styles[recipe],
                    "o",
                )
                assert len(caps) == 2 and caps[0].get_markersize() == 6  # capsize 3
                ends = [[[f, low], [f, high]] for f, (low, high) in zip(x, bars, strict=True)]
                np.testing.assert_allclose(np.array(segments.get_segments()), np.array(ends), rtol=1e-12)
            legend = axis.get_legend()
            assert [t.get_text() for t in legend.get_texts()] == [label for label, *_ in expected]
            assert legend.get_texts()[0].get_fontsize() == small
            assert axis.get_xscale() == "log" and axis.get_xlabel() == "training fraction"
            assert axis.get_xticks().tolist() == [0.1, 0.5]
            assert [t.get_text() for t in axis.get_xticklabels()] == ["10%", "50%"]
            assert len(axis.xaxis.get_minorticklocs()) == 0
        zero = [line for line in bottom.get_lines() if list(line.get_ydata()) == [0, 0]]
        assert len(zero) == 1 and (zero[0].get_color(), zero[0].get_linewidth()) == ("grey", 0.8)
        assert not [line for line in top.get_lines() if list(line.get_ydata()) == [0, 0]]
        assert top.get_title() == f"{dataset}: test accuracy (mean ± std)"
        assert bottom.get_title() == f"{dataset}: paired Δ accuracy vs baseline (95% CI)"
    assert axes[0, 0].get_position().x0 < 0.1  # laid out tightly (the default margin is 0.125)

    # plateau.png: per recipe (rows) and dataset (columns), the baseline's mean validation curve of
    # each fraction and budget that has baseline runs, solid at the budget; a curve is cut to the
    # shortest of its seeds'.
    figure, axes = saved["plateau.png"]
    assert axes.shape == (2, 2) and tuple(figure.get_size_inches()) == (11, 8)
    with Image.open(tmp_path / "plateau.png") as png:
        assert png.size == (1100, 800)
    assert not matplotlib.pyplot.fignum_exists(figure.number)
    for (row, recipe), (column, dataset) in (
        (r, c) for r in enumerate(("plain", "deit")) for c in enumerate(("digits", "cluttered-digits"))
    ):
        axis = axes[row, column]
        expected = []
        for epochs, values in sorted(accuracy[dataset, recipe].items()):
            if epochs == 16:
                expected.append(("10%, 16 epochs", ":", [8], [np.mean(values) - 0.1]))
            else:
                expected.append((f"10%, {epochs} epochs", "-" if epochs == 4 else ":", [epochs / 2, epochs],
                                 [np.mean(values) - 0.1, np.mean(values)]))  # fmt: skip
        if recipe == "plain":
            values = [run["test_accuracy"] for run in cells[dataset, 0.5, "plain"]["baseline"].values()]
            expected.append(("50%, 4 epochs", "-", [2, 4], [np.mean(values) - 0.1, np.mean(values)]))
        lines = axis.get_lines()
        assert [line.get_label() for line in lines] == [label for label, *_ in expected]
        for line, (_, style, x, y) in zip(lines, expected, strict=True):
            assert (line.get_linestyle(), line.get_marker(), line.get_markersize()) == (style, "o", 3)
            assert line.get_xdata() == pytest.approx(x) and line.get_ydata() == pytest.approx(y)
        assert [t.get_text() for t in axis.get_legend().get_texts()] == [label for label, *_ in expected]
        assert axis.get_title() == f"{dataset}, {recipe}: baseline validation accuracy"
        assert axis.get_xlabel() == "epoch"


def small_study(gains, with_8=True):
    """Digits at 10%, both recipes, baseline and sar-0.1, seeds 0 and 1, at 4 epochs (the budget); the
    search's baselines at 2 epochs (4 gains 0.1 on it) and, `with_8`, at 8, gaining `gains[recipe]`."""
    runs = []
    for recipe in ("plain", "deit"):
        for seed in (0, 1):
            accuracy = {2: 0.5 + 0.01 * seed, 4: 0.6 + 0.01 * seed}
            accuracy[8] = accuracy[4] + gains[recipe]
            for epochs in (2, 4, 8) if with_8 else (2, 4):
                for variant in ("baseline", "sar-0.1") if epochs == 4 else ("baseline",):
                    runs.append({
                        "dataset": "digits", "fraction": 0.1, "seed": seed, "recipe": recipe, "variant": variant,
                        "epochs": epochs, "batch_size": 8, "train_seconds": 30.0,
                        "test_accuracy": accuracy[epochs] + 0.02 * (variant != "baseline") * (1 + seed),
                        "test_entropy": 1.0, "test_jaccard": 0.5, "test_mass": 0.5,
                        "validation_curve": [[epochs, accuracy[epochs]]],
                    })  # fmt: skip
    return runs


FLAT, STILL_GAINING = {"plain": 0.005, "deit": 0.0}, {"plain": 0.005, "deit": 0.05}
BUDGET = "Budget: **4 epochs** at batch 8 for every run and fraction, {why}. The search trains the baseline at 10% of"


@pytest.mark.parametrize(
    "gains, with_8, extra, why, verdicts",
    [
        (FLAT, True, ["--max_epochs", "8"],
         "the first budget at which the baseline had plateaued on every dataset and recipe",
         ["no", "no", "yes", "yes"]),
        # One recipe still gains: no plateau. At the cap (2 x 4 > 4) or short of it (2 x 4 = 8: time ran out).
        (STILL_GAINING, True, ["--max_epochs", "4"],
         "**not a plateau**: the search reached its cap (`--max_epochs 4`) still gaining", ["no", "no", "yes", "no"]),
        (STILL_GAINING, True, ["--max_epochs", "8"],
         "**not a plateau**: the search stopped there to leave the study time (`--time_budget_s`)",
         ["no", "no", "yes", "no"]),
        # No run at twice the budget: nothing shows a plateau there.
        (FLAT, False, ["--max_epochs", "8"],
         "**not a plateau**: the search stopped there to leave the study time (`--time_budget_s`)", ["no", "no"]),
        (FLAT, True, ["--no-plateau_check", "--epochs", "4"], "set by `--no-plateau_check` (no search)", []),
    ],
)  # fmt: skip
def test_the_report_says_why_the_budget_is_what_it_is(gains, with_8, extra, why, verdicts, tmp_path, monkeypatch):
    """... and its plateau table holds the search's rounds (at 2 and 4 epochs), none without a search."""
    import matplotlib.pyplot as plt

    bundled(monkeypatch)
    stand_ins(monkeypatch, accuracy=None)
    monkeypatch.setattr(evidence, "save_figure", lambda figure, axes, path: plt.close(figure))
    args = evidence.parse_args([
        "--datasets", "digits", "--recipes", "plain", "deit", "--seeds", "0", "1", "--fractions", "0.1", "--epochs",
        "2", "--batch_size", "8", "--model_preset", "tiny", "--output", str(tmp_path), *extra,
    ])  # fmt: skip
    args.command, args.started = "python benchmarks/evidence.py", time.monotonic()
    evidence.report(small_study(gains, with_8), args, 4)
    lines = (tmp_path / "README.md").read_text().split("\n")
    assert lines[5].startswith(BUDGET.format(why=why))
    assert " on cpu with 1 worker(s); training time summed over the runs: " in lines[2]  # no time budget stated
    assert lines[7].endswith(
        "The design asked for 2 seeds at 10%; the tables hold 2 seeds per cell at 10% (the time plan drops seeds "
        "before fractions; `n` is what finished)."
    )
    start = lines.index("| dataset | recipe | fraction | n | E | test accuracy at E | gain at 2E [95% CI] | plateau |")
    table = lines[start + 2 : lines.index("", start)]
    assert [line.rsplit(" | ", 1)[1] for line in table] == [f"{verdict} |" for verdict in verdicts]
    assert [line.split(" | ")[4] for line in table] == ["2", "2", "4", "4"][: len(verdicts)]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary["plateau"]) == len(verdicts) and summary["budget_epochs"] == 4


def test_no_report_without_a_finished_run_at_the_budget_and_batch(tmp_path, monkeypatch, capsys):
    bundled(monkeypatch)
    args = evidence.parse_args(["--datasets", "digits", "--batch_size", "8", "--output", str(tmp_path)])
    runs = [run for run in small_study(FLAT) if run["epochs"] != 4]
    runs += [{**run, "batch_size": 16} for run in small_study(FLAT) if run["epochs"] == 4]
    evidence.report(runs, args, 4)
    assert capsys.readouterr().out == f"evidence: no finished runs at 4 epochs, batch 8 in {tmp_path}: no report.\n"
    assert list(tmp_path.iterdir()) == []


def test_a_figure_is_saved_at_100_dpi_with_a_legend_where_its_artists_have_labels(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import font_manager
    from PIL import Image

    with matplotlib.rc_context({"figure.dpi": 50}):  # 100 dpi whatever the user's matplotlibrc says
        figure, axes = plt.subplots(1, 3, figsize=(6, 2), squeeze=False)
        other = plt.figure()  # drawn after it: the current figure, which stays open
    axes[0, 0].plot([0, 1], [0, 1], label="a line")
    axes[0, 1].plot([0, 1], [1, 0])  # no label: no legend
    axes[0, 2].bar([0], [1], label="bars")
    axes[0, 2].set_xlabel("a label wide enough to need room " * 2)
    evidence.save_figure(figure, axes, str(tmp_path / "figure.png"))
    assert [t.get_text() for t in axes[0, 0].get_legend().get_texts()] == ["a line"]
    assert axes[0, 1].get_legend() is None
    assert [t.get_text() for t in axes[0, 2].get_legend().get_texts()] == ["bars"]
    small = font_manager.FontProperties(size="small").get_size_in_points()
    assert axes[0, 2].get_legend().get_texts()[0].get_fontsize() == small
    with Image.open(tmp_path / "figure.png") as png:
        assert png.size == (600, 200)
    assert axes[0, 0].get_position().y0 > 0.15  # tight layout made room for the x label
    assert not plt.fignum_exists(figure.number) and plt.fignum_exists(other.number)
    plt.close(other)


MAIN = ["--datasets", "digits", "--recipes", "plain", "--variants", "baseline", "sar-0.1", "--seeds", "0", "1", "2",
        "--fractions", "0.5", "0.1", "--epochs", "2", "--max_epochs", "8", "--batch_size", "8", "--model_preset",
        "tiny", "--picture_seed", "1"]  # fmt: skip


def learns_until_4(key):
    """The baseline gains 0.1 from 2 to 4 epochs in every seed and nothing after (a plateau at 4);
    sar-0.1 adds 0.02 x (seed + 1)."""
    gain = 0.02 * (key["seed"] + 1) * (key["variant"] != "baseline")
    return 0.3 + 0.05 * min(key["epochs"], 4) + 0.01 * key["seed"] + 0.1 * key["fraction"] + gain


def blank_figures(monkeypatch):
    """save_figure writes an empty file (the figures' contents are test_the_report_follows_from_the_runs's)."""
    import matplotlib.pyplot as plt

    def blank(figure, axes, path):
        pathlib.Path(path).write_bytes(b"")
        plt.close(figure)

    monkeypatch.setattr(evidence, "save_figure", blank)


def trained_keys(trained):
    return [(r["epochs"], r["fraction"], r["seed"], r["variant"][0]) for r in trained]


def test_main_searches_runs_the_study_and_reports_and_a_second_invocation_only_reports(tmp_path, monkeypatch):
    """The search trains the baseline at 10% for 4 and 2 epochs (no plateau: +0.1), then 8 (a plateau at
    4, where the search stops); the study at 4 epochs trains each seed's runs at 50% and its SAR run at
    10% (the baseline there is the search's). Every run once. The budget is kept in budget.json; the
    report shows the study and the picture seed's models. Run again (the command line from sys.argv),
    it trains nothing and rebuilds the report; `--report_only` reports at the kept budget."""
    from scipy import stats

    bundled(monkeypatch)
    trained, pictures = stand_ins(monkeypatch, learns_until_4, seconds=lambda key: 10 * evidence.training_passes(key))
    blank_figures(monkeypatch)
    output = tmp_path / "study"
    argv = [*MAIN, "--output", str(output)]
    evidence.main(argv)
    b, s = "b", "s"
    assert trained_keys(trained) == [
        (4, 0.1, 0, b), (4, 0.1, 1, b), (4, 0.1, 2, b), (2, 0.1, 0, b), (2, 0.1, 1, b), (2, 0.1, 2, b),
        (8, 0.1, 0, b), (8, 0.1, 1, b), (8, 0.1, 2, b),
        (4, 0.5, 0, b), (4, 0.5, 0, s), (4, 0.1, 0, s), (4, 0.5, 1, b), (4, 0.5, 1, s), (4, 0.1, 1, s),
        (4, 0.5, 2, b), (4, 0.5, 2, s), (4, 0.1, 2, s),
    ]  # fmt: skip
    assert json.loads((output / "budget.json").read_text()) == {"budget_epochs": 4}
    assert len(records(output)) == 18 and len(list((output / "claims").iterdir())) == 18
    readme = (output / "README.md").read_text().split("\n")
    assert readme[2].startswith(f"Generated by `python benchmarks/evidence.py {' '.join(argv)}` on ")
    assert readme[5].startswith("Budget: **4 epochs** at batch 8 for every run and fraction, the first budget at")
    rows = json.loads((output / "summary.json").read_text())["rows"]
    assert [(row["fraction"], row["variant"], row["n"]) for row in rows] == [
        (0.1, "baseline", 3), (0.1, "sar-0.1", 3), (0.5, "baseline", 3), (0.5, "sar-0.1", 3),
    ]  # fmt: skip
    low, high = stats.ttest_rel([0.02, 0.04, 0.06], [0, 0, 0]).confidence_interval(0.95)
    assert [rows[1][key] for key in ("diff_vs_baseline", "ci95_low", "ci95_high")] == pytest.approx([0.04, low, high])
    ((shown, *_),) = pictures
    assert {name: (key["seed"], key["fraction"], key["epochs"]) for name, key in shown.items()} == {
        "baseline, plain": (1, 0.1, 4), "sar-0.1, plain": (1, 0.1, 4),
    }  # fmt: skip

    for name in ("README.md", "summary.json", "evidence.png", "plateau.png"):
        (output / name).unlink()
    monkeypatch.setattr(evidence.sys, "argv", ["benchmarks/evidence.py", *argv])
    evidence.main()
    assert len(trained) == 18 and len(records(output)) == 18
    assert (output / "README.md").read_text().split("\n")[2:] == readme[2:]
    assert (output / "evidence.png").is_file() and (output / "plateau.png").is_file()

    (output / "budget.json").write_text(json.dumps({"budget_epochs": 8}))
    evidence.main([*argv, "--report_only"])
    assert len(trained) == 18
    assert (output / "README.md").read_text().split("\n")[5].startswith("Budget: **8 epochs** at batch 8")


def test_main_fits_the_study_into_the_time_left_after_the_search(tmp_path, monkeypatch):
    """10 s per pass over the training split (12.5 s planned), one worker, 160 s. The probe is seed 0;
    the search's rounds (25 s, then 50 s with the smallest study) fit with every seed. The study at 4
    epochs would take 3 x 55 s + 25 s = 190 s with three seeds, 135 s with two: seeds 0 and 1."""
    bundled(monkeypatch)
    trained, _ = stand_ins(monkeypatch, learns_until_4, seconds=lambda key: 10 * evidence.training_passes(key))
    blank_figures(monkeypatch)
    evidence.main([*MAIN, "--min_seeds", "2", "--time_budget_s", "160", "--output", str(tmp_path)])
    b, s = "b", "s"
    assert trained_keys(trained) == [
        (4, 0.1, 0, b), (2, 0.1, 0, b), (4, 0.1, 1, b), (4, 0.1, 2, b), (2, 0.1, 1, b), (2, 0.1, 2, b),
        (8, 0.1, 0, b), (8, 0.1, 1, b), (8, 0.1, 2, b),
        (4, 0.5, 0, b), (4, 0.5, 0, s), (4, 0.1, 0, s), (4, 0.5, 1, b), (4, 0.5, 1, s), (4, 0.1, 1, s),
    ]  # fmt: skip
    assert "(time budget 160 s)" in (tmp_path / "README.md").read_text()


def test_main_without_the_search_runs_the_study_at_the_given_epochs(tmp_path, monkeypatch):
    bundled(monkeypatch)
    trained, _ = stand_ins(monkeypatch, learns_until_4)
    blank_figures(monkeypatch)
    evidence.main([*MAIN, "--no-plateau_check", "--output", str(tmp_path)])
    assert trained_keys(trained) == [
        (2, fraction, seed, variant) for seed in (0, 1, 2) for fraction in (0.5, 0.1) for variant in "bs"
    ]
    assert json.loads((tmp_path / "budget.json").read_text()) == {"budget_epochs": 2}
    assert "set by `--no-plateau_check` (no search)" in (tmp_path / "README.md").read_text()


def test_the_options_default_to_the_published_design():
    """run_evidence_gpu.sh sets only the device, the workers, the time budget and the output: the rest is this."""
    assert vars(evidence.parse_args([])) == {
        "datasets": ["digits", "cluttered-digits"], "fractions": [0.1, 0.2, 0.3, 0.5], "seeds": list(range(10)),
        "variants": ["baseline", "sar-0.01", "sar-0.1"], "recipes": ["plain", "deit"], "epochs": 160,
        "max_epochs": 640, "batch_size": 16, "model_preset": "small", "picture_seed": 0, "plateau_check": True,
        "device": "cpu", "workers": 1, "time_budget_s": None, "min_seeds": 5, "report_only": False,
        "output": "benchmarks/results/evidence/gpu",
    }  # fmt: skip


def test_the_options_parse_to_lists_and_numbers():
    args = evidence.parse_args([
        "--datasets", "cluttered-digits", "--fractions", "0.25", "0.05", "--seeds", "3", "1", "--variants", "sar-0.1",
        "--recipes", "deit", "--epochs", "20", "--max_epochs", "80", "--batch_size", "4", "--model_preset", "tiny",
        "--picture_seed", "3", "--no-plateau_check", "--workers", "6", "--min_seeds", "2", "--report_only",
        "--output", "somewhere",
    ])  # fmt: skip
    assert vars(args) == {
        "datasets": ["cluttered-digits"], "fractions": [0.25, 0.05], "seeds": [3, 1], "variants": ["sar-0.1"],
        "recipes": ["deit"], "epochs": 20, "max_epochs": 80, "batch_size": 4, "model_preset": "tiny",
        "picture_seed": 3, "plateau_check": False, "device": "cpu", "workers": 6, "time_budget_s": None,
        "min_seeds": 2, "report_only": True, "output": "somewhere",
    }  # fmt: skip
    assert evidence.parse_args(["--time_budget_s", "420.5", "--plateau_check"]).time_budget_s == 420.5


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--datasets", "mnist"], "argument --datasets: invalid choice: 'mnist'"),
        (["--variants", "sar-1"], "argument --variants: invalid choice: 'sar-1'"),
        (["--recipes", "mixup"], "argument --recipes: invalid choice: 'mixup'"),
        (["--model_preset", "huge"], "argument --model_preset: invalid choice: 'huge'"),
        (["--device", "mps"], "argument --device: invalid choice: 'mps'"),
        (["--seeds", "0.5"], "argument --seeds: invalid int value: '0.5'"),
        (["--fractions", "half"], "argument --fractions: invalid float value: 'half'"),
        (["--epochs", "2.5"], "argument --epochs: invalid int value: '2.5'"),
        (["--max_epochs", "2.5"], "argument --max_epochs: invalid int value: '2.5'"),
        (["--batch_size", "2.5"], "argument --batch_size: invalid int value: '2.5'"),
        (["--picture_seed", "2.5"], "argument --picture_seed: invalid int value: '2.5'"),
        (["--workers", "2.5"], "argument --workers: invalid int value: '2.5'"),
        (["--min_seeds", "2.5"], "argument --min_seeds: invalid int value: '2.5'"),
        (["--time_budget_s", "soon"], "argument --time_budget_s: invalid float value: 'soon'"),
        (["--datasets"], "argument --datasets: expected at least one argument"),
        (["--fractions"], "argument --fractions: expected at least one argument"),
        (["--seeds"], "argument --seeds: expected at least one argument"),
        (["--variants"], "argument --variants: expected at least one argument"),
        (["--recipes"], "argument --recipes: expected at least one argument"),
        (["--report_only", "yes"], "unrecognized arguments: yes"),
        (["--time_budget_s", "60", "--no-plateau_check"],
         "--time_budget_s plans from the search's first round; it needs --plateau_check."),
    ],
)  # fmt: skip
def test_bad_options_are_refused_with_the_reason(argv, message, capsys):
    with pytest.raises(SystemExit):
        evidence.parse_args(argv)
    assert f": error: {message}" in capsys.readouterr().err.splitlines()[-1]


def test_the_gpu_is_refused_where_torch_sees_none(monkeypatch, capsys):
    monkeypatch.setattr(evidence.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        evidence.parse_args(["--device", "cuda"])
    assert capsys.readouterr().err.endswith("error: --device cuda, but torch sees no GPU.\n")
    monkeypatch.setattr(evidence.torch.cuda, "is_available", lambda: True)
    assert evidence.parse_args(["--device", "cuda"]).device == "cuda"


def test_the_help_is_the_modules_description_and_explains_the_options(capsys):
    with pytest.raises(SystemExit):
        evidence.parse_args(["--help"])
    text = capsys.readouterr().out
    assert evidence.__doc__ in text  # verbatim: its line breaks and the indented commands kept
    flat = " ".join(text.split())
    for option, words in {
        "--epochs EPOCHS": "The first budget that the search tries (80 to 160 epochs still gained about 0.05 on the "
        "CPU); the budget itself with --no-plateau_check. The same for every fraction.",
        "--max_epochs MAX_EPOCHS": "The largest budget: the search stops doubling there (640: runs of up to 1,280 "
        "epochs; the gain of doubling fell from 0.12 at 50 epochs to 0.05 at 80 on the CPU).",
        "--model_preset {tiny,small,vit-tiny,vit-small,vit-base}": "The model, from scratch.",
        "--picture_seed PICTURE_SEED": "Seed whose smallest-fraction models are kept.",
        "--plateau_check, --no-plateau_check": "Choose the budget by the search; without it, --epochs is the budget.",
        "--device {cpu,cuda}": "",
        "--workers WORKERS": "Processes that share the device, one CPU thread each (1: this process, with torch's "
        "threads).",
        "--time_budget_s TIME_BUDGET_S": "Fit the search and the study into this many seconds (see above).",
        "--min_seeds MIN_SEEDS": "The time plan keeps at least this many seeds before it drops fractions.",
        "--report_only": "Run nothing: rebuild the report from runs.jsonl at the budget that the last search chose.",
        "--output OUTPUT": "",
    }.items():
        assert f"{option} {words}".strip() in flat


def test_a_run_trains_with_the_training_script_and_returns_its_accuracy_and_validation_curve(tmp_path, monkeypatch):
    """The flags are the run's key and the study's fixed settings; the validation curve is the
    (epoch, accuracy) of every evaluation in the script's log history; the seconds are the script's."""
    calls = []

    def train_main(flags):
        calls.append(flags)
        time.sleep(0.05)
        history = [{"epoch": 0.5, "eval_accuracy": 0.3, "eval_loss": 1.0}, {"epoch": 0.5, "loss": 2.0},
                   {"epoch": 1.0, "eval_accuracy": 0.5}, {"train_runtime": 3.0}]  # fmt: skip
        (tmp_path / "trainer_state.json").write_text(json.dumps({"log_history": history}))
        return {"test_accuracy": 0.42, "test_loss": 1.5}

    monkeypatch.setattr(evidence, "train_main", train_main)
    args = evidence.parse_args(["--model_preset", "tiny"])
    key = {"dataset": "cluttered-digits", "fraction": 0.2, "seed": 7, "recipe": "deit", "variant": "sar-0.01",
           "epochs": 40, "batch_size": 12}  # fmt: skip
    result = evidence.train_one(key, str(tmp_path), args)
    common = [
        "--output_dir", str(tmp_path), "--model_preset", "tiny", "--dataset_name", "cluttered-digits",
        "--train_fraction", "0.2", "--seed", "7", "--num_train_epochs", "40", "--per_device_train_batch_size", "12",
        "--eval_strategy", "steps", "--eval_steps", "0.1", "--save_strategy", "no", "--logging_steps", "1000",
        "--report_to", "none", "--attention_figure_images", "0", "--no_verify_images", "--disable_tqdm", "true",
    ]  # fmt: skip
    assert calls == [[*common, "--dataloader_pin_memory", "False", "--use_cpu", "--recipe", "deit", "--sar_weight",
                      "0.01"]]  # fmt: skip
    assert 0.05 <= result.pop("train_seconds") < 5
    assert result == {"test_accuracy": 0.42, "validation_curve": [[0.5, 0.3], [1.0, 0.5]]}
    args.device = "cuda"  # no --use_cpu, and pinned memory
    evidence.train_one({**key, "recipe": "plain", "variant": "baseline"}, str(tmp_path), args)
    assert calls[1] == [*common, "--dataloader_pin_memory", "True", "--sar_weight", "0"]


def test_the_attention_metrics_are_means_over_every_test_image_and_head(monkeypatch):
    """300 16x16 images (two batches: 256 and 44), each black but for a coloured rectangle, on the tiny
    model's 4x4 grid: the object's patches are the 4x4-pixel cells with any colour. The means equal
    those of the whole set scored at once from pixels normalised by hand."""
    import datasets
    from PIL import Image
    from tiny import TINY
    from transformers import ViTImageProcessor

    from sar_hf import SARViTConfig, SARViTForImageClassification, spatial_entropy
    from sar_hf.visualization import cls_attention

    torch.manual_seed(0)
    model = SARViTForImageClassification(SARViTConfig(**TINY)).eval()
    processor = ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5] * 3, image_std=[0.25] * 3)
    rng = np.random.default_rng(0)
    arrays = np.zeros((300, 16, 16, 3), np.uint8)
    for array in arrays:
        top, left = rng.integers(0, 14, 2)
        height, width = rng.integers(1, 7, 2)
        array[top : top + height, left : left + width] = rng.integers(60, 256, 3)
    test = datasets.Dataset.from_dict(
        {"image": [Image.fromarray(array) for array in arrays]},
        features=datasets.Features({"image": datasets.Image()}),
    )
    pixel_values = (torch.from_numpy(arrays).permute(0, 3, 1, 2) / 255 - 0.5) / 0.25
    scores, grid = cls_attention(model, pixel_values)
    ink = torch.from_numpy(arrays.reshape(300, 4, 4, 4, 4, 3).any(axis=(2, 4, 5)).reshape(300, 16))
    assert 0 < ink.float().mean() < 0.5
    metrics = evidence.attention_metrics(model, processor, test)
    assert metrics == pytest.approx({
        "test_entropy": spatial_entropy(scores, grid, reduction="none").mean().item(),
        "test_jaccard": evidence.attention_jaccard(scores, ink).mean().item(),
        "test_mass": evidence.mass_on_object(scores, ink).mean().item(),
    }, rel=1e-5)  # fmt: skip


def test_summary_json_stays_strict_json_a_metric_that_is_not_a_number_stops_the_report(tmp_path, monkeypatch):
    """JSON has no NaN: a run whose mass on the object is NaN (a diverged model's attention) makes the
    report fail with its reason rather than write a summary.json that strict parsers refuse."""
    bundled(monkeypatch)
    args = evidence.parse_args(["--datasets", "digits", "--batch_size", "8", "--output", str(tmp_path)])
    runs = [{**run, "test_mass": float("nan")} if run["epochs"] == 4 else run for run in small_study(FLAT)]
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        evidence.report(runs, args, 4)


def test_the_figures_have_a_column_per_dataset_and_the_plateau_figure_a_row_per_recipe_of_the_tables(
    tmp_path, monkeypatch
):
    """A study of the plain recipe alone on the digits: one column in each figure, and one row of
    validation curves, the plain recipe's (not DeiT's, which has no row in the tables)."""
    import matplotlib.pyplot as plt

    bundled(monkeypatch)
    stand_ins(monkeypatch, accuracy=None)
    figures = {}

    def keep(figure, axes, path):
        figures[pathlib.Path(path).name] = figure, axes
        plt.close(figure)

    monkeypatch.setattr(evidence, "save_figure", keep)
    args = evidence.parse_args([
        "--datasets", "digits", "--recipes", "plain", "--seeds", "0", "1", "--fractions", "0.1", "--epochs", "2",
        "--batch_size", "8", "--model_preset", "tiny", "--output", str(tmp_path),
    ])  # fmt: skip
    args.command, args.started = "python benchmarks/evidence.py", time.monotonic()
    evidence.report([run for run in small_study(FLAT) if run["recipe"] == "plain"], args, 4)
    figure, axes = figures["evidence.png"]
    assert axes.shape == (2, 1) and tuple(figure.get_size_inches()) == (5.5, 8)
    figure, axes = figures["plateau.png"]
    assert axes.shape == (1, 1) and tuple(figure.get_size_inches()) == (5.5, 4)
    assert axes[0, 0].get_title() == "digits, plain: baseline validation accuracy"
    assert [line.get_label() for line in axes[0, 0].get_lines()] == ["10%, 2 epochs", "10%, 4 epochs", "10%, 8 epochs"]


def test_main_trains_on_its_pool_of_workers(tmp_path, monkeypatch):
    """With two workers every batch goes to the pool that main opened (here its workers run one after the
    other in this process): each of the study's 12 runs is trained once, by the pool's workers."""
    import contextlib

    bundled(monkeypatch)
    trained, _ = stand_ins(monkeypatch, learns_until_4)
    blank_figures(monkeypatch)
    pool, opened = SerialPool(), []

    def worker_pool(args):
        opened.append(args.workers)
        return contextlib.nullcontext(pool)

    monkeypatch.setattr(evidence, "worker_pool", worker_pool)
    evidence.main([*MAIN, "--no-plateau_check", "--workers", "2", "--output", str(tmp_path)])
    assert opened == [2] and len(pool.calls) == 1
    assert len(trained) == len({evidence.run_key(run) for run in trained}) == 12
