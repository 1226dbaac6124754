"""Connected-component labelling of many small boolean grids at once.

Three exact algorithms, one result:

* ``"scipy"`` (CPU): a single ``scipy.ndimage.label`` call labels all maps, stacked into one
  2-D image with an empty row after each map so that no region crosses from one map into the
  next. scipy numbers regions in raster order, so the regions of map ``i`` are one contiguous
  block of labels that a per-map offset renumbers to ``1..n_i``.
* ``"propagation"`` (any device): tree hooking and pointer jumping over the 3×3 (or cross)
  neighbourhood, in batched tensor ops and a number of rounds fixed by the grid size, so the maps
  never leave the device and the host never waits for them (see `_label_propagation` for the
  bound and its proof).
* ``"triton"`` (CUDA, the default there when Triton is installed): the same union-find idea in one
  fused kernel launch, one program per map (`sar_hf.triton_kernels`), for maps of up to
  `MAX_TRITON_PIXELS` pixels; larger maps fall back to propagation.

All run inside one registered operator, ``torch.ops.sar_hf.connected_components``, which
`torch.compile` and `torch.export` keep as a single opaque node (its fake implementation
gives them the output shapes).
"""

import importlib.util
import math

import numpy as np
import scipy.ndimage
import torch
import torch.nn.functional as F
from transformers.utils import logging

logger = logging.get_logger(__name__)

ALGORITHMS = ("auto", "scipy", "propagation", "triton")
# The largest map the Triton kernels hold in one program (64×64 patches, e.g. 1024 px at patch 16).
MAX_TRITON_PIXELS = 4096
_STRUCTURES = {c: scipy.ndimage.generate_binary_structure(2, 2 if c == 8 else 1) for c in (4, 8)}


