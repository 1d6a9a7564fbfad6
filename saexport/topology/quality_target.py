"""FAST for a quality: the least attention work whose videos meet a PSNR against the dense videos.

FAST v2 allocates for a density (`topology.allocation`): per entry the level maximising w * Q - lambda * density.
Its quality at a density is measured end to end, here: the budgets of a few candidate densities generate the
held-out calibration prompts' videos (prompts no calibration stage measured from, at seeds the calibration never
walked), all in one batched sampler loop with the dense videos (`sensitivity.final_latents_of_tables`), and each
candidate's PSNR against the dense video is averaged over those samples (`runtime.fidelity.latent_psnr`: the pixel
PSNR of models whose latents are pixels). PSNR grows with density, so a first round over a coarse grid brackets
the least density that meets the target, and a second round inside the bracket refines it. A candidate meets the
target when the lower end of its 95% interval over prompts does (its mean, with fewer than 3 prompts): the build
promises the quality on prompts it has not seen, so the check errs on the side of more blocks. The chosen budgets
are the least dense candidate that meets it; none below density 1: an error that says what was reached. The curve
measured (density, mean PSNR, lower 95% bound, prompts) is recorded in the budgets file.
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
COARSE = (0.15, 0.25, 0.4, 0.6, 0.85)  # first round: densities, roughly geometric
FINE = 3  # second round: densities evenly inside the bracket


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


def meet_psnr(checker: Calibrator, topology: Topology, goal: Goal,
              budgets_at: Callable[[float], Budgets]) -> Budgets:
    """The least dense of the candidate budgets (`budgets_at(density)`) whose held-out PSNR meets `goal.psnr`."""
    target = goal.psnr
    measured: list[tuple[Budgets, dict]] = []
    dense = None

    def round_of(densities) -> None:
        nonlocal dense
        candidates = []
        for density in densities:
            try:
                candidates.append(budgets_at(density))
            except SaexportError:
                continue  # below the topology's structural minimum: no such budgets
        rows, dense = measure_psnr(checker, topology, candidates, dense)
        for budgets, row in zip(candidates, rows, strict=True):
            measured.append((budgets, row))
            log.info("quality check: density %.3f -> %.2f dB (target %g)", row["density"], row["psnr"], target)

    def meets(row: dict) -> bool:
        return (row["psnr"] if row["psnr_low95"] is None or row["prompts"] < 3 else row["psnr_low95"]) >= target

    round_of(COARSE)
    meeting = sorted((b.mean_density, i) for i, (b, row) in enumerate(measured) if meets(row))
    if meeting:
        high = meeting[0][0]
        below = [b.mean_density for b, _ in measured if b.mean_density < high]
        low = max(below) if below else 0.0
        round_of([low + (high - low) * (k + 1) / (FINE + 1) for k in range(FINE)])
    ok = [(b, row) for b, row in measured if meets(row)]
    curve = sorted(tuple(row.values()) for _, row in measured)
    if not ok:
        best = max((row for _, row in measured), key=lambda row: row["psnr"])
        raise SaexportError(f"the quality target {target:g} dB is not reached below density 1: the best measured is "
                            f"{best['psnr']:.1f} dB at density {best['density']:.2f} (on the held-out calibration "
                            "prompts); ask for a lower target, or a density")
    chosen, row = min(ok, key=lambda item: item[0].mean_density)
    chosen.fidelity = goal.name
    chosen.curve.update({"quality_target": {"psnr": target, "achieved": row, "prompts": checker.prompts.source,
                                            "seeds": list(checker.loop.seeds),
                                            "psnr_vs_density": [list(point) for point in curve]}})
    return chosen
