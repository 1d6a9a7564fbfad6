"""Is a trained model's attention local, as a real video DiT's is? Per head, the attention mass a static mask keeps.

WEST is calibrated on a few training captions (one seed, the sampler's whole trajectory); then, on held-out
captions and other seeds (never calibrated on), every head's sampled query rows are probed along the dense
trajectory, their softmax mass summed per (query block, key block), and the share of it inside three static masks
at 10/15/20/30/50% of the blocks is reported: WEST's map (learned per head), and two geometric masks the same for
every head, the local window (block pairs ranked by the space-time distance of their centres, as Sliding Tile
Attention's windows) and radial (Radial Attention's energy decay: the spatial window halves each time the frame
distance doubles), the definitions of bench/fidelity.py's rows of those names. Diffuse attention keeps about the
density itself; local attention keeps much more; the geometric masks say how much of it lies near the query, which
is what the published analyses of Wan2.1 and HunyuanVideo measure. The issue's target for an evaluation model: the
median head keeps >= 0.9 at 30% (WEST); a second table gives WEST at 30% step by step along the trajectory (where
the diffuse heads are diffuse: at high noise, or throughout). Writes `locality.json` (every head), `locality.md`
(the tables) and `locality_maps.png` (the threshold maps and 30% masks of six heads, from the least to the most
local at 30%) to --out.

    python bench/locality.py --model wan2.1-eval --device cuda --out out/locality
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from fidelity import block_centres, local_window_scores, radial_scores, static_levels
from PIL import Image, ImageDraw
from probe_rows import heldout_masses, share_kept

from saexport.artifacts import BlockedGrid
from saexport.demo import VIDEO_MODULES, captions
from saexport.layout import parse_layout
from saexport.models.checkpoint import load_model, parse_dtype
from saexport.models.text_encoder import encode_prompts, negative_embeddings
from saexport.models.video_shape import parse_video_shape
from saexport.runtime.schedule import flow_shift_for
from saexport.topology.calibration import CalibrationLoop, Calibrator
from saexport.topology.prompts import CALIBRATION_SEED, CalibrationSet
from saexport.topology.west import compute_topology

DENSITIES = (0.1, 0.15, 0.2, 0.3, 0.5)  # 15%: Sliding Tile Attention's measured window (15.52% of tokens)
TEST_SEED = 11  # held-out captions to test on; calibration uses the captions `saexport topology` draws


def masks_at_density(levels: torch.Tensor, density: float) -> torch.Tensor:
    """Per (layer, head): the level whose mask keeps the fraction closest to `density`; bool [L, H, n, n]."""
    flat = levels.flatten(-2).to(torch.int32)
    count = max(1, round(density * flat.shape[-1]))
    budget = flat.sort(-1).values[..., count - 1]  # [layers, heads]
    return levels.to(torch.int32) <= budget[..., None, None]


def summary(values: torch.Tensor) -> dict[str, float]:
    q = torch.quantile(values.flatten().double(), torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64))
    return dict(zip(("min", "q25", "median", "q75", "max"), (round(float(v), 4) for v in q), strict=True))


def _colour(levels: np.ndarray) -> np.ndarray:
    """uint8 levels -> RGB through viridis' end points and three stops between (low level = kept early)."""
    stops = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64)
    position = levels.astype(np.float64) / 255 * (len(stops) - 1)
    low = np.floor(position).astype(int).clip(0, len(stops) - 2)
    frac = (position - low)[..., None]
    return (stops[low] * (1 - frac) + stops[low + 1] * frac).astype(np.uint8)


