"""benchmarks/evidence.py in parts: the budget search against a stubbed run function, the time plan,
the workers that share a device, the rows paired within a recipe, and the mass on the object."""

import json
import pathlib
import time

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
