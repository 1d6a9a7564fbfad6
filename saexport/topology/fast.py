"""FAST v1: per (step, layer, head) budget levels from a graded quality target (docs/ARCHITECTURE.md, "The method in
one page"), the method's first rule.

The quality of a sparse row is Q = 1 - Hellinger(dense row, sparse row) (what the method calls its fidelity). The
sparse row is the dense row restricted to the kept blocks and renormalised, so with kept mass M the Bhattacharyya
coefficient is sqrt(M) and Q = 1 - sqrt(1 - sqrt(M)): the quality of every level follows from the block masses.

The target curve tolerates a loss that grows with the step and with the depth,
    A(l, s) = 1 - delta0 * (1 + g * s / (S - 1)) * (1 + g * l / (L - 1)),
so early steps and shallow layers, the most sensitive, get the highest targets. For each entry the
budget is the lowest level whose measured quality reaches A; for each grading g of a few candidates,
delta0 is fitted by bisection so that the table's mean density meets the goal, and the g whose
budgets keep the highest mean quality wins: how steeply to grade depends on the model (a grading too
steep starves the late steps and deep layers of a model whose attention is diffuse there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from saexport.artifacts import Budgets, Topology
from saexport.errors import SaexportError
from saexport.levels import DENSE_LEVEL, density
from saexport.topology.calibration import CalibrationCheckpoint, Calibrator, Run, SampledRows, calibration_key
from saexport.topology.goals import Goal

GROWTHS = (0.0, 0.5, 1.0, 2.0, 3.0)  # candidate gradings g of the target curve
LEVELS = DENSE_LEVEL + 1


def hellinger(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Hellinger distance between distributions along the last axis (0 = equal, 1 = disjoint)."""
    bc = (p * q).clamp(min=0).sqrt().sum(-1)
    return (1 - bc).clamp(min=0).sqrt()


def hellinger_quality_of_kept_mass(mass: torch.Tensor) -> torch.Tensor:
    """1 - Hellinger of a row keeping the fraction `mass` of its softmax (the module's docstring)."""
    return 1 - (1 - mass.clamp(0, 1).sqrt()).clamp(min=0).sqrt()


def hellinger_curves(masses: torch.Tensor, row_levels: torch.Tensor) -> torch.Tensor:
    """Mean quality 1 - Hellinger at every level 0..255 for one layer and run.

    masses `[batch, heads, R, n]` (block masses of the sampled rows), row_levels `[heads, R, n]` (the
    topology's levels of each sampled row's query block) -> `[heads, 256]`.
    """
    batch = masses.shape[0]
    index = row_levels.long().unsqueeze(0).expand(batch, -1, -1, -1)
    histogram = torch.zeros(*masses.shape[:3], LEVELS, dtype=torch.float64, device=masses.device)
    histogram.scatter_add_(-1, index.to(masses.device), masses.double())
    kept = histogram.cumsum(-1)  # kept mass of each row at each level
    # Relative to the row's own total: fp32 softmax rows sum to 1 +- 1e-7, and Q is steep near M = 1.
    kept = kept / kept[..., -1:]
    return hellinger_quality_of_kept_mass(kept).mean(dim=(0, 2)).cpu()


class QualityTable:
    """Mean quality per (step, layer, head, level), accumulated over calibration runs: each trajectory's table
    (`empty()`, `add`) merged in trajectory order (`calibration.Accumulator`)."""

    def __init__(self, steps: int, layers: int, heads: int):
        self.sum = torch.zeros(steps, layers, heads, LEVELS, dtype=torch.float64)
        self.count = torch.zeros(steps, layers, 1, 1, dtype=torch.float64)

    def empty(self) -> QualityTable:
        return QualityTable(*self.sum.shape[:3])

    def state(self) -> dict[str, torch.Tensor]:
        return {"sum": self.sum, "count": self.count}

    def add(self, step: int, layer: int, curves: torch.Tensor) -> None:
        self.sum[step, layer] += curves
        self.count[step, layer] += 1

    def merge(self, trajectory: dict[str, torch.Tensor]) -> None:
        self.sum += trajectory["sum"]
        self.count += trajectory["count"]

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


