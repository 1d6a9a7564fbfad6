"""FAST: per (step, layer, head) budget levels from a fidelity target (docs/ARCHITECTURE.md, "The method in one page").

Fidelity of a sparse row is F = 1 - Hellinger(dense row, sparse row). The sparse row is the dense row
restricted to the kept blocks and renormalised, so with kept mass M the Bhattacharyya coefficient is
sqrt(M) and F = 1 - sqrt(1 - sqrt(M)): the fidelity of every level follows from the block masses.

The target curve tolerates a loss that grows with the step and with the depth,
    A(l, s) = 1 - delta0 * (1 + g * s / (S - 1)) * (1 + g * l / (L - 1)),
so early steps and shallow layers, the most sensitive, get the highest targets. For each entry the
budget is the lowest level whose measured fidelity reaches A; for each grading g of a few candidates,
delta0 is fitted by bisection so that the table's mean density meets the preset's goal, and the g whose
budgets keep the highest mean fidelity wins: how steeply to grade depends on the model (a grading too
steep starves the late steps and deep layers of a model whose attention is diffuse there).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from saexport.artifacts import Budgets, Topology
from saexport.errors import SaexportError
from saexport.levels import DENSE_LEVEL, density
from saexport.models.checkpoint import LoadedModel
from saexport.topology.calibration import (
    CalibrationCheckpoint,
    CalibrationLoop,
    Run,
    SampledRows,
    calibration_key,
    calibration_runs,
)
from saexport.topology.prompts import CalibrationSet

DENSITY_GOALS = {"high": 0.45, "medium": 0.30, "low": 0.20}
GROWTHS = (0.0, 0.5, 1.0, 2.0, 3.0)  # candidate gradings g of the target curve
LEVELS = DENSE_LEVEL + 1


def hellinger(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Hellinger distance between distributions along the last axis (0 = equal, 1 = disjoint)."""
    bc = (p * q).clamp(min=0).sqrt().sum(-1)
    return (1 - bc).clamp(min=0).sqrt()


def fidelity_from_kept_mass(mass: torch.Tensor) -> torch.Tensor:
    return 1 - (1 - mass.clamp(0, 1).sqrt()).clamp(min=0).sqrt()


def fidelity_curves(masses: torch.Tensor, row_levels: torch.Tensor) -> torch.Tensor:
    """Mean fidelity at every level 0..255 for one layer and run.

    masses `[batch, heads, R, n]` (block masses of the sampled rows), row_levels `[heads, R, n]` (the
    topology's levels of each sampled row's query block) -> `[heads, 256]`.
    """
    batch = masses.shape[0]
    index = row_levels.long().unsqueeze(0).expand(batch, -1, -1, -1)
    histogram = torch.zeros(*masses.shape[:3], LEVELS, dtype=torch.float64, device=masses.device)
    histogram.scatter_add_(-1, index.to(masses.device), masses.double())
    kept = histogram.cumsum(-1)  # kept mass of each row at each level
    # Relative to the row's own total: fp32 softmax rows sum to 1 +- 1e-7, and F is steep near M = 1.
    kept = kept / kept[..., -1:]
    return fidelity_from_kept_mass(kept).mean(dim=(0, 2)).cpu()


class FidelityTable:
    """Mean fidelity per (step, layer, head, level), accumulated over calibration runs."""

    def __init__(self, steps: int, layers: int, heads: int):
        self.sum = torch.zeros(steps, layers, heads, LEVELS, dtype=torch.float64)
        self.count = torch.zeros(steps, layers, 1, 1, dtype=torch.float64)

    def add(self, step: int, layer: int, curves: torch.Tensor) -> None:
        self.sum[step, layer] += curves
        self.count[step, layer] += 1

    def mean(self) -> torch.Tensor:
        if (self.count == 0).any():
            raise SaexportError("some steps or layers saw no calibration run")
        return self.sum / self.count


@dataclass(frozen=True)
class TargetCurve:
    delta0: float
    growth: float

    def targets(self, steps: int, layers: int) -> torch.Tensor:
        s = torch.arange(steps, dtype=torch.float64) / max(steps - 1, 1)
        layer = torch.arange(layers, dtype=torch.float64) / max(layers - 1, 1)
        return 1 - self.delta0 * (1 + self.growth * s[:, None]) * (1 + self.growth * layer[None, :])


