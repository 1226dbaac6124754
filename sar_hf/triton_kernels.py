"""Fused Triton kernels for the labelling and the spatial entropy: one program per map.

A map of up to `MAX_TRITON_PIXELS` pixels (64×64) is one program's block, so each program reads
its map once, labels it, sums its regions and takes its entropy in one launch, through a per-map
scratch row in global memory by which its threads see each other's pointers (every write is
followed by a `debug_barrier`, a CTA-wide barrier that also orders global memory, and the scratch
is read with `volatile` loads). Every loop's condition is a sum over the whole block, so all
threads of a program take the same number of trips and meet at the same barriers. One launch
labels all maps; the entropy takes two launches forward (the maps, then the mean over them) and
one backward, with no host synchronisation and no shape that depends on the data.

Each program labels its map by union-find over pixel indices (`_components`). `parent` holds a
pixel index; a root points at itself; every tree is a star at the start of a round. A round:

1. every foreground pixel takes the smallest root among its foreground neighbours (`low`);
2. hooking: the pixel's root moves under `low` when `low` is smaller (`atomic_min`, since many
   pixels hook the same root at once);
3. pointer jumping (`parent = parent[parent]`, synchronously) until every tree is a star again.

Why the loops end, exactly: a root only ever moves under a smaller root of the same component, so
`parent` never increases, never leaves its component and never forms a cycle. Pointer jumping
therefore follows strictly decreasing chains, and each jump halves every chain's length: it ends
within log2(n) + 1 trips. Each round that hooks lowers at least one root's pointer, so the rounds
end; they end when no pixel has a neighbour in another tree, i.e. each component is one star,
whose root is the smallest index that ever was a root in it: its first pixel in raster order, as
scipy numbers regions. The number of rounds depends on the mask (3 to 5 for snakes, spirals and
random masks, about 10 for the test suite's slowest comb), but the host never waits for it: the
loop runs on the device.

Divisions are correctly rounded (`_div`; Triton's float32 `/` is approximate on GPUs) and contraction
into fused multiply-adds is off, so that a map's mask, its single region's `p = 1` and the
entropy round as the eager path's float32 operations do.

`sar_hf.components` and `sar_hf.entropy` pick these kernels (`algorithm="triton"`); this module is
imported only then, since Triton is optional. On a CPU, Triton's interpreter runs them
(`TRITON_INTERPRET=1`, set before the import), which is how the tests check them.
"""

import contextlib

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from . import entropy

# The constants of `sar_hf.entropy`, as Triton needs them: SPEC step 4's eps, and the exponent from
# which a row is scaled down by a power of two.
_EPS = tl.constexpr(entropy._EPS)
_SAFE_EXPONENT = tl.constexpr(entropy._SAFE_EXPONENT)
_REDUCE_BLOCK = 1024  # maps per step of the reduction's loop


