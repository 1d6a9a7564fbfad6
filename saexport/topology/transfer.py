"""Resolution transfer: a threshold map for another token grid, derived from a computed one.

Two rules (`transfer_topology(..., rule=)`, recorded in the calibration metadata as `transfer_rule`):

- "min" (the default). Every token of the new grid is mapped to the token at the same relative space-time
  position in the old grid (nearest, by scaling each axis); a new block therefore covers a set of old blocks.
  The level of a new block pair is the minimum level over the old pairs it covers: a pair that some covered
  pair needed at density p is needed at p too (conservative: the transferred masks keep at least what the
  covered pairs kept, so at a given level they are a superset).
- "bilinear": the method's published recipe, the map upsampled bilinearly with ceiling rounding of levels.
  The map is a function of two space-time positions, so it is interpolated through the tokens: every new token
  sits at a continuous old position (centres aligned, each axis scaled), whose trilinear weights over the 8
  nearest old tokens, averaged over a new block's tokens, give the new block's weights A[new, old] over the
  old blocks (rows sum to 1; the identity on the same grid). The new level of (u, v) is
  ceil(sum_{u', v'} A[u, u'] A[v, v'] level(u', v')): bilinear in each block axis, for any token layout.

The diagonal stays structural (level 0). `bench/west_recall.py` measures the recall of a rule against a map
computed at the new grid.
"""

from __future__ import annotations

import math
import os

import torch

from saexport.artifacts import Topology
from saexport.errors import SaexportError
from saexport.levels import DENSE_LEVEL, num_blocks

TRANSFER_RULES = ("min", "bilinear")


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


def interpolation_weights(old_grid: tuple[int, int, int], new_grid: tuple[int, int, int], layout,
                          block_size: int) -> torch.Tensor:
    """A float64 `[n_new, n_old]`: each new block's trilinear weights over the old blocks (rows sum to 1)."""
    old_perm, new_perm = layout.permutation(old_grid), layout.permutation(new_grid)
    old_position = old_perm.argsort()  # raster token -> position in the old layout
    frames, height, width = new_grid
    coords = (torch.div(new_perm, height * width, rounding_mode="floor"),
              torch.div(new_perm, width, rounding_mode="floor") % height, new_perm % width)
    corners = []  # per axis: (lower index, upper index, weight of the upper one)
    for coord, new_size, old_size in zip(coords, new_grid, old_grid, strict=True):
        x = ((coord.double() + 0.5) * old_size / new_size - 0.5).clamp(0, old_size - 1)
        low = x.floor().long()
        corners.append((low, (low + 1).clamp(max=old_size - 1), x - low))
    n_new = num_blocks(new_perm.numel(), block_size)
    n_old = num_blocks(old_perm.numel(), block_size)
    new_block = torch.arange(new_perm.numel()) // block_size
    weights = torch.zeros(n_new, n_old, dtype=torch.float64)
    for pick_f in (0, 1):
        for pick_h in (0, 1):
            for pick_w in (0, 1):
                index, weight = [], torch.ones(new_perm.numel(), dtype=torch.float64)
                for (low, high, frac), pick in zip(corners, (pick_f, pick_h, pick_w), strict=True):
                    index.append(high if pick else low)
                    weight = weight * (frac if pick else 1 - frac)
                old_token = (index[0] * old_grid[1] + index[1]) * old_grid[2] + index[2]
                old_block = old_position[old_token] // block_size
                weights.index_put_((new_block, old_block), weight, accumulate=True)
    return weights / weights.sum(1, keepdim=True)


def transfer_topology(topology: Topology, new_grid: tuple[int, int, int], rule: str = "min") -> Topology:
    """The topology's map for `new_grid` by `rule` ("min" or "bilinear", the module's docstring)."""
    if rule not in TRANSFER_RULES:
        raise SaexportError(f"unknown transfer rule '{rule}'; use one of {', '.join(TRANSFER_RULES)}")
    n_new = num_blocks(math.prod(new_grid), topology.block_size)
    layers, heads, n_old = topology.levels.shape[:3]
    need = layers * heads * n_new * max(n_new, n_old) * 4 * 2  # the int32 rows and result, and their scatter
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have // 2:
        raise SaexportError(f"a map for grid {tuple(new_grid)} is {n_new} x {n_new} blocks a head: transferring it "
                            f"needs about {need / 2**30:.0f} GiB, this machine has {have / 2**30:.0f}: choose a "
                            "smaller `resolution` or `frames`")
    if rule == "bilinear":
        a = interpolation_weights(topology.grid, new_grid, topology.layout, topology.block_size)
        # ceil, less a hair of float64 rounding so an exact integer stays itself
        result = (a @ topology.levels.double() @ a.T - 1e-9).ceil().clamp(0, DENSE_LEVEL).to(torch.int32)
        return _finish(topology, result, new_grid, rule)
    pairs = covered_blocks(topology.grid, new_grid, topology.layout, topology.block_size)
    levels = topology.levels.to(torch.int32)  # [layers, heads, n_old, n_old]
    # rows: min over the old query blocks each new query block covers
    rows = torch.full((layers, heads, n_new, n_old), 255, dtype=torch.int32)
    rows.scatter_reduce_(2, pairs[0].view(1, 1, -1, 1).expand(layers, heads, -1, n_old),
                         levels[:, :, pairs[1]], reduce="amin")
    # columns: min over the old key blocks each new key block covers
    result = torch.full((layers, heads, n_new, n_new), 255, dtype=torch.int32)
    result.scatter_reduce_(3, pairs[0].view(1, 1, 1, -1).expand(layers, heads, n_new, -1),
                           rows[..., pairs[1]], reduce="amin")
    return _finish(topology, result, new_grid, rule)


def _finish(topology: Topology, result: torch.Tensor, new_grid: tuple[int, int, int], rule: str) -> Topology:
    n_new = result.shape[-1]
    result[..., torch.arange(n_new), torch.arange(n_new)] = 0
    calibration = {**topology.calibration, "transferred_from": list(topology.grid), "transfer_rule": rule}
    return Topology(result.to(torch.uint8), topology.model, topology.config_hash, topology.weights_id,
                    tuple(new_grid), topology.block_size, topology.layout, calibration)
