"""Resolution transfer between two native grids of the evaluation model (issue 13): recall of the transferred masks.

`wan2.1-eval` was trained at 32x32 and at 64x64 pixels (16 frames): both are native grids. WEST is calibrated at
each (the same calibration captions, seed and guided loop), the small map is transferred to the large grid by each
rule of `saexport.topology.transfer`, and at each density every (layer, head) keeps the fraction of its pairs
closest to it (the level order of its map). Recall = |transferred & native| / |native| over the large grid's
pairs, diagonal excluded (every mask keeps it); a random mask of the same density recalls the density itself.

The large map may come from a file (`--large-topology`, e.g. the fidelity bench's `out/fidelity/west.safetensors`,
calibrated on the GPU on 16 captions): then only the small grid is calibrated here, on `--prompts` of the same
captions, and the report says so.
    python bench/transfer_recall.py --prompts 4 --large-topology out/fidelity/west.safetensors
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from saexport.artifacts import BlockedGrid, Topology
from saexport.layout import parse_layout
from saexport.models.checkpoint import load_model
from saexport.models.video_shape import parse_video_shape
from saexport.runtime.schedule import flow_shift_for
from saexport.topology.calibration import CalibrationLoop, Calibrator
from saexport.topology.prompts import PromptSource
from saexport.topology.transfer import TRANSFER_RULES, transfer_topology
from saexport.topology.west import compute_topology

DENSITIES = (0.1, 0.2, 0.3, 0.5)


def masks_at_density(levels: torch.Tensor, density: float) -> torch.Tensor:
    """Per (layer, head): the pairs up to the level whose mask keeps the fraction closest to `density`."""
    flat = levels.flatten(-2).to(torch.int32)
    count = max(1, round(density * flat.shape[-1]))
    budget = flat.sort(-1).values[..., count - 1]
    return levels.to(torch.int32) <= budget[..., None, None]


def recall(transferred: torch.Tensor, native: torch.Tensor) -> float:
    off = ~torch.eye(native.shape[-1], dtype=torch.bool)
    return float((transferred & native & off).sum() / (native & off).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", default="32x32")
    parser.add_argument("--large", default="64x64")
    parser.add_argument("--prompts", type=int, default=4, help="Calibration captions (the build's default: 4).")
    parser.add_argument("--large-topology", type=Path, help="The large grid's WEST map, computed elsewhere.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, help="Also write the results as JSON here.")
    args = parser.parse_args()

    loaded = load_model("wan2.1-eval", dtype=torch.float32)
    run = loaded.preset.defaults
    layout, block = parse_layout(run.layout), run.block_size
    prompts = PromptSource(loaded.preset, args.prompts, None, loaded.path).load()

    def calibrate(resolution: str) -> Topology:
        video = parse_video_shape(resolution, run.frames, loaded.preset.codec)
        loop = CalibrationLoop((0,), run.steps, flow_shift_for(video.height))
        return compute_topology(Calibrator(loaded, prompts, loop, args.device),
                                BlockedGrid(video.token_grid(loaded.preset.patch_size), block, layout))

    start = time.perf_counter()
    small = calibrate(args.small)
    seconds_small = time.perf_counter() - start
    large = Topology.load(args.large_topology) if args.large_topology else calibrate(args.large)
    rows = {}
    for rule in TRANSFER_RULES:
        transferred = transfer_topology(small, large.grid, rule=rule).levels
        rows[rule] = [recall(masks_at_density(transferred, d), masks_at_density(large.levels, d)) for d in DENSITIES]
    source = (f"{args.large_topology} ({large.calibration.get('prompts')} captions)" if args.large_topology
              else f"calibrated here ({args.prompts} captions)")
    result = {"small_grid": list(small.grid), "large_grid": list(large.grid), "n_small": small.levels.shape[-1],
              "n_large": large.levels.shape[-1], "small_prompts": args.prompts, "large_map": source,
              "densities": DENSITIES, "recall": rows, "seconds_small": round(seconds_small, 1),
              "device": args.device}
    print(f"wan2.1-eval: WEST at {tuple(small.grid)} (n = {small.levels.shape[-1]}, {args.prompts} captions, "
          f"{seconds_small:.0f} s on {args.device}) transferred to {tuple(large.grid)} (n = "
          f"{large.levels.shape[-1]}; native map: {source})")
    print("| rule | " + " | ".join(f"{d:.0%}" for d in DENSITIES) + " |")
    print("| --- |" + " --- |" * len(DENSITIES))
    for rule, values in rows.items():
        print(f"| {rule} | " + " | ".join(f"{v:.3f}" for v in values) + " |")
    print("| random mask (expected) | " + " | ".join(f"{d:.3f}" for d in DENSITIES) + " |")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