def label_maps(maps: torch.Tensor, connectivity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, gh, gw] bool -> ([M, gh, gw] int64 labels 1..n_i in raster order, [M] int64 counts), one launch.

    `M >= 1` and `gh * gw <= MAX_TRITON_PIXELS`; the labels buffer doubles as the scratch row.
    """
    m, gh, gw = maps.shape
    labels = torch.empty(maps.shape, dtype=torch.long, device=maps.device)
    counts = torch.empty(m, dtype=torch.long, device=maps.device)
    block = _block(gh * gw)
    with _launching(maps):
        _label_kernel[(m,)](
            maps.contiguous().view(torch.uint8), labels, counts, gh, gw, connectivity, block, **_options(block)
        )
    return labels, counts


def spatial_entropy(scores: torch.Tensor, gh: int, gw: int, connectivity: int, mean: bool):
    """[M, gh*gw] scores (any float dtype) -> (entropy, skipped): the fused SPEC steps 2-7.

    `entropy` is the mean over valid maps (`mean=True`, 0-dim) or per map (`[M]`, 0 for skipped
    maps), in float32 (float64 for float64 scores); `skipped` (0-dim int64) counts maps with a
    non-finite score. Differentiable in `scores`; forward two launches, backward one.
    """
    entropy, skipped, _, _ = torch.ops.sar_hf.spatial_entropy_triton(scores, gh, gw, connectivity, mean)
    return entropy, skipped


# -- registered operators: one opaque node each for torch.compile and torch.export --------------


@torch.library.custom_op("sar_hf::spatial_entropy_triton", mutates_args=())
def _entropy_op(
    scores: torch.Tensor, gh: int, gw: int, connectivity: int, mean: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """[M, n] -> (entropy `[]` or `[M]`, skipped `[]`, weight `[M]`, advantage `[M, n]`).

    The last two serve the backward: `weight = scale / total` of each valid map (0 for skipped
    maps) and `advantage = log p_r + H` at each mask pixel of region r (0 off the mask), so that
    `dH/ds_k = weight · (mean_j advantage_j − advantage_k)`.
    """
    m, n = scores.shape
    per_map, skipped, weight, advantage = _entropy_outputs(scores, mean)
    maps = per_map if not mean else torch.empty_like(weight)
    valid = torch.empty(m, dtype=torch.bool, device=scores.device)
    parents = torch.empty((m, n), dtype=torch.int32, device=scores.device)  # the scratch rows
    block = _block(n)
    with _launching(scores):
        if m:  # a grid of 0 programs is no launch
            _entropy_kernel[(m,)](
                scores.contiguous(), maps, valid.view(torch.uint8), weight, advantage, parents,
                gh, gw, connectivity, block, **_options(block),
            )  # fmt: skip
        _reduce_kernel[(1,)](
            maps, valid.view(torch.uint8), per_map, skipped, m, mean, _REDUCE_BLOCK, **_options(_REDUCE_BLOCK)
        )
    return per_map, skipped, weight, advantage


@_entropy_op.register_fake
def _entropy_op_fake(scores, gh, gw, connectivity, mean):
    return _entropy_outputs(scores, mean)


def _entropy_outputs(scores, mean):
    """Empty outputs of `_entropy_op`, in the compute dtype (float64 stays float64, others float32)."""
    m, n = scores.shape
    dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    per_map = scores.new_empty(() if mean else (m,), dtype=dtype)
    skipped = scores.new_empty((), dtype=torch.long)
    return per_map, skipped, scores.new_empty(m, dtype=dtype), scores.new_empty((m, n), dtype=dtype)


@torch.library.custom_op("sar_hf::spatial_entropy_triton_backward", mutates_args=())
def _entropy_backward_op(
    grad: torch.Tensor, skipped: torch.Tensor, weight: torch.Tensor, advantage: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Incoming gradient (`[]` for the mean, `[M]` per map, any stride: `per_map.sum()` hands back an
    expanded one) -> `[M, n]` gradient of the scores in `dtype`."""
    m, n = advantage.shape
    grad_scores = advantage.new_empty((m, n), dtype=dtype)
    block = _block(n)
    if m:
        with _launching(advantage):
            _entropy_backward_kernel[(m,)](
                grad, grad.stride(0) if grad.dim() else 0, skipped, weight, advantage, grad_scores, m, n,
                grad.dim() == 0, block, **_options(block),
            )  # fmt: skip
    return grad_scores


@_entropy_backward_op.register_fake
def _entropy_backward_op_fake(grad, skipped, weight, advantage, dtype):
    return advantage.new_empty(advantage.shape, dtype=dtype)


def _setup_context(ctx, inputs, output):
    _, skipped, weight, advantage = output
    ctx.save_for_backward(skipped, weight, advantage)
    ctx.set_materialize_grads(False)  # no zero gradients filled in (launched) for the internal outputs
    ctx.dtype = inputs[0].dtype


def _backward(ctx, grad, *_):
    if grad is None:  # only the internal outputs were used
        return None, None, None, None, None
    skipped, weight, advantage = ctx.saved_tensors
    return _entropy_backward_op(grad, skipped, weight, advantage, ctx.dtype), None, None, None, None


