"""FAST v2: budgets that maximise a weighted quality proxy at the density goal (docs/ARCHITECTURE.md, "The method
in one page").

Per (step s, layer l, head h) entry the budget is the level P maximising

    w[s, l] * Q[s, l, h, P] - lambda * density[l, h, P],

where Q is a quality proxy measured for every level along the calibration loop (higher is better: 1 - Hellinger,
or 1 - the relative error of the attention output; `topology.quality`), w a per-step and per-layer sensitivity
measured end to end (`topology.sensitivity`; uniform by default) and density[l, h, P] the fraction of the head's
block pairs whose level is <= P. The entries are independent given lambda, and the table's mean density falls as
lambda grows, so lambda is bisected until the mean density meets the goal (`goals.Goal`). This is the
Lagrangian relaxation of "maximise the mean of w Q subject to the mean density <= goal": its solutions lie on the
convex hull of each entry's (density, w Q) curve; the entries that are indifferent at the final lambda (their
choice differs between the two ends of the bisection) are then moved up one by one, best value per block first,
while the goal allows, and what is left is spent by single upward moves that gain the most per block (never one
that loses value), so the table lands on the goal (from below) instead of one hull vertex below it.

Dense warm-up steps (`Warmup`): the first `steps` steps are fixed at level 255 (density 1) and counted inside the
goal, so the other steps share what is left. `steps="auto"` tries 0 .. S // 3 warm-up steps and keeps the count
whose budgets score best: by `judge(budgets)` when given (e.g. minus the final latent error against dense,
`topology.sensitivity.latent_error_judge`), else by the proxy objective. Without a judge the objective can only
favour warm-up where the relaxation is inexact: forcing entries dense is a constraint on the same objective, so an
end-to-end judge is what makes the choice meaningful.

Ties between levels (same objective) go to the lowest level: levels that no block pair has keep the same mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from saexport.artifacts import Budgets, Topology
from saexport.errors import SaexportError
from saexport.levels import DENSE_LEVEL, density
from saexport.topology.fast import LEVELS, quality_vs_density
from saexport.topology.goals import WARMUP_AUTO, Goal, Warmup

ITERATIONS = 60  # bisection steps of lambda


def level_densities(topology_levels: torch.Tensor) -> torch.Tensor:
    """Fraction of each head's block pairs kept at every level: `[layers, heads, n, n]` -> float64 `[L, H, 256]`."""
    layers, heads = topology_levels.shape[:2]
    budgets = torch.arange(LEVELS).view(-1, 1, 1).expand(-1, layers, heads)
    return density(topology_levels, budgets).permute(1, 2, 0).contiguous()


@dataclass(frozen=True)
class Allocation:
    levels: torch.Tensor  # uint8 [S, L, H]
    lam: float  # the Lagrange multiplier: value per unit of density at the margin
    density: float  # achieved mean density of the whole table (warm-up included)
    objective: float  # mean over every entry of w * Q at its level (warm-up included)
    warmup_steps: int


def levels_at(value: torch.Tensor, densities: torch.Tensor, lam: float) -> torch.Tensor:
    """Per entry the level maximising `value - lam * density` (lowest level on ties): value `[S, L, H, 256]`,
    densities `[L, H, 256]` -> int64 `[S, L, H]`."""
    return (value - lam * densities.unsqueeze(0)).argmax(-1)


