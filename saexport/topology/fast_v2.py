"""FAST v2 end to end: the quality proxy along the calibration loop (`topology.quality`), the sensitivity weights
(`topology.sensitivity`), and the allocation at the preset's density goal (`topology.allocation`), in one call
for `saexport budgets --rule v2` and the build.

The budgets file's curve records the rule, the proxy, the weights and how they were measured (per-bucket and
per-layer final errors), lambda, the warm-up (asked and chosen, with every candidate's score when chosen), the
achieved density and the objective. Timings are logged, not recorded, so that equal inputs give equal files.
"""

from __future__ import annotations

import logging
import time

import torch

from saexport.artifacts import Budgets, Topology
from saexport.runtime.parallel.launch import writes_outputs
from saexport.topology.allocation import fit_budgets_v2
from saexport.topology.calibration import CalibrationCheckpoint, Calibrator, calibration_key
from saexport.topology.fast import LEVELS
from saexport.topology.goals import WARMUP_AUTO, BudgetRule, Goal, Warmup
from saexport.topology.quality import compute_quality
from saexport.topology.quality_target import meet_psnr
from saexport.topology.sensitivity import latent_error_judge, sensitivity_errors

log = logging.getLogger("saexport")
SENSITIVITY_DENSITY = 0.3  # the uniform density the sensitivity is measured at when the goal is a quality


def compute_budgets_v2(calibrator: Calibrator, topology: Topology, goal: Goal, rule: BudgetRule = BudgetRule(),
                       max_warmup: int | None = None) -> Budgets:
    """FAST v2 budgets of `topology` for `goal`: Q of the rule's proxy measured along the calibrator's loop,
    weights measured end to end at the goal's density (for a quality goal, at `SENSITIVITY_DENSITY`; uniform
    without `rule.sensitivity`) on the first `rule.sensitivity_prompts` calibration prompts (each costs
    1 + buckets + layer groups whole generations, batched, on a loop of `rule.sensitivity_loop`), warm-up steps
    given or "auto" (chosen among 0..`max_warmup` by the final latent error against dense on the calibration
    prompts). A density goal is allocated at once; a quality goal (`goal.psnr`) by the least density whose videos
    of the held-out calibration prompts meet it (`quality_target.meet_psnr`). An interrupted build resumes from the
    calibrator's progress files."""
    start = time.perf_counter()
    quality = _measured_quality(calibrator, topology, rule)
    log.info("FAST v2: %s proxy measured in %.1f s", rule.proxy, time.perf_counter() - start)
    weights, measured = None, "uniform"
    if rule.sensitivity:
        start = time.perf_counter()
        density = goal.density if goal.density is not None else SENSITIVITY_DENSITY
        measuring = calibrator.first_prompts(rule.sensitivity_prompts).with_steps(
            rule.sensitivity_loop(calibrator.loop.steps))
        errors = sensitivity_errors(measuring, topology, density, rule.buckets, rule.layer_groups)
        weights = errors.weights(calibrator.loop.steps)
        measured = {**errors.to_metadata(), "prompts": rule.sensitivity_prompts}
        log.info("FAST v2: sensitivity measured in %.1f s (%d generations of %d steps per prompt x seed)",
                 time.perf_counter() - start, 1 + len(errors.buckets) + len(errors.groups), errors.steps)
    judge = latent_error_judge(calibrator, topology) if rule.warmup == WARMUP_AUTO else None
    start = time.perf_counter()

    def budgets_at(density: float) -> Budgets:
        budgets = fit_budgets_v2(topology, quality, Goal.of_density(density), rule.proxy, weights,
                                 Warmup(rule.warmup, max_warmup, judge))
        budgets.curve.update({"rows_per_head": rule.rows_per_head, "sensitivity": measured})
        return budgets

    if goal.psnr is None:
        budgets = budgets_at(goal.density)
        budgets.fidelity = goal.name
    else:
        budgets = meet_psnr(calibrator.checker(), topology, goal, budgets_at)
    log.info("FAST v2: allocation in %.1f s", time.perf_counter() - start)
    quality_file = calibrator.progress_path(".quality")
    if quality_file is not None and writes_outputs():
        quality_file.unlink(missing_ok=True)
    return budgets


def _measured_quality(calibrator: Calibrator, topology: Topology, rule: BudgetRule) -> torch.Tensor:
    """The proxy's Q, kept beside the calibrator's progress file once measured (until the budgets are written): a
    build interrupted during the sensitivity's generations does not measure the proxy again."""
    loop, prompts = calibrator.loop, calibrator.prompts
    steps, (layers, heads) = loop.steps, topology.levels.shape[:2]
    state = {"quality": torch.zeros(steps, layers, heads, LEVELS, dtype=torch.float64)}
    key = calibration_key("FAST v2 quality", topology.hash(), calibrator.loaded.weights_id, prompts.embeddings,
                          prompts.negative, loop.settings(), rule.proxy, rule.rows_per_head)
    saved = CalibrationCheckpoint(calibrator.progress_path(".quality"), key, state)
    if not saved.done:
        state["quality"].copy_(compute_quality(calibrator, topology, (rule.proxy,), rule.rows_per_head)[rule.proxy])
        saved.finish((0, 0))
    return state["quality"]
