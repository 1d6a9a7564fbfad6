"""Sensitivity weights w[step, layer] for FAST v2 (`topology.allocation`), measured end to end.

Model. Sparsity's effect on the final latents is taken to factor into a per-step and a per-layer sensitivity:
w[s, l] = a[bucket(s)] * b[l], normalised to mean 1. Both are measured on the calibration prompts x seeds with the
generation's own sampler loop (`runtime.sampler.sample`, guidance included) over the sparse DiT with a uniform
WEST mask (every head keeps the fraction `density` of its block pairs, the level closest to it):

- a[k]: the relative error ||x - x_dense|| / ||x_dense|| of the final latents when only the steps of bucket k
  (S / `buckets` consecutive steps) are sparse, every layer sparse, the other steps dense;
- b[l]: the same error when only layer l (or its group of `layer_groups`) is sparse, at every step.

The loop may be shorter than generation's (`sensitivity_steps`): a bucket is a fraction of the trajectory (the
flow-matching schedule maps step k of S to the same noise level as step k * S' / S of S'), so a[k] measured on a
loop of S' steps weighs the same fraction of generation's S steps (`SensitivityErrors.weights(steps)`). Cheaper by
S / S' per generation; bench/sensitivity_cost.py measures what it costs in rank correlation and fidelity.

Errors are averaged over prompts x seeds; the dense reference runs the same attention op with every budget at 255,
so a measured error is sparsity's alone (at density 1 it is exactly 0). The product ignores interactions (a late
step that is sensitive only in early layers, say); measuring every (bucket, layer) pair would cost buckets x layers
generations instead of buckets + layers. Cost: 1 + buckets + layer groups generations per prompt x seed.

`latent_error_judge` scores whole budgets the same way (minus the final error against dense): what
`fit_budgets_v2(warmup="auto", judge=...)` needs to choose dense warm-up steps end to end.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from saexport.artifacts import Budgets, Topology
from saexport.errors import SaexportError
from saexport.levels import DENSE_LEVEL
from saexport.models.dit import SparseWanDiT, latent_shape
from saexport.runtime.denoisers import TorchDenoiser
from saexport.runtime.parallel.spread import spread
from saexport.runtime.sampler import no_progress, sample
from saexport.topology.allocation import level_densities
from saexport.topology.calibration import CalibrationCheckpoint, Calibrator, calibration_key

log = logging.getLogger("saexport")
STEP_BUCKETS = 5


def uniform_levels(topology: Topology, density: float) -> torch.Tensor:
    """Per (layer, head) the level whose density is closest to `density` (lowest on ties): uint8 `[L, H]`."""
    return (level_densities(topology.levels) - density).abs().argmin(-1).to(torch.uint8)


def final_latents(calibrator: Calibrator, topology: Topology, budget_levels: torch.Tensor | None) -> torch.Tensor:
    """The final latents `[prompts x seeds, *latent_shape]` of the sampler loop over the sparse DiT with
    `budget_levels` `[steps, layers, heads]` on the topology, or dense (None: every budget 255, through the same
    attention op, so that a difference against it is sparsity's alone, not the op's rounding)."""
    return final_latents_of_tables(calibrator, topology, [budget_levels])[0]


def final_latents_of_tables(calibrator: Calibrator, topology: Topology,
                            tables: list[torch.Tensor | None]) -> list[torch.Tensor]:
    """`final_latents` of every budget table in `tables` (None: dense), as generation would make them one by one,
    made together: each (table, prompt, seed) is one sample of a batched sampler loop whose samples carry their own
    budgets, `calibrator.batch_size` samples a forward pass (the noise is drawn per seed, so batching changes no
    sample). Under torchrun the batches are spread over the ranks, each the same batch as in one process (a GPU's
    sums may depend on what shares a batch), and every rank gets every latent (on the CPU) in order."""
    prompts, loop = calibrator.prompts, calibrator.loop
    layers, heads = topology.levels.shape[:2]
    dense = torch.full((loop.steps, layers, heads), DENSE_LEVEL, dtype=torch.uint8)
    pairs = [(prompt, seed) for prompt in range(prompts.embeddings.shape[0]) for seed in loop.seeds]
    if not pairs:
        raise SaexportError("the calibration set is empty: give at least one prompt and one seed")
    samples = [(table, prompt, seed) for table in range(len(tables)) for prompt, seed in pairs]
    batches = [samples[start:start + calibrator.batch_size] for start in range(0, len(samples), calibrator.batch_size)]

    def generate(batch: list[tuple[int, int, int]]) -> torch.Tensor:
        budgets = torch.stack([dense if tables[t] is None else tables[t] for t, _, _ in batch], dim=2)
        model = SparseWanDiT(calibrator.loaded.transformer, topology.grid, topology.layout, topology.levels,
                             budgets, topology.block_size).to(calibrator.device)
        denoiser = TorchDenoiser(model, loop.steps)
        text = prompts.embeddings[[prompt for _, prompt, _ in batch]]
        return sample(denoiser, loop.sampler(model.latent_shape()), text, prompts.negative,
                      [seed for _, _, seed in batch], progress=no_progress).cpu()

    latents = torch.cat([latents for _, latents in spread(batches, generate)])
    return list(latents.split(len(pairs)))


def relative_error(latents: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over samples of ||x - x_ref|| / ||x_ref|| (float64)."""
    latents, reference = latents.double().cpu(), reference.double().cpu()
    diff = (latents - reference).flatten(1).norm(dim=1)
    return float((diff / reference.flatten(1).norm(dim=1).clamp(min=1e-30)).mean())


