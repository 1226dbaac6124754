"""`sar_hf.connected_components` against `scipy.ndimage.label` run map by map.

Label numbers may differ between two correct labellings, so the checks compare partitions:
the same background, a one-to-one match between regions, and labels exactly 1..n_i per map.
"""

import numpy as np
import pytest
import scipy.ndimage
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from sar_hf import components, connected_components, spatial_entropy

ALGORITHMS = ("scipy", "propagation")
CONNECTIVITIES = (4, 8)
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


def reference_labels(mask: np.ndarray, connectivity: int) -> np.ndarray:
    """[..., gh, gw] bool -> labels from one `scipy.ndimage.label` call per map."""
    structure = scipy.ndimage.generate_binary_structure(2, 2 if connectivity == 8 else 1)
    maps = mask.reshape(-1, *mask.shape[-2:])
    out = np.zeros(maps.shape, dtype=np.int64)
    for i, one in enumerate(maps):
        out[i], _ = scipy.ndimage.label(one, structure=structure)
    return out.reshape(mask.shape)


def assert_same_partition(labels: torch.Tensor, mask: np.ndarray, connectivity: int) -> None:
    """`labels` splits every map of `mask` into the regions scipy finds, numbered 1..n_i."""
    assert labels.dtype == torch.int64
    assert tuple(labels.shape) == mask.shape
    expected = reference_labels(mask, connectivity).reshape(-1, mask.shape[-2] * mask.shape[-1])
    got = labels.cpu().numpy().reshape(expected.shape)
    for i, (ours, ref) in enumerate(zip(got, expected, strict=True)):
        np.testing.assert_array_equal(ours > 0, ref > 0, err_msg=f"map {i}: background differs")
        n = int(ref.max())
        assert sorted(np.unique(ours[ours > 0]).tolist()) == list(range(1, n + 1)), f"map {i}: labels not 1..{n}"
        # A partition matches iff the (ours, ref) label pairs form a bijection.
        pairs = np.unique(np.stack([ours[ref > 0], ref[ref > 0]]), axis=1)
        assert pairs.shape[1] == n, f"map {i}: {pairs.shape[1]} label pairs for {n} regions"


def random_mask(rng: np.random.Generator, shape: tuple[int, ...], density: float) -> np.ndarray:
    return rng.random(shape) < density


# -- random masks ------------------------------------------------------------------------------

SHAPES = [(1, 1), (1, 17), (17, 1), (2, 2), (14, 14), (7, 13), (13, 7), (32, 32), (64, 64)]
DENSITIES = [i / 10 for i in range(11)]
LEADS = [(2, 3), (5,), ()]  # [B, H, gh, gw], [M, gh, gw], [gh, gw]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("connectivity", CONNECTIVITIES)
@pytest.mark.parametrize("grid", SHAPES, ids=lambda g: f"{g[0]}x{g[1]}")
def test_random_masks_match_scipy(algorithm, connectivity, grid):
    rng = np.random.default_rng(grid[0] * 100 + grid[1])
    for i, density in enumerate(DENSITIES):
        lead = LEADS[i % len(LEADS)]  # every shape meets every layout of leading dims
        mask = random_mask(rng, (*lead, *grid), density)
        labels = connected_components(torch.from_numpy(mask), connectivity, algorithm=algorithm)
        assert_same_partition(labels, mask, connectivity)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_labels_in_raster_order_of_first_pixel(algorithm):
    # The docstring promises raster order, which both algorithms must share.
    mask = random_mask(np.random.default_rng(0), (20, 9, 11), 0.45)
    labels = connected_components(torch.from_numpy(mask), algorithm=algorithm).numpy().reshape(20, -1)
    for one in labels:
        first_seen = list(dict.fromkeys(one[one > 0].tolist()))
        assert first_seen == list(range(1, len(first_seen) + 1))


def test_algorithms_agree_exactly():
    mask = torch.from_numpy(random_mask(np.random.default_rng(1), (4, 6, 14, 14), 0.5))
    for connectivity in CONNECTIVITIES:
        scipy_labels = connected_components(mask, connectivity, algorithm="scipy")
        assert torch.equal(connected_components(mask, connectivity, algorithm="propagation"), scipy_labels)
        assert torch.equal(connected_components(mask, connectivity), scipy_labels)


