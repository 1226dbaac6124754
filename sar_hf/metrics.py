"""Classification metrics for `Trainer(compute_metrics=...)`, computed locally with numpy.

`evaluate.load("accuracy")` fetches the metric's code from the Hub, which fails offline; these
need nothing but the predictions.
"""

import numpy as np


def compute_metrics(eval_pred) -> dict[str, float]:
    """Accuracy, and top-5 accuracy when there are more than 5 classes.

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
    metrics = {"accuracy": float(np.mean(logits.argmax(axis=-1) == labels))}
    if logits.shape[1] > 5:
        top5 = np.argpartition(-logits, 5, axis=-1)[:, :5]  # the five largest, in any order
        metrics["top5_accuracy"] = float(np.mean((top5 == labels[:, None]).any(axis=-1)))
    return metrics


__all__ = ["compute_metrics"]
