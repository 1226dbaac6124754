"""`SARTrainer` / `Trainer` with `SARCallback`: real training runs of a few steps on a tiny model."""

import math

import pytest
import torch
from tiny import TINY, TinyImages
from transformers import Trainer, TrainerCallback, TrainingArguments

import sar_hf.loss
from sar_hf import SARCallback, SARTrainer, SARViTConfig, SARViTForImageClassification

SAR_KEYS = ("sar/entropy", "sar/ce_loss", "sar/weight", "sar/skipped_maps")


def make_model(seed: int = 0, **settings) -> SARViTForImageClassification:
    torch.manual_seed(seed)
    return SARViTForImageClassification(SARViTConfig(**TINY, **{"sar_weight": 0.5, **settings}))


def make_deit(weight: float = 0.5):
    """A DeiT classifier given `SpatialEntropyLoss`: the path of every ViT-family model but ViT."""
    from transformers import DeiTConfig, DeiTForImageClassification

    from sar_hf import SpatialEntropyLoss

    torch.manual_seed(0)
    model = DeiTForImageClassification(DeiTConfig(**TINY))
    SpatialEntropyLoss(model, sar_weight=weight)
    return model


def make_args(tmp_path, **overrides) -> TrainingArguments:
    settings = {
        "output_dir": str(tmp_path),
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 4,
        "num_train_epochs": 2,
        "learning_rate": 1e-2,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": 0,
        **overrides,
    }
    return TrainingArguments(**settings)


def record_weights(model) -> list[tuple[float, dict]]:
    """Records (the scheduled λ, forward kwargs) at every forward pass of `model`."""
    seen = []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((module.sar_loss.scheduled_sar_weight, kwargs)), with_kwargs=True
    )
    return seen


def train_logs(trainer) -> list[dict]:
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def test_training_logs_the_sar_terms_and_follows_the_schedule(tmp_path):
    model = make_model()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    callback = SARCallback(warmup_epochs=1, granularity="step")
    args = make_args(tmp_path, num_train_epochs=3, eval_strategy="epoch")
    trainer = SARTrainer(
        model=model, args=args, train_dataset=TinyImages(), eval_dataset=TinyImages(4, seed=1), callbacks=[callback]
    )
    assert trainer.callback_handler.callbacks[0] is callback
    trainer.train()

    for name, p in model.named_parameters():
        assert not torch.equal(before[name], p), f"{name} did not change"

    logs = train_logs(trainer)
    assert [entry["step"] for entry in logs] == [1, 2, 3, 4, 5, 6]
    for entry in logs:
        assert set(SAR_KEYS) <= set(entry)
        # λ of the step that was just taken: the one set when `global_step` was step - 1.
        expected = callback.weight_at(entry["step"] - 1, 6, 3)
        assert entry["sar/weight"] == pytest.approx(expected, abs=1e-12)
        assert entry["sar/entropy"] > 0 and entry["sar/skipped_maps"] == 0
        # The loss that was optimised used that λ.
        assert entry["loss"] == pytest.approx(
            entry["sar/ce_loss"] + entry["sar/weight"] * entry["sar/entropy"], abs=1e-5
        )
    assert [entry["sar/weight"] for entry in logs][:3] == pytest.approx([0.0, 0.25, 0.5])  # warm-up over epoch 0

    evaluations = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    assert len(evaluations) == 3
    assert all(entry["eval_sar/entropy"] > 0 for entry in evaluations)
    assert not any(key.startswith("sar/") for entry in evaluations for key in entry)

    metrics = trainer.evaluate()
    # One evaluation batch: the logged mean is that batch's entropy, recomputed here.
    eval_data = TinyImages(4, seed=1)
    model.eval()
    with torch.no_grad():
        expected = model(eval_data.pixel_values, labels=eval_data.labels).spatial_entropy.item()
    assert metrics["eval_sar/entropy"] == pytest.approx(expected, abs=1e-5)
    assert trainer.state.log_history[-1]["eval_sar/entropy"] == metrics["eval_sar/entropy"]