def test_auto_asks_the_operator_for_propagation_off_the_cpu(monkeypatch):
    # The meta device stands in for a GPU: the operator only records which algorithm it was asked for.
    asked = []
    monkeypatch.setattr(torch.ops.sar_hf, "connected_components", lambda maps, c, algorithm: asked.append(algorithm))
    for device in ("meta", "cpu"):
        components.label_maps(torch.ones(1, 2, 2, dtype=torch.bool, device=device), 8)
    assert asked == ["propagation", "scipy"]


@pytest.mark.parametrize("device", DEVICES)
def test_auto_is_scipy_on_a_cpu_and_propagation_elsewhere(monkeypatch, device):
    # Both algorithms give the same labels, so only the calls show the choice: on a CPU scipy's one
    # pass is the fast one; on a GPU propagation never synchronises. The same for
    # `connected_components` and `spatial_entropy`.
    monkeypatch.setattr(components, "_triton_runs_on", lambda device: False)  # Triton's choice: test_triton.py
    calls = []
    for name in ("_label_scipy", "_label_propagation"):
        original = getattr(components, name)
        monkeypatch.setattr(
            components, name, lambda maps, c, _name=name, _run=original: calls.append(_name) or _run(maps, c)
        )
    connected_components(torch.rand(2, 5, 5, device=device) > 0.5)
    spatial_entropy(torch.randn(2, 3, 25, device=device), (5, 5))
    assert calls == 2 * ["_label_scipy" if device == "cpu" else "_label_propagation"]


# -- adversarial masks -------------------------------------------------------------------------


def spiral(gh: int, gw: int) -> np.ndarray:
    """A one-pixel wall spiralling inwards with one-pixel gaps: one long region."""
    mask = np.zeros((gh, gw), dtype=bool)
    r, c, dr, dc = 0, 0, 0, 1
    mask[0, 0] = True

    def free(r, c):
        return 0 <= r < gh and 0 <= c < gw and not mask[r, c]

    turns = 0
    while turns < 2:
        # Step on while the cell two ahead stays clear, so the next lap keeps a gap.
        ahead = (r + 2 * dr, c + 2 * dc)
        if free(r + dr, c + dc) and (not (0 <= ahead[0] < gh and 0 <= ahead[1] < gw) or not mask[ahead]):
            r, c = r + dr, c + dc
            mask[r, c] = True
            turns = 0
        else:
            dr, dc = dc, -dr  # turn clockwise
            turns += 1
    return mask


def snake(gh: int, gw: int) -> np.ndarray:
    """Boustrophedon: full rows on even lines joined at alternating ends: one region."""
    mask = np.zeros((gh, gw), dtype=bool)
    mask[::2] = True
    for r in range(1, gh, 2):
        mask[r, gw - 1 if r % 4 == 1 else 0] = True
    return mask


def checkerboard(gh: int, gw: int) -> np.ndarray:
    return (np.add.outer(np.arange(gh), np.arange(gw)) % 2) == 0


def diagonals(gh: int, gw: int) -> np.ndarray:
    """Parallel diagonal lines: 8-connected each, only points for 4-connectivity."""
    return (np.add.outer(np.arange(gh), np.arange(gw)) % 3) == 0


def anti_diagonal(gh: int, gw: int) -> np.ndarray:
    return np.subtract.outer(np.arange(gh), np.arange(gw)) % 4 == 0


