"""`SARCallback`: the λ schedules against hand-computed values, and where λ is written.

A run of E = 5 epochs of 4 optimizer steps (max_steps = 20), warm-up W = 2 epochs, peak λ* = 0.1.
Per epoch, λ follows the integer epoch index: 0, λ*/2 over the warm-up, then cosine from λ* at
epoch 2 to 0 at the last epoch (4): λ*, λ*·½(1 + cos(π/2)) = λ*/2, 0. Per step, the epoch is
fractional (step / 4) and the cosine reaches 0 at e = 5.
"""

import math
from pathlib import Path

import pytest
import torch
from ranks import run_two_ranks
from tiny import TINY
from transformers import TrainerControl, TrainerState, TrainingArguments

from sar_hf import SARCallback, SARStats, SARViTConfig, SARViTForImageClassification

EPOCHS, MAX_STEPS, WARMUP, PEAK = 5, 20, 2, 0.1

PER_EPOCH = {step: [0.0, 0.05, 0.1, 0.05, 0.0][step // 4] for step in range(MAX_STEPS)}
PER_STEP = {
    0: 0.0,
    2: 0.025,  # e = 0.5: a quarter of the warm-up
    4: 0.05,
    6: 0.075,
    8: 0.1,  # e = W: the peak
    11: 0.1 * 0.5 * (1 + math.cos(math.pi / 4)),  # e = 2.75: a quarter of the cosine
    14: 0.05,  # e = 3.5: half-way
    17: 0.1 * 0.5 * (1 + math.cos(3 * math.pi / 4)),
    20: 0.0,  # e = E
}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return SARViTForImageClassification(SARViTConfig(**TINY, sar_weight=PEAK))


@pytest.fixture(scope="module")
def args(tmp_path_factory):
    return TrainingArguments(output_dir=str(tmp_path_factory.mktemp("out")), report_to="none", use_cpu=True)


def state_at(step: int, max_steps: int = MAX_STEPS, epochs: float = EPOCHS) -> TrainerState:
    state = TrainerState()
    state.global_step, state.max_steps, state.num_train_epochs = step, max_steps, epochs
    return state


@pytest.mark.parametrize("step", range(MAX_STEPS))
def test_warmup_cosine_per_epoch(step):
    callback = SARCallback(sar_weight=PEAK, warmup_epochs=WARMUP, granularity="epoch")
    assert callback.weight_at(step, MAX_STEPS, EPOCHS) == pytest.approx(PER_EPOCH[step], abs=1e-12)


@pytest.mark.parametrize("step", sorted(PER_STEP))
def test_warmup_cosine_per_step(step):
    callback = SARCallback(sar_weight=PEAK, warmup_epochs=WARMUP, granularity="step")
    assert callback.weight_at(step, MAX_STEPS, EPOCHS) == pytest.approx(PER_STEP[step], abs=1e-12)


def test_without_warmup_the_cosine_starts_at_the_peak():
    callback = SARCallback(sar_weight=1.0, warmup_epochs=0, granularity="epoch")
    # 4 epochs, 2 steps each: cosine over epochs 0..3.
    weights = [callback.weight_at(step, 8, 4) for step in range(0, 8, 2)]
    assert weights == pytest.approx([1.0, 0.75, 0.25, 0.0], abs=1e-12)


def test_constant_schedule():
    callback = SARCallback(sar_weight=0.3, schedule="constant", warmup_epochs=WARMUP)
    assert [callback.weight_at(step, MAX_STEPS, EPOCHS) for step in (0, 7, 19)] == [0.3, 0.3, 0.3]


def test_callable_schedule_gets_fractional_epochs_and_the_number_of_epochs():
    seen = []

    def schedule(epoch, epochs):
        seen.append((epoch, epochs))
        return 0.2 * epoch / epochs

    callback = SARCallback(schedule=schedule)
    assert callback.weight_at(5, MAX_STEPS, EPOCHS) == pytest.approx(0.05)
    assert seen == [(pytest.approx(1.25), EPOCHS)]


@pytest.mark.parametrize(("granularity", "expected"), [("epoch", PER_EPOCH), ("step", PER_STEP)])
def test_step_begin_writes_the_schedule_onto_the_model(model, args, granularity, expected):
    callback = SARCallback(sar_weight=PEAK, warmup_epochs=WARMUP, granularity=granularity)
    for step in (0, 6, 8, 14):
        callback.on_step_begin(args, state_at(step), TrainerControl(), model=model)
        assert model.sar_loss.scheduled_sar_weight == pytest.approx(expected[step], abs=1e-12)
        assert callback.current_weight == model.sar_loss.scheduled_sar_weight
        assert model.config.sar_weight == PEAK  # the configured value, which checkpoints save, stays


def test_peak_defaults_to_the_models_weight_at_train_begin(args):
    torch.manual_seed(0)
    model = SARViTForImageClassification(SARViTConfig(**TINY, sar_weight=0.4))
    callback = SARCallback(warmup_epochs=WARMUP, granularity="epoch")
    callback.on_train_begin(args, state_at(4), TrainerControl(), model=model)
    assert callback.sar_weight == 0.4
    assert model.sar_loss.scheduled_sar_weight == pytest.approx(0.2)  # epoch 1 of a 2-epoch warm-up
    callback.on_train_end(args, state_at(4), TrainerControl(), model=model)
    assert model.sar_loss.scheduled_sar_weight is None and model.config.sar_weight == 0.4


class LossLike:
    """Stands for SpatialEntropyLoss: the callback reads `sar_weight`, `sar_stats`; writes `scheduled_sar_weight`."""

    sar_weight = 0.6
    scheduled_sar_weight = None

    def __init__(self):
        self.sar_stats = SARStats()


def test_loss_fn_receives_the_weight_instead_of_the_model(model, args):
    loss_fn = LossLike()
    before = model.config.sar_weight
    callback = SARCallback(warmup_epochs=WARMUP, granularity="epoch", loss_fn=loss_fn)
    callback.on_train_begin(args, state_at(4), TrainerControl(), model=model)
    assert callback.sar_weight == 0.6 and loss_fn.scheduled_sar_weight == pytest.approx(0.3)
    assert model.config.sar_weight == before


def test_data_parallel_wrapper_is_unwrapped(model, args):
    wrapped = torch.nn.DataParallel(model)  # on the CPU it only holds `.module`
    callback = SARCallback(sar_weight=PEAK, warmup_epochs=WARMUP, granularity="epoch")
    callback.on_step_begin(args, state_at(4), TrainerControl(), model=wrapped)
    assert model.sar_loss.scheduled_sar_weight == pytest.approx(0.05)


def test_distributed_data_parallel_is_unwrapped_and_stats_are_reduced(tmp_path):
    """Two real processes (DDP over gloo): λ reaches the wrapped model and the logs are the ranks' mean.

    The ranks are plain subprocesses rather than `accelerate launch`: the test drives the callback
    by hand at step 12, with no Trainer.
    """
    settings = {"sar_weight": PEAK, "warmup_epochs": WARMUP, "step": 12, "max_steps": MAX_STEPS, "epochs": EPOCHS}
    rank0, rank1 = run_two_ranks(Path(__file__).with_name("ddp_callback_worker.py"), tmp_path, settings)
    assert rank0["entropy"] != pytest.approx(rank1["entropy"])
    for rank in (rank0, rank1):
        assert rank["scheduled_sar_weight"] == pytest.approx(PER_EPOCH[12])  # 0.05: half-way down the cosine
        assert rank["logs"]["sar/entropy"] == pytest.approx((rank0["entropy"] + rank1["entropy"]) / 2, abs=1e-6)
        assert rank["logs"]["sar/weight"] == pytest.approx(PER_EPOCH[12])
        assert rank["last_history_entry"]["sar/entropy"] == rank["logs"]["sar/entropy"]


def test_on_log_adds_training_and_evaluation_keys_and_skips_the_summary(model, args):
    callback = SARCallback(sar_weight=PEAK, schedule="constant")
    callback.on_step_begin(args, state_at(0), TrainerControl(), model=model)
    model.sar_loss.sar_stats.pop(training=True), model.sar_loss.sar_stats.pop(training=False)
    entropy, ce, skipped = torch.tensor(0.5), torch.tensor(1.5), torch.tensor(2)
    model.sar_loss.sar_stats.update(True, entropy, ce, skipped)
    model.sar_loss.sar_stats.update(True, entropy * 3, ce * 3, skipped * 0)
    model.sar_loss.sar_stats.update(False, entropy, None, skipped * 0)
    callback.on_prediction_step(args, state_at(1), TrainerControl(), model=model)  # it was an evaluation's

    state = state_at(1)
    logs = {"loss": 2.0, "learning_rate": 1e-3}
    state.log_history.append({**logs, "step": 1})
    callback.on_log(args, state, TrainerControl(), logs=logs, model=model)
    expected = {"sar/entropy": 1.0, "sar/ce_loss": 3.0, "sar/skipped_maps": 1.0, "sar/weight": PEAK}
    assert {k: logs[k] for k in expected} == pytest.approx(expected)
    assert {k: state.log_history[-1][k] for k in expected} == pytest.approx(expected)

    logs = {"eval_loss": 1.0, "eval_runtime": 0.1}
    state.log_history.append({**logs, "step": 1})
    callback.on_log(args, state, TrainerControl(), logs=logs, model=model)
    assert logs["eval_sar/entropy"] == pytest.approx(0.5)
    assert "eval_sar/ce_loss" not in logs  # no labels' cross-entropy was recorded

    logs = {"train_runtime": 1.0, "train_loss": 2.0}
    callback.on_log(args, state, TrainerControl(), logs=logs, model=model)
    assert set(logs) == {"train_runtime", "train_loss"}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"schedule": "linear"}, "`schedule` must be one of"),
        ({"granularity": "batch"}, "`granularity` must be one of"),
        ({"warmup_epochs": -1}, "`warmup_epochs` must be >= 0"),
        ({"sar_weight": -0.1}, "`sar_weight` must be a finite number >= 0"),
        ({"sar_weight": math.nan}, "`sar_weight` must be a finite number >= 0"),
        ({"sar_weight": math.inf}, "`sar_weight` must be a finite number >= 0"),
    ],
)
def test_invalid_arguments_are_value_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SARCallback(**kwargs)