def test_gradient_accumulation_keeps_lambda_per_optimizer_step(tmp_path):
    model = make_model()
    seen = record_weights(model)
    callback = SARCallback(warmup_epochs=1, granularity="step")
    args = make_args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    trainer = SARTrainer(model=model, args=args, train_dataset=TinyImages(), callbacks=[callback])
    trainer.train()

    assert trainer.state.global_step == 4
    weights = [weight for weight, _ in seen]
    assert len(weights) == 8  # two micro-batches per optimizer step
    for step in range(4):
        assert weights[2 * step] == weights[2 * step + 1] == pytest.approx(callback.weight_at(step, 4, 2))
    assert all("num_items_in_batch" in kwargs for _, kwargs in seen)  # Trainer normalises over 4 items

    for entry in train_logs(trainer):
        # Summed over the micro-batches, the loss is the mean CE plus λ times the mean entropy.
        assert entry["loss"] == pytest.approx(
            entry["sar/ce_loss"] + entry["sar/weight"] * entry["sar/entropy"], abs=1e-5
        )
        assert 0 < entry["sar/ce_loss"] < 10 and 0 < entry["sar/entropy"] < math.log(16)


def test_gradient_checkpointing_run_reports_the_entropy(tmp_path):
    model = make_model(sar_no_skip_no_norm=True)
    before = model.vit.layers[-1].attention.q_proj.weight.detach().clone()
    args = make_args(tmp_path, num_train_epochs=1, gradient_checkpointing=True)
    trainer = SARTrainer(
        model=model, args=args, train_dataset=TinyImages(), callbacks=[SARCallback(schedule="constant")]
    )
    trainer.train()
    assert model.is_gradient_checkpointing
    logs = train_logs(trainer)
    assert len(logs) == 2 and all(entry["sar/entropy"] > 0 for entry in logs)
    assert not torch.equal(before, model.vit.layers[-1].attention.q_proj.weight)