def choose_levels(fidelity: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Lowest level whose fidelity reaches the target: fidelity `[S, L, H, 256]`, targets `[S, L]`."""
    reaches = fidelity >= targets[:, :, None, None] - 1e-12
    reaches[..., DENSE_LEVEL] = True  # dense always reaches
    return reaches.to(torch.uint8).argmax(-1).to(torch.uint8)


def fit_budgets(topology: Topology, fidelity: torch.Tensor, preset: str, growths: tuple[float, ...] = GROWTHS,
                iterations: int = 60) -> Budgets:
    """FAST v1: the budgets of the grading that keeps the most fidelity at the preset's density goal.
    (v2, which maximises a weighted proxy at the goal, is `topology.allocation.fit_budgets_v2`.)"""
    if preset not in DENSITY_GOALS:
        raise SaexportError(f"unknown fidelity preset '{preset}'; use one of {', '.join(DENSITY_GOALS)}")
    goal = DENSITY_GOALS[preset]
    fits = [_fit_delta0(topology, fidelity, goal, growth, iterations) for growth in growths]
    close = [fit for fit in fits if abs(fit[3] - goal) <= 0.01] or fits  # gradings that reach the goal
    curve, levels, achieved, mean = max(close, key=lambda fit: fit[2])
    return Budgets(levels, topology.hash(), fidelity=preset,
                   curve={"rule": "v1", "proxy": "hellinger", "delta0": curve.delta0, "growth": curve.growth,
                          "density_goal": goal, "mean_fidelity": achieved,
                          "candidates": [[fit[0].growth, round(fit[2], 5), round(fit[3], 4)] for fit in fits],
                          "fidelity_vs_density": fidelity_vs_density(topology, fidelity)},
                   mean_density=mean)


def _fit_delta0(topology: Topology, fidelity: torch.Tensor, goal: float, growth: float,
                iterations: int) -> tuple[TargetCurve, torch.Tensor, float, float]:
    """Bisect delta0 (log scale) so that the budgets' mean density is as close as it gets to the goal.
    Returns the curve, its levels, their mean fidelity and their mean density."""
    steps, layers = fidelity.shape[:2]

    def solve(delta0: float) -> tuple[torch.Tensor, float]:
        levels = choose_levels(fidelity, TargetCurve(delta0, growth).targets(steps, layers))
        return levels, float(density(topology.levels, levels).mean())

    low, high = math.log(1e-9), math.log(2.0)  # density falls as delta0 grows
    best = None
    for _ in range(iterations):
        mid = (low + high) / 2
        levels, mean = solve(math.exp(mid))
        if best is None or abs(mean - goal) < abs(best[2] - goal):
            best = (math.exp(mid), levels, mean)
        if mean > goal:
            low = mid
        else:
            high = mid
    delta0, levels, mean = best  # type: ignore[misc]
    achieved = float((fidelity.gather(-1, levels.long().unsqueeze(-1)).squeeze(-1)).mean())
    return TargetCurve(delta0, growth), levels, achieved, mean


def fidelity_vs_density(topology: Topology, fidelity: torch.Tensor, stride: int = 16) -> list[list[list[float]]]:
    """Per layer, (mean density, mean fidelity) at every `stride`-th level, averaged over steps and heads."""
    probe = torch.arange(0, LEVELS, stride).tolist() + ([DENSE_LEVEL] if DENSE_LEVEL % stride else [])
    layers, heads = topology.levels.shape[:2]
    budgets = torch.tensor(probe, dtype=torch.uint8).view(-1, 1, 1).expand(-1, layers, heads)
    densities = density(topology.levels, budgets).mean(-1)  # [levels, layers]
    fidelities = fidelity[..., probe].mean(dim=(0, 2)).T  # [levels, layers]
    return [[[round(float(d), 4), round(float(f), 4)] for d, f in zip(densities[:, layer], fidelities[:, layer],
                                                                       strict=True)]
            for layer in range(layers)]


def compute_fidelity(
    loaded: LoadedModel,
    topology: Topology,
    prompts: CalibrationSet,
    loop: CalibrationLoop,
    rows_per_block: int = 16,
    device: str | torch.device = "cpu",
    progress: Callable = tqdm,
    checkpoint_path: Path | None = None,
) -> torch.Tensor:
    """Mean fidelity `[steps, layers, heads, 256]` of every level of `topology` along the dense sampler loop.

    With `checkpoint_path`, an interrupted measurement resumes from its last finished trajectory."""
    grid, block_size = topology.grid, topology.block_size
    seq_len = math.prod(grid)
    rows = SampledRows.draw(seq_len, block_size, rows_per_block, seed=1)  # rows WEST did not rank with
    row_levels = topology.levels[:, :, rows.block]  # [layers, heads, R, n]
    table = FidelityTable(loop.steps, topology.levels.shape[0], topology.levels.shape[1])
    current = [Run(0, 0, 0, "cond")]  # the run whose forward pass the probes are seeing

    def on_masses(layer: int, masses: torch.Tensor) -> None:
        table.add(current[0].step, layer, fidelity_curves(masses, row_levels[layer]))

    key = calibration_key("FAST", topology.hash(), loaded.weights_id, prompts.embeddings, prompts.negative,
                          loop.settings(), rows_per_block)
    checkpoint = CalibrationCheckpoint(checkpoint_path, key, {"sum": table.sum, "count": table.count})
    for run in calibration_runs(loaded, grid, topology.layout, block_size, rows, on_masses, prompts, loop, device,
                                progress, "FAST fidelity", checkpoint):
        current[0] = run
    checkpoint.remove()
    return table.mean()