def test_a_model_without_sar_and_no_loss_fn_is_a_value_error(args):
    from transformers import ViTConfig, ViTForImageClassification

    plain = ViTForImageClassification(ViTConfig(**TINY))
    with pytest.raises(ValueError, match=r"needs a model with a SAR loss.*SpatialEntropyLoss\(model\)"):
        SARCallback().on_train_begin(args, state_at(0), TrainerControl(), model=plain)


# -- the default schedule applies the term in runs of any length ---------------------------------


@pytest.mark.parametrize(("epochs", "steps_per_epoch"), [(1, 50), (2, 30), (3, 20), (100, 4)])
def test_the_default_schedule_applies_the_term_on_most_steps(epochs, steps_per_epoch):
    callback = SARCallback(sar_weight=PEAK)
    max_steps = epochs * steps_per_epoch
    weights = [callback.weight_at(step, max_steps, epochs) for step in range(max_steps)]
    assert sum(w > 0 for w in weights) >= 0.9 * max_steps
    assert max(weights) == pytest.approx(PEAK, rel=0.05)  # the warm-up reaches the peak
    assert callback.granularity_for(epochs) == ("epoch" if epochs >= 10 else "step")


def test_settings_that_zero_most_steps_are_warned_about(model, args, caplog):
    # λ per epoch in a 1-epoch fine-tune: the warm-up's first epoch is the whole run, λ = 0 throughout.
    one_epoch = state_at(0, max_steps=20, epochs=1)
    with caplog.at_level("WARNING"):
        SARCallback(sar_weight=PEAK, granularity="epoch").on_train_begin(
            args, one_epoch, TrainerControl(), model=model
        )
    assert "leaves λ at 0 on 20 of the 20 steps" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        SARCallback(sar_weight=PEAK).on_train_begin(args, one_epoch, TrainerControl(), model=model)
    assert "leaves λ at 0" not in caplog.text