class Recorder(TrainerCallback):
    """A reporting integration stand-in: keeps a copy of every `logs` it is shown."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


@pytest.mark.parametrize("trainer_class", [SARTrainer, Trainer])
def test_reporting_callbacks_before_the_sar_callback(tmp_path, trainer_class):
    recorder = Recorder()
    args = make_args(tmp_path, num_train_epochs=1)
    trainer = trainer_class(
        model=make_model(), args=args, train_dataset=TinyImages(), callbacks=[recorder, SARCallback()]
    )
    trainer.train()
    shown = [logs for logs in recorder.logs if "loss" in logs]
    assert len(shown) == 2
    if trainer_class is SARTrainer:  # the SAR callback was moved first
        assert all(set(SAR_KEYS) <= set(logs) for logs in shown)
    else:  # a plain Trainer keeps the order: the recorder saw the logs before the SAR keys were added
        assert not any("sar/entropy" in logs for logs in shown)
    assert all("sar/entropy" in entry for entry in train_logs(trainer))  # the history has them either way


def test_tensorboard_receives_the_sar_scalars(tmp_path, monkeypatch):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    args = make_args(tmp_path, num_train_epochs=1, report_to="tensorboard")
    trainer = SARTrainer(model=make_model(), args=args, train_dataset=TinyImages())
    trainer.train()
    trainer.callback_handler.on_train_end(args, trainer.state, trainer.control)  # flush the writer
    runs = [path.parent for path in (tmp_path / "tb").rglob("events.out.tfevents.*")]
    assert runs
    tags = set()
    for run in runs:
        accumulator = event_accumulator.EventAccumulator(str(run))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    assert {"train/sar/entropy", "train/sar/ce_loss", "train/sar/weight", "train/sar/skipped_maps"} <= tags


def test_resume_from_checkpoint_continues_the_lambda_sequence(tmp_path):
    def run(output_dir, resume=None):
        model = make_model()
        seen = record_weights(model)
        args = make_args(output_dir, num_train_epochs=3, save_strategy="steps", save_steps=3)
        callback = SARCallback(warmup_epochs=1, granularity="step")
        trainer = SARTrainer(model=model, args=args, train_dataset=TinyImages(), callbacks=[callback])
        trainer.train(resume_from_checkpoint=resume)
        return [weight for weight, _ in seen], trainer

    full, uninterrupted = run(tmp_path / "a")
    assert len(full) == 6 and len(set(full)) > 2
    resumed, trainer = run(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-3"))
    assert resumed == pytest.approx(full[3:])
    full_logged = {entry["step"]: entry["sar/weight"] for entry in train_logs(uninterrupted)}
    for entry in train_logs(trainer):
        assert entry["sar/weight"] == pytest.approx(full_logged[entry["step"]])
    assert [entry["step"] for entry in train_logs(trainer)][-3:] == [4, 5, 6]
    # Every weight came back from the checkpoint (Trainer alone would skip ViT's renamed ones).
    for (name, a), b in zip(uninterrupted.model.named_parameters(), trainer.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_non_finite_scores_are_skipped_and_training_stays_finite(tmp_path, monkeypatch):
    real = sar_hf.loss.spatial_entropy
    calls = []

    def poisoned(cls_logits, grid_size, **kwargs):
        calls.append(None)
        if len(calls) % 2:  # every other forward: one +inf map and one NaN map
            cls_logits = cls_logits.clone()
            cls_logits[0, 0, 3] = math.inf
            cls_logits[1, 2, 0] = math.nan
        return real(cls_logits, grid_size, **kwargs)

    monkeypatch.setattr(sar_hf.loss, "spatial_entropy", poisoned)
    model = make_model()
    args = make_args(tmp_path, num_train_epochs=2)
    trainer = SARTrainer(
        model=model, args=args, train_dataset=TinyImages(), callbacks=[SARCallback(schedule="constant")]
    )
    trainer.train()

    assert len(calls) == 4
    logs = train_logs(trainer)
    assert [entry["sar/skipped_maps"] for entry in logs] == [2, 0, 2, 0]
    assert all(math.isfinite(entry["loss"]) and math.isfinite(entry["sar/entropy"]) for entry in logs)
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name


# -- the term joins whatever loss Trainer computes -------------------------------------------------


class SoftImages(TinyImages):
    """TinyImages with soft targets [classes]: 0.7 on the label, 0.1 elsewhere."""

    def __getitem__(self, i):
        item = super().__getitem__(i)
        return {**item, "labels": torch.nn.functional.one_hot(item["labels"], 3).float() * 0.7 + 0.1}


def soft_cross_entropy(outputs, labels, num_items_in_batch=None):
    """A user's soft-target loss: Trainer counts `classes` items per image of soft targets."""
    nll = -(labels * outputs["logits"].log_softmax(-1)).sum()
    images = labels.shape[0] if num_items_in_batch is None else num_items_in_batch / labels.shape[-1]
    return nll / images


def squared_error(outputs, labels, num_items_in_batch=None):
    """A user's custom loss on class indices."""
    one_hot = torch.nn.functional.one_hot(labels, 3).float()
    return ((outputs["logits"].softmax(-1) - one_hot) ** 2).sum() / labels.shape[0]


