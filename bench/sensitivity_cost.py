"""What a cheaper sensitivity costs FAST v2 (issue 25): rank correlation against the full per-cell measurement and
held-out PSNR at equal density.

FAST v2 weighs each (step, layer) by w = a[bucket] * b[layer group], measured end to end (`topology.sensitivity`):
1 + buckets + layer groups whole generations per calibration prompt, on a sampler loop of `sensitivity_steps`.
The full measurement the product approximates is `cell_errors`: the final latent error with only one (step
bucket, layer) cell sparse, 1 + buckets x layers generations on generation's own loop.

Each variant "STEPS:GROUPS" measures the weights on a loop of STEPS steps with the layers in GROUPS groups and maps
them onto generation's loop (a bucket is a fraction of the trajectory). Reported per variant:
- cost: generations x steps of the measurement, per prompt, and the wall time on this device;
- Spearman's rank correlation of its weights (averaged over each bucket's steps) with the cells' errors;
- the budgets it gives at 20 / 30 / 45% (`fit_budgets_v2` on the output proxy, no warm-up): PSNR of the held-out
  captions' videos (never trained or calibrated on) x 2 seeds against the dense videos, mean and 95% interval
  over captions, and the paired difference against the full product measurement (generation's loop, every
  layer alone: the build's measurement until now), with its 95% interval.
Rows "uniform" (no weights) and "cells" (weights = the cells' errors themselves) bracket them.

Calibration as `saexport build` runs it: WEST and the proxy on the model's calibration captions (4), the
sensitivity on the first one (the build's default), one seed, guidance on both passes, at the generation's
precision (bf16 on a GPU). Everything measured is cached in --work; a rerun continues.

    python bench/sensitivity_cost.py --model wan2.1-eval --device cuda --work /tmp/sens --out /tmp/sens/report
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from saexport.artifacts import BlockedGrid, Topology
from saexport.demo import captions
from saexport.layout import parse_layout
from saexport.models.checkpoint import load_model, resolve_weights
from saexport.models.text_encoder import negative_embeddings, open_text_encoder
from saexport.models.video_shape import parse_video_shape
from saexport.runtime.fidelity import clustered_interval, latent_psnr
from saexport.runtime.schedule import flow_shift_for
from saexport.topology.allocation import fit_budgets_v2
from saexport.topology.calibration import CalibrationLoop, Calibrator
from saexport.topology.goals import Goal, Warmup
from saexport.topology.prompts import CalibrationSet, PromptSource
from saexport.topology.quality import compute_quality
from saexport.topology.sensitivity import STEP_BUCKETS, cell_errors, final_latents_of_tables, sensitivity_errors
from saexport.topology.west import compute_topology

DENSITIES = (0.2, 0.3, 0.45)
BENCH_SEED = 4_000_003  # the held-out captions' draw (as bench/quality_targets.py)
NOISE_SEEDS = (7001, 7002)  # seeds no build stage uses
SENSITIVITY_DENSITY = 0.3


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks 0..n-1 of a flat tensor, ties given their mean rank."""
    order = values.argsort(stable=True)
    ranks = torch.empty_like(values, dtype=torch.float64)
    ranks[order] = torch.arange(len(values), dtype=torch.float64)
    for value in values.unique():
        tied = values == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = average_ranks(a.flatten().double()), average_ranks(b.flatten().double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp(min=1e-30))


def per_cell(weights: torch.Tensor, buckets: list[tuple[int, int]]) -> torch.Tensor:
    """`[steps, layers]` weights averaged over each bucket's steps: `[buckets, layers]`."""
    return torch.stack([weights[start:end].mean(0) for start, end in buckets])