@pytest.mark.parametrize(
    ("epochs", "max_steps", "warmup", "reached"),
    [
        (2, 20, 10, "at most 0.019 (19% of the peak)"),  # per step: the last step is at e = 1.9 of W = 10
        (10, 40, 10, "at most 0.09 (90% of the peak)"),  # per epoch: the last epoch's index is 9 of W = 10
        (10, 40, 9, None),  # per epoch: the warm-up ends at the last epoch, where λ = λ*
        (2, 20, None, None),  # the default warm-up, a tenth of the run
        (2, 20, 1.9, None),  # per step: step 19 is at e = 1.9 = W, the peak
    ],
)
def test_a_run_that_ends_in_the_warmup_is_warned_about_with_the_share_of_the_peak(
    model, args, caplog, epochs, max_steps, warmup, reached
):
    callback = SARCallback(sar_weight=PEAK, warmup_epochs=warmup)
    with caplog.at_level("WARNING"):
        callback.on_train_begin(args, state_at(0, max_steps=max_steps, epochs=epochs), TrainerControl(), model=model)
    if reached is None:
        assert "never reaches its peak" not in caplog.text
    else:
        assert f"never reaches its peak λ = {PEAK}: the run ends in the warm-up, with λ {reached}" in caplog.text
        assert "leaves λ at 0" not in caplog.text  # λ > 0 from the second step (epoch) on
    # A constant or custom schedule has no warm-up to outlast.
    caplog.clear()
    with caplog.at_level("WARNING"):
        for schedule in ("constant", lambda epoch, epochs: PEAK * epoch / 100):
            callback = SARCallback(sar_weight=PEAK, schedule=schedule, warmup_epochs=warmup)
            state = state_at(0, max_steps=max_steps, epochs=epochs)
            callback.on_train_begin(args, state, TrainerControl(), model=model)
    assert "never reaches its peak" not in caplog.text


