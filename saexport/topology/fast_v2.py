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
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from saexport.artifacts import Budgets, Topology
from saexport.errors import SaexportError
from saexport.models.checkpoint import LoadedModel
from saexport.topology.allocation import WARMUP_AUTO, fit_budgets_v2
from saexport.topology.calibration import CalibrationCheckpoint, CalibrationLoop, calibration_key
from saexport.topology.fast import DENSITY_GOALS, LEVELS
from saexport.topology.prompts import CalibrationSet
from saexport.topology.quality import PROXIES, ROWS_PER_HEAD, compute_quality
from saexport.topology.sensitivity import STEP_BUCKETS, latent_error_judge, sensitivity_errors

log = logging.getLogger("saexport")


def compute_budgets_v2(
    loaded: LoadedModel,
    topology: Topology,
    prompts: CalibrationSet,
    loop: CalibrationLoop,
    preset: str,
    proxy: str = "output",
    rows_per_head: int = ROWS_PER_HEAD,
    sensitivity: bool = True,
    sensitivity_prompts: int | None = None,
    buckets: int = STEP_BUCKETS,
    layer_groups: int | None = None,
    warmup: int | str = 0,
    max_warmup: int | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 1,
    progress: Callable = tqdm,
    checkpoint_path: Path | None = None,
) -> Budgets:
    """FAST v2 budgets of `topology` for `preset`: Q of `proxy` measured along `loop`, weights measured end to end
    at the preset's density (uniform when `sensitivity` is False) on the first `sensitivity_prompts` calibration
    prompts (None: all; each costs 1 + buckets + layers whole generations), warm-up steps given or "auto" (chosen
    by the final latent error against dense on the calibration prompts)."""
    if preset not in DENSITY_GOALS:
        raise SaexportError(f"unknown fidelity preset '{preset}'; use one of {', '.join(DENSITY_GOALS)}")
    if proxy not in PROXIES:
        raise SaexportError(f"unknown quality proxy '{proxy}'; use one of {', '.join(PROXIES)}")
    if warmup != WARMUP_AUTO and not (isinstance(warmup, int) and 0 <= warmup <= loop.steps):
        raise SaexportError(f"--warmup must be a number of steps within 0..{loop.steps} or '{WARMUP_AUTO}', "
                            f"got {warmup!r}")
    start = time.perf_counter()
    quality = _measured_quality(loaded, topology, prompts, loop, proxy, rows_per_head, device, progress,
                                checkpoint_path)
    log.info("FAST v2: %s proxy measured in %.1f s", proxy, time.perf_counter() - start)
    weights, measured = None, "uniform"
    if sensitivity:
        start = time.perf_counter()
        count = len(prompts.embeddings) if sensitivity_prompts is None else sensitivity_prompts
        if not 1 <= count <= len(prompts.embeddings):
            raise SaexportError(f"--sensitivity-prompts must be within 1..{len(prompts.embeddings)} (the calibration "
                                f"prompts), got {count}")
        subset = CalibrationSet(prompts.embeddings[:count], prompts.negative, f"{prompts.source}, first {count}")
        errors = sensitivity_errors(loaded, topology, subset, loop, DENSITY_GOALS[preset], buckets, layer_groups,
                                    device, batch_size, progress, None if checkpoint_path is None
                                    else _sibling(checkpoint_path, ".sensitivity"))
        weights, measured = errors.weights(), {**errors.to_metadata(), "prompts": count}
        log.info("FAST v2: sensitivity measured in %.1f s (%d generations per prompt x seed)",
                 time.perf_counter() - start, 1 + len(errors.buckets) + len(errors.groups))
    judge = latent_error_judge(loaded, topology, prompts, loop, device, batch_size) if warmup == WARMUP_AUTO else None
    start = time.perf_counter()
    budgets = fit_budgets_v2(topology, quality, preset, proxy=proxy, weights=weights, warmup=warmup,
                             max_warmup=max_warmup, judge=judge)
    log.info("FAST v2: allocation in %.1f s", time.perf_counter() - start)
    budgets.curve.update({"rows_per_head": rows_per_head, "sensitivity": measured})
    if checkpoint_path is not None:
        _sibling(checkpoint_path, ".quality").unlink(missing_ok=True)
    return budgets


def _sibling(checkpoint_path: Path, suffix: str) -> Path:
    return checkpoint_path.with_name(checkpoint_path.name + suffix)


def _measured_quality(loaded: LoadedModel, topology: Topology, prompts: CalibrationSet, loop: CalibrationLoop,
                      proxy: str, rows_per_head: int, device, progress: Callable,
                      checkpoint_path: Path | None) -> torch.Tensor:
    """The proxy's Q, kept beside `checkpoint_path` once measured (until the budgets are written): a build
    interrupted during the sensitivity's generations does not measure the proxy again."""
    steps, (layers, heads) = loop.steps, topology.levels.shape[:2]
    state = {"quality": torch.zeros(steps, layers, heads, LEVELS, dtype=torch.float64)}
    key = calibration_key("FAST v2 quality", topology.hash(), loaded.weights_id, prompts.embeddings,
                          prompts.negative, loop.settings(), proxy, rows_per_head)
    saved = CalibrationCheckpoint(None if checkpoint_path is None else _sibling(checkpoint_path, ".quality"), key,
                                  state)
    if not saved.done:
        state["quality"].copy_(compute_quality(loaded, topology, prompts, loop, (proxy,), rows_per_head, device,
                                               progress, checkpoint_path)[proxy])
        saved.finish((0, 0))
    return state["quality"]