def choose_levels(quality: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Lowest level whose quality reaches the target: quality `[S, L, H, 256]`, targets `[S, L]`."""
    reaches = quality >= targets[:, :, None, None] - 1e-12
    reaches[..., DENSE_LEVEL] = True  # dense always reaches
    return reaches.to(torch.uint8).argmax(-1).to(torch.uint8)


def fit_budgets_v1(topology: Topology, quality: torch.Tensor, goal: Goal) -> Budgets:
    """FAST v1: the budgets of the grading that keeps the most quality at the goal's density.
    (v2, which maximises a weighted proxy at the goal, is `topology.allocation.fit_budgets_v2`.)"""
    if goal.density is None:
        raise SaexportError(f"FAST v1 allocates for a density; the quality target {goal.name} needs `rule` v2")
    fits = [_fit_delta0(topology, quality, goal.density, growth) for growth in GROWTHS]
    close = [fit for fit in fits if abs(fit[3] - goal.density) <= 0.01] or fits  # gradings that reach the goal
    curve, levels, achieved, mean = max(close, key=lambda fit: fit[2])
    return Budgets(levels, topology.hash(), fidelity=goal.name,
                   curve={"rule": "v1", "proxy": "hellinger", "delta0": curve.delta0, "growth": curve.growth,
                          "density_goal": goal.density, "mean_fidelity": achieved,
                          "candidates": [[fit[0].growth, round(fit[2], 5), round(fit[3], 4)] for fit in fits],
                          "fidelity_vs_density": quality_vs_density(topology, quality)},
                   mean_density=mean)


def _fit_delta0(topology: Topology, quality: torch.Tensor, goal: float, growth: float,
                iterations: int = 60) -> tuple[TargetCurve, torch.Tensor, float, float]:
    """Bisect delta0 (log scale) so that the budgets' mean density is as close as it gets to the goal.
    Returns the curve, its levels, their mean quality and their mean density."""
    steps, layers = quality.shape[:2]

    def solve(delta0: float) -> tuple[torch.Tensor, float]:
        levels = choose_levels(quality, TargetCurve(delta0, growth).targets(steps, layers))
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
    achieved = float((quality.gather(-1, levels.long().unsqueeze(-1)).squeeze(-1)).mean())
    return TargetCurve(delta0, growth), levels, achieved, mean


def quality_vs_density(topology: Topology, quality: torch.Tensor, stride: int = 16) -> list[list[list[float]]]:
    """Per layer, (mean density, mean quality) at every `stride`-th level, averaged over steps and heads."""
    probe = torch.arange(0, LEVELS, stride).tolist() + ([DENSE_LEVEL] if DENSE_LEVEL % stride else [])
    layers, heads = topology.levels.shape[:2]
    budgets = torch.tensor(probe, dtype=torch.uint8).view(-1, 1, 1).expand(-1, layers, heads)
    densities = density(topology.levels, budgets).mean(-1)  # [levels, layers]
    qualities = quality[..., probe].mean(dim=(0, 2)).T  # [levels, layers]
    return [[[round(float(d), 4), round(float(q), 4)] for d, q in zip(densities[:, layer], qualities[:, layer],
                                                                       strict=True)]
            for layer in range(layers)]


def compute_hellinger_quality(calibrator: Calibrator, topology: Topology, rows_per_block: int = 16) -> torch.Tensor:
    """Mean quality 1 - Hellinger `[steps, layers, heads, 256]` of every level of `topology` along the dense sampler
    loop, on `rows_per_block` sampled rows of each query block. An interrupted measurement resumes from the
    calibrator's progress file."""
    blocks, loop = topology.blocks, calibrator.loop
    rows = SampledRows.draw(blocks.seq_len, blocks.block_size, rows_per_block, seed=1)  # rows WEST did not rank with
    row_levels = topology.levels[:, :, rows.block]  # [layers, heads, R, n]
    table = QualityTable(loop.steps, topology.levels.shape[0], topology.levels.shape[1])

    def on_masses(trajectory: QualityTable, run: Run, layer: int, masses: torch.Tensor) -> None:
        trajectory.add(run.step, layer, hellinger_curves(masses, row_levels[layer]))

    key = calibration_key("FAST", topology.hash(), calibrator.loaded.weights_id, calibrator.prompts.embeddings,
                          calibrator.prompts.negative, loop.settings(), rows_per_block)
    checkpoint = CalibrationCheckpoint(calibrator.progress_path(), key, table.state())
    calibrator.measure(blocks, rows, table, on_masses, "FAST fidelity", checkpoint)
    checkpoint.remove()
    return table.mean()
