"""The spatial entropy of [CLS] attention maps (Peruzzo et al., Machine Learning 2024).

Paper: https://arxiv.org/abs/2206.04636. The steps follow the authors' release: threshold
the pre-softmax [CLS]-to-patch scores at their mean, split the mask into 8-connected
regions, and take the entropy of the score mass over the regions. Unlike the release,
all maps are labelled and summed at once (no Python loop over images and heads), and the
backward pass is written out (`_RegionEntropy`).

Nothing here reads a tensor's values on the host or shapes a tensor by them: the region
sums go into a fixed number of slots per map (`max_regions` of the grid), and bad maps are
masked with `torch.where`, so `torch.compile(fullgraph=True)` and `torch.export` trace it
whole, with the labelling as one opaque operator.
"""

import torch

from .components import label_maps, max_regions

_EPS = 1e-9  # the authors' constant of step 4
# Rows whose largest |score| exceeds this are scaled by an exact power of two first, so
# that `s - mean` and the region sums cannot overflow; the entropy is scale-free up to the
# 1e-9 above.
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
    if connectivity not in (4, 8):
        raise ValueError(f"`connectivity` must be 4 or 8, got {connectivity}.")
    gh, gw = _check_grid(grid_size)
    if gh * gw != cls_logits.shape[-1]:
        raise ValueError(
            f"`grid_size` {gh}x{gw} has {gh * gw} patches but `cls_logits` has {cls_logits.shape[-1]} "
            "scores per map; leave out the [CLS], distillation and register tokens and pass the patch grid."
        )

    dtype = torch.float64 if cls_logits.dtype == torch.float64 else torch.float32
    with torch.autocast(cls_logits.device.type, enabled=False):
        scores = cls_logits.to(dtype).reshape(-1, gh * gw)
        entropy, valid = _RegionEntropy.apply(scores, gh, gw, connectivity)
    entropy, valid = entropy.reshape(cls_logits.shape[:2]), valid.reshape(cls_logits.shape[:2])
    skipped = (~valid).sum()
    if reduction == "mean":
        entropy = entropy.sum() / valid.sum().clamp(min=1)
    return (entropy, skipped) if return_skipped else entropy


class _RegionEntropy(torch.autograd.Function):
    """[M, n] scores -> ([M] entropies, [M] bool validity): SPEC steps 2-6 with an analytic backward.

    With `x_j = s_j - m + eps` on the mask, `mass_r = sum_{j in r} x_j`, `T = sum_r mass_r`,
    `p_r = mass_r / T` and `H = -sum_r p_r log p_r`:

        dH/dmass_r = -(log p_r + H) / T =: g_r
        dH/ds_k    = g(k) - mean_j g(j),   g(j) = g_r for j in region r, 0 off the mask

    (the mean term is the gradient through `m`). One gather and one mean over the pixels, instead
    of autograd's chain through the scatter, the subtraction and the per-region operations.
    """

    @staticmethod
    def forward(ctx, scores, gh, gw, connectivity):
        # Rows with NaN or ±inf have a non-finite largest |s|: they get entropy 0 and gradient 0
        # (masked per map below; their pixels stay inside their own map's slots). Rows with a
        # huge |s| are scaled by an exact power of two; every other row by exactly 1.
        magnitude = torch.linalg.vector_norm(scores, ord=float("inf"), dim=-1, keepdim=True)
        valid = torch.isfinite(magnitude)
        scale = torch.exp2(-torch.log2(magnitude / _SAFE_MAGNITUDE).ceil().clamp(min=0))
        scale = torch.where(valid, scale, 1.0)
        # Step 2, the mean of the scaled row. A float32 row sums without overflow in float64;
        # a float64 row has no wider type, so it is scaled first.
        if scores.dtype == torch.float64:
            total = (scores * scale).sum(dim=-1, keepdim=True)
        else:
            total = scores.sum(dim=-1, keepdim=True, dtype=torch.float64) * scale
        mean = (total / scores.shape[-1]).to(scores.dtype)
        x = torch.addcmul(-mean, scores, scale)  # s*scale - mean, exact to one rounding
        mask = x > 0  # the same as s*scale > mean
        labels, _ = label_maps(mask.reshape(-1, gh, gw), connectivity)  # step 3
        labels = labels.reshape(x.shape)
        # Step 4 without the relu: only the mask reaches a region slot (the background lands in
        # slot 0, which is cleared). The eps goes on after the subtraction: folded into
        # `eps - mean` it would round away whenever |mean| > ~0.02.
        x.add_(_EPS)
        # Step 5, into as many slots as the grid can hold regions (a bound fixed by the grid, so
        # no shape depends on the data).
        n_slots = max_regions(gh, gw, connectivity) + 1
        mass = x.new_zeros(x.shape[0], n_slots).scatter_add_(1, labels, x)
        mass[:, 0].zero_()
        mass_total = mass.sum(dim=-1, keepdim=True)
        p = mass / torch.where(mass_total > 0, mass_total, 1.0)
        # Step 6: empty slots (p = 0) contribute 0.
        log_p = torch.log(torch.where(p > 0, p, 1.0))
        entropy = -(p * log_p).sum(dim=-1)
        valid = valid.squeeze(-1)
        entropy = torch.where(valid, entropy, 0.0)
        ctx.save_for_backward(labels, p, log_p, entropy, mass_total, scale, valid)
        ctx.mark_non_differentiable(valid)
        return entropy, valid

    @staticmethod
    def backward(ctx, grad_entropy, _grad_valid):
        labels, p, log_p, entropy, mass_total, scale, valid = ctx.saved_tensors
        # g_r per slot, times the incoming gradient and the row's scale; 0 for empty slots
        # (slot 0 included) and for skipped maps, whatever their non-finite values.
        weight = grad_entropy.unsqueeze(-1) * scale / torch.where(mass_total > 0, mass_total, 1.0)
        g = torch.where((p > 0) & valid.unsqueeze(-1), -(log_p + entropy.unsqueeze(-1)) * weight, 0.0)
        grad = torch.gather(g, 1, labels)
        grad -= grad.mean(dim=-1, keepdim=True)
        return grad, None, None, None


def _check_grid(grid_size) -> tuple[int, int]:
    try:
        gh, gw = (int(side) for side in grid_size)
    except (TypeError, ValueError):
        raise ValueError(f"`grid_size` must be a pair (gh, gw) of positive ints, got {grid_size!r}.") from None
    if gh <= 0 or gw <= 0:
        raise ValueError(f"`grid_size` sides must be positive, got {gh}x{gw}.")
    return gh, gw


__all__ = ["spatial_entropy"]