_entropy_op.register_autograd(_backward, setup_context=_setup_context)


# -- launch settings -----------------------------------------------------------------------------


def _block(n: int) -> int:
    """The power of two that holds a map of `n <= MAX_TRITON_PIXELS` pixels."""
    return triton.next_power_of_2(n)


def _options(block: int) -> dict:
    """Launch options: 4 pixels per thread from 512 pixels on, so 32 warps at 4096 (there ptxas spills
    24 bytes of the entropy kernel, against 48 on 16 warps), and no fused multiply-adds (see the
    module docstring)."""
    return {"num_warps": max(4, min(32, block // 128)), "enable_fp_fusion": False}


def _launching(tensor: torch.Tensor):
    """Launches on `tensor`'s GPU; a clear error for CPU tensors outside Triton's interpreter."""
    if tensor.device.type == "cuda":
        return torch.cuda.device(tensor.device)
    # Whether Triton's interpreter runs the kernels was settled when they were defined, from TRITON_INTERPRET
    # as Triton reads it (Triton 3.9 takes 1, true, on, yes or y, in any case): ask a kernel itself.
    if not isinstance(_label_kernel, InterpretedFunction):
        raise ValueError(
            f"algorithm='triton' runs on CUDA tensors, got a {tensor.device.type} tensor; use algorithm='auto' "
            "(scipy on a CPU), or set TRITON_INTERPRET=1 before importing sar_hf to run the kernels in Triton's "
            "interpreter."
        )
    return contextlib.nullcontext()


# -- kernels --------------------------------------------------------------------------------------


@triton.jit
def _components(fg, pixel, parent_ptr, gh, gw, CONNECTIVITY: tl.constexpr, BLOCK: tl.constexpr):
    """Each pixel's root, the first pixel of its component (`BLOCK` for the background); see the module
    docstring. `fg`, `pixel`: `[BLOCK]`; `parent_ptr`: the map's scratch row of `gh * gw` indices."""
    row = pixel // gw
    col = pixel % gw
    none = BLOCK  # larger than every pixel index, so never the smallest root
    parent = tl.where(fg, pixel, none)
    tl.store(parent_ptr + pixel, parent, mask=pixel < gh * gw)
    tl.debug_barrier()
    hooked = 1
    while hooked > 0:
        # 1. The smallest root among the foreground neighbours (a neighbour's parent is its root).
        low = parent
        for dy in tl.static_range(-1, 2):
            for dx in tl.static_range(-1, 2):
                if (dy != 0 or dx != 0) and (CONNECTIVITY == 8 or dy == 0 or dx == 0):
                    inside = fg & (row + dy >= 0) & (row + dy < gh) & (col + dx >= 0) & (col + dx < gw)
                    near = tl.load(parent_ptr + pixel + (dy * gw + dx), mask=inside, other=none, volatile=True)
                    low = tl.minimum(low, near)
        hook = low < parent
        hooked = tl.sum(hook.to(tl.int32), axis=0)
        tl.debug_barrier()  # every neighbour read before any root moves
        # 2. Hooking: each root moves under the smallest root that touches its tree.
        # Relaxed, block-scoped: the barriers around it order it, and only this program reads the row.
        tl.atomic_min(parent_ptr + parent, low.to(parent_ptr.dtype.element_ty), mask=hook, sem="relaxed", scope="cta")
        tl.debug_barrier()
        # 3. Pointer jumping, synchronous (read all, then write all), until the trees are stars.
        jumped = 1
        while jumped > 0:
            grand = tl.load(parent_ptr + parent, mask=fg, other=none, volatile=True)
            jumped = tl.sum((grand != parent).to(tl.int32), axis=0)
            parent = grand
            tl.debug_barrier()
            tl.store(parent_ptr + pixel, parent, mask=fg)
            tl.debug_barrier()
    return parent


@triton.jit
def _label_kernel(mask_ptr, labels_ptr, counts_ptr, gh, gw, CONNECTIVITY: tl.constexpr, BLOCK: tl.constexpr):
    """Program m labels map m: `mask_ptr` `[M, n]` uint8 -> `labels_ptr` `[M, n]` int64 (also the
    scratch row), `counts_ptr` `[M]` int64."""
    m = tl.program_id(0)
    n = gh * gw
    pixel = tl.arange(0, BLOCK).to(tl.int64)
    inside = pixel < n
    row_ptr = labels_ptr + m.to(tl.int64) * n
    fg = tl.load(mask_ptr + m.to(tl.int64) * n + pixel, mask=inside, other=0) != 0
    root = _components(fg, pixel, row_ptr, gh, gw, CONNECTIVITY, BLOCK)
    # Roots are first pixels, so their running count numbers the regions in raster order.
    is_root = fg & (root == pixel)
    rank = tl.cumsum(is_root.to(tl.int64), axis=0)
    tl.debug_barrier()
    tl.store(row_ptr + pixel, rank, mask=inside)
    tl.debug_barrier()
    label = tl.load(row_ptr + root, mask=fg, other=0, volatile=True)
    tl.debug_barrier()
    tl.store(row_ptr + pixel, label, mask=inside)
    tl.store(counts_ptr + m, tl.sum(is_root.to(tl.int64), axis=0))


@triton.jit
def _entropy_kernel(
    scores_ptr, entropy_ptr, valid_ptr, weight_ptr, advantage_ptr, parents_ptr,
    gh, gw, CONNECTIVITY: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Program m: SPEC steps 2-6 on map m, as `sar_hf.entropy._RegionEntropy.forward` computes them.

    `scores_ptr` `[M, n]` (any float dtype) -> `entropy_ptr`, `valid_ptr` (uint8), `weight_ptr` `[M]`
    and `advantage_ptr` `[M, n]` (see `_entropy_op`); `advantage_ptr`'s row first holds the region
    masses, `parents_ptr` `[M, n]` int32 is the labelling's scratch row.
    """
    m = tl.program_id(0).to(tl.int64)
    n = gh * gw
    pixel = tl.arange(0, BLOCK)
    inside = pixel < n
    dtype = advantage_ptr.dtype.element_ty  # float32, or float64 for float64 scores
    s = tl.load(scores_ptr + m * n + pixel, mask=inside, other=0).to(dtype)
    # Maps with NaN or ±inf are skipped: entropy 0, gradient 0; their scores become 0 (an empty mask).
    bad = tl.sum(((s != s) | (tl.abs(s) == float("inf"))).to(tl.int32), axis=0)
    valid = bad == 0
    s = tl.where(valid, s, 0)
    scale = _safe_scale(tl.max(tl.abs(s), axis=0))
    x = s * scale
    x = x - _div(tl.sum(x, axis=0), n.to(dtype))  # step 2: s - mean
    fg = inside & (x > 0)
    root = _components(fg, pixel, parents_ptr + m * n, gh, gw, CONNECTIVITY, BLOCK)  # step 3
    x = tl.where(fg, x + _EPS, 0)  # step 4, the eps after the subtraction (see sar_hf.entropy)
    # Step 5: every mask pixel adds its x to its root's slot, then reads its region's mass back.
    mass_ptr = advantage_ptr + m * n
    tl.store(mass_ptr + pixel, tl.zeros([BLOCK], dtype), mask=inside)
    tl.debug_barrier()
    tl.atomic_add(mass_ptr + root, x, mask=fg, sem="relaxed", scope="cta")
    tl.debug_barrier()
    mass = tl.load(mass_ptr + root, mask=fg, other=0, volatile=True)
    # The total over the regions (each counted at its root), so that one region has p = 1 exactly.
    is_root = fg & (root == pixel)
    total = tl.sum(tl.where(is_root, mass, 0), axis=0)
    total = tl.where(total > 0, total, 1)  # an empty mask has no regions and entropy 0
    # Step 6, once per region; `0 - sum` so that one region gives +0, not -0.
    p = _div(mass, total)
    log_p = tl.log(tl.where(fg, p, 1))
    entropy = 0 - tl.sum(tl.where(is_root, p * log_p, 0), axis=0)
    entropy = tl.where(valid, entropy, 0)
    tl.debug_barrier()  # every mass read before the row is overwritten
    tl.store(mass_ptr + pixel, tl.where(fg, log_p + entropy, 0), mask=inside)
    tl.store(entropy_ptr + m, entropy)
    tl.store(valid_ptr + m, valid.to(tl.uint8))
    tl.store(weight_ptr + m, tl.where(valid, _div(scale, total), 0))


@triton.jit
def _div(a, b):
    """`a / b` correctly rounded: Triton's float32 `/` is approximate on GPUs, its float64 `/` is not."""
    if a.dtype == tl.float64:
        quotient = a / b
    else:
        quotient = tl.div_rn(a, b)
    return quotient


@triton.jit
def _safe_scale(magnitude):
    """The exact power of two `2**-k`, `k = max(e - 60, 0)` for `magnitude = f · 2**e` (0.5 <= f < 1),
    built from the exponent bits, in `magnitude`'s dtype; 1 for every ordinary map."""
    if magnitude.dtype == tl.float64:
        exponent = ((magnitude.to(tl.int64, bitcast=True) >> 52) & 0x7FF) - 1022
        k = tl.maximum(exponent - _SAFE_EXPONENT, 0)
        scale = ((1023 - k) << 52).to(tl.float64, bitcast=True)
    else:
        exponent = ((magnitude.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 126
        k = tl.maximum(exponent - _SAFE_EXPONENT, 0)
        scale = ((127 - k) << 23).to(tl.float32, bitcast=True)
    return scale


@triton.jit
def _reduce_kernel(entropy_ptr, valid_ptr, mean_ptr, skipped_ptr, M, MEAN: tl.constexpr, BLOCK: tl.constexpr):
    """One program: the skipped maps' count and, with `MEAN`, the mean entropy of the valid maps
    (0 when none is), SPEC step 7."""
    total = tl.zeros([BLOCK], entropy_ptr.dtype.element_ty)
    count = tl.zeros([BLOCK], tl.int64)
    for start in range(0, M, BLOCK):
        index = start + tl.arange(0, BLOCK)
        total += tl.load(entropy_ptr + index, mask=index < M, other=0)
        count += tl.load(valid_ptr + index, mask=index < M, other=0).to(tl.int64)
    valid = tl.sum(count, axis=0)
    tl.store(skipped_ptr, M - valid)
    if MEAN:
        tl.store(mean_ptr, _div(tl.sum(total, axis=0), tl.maximum(valid, 1).to(total.dtype)))


@triton.jit
def _entropy_backward_kernel(
    grad_ptr, grad_stride, skipped_ptr, weight_ptr, advantage_ptr, out_ptr, M, n,
    MEAN: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Program m: `out[m, k] = g_m · weight_m · (mean_j advantage_j − advantage_k)`, with `g_m` the
    incoming gradient of map m (for the mean: the scalar over the valid maps' count); 0 for skipped
    maps (`weight_m = 0`) whatever `g_m` is, as the eager path."""
    m = tl.program_id(0).to(tl.int64)
    pixel = tl.arange(0, BLOCK)
    inside = pixel < n
    dtype = advantage_ptr.dtype.element_ty
    if MEAN:
        g = _div(tl.load(grad_ptr).to(dtype), tl.maximum(M - tl.load(skipped_ptr), 1).to(dtype))
    else:
        g = tl.load(grad_ptr + m * grad_stride).to(dtype)
    advantage = tl.load(advantage_ptr + m * n + pixel, mask=inside, other=0)
    weight = tl.load(weight_ptr + m)
    c = tl.where(weight != 0, g * weight, 0)  # a non-finite g meets no 0 * inf on a skipped map
    grad = c * (_div(tl.sum(advantage, axis=0), n.to(dtype)) - advantage)
    tl.store(out_ptr + m * n + pixel, grad.to(out_ptr.dtype.element_ty), mask=inside)


__all__ = ["label_maps", "spatial_entropy"]