def step_buckets(steps: int, buckets: int) -> list[tuple[int, int]]:
    """`buckets` (at most `steps`) ranges [start, end) of consecutive steps, as equal as they come."""
    buckets = max(1, min(buckets, steps))
    edges = [round(k * steps / buckets) for k in range(buckets + 1)]
    return [(edges[k], edges[k + 1]) for k in range(buckets)]


@dataclass(frozen=True)
class SensitivityErrors:
    """What `sensitivity_errors` measured, and the weights it implies."""

    steps: int
    buckets: list[tuple[int, int]]  # step ranges [start, end)
    bucket_errors: list[float]  # final latent error with only that bucket sparse
    groups: list[tuple[int, int]]  # layer ranges [start, end)
    group_errors: list[float]  # final latent error with only that layer group sparse
    density: float  # the reference (uniform WEST) density

    def weights(self, steps: int | None = None) -> torch.Tensor:
        """w `[steps, layers]` = a[bucket(s)] * b[group(l)], normalised to mean 1, for a loop of `steps` (None: the
        measured loop's): each bucket covers the same fraction of it as of the measured loop."""
        steps = steps or self.steps
        buckets = self.buckets if steps == self.steps else step_buckets(steps, len(self.buckets))
        if len(buckets) != len(self.buckets):
            raise SaexportError(f"{len(self.buckets)} sensitivity buckets cannot weigh a loop of {steps} steps: "
                                f"measure them with at most {steps} buckets")
        a = torch.zeros(steps, dtype=torch.float64)
        for (start, end), error in zip(buckets, self.bucket_errors, strict=True):
            a[start:end] = error
        layers = self.groups[-1][1]
        b = torch.zeros(layers, dtype=torch.float64)
        for (start, end), error in zip(self.groups, self.group_errors, strict=True):
            b[start:end] = error
        w = a[:, None] * b[None, :]
        if not torch.isfinite(w).all() or float(w.mean()) <= 0:
            raise SaexportError("sparsity changed no final latent measurably: no sensitivity to weigh by")
        return w / w.mean()

    def to_metadata(self) -> dict:
        return {"density": self.density, "steps": self.steps, "buckets": [list(b) for b in self.buckets],
                "bucket_errors": [round(e, 6) for e in self.bucket_errors],
                "layer_groups": [list(g) for g in self.groups],
                "layer_errors": [round(e, 6) for e in self.group_errors]}