def hand_loss(setting: str, logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The loss each setting asks for, computed here from the logits."""
    log_p = logits.double().log_softmax(-1)
    if setting == "label_smoothing":  # Transformers' LabelSmoother, ε = 0.1
        nll = -log_p.gather(1, labels[:, None]).mean()
        return (0.9 * nll - 0.1 * log_p.mean(-1).mean()).item()
    if setting == "soft_targets":
        return -(labels.double() * log_p).sum(-1).mean().item()
    return ((log_p.exp() - torch.nn.functional.one_hot(labels, 3).double()) ** 2).sum(-1).mean().item()


SETTINGS = {
    "label_smoothing": ({"label_smoothing_factor": 0.1}, None, TinyImages),
    "soft_targets": ({}, soft_cross_entropy, SoftImages),
    "custom_loss": ({}, squared_error, TinyImages),
}


@pytest.mark.parametrize("model_kind", ["sar-vit", "deit"])
@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_the_term_is_added_to_the_loss_trainer_computes(tmp_path, setting, model_kind):
    """Each step's logged loss equals the setting's loss plus λ·SE, both computed here on a copy
    of the model taken before the step (one batch holds the whole dataset, so every step sees it)."""
    from references import eager_cls_log_probs, eager_twin, reference_entropy

    overrides, loss_func, dataset_class = SETTINGS[setting]
    dataset = dataset_class(4)
    model = make_deit() if model_kind == "deit" else make_model()
    expected = []

    class Reference(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            twin = eager_twin(model).train()
            batch = [dataset[i] for i in range(len(dataset))]
            pixel_values = torch.stack([item["pixel_values"] for item in batch])
            labels = torch.stack([item["labels"] for item in batch])
            with torch.no_grad():
                logits = twin(pixel_values).logits
            entropy = reference_entropy(eager_cls_log_probs(twin, pixel_values, -1, 16), (4, 4))
            expected.append(hand_loss(setting, logits, labels) + 0.5 * entropy)

    args = make_args(tmp_path, per_device_train_batch_size=4, num_train_epochs=2, learning_rate=1e-2, **overrides)
    trainer = SARTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        compute_loss_func=loss_func,
        callbacks=[SARCallback(schedule="constant"), Reference()],
    )
    trainer.train()
    logs = train_logs(trainer)
    assert len(logs) == len(expected) == 2
    for entry, loss in zip(logs, expected, strict=True):
        assert entry["loss"] == pytest.approx(loss, abs=2e-4)  # Trainer rounds the logged loss
        assert entry["sar/entropy"] > 0 and entry["sar/weight"] == 0.5


@pytest.mark.parametrize("with_callback", [False, True], ids=["alone", "with-sar-callback"])
@pytest.mark.parametrize("model_kind", ["sar-vit", "deit"])
@pytest.mark.parametrize("setting", ["label_smoothing", "custom_loss"])
def test_a_plain_trainer_that_would_drop_the_term_stops_before_its_first_step(
    tmp_path, setting, model_kind, with_callback
):
    """Label smoothing or a `compute_loss_func`: Trainer calls the model without labels and computes the
    loss itself, and a plain Trainer adds no term. The first backward stops with the three ways."""
    overrides, loss_func, _ = SETTINGS[setting]
    model = make_model() if model_kind == "sar-vit" else make_deit()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = Trainer(
        model=model,
        args=make_args(tmp_path, **overrides),
        train_dataset=TinyImages(),
        compute_loss_func=loss_func,
        callbacks=[SARCallback(schedule="constant")] if with_callback else [],
    )
    with pytest.raises(RuntimeError, match=r"lacks the SAR term.*labels.*compute_loss_func.*SARTrainer"):
        trainer.train()
    assert trainer.state.global_step == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize("weight", [-1.0, math.nan, math.inf])
def test_a_bad_weight_set_on_the_config_after_building_stops_training(tmp_path, weight):
    model = make_model()
    model.config.sar_weight = weight
    trainer = SARTrainer(model=model, args=make_args(tmp_path), train_dataset=TinyImages())
    with pytest.raises(ValueError, match="`sar_weight` must be a finite number >= 0"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_predict_reports_the_entropy_and_passes_outside_a_phase_reach_no_figure(tmp_path):
    """Passes before training, between evaluations and after them (here, in both modes, on other
    images) count nowhere; `predict` reports its own entropy under its prefix, and leaves nothing
    for the next `evaluate`. Each data set is one batch: its figure is that pass's entropy."""
    model = make_model()
    val, other = TinyImages(4, seed=1), TinyImages(4, seed=2)

    def outside(data):
        """Passes of one's own; returns the entropy of `data` in evaluation mode."""
        model.train()(data.pixel_values, labels=data.labels)
        model.eval()
        with torch.no_grad():
            return model(data.pixel_values, labels=data.labels).spatial_entropy.item()

    outside(other)
    trainer = SARTrainer(
        model=model,
        args=make_args(tmp_path, num_train_epochs=1),
        train_dataset=TinyImages(),
        eval_dataset=val,
        callbacks=[SARCallback(schedule="constant")],
    )
    trainer.train()
    first = train_logs(trainer)[0]  # the first window holds the first step's pass only
    assert first["loss"] == pytest.approx(first["sar/ce_loss"] + 0.5 * first["sar/entropy"], abs=1e-5)

    expected_other, expected_val = outside(other), outside(val)
    assert trainer.predict(other).metrics["test_sar/entropy"] == pytest.approx(expected_other, abs=1e-5)
    outside(TinyImages(4, seed=3))
    holdout = trainer.predict(other, metric_key_prefix="holdout").metrics
    assert holdout["holdout_sar/entropy"] == pytest.approx(expected_other, abs=1e-5)
    assert trainer.evaluate()["eval_sar/entropy"] == pytest.approx(expected_val, abs=1e-5)


def test_sar_trainer_needs_a_model_with_a_sar_loss(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    with pytest.raises(ValueError, match=r"SpatialEntropyLoss\(model\)"):
        SARTrainer(model=ViTForImageClassification(ViTConfig(**TINY)), args=make_args(tmp_path))


def test_lora_model_trains_with_the_term_through_sar_trainer(tmp_path):
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(target_modules=["q_proj", "k_proj", "v_proj"], modules_to_save=["classifier"])
    model = peft.get_peft_model(make_model(), lora)
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    trainer = SARTrainer(
        model=model,
        args=make_args(tmp_path, label_smoothing_factor=0.1),
        train_dataset=TinyImages(),
        callbacks=[SARCallback(schedule="constant")],
    )
    trainer.train()
    logs = train_logs(trainer)
    assert logs and all(entry["sar/entropy"] > 0 and entry["sar/weight"] == 0.5 for entry in logs)
    assert all(not torch.equal(adapters[n], p) for n, p in model.named_parameters() if n in adapters)


# -- edges pinned by mutation testing (issue 12) -----------------------------------------------------


def test_a_wrapped_loss_gets_the_term_scaled_by_its_share_of_the_accumulated_batch(tmp_path):
    """Two micro-batches of 2 images with soft targets: `compute_loss_func` normalises over Trainer's
    item count (2·4·3), and each micro-batch's term counts for half of the step."""
    from references import eager_cls_log_probs, eager_twin, reference_entropy

    model = make_model()
    dataset = SoftImages(4)
    twin = eager_twin(model).train()
    with torch.no_grad():
        logits = twin(dataset.pixel_values).logits.double()
    soft = torch.stack([dataset[i]["labels"] for i in range(4)]).double()
    expected = -(soft * logits.log_softmax(-1)).sum(-1).mean().item() + 0.5 * reference_entropy(
        eager_cls_log_probs(twin, dataset.pixel_values, -1, 16), (4, 4)
    )
    args = make_args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2, num_train_epochs=1)
    trainer = SARTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        compute_loss_func=soft_cross_entropy,
        callbacks=[SARCallback(schedule="constant")],
    )
    trainer.train()
    (entry,) = train_logs(trainer)
    assert entry["loss"] == pytest.approx(expected, abs=2e-4)