@pytest.mark.parametrize("epochs", [1, 0.5])
def test_a_one_step_run_is_warned_about_and_a_run_of_no_steps_is_not(model, args, caplog, epochs):
    # One step at e = 0 of a warm-up: λ = 0 on the only step, and the run ends in the warm-up.
    with caplog.at_level("WARNING"):
        SARCallback(sar_weight=PEAK).on_train_begin(
            args, state_at(0, max_steps=1, epochs=epochs), TrainerControl(), model=model
        )
    assert "leaves λ at 0 on 1 of the 1 steps and never reaches its peak" in caplog.text
    assert "with λ at most 0 (0% of the peak)" in caplog.text
    # `num_train_epochs=0`: Trainer starts a run of no steps, which has no schedule to warn about.
    caplog.clear()
    with caplog.at_level("WARNING"):
        SARCallback(sar_weight=PEAK).on_train_begin(
            args, state_at(0, max_steps=0, epochs=0), TrainerControl(), model=model
        )
    assert caplog.text == ""


def test_a_bad_weight_set_on_the_config_after_building_is_a_value_error_at_train_begin(args):
    torch.manual_seed(0)
    model = SARViTForImageClassification(SARViTConfig(**TINY, sar_weight=PEAK))
    for weight in (-1, math.nan, math.inf):
        model.config.sar_weight = weight
        # Also when the callback has a peak of its own: the configured λ is what checkpoints save.
        for callback in (SARCallback(), SARCallback(sar_weight=PEAK)):
            with pytest.raises(ValueError, match=r"`sar_weight` must be a finite number >= 0"):
                callback.on_train_begin(args, state_at(0), TrainerControl(), model=model)