def connected_components(
    mask: torch.Tensor, connectivity: int = 8, algorithm: str = "auto", return_counts: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Label the connected regions of every map in a batch of boolean grids.

    Args:
        mask (`torch.Tensor` of shape `[..., gh, gw]`, bool):
            Foreground pixels. All leading dimensions are independent maps.
        connectivity (`int`, *optional*, defaults to 8):
            8 joins diagonal neighbours, 4 joins only edge neighbours.
        algorithm (`str`, *optional*, defaults to `"auto"`):
            `"scipy"`, `"propagation"`, `"triton"`, or `"auto"` (scipy for CPU tensors, Triton for
            CUDA tensors when it is installed, propagation otherwise). All give the same labels.
        return_counts (`bool`, *optional*, defaults to `False`):
            Also return the number of regions of each map.

    Returns:
        `torch.LongTensor` of shape `[..., gh, gw]` on the input's device: 0 for background,
        regions numbered `1..n` within each map in raster order of their first pixel. With
        `return_counts=True`, `(labels, counts)` with `counts` of shape `[...]` (int64, `n` per map).
        `n` never exceeds `max_regions(gh, gw, connectivity)`.

    Cost, for M maps of n pixels:
        * scipy: one O(M·n) pass over the stacked maps; the mask is copied to the host and
          the labels back (on a GPU tensor, one synchronisation).
        * propagation: O(M·n·log² n) work in a fixed number of batched tensor ops, no host
          synchronisation; memory O(M·n).
        * triton: one kernel launch, no host synchronisation; rounds that depend on the mask
          (few for blob-like maps), each O(n) per map.
    """
    if mask.dtype != torch.bool:
        raise TypeError(f"`mask` must be a bool tensor, got {mask.dtype}; use `scores > threshold`.")
    if mask.dim() < 2:
        raise ValueError(f"`mask` must have shape [..., gh, gw], got {tuple(mask.shape)}.")
    if connectivity not in (4, 8):
        raise ValueError(f"`connectivity` must be 4 or 8, got {connectivity}.")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"`algorithm` must be one of {ALGORITHMS}, got {algorithm!r}.")
    *lead, gh, gw = mask.shape
    labels, counts = label_maps(mask.reshape(math.prod(lead), gh, gw), connectivity, algorithm)
    labels, counts = labels.reshape(mask.shape), counts.reshape(lead)
    return (labels, counts) if return_counts else labels


def label_maps(maps: torch.Tensor, connectivity: int, algorithm: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """[M, gh, gw] bool -> ([M, gh, gw] int64 labels, [M] int64 counts), through the registered operator.

    The arguments are not checked: this is the entry point of `spatial_entropy`, whose own
    checks already hold.
    """
    algorithm = resolve_algorithm(algorithm, maps.device, maps.shape[-2] * maps.shape[-1])
    return torch.ops.sar_hf.connected_components(maps, connectivity, algorithm)


def resolve_algorithm(algorithm: str, device: torch.device, num_pixels: int) -> str:
    """The labelling that `algorithm` runs for maps of `num_pixels` pixels on `device`.

    `"auto"` is scipy on a CPU; on CUDA, Triton where it runs (installed, an NVIDIA GPU of compute
    capability 7.0 or more) unless `torch.use_deterministic_algorithms` is on (its region sums are
    atomic adds, whose order varies); propagation otherwise. Triton for maps larger than
    `MAX_TRITON_PIXELS` falls back to propagation, with a warning once.
    """
    if algorithm == "auto":
        if device.type == "cpu":
            return "scipy"
        fused = device.type == "cuda" and not torch.are_deterministic_algorithms_enabled() and _triton_runs_on(device)
        algorithm = "triton" if fused else "propagation"
    if algorithm == "triton" and not _TRITON_INSTALLED:
        raise ImportError(
            "algorithm='triton' needs Triton: `pip install 'sar_hf[triton]'` (CUDA builds of torch bring it), or "
            "use algorithm='auto'."
        )
    if algorithm == "triton" and num_pixels > MAX_TRITON_PIXELS:
        if not torch.compiler.is_compiling():  # Dynamo cannot trace a logging call
            logger.warning_once(
                f"Maps of {num_pixels} patches exceed the {MAX_TRITON_PIXELS} that the Triton kernels hold; "
                "labelling them with the 'propagation' algorithm instead."
            )
        return "propagation"
    return algorithm


_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
_TRITON_RUNS_ON: dict[int, bool] = {}


@torch.compiler.assume_constant_result  # read once, at trace time, by Dynamo
def _triton_runs_on(device: torch.device) -> bool:
    """Whether Triton compiles for this CUDA device: installed, NVIDIA (ROCm is untested), sm_70 or newer."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _TRITON_RUNS_ON:
        _TRITON_RUNS_ON[index] = (
            _TRITON_INSTALLED and torch.version.hip is None and torch.cuda.get_device_capability(index) >= (7, 0)
        )
    return _TRITON_RUNS_ON[index]


def max_regions(gh: int, gw: int, connectivity: int) -> int:
    """The largest number of regions that a `gh × gw` mask can have.

    8-connectivity: `ceil(gh/2) · ceil(gw/2)`. Cut the grid into 2×2 blocks (narrower at an odd
    edge); the pixels of one block are pairwise 8-adjacent, so each block meets at most one
    region, and every region meets a block: at most one region per block. Isolated pixels at
    every (even row, even column) reach the bound.

    4-connectivity: `ceil(gh·gw / 2)`. A boustrophedon path visits every pixel, each step to a
    4-neighbour; cut it into consecutive pairs (one single at the end when gh·gw is odd). Each
    pair meets at most one region, so there are at most as many regions as pieces. A
    checkerboard reaches the bound.
    """
    if connectivity == 8:
        return ((gh + 1) // 2) * ((gw + 1) // 2)
    return (gh * gw + 1) // 2


@torch.library.custom_op("sar_hf::connected_components", mutates_args=())
def _label_op(maps: torch.Tensor, connectivity: int, algorithm: str) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, gh, gw] bool -> ([M, gh, gw] int64 labels, [M] int64 counts); `algorithm` as resolved."""
    if maps.numel() == 0:  # no maps, or maps without pixels
        return torch.zeros(maps.shape, dtype=torch.long, device=maps.device), maps.new_zeros(
            maps.shape[0], dtype=torch.long
        )
    if algorithm == "triton":
        from . import triton_kernels  # Triton is optional, and large: imported only when used

        return triton_kernels.label_maps(maps, connectivity)
    label = _label_scipy if algorithm == "scipy" else _label_propagation
    return label(maps, connectivity)


@_label_op.register_fake
def _label_op_fake(maps, connectivity, algorithm):
    return maps.new_empty(maps.shape, dtype=torch.long), maps.new_empty(maps.shape[:1], dtype=torch.long)


def _label_scipy(maps: torch.Tensor, connectivity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, gh, gw] bool -> ([M, gh, gw] int64 labels, [M] int64 counts) via one scipy call."""
    m, gh, gw = maps.shape
    # Maps stacked one under the other, each followed by an empty row: a plain 2-D labelling,
    # which scipy does faster than a 3-D one over the [M, gh, gw] stack.
    image = np.zeros((m, gh + 1, gw), dtype=bool)
    image[:, :gh] = maps.cpu().numpy()
    raw = np.empty(image.shape, dtype=np.int64)
    scipy.ndimage.label(image.reshape(-1, gw), structure=_STRUCTURES[connectivity], output=raw.reshape(-1, gw))
    raw = torch.from_numpy(raw)
    # Regions of earlier maps took the labels below this map's; the running max counts them.
    last = torch.cummax(raw.reshape(m, -1).amax(dim=1), dim=0).values
    offset = F.pad(last[:-1], (1, 0))
    # The background goes negative and is clamped back to 0; regions land on 1..n_i.
    labels = (raw[:, :gh] - offset.reshape(m, 1, 1)).clamp_(min=0)
    return labels.to(maps.device), (last - offset).to(maps.device)


def propagation_rounds(n: int) -> int:
    """Hooking rounds that `_label_propagation` runs on maps of `n` pixels: floor(log2 n)."""
    return max(n.bit_length() - 1, 0)


def _label_propagation(maps: torch.Tensor, connectivity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, gh, gw] bool -> ([M, gh, gw] int64 labels, [M] int64 counts), on the maps' device.

    A forest over the foreground pixels of each map, where `parent` holds a local pixel index
    (0..n-1) and a root points at itself. At the start of every round each tree is a star
    (every pixel points at its root). A round:

    1. `lo`/`hi`: for each tree, the smallest and largest root among the trees that touch it
       (itself included), from one neighbourhood pooling and one scatter onto the roots.
    2. Hooking: a root with `lo < root` re-points at `lo`. A root with `lo == root` that no other
       root hooked onto but that touches a larger tree `T` (`hi > root`) re-points at `lo[T]`:
       `T` touches this tree, so `lo[T] <= root`, and `lo[T] != root` because nobody hooked onto
       it, hence `lo[T] < root`. Every new pointer thus goes to a smaller root: no cycles, and
       every merge joins trees of one component.
    3. Pointer jumping restores stars.

    Bound. In a round, every tree of a component not yet finished (one with a touching tree)
    hooks or is hooked onto, so the trees of each component merge in groups of two or more and
    their number `t` at least halves: `t_k <= floor(n / 2**k)`, and after `floor(log2 n)` rounds
    each component is one tree. Within round k a path from a pixel runs through distinct old
    roots of its component, all decreasing: at most `t_k` steps, which `t_k.bit_length()` jumps
    (each doubling the distance covered) shorten to one. The rounds and jumps are therefore fixed
    by `n` alone, the result is exact for every mask (snakes and spirals included), and no
    convergence test is needed: the host never reads the maps. `tests/test_components.py` runs
    the worst masks at this bound. Snakes, spirals and random masks keep within `n // 3**k` trees
    after round k, but halving is the bound to plan for: the tests' `slow_comb` merges by about
    1 + √2 per round, and a schedule of jumps planned for a factor of 3 labels it wrong.
    """
    m, gh, gw = maps.shape
    n = gh * gw
    fg = maps.reshape(m, n)
    local = torch.arange(n, device=maps.device).expand(m, n)
    signs = torch.arange(-1, 2, 2, device=maps.device).view(1, 2, 1)  # (-1, 1), made on the device
    own = local.unsqueeze(1) * signs  # (-i, i) per pixel
    parent = local.clone()
    trees = n  # a bound on the trees of one component at the start of the round
    for _ in range(propagation_rounds(n)):
        # (-smallest, largest) touching root of each tree, gathered at its root in one scatter.
        best = _touching_roots(parent, fg, gh, gw, connectivity, signs)
        root = own.clone().scatter_reduce_(2, parent.unsqueeze(1).expand(m, 2, n), best, reduce="amax")
        root_lo, root_hi = root[:, 0].neg(), root[:, 1]
        hooks = root_lo < local
        hit = torch.zeros_like(parent).scatter_add_(1, root_lo, hooks.long()) > 0
        stagnant = ~hooks & ~hit & (root_hi > local)
        parent = torch.where(hooks, root_lo, parent)
        parent = torch.where(stagnant, torch.gather(root_lo, 1, root_hi), parent)
        for _ in range(trees.bit_length()):
            parent = torch.gather(parent, 1, parent)
        trees //= 2
    # Number the components 1..n_i in raster order of their first pixel, as scipy does.
    first = local.clone().scatter_reduce_(1, parent, local, reduce="amin")
    root_first = torch.gather(first, 1, parent)
    rank = torch.cumsum(fg & (root_first == local), dim=1)
    labels = torch.where(fg, torch.gather(rank, 1, root_first), 0)
    return labels.reshape(m, gh, gw), rank[:, -1]


def _touching_roots(parent, fg, gh, gw, connectivity, signs):
    """(-smallest, largest) parent over each foreground pixel's neighbourhood, itself included.

    [M, n] int64 parents, [M, n] bool foreground, [1, 2, 1] int64 signs (-1, 1) -> [M, 2, n] int64.
    A background pixel gets its own (-parent, parent), so that it never hooks. Local indices are
    exact in float32 up to 2**24 pixels per map.
    """
    m, n = parent.shape
    own = (parent.unsqueeze(1) * signs).float()
    fg = fg.unsqueeze(1)
    values = torch.where(fg, own, float("-inf")).reshape(m, 2, gh, gw)  # the background never wins
    if connectivity == 8:
        best = F.max_pool2d(values, 3, stride=1, padding=1)
    else:
        best = values
        for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0)):
            best = torch.maximum(best, _shift(values, dy, dx))
    return torch.where(fg, best.reshape(m, 2, n), own).long()


def _shift(value: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Shift [M, C, gh, gw] by (dy, dx), filling with -inf (never the best neighbour)."""
    padded = F.pad(value, (1, 1, 1, 1), value=float("-inf"))
    gh, gw = value.shape[-2:]
    return padded[..., 1 + dy : 1 + dy + gh, 1 + dx : 1 + dx + gw]


__all__ = [
    "ALGORITHMS",
    "MAX_TRITON_PIXELS",
    "connected_components",
    "label_maps",
    "max_regions",
    "propagation_rounds",
    "resolve_algorithm",
]