def cached(path: Path, make):
    """`make()`'s tensors, saved to `path` once (a dict of tensors and numbers)."""
    if path.is_file():
        return torch.load(path)
    value = make()
    torch.save(value, path)
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="wan2.1-eval")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variants", default="20:5,10:5,5:5,20:3,10:3,10:2",
                        help="STEPS:GROUPS of each cheaper measurement (the first is the reference product)")
    parser.add_argument("--steps", type=int, help="generation's loop (default: the model's)")
    parser.add_argument("--prompts", type=int, default=4, help="calibration captions (WEST, proxy)")
    parser.add_argument("--sensitivity-prompts", type=int, default=1)
    parser.add_argument("--captions", type=int, default=8, help="held-out captions (x 2 seeds)")
    parser.add_argument("--batch", type=int, default=32, help="samples a forward pass")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    gpu = args.device.startswith("cuda")
    card = torch.cuda.get_device_name() if gpu else "CPU"

    # 1. The model and calibration as the build runs them.
    loaded = load_model(args.model, dtype=torch.bfloat16 if gpu else torch.float32)
    loaded.transformer.to(args.device)
    preset, run = loaded.preset, loaded.preset.defaults
    if args.steps:
        run = replace(run, steps=args.steps)
    video = parse_video_shape(run.resolution, run.frames, preset.codec)
    loop = CalibrationLoop((0,), run.steps, flow_shift_for(video.height))
    prompts = PromptSource(preset, args.prompts, None, loaded.path).load()
    calibrator = Calibrator(loaded, prompts, loop, args.device, args.batch, progress=lambda it, **_: it)
    topology_path = args.work / "west.safetensors"
    if not topology_path.is_file():
        blocks = BlockedGrid(video.token_grid(preset.patch_size), run.block_size, parse_layout(run.layout))
        compute_topology(calibrator, blocks).save(topology_path)
    topology = Topology.load(topology_path)
    quality = cached(args.work / "quality.pt",
                     lambda: compute_quality(calibrator, topology, ("output",), 16)["output"])
    sensing = calibrator.first_prompts(args.sensitivity_prompts)
    layers = topology.levels.shape[0]

    # 2. The full per-cell measurement, and each variant's weights.
    def measure_cells():
        start = time.perf_counter()
        cells = cell_errors(sensing, topology, SENSITIVITY_DENSITY)
        return {"cells": cells, "seconds": time.perf_counter() - start}

    cells = cached(args.work / "cells.pt", measure_cells)
    buckets = [(round(k * run.steps / STEP_BUCKETS), round((k + 1) * run.steps / STEP_BUCKETS))
               for k in range(STEP_BUCKETS)]
    rows = {"uniform": {"weights": None, "cost": 0, "seconds": 0.0},
            "cells": {"weights": cells["cells"].repeat_interleave(
                torch.tensor([end - start for start, end in buckets]), dim=0),
                "cost": (1 + STEP_BUCKETS * layers) * run.steps, "seconds": cells["seconds"]}}
    for variant in args.variants.split(","):
        steps, groups = (int(part) for part in variant.split(":"))

        def measure(steps=steps, groups=groups):
            start = time.perf_counter()
            errors = sensitivity_errors(sensing.with_steps(steps), topology, SENSITIVITY_DENSITY, STEP_BUCKETS,
                                        groups)
            return {"weights": errors.weights(run.steps), "seconds": time.perf_counter() - start,
                    "cost": (1 + len(errors.buckets) + len(errors.groups)) * errors.steps}

        rows[variant] = cached(args.work / f"weights_{steps}_{groups}.pt", measure)
    for row in rows.values():
        row["spearman"] = None if row["weights"] is None else spearman(per_cell(row["weights"], buckets),
                                                                       cells["cells"])
    reference = args.variants.split(",")[0]

    # 3. The held-out videos of every row's budgets at every density, with the dense ones, in one batched loop.
    def generate():
        weights = resolve_weights(preset, None)
        texts = captions(args.model, args.captions, seed=BENCH_SEED, held_out=True)
        held_out = CalibrationSet(open_text_encoder(weights, preset.text_len)(texts),
                                  negative_embeddings(weights, preset.text_len, preset.config["text_dim"]),
                                  f"{args.captions} held-out captions")
        checker = Calibrator(loaded, held_out, CalibrationLoop(NOISE_SEEDS, run.steps, loop.flow_shift), args.device,
                             args.batch, progress=lambda it, **_: it)
        tables = [None] + [fit_budgets_v2(topology, quality, Goal.of_density(d), "output", row["weights"],
                                          Warmup(0)).levels for row in rows.values() for d in DENSITIES]
        latents = final_latents_of_tables(checker, topology, tables)
        return {"psnr": torch.stack([latent_psnr(x, latents[0]) for x in latents[1:]])}

    psnr = cached(args.work / f"psnr_{'_'.join(rows)}.pt".replace(":", "-"), generate)["psnr"]
    clusters = [c for c in range(args.captions) for _ in NOISE_SEEDS]
    psnr = psnr.view(len(rows), len(DENSITIES), -1).double()
    names = list(rows)
    result = {"card": card, "model": args.model, "layers": layers, "steps": run.steps, "captions": args.captions,
              "cells_seconds": round(cells["seconds"], 1), "rows": {}}
    print(f"{card}, {args.model} ({layers} layers, {run.steps} steps), sensitivity at {SENSITIVITY_DENSITY:.0%} on "
          f"{args.sensitivity_prompts} calibration prompt(s); PSNR on {args.captions} held-out captions x 2 seeds")
    print("| weights | cost (gen x steps) | s | Spearman vs cells | "
          + " | ".join(f"PSNR {d:.0%}" for d in DENSITIES) + " | " + " | ".join(f"vs {reference} {d:.0%}"
                                                                              for d in DENSITIES) + " |")
    print("| --- " * (4 + 2 * len(DENSITIES)) + "|")
    for index, name in enumerate(names):
        row = rows[name]
        values = [clustered_interval(psnr[index, d], clusters) for d in range(len(DENSITIES))]
        deltas = [clustered_interval(psnr[index, d] - psnr[names.index(reference), d], clusters)
                  for d in range(len(DENSITIES))]
        result["rows"][name] = {"cost": row["cost"], "seconds": round(row["seconds"], 1), "spearman": row["spearman"],
                                "psnr": [v.to_json(3) for v in values], "delta": [v.to_json(3) for v in deltas]}
        rho = "" if row["spearman"] is None else f"{row['spearman']:.3f}"
        print(f"| {name} | {row['cost']} | {row['seconds']:.1f} | {rho} | "
              + " | ".join(f"{v.mean:.2f} ± {v.half:.2f}" for v in values) + " | "
              + " | ".join(f"{v.mean:+.2f} ± {v.half:.2f}" for v in deltas) + " |")
    (args.out / "sensitivity_cost.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
