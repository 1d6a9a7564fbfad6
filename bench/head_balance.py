"""Heads balanced across ranks (issue 23): max / mean rank attention work per (step, layer), the split by head index
against the offline assignment of `saexport.runtime.parallel.balance`, on real budgets and on the Wan2.1 presets'
stand-ins.

A head's work at a step is its kept block pairs; a rank's is its heads' sum. Prints one markdown row per source and
rank count: worst and mean max/mean over every (step, layer), before (heads split by index) and after (balanced),
how much longer attention takes than under a perfect balance (before and after), the entries at or under the
issue's 1.05 after balancing, and the entries whose assignment is proven optimal.
CPU only (no model runs).

Sources: a build folder (`--artifacts`); FAST v2's budgets at density goals from the fidelity bench's calibration
(`--fast-v2 WORK`: `bench/fidelity.py --work`'s WEST map, output proxy and sensitivity weights, allocated here as
the bench allocates them); a preset's stand-in (`--standin`: a jittered density per head); and a preset's heads with
FAST v2's per-head densities resampled (`--resample`, with `--fast-v2`: at each step, every layer draws its heads'
densities from one layer of the evaluation model at the same point of the schedule, so the spread is a real FAST
allocation's, not a jitter's).

    python bench/head_balance.py --artifacts out/wan2.1-eval --standin wan2.1 --standin wan2.1-14b
    python bench/head_balance.py --fast-v2 WORK --goals 0.2,0.3,0.45 --resample wan2.1 --resample wan2.1-14b

`--exact-check N` also solves each row's N worst entries over 1.05 as an integer program (scipy's HiGHS, proven
optimal; `pip install 'saexport[bench]'`) and prints the largest gap between the assignment and that optimum: the
check of the rows whose search is a heuristic (40 heads), not proven. HiGHS gets a minute an entry, so on a busy
machine an entry may stay unsolved.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from fidelity import fast_v2_budgets  # bench/fidelity.py: scripts run as python bench/<name>.py
from safetensors.torch import load_file

from saexport.artifacts import ArtifactFolder, BlockedGrid, Budgets, ModelIdentity, Topology
from saexport.layout import parse_layout
from saexport.levels import density
from saexport.models.presets import ModelPreset, get_preset
from saexport.models.video_shape import parse_video_shape
from saexport.runtime.parallel.balance import (
    attention_overhead,
    balanced_head_order,
    contiguous_head_order,
    head_work,
    imbalance,
)
from saexport.topology.standin import standin_budgets, standin_topology

TARGET = 1.05  # the max / mean at every (step, layer)
RESAMPLE_SEED = 0


def preset_blocks(preset_name: str) -> tuple[ModelPreset, BlockedGrid]:
    """The preset and the blocks of its default video."""
    preset = get_preset(preset_name)
    run = preset.defaults
    grid = parse_video_shape(run.resolution, run.frames, preset.codec).token_grid(preset.patch_size)
    return preset, BlockedGrid(grid, run.block_size, parse_layout(run.layout))


def standin_work(preset_name: str, target: float) -> tuple[str, torch.Tensor]:
    """The per-head work of the preset's stand-in artifacts at its default video, blocks and steps."""
    preset, blocks = preset_blocks(preset_name)
    run = preset.defaults
    identity = ModelIdentity(preset.name, preset.config_hash(), "stand-in")
    topology = standin_topology(identity, preset.num_layers, preset.num_heads, blocks)
    budgets = standin_budgets(topology, run.steps, target)
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


def fast_v2_allocation(work_folder: Path, goal: float) -> tuple[Topology, torch.Tensor]:
    """FAST v2's budgets `[steps, layers, heads]` at a density goal, from the fidelity bench's calibration in
    `work_folder` (no warm-up: the bench's "cold" rows), with the WEST map they index."""
    topology = Topology.load(work_folder / "west.safetensors")
    quality = load_file(str(work_folder / "calibration_fast_v2_quality.safetensors"))["quality"].double()
    weights = load_file(str(work_folder / "calibration_fast_v2_sensitivity.safetensors"))["weights"].double()
    return topology, fast_v2_budgets(topology, quality, weights, goal, warm=0)