ADVERSARIAL = {
    "spiral": spiral,
    "snake": snake,
    "checkerboard": checkerboard,
    "diagonals": diagonals,
    "anti_diagonal": anti_diagonal,
    "full": lambda gh, gw: np.ones((gh, gw), dtype=bool),
    "empty": lambda gh, gw: np.zeros((gh, gw), dtype=bool),
    "stripes": lambda gh, gw: np.broadcast_to(np.arange(gw) % 2 == 0, (gh, gw)).copy(),
}
ADVERSARIAL_GRIDS = [(1, 1), (1, 64), (64, 1), (2, 5), (14, 14), (7, 13), (33, 31), (64, 64)]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("connectivity", CONNECTIVITIES)
@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_adversarial_masks_match_scipy(algorithm, connectivity, name):
    maker = ADVERSARIAL[name]
    for grid in ADVERSARIAL_GRIDS:
        mask = maker(*grid)
        labels = connected_components(torch.from_numpy(mask), connectivity, algorithm=algorithm)
        assert_same_partition(labels, mask, connectivity)
        # Batched with a random map and its complement, the map must keep its own labels.
        rng = np.random.default_rng(0)
        other = random_mask(rng, grid, 0.5)
        batch = np.stack([other, mask, ~mask, mask])
        labels = connected_components(torch.from_numpy(batch), connectivity, algorithm=algorithm)
        assert_same_partition(labels, batch, connectivity)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_region_counts_known_by_construction(algorithm):
    def count(mask, connectivity):
        return int(connected_components(torch.from_numpy(mask), connectivity, algorithm=algorithm).max())

    for gh, gw in [(1, 1), (1, 8), (8, 1), (14, 14), (7, 13), (64, 64)]:
        board = checkerboard(gh, gw)
        assert count(board, 8) == (1 if min(gh, gw) > 1 else board.sum())  # a 1xN board has no diagonals
        assert count(board, 4) == board.sum()
        assert count(snake(gh, gw), 4) == 1
        assert count(snake(gh, gw), 8) == 1
        assert count(np.ones((gh, gw), dtype=bool), 4) == 1
        assert count(np.zeros((gh, gw), dtype=bool), 8) == 0
    assert count(spiral(64, 64), 4) == 1
    # n parallel diagonals of a square grid; as pixels under 4-connectivity.
    lines = diagonals(30, 30)
    assert count(lines, 8) == len(range(0, 59, 3))
    assert count(lines, 4) == lines.sum()


# -- the most regions a grid can hold -----------------------------------------------------------


@pytest.mark.parametrize("connectivity", CONNECTIVITIES)
@pytest.mark.parametrize("grid", [(1, 1), (1, 2), (1, 7), (2, 2), (2, 3), (3, 3), (2, 5), (3, 4), (1, 12), (4, 4)])
def test_max_regions_is_reached_and_never_exceeded(grid, connectivity):
    # Every mask of the grid, labelled by both algorithms: the bound that sizes the entropy's
    # region slots is exact (proved in `max_regions` for every grid; checked here exhaustively).
    n = grid[0] * grid[1]
    bits = (np.arange(2**n)[:, None] >> np.arange(n)) & 1
    mask = torch.from_numpy(bits.astype(bool).reshape(-1, *grid))
    for algorithm in ALGORITHMS:
        _, counts = connected_components(mask, connectivity, algorithm=algorithm, return_counts=True)
        assert counts.max().item() == components.max_regions(*grid, connectivity)


# -- the fixed round bound of propagation and its host reads ----------------------------------

WORST = {"snake": snake, "snake reversed": lambda gh, gw: snake(gh, gw)[::-1, ::-1].copy(), "spiral": spiral}


@pytest.fixture
def rounds(monkeypatch):
    """The `parent` forests at the start of every propagation round, in call order."""
    seen = []
    touching = components._touching_roots

    def record(parent, *args):
        seen.append(parent.clone())
        return touching(parent, *args)

    monkeypatch.setattr(components, "_touching_roots", record)
    return seen


@pytest.mark.parametrize("connectivity", CONNECTIVITIES)
@pytest.mark.parametrize("grid", [(14, 14), (33, 31), (64, 64), (1, 64), (64, 1)], ids=lambda g: f"{g[0]}x{g[1]}")
def test_worst_masks_are_exact_after_the_fixed_rounds(rounds, grid, connectivity):
    mask = np.stack([maker(*grid) for maker in WORST.values()])
    labels = connected_components(torch.from_numpy(mask), connectivity, algorithm="propagation")
    assert_same_partition(labels, mask, connectivity)
    assert labels.amax(dim=(1, 2)).tolist() == [1, 1, 1]
    n = grid[0] * grid[1]
    assert len(rounds) == components.propagation_rounds(n) == n.bit_length() - 1  # always the bound, no early exit


