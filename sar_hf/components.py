"""Connected-component labelling of many small boolean grids at once.

Two exact algorithms, one result:

* ``"scipy"`` (CPU): a single ``scipy.ndimage.label`` call labels the ``[M, gh, gw]`` stack
  with a 3-D structure that joins nothing across maps. scipy numbers regions in raster
  order, so the regions of map ``i`` are one contiguous block of labels that a per-map
  offset renumbers to ``1..n_i``.
* ``"propagation"`` (any device, the default on GPUs): min-label propagation over the
  3×3 (or cross) neighbourhood with Shiloach–Vishkin style hooking and pointer jumping,
  all in batched tensor ops, so the maps never leave the device.
"""

import numpy as np
import scipy.ndimage
import torch
import torch.nn.functional as F

_ALGORITHMS = ("auto", "scipy", "propagation")


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
            `"scipy"`, `"propagation"`, or `"auto"` (scipy for CPU tensors, propagation
            otherwise). Both give the same labels.
        return_counts (`bool`, *optional*, defaults to `False`):
            Also return the number of regions of each map.

    Returns:
        `torch.LongTensor` of shape `[..., gh, gw]` on the input's device: 0 for background,
        regions numbered `1..n` within each map in raster order of their first pixel. With
        `return_counts=True`, `(labels, counts)` with `counts` of shape `[...]` (int64, `n` per map).

    Cost, for M maps of side s (n = s² pixels):
        * scipy: one O(M·n) pass over the stacked maps; the mask is copied to the host and
          the labels back, one synchronisation.
        * propagation: O(M·n) work per round and O(log n) rounds for compact regions, at
          most O(n) for adversarial snakes; one host synchronisation per round (the
          convergence test). Memory O(M·n).
    """
    if mask.dtype != torch.bool:
        raise TypeError(f"`mask` must be a bool tensor, got {mask.dtype}; use `scores > threshold`.")
    if mask.dim() < 2:
        raise ValueError(f"`mask` must have shape [..., gh, gw], got {tuple(mask.shape)}.")
    if connectivity not in (4, 8):
        raise ValueError(f"`connectivity` must be 4 or 8, got {connectivity}.")
    if algorithm not in _ALGORITHMS:
        raise ValueError(f"`algorithm` must be one of {_ALGORITHMS}, got {algorithm!r}.")
    if algorithm == "auto":
        algorithm = "scipy" if mask.device.type == "cpu" else "propagation"

    *lead, gh, gw = mask.shape
    if mask.numel() == 0:  # no maps, or maps without pixels
        labels = torch.zeros(mask.shape, dtype=torch.long, device=mask.device)
        counts = torch.zeros(lead, dtype=torch.long, device=mask.device)
    else:
        label = _label_scipy if algorithm == "scipy" else _label_propagation
        labels, counts = label(mask.reshape(-1, gh, gw), connectivity)
    labels, counts = labels.reshape(mask.shape), counts.reshape(lead)
    return (labels, counts) if return_counts else labels


def _label_scipy(maps: torch.Tensor, connectivity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, gh, gw] bool -> ([M, gh, gw] int64 labels, [M] int64 counts) via one scipy call."""
    m = maps.shape[0]
    # A 3-D structure with empty outer planes joins nothing across maps, so the maps need no
    # copy into a tiled image; the labels come out in raster order over (map, row, column).
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = scipy.ndimage.generate_binary_structure(2, 2 if connectivity == 8 else 1)
    labels = np.empty(maps.shape, dtype=np.int64)
    scipy.ndimage.label(maps.cpu().numpy(), structure=structure, output=labels)
    labels = torch.from_numpy(labels)
    # Regions of earlier maps took the labels below this map's; the running max counts them.
    last = torch.cummax(labels.reshape(m, -1).amax(dim=1), dim=0).values
    offset = torch.cat([last.new_zeros(1), last[:-1]])
    # The background goes negative and is clamped back to 0; regions land on 1..n_i.
    labels = labels.sub_(offset.reshape(m, 1, 1)).clamp_(min=0)
    return labels.to(maps.device), (last - offset).to(maps.device)


def _label_propagation(maps: torch.Tensor, connectivity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, gh, gw] bool -> ([M, gh, gw] int64 labels, [M] int64 counts), on the maps' device."""
    m, gh, gw = maps.shape
    n = gh * gw
    fg = maps.reshape(m, n)
    # Every pixel points at a pixel of its own map (a local index 0..n-1); a root points at
    # itself. Local indices stay exact in float32 for grids up to 4096x4096.
    local = torch.arange(n, device=maps.device).expand(m, n)
    base = torch.arange(m, device=maps.device).unsqueeze(1) * n  # flat offset of each map
    parent = local.clone()
    while True:
        # Smallest parent among the foreground neighbours and the pixel itself.
        value = torch.where(fg, parent, n).reshape(m, 1, gh, gw).float().neg()
        if connectivity == 8:
            best = F.max_pool2d(value, 3, stride=1, padding=1)
        else:
            best = value
            for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0)):
                best = torch.maximum(best, _shift(value, dy, dx))
        best = torch.minimum(best.neg().long().reshape(m, n), parent)
        best = torch.where(fg, best, parent)
        # Hooking: a pixel that sees a smaller label re-points its root there too, which
        # merges whole trees per round instead of moving labels one pixel at a time.
        flat_parent = (parent + base).flatten()
        hooked = (parent + base).flatten().scatter_reduce(0, flat_parent, (best + base).flatten(), reduce="amin")
        new = torch.minimum(hooked.reshape(m, n) - base, best)
        # Pointer jumping: each jump halves every path to the root.
        for _ in range(n.bit_length()):
            new = torch.gather(new, 1, new)
        if torch.equal(new, parent):  # the one host synchronisation per round
            break
        parent = new
    # Each region's root is its first pixel in raster order; number the roots 1..n_i.
    is_root = fg & (parent == local)
    rank = torch.cumsum(is_root, dim=1)
    labels = torch.gather(rank, 1, parent)
    return torch.where(fg, labels, 0).reshape(m, gh, gw), rank[:, -1]


def _shift(value: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Shift [M, 1, gh, gw] by (dy, dx), filling with -inf (never the best neighbour)."""
    padded = F.pad(value, (1, 1, 1, 1), value=float("-inf"))
    gh, gw = value.shape[-2:]
    return padded[..., 1 + dy : 1 + dy + gh, 1 + dx : 1 + dx + gw]


__all__ = ["connected_components"]
