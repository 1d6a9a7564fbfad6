"""Heads balanced across ranks (issue 23): max / mean rank attention work per (step, layer), the split by head index
against the offline assignment of `saexport.runtime.parallel.balance`, on real budgets and on the Wan2.1 presets'
stand-ins.

A head's work at a step is its kept block pairs; a rank's is its heads' sum. Prints one markdown row per source and
rank count: worst and mean max/mean over every (step, layer), before (heads split by index) and after (balanced),
the entries at or under the issue's 1.05 after balancing, and the entries whose assignment is proven optimal.
CPU only (no model runs).

    python bench/head_balance.py --artifacts out/wan2.1-eval --standin wan2.1 --standin wan2.1-14b
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from saexport.artifacts import ArtifactFolder, BlockedGrid, Budgets, ModelIdentity, Topology
from saexport.layout import parse_layout
from saexport.models.presets import get_preset
from saexport.models.video_shape import parse_video_shape
from saexport.runtime.parallel.balance import balanced_head_order, contiguous_head_order, head_work, imbalance
from saexport.topology.standin import standin_budgets, standin_topology

TARGET = 1.05  # the max / mean at every (step, layer)


def standin_work(preset_name: str, density: float) -> tuple[str, torch.Tensor]:
    """The per-head work of the preset's stand-in artifacts at its default video, blocks and steps."""
    preset = get_preset(preset_name)
    run = preset.defaults
    grid = parse_video_shape(run.resolution, run.frames, preset.codec).token_grid(preset.patch_size)
    identity = ModelIdentity(preset.name, preset.config_hash(), "stand-in")
    topology = standin_topology(identity, preset.num_layers, preset.num_heads,
                                BlockedGrid(grid, run.block_size, parse_layout(run.layout)))
    budgets = standin_budgets(topology, run.steps, density)
    label = (f"{preset.name} stand-in ({run.resolution} x {run.frames}, {topology.blocks.num_blocks} blocks, "
             f"{run.steps} steps, density {budgets.mean_density:.2f})")
    return label, head_work(topology.levels, budgets.levels)


def artifact_work(folder: Path) -> tuple[str, torch.Tensor]:
    artifacts = ArtifactFolder(folder)
    topology, budgets = Topology.load(artifacts.topology), Budgets.load(artifacts.budgets)
    budgets.check_matches(topology)
    label = (f"{topology.model} build `{folder}` ({budgets.fidelity}, {topology.blocks.num_blocks} blocks, "
             f"{budgets.steps} steps, density {budgets.mean_density:.2f})")
    return label, head_work(topology.levels, budgets.levels)


def rows(label: str, work: torch.Tensor, ranks: list[int]) -> list[str]:
    steps, layers, heads = work.shape
    out = []
    for count in ranks:
        if heads % count or count > heads:
            out.append(f"| {label} | {heads} | {count} | — | — | — | — | — | not divisible: {heads} heads |")
            continue
        started = time.perf_counter()
        balanced = balanced_head_order(work, count)
        seconds = time.perf_counter() - started
        before = imbalance(work, contiguous_head_order(work, count).order, count)
        after = imbalance(work, balanced.order, count)
        met = int((after <= TARGET).sum())
        out.append(f"| {label} | {heads} | {count} | {before.max():.3f} | {before.mean():.3f} | {after.max():.3f} | "
                   f"{after.mean():.3f} | {met} / {steps * layers} | {balanced.proven} / {steps * layers} proven, "
                   f"{seconds:.1f} s |")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, action="append", default=[], help="a build folder (repeatable)")
    parser.add_argument("--standin", action="append", default=[], help="a preset's stand-in (repeatable)")
    parser.add_argument("--density", type=float, default=0.3, help="the stand-ins' mean density")
    parser.add_argument("--ranks", default="2,4,8")
    args = parser.parse_args()
    ranks = [int(r) for r in args.ranks.split(",")]
    sources = [artifact_work(folder) for folder in args.artifacts]
    sources += [standin_work(name, args.density) for name in args.standin]
    print("| artifacts | heads | ranks | by index: worst | by index: mean | balanced: worst | balanced: mean | "
          f"balanced ≤ {TARGET} | search |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for label, work in sources:
        print("\n".join(rows(label, work, ranks)))


if __name__ == "__main__":
    main()
