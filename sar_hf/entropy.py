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

from .components import ALGORITHMS, label_maps, max_regions, resolve_algorithm

_EPS = 1e-9  # the authors' constant of step 4
# Rows whose largest |score| reaches 2**_SAFE_EXPONENT are scaled by an exact power of two
# first, so that `s - mean` and the region sums cannot overflow; the entropy is scale-free up
# to the 1e-9 above.
_SAFE_EXPONENT = 60


def spatial_entropy(
    cls_logits: torch.Tensor,
    grid_size: tuple[int, int],
    reduction: str = "mean",
    algorithm: str = "auto",
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
        algorithm (`str`, *optional*, defaults to `"auto"`):
            How the regions are found (see [`connected_components`]): `"scipy"`, `"propagation"`,
            `"triton"`, or `"auto"` (scipy on a CPU, Triton on CUDA when it is installed,
            propagation otherwise). With `"triton"` the whole loss is fused: two kernel launches
            forward and one backward. All give the same value.
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
    if algorithm not in ALGORITHMS:
        raise ValueError(f"`algorithm` must be one of {ALGORITHMS}, got {algorithm!r}.")
    if connectivity not in (4, 8):
        raise ValueError(f"`connectivity` must be 4 or 8, got {connectivity}.")
    gh, gw = _check_grid(grid_size)
    if gh * gw != cls_logits.shape[-1]:
        raise ValueError(
            f"`grid_size` {gh}x{gw} has {gh * gw} patches but `cls_logits` has {cls_logits.shape[-1]} "
            "scores per map; leave out the [CLS], distillation and register tokens and pass the patch grid."
        )

    algorithm = resolve_algorithm(algorithm, cls_logits.device, gh * gw)
    if algorithm == "triton":
        from . import triton_kernels  # Triton is optional, and large: imported only when used

        scores = cls_logits.reshape(-1, gh * gw)  # the kernels read any float dtype
        entropy, skipped = triton_kernels.spatial_entropy(scores, gh, gw, connectivity, mean=reduction == "mean")
        entropy = entropy.reshape(cls_logits.shape[:2]) if reduction == "none" else entropy
        return (entropy, skipped) if return_skipped else entropy

    dtype = torch.float64 if cls_logits.dtype == torch.float64 else torch.float32
    with torch.autocast(cls_logits.device.type, enabled=False):
        scores = cls_logits.to(dtype).reshape(-1, gh * gw)
        entropy, valid = _RegionEntropy.apply(scores, gh, gw, connectivity, algorithm)
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
    (`torch.export` traces the forward into its graph and differentiates those operations
    instead: the same gradients, `tests/test_export_entropy.py`.)
    """

    @staticmethod
    def forward(ctx, scores, gh, gw, connectivity, algorithm):
        # The largest |s| of each row: not finite for rows with NaN or ±inf, which get entropy 0 and
        # gradient 0 (masked per map below; their pixels stay inside their own map's slots).
        magnitude = torch.maximum(scores.amax(dim=-1, keepdim=True), scores.amin(dim=-1, keepdim=True).neg())
        valid = torch.isfinite(magnitude)
        # The power of two 2**-k, k = max(e - 60, 0) for |s| = f * 2**e (0.5 <= f < 1), brings the
        # largest |s| below 2**60; exactly 1 for ordinary rows (and anything for skipped ones).
        exponent = torch.frexp(magnitude).exponent
        scale = torch.exp2((_SAFE_EXPONENT - exponent).clamp(max=0).to(scores.dtype))
        x = scores * scale
        x -= x.sum(dim=-1, keepdim=True) / x.shape[-1]  # step 2: s - mean, of the scaled row
        mask = x > 0  # s > mean: a float difference is 0 only for equal numbers, and keeps the sign
        labels = label_maps(mask.reshape(-1, gh, gw), connectivity, algorithm)[0].reshape(x.shape)  # step 3
        # Step 4 without the relu: only the mask reaches a region slot (the background lands in
        # slot 0, which is cleared). The eps goes on after the subtraction: folded into
        # `eps - mean` it would round away whenever |mean| > ~0.02.
        x += _EPS
        # Step 5, into as many slots as the grid can hold regions: a bound fixed by the grid, so
        # no shape depends on the data.
        mass = x.new_zeros(x.shape[0], max_regions(gh, gw, connectivity) + 1).scatter_add_(1, labels, x)
        mass[:, 0] = 0
        total = mass.sum(dim=-1, keepdim=True)
        total = torch.where(total > 0, total, 1.0)  # an empty mask has no regions and entropy 0
        p = mass / total
        # Step 6. Every region has p > 0 (its pixels have s > mean); empty slots give 0 * log 1.
        # `0 - sum` rather than `-sum`, so that a single region gives +0, not -0.
        log_p = torch.log(torch.where(p > 0, p, 1.0))
        valid_map = valid.squeeze(-1)
        entropy = torch.where(valid_map, 0.0 - (p * log_p).sum(dim=-1), 0.0)
        ctx.save_for_backward(labels, log_p, entropy, total, scale, valid)
        ctx.mark_non_differentiable(valid_map)
        return entropy, valid_map

    @staticmethod
    def backward(ctx, grad_entropy, _grad_valid):
        labels, log_p, entropy, total, scale, valid = ctx.saved_tensors
        # g_r for every slot, times the incoming gradient and the row's scale (x = s * scale - ...);
        # 0 for skipped maps, whose log_p is finite (non-finite p were replaced by 1 above).
        weight = torch.where(valid, grad_entropy.unsqueeze(-1) * scale / total, 0.0)
        g = (log_p + entropy.unsqueeze(-1)).mul_(weight.neg())
        g[:, 0] = 0  # the background; other empty slots are never gathered
        grad = torch.gather(g, 1, labels)
        grad -= grad.mean(dim=-1, keepdim=True)  # through the mean
        return grad, None, None, None, None


def _check_grid(grid_size) -> tuple[int, int]:
    try:
        gh, gw = (int(side) for side in grid_size)
    except (TypeError, ValueError):
        raise ValueError(f"`grid_size` must be a pair (gh, gw) of positive ints, got {grid_size!r}.") from None
    if gh <= 0 or gw <= 0:
        raise ValueError(f"`grid_size` sides must be positive, got {gh}x{gw}.")
    return gh, gw


__all__ = ["spatial_entropy"]
