"""WEST: the threshold map of every layer and head (docs/ARCHITECTURE.md, "The method in one page").

For each calibration run i (one pass of one step of one prompt x seed trajectory), block scores S_i(u, v) are
the mean attention probability inside the block pair (`block_scores`). A pair's level in run i is the smallest
level P at which it enters Top(S_i, P/255), the ceil(P n^2 / 255) best pairs: with rank_i(u, v) = 1 + the number
of pairs scoring strictly higher (equal scores share the best rank of their tie group),

    level_i(u, v) = floor(255 (rank_i(u, v) - 1) / n^2) + 1    (`levels.levels_from_scores`; at most 255).

The runs are combined by an `aggregation` (recorded in the topology's calibration metadata):
- "min" (the default): the minimum over all runs of level_i: a pair is kept at density p if any run needed it;
- "prompt-min-of-step-mean": per prompt x seed trajectory, the scores averaged over its steps and passes and
  ranked into levels; then the minimum over trajectories (the method's minimum over prompts, steps averaged);
- "quantile": the q-quantile over runs of level_i (q = 0.1: the level by which 10% of runs needed the pair),
  from a per-pair histogram of levels in bins of `quantile_stride` levels, rounded down to its bin's lower edge
  (conservative; memory: layers x heads x n^2 x 256 / stride x 2 bytes);
- "mean-score": the scores averaged over all runs, ranked into levels.
The diagonal is structural and always kept (level 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from saexport.artifacts import BlockedGrid, Topology
from saexport.errors import SaexportError
from saexport.levels import DENSE_LEVEL, levels_from_scores
from saexport.topology.calibration import CalibrationCheckpoint, Calibrator, Run, SampledRows, calibration_key

LEVELS = DENSE_LEVEL + 1


def block_scores(masses: torch.Tensor, rows: SampledRows, seq_len: int, block_size: int) -> torch.Tensor:
    """Block masses `[heads, R, n]` of one run -> mean probability per block pair `[heads, n, n]` (float64, on
    the masses' device). The rows are summed per query block by a product with a 0/1 matrix, not by an atomic
    scatter, so a GPU gives the same sums on every run (a rank is a strict comparison of them)."""
    heads, r, n = masses.shape
    device = masses.device
    rows_of_block = torch.zeros(n, r, dtype=torch.float64, device=device)
    rows_of_block[rows.block.to(device), torch.arange(r, device=device)] = 1.0
    sums = rows_of_block @ masses.double()
    counts = rows_of_block.sum(1).clamp(min=1)
    key_lengths = torch.full((n,), float(block_size), dtype=torch.float64, device=device)
    key_lengths[-1] = seq_len - (n - 1) * block_size
    return sums / counts.view(1, n, 1) / key_lengths.view(1, 1, n)


AGGREGATIONS = ("min", "prompt-min-of-step-mean", "quantile", "mean-score")


@dataclass(frozen=True)
class Aggregation:
    """How WEST combines its runs (the module's docstring): `rule`, and for "quantile" the quantile and the
    histogram's bin width in levels (`stride`)."""

    rule: str = "min"
    quantile: float = 0.1
    stride: int = 4

    def __post_init__(self):
        if self.rule not in AGGREGATIONS:
            raise SaexportError(f"`aggregation` must be one of {', '.join(AGGREGATIONS)}, got {self.rule!r}")
        if self.rule == "quantile" and not (0 <= self.quantile <= 1 and 1 <= self.stride <= LEVELS):
            raise SaexportError(f"the quantile must be within [0, 1] and its stride within 1..{LEVELS}, "
                                f"got {self.quantile} and {self.stride}")

    def settings(self) -> dict:
        """What the topology's calibration metadata records of the aggregation."""
        if self.rule == "quantile":
            return {"aggregation": self.rule, "quantile": self.quantile, "quantile_stride": self.stride}
        return {"aggregation": self.rule}


class ThresholdMap:
    """The runs' block scores combined by an aggregation (the module's docstring) into uint8 `[layers, heads, n, n]`.

    Each prompt x seed trajectory is measured into a map of its own (`empty()`, then `add_run(layer, scores)` for
    each of its runs and layers), merged into the whole one (`merge(trajectory.state())`) in trajectory order;
    `state()` is the live tensors a checkpoint saves. The state lives on `device`, where the probes' scores are: a
    calibration on a GPU never copies a run's scores to the host (the ranking of every run is a sort of heads x n^2
    scores per layer)."""

    def __init__(self, layers: int, heads: int, n: int, aggregation: Aggregation = Aggregation(),
                 device: str | torch.device = "cpu"):
        self.aggregation = aggregation.rule
        self._settings, self._device = (layers, heads, n, aggregation), device
        self.quantile, self.stride = aggregation.quantile, aggregation.stride
        shape = (layers, heads, n, n)
        # the running minimum ("min", "prompt-min-of-step-mean")
        self.levels = torch.full(shape, DENSE_LEVEL, dtype=torch.uint8, device=device)
        self._state = {"levels": self.levels}
        if self.aggregation in ("prompt-min-of-step-mean", "mean-score"):
            self._state["sum"] = torch.zeros(shape, dtype=torch.float64, device=device)
            self._state["count"] = torch.zeros(layers, dtype=torch.float64, device=device)
        if self.aggregation == "quantile":
            bins = -(-LEVELS // self.stride)
            self._state["histogram"] = torch.zeros(*shape, bins, dtype=torch.int16, device=device)
            self._state["runs"] = torch.zeros(layers, dtype=torch.int64, device=device)

    def empty(self) -> ThresholdMap:
        return ThresholdMap(*self._settings, device=self._device)

    def state(self) -> dict[str, torch.Tensor]:
        return self._state

    def add_run(self, layer: int, scores: torch.Tensor) -> None:
        if self.aggregation == "min":
            self.levels[layer] = torch.minimum(self.levels[layer], levels_from_scores(scores))
        elif self.aggregation == "quantile":
            bins = levels_from_scores(scores).long() // self.stride
            self._state["histogram"][layer].scatter_add_(-1, bins.unsqueeze(-1),
                                                          torch.ones(bins.unsqueeze(-1).shape, dtype=torch.int16,
                                                                     device=bins.device))
            self._state["runs"][layer] += 1
        else:
            self._state["sum"][layer] += scores.double()
            self._state["count"][layer] += 1

    def merge(self, trajectory: dict[str, torch.Tensor]) -> None:
        """Fold a trajectory's map in: minima by minimum; "prompt-min-of-step-mean" its steps' mean scores ranked;
        sums and counts added."""
        other = {name: tensor.to(self.levels.device) for name, tensor in trajectory.items()}
        torch.minimum(self.levels, other["levels"], out=self.levels)
        if self.aggregation == "prompt-min-of-step-mean":
            for layer in range(self.levels.shape[0]):
                if other["count"][layer] > 0:
                    mean = other["sum"][layer] / other["count"][layer]
                    self.levels[layer] = torch.minimum(self.levels[layer], levels_from_scores(mean))
        elif self.aggregation == "quantile":
            if int((self._state["runs"] + other["runs"]).max()) > torch.iinfo(torch.int16).max:
                raise SaexportError("the quantile aggregation counts at most 32767 runs per pair")
            self._state["histogram"] += other["histogram"]
            self._state["runs"] += other["runs"]
        elif self.aggregation == "mean-score":
            self._state["sum"] += other["sum"]
            self._state["count"] += other["count"]

    def result(self) -> torch.Tensor:
        if self.aggregation == "mean-score":
            total, count = self._state["sum"], self._state["count"]
            levels = levels_from_scores(total / count.clamp(min=1).view(-1, 1, 1, 1))
            levels[count == 0] = DENSE_LEVEL
        elif self.aggregation == "quantile":
            histogram, runs = self._state["histogram"], self._state["runs"]
            needed = (self.quantile * runs.double()).ceil().clamp(min=1).view(-1, 1, 1, 1, 1)  # the k-th smallest
            reached = histogram.long().cumsum(-1) >= needed
            levels = (reached.to(torch.uint8).argmax(-1) * self.stride).clamp(max=DENSE_LEVEL).to(torch.uint8)
            levels[runs == 0] = DENSE_LEVEL
        else:
            levels = self.levels.clone()
        levels = levels.cpu()
        n = levels.shape[-1]
        levels[..., torch.arange(n), torch.arange(n)] = 0
        return levels


def compute_topology(calibrator: Calibrator, blocks: BlockedGrid, rows_per_block: int = 16,
                     aggregation: Aggregation = Aggregation()) -> Topology:
    """WEST over the passes of the sampler's loop for every prompt x seed: each (run, layer) is one run of the rule,
    the runs combined by `aggregation` (the module's docstring). An interrupted calibration resumes from the
    calibrator's progress file."""
    loaded, prompts, loop = calibrator.loaded, calibrator.prompts, calibrator.loop
    preset = loaded.preset
    seq_len = blocks.seq_len
    rows = SampledRows.draw(seq_len, blocks.block_size, rows_per_block, seed=0)
    threshold = ThresholdMap(preset.num_layers, preset.num_heads, blocks.num_blocks, aggregation, calibrator.device)

    def on_masses(trajectory: ThresholdMap, run: Run, layer: int, masses: torch.Tensor) -> None:
        for sample in masses:  # each batch element is a run of its own
            trajectory.add_run(layer, block_scores(sample, rows, seq_len, blocks.block_size))

    key = calibration_key("WEST", preset.config_hash(), loaded.weights_id, blocks.grid, blocks.block_size,
                          blocks.layout.to_metadata(), prompts.embeddings, prompts.negative, loop.settings(),
                          rows_per_block, aggregation.settings())
    checkpoint = CalibrationCheckpoint(calibrator.progress_path(), key, threshold.state())
    calibrator.measure(blocks, rows, threshold, on_masses, "WEST calibration", checkpoint)
    levels = threshold.result()
    checkpoint.remove()
    calibration = {"method": "WEST", "prompts": int(prompts.embeddings.shape[0]), "embeddings": prompts.source,
                   **loop.settings(), "rows_per_block": rows_per_block, **aggregation.settings()}
    return Topology(levels, preset.name, preset.config_hash(), loaded.weights_id, blocks.grid, blocks.block_size,
                    blocks.layout, calibration)