def test_passes_before_training_and_outside_prediction_steps_are_left_out(model, args):
    """Only training passes made after `on_train_begin`, and evaluation passes that Trainer reports as
    its prediction steps, count; `predict` gets its figures in its metrics, under its prefix."""
    callback = SARCallback(sar_weight=PEAK, schedule="constant")
    stats = model.sar_loss.sar_stats
    stats.update(True, torch.tensor(9.0), torch.tensor(9.0), torch.tensor(0))  # a training pass before train()
    stats.update(False, torch.tensor(9.0), None, torch.tensor(0))  # inference before train()
    callback.on_train_begin(args, state_at(0), TrainerControl(), model=model)
    stats.update(True, torch.tensor(0.5), torch.tensor(1.5), torch.tensor(0))
    logs = {"loss": 2.0}
    callback.on_log(args, state_at(1), TrainerControl(), logs=logs, model=model)
    assert logs["sar/entropy"] == 0.5 and logs["sar/ce_loss"] == 1.5

    stats.update(False, torch.tensor(9.0), None, torch.tensor(0))  # inference of the user's
    for entropy in (0.2, 0.4):  # two prediction steps
        stats.update(False, torch.tensor(entropy), None, torch.tensor(0))
        callback.on_prediction_step(args, state_at(1), TrainerControl(), model=model)
    stats.update(False, torch.tensor(9.0), None, torch.tensor(0))  # more inference, after the predict
    metrics = {"holdout_loss": 1.0, "holdout_runtime": 0.1}
    callback.on_predict(args, state_at(1), TrainerControl(), metrics=metrics, model=model)
    assert metrics["holdout_sar/entropy"] == pytest.approx(0.3)
    stats.update(False, torch.tensor(0.7), None, torch.tensor(0))
    callback.on_prediction_step(args, state_at(1), TrainerControl(), model=model)
    logs = {"eval_loss": 1.0, "eval_runtime": 0.1}  # the next evaluation sees its own step only
    callback.on_log(args, state_at(1), TrainerControl(), logs=logs, model=model)
    assert logs["eval_sar/entropy"] == pytest.approx(0.7)


# -- edges of the schedule and of the logs (pinned by mutation testing, issue 12) ----------------


def test_auto_granularity_switches_to_epochs_at_ten_epochs():
    callback = SARCallback(sar_weight=PEAK)
    assert [callback.granularity_for(e) for e in (9.5, 10, 10.5)] == ["step", "epoch", "epoch"]


def test_the_default_warmup_is_a_tenth_of_the_run():
    # 10 epochs of 10 steps per step: W = 1 epoch, so step 5 (e = 0.5) is half-way up the warm-up and
    # step 10 (e = 1) the peak; then the cosine over 9 epochs: e = 5.5 is half-way down.
    callback = SARCallback(sar_weight=1.0, granularity="step")
    assert [callback.weight_at(step, 100, 10) for step in (5, 10, 55)] == pytest.approx([0.5, 1.0, 0.5], abs=1e-12)


def test_runs_shorter_than_an_epoch_keep_their_fractional_length():
    # Half an epoch of 10 steps: W = 0.05 epochs (one step), then the cosine over 0.45 epochs; the
    # last step (e = 0.45) is 8/9 of the way down.
    callback = SARCallback(sar_weight=1.0)
    weights = [callback.weight_at(step, 10, 0.5) for step in (0, 1, 10)]
    assert weights == pytest.approx([0.0, 1.0, 0.0], abs=1e-12)
    expected = 0.5 * (1 + math.cos(math.pi * 8 / 9))
    assert callback.weight_at(9, 10, 0.5) == pytest.approx(expected, abs=1e-12)
    # The per-step schedule scales with the run; a callable sees the run's length itself.
    assert SARCallback(schedule=lambda epoch, epochs: epochs).weight_at(0, 10, 0.5) == 0.5


def test_a_one_step_run_reaches_the_end_of_the_cosine():
    callback = SARCallback(sar_weight=1.0, warmup_epochs=0, granularity="step")
    assert callback.weight_at(0, 1, 1) == pytest.approx(1.0) and callback.weight_at(1, 1, 1) == pytest.approx(0.0)