def maps_png(levels: torch.Tensor, keep30: torch.Tensor, fractions30: torch.Tensor, path: Path) -> None:
    """Six heads from the least to the most local at 30%: threshold map (top; dark = kept at low density)
    and the 30% mask (bottom; white = kept)."""
    order = fractions30.flatten().argsort()
    picks = [int(order[round(i * (len(order) - 1) / 5)]) for i in range(6)]
    heads = levels.shape[1]
    n, gap, label = levels.shape[-1], 12, 28
    size = max(n, 192)
    sheet = Image.new("RGB", (6 * (size + gap) + gap, 2 * size + 3 * gap + label), "white")
    draw = ImageDraw.Draw(sheet)
    for column, flat in enumerate(picks):
        layer, head = divmod(flat, heads)
        x = gap + column * (size + gap)
        tile = Image.fromarray(_colour(levels[layer, head].numpy())).resize((size, size), Image.NEAREST)
        mask = Image.fromarray((keep30[layer, head].numpy() * 255).astype(np.uint8)).resize((size, size),
                                                                                            Image.NEAREST)
        draw.text((x, gap), f"layer {layer} head {head}: {float(fractions30.flatten()[flat]):.3f} at 30%",
                  fill="black")
        sheet.paste(tile, (x, gap + label))
        sheet.paste(mask.convert("RGB"), (x, 2 * gap + label + size))
    sheet.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="wan2.1-eval", choices=sorted(VIDEO_MODULES))
    parser.add_argument("--weights", type=Path, help="Checkpoint folder (default: the model's shipped weights).")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", help="Precision of the probed dense model.")
    parser.add_argument("--resolution", help="Default: the model's.")
    parser.add_argument("--frames", type=int, help="Default: the model's.")
    parser.add_argument("--steps", type=int, help="Sampler steps (default: the model's).")
    parser.add_argument("--calib-prompts", type=int, default=8)
    parser.add_argument("--test-prompts", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=2, help="Seeds per held-out caption.")
    parser.add_argument("--rows-per-block", type=int, default=8)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    started = time.perf_counter()
    loaded = load_model(args.model, args.weights, dtype=parse_dtype(args.dtype))
    preset, run = loaded.preset, loaded.preset.defaults
    video = parse_video_shape(args.resolution or run.resolution, args.frames or run.frames, preset.codec)
    grid, layout, block_size = video.token_grid(preset.patch_size), parse_layout(run.layout), run.block_size
    blocks = BlockedGrid(grid, block_size, layout)
    steps, shift = args.steps or run.steps, flow_shift_for(video.height)
    calibration = captions(args.model, args.calib_prompts, CALIBRATION_SEED)
    test = captions(args.model, args.test_prompts, TEST_SEED, held_out=True)
    negative = negative_embeddings(loaded.path, preset.text_len, preset.config["text_dim"])

    def encode(captions: list[str]) -> CalibrationSet:
        embeddings = encode_prompts(loaded.path, captions, max_length=preset.text_len)
        return CalibrationSet(embeddings, negative, f"{len(captions)} captions, text encoder of {loaded.path}")

    def calibrator(prompts: CalibrationSet, seeds: list[int]) -> Calibrator:
        return Calibrator(loaded, prompts, CalibrationLoop(tuple(seeds), steps, shift), args.device,
                          progress=lambda runs, **_: runs)

    # The sampler's loop as generation runs it (guidance: both passes measured).
    topology = compute_topology(calibrator(encode(calibration), [0]), blocks, rows_per_block=args.rows_per_block)
    seeds = [1000 + i for i in range(args.seeds)]
    # Summed per block pair over rows WEST never ranked with (probe_rows' held-out seed), every pass, per step.
    by_step = heldout_masses(calibrator(encode(test), seeds), blocks, args.rows_per_block, by_step=True)
    masses = by_step.sum(0)  # [L, H, n, n]
    layers, heads = masses.shape[:2]
    centres = block_centres(grid, layout, block_size)
    families = {"WEST": topology.levels, "local window": static_levels(local_window_scores(centres), layers, heads),
                "radial": static_levels(radial_scores(centres), layers, heads)}
    keep = {name: torch.stack([masks_at_density(levels, d) for d in DENSITIES]) for name, levels in families.items()}
    fractions = {name: torch.stack([share_kept(masses, mask) for mask in masks]) for name, masks in keep.items()}

    # WEST at 30% step by step: where along the trajectory (high noise first) the diffuse heads are diffuse.
    at30 = DENSITIES.index(0.3)
    west30 = keep["WEST"][at30]
    per_step = [summary(share_kept(step_masses, west30)) for step_masses in by_step]
    tables = {name: {f"{d:.0%}": {"blocks_kept": round(float(keep[name][i].float().mean()), 4),
                                  **summary(fractions[name][i]),
                                  "median_per_layer": [round(float(v), 4)
                                                       for v in fractions[name][i].median(-1).values]}
                     for i, d in enumerate(DENSITIES)} for name in families}
    record = {"model": args.model, "weights": loaded.source, "weights_id": loaded.weights_id, "grid": list(grid),
              "block_size": block_size, "blocks_per_row": masses.shape[-1], "layout": run.layout, "steps": steps,
              "flow_shift": shift, "dtype": args.dtype, "calibration_captions": calibration,
              "test_captions": test, "test_seeds": seeds, "rows_per_block": args.rows_per_block,
              "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "seconds": round(time.perf_counter() - started, 1), "mass_kept": tables,
              "per_head": {name: {f"{d:.0%}": fractions[name][i].tolist() for i, d in enumerate(DENSITIES)}
                           for name in families},
              "west_30_per_step": per_step}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "locality.json").write_text(json.dumps(record, indent=1))
    lines = [f"{args.model}: attention mass kept by static masks on {len(test)} held-out captions x {len(seeds)} "
             f"seeds (WEST on {len(calibration)} calibration captions, 1 seed), {steps} steps, grid {tuple(grid)}, "
             f"{masses.shape[-1]} blocks of {block_size} per row, {run.layout}, {args.dtype}; over "
             f"{layers * heads} heads ({layers} layers x {heads} heads)", "",
             "| mask | blocks kept | min | q25 | median | q75 | max | median per layer |",
             "|---|---|---|---|---|---|---|---|"]
    for name, table in tables.items():
        for density_name, row in table.items():
            per_layer = " ".join(f"{v:.3f}" for v in row["median_per_layer"])
            lines.append(f"| {name} | {density_name} ({row['blocks_kept']:.3f}) | {row['min']:.3f} | "
                         f"{row['q25']:.3f} | {row['median']:.3f} | {row['q75']:.3f} | {row['max']:.3f} | "
                         f"{per_layer} |")
    lines += ["", "WEST at 30%, per sampler step (step 0: pure noise):", "",
              "| step | min | q25 | median | q75 | max |", "|---|---|---|---|---|---|"]
    lines += [f"| {i} | {r['min']:.3f} | {r['q25']:.3f} | {r['median']:.3f} | {r['q75']:.3f} | {r['max']:.3f} |"
              for i, r in enumerate(per_step)]
    (args.out / "locality.md").write_text("\n".join(lines) + "\n")
    maps_png(topology.levels, west30, fractions["WEST"][at30], args.out / "locality_maps.png")
    print("\n".join(lines))
    print(f"{record['seconds']} s on {record['device']}")


if __name__ == "__main__":
    main()
