"""The spatial entropy of [CLS] attention maps (Peruzzo et al., Machine Learning 2024).

Paper: https://arxiv.org/abs/2206.04636. The steps follow the authors' release: threshold
the pre-softmax [CLS]-to-patch scores at their mean, split the mask into 8-connected
regions, and take the entropy of the score mass over the regions. Unlike the release,
all maps are labelled and summed at once (no Python loop over images and heads).
"""

import torch

from .components import connected_components

_EPS = 1e-9  # the authors' constant of step 4
# Rows whose largest |score| exceeds this are scaled by an exact power of two first, so
# that `s - mean` cannot overflow; the entropy is scale-free up to the 1e-9 above.
_SAFE_MAGNITUDE = 2.0**60


def spatial_entropy(
    cls_logits: torch.Tensor,
    grid_size: tuple[int, int],
    reduction: str = "mean",
    connectivity: int = 8,
    return_skipped: bool = False,
):
    """Spatial entropy of each [CLS] attention map, SPEC steps 2-7.

    Args:
        cls_logits (`torch.Tensor` of shape `[B, heads, gh*gw]`, float):
            Pre-softmax scores of the [CLS] query against the patch keys, in raster order
            of the patch grid (any per-row constant shift, e.g. log-softmax, gives the same
            result). Any float dtype; the computation runs in float32 (float64 stays float64).
        grid_size (`tuple[int, int]`):
            `(gh, gw)`, patch rows and columns.
        reduction (`str`, *optional*, defaults to `"mean"`):
            `"mean"`: the mean entropy over the valid maps, a scalar (0 when none is valid).
            `"none"`: a `[B, heads]` tensor of entropies, 0 for skipped maps.
        connectivity (`int`, *optional*, defaults to 8):
            Neighbourhood of the regions, 8 as in the paper.
        return_skipped (`bool`, *optional*, defaults to `False`):
            Also return the number of maps left out because a score was NaN or ±inf.

    Returns:
        The entropy in nats (`[]` or `[B, heads]`), or `(entropy, skipped)` with `skipped` a
        0-dim int64 tensor when `return_skipped=True`. Never NaN or inf. Gradients flow
        through the scores and their mean; the region labels are constants.
    """
    if not isinstance(cls_logits, torch.Tensor) or not cls_logits.is_floating_point():
        kind = cls_logits.dtype if isinstance(cls_logits, torch.Tensor) else type(cls_logits).__name__
        raise TypeError(f"`cls_logits` must be a floating-point tensor, got {kind}; pass the attention scores.")
    if cls_logits.dim() != 3:
        raise ValueError(f"`cls_logits` must have shape [B, heads, gh*gw], got {tuple(cls_logits.shape)}.")
    if reduction not in ("mean", "none"):
        raise ValueError(f"`reduction` must be 'mean' or 'none', got {reduction!r}.")
    gh, gw = _check_grid(grid_size)
    if gh * gw != cls_logits.shape[-1]:
        raise ValueError(
            f"`grid_size` {gh}x{gw} has {gh * gw} patches but `cls_logits` has {cls_logits.shape[-1]} "
            "scores per map; leave out the [CLS], distillation and register tokens and pass the patch grid."
        )

    with torch.autocast(cls_logits.device.type, enabled=False):
        entropy, valid = _entropy_per_map(cls_logits, gh, gw, connectivity)
    skipped = (~valid).sum()
    if reduction == "mean":
        entropy = entropy.sum() / valid.sum().clamp(min=1)
    return (entropy, skipped) if return_skipped else entropy


def _entropy_per_map(cls_logits, gh, gw, connectivity):
    """[B, H, n] scores -> ([B, H] entropies, [B, H] bool validity)."""
    dtype = torch.float64 if cls_logits.dtype == torch.float64 else torch.float32
    scores = cls_logits.to(dtype)
    # The largest |s| of each row flags both the rows with NaN or ±inf (not finite) and the
    # rows too large for `s - mean`; the rare fixes below run only when needed. (Two
    # reductions and no |s| temporary; torch.aminmax is ~10x slower on CPU.)
    detached = scores.detach()
    magnitude = torch.maximum(detached.amax(dim=-1, keepdim=True), -detached.amin(dim=-1, keepdim=True))
    valid = torch.isfinite(magnitude)
    magnitude = torch.where(valid, magnitude, 0.0)
    any_bad, any_big = torch.stack(((~valid).any(), (magnitude > _SAFE_MAGNITUDE).any())).tolist()
    if any_bad:  # zeroed (not masked later) so that no NaN reaches the sums or gradients
        scores = torch.where(valid, scores, 0.0)
    if any_big:
        scores = scores * torch.exp2(-(torch.log2(magnitude / _SAFE_MAGNITUDE)).ceil().clamp(min=0))

    # Step 2. Written as sum / n and `+ (-mean)` below so that the backward pass broadcasts
    # the mean's gradient without full-size negate and divide passes.
    mean = scores.sum(dim=-1, keepdim=True) / scores.shape[-1]
    mask = scores > mean
    labels, counts = connected_components(mask.reshape(-1, gh, gw), connectivity, return_counts=True)  # step 3
    labels = labels.reshape(mask.shape)
    n_slots = int(counts.max()) + 1 if counts.numel() else 1  # regions of the busiest map, plus slot 0
    # Step 4 without the relu: only the mask's pixels reach a region slot, and there s > m.
    # The background lands in slot 0, which is dropped, so it gets a zero gradient as under relu.
    # The eps goes on after the subtraction: folded into `eps - mean`, it would round away
    # whenever |mean| > ~0.02, which matters for maps whose scores sit close to their mean.
    x = (scores + (-mean)).add_(_EPS)
    # Step 5: region masses by scatter-add into as many slots as the busiest map has regions.
    mass = scores.new_zeros(*scores.shape[:-1], n_slots).scatter_add(-1, labels, x)[..., 1:]
    total = mass.sum(dim=-1, keepdim=True)
    p = mass / torch.where(total > 0, total, 1.0)
    # Step 6, written so that empty slots give 0 and a finite gradient.
    plogp = torch.where(p > 0, p * torch.log(torch.where(p > 0, p, 1.0)), 0.0)
    entropy = -plogp.sum(dim=-1)
    valid = valid.squeeze(-1)
    return torch.where(valid, entropy, 0.0), valid


def _check_grid(grid_size) -> tuple[int, int]:
    try:
        gh, gw = (int(side) for side in grid_size)
    except (TypeError, ValueError):
        raise ValueError(f"`grid_size` must be a pair (gh, gw) of positive ints, got {grid_size!r}.") from None
    if gh <= 0 or gw <= 0:
        raise ValueError(f"`grid_size` sides must be positive, got {gh}x{gw}.")
    return gh, gw


__all__ = ["spatial_entropy"]