def test_per_epoch_the_end_of_the_run_stays_at_zero():
    # global_step = max_steps (a run resumed from its last checkpoint) is past the last epoch: λ stays 0.
    callback = SARCallback(sar_weight=PEAK, warmup_epochs=WARMUP, granularity="epoch")
    assert callback.weight_at(MAX_STEPS, MAX_STEPS, EPOCHS) == 0.0


def test_a_zero_weight_is_valid_and_never_warned_about(model, args, caplog):
    with caplog.at_level("WARNING"):
        SARCallback(sar_weight=0.0).on_train_begin(args, state_at(0), TrainerControl(), model=model)
    assert "leaves λ at 0" not in caplog.text


@pytest.mark.parametrize(("zero_steps", "warned"), [(5, False), (6, True)])
def test_the_warning_starts_above_half_the_steps(model, args, caplog, zero_steps, warned):
    # A callable schedule that is 0 on the first `zero_steps` of 10 steps (one epoch).
    callback = SARCallback(sar_weight=PEAK, schedule=lambda e, n: 0.0 if e < zero_steps / 10 - 1e-9 else 1.0)
    with caplog.at_level("WARNING"):
        callback.on_train_begin(args, state_at(0, max_steps=10, epochs=1), TrainerControl(), model=model)
    assert (f"leaves λ at 0 on {zero_steps} of the 10 steps" in caplog.text) is warned


def test_on_log_without_logs_or_model_and_the_summary_leave_the_pending_stats(model, args):
    callback = SARCallback(sar_weight=PEAK, schedule="constant")
    callback.on_step_begin(args, state_at(0), TrainerControl(), model=model)
    stats = model.sar_loss.sar_stats
    stats.pop(training=True), stats.pop(training=False)
    stats.update(False, torch.tensor(0.25), None, torch.tensor(0))
    callback.on_prediction_step(args, state_at(1), TrainerControl(), model=model)
    callback.on_log(args, state_at(1), TrainerControl(), logs=None, model=model)
    logs = {"loss": 1.0}
    callback.on_log(args, state_at(1), TrainerControl(), logs=logs, model=None)
    assert logs == {"loss": 1.0}
    logs = {"loss": 1.0}  # no training pass computed the term in this window: nothing to add
    callback.on_log(args, state_at(1), TrainerControl(), logs=logs, model=model)
    assert logs == {"loss": 1.0}
    # The end-of-training summary takes no evaluation entropy: it stays for the next evaluation.
    logs = {"train_runtime": 1.0, "train_loss": 2.0}
    callback.on_log(args, state_at(1), TrainerControl(), logs=logs, model=model)
    assert set(logs) == {"train_runtime", "train_loss"}
    assert stats.pop(training=False)["entropy"] == pytest.approx(0.25)
    logs = {"eval_loss": 1.0, "eval_runtime": 0.1}  # an evaluation without SAR terms adds nothing
    callback.on_log(args, state_at(1), TrainerControl(), logs=logs, model=model)
    assert set(logs) == {"eval_loss", "eval_runtime"}


def test_on_log_updates_a_history_entry_with_the_same_keys_and_tolerates_an_empty_history(model, args):
    callback = SARCallback(sar_weight=PEAK, schedule="constant")
    callback.on_step_begin(args, state_at(0), TrainerControl(), model=model)
    stats = model.sar_loss.sar_stats
    stats.pop(training=True), stats.pop(training=False)
    stats.update(True, torch.tensor(0.5), torch.tensor(1.5), torch.tensor(0))
    state, logs = state_at(1), {"loss": 2.0}
    state.log_history.append(dict(logs))  # exactly a copy of `logs`
    callback.on_log(args, state, TrainerControl(), logs=logs, model=model)
    assert state.log_history[-1]["sar/entropy"] == pytest.approx(0.5)
    stats.update(True, torch.tensor(0.5), torch.tensor(1.5), torch.tensor(0))
    empty, logs = state_at(1), {"loss": 2.0}
    callback.on_log(args, empty, TrainerControl(), logs=logs, model=model)
    assert logs["sar/entropy"] == pytest.approx(0.5) and empty.log_history == []
