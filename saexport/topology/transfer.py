"""Resolution transfer: a threshold map for another token grid, derived from a computed one.

Rule. Every token of the new grid is mapped to the token at the same relative space-time position in
the old grid (nearest, by scaling each axis); a new block therefore covers a set of old blocks. The
level of a new block pair is the minimum level over the old pairs it covers: a pair that some covered
pair needed at density p is needed at p too (conservative: the transferred masks keep at least what the
covered pairs kept, so at a given level they are a superset). The diagonal stays structural (level 0).
`bench/west_recall.py` measures the recall of this rule against a map computed at the new grid.
"""

from __future__ import annotations

import math

import torch

from saexport.artifacts import Topology


def covered_blocks(old_grid: tuple[int, int, int], new_grid: tuple[int, int, int], layout, block_size: int):
    """(new block, old block) pairs, int64 `[2, P]`: which old blocks the tokens of each new block map to."""
    old_perm, new_perm = layout.permutation(old_grid), layout.permutation(new_grid)
    old_position = old_perm.argsort()  # raster token -> position in the old layout
    frames, height, width = new_grid
    f, h, w = (torch.div(new_perm, height * width, rounding_mode="floor"),
               torch.div(new_perm, width, rounding_mode="floor") % height, new_perm % width)
    old_f = f * old_grid[0] // frames
    old_h = h * old_grid[1] // height
    old_w = w * old_grid[2] // width
    old_token = (old_f * old_grid[1] + old_h) * old_grid[2] + old_w
    new_block = torch.arange(new_perm.numel()) // block_size
    old_block = old_position[old_token] // block_size
    return torch.unique(torch.stack([new_block, old_block]), dim=1)


def transfer_topology(topology: Topology, new_grid: tuple[int, int, int]) -> Topology:
    pairs = covered_blocks(topology.grid, new_grid, topology.layout, topology.block_size)
    n_new = math.ceil(math.prod(new_grid) / topology.block_size)
    levels = topology.levels.to(torch.int32)  # [layers, heads, n_old, n_old]
    layers, heads, n_old, _ = levels.shape
    # rows: min over the old query blocks each new query block covers
    rows = torch.full((layers, heads, n_new, n_old), 255, dtype=torch.int32)
    rows.scatter_reduce_(2, pairs[0].view(1, 1, -1, 1).expand(layers, heads, -1, n_old),
                         levels[:, :, pairs[1]], reduce="amin")
    # columns: min over the old key blocks each new key block covers
    result = torch.full((layers, heads, n_new, n_new), 255, dtype=torch.int32)
    result.scatter_reduce_(3, pairs[0].view(1, 1, 1, -1).expand(layers, heads, n_new, -1),
                           rows[..., pairs[1]], reduce="amin")
    result[..., torch.arange(n_new), torch.arange(n_new)] = 0
    calibration = {**topology.calibration, "transferred_from": list(topology.grid)}
    return Topology(result.to(torch.uint8), topology.model, topology.config_hash, topology.weights_id,
                    tuple(new_grid), topology.block_size, topology.layout, calibration)