def _sparse_one_part_errors(calibrator: Calibrator, topology: Topology, density: float,
                            parts: list[tuple[tuple[int, int], tuple[int, int]]],
                            progress_file: Path | None = None) -> list[float]:
    """For each part (step range, layer range): the final latent error with only that part sparse (uniform WEST
    at `density`), every other entry dense; one dense generation first. With `progress_file`, each finished
    generation is saved (the dense latents and the errors so far) and a rerun of the same measurement skips it."""
    loaded, prompts, loop = calibrator.loaded, calibrator.prompts, calibrator.loop
    steps = loop.steps
    reference = uniform_levels(topology, density)  # [L, H]
    samples = prompts.embeddings.shape[0] * len(loop.seeds)
    state = {"dense": torch.zeros(samples, *latent_shape(loaded.transformer, topology.grid)),
             "errors": torch.full((len(parts),), float("nan"), dtype=torch.float64)}
    key = calibration_key("FAST sensitivity", topology.hash(), loaded.weights_id, prompts.embeddings,
                          prompts.negative, loop.settings(), density, [list(map(list, part)) for part in parts])
    checkpoint = CalibrationCheckpoint(progress_file, key, state)
    if checkpoint.done:
        log.info("resuming: %d of %d sensitivity generations done", len(checkpoint.done), len(parts) + 1)

    def table(part) -> torch.Tensor | None:
        if part is None:
            return None
        (step_start, step_end), (layer_start, layer_end) = part
        levels = torch.full((steps, *reference.shape), DENSE_LEVEL, dtype=torch.uint8)
        levels[step_start:step_end, layer_start:layer_end] = reference[layer_start:layer_end]
        return levels

    # The dense generation first (every error is against it), then the parts, as many at once as one batch holds.
    todo = [(index, part) for index, part in enumerate([None, *parts], start=-1) if (index, 0) not in checkpoint.done]
    per_batch = max(1, calibrator.batch_size // samples)
    groups = [todo[:1], *[todo[i:i + per_batch] for i in range(1, len(todo), per_batch)]] if todo else []
    for group in calibrator.bar([g for g in groups if g], desc="FAST sensitivity", unit="batch"):
        for (index, _), latents in zip(group, final_latents_of_tables(calibrator, topology,
                                                                      [table(part) for _, part in group]),
                                       strict=True):
            if index == -1:
                state["dense"].copy_(latents)
            else:
                state["errors"][index] = relative_error(latents, state["dense"])
        for index, _ in group:  # saved after the whole batch: a batch's generations are one sampler loop
            checkpoint.finish((index, 0))
    checkpoint.remove()
    return state["errors"].tolist()


def sensitivity_errors(calibrator: Calibrator, topology: Topology, density: float = 0.30,
                       buckets: int = STEP_BUCKETS, layer_groups: int | None = None) -> SensitivityErrors:
    """The end-to-end measurements of the module's docstring (`layer_groups`: None measures every layer alone);
    an interrupted measurement resumes from the calibrator's progress file (suffix ".sensitivity")."""
    layers, steps = topology.levels.shape[0], calibrator.loop.steps
    step_ranges = step_buckets(steps, buckets)
    layer_ranges = step_buckets(layers, layer_groups or layers)
    parts = [(r, (0, layers)) for r in step_ranges] + [((0, steps), r) for r in layer_ranges]
    errors = _sparse_one_part_errors(calibrator, topology, density, parts, calibrator.progress_path(".sensitivity"))
    return SensitivityErrors(steps, step_ranges, errors[:len(step_ranges)], layer_ranges,
                             errors[len(step_ranges):], density)


def cell_errors(calibrator: Calibrator, topology: Topology, density: float = 0.30,
                buckets: int = STEP_BUCKETS) -> torch.Tensor:
    """The final latent error with only one (step bucket, layer) cell sparse, for every cell: float64
    `[buckets, layers]`, interactions included (what the weights' product a[k] * b[l] approximates, and what a
    proxy is judged against); 1 + buckets x layers generations per prompt x seed."""
    layers = topology.levels.shape[0]
    step_ranges = step_buckets(calibrator.loop.steps, buckets)
    parts = [(r, (layer, layer + 1)) for r in step_ranges for layer in range(layers)]
    errors = _sparse_one_part_errors(calibrator, topology, density, parts)
    return torch.tensor(errors, dtype=torch.float64).view(len(step_ranges), layers)


def latent_error_judge(calibrator: Calibrator, topology: Topology) -> Callable[[Budgets], float]:
    """A judge for `fit_budgets_v2(warmup="auto")`: minus the mean relative error of the final latents of the
    budgets' sparse DiT against the dense DiT on the calibration prompts x seeds (the dense run is made once)."""
    dense: torch.Tensor | None = None

    def judge(budgets: Budgets) -> float:
        nonlocal dense
        if dense is None:
            dense = final_latents(calibrator, topology, None)
        error = relative_error(final_latents(calibrator, topology, budgets.levels), dense)
        return -error if math.isfinite(error) else -math.inf

    return judge