def allocate(quality: torch.Tensor, weights: torch.Tensor, densities: torch.Tensor, goal: float,
             warmup_steps: int = 0, iterations: int = 60) -> Allocation:
    """The v2 allocation of the module's docstring. quality `[S, L, H, 256]`, weights `[S, L]`, densities
    `[L, H, 256]` (`level_densities`), goal: the table's mean density, warm-up steps included."""
    steps, layers, heads, levels = quality.shape
    if levels != LEVELS or tuple(weights.shape) != (steps, layers) or tuple(densities.shape) != (layers, heads,
                                                                                                   LEVELS):
        raise SaexportError(f"quality {tuple(quality.shape)}, weights {tuple(weights.shape)} and densities "
                            f"{tuple(densities.shape)} do not describe one [steps, layers, heads, 256] table")
    if not 0 <= warmup_steps <= steps:
        raise SaexportError(f"`warmup` must be within 0..{steps} steps, got {warmup_steps}")
    if not torch.isfinite(quality).all() or not torch.isfinite(weights).all():
        raise SaexportError("the quality table or the weights hold non-finite values")
    if (weights < 0).any():
        raise SaexportError("sensitivity weights must be non-negative")
    value = (weights.double()[:, :, None, None] * quality.double())[warmup_steps:]  # the free entries
    dens = densities.double()
    entries = steps * layers * heads
    budget = goal * entries - warmup_steps * layers * heads  # total density the free entries may use
    free = value.shape[0] * layers * heads
    minimum = float(dens[..., 0].sum()) * value.shape[0]
    if free and budget < minimum - 1e-9:
        raise SaexportError(f"{warmup_steps} dense warm-up steps leave the other steps {budget / free:.3f} of "
                            f"blocks, below the topology's minimum {minimum / free:.3f}")

    def total(choice: torch.Tensor) -> float:
        return float(dens.unsqueeze(0).expand_as(value).gather(-1, choice.unsqueeze(-1)).sum())

    if free == 0:
        choice, lam = torch.zeros(0, layers, heads, dtype=torch.int64), 0.0
    else:
        low, high = 0.0, 1.0
        choice_low = levels_at(value, dens, low)
        if total(choice_low) <= budget:  # the best levels already fit: lambda = 0
            choice, lam = choice_low, 0.0
        else:
            while total(levels_at(value, dens, high)) > budget + 1e-9 and high < 1e15:
                high *= 2
            for _ in range(iterations):
                mid = (low + high) / 2
                if total(levels_at(value, dens, mid)) > budget + 1e-9:
                    low = mid
                else:
                    high = mid
            choice, lam = _fill(value, dens, levels_at(value, dens, low), levels_at(value, dens, high), budget), high
            choice = _top_up(value, dens, choice, budget)
    warm = torch.full((warmup_steps, layers, heads), DENSE_LEVEL, dtype=torch.int64)
    table = torch.cat([warm, choice]).to(torch.uint8)
    chosen = (weights.double()[:, :, None] * quality.double().gather(-1, table.long().unsqueeze(-1)).squeeze(-1))
    achieved = float(dens.unsqueeze(0).expand(steps, -1, -1, -1).gather(-1, table.long().unsqueeze(-1)).mean())
    return Allocation(table, float(lam), achieved, float(chosen.mean()), warmup_steps)


def _fill(value: torch.Tensor, dens: torch.Tensor, low: torch.Tensor, high: torch.Tensor,
          budget: float) -> torch.Tensor:
    """From the choice at the high end of the bisection (within budget), move the entries that differ at the low
    end to their low-end level, most value per unit of density first, while the total stays within budget."""
    expanded = dens.unsqueeze(0).expand_as(value)
    d_low = expanded.gather(-1, low.unsqueeze(-1)).squeeze(-1)
    d_high = expanded.gather(-1, high.unsqueeze(-1)).squeeze(-1)
    v_low = value.gather(-1, low.unsqueeze(-1)).squeeze(-1)
    v_high = value.gather(-1, high.unsqueeze(-1)).squeeze(-1)
    extra = (d_low - d_high).flatten()
    movable = (extra > 0).nonzero().flatten()
    if movable.numel() == 0:
        return high
    ratio = (v_low - v_high).flatten()[movable] / extra[movable]
    order = movable[ratio.argsort(descending=True, stable=True)]
    used = float(d_high.sum())
    choice = high.clone().flatten()
    for index in order.tolist():
        if used + float(extra[index]) > budget + 1e-9:
            continue
        used += float(extra[index])
        choice[index] = low.flatten()[index]
    return choice.view_as(high)