def fast_v2_work(work_folder: Path, goal: float) -> tuple[str, torch.Tensor]:
    topology, budgets = fast_v2_allocation(work_folder, goal)
    label = (f"{topology.model} FAST v2 at {goal:.2f} (fidelity bench's calibration, weights "
             f"{topology.weights_id[:8]}; {topology.blocks.num_blocks} blocks, {budgets.shape[0]} steps)")
    return label, head_work(topology.levels, budgets)


def resampled_work(preset_name: str, work_folder: Path, goal: float) -> tuple[str, torch.Tensor]:
    """The preset's heads at its default video and steps, each (step, layer) drawing its heads' densities (with
    replacement) from one random layer of FAST v2's allocation at the same fraction of the schedule."""
    preset, blocks = preset_blocks(preset_name)
    topology, budgets = fast_v2_allocation(work_folder, goal)
    densities = density(topology.levels, budgets)  # [source steps, source layers, source heads]
    source_steps, source_layers, source_heads = densities.shape
    steps, layers, heads = preset.defaults.steps, preset.num_layers, preset.num_heads
    gen = torch.Generator().manual_seed(RESAMPLE_SEED)
    step = (torch.arange(steps) * source_steps // steps).view(steps, 1, 1).expand(steps, layers, heads)
    layer = torch.randint(source_layers, (steps, layers, 1), generator=gen).expand(steps, layers, heads)
    head = torch.randint(source_heads, (steps, layers, heads), generator=gen)
    pairs = blocks.num_blocks**2
    work = (densities[step, layer, head] * pairs).round().to(torch.int64)
    label = (f"{preset.name}, heads resampled from {topology.model} FAST v2 at {goal:.2f} ({blocks.num_blocks} "
             f"blocks, {steps} steps, density {float(work.sum()) / (work.numel() * pairs):.2f})")
    return label, work


@contextmanager
def quiet_stdout() -> Iterator[None]:
    """File descriptor 1 to /dev/null for the block (what C code prints there too)."""
    sys.stdout.flush()
    saved = os.dup(1)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 1)
    try:
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def optimum(work: list[int], ranks: int) -> float | None:
    """The least max / mean rank work over every split of the heads into equal counts, as an integer program: x[h, r]
    (head h on rank r) and the most loaded rank's work T, minimised. None when HiGHS does not prove it in a minute."""
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp  # only --exact-check needs scipy

    heads = len(work)
    variables = heads * ranks + 1
    assign, count, load = np.zeros((heads, variables)), np.zeros((ranks, variables)), np.zeros((ranks, variables))
    for head in range(heads):
        assign[head, head * ranks:(head + 1) * ranks] = 1  # every head on one rank
    for rank in range(ranks):
        count[rank, rank:heads * ranks:ranks] = 1  # H / R heads a rank
        load[rank, rank:heads * ranks:ranks] = work  # its work at most T
        load[rank, -1] = -1
    cost = np.zeros(variables)
    cost[-1] = 1
    with quiet_stdout():  # HiGHS may print from C to the table's stream
        solved = milp(cost, integrality=np.r_[np.ones(variables - 1), 0],
                      options={"time_limit": 60, "mip_rel_gap": 0},  # proven optimal, not within HiGHS's 1e-4
                      bounds=Bounds(0, np.r_[np.ones(variables - 1), np.inf]),
                      constraints=[LinearConstraint(assign, 1, 1), LinearConstraint(load, -np.inf, 0),
                                   LinearConstraint(count, heads // ranks, heads // ranks)])
    return solved.fun * ranks / sum(work) if solved.status == 0 else None


def exact_check(work: torch.Tensor, after: torch.Tensor, ranks: int, entries: int) -> str:
    """The `entries` worst (step, layer) entries over TARGET against their optimum: the largest gap."""
    worst = [divmod(int(i), after.shape[1]) for i in after.flatten().argsort(descending=True)[:entries]]
    worst = [(s, layer) for s, layer in worst if after[s, layer] > TARGET]
    if not worst:
        return "none over 1.05"
    optima = [optimum(work[s, layer].tolist(), ranks) for s, layer in worst]
    gaps = [float(after[s, layer]) - best for (s, layer), best in zip(worst, optima, strict=True) if best is not None]
    unsolved = f" ({len(worst) - len(gaps)} not solved in a minute)" if len(gaps) < len(worst) else ""
    largest = f"largest gap to the optimum {max(gaps):.4f}" if gaps else "none solved"
    return f"{len(worst)} worst: {largest}{unsolved}"


def rows(label: str, work: torch.Tensor, ranks: list[int], exact_entries: int = 0) -> list[str]:
    steps, layers, heads = work.shape
    out = []
    for count in ranks:
        if heads % count or count > heads:
            out.append(f"| {label} | {heads} | {count} | — | — | — | — | — | — | not divisible: {heads} heads |"
                       + (" — |" if exact_entries else ""))
            continue
        started = time.perf_counter()
        balanced = balanced_head_order(work, count)
        seconds = time.perf_counter() - started
        naive = contiguous_head_order(work, count).order
        before, after = imbalance(work, naive, count), imbalance(work, balanced.order, count)
        met = int((after <= TARGET).sum())
        longer = (f"+{attention_overhead(work, naive, count):.1%} → "
                  f"+{attention_overhead(work, balanced.order, count):.1%}")
        checked = f" {exact_check(work, after, count, exact_entries)} |" if exact_entries else ""
        out.append(f"| {label} | {heads} | {count} | {before.max():.3f} | {before.mean():.3f} | {after.max():.3f} | "
                   f"{after.mean():.3f} | {longer} | {met} / {steps * layers} | {balanced.proven} / {steps * layers} "
                   f"proven, {seconds:.1f} s |{checked}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, action="append", default=[], help="a build folder (repeatable)")
    parser.add_argument("--standin", action="append", default=[], help="a preset's stand-in (repeatable)")
    parser.add_argument("--density", type=float, default=0.3, help="the stand-ins' mean density")
    parser.add_argument("--fast-v2", type=Path, help="the fidelity bench's --work folder (its FAST v2 calibration)")
    parser.add_argument("--goals", default="0.2,0.3,0.45", help="with --fast-v2: its density goals")
    parser.add_argument("--resample", action="append", default=[],
                        help="a preset whose heads draw --fast-v2's densities at --resample-goal (repeatable)")
    parser.add_argument("--resample-goal", type=float, default=0.3, help="the FAST v2 goal --resample draws from")
    parser.add_argument("--ranks", default="2,4,8")
    parser.add_argument("--exact-check", type=int, default=0, metavar="N",
                        help="solve each row's N worst entries exactly (scipy) and print the gap")
    args = parser.parse_args()
    if args.resample and not args.fast_v2:
        parser.error("--resample draws from --fast-v2's budgets: give --fast-v2")
    ranks = [int(r) for r in args.ranks.split(",")]
    sources = [artifact_work(folder) for folder in args.artifacts]
    if args.fast_v2:
        sources += [fast_v2_work(args.fast_v2, float(goal)) for goal in args.goals.split(",")]
    sources += [standin_work(name, args.density) for name in args.standin]
    sources += [resampled_work(name, args.fast_v2, args.resample_goal) for name in args.resample]
    print("| artifacts | heads | ranks | by index: worst | by index: mean | balanced: worst | balanced: mean | "
          f"attention time: by index → balanced | balanced ≤ {TARGET} | search |"
          + (" exact check |" if args.exact_check else ""))
    print("| --- " * (11 if args.exact_check else 10) + "|")
    for label, work in sources:
        print("\n".join(rows(label, work, ranks, args.exact_check)), flush=True)


if __name__ == "__main__":
    main()
