"""Independent references for the SAR loss: eager attention maps and a float64 loop with scipy."""

import copy

import numpy as np
import scipy.ndimage
import torch


def eager_twin(model):
    twin = copy.deepcopy(model)
    twin.set_attn_implementation("eager")
    return twin


def eager_cls_log_probs(twin, pixel_values, layer: int, num_patches: int, **kwargs) -> torch.Tensor:
    """log of the [CLS] row of the eager twin's attention probabilities over the patches: [B, heads, n]."""
    with torch.no_grad():
        attentions = twin(pixel_values, output_attentions=True, **kwargs).attentions[layer]
    assert attentions.shape[-1] == attentions.shape[-2]  # a real N×N map
    return attentions[:, :, 0, -num_patches:].double().log()


def reference_entropy(scores: torch.Tensor, grid_size) -> float:
    """SPEC steps 2-7 in float64, one map at a time, regions from scipy: the mean over maps."""
    entropies = []
    for s in scores.double().reshape(-1, scores.shape[-1]).numpy():
        m = s.mean()
        mask = s > m
        labels, regions = scipy.ndimage.label(mask.reshape(grid_size), structure=np.ones((3, 3)))
        x = np.maximum(s - m, 0) + 1e-9
        mass = np.array([x[labels.ravel() == r].sum() for r in range(1, regions + 1)])
        p = mass / x[mask].sum() if regions else mass
        entropies.append(-(p * np.log(p)).sum())
    return float(np.mean(entropies))


def assert_equal_up_to_row_constants(scores: torch.Tensor, log_probs: torch.Tensor):
    """Pre-softmax scores `[B, heads, n]` against log-probabilities: equal up to one constant per row."""
    difference = scores.double() - log_probs
    torch.testing.assert_close(difference, difference.mean(-1, keepdim=True).expand_as(difference), rtol=0, atol=1e-5)