def _top_up(value: torch.Tensor, dens: torch.Tensor, choice: torch.Tensor, budget: float,
            rounds: int = 1000) -> torch.Tensor:
    """Spend what the goal still allows: in rounds, each entry's best move to a higher level that fits (the most
    value per unit of density, never one that loses value), taken best first while they fit. Where every entry's
    curve is concave the Lagrangian fill leaves less than one move; non-concave curves (a proxy that dips as blocks
    are added) can leave a hull jump unspent, which matters on small tables."""
    expanded = dens.unsqueeze(0).expand_as(value)
    choice = choice.clone()
    for _ in range(rounds):
        d_now = expanded.gather(-1, choice.unsqueeze(-1))
        used = float(d_now.sum())
        extra = expanded - d_now
        gain = value - value.gather(-1, choice.unsqueeze(-1))
        fits = (extra > 1e-12) & (extra <= budget - used + 1e-9) & (gain >= 0)
        ratio = torch.where(fits, gain / extra.clamp(min=1e-12), float("-inf"))
        best_ratio, best_level = ratio.max(-1)
        candidates = (best_ratio > float("-inf")).flatten().nonzero().flatten()
        if candidates.numel() == 0:
            break
        order = candidates[best_ratio.flatten()[candidates].argsort(descending=True, stable=True)]
        flat_extra = extra.flatten(0, -2)
        moved = False
        for entry in order.tolist():
            level = int(best_level.flatten()[entry])
            step = float(flat_extra[entry, level])
            if used + step <= budget + 1e-9:
                used += step
                choice.view(-1)[entry] = level
                moved = True
        if not moved:
            break
    return choice


def fit_budgets_v2(topology: Topology, quality: torch.Tensor, goal: Goal, proxy: str,
                   weights: torch.Tensor | None = None, warmup: Warmup = Warmup()) -> Budgets:
    """FAST v2 budgets at the goal's density (the module's docstring).

    quality `[S, L, H, 256]` (higher is better; `proxy` names it in the file: "hellinger", "output", "residual"
    from `topology.quality`, required so that no file misnames its proxy), weights `[S, L]` (None: uniform)."""
    if goal.density is None:
        raise SaexportError(f"the allocation is for a density; a quality target ({goal.name}) is met by "
                            "`topology.quality_target.meet_psnr`")
    steps, layers = quality.shape[:2]
    if tuple(quality.shape[1:3]) != tuple(topology.levels.shape[:2]):
        raise SaexportError(f"the quality table covers {tuple(quality.shape[1:3])} layers x heads, the topology "
                            f"{tuple(topology.levels.shape[:2])}")
    weights = torch.ones(steps, layers, dtype=torch.float64) if weights is None else weights.double()
    densities = level_densities(topology.levels)

    def budgets_of(allocation: Allocation, candidates: list | None = None) -> Budgets:
        curve = {"rule": "v2", "proxy": proxy, "density_goal": goal.density, "lambda": allocation.lam,
                 "warmup": warmup.steps, "warmup_steps": allocation.warmup_steps, "objective": allocation.objective,
                 "achieved_density": allocation.density,
                 "weights": [[float(f"{x:.5g}") for x in row] for row in weights.tolist()],
                 "quality_vs_density": quality_vs_density(topology, quality)}
        if candidates is not None:
            curve["warmup_candidates"] = candidates
        return Budgets(allocation.levels, topology.hash(), fidelity=goal.name, curve=curve,
                       mean_density=allocation.density)

    if warmup.steps != WARMUP_AUTO:
        return budgets_of(allocate(quality, weights, densities, goal.density, warmup.steps, ITERATIONS))
    last = steps // 3 if warmup.max_steps is None else min(warmup.max_steps, steps)
    best, candidates = None, []
    for count in range(last + 1):
        try:
            allocation = allocate(quality, weights, densities, goal.density, count, ITERATIONS)
        except SaexportError:
            break  # more warm-up steps leave even less: infeasible from here on
        score = warmup.judge(budgets_of(allocation)) if warmup.judge is not None else allocation.objective
        candidates.append([count, round(allocation.objective, 6), round(allocation.density, 5), float(score)])
        if best is None or score > best[0]:
            best = (score, allocation)
    if best is None:
        raise SaexportError("no warm-up count meets the density goal")
    return budgets_of(best[1], candidates)