def test_checkpoints_load_through_from_pretrained_and_trainer_loads_the_rest(tmp_path, monkeypatch, caplog):
    calls = []
    monkeypatch.setattr(
        Trainer, "_load_from_checkpoint", lambda self, folder, model=None: calls.append((folder, model))
    )
    monkeypatch.setattr(Trainer, "_load_best_model", lambda self: calls.append("best"))
    saved, other_saved = make_model(seed=1), make_model(seed=2)
    saved.save_pretrained(tmp_path / "a")
    other_saved.save_pretrained(tmp_path / "b")
    (tmp_path / "empty").mkdir()

    def assert_weights(model, reference):
        for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values(), strict=True):
            torch.testing.assert_close(a, b, msg=name)

    trainer = SARTrainer(model=make_model(), args=make_args(tmp_path / "out"))
    other = make_model(seed=3)
    trainer._load_from_checkpoint(str(tmp_path / "a"), model=other)  # into the model given
    assert_weights(other, saved)
    assert_weights(trainer.model, make_model())
    with caplog.at_level("INFO", logger="sar_hf.trainer"):
        trainer._load_from_checkpoint(str(tmp_path / "a"))
    assert_weights(trainer.model, saved)
    assert f"Loading the weights of {tmp_path / 'a'}." in caplog.text
    trainer.state.best_model_checkpoint = str(tmp_path / "b")
    trainer._load_best_model()
    assert_weights(trainer.model, other_saved)
    assert calls == []  # Trainer's own loading, which skips ViT's renamed weights, never ran

    # Folders without safetensors weights, and FSDP or DeepSpeed runs, keep Trainer's own loading.
    trainer._load_from_checkpoint(str(tmp_path / "empty"), model=other)
    trainer.state.best_model_checkpoint = str(tmp_path / "empty")
    trainer._load_best_model()
    assert calls == [(str(tmp_path / "empty"), other), "best"]
    for flag in ("is_fsdp_enabled", "is_deepspeed_enabled"):
        calls.clear()
        monkeypatch.setattr(trainer, flag, True)
        trainer._load_from_checkpoint(str(tmp_path / "a"))
        assert calls == [(str(tmp_path / "a"), None)]
        monkeypatch.setattr(trainer, flag, False)


