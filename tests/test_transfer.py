import torch

from saexport.artifacts import Topology
from saexport.layout import parse_layout
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
