"""WEST on a model with structured attention: attention mass kept on held-out prompts, and map stability.

Random weights give near-uniform attention, which has no topology to find. This script makes attention
local on purpose: every self-attention layer's q and k projections get a shared per-head constant bias
(and their weights are damped), so q_i . k_j is dominated by c^T R(j - i) c, a function of the 3D RoPE
offset between the tokens that peaks at zero offset. Content still moves the scores (the damped weights
and the text-conditioned residual stream), so the map is estimated, not given.

Prints: mass recall at 30% density on held-out prompts and seeds (WEST vs a random mask of the same
density), the IoU of 30%-density masks from two disjoint halves of the calibration set, and the recall of
a map transferred from a smaller grid (saexport.topology.transfer) against one computed at the grid.
    python bench/west_recall.py [--model wan2.1-small] [--resolution 192x192] [--strength 4]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from tqdm import tqdm

from saexport.artifacts import BlockedGrid, Topology
from saexport.layout import parse_layout
from saexport.models.checkpoint import load_model
from saexport.models.text_encoder import synthetic_embeddings
from saexport.models.video_shape import parse_video_shape
from saexport.runtime.schedule import flow_shift_for
from saexport.topology.calibration import CalibrationLoop, Calibrator, Run, SampledRows, Sums
from saexport.topology.fast import compute_hellinger_quality, fit_budgets_v1
from saexport.topology.goals import DENSITY_GOALS, Goal
from saexport.topology.prompts import CalibrationSet
from saexport.topology.transfer import transfer_topology
from saexport.topology.west import compute_topology

DENSITY = 0.3
DAMPING = 0.2  # weight of the content-dependent part of q and k


def make_attention_local(transformer, strength: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    heads, dim = transformer.config.num_attention_heads, transformer.config.attention_head_dim
    with torch.no_grad():
        for block in transformer.blocks:
            attn = block.attn1
            bias = torch.randn(heads * dim, generator=gen)
            for proj in (attn.to_q, attn.to_k):
                proj.weight.mul_(DAMPING)
                proj.bias.copy_(bias)
            attn.norm_q.weight.fill_(strength)
            attn.norm_k.weight.fill_(strength)


def masks_at_density(levels: torch.Tensor, density: float) -> torch.Tensor:
    """Per (layer, head): the level whose mask keeps the fraction closest to `density`; bool [L, H, n, n]."""
    flat = levels.flatten(-2).to(torch.int32)
    count = max(1, round(density * flat.shape[-1]))
    budget = flat.sort(-1).values[..., count - 1]  # [layers, heads]
    return levels.to(torch.int32) <= budget[..., None, None]


def calibration_set(embeddings: torch.Tensor, negative: torch.Tensor) -> CalibrationSet:
    return CalibrationSet(embeddings, negative, f"synthetic ({embeddings.shape[0]} prompts)")


def mass_recall(calibrator: Calibrator, blocks: BlockedGrid, keep: torch.Tensor) -> float:
    rows = SampledRows.draw(blocks.seq_len, blocks.block_size, 8, seed=7)
    sums = Sums(kept=torch.zeros((), dtype=torch.float64), total=torch.zeros((), dtype=torch.float64))

    def on_masses(into: Sums, run: Run, layer: int, masses: torch.Tensor) -> None:
        row_keep = keep[layer][:, rows.block].to(masses.device)  # [heads, R, n]
        into["kept"].add_(float((masses * row_keep).sum()))
        into["total"].add_(float(masses.sum()))

    calibrator.measure(blocks, rows, sums, on_masses, "")
    return float(sums["kept"] / sums["total"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="wan2.1-small")
    parser.add_argument("--resolution", default="192x192")
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--strength", type=float, default=4.0)
    parser.add_argument("--transfer-from", default="128x128", help="Smaller resolution to transfer a map from.")
    args = parser.parse_args()

    loaded = load_model(args.model, random_weights=True, seed=0)
    make_attention_local(loaded.transformer, args.strength, seed=0)
    video = parse_video_shape(args.resolution, args.frames)
    grid = video.token_grid(loaded.preset.patch_size)
    layout = parse_layout("tile3d:1x4x4")
    shift = flow_shift_for(video.height)
    blocks = BlockedGrid(grid, args.block_size, layout)
    text = synthetic_embeddings(loaded.preset.text_len, loaded.transformer.config.text_dim, 13, 0)
    calib, held_out = calibration_set(text[:8], text[12:]), calibration_set(text[8:12], text[12:])

    def calibrator(prompts: CalibrationSet, seeds: list[int], shift: float = shift,
                   progress: Callable = tqdm) -> Calibrator:
        return Calibrator(loaded, prompts, CalibrationLoop(tuple(seeds), args.steps, shift), progress=progress)

    def west(prompts: CalibrationSet, seeds: list[int]) -> Topology:
        return compute_topology(calibrator(prompts, seeds), blocks, rows_per_block=8)

    held_out_runs = calibrator(held_out, [5, 6], progress=lambda runs, **_: runs)  # measured without a progress bar

    full = west(calib, [0, 1])
    keep = masks_at_density(full.levels, DENSITY)
    n = keep.shape[-1]
    gen = torch.Generator().manual_seed(3)
    off_diagonal = (float(keep.float().mean()) - 1 / n) / (1 - 1 / n)  # same density once the diagonal is in
    random_keep = (torch.rand(keep.shape, generator=gen) < off_diagonal) | torch.eye(n, dtype=torch.bool)
    west_recall = mass_recall(held_out_runs, blocks, keep)
    random_recall = mass_recall(held_out_runs, blocks, random_keep)
    half_a = west(calibration_set(calib.embeddings[:4], calib.negative), [0])
    half_b = west(calibration_set(calib.embeddings[4:], calib.negative), [1])
    a, b = masks_at_density(half_a.levels, DENSITY), masks_at_density(half_b.levels, DENSITY)
    iou = float(((a & b).flatten(-2).sum(-1) / (a | b).flatten(-2).sum(-1)).mean())
    print(f"model {args.model} (attention made local, strength {args.strength}), grid {grid}, "
          f"block {args.block_size}, n = {n}, {args.steps} steps")
    print(f"kept blocks: WEST {float(keep.float().mean()):.3f}, random {float(random_keep.float().mean()):.3f}")
    print(f"attention mass kept on held-out prompts and seeds: WEST {west_recall:.3f}, random {random_recall:.3f}")
    print(f"IoU of 30% masks from disjoint calibration halves: {iou:.3f}")

    fidelity = compute_hellinger_quality(calibrator(calib, [2]), full, rows_per_block=8)
    for preset, density in DENSITY_GOALS.items():
        budgets = fit_budgets_v1(full, fidelity, Goal(preset, density=density))
        print(f"FAST {preset:6s}: mean density {budgets.mean_density:.3f}, "
              f"mean fidelity {budgets.curve['mean_fidelity']:.3f} (on the calibration prompts)")

    small = parse_video_shape(args.transfer_from, args.frames)
    small_grid = small.token_grid(loaded.preset.patch_size)
    source = compute_topology(calibrator(calib, [0, 1], flow_shift_for(small.height)),
                              BlockedGrid(small_grid, args.block_size, layout), rows_per_block=8)
    transferred = masks_at_density(transfer_topology(source, grid).levels, DENSITY)
    recall = float((transferred & keep).sum() / keep.sum())
    transferred_mass = mass_recall(held_out_runs, blocks, transferred)
    print(f"transfer {small_grid} -> {grid}: recall of the native 30% masks {recall:.3f} "
          f"(a random 30% mask: {float((random_keep & keep).sum() / keep.sum()):.3f}); attention mass kept on "
          f"held-out prompts {transferred_mass:.3f}")


if __name__ == "__main__":
    main()