def test_fewer_rounds_than_needed_are_caught(monkeypatch):
    # The checks above can fail: cut to one round, propagation leaves these masks split.
    monkeypatch.setattr(components, "propagation_rounds", lambda n: 1)
    mask = np.stack([spiral(64, 64), random_mask(np.random.default_rng(5), (64, 64), 0.6)])
    labels = connected_components(torch.from_numpy(mask), 8, algorithm="propagation")
    with pytest.raises(AssertionError):
        assert_same_partition(labels, mask, 8)


@pytest.mark.parametrize("connectivity", CONNECTIVITIES)
def test_every_round_at_least_halves_the_trees_of_each_component(rounds, connectivity):
    # The lemma behind the bound: a component of t > 1 trees has at most t // 2 after a round.
    rng = np.random.default_rng(6)
    grid = (33, 31)
    maps = [maker(*grid) for maker in (*WORST.values(), checkerboard, diagonals)]
    maps += [random_mask(rng, grid, density) for density in (0.3, 0.5, 0.6, 0.8)]
    mask = np.stack(maps)
    connected_components(torch.from_numpy(mask), connectivity, algorithm="propagation")
    regions = reference_labels(mask, connectivity).reshape(len(mask), -1)
    fg = mask.reshape(len(mask), -1)
    first_trees = []
    for i in range(len(mask)):
        trees = [
            [len(np.unique(parent[i].numpy()[fg[i] & (regions[i] == r)])) for r in range(1, regions[i].max() + 1)]
            for parent in rounds
        ]
        for before, after in zip(trees, trees[1:], strict=False):
            assert all(b == 1 and a == 1 or a <= b // 2 for b, a in zip(before, after, strict=True)), (i, trees)
        first_trees += trees[0]
    assert len(rounds) == components.propagation_rounds(fg.shape[1])
    assert max(first_trees) > 1  # the lemma was put to work


def slow_comb(levels: int, chain: int) -> np.ndarray:
    """A 4-connected mask whose trees merge slowly, by about 1 + √2 per round, then end in a chain.

    After the first round every tree is a tooth: a column from the row of its level down to the
    bottom row, with the bottom pixels of the gap columns to its right; the bottom row joins each
    tooth to the next. A tooth's root is its top pixel, so roots compare as (row, column). Along
    the bottom row the trees form a path whose roots are built from the last round backwards:

    * the last round: `chain` roots increasing to the right, which it hooks into one chain of
      `chain` trees;
    * each round before it (`levels` of them, at least 2): a larger root between every two
      neighbours, which hooks onto the smaller of them, and another in front of every root that is
      larger than its neighbours (nobody else would hook onto it). The round merges them back into
      the sequence of the round after it.

    The halving lemma allows a factor of 2 per round; the snakes, spirals and random masks above
    keep within `n // 3**k` trees after round k. A gap column before every rise keeps a tooth's top
    from hooking onto the tooth on its left. One isolated pixel in row 0, between the chain's first
    two teeth, takes the number that a pixel left pointing at a former root would read.
    """
    assert levels >= 2, "the lone pixel needs a level-1 row with gaps under it"
    roots = [(0, i) for i in range(chain)]  # (row, rank in the row): the raster order of the tops
    for level in range(1, levels + 1):
        grown = []
        for i, root in enumerate(roots):
            if all(other < root for other in roots[max(i - 1, 0) : i + 2] if other != root):
                grown.append((level, len(grown)))  # hooks onto `root`, which nobody else would
            grown.append(root)
            if i + 1 < len(roots):
                grown.append((level, len(grown)))  # hooks onto the smaller of its two neighbours
        roots = grown
    rises = [0] + [int(b > a) for a, b in zip(roots, roots[1:], strict=False)]
    columns = np.cumsum(np.add(rises, 1)) - 1
    mask = np.zeros((levels + 2, columns[-1] + 1), dtype=bool)
    for (row, _), column in zip(roots, columns, strict=True):
        mask[row:, column] = True
    mask[-1] = True
    first, second = columns[[i for i, (row, _) in enumerate(roots) if row == 0][:2]]
    # The lone pixel: the first column past `first + 1` with background below it, so that it touches nothing.
    mask[0, first + 2 + np.flatnonzero(~mask[1, first + 2 : second - 1])[0]] = True
    return mask


def test_trees_that_merge_slowest_still_end_as_stars(rounds):
    # The jumps of each round come from the bound "trees at least halve per round". The masks above
    # keep within `n // 3**k` trees after round k, so a schedule built on a factor of 3 passes them
    # all; this comb merges by about 1 + √2, and with a factor-3 schedule its last chain is left
    # unfinished.
    mask = slow_comb(levels=8, chain=3)
    labels = connected_components(torch.from_numpy(mask), 4, algorithm="propagation")
    assert_same_partition(labels, mask, 4)
    fg = torch.from_numpy(mask).reshape(-1)
    local = torch.arange(fg.numel())
    trees = []
    for parent in (p[0] for p in rounds):
        assert torch.equal(parent[parent], parent)  # each round starts with stars
        trees.append(int((fg & (parent == local)).sum()))
    # The comb's design at work: the second round starts with 2.4 times as many trees as the third,
    # and the last chain of three trees (with the lone pixel, four) is hooked in round 10 of 15.
    assert len(trees) == 15 and trees[1] > 2.3 * trees[2] and trees[9:] == [4] + [2] * 5


HOST_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__", "nonzero")
HOST_FUNCTIONS = ("equal", "tensor", "as_tensor")


def count_host_reads(monkeypatch) -> dict[str, int]:
    """Counts, from now on, calls that move values between the host and the tensors' device.

    The tensor methods that read values on the host, `torch.equal`, and `torch.tensor` /
    `torch.as_tensor` (a copy from host memory): on a GPU each of them synchronises (and cannot be
    captured in a CUDA graph); on CPU tensors the count shows where they would be.
    """
    counts = dict.fromkeys((*HOST_READS, *HOST_FUNCTIONS), 0)

    def counted(name, original):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return original(*args, **kwargs)

        return wrapper

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
    for name in HOST_FUNCTIONS:
        monkeypatch.setattr(torch, name, counted(name, getattr(torch, name)))
    return counts


def test_propagation_never_reads_the_maps_on_the_host(monkeypatch):
    host_reads = count_host_reads(monkeypatch)
    mask = torch.from_numpy(
        np.stack([spiral(33, 31), snake(33, 31), random_mask(np.random.default_rng(7), (33, 31), 0.6)])
    )
    for connectivity in CONNECTIVITIES:
        connected_components(mask, connectivity, algorithm="propagation", return_counts=True)
    assert sum(host_reads.values()) == 0, host_reads
    # The counter does see host reads: the scipy path copies the maps to the host once.
    connected_components(mask, algorithm="scipy")
    assert host_reads["numpy"] == 1 and sum(host_reads.values()) >= 1


# -- properties --------------------------------------------------------------------------------

sides = st.integers(1, 64)
leads = st.lists(st.integers(1, 3), max_size=2).map(tuple)


@st.composite
def masks(draw):
    gh, gw, lead = draw(sides), draw(sides), draw(leads)
    # `arrays` fills around a background value, so mix it with a seeded random base to
    # reach every density while keeping the draw shrinkable.
    edits = draw(arrays(np.bool_, (*lead, gh, gw), elements=st.booleans()))
    density = draw(st.sampled_from([0.0, 0.2, 0.5, 0.6, 0.9, 1.0]))
    base = random_mask(np.random.default_rng(draw(st.integers(0, 2**16))), (*lead, gh, gw), density)
    return base ^ edits


@settings(deadline=None, max_examples=60)
@given(mask=masks(), connectivity=st.sampled_from(CONNECTIVITIES), algorithm=st.sampled_from(ALGORITHMS))
def test_property_matches_scipy(mask, connectivity, algorithm):
    labels, counts = connected_components(torch.from_numpy(mask), connectivity, algorithm, return_counts=True)
    assert_same_partition(labels, mask, connectivity)
    expected = reference_labels(mask, connectivity).max(axis=(-2, -1))  # scipy's region count per map
    np.testing.assert_array_equal(counts.numpy(), expected)


@settings(deadline=None, max_examples=40)
@given(mask=masks())
def test_property_eight_connectivity_coarsens_four(mask):
    # Every 4-region lies inside one 8-region, and the two algorithms agree exactly.
    tensor = torch.from_numpy(mask).reshape(-1, *mask.shape[-2:])
    four = connected_components(tensor, 4, algorithm="propagation")
    eight = connected_components(tensor, 8, algorithm="propagation")
    assert torch.equal(eight, connected_components(tensor, 8, algorithm="scipy"))
    assert (eight.amax(dim=(1, 2)) <= four.amax(dim=(1, 2))).all()
    which = torch.arange(len(tensor)).reshape(-1, 1, 1).expand_as(four)
    fg = four > 0
    # Labels are per map, so the map index is part of every key.
    regions_four = torch.unique(torch.stack([which[fg], four[fg]]), dim=1)
    pairs = torch.unique(torch.stack([which[fg], four[fg], eight[fg]]), dim=1)
    assert pairs.shape[1] == regions_four.shape[1]


# -- contract ----------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("algorithm", ("auto", *ALGORITHMS))
def test_shape_dtype_device_preserved(algorithm, device):
    for shape in [(3, 4, 5, 6), (7, 5, 6), (5, 6), (0, 5, 6), (2, 0, 4, 4), (3, 0, 5), (0, 5), (2, 5, 0)]:
        mask = torch.rand(shape, device=device) > 0.5
        labels, counts = connected_components(mask, algorithm=algorithm, return_counts=True)
        assert labels.shape == mask.shape and counts.shape == mask.shape[:-2]
        assert labels.dtype == counts.dtype == torch.int64
        assert labels.device == counts.device == mask.device


@pytest.mark.parametrize("connectivity", CONNECTIVITIES)
def test_propagation_makes_every_tensor_on_the_maps_device(connectivity):
    # On the meta device a tensor made anywhere else (a host index, a host constant) raises, so a
    # CPU run checks what a GPU run needs: no tensor of the propagation is left on the host.
    labels, counts = components._label_propagation(torch.ones(3, 5, 7, dtype=torch.bool, device="meta"), connectivity)
    assert labels.device.type == counts.device.type == "meta"
    assert labels.shape == (3, 5, 7) and counts.shape == (3,)


class _ElsewhereTensor(torch.Tensor):
    """A CPU tensor that reports the meta device: its values stay readable on the host.

    Torch functions on it return plain tensors, so only the maps themselves claim the other device:
    a result made from them without `.to(maps.device)` reports the CPU.
    """

    __torch_function__ = torch._C._disabled_torch_function_impl

    @property
    def device(self):
        return torch.device("meta")


def test_scipy_sends_labels_and_counts_back_to_the_maps_device():
    # scipy labels a host copy, so both results must be moved back to the maps' device. On a GPU,
    # `test_shape_dtype_device_preserved[scipy-cuda]` sees this; without one, maps that claim
    # another device stand in (a meta tensor cannot: scipy reads the values).
    maps = torch.Tensor._make_subclass(_ElsewhereTensor, torch.rand(3, 5, 7) > 0.5)
    labels, counts = components._label_scipy(maps, 8)
    assert labels.device.type == counts.device.type == "meta"
    assert labels.shape == (3, 5, 7) and counts.shape == (3,)


def test_propagation_rounds_is_floor_log2():
    for n in range(1, 5000):
        assert components.propagation_rounds(n) == max(k for k in range(16) if 2**k <= n), n


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_non_contiguous_input(algorithm):
    mask = random_mask(np.random.default_rng(3), (3, 16, 9), 0.5)
    transposed = torch.from_numpy(mask).transpose(-1, -2)  # a strided view
    assert not transposed.is_contiguous()
    labels = connected_components(transposed, algorithm=algorithm)
    assert_same_partition(labels, np.ascontiguousarray(mask.transpose(0, 2, 1)), 8)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.float32])
def test_non_bool_mask_raises_type_error(dtype):
    with pytest.raises(TypeError, match="bool"):
        connected_components(torch.ones(4, 4, dtype=dtype))


@pytest.mark.parametrize("connectivity", [0, 6, 9])
def test_bad_connectivity_raises(connectivity):
    with pytest.raises(ValueError, match="connectivity"):
        connected_components(torch.ones(4, 4, dtype=torch.bool), connectivity)


def test_bad_algorithm_and_shape_raise():
    with pytest.raises(ValueError, match="algorithm"):
        connected_components(torch.ones(4, 4, dtype=torch.bool), algorithm="union-find")
    with pytest.raises(ValueError, match="shape"):
        connected_components(torch.ones(4, dtype=torch.bool))