def test_model_card_tags_schedule_and_settings(tmp_path):
    args = make_args(tmp_path)
    callback = SARCallback(schedule=lambda epoch, epochs: 0.1)
    trainer = SARTrainer(model=make_model(), args=args, callbacks=[callback])
    trainer.create_model_card(model_name="tiny-sar", tags=["sar", "my-tag"])
    card = (tmp_path / "README.md").read_text()
    header = card.split("---")[1]
    assert header.count("- sar\n") == 1 and "- my-tag\n" in header and "- spatial-entropy\n" in header
    assert "peak λ (`sar_weight`): 0.5" in card  # before training: the model's configured weight
    assert "- λ schedule: custom\n" in card
    assert "- `sar_layer`: -1\n" in card and "- `sar_no_skip_no_norm`: False\n" in card


def test_model_card_names_a_named_schedule(tmp_path):
    trainer = SARTrainer(model=make_model(), args=make_args(tmp_path), callbacks=[SARCallback(schedule="constant")])
    trainer.create_model_card(model_name="tiny-sar")
    assert "- λ schedule: constant\n" in (tmp_path / "README.md").read_text()


def test_model_card_is_written_by_the_main_process_only(tmp_path, monkeypatch):
    trainer = SARTrainer(make_model(), make_args(tmp_path))  # Trainer's positional arguments
    monkeypatch.setattr(trainer, "is_world_process_zero", lambda: False)
    trainer.create_model_card(model_name="tiny-sar")
    assert not (tmp_path / "README.md").exists()


def test_model_card_passes_trainers_arguments_and_a_single_tag(tmp_path):
    callback = SARCallback(sar_weight=0.02)
    trainer = SARTrainer(model=make_model(), args=make_args(tmp_path), callbacks=[callback])
    trainer.create_model_card("fr", tags="my-tag", model_name="tiny-sar")
    card = (tmp_path / "README.md").read_text()
    header = card.split("---")[1]
    assert "language:\n- fr\n" in header and "- my-tag\n" in header and "- sar\n" in header
    assert "tiny-sar" in card
    assert "peak λ (`sar_weight`): 0.02" in card  # the callback's peak over the model's 0.5
    # The run asks for 2 epochs: a warm-up of a tenth of them, λ set per step (runs under 10 epochs).
    assert "- λ schedule: linear warm-up over 0.2 epochs, then cosine decay to 0 (λ updated per step)\n" in card
    assert "None" not in card.split("## Spatial-entropy regularisation (SAR)")[1]


def test_model_card_of_a_model_without_sar_settings_in_its_config(tmp_path):
    from transformers import DeiTConfig, DeiTForImageClassification

    from sar_hf import SpatialEntropyLoss

    model = DeiTForImageClassification(DeiTConfig(**TINY))
    SpatialEntropyLoss(model, sar_weight=0.03, sar_layer=-2)
    SARTrainer(model=model, args=make_args(tmp_path)).create_model_card()
    card = (tmp_path / "README.md").read_text()
    assert "## Spatial-entropy regularisation (SAR)" in card
    # The loss's settings, not the config's (which has none): the card says what was trained.
    assert "peak λ (`sar_weight`): 0.03" in card and "- `sar_layer`: -2" in card
    assert "sar_no_skip_no_norm" not in card
