"""`compute_metrics` against a reference that ranks each row's classes with Python's `sorted`.

The reference orders the classes by score, highest first, and a tie by the lower index (as
`argmax` breaks it); a label is a top-k hit when it is among the first k. Scores drawn from a
few integers make ties common.
"""

import numpy as np
import pytest
import torch
from transformers import EvalPrediction

from sar_hf.metrics import compute_metrics


def reference(logits, labels) -> dict[str, float]:
    rankings = [sorted(range(len(row)), key=lambda c: (-row[c], c)) for row in logits]
    ranks = [ranking.index(label) for ranking, label in zip(rankings, labels, strict=True)]
    metrics = {"accuracy": sum(rank == 0 for rank in ranks) / len(ranks)}
    if logits.shape[1] > 5:
        metrics["top5_accuracy"] = sum(rank < 5 for rank in ranks) / len(ranks)
    return metrics


def draw(rows: int, classes: int, seed: int = 0, ties: bool = True):
    rng = np.random.default_rng(seed)
    logits = rng.integers(0, 3, (rows, classes)) if ties else rng.standard_normal((rows, classes))
    return logits.astype(np.float32), rng.integers(0, classes, rows)


@pytest.mark.parametrize("ties", [True, False], ids=["ties", "no_ties"])
@pytest.mark.parametrize("classes", [1, 2, 3, 4, 5, 6, 7, 10, 100])
def test_accuracy_and_top5_against_a_sort_for_every_class_count_around_five(classes, ties):
    logits, labels = draw(300, classes, seed=classes, ties=ties)
    metrics = compute_metrics((logits, labels))
    expected = reference(logits, labels)
    assert set(metrics) == set(expected)  # top-5 only above 5 classes, where it says something
    assert metrics == pytest.approx(expected, abs=1e-12)
    assert all(type(value) is float for value in metrics.values())  # JSON-serialisable, as Trainer logs them


@pytest.mark.parametrize("position", range(9))
def test_a_label_at_each_place_of_the_ranking(position):
    # One row, 9 classes with distinct scores: the label is the position-th best class.
    logits = np.array([[0.3, 0.9, 0.1, 0.5, 0.7, 0.2, 0.8, 0.4, 0.6]])
    label = np.argsort(-logits[0])[position]
    assert compute_metrics((logits, np.array([label]))) == {
        "accuracy": float(position == 0),
        "top5_accuracy": float(position < 5),
    }


def test_ties_go_to_the_lower_class_in_both_metrics():
    # Seven classes tie at the top: class 1 comes first, class 7 seventh.
    logits = np.array([[0.0, 2, 2, 2, 2, 2, 2, 2]] * 4)
    labels = np.array([1, 5, 6, 0])
    assert compute_metrics((logits, labels)) == {"accuracy": 0.25, "top5_accuracy": 0.5}
    rows = np.array([[0.0, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 1, 2, 0, 2, 0, 1, 1, 2]] * 20)
    labels = np.arange(20)
    assert compute_metrics((rows, labels)) == reference(rows, labels)


@pytest.mark.parametrize("classes", [6, 7, 20, 50])
def test_the_top5_holds_the_class_that_argmax_picks(classes):
    # Scores from {0, 1, 2}: often more than five classes tie at the top.
    logits, _ = draw(2000, classes, seed=classes)
    metrics = compute_metrics((logits, logits.argmax(axis=-1)))
    assert metrics == {"accuracy": 1.0, "top5_accuracy": 1.0}


def test_nan_scores_rank_first_and_a_nan_label_score_is_never_a_hit():
    logits = np.array(
        [
            [np.nan, 0, 1, 2, 3, 4, 5],  # class 0's NaN comes first (argmax takes it), then 6, 5, 4, 3, 2
            [np.nan, 0, 1, 2, 3, 4, 5],
            [np.nan, 0, 1, 2, 3, 4, 5],
            [np.nan] * 7,  # a diverged model scores nothing
        ]
    )
    labels = np.array([6, 3, 1, 0])
    assert compute_metrics((logits, labels)) == {"accuracy": 0.0, "top5_accuracy": 0.5}


def test_a_label_that_is_no_class_is_a_miss():
    logits = np.array([[0.0, 1, 2, 3, 4, 5], [5.0, 4, 3, 2, 1, 0], [5.0, 4, 3, 2, 1, 0]])
    assert compute_metrics((logits, np.array([6, -100, 0]))) == {"accuracy": 1 / 3, "top5_accuracy": 1 / 3}


@pytest.mark.parametrize(
    "wrap",
    [
        lambda logits, labels: (logits, labels),
        lambda logits, labels: EvalPrediction(predictions=logits, label_ids=labels),
        # `include_for_metrics=["inputs", "loss"]`: four elements, which do not unpack into two
        lambda logits, labels: EvalPrediction(logits, labels, inputs=np.zeros((len(labels), 3)), losses=np.ones(1)),
        lambda logits, labels: ((logits, np.zeros((len(labels), 3))), labels),  # extra outputs after the logits
        lambda logits, labels: ([logits, None], labels),
        lambda logits, labels: (logits, labels[:, None]),  # labels [N, 1]
        lambda logits, labels: (logits, labels.tolist()),
        lambda logits, labels: (torch.from_numpy(logits), torch.from_numpy(labels)),
        lambda logits, labels: (logits.astype(np.float16), labels.astype(np.int32)),
    ],
    ids=[
        "tuple",
        "eval_prediction",
        "eval_prediction_with_inputs_and_losses",
        "logits_first",
        "output_list",
        "labels_n_by_1",
        "label_list",
        "tensors",
        "fp16",
    ],
)
def test_the_forms_trainer_and_users_pass(wrap):
    logits, labels = draw(50, 8, seed=3)
    assert compute_metrics(wrap(logits, labels)) == pytest.approx(reference(logits, labels), abs=1e-12)


@pytest.mark.parametrize(
    ("logits", "labels"),
    [
        (np.zeros(4), np.zeros(4)),  # logits [N]
        (np.zeros((4, 3, 2)), np.zeros(4)),  # logits [N, classes, ...]
        (np.zeros((4, 3)), np.zeros(5)),
        (np.zeros((4, 3)), np.zeros((4, 2))),  # labels [N, 2]: 8 labels for 4 rows
    ],
)
def test_shapes_that_do_not_match_are_a_value_error(logits, labels):
    with pytest.raises(ValueError, match="Expected logits"):
        compute_metrics((logits, labels))


def test_no_rows_give_a_nan_accuracy():
    metrics = compute_metrics((np.zeros((0, 3)), np.zeros(0, dtype=int)))
    assert list(metrics) == ["accuracy"]
    assert np.isnan(metrics["accuracy"])
