"""A deterministic STAND-IN topology and budgets, for tests and for exports before calibration.

Not WEST/FAST: no model is run. Each head gets a made-up locality pattern (a preferred block offset
and a falloff) plus hashed noise, ranked into levels exactly as docs/ARCHITECTURE.md ranks real scores; budgets
pick, per step, layer and head, the level that keeps about the requested density (varied per head
and step so that tests see different masks everywhere). Metadata marks both as stand-ins.
"""

from __future__ import annotations

import torch

from saexport.artifacts import BlockedGrid, Budgets, ModelIdentity, Topology
from saexport.levels import density, levels_from_scores


def standin_topology(model: ModelIdentity, layers: int, heads: int, blocks: BlockedGrid, seed: int = 0) -> Topology:
    n = blocks.num_blocks
    gen = torch.Generator().manual_seed(seed)
    offset = torch.randint(-n // 2, n // 2 + 1, (layers, heads, 1, 1), generator=gen)
    falloff = torch.rand((layers, heads, 1, 1), generator=gen) * 2 + 0.2
    u = torch.arange(n).view(n, 1)
    v = torch.arange(n).view(1, n)
    distance = (v - u - offset).abs().to(torch.float32)
    noise = torch.rand((layers, heads, n, n), generator=gen)
    levels = levels_from_scores(-distance * falloff + 2 * noise)
    levels[..., torch.arange(n), torch.arange(n)] = 0  # structural: the diagonal is always kept
    return Topology(levels, model.model, model.config_hash, model.weights_id, blocks.grid, blocks.block_size,
                    blocks.layout, calibration={"method": "stand-in (not WEST)", "seed": seed})


def standin_budgets(topology: Topology, steps: int, target_density: float = 0.3, seed: int = 0) -> Budgets:
    """For each (step, layer, head), the lowest level whose density reaches a jittered target."""
    layers, heads = topology.levels.shape[:2]
    gen = torch.Generator().manual_seed(seed + 1)
    jitter = 0.6 + 0.8 * torch.rand((steps, layers, heads), generator=gen)
    targets = (target_density * jitter).clamp(0.0, 1.0)
    sorted_levels = topology.levels.flatten(-2).sort(dim=-1).values.to(torch.int64)  # [layers, heads, n*n]
    count = sorted_levels.shape[-1]
    index = (targets * count).ceil().clamp(1, count).to(torch.int64) - 1
    levels = sorted_levels.expand(steps, -1, -1, -1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    levels = levels.to(torch.uint8)
    mean = float(density(topology.levels, levels).mean())
    return Budgets(levels, topology.hash(), fidelity="stand-in",
                   curve={"method": "stand-in (not FAST)", "target_density": target_density, "seed": seed},
                   mean_density=mean)
