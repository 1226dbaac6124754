"""Classification metrics for `Trainer(compute_metrics=...)`, computed locally with numpy.

`evaluate.load("accuracy")` fetches the metric's code from the Hub, which fails offline; these
need nothing but the predictions.
"""

import numpy as np


def compute_metrics(eval_pred) -> dict[str, float]:
    """Accuracy, and top-5 accuracy when there are more than 5 classes.

    Tied scores rank by class index, the lower first, as `argmax` breaks them, so that the top-5
    always holds the top-1 class. A NaN score ranks above all others (as `argmax` takes it), and a
    label whose own score is NaN is never a hit.

    Args:
        eval_pred ([`~transformers.EvalPrediction`] or `(logits, labels)`):
            Logits `[N, num_classes]` (or a tuple whose first item they are) and labels `[N]`.

    Returns:
        `{"accuracy": ...}` plus `"top5_accuracy"` when `num_classes > 5`; Trainer prefixes them
        (`eval_accuracy`, `test_top5_accuracy`, ...).

    Example:

    ```python
    >>> compute_metrics((np.array([[0.1, 0.9], [0.8, 0.2]]), np.array([1, 1])))
    {'accuracy': 0.5}
    ```
    """
    if hasattr(eval_pred, "predictions"):
        logits, labels = eval_pred.predictions, eval_pred.label_ids
    else:
        logits, labels = eval_pred
    if isinstance(logits, (tuple, list)):  # extra model outputs after the logits
        logits = logits[0]
    logits = np.asarray(logits)
    labels = np.asarray(labels).reshape(-1)
    if logits.ndim != 2 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"Expected logits [N, num_classes] and labels [N], got {logits.shape} and {labels.shape}.")
    if labels.size == 0:
        return {"accuracy": float("nan")}
    # The label's place in each row's ranking of the classes (0: first). Ties go to the lower class
    # and a NaN score comes first, as `argmax` has them, so that top-1 is argmax and top-5 holds it;
    # a label whose own score is NaN, or that is no class, comes after every class.
    classes = np.arange(logits.shape[1])  # [C]
    label_score = np.where(classes == labels[:, None], logits, -np.inf).max(axis=-1, keepdims=True)  # [N, 1]
    ahead = ~(logits <= label_score) | ((logits == label_score) & (classes < labels[:, None]))  # [N, C]
    rank = ahead.sum(axis=-1)  # [N]
    metrics = {"accuracy": float(np.mean(rank == 0))}
    if logits.shape[1] > 5:
        metrics["top5_accuracy"] = float(np.mean(rank < 5))
    return metrics


__all__ = ["compute_metrics"]
