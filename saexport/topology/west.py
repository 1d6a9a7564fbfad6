"""WEST: the threshold map of every layer and head (DESIGN.md, "The method in one page").

For each calibration run i (one pass of one step of one prompt x seed trajectory), block scores S_i(u, v) are
the mean attention probability inside the block pair. A pair's level in run i is the smallest level P at which
it enters Top(S_i, P/255), the ceil(P n^2 / 255) best pairs: floor(255 (rank_i - 1) / n^2) + 1
(`levels.levels_from_scores`). The map keeps the minimum over runs: a pair is kept at density p if any run
needed it there. The diagonal is structural and always kept (level 0).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from saexport.artifacts import Topology
from saexport.layout import TokenLayout
from saexport.levels import levels_from_scores
from saexport.models.checkpoint import LoadedModel
from saexport.topology.calibration import (
    CalibrationCheckpoint,
    CalibrationLoop,
    SampledRows,
    calibration_key,
    calibration_runs,
)
from saexport.topology.prompts import CalibrationSet


def block_scores(masses: torch.Tensor, rows: SampledRows, seq_len: int, block_size: int) -> torch.Tensor:
    """Block masses `[heads, R, n]` of one run -> mean probability per block pair `[heads, n, n]`."""
    heads, _, n = masses.shape
    sums = torch.zeros(heads, n, n, dtype=torch.float64)
    sums.index_add_(1, rows.block, masses.double().cpu())
    counts = torch.bincount(rows.block, minlength=n).clamp(min=1).double()
    key_lengths = torch.full((n,), float(block_size), dtype=torch.float64)
    key_lengths[-1] = seq_len - (n - 1) * block_size
    return sums / counts.view(1, n, 1) / key_lengths.view(1, 1, n)


class ThresholdMap:
    """Running minimum over runs of per-run levels, per layer: uint8 `[layers, heads, n, n]`."""

    def __init__(self, layers: int, heads: int, n: int):
        self.levels = torch.full((layers, heads, n, n), 255, dtype=torch.uint8)

    def add_run(self, layer: int, scores: torch.Tensor) -> None:
        self.levels[layer] = torch.minimum(self.levels[layer], levels_from_scores(scores))

    def result(self) -> torch.Tensor:
        levels = self.levels.clone()
        n = levels.shape[-1]
        levels[..., torch.arange(n), torch.arange(n)] = 0
        return levels


def compute_topology(
    loaded: LoadedModel,
    grid: tuple[int, int, int],
    block_size: int,
    layout: TokenLayout,
    prompts: CalibrationSet,
    loop: CalibrationLoop,
    rows_per_block: int = 16,
    device: str | torch.device = "cpu",
    progress: Callable = tqdm,
    checkpoint_path: Path | None = None,
) -> Topology:
    """WEST over the passes of the sampler's loop for every prompt x seed: each (run, layer) is one run of the rule.

    With `checkpoint_path`, an interrupted calibration resumes from its last finished trajectory."""
    preset = loaded.preset
    seq_len = math.prod(grid)
    n = math.ceil(seq_len / block_size)
    rows = SampledRows.draw(seq_len, block_size, rows_per_block, seed=0)
    threshold = ThresholdMap(preset.num_layers, preset.num_heads, n)

    def on_masses(layer: int, masses: torch.Tensor) -> None:
        for sample in masses:  # each batch element is a run of its own
            threshold.add_run(layer, block_scores(sample, rows, seq_len, block_size))

    key = calibration_key("WEST", preset.config_hash(), loaded.weights_id, grid, block_size, layout.to_metadata(),
                          prompts.embeddings, prompts.negative, loop.settings(), rows_per_block)
    checkpoint = CalibrationCheckpoint(checkpoint_path, key, {"levels": threshold.levels})
    for _ in calibration_runs(loaded, grid, layout, block_size, rows, on_masses, prompts, loop, device, progress,
                              "WEST calibration", checkpoint):
        pass  # the probes record during each forward pass
    checkpoint.remove()
    calibration = {"method": "WEST", "prompts": int(prompts.embeddings.shape[0]), "embeddings": prompts.source,
                   **loop.settings(), "rows_per_block": rows_per_block}
    return Topology(threshold.result(), preset.name, preset.config_hash(), loaded.weights_id, tuple(grid),
                    block_size, layout, calibration)
