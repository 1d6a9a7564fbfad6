"""FAST for a quality: the least attention work whose videos meet a PSNR against the dense videos.

FAST v2 allocates for a density (`topology.allocation`): per entry the level maximising w * Q - lambda * density.
Its quality at a density is measured end to end, here: the budgets of candidate densities generate the held-out
calibration prompts' videos (prompts no calibration stage measured from, at seeds the calibration never walked) in
batched sampler loops with the dense videos (`sensitivity.final_latents_of_tables`; the dense ones made once), and
each candidate's PSNR against the dense video is averaged over those samples (`runtime.fidelity.latent_psnr`: the
pixel PSNR of models whose latents are pixels).

PSNR grows with density, so the search bisects a bracket [densest that failed, least that met], from [0, 1], until
it is `RESOLUTION` wide: 5 candidates. One candidate a round, not several batched: the check's own samples (8
prompts on a GPU) fill a forward pass of a Wan-size model already, so candidates batched together cost what they
cost one after another, and a bisection needs the fewest of them (bench/build_cost.py: 5 where rounds of 4 took 7).

A candidate meets the target when the lower end of its 95% interval over prompts does (its mean, with fewer than 3
prompts): the build promises the quality on prompts it has not seen, so the check errs on the side of more blocks.
The chosen budgets are the least dense candidate that meets it; none below density 1: an error that says what was
reached. The curve measured (density, mean PSNR, lower 95% bound, prompts) is recorded in the budgets file.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch

from saexport.artifacts import Budgets, Topology
from saexport.errors import SaexportError
from saexport.runtime.fidelity import latent_psnr, t_interval
from saexport.topology.calibration import Calibrator
from saexport.topology.goals import Goal
from saexport.topology.sensitivity import final_latents_of_tables

log = logging.getLogger("saexport")
RESOLUTION = 0.05  # the search stops when the least density that meets is bracketed this closely


def measure_psnr(checker: Calibrator, topology: Topology, budgets: list[Budgets],
                 dense: torch.Tensor | None = None) -> tuple[list[dict], torch.Tensor]:
    """For each budgets, the PSNR of the checker's videos against the dense ones: mean and 95% interval over the
    prompts (seeds of a prompt averaged), in one batched sampler loop; and the dense videos' latents (made in the
    same loop unless given: a second round reuses them)."""
    tables = ([None] if dense is None else []) + [b.levels for b in budgets]
    latents = final_latents_of_tables(checker, topology, tables)
    if dense is None:
        dense, latents = latents[0], latents[1:]
    prompts = [p for p in range(checker.prompts.embeddings.shape[0]) for _ in checker.loop.seeds]
    rows = []
    for table, sparse in zip(budgets, latents, strict=True):
        values = latent_psnr(sparse, dense).double()
        per_prompt = torch.stack([values[[i for i, p in enumerate(prompts) if p == q]].mean()
                                  for q in sorted(set(prompts))])
        interval = t_interval(per_prompt)
        rows.append({"density": round(table.mean_density, 5), "psnr": round(interval.mean, 3),
                     "psnr_low95": round(interval.mean - interval.half, 3) if math.isfinite(interval.half) else None,
                     "prompts": interval.n})
    return rows, dense


def next_density(low: float, high: float) -> float | None:
    """The density the bisection measures next inside the bracket [low, high]: its middle; None once the bracket is
    `RESOLUTION` wide."""
    return None if high - low <= RESOLUTION + 1e-9 else (low + high) / 2


def meet_psnr(checker: Calibrator, topology: Topology, goal: Goal,
              budgets_at: Callable[[float], Budgets]) -> Budgets:
    """The least dense of the candidate budgets (`budgets_at(density)`) whose held-out PSNR meets `goal.psnr`."""
    target = goal.psnr
    measured: list[tuple[float, Budgets, dict]] = []  # (asked density, budgets, row)
    dense = None

    def meets(row: dict) -> bool:
        return (row["psnr"] if row["psnr_low95"] is None or row["prompts"] < 3 else row["psnr_low95"]) >= target

    low, high = 0.0, 1.0  # the densest asked that failed below the least asked that met (dense always meets)
    while (density := next_density(low, high)) is not None:
        try:
            budgets = budgets_at(density)
        except SaexportError:
            low = density  # below the topology's structural minimum: no such budgets
            continue
        (row,), dense = measure_psnr(checker, topology, [budgets], dense)
        measured.append((density, budgets, row))
        log.info("quality check: density %.3f -> %.2f dB (target %g)", row["density"], row["psnr"], target)
        high = min((asked for asked, _, result in measured if meets(result)), default=1.0)
        low = max([low, *(asked for asked, _, result in measured if asked < high and not meets(result))])
    ok = [(b, row) for _, b, row in measured if meets(row)]
    curve = sorted(tuple(row.values()) for _, _, row in measured)
    if not ok:
        best = max((row for _, _, row in measured), key=lambda row: row["psnr"], default=None)
        reached = "nothing was measured" if best is None else (
            f"the best measured is {best['psnr']:.1f} dB at density {best['density']:.2f}")
        raise SaexportError(f"the quality target {target:g} dB is not reached below density 1: {reached} (on the "
                            "held-out calibration prompts); ask for a lower target, or a density")
    chosen, row = min(ok, key=lambda item: item[0].mean_density)
    chosen.fidelity = goal.name
    chosen.curve.update({"quality_target": {"psnr": target, "achieved": row, "prompts": checker.prompts.source,
                                            "seeds": list(checker.loop.seeds),
                                            "psnr_vs_density": [list(point) for point in curve]}})
    return chosen
