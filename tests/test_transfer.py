import math

import pytest
import torch

from saexport.artifacts import Topology
from saexport.errors import SaexportError
from saexport.layout import parse_layout
from saexport.levels import levels_from_scores
from saexport.topology.transfer import transfer_topology


def topology(levels, grid, block, layout="identity"):
    return Topology(levels, "m", "c", "w", grid, block, parse_layout(layout))


def test_same_grid_is_the_identity_up_to_the_structural_diagonal():
    levels = torch.randint(0, 256, (2, 3, 6, 6), dtype=torch.uint8)
    levels[..., torch.arange(6), torch.arange(6)] = 0
    for layout in ("identity", "tile3d:1x2x2"):
        t = topology(levels, (2, 3, 4), 4, layout)
        assert torch.equal(transfer_topology(t, (2, 3, 4)).levels, levels)


def test_doubling_a_1d_grid_maps_each_old_block_onto_two_new_ones():
    # grid (1, 1, 4), block 2: old blocks {0,1}, {2,3}. New grid (1, 1, 8): new blocks of 2 tokens map to
    # old tokens 0,0 | 1,1 | 2,2 | 3,3 -> old blocks 0, 0, 1, 1.
    old = torch.tensor([[[[0, 77], [200, 0]]]], dtype=torch.uint8)
    new = transfer_topology(topology(old, (1, 1, 4), 2), (1, 1, 8)).levels[0, 0]
    assert new.tolist() == [[0, 0, 77, 77], [0, 0, 77, 77], [200, 200, 0, 0], [200, 200, 0, 0]]


def test_a_new_block_covering_two_old_blocks_takes_the_lower_level():
    # old grid (1, 1, 6), block 2 -> 3 blocks; new grid (1, 1, 4), block 2: new block 1 = new tokens 2, 3
    # -> old tokens 3, 4 -> old blocks 1 and 2.
    old = torch.tensor([[[[0, 50, 90], [10, 0, 30], [120, 60, 0]]]], dtype=torch.uint8)
    new = transfer_topology(topology(old, (1, 1, 6), 2), (1, 1, 4)).levels[0, 0]
    assert new.tolist() == [[0, 50], [10, 0]]  # row 1 = min over old rows 1, 2; col 1 = min over old cols 1, 2


def test_bilinear_on_a_1d_grid_interpolates_and_rounds_up():
    # old (1, 1, 4), blocks of 2; new (1, 1, 8): new token i sits at old position (i + 0.5) / 2 - 0.5, so the new
    # blocks weigh the old ones [1, 0], [7/8, 1/8], [1/8, 7/8], [0, 1]; e.g. (1, 2) = 7/8 7/8 77 + 1/8 1/8 200
    # = 62.08 -> 63.
    old = torch.tensor([[[[0, 77], [200, 0]]]], dtype=torch.uint8)
    new = transfer_topology(topology(old, (1, 1, 4), 2), (1, 1, 8), rule="bilinear")
    assert new.levels[0, 0].tolist() == [[0, 10, 68, 77], [25, 0, 63, 68], [175, 155, 0, 10], [200, 175, 25, 0]]
    assert new.calibration["transfer_rule"] == "bilinear" and new.calibration["transferred_from"] == [1, 1, 4]
    with pytest.raises(SaexportError, match="unknown transfer rule 'cubic'"):
        transfer_topology(topology(old, (1, 1, 4), 2), (1, 1, 8), rule="cubic")


def test_bilinear_on_the_same_grid_is_the_identity():
    levels = torch.randint(0, 256, (2, 3, 6, 6), dtype=torch.uint8)
    levels[..., torch.arange(6), torch.arange(6)] = 0
    for layout in ("identity", "tile3d:1x2x2"):
        assert torch.equal(transfer_topology(topology(levels, (2, 3, 4), 4, layout), (2, 3, 4), "bilinear").levels,
                           levels)


def block_centres(grid, layout, block_size):
    """`[n, 3]` mean relative (frame, row, column) position of each block's tokens."""
    perm = layout.permutation(grid)
    coords = torch.stack(torch.meshgrid(*(torch.arange(size) for size in grid), indexing="ij"), -1).reshape(-1, 3)
    coords = ((coords.double() + 0.5) / torch.tensor(grid, dtype=torch.float64))[perm]
    block = torch.arange(len(perm)) // block_size
    n = math.ceil(len(perm) / block_size)
    return torch.zeros(n, 3, dtype=torch.float64).index_add_(0, block, coords) / torch.bincount(block)[:, None]


def smooth_map(grid, layout, block_size, seed):
    """4 heads whose scores are smooth in space-time: a shifted local window of random widths plus a sink."""
    gen = torch.Generator().manual_seed(seed)
    centres = block_centres(grid, layout, block_size)
    heads = []
    for _ in range(4):
        width = 0.2 + 0.3 * torch.rand(3, generator=gen, dtype=torch.float64)
        shift = (torch.rand(3, generator=gen, dtype=torch.float64) - 0.5) * 0.3
        sink = torch.rand(3, generator=gen, dtype=torch.float64)
        local = torch.exp(-(((centres[None] - centres[:, None] - shift) / width) ** 2).sum(-1))
        heads.append(local + 0.5 * torch.exp(-(((centres - sink) / 0.25) ** 2).sum(-1))[None, :])
    levels = levels_from_scores(torch.stack(heads)[None])
    n = levels.shape[-1]
    levels[..., torch.arange(n), torch.arange(n)] = 0
    return levels


def mask_at(levels, fraction):
    """Each head's mask keeping the fraction of pairs closest to `fraction` (the level ranking them so)."""
    ordered = levels.flatten(-2).long().sort(-1).values
    level = ordered[..., max(1, round(fraction * ordered.shape[-1])) - 1]
    return levels.long() <= level[..., None, None]


def test_bilinear_transfer_recalls_a_smooth_native_map_better_than_min():
    layout, old, new = parse_layout("tile3d:2x4x4"), (4, 16, 16), (4, 24, 24)  # 32 -> 72 blocks of 32 tokens
    seed = int(torch.randint(0, 10_000, ()))
    native = mask_at(smooth_map(new, layout, 32, seed), 0.3)
    source = topology(smooth_map(old, layout, 32, seed), old, 32, "tile3d:2x4x4")
    recall = {}
    for rule in ("min", "bilinear"):
        kept = mask_at(transfer_topology(source, new, rule).levels, 0.3)  # budgets are tuned on the result
        assert abs(float(kept.double().mean()) - 0.3) < 0.01
        recall[rule] = float((kept & native).sum() / native.sum())
    assert recall["bilinear"] >= 0.88 and recall["bilinear"] > recall["min"] + 0.02, recall
