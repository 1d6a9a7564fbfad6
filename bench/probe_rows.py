"""Probe rows per block: does a WEST map from 4 (or 8) sampled query rows per block equal the 16-row map?

WEST (`saexport topology`) estimates every block pair's score from `--rows-per-block` sampled query rows of each
query block (`topology.calibration.SampledRows`, seed 0: the rows of a smaller count are the first rows of a larger
one). On the H100 a pass probing 4 rows cost 1.39x a dense forward and 16 rows 2.21x with the torch probe, 1.14x
and 1.20x with the fused Triton probe (docs/BENCHMARKS.md). This script calibrates one map per count with
`topology.west.compute_topology`, exactly as `saexport topology` does (the model's fp32 weights, its built-in
calibration captions, the guided loop with both passes measured, the "min" aggregation; only the count changes),
times each, and compares each map with the reference map (`--reference`, the default count 16) and with the
largest count's:

- levels identical: the fraction of off-diagonal (layer, head, query block, key block) levels that are equal;
- IoU: per (layer, head), the intersection over union of the off-diagonal pairs kept at each density (the
  lowest level per head whose mask keeps at least that fraction of the n^2 pairs, `levels.density` and
  `levels.kept_blocks`), mean and min over layers x heads;
- held-out mass kept: on held-out captions (never calibrated on, `demo.objects.is_held_out`) and other seeds,
  the dense trajectories are probed at `--heldout-rows` rows per block (default: every row, so the measure is
  exact) and each map's mask keeps a share of the attention mass, pooled over layers, heads, rows and passes
  (each head weighs the same); "worst head" is the largest per-(layer, head) shortfall against the reference
  map. A last row is the held-out set's own map (its measured mean mass ranked into levels, diagonal kept): a
  static map that saw the test, the ceiling of a static map at that density.

Calibrated maps and the held-out measurement are kept in `--work` and reused when their settings match (a rerun
with another count calibrates only that count; the seconds are those measured when it was computed).

    python bench/probe_rows.py --model wan2.1-eval --resolution 32x32 --rows 4,8,16,32,64 --work out/probe_rows
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import date
from pathlib import Path

import torch

from saexport.artifacts import BlockedGrid, Topology
from saexport.demo import VIDEO_MODULES, video_module
from saexport.layout import parse_layout
from saexport.levels import DENSE_LEVEL, density, kept_blocks, levels_from_scores
from saexport.models.checkpoint import load_model
from saexport.models.text_encoder import encode_prompts, negative_embeddings
from saexport.models.video_shape import parse_video_shape
from saexport.runtime.sampler import PASSES
from saexport.runtime.schedule import flow_shift_for
from saexport.topology.calibration import CalibrationLoop, Calibrator, Run, SampledRows, Sums
from saexport.topology.prompts import CalibrationSet, PromptSource, builtin_prompts
from saexport.topology.west import compute_topology

DENSITIES = (0.2, 0.3, 0.45)
TEST_CAPTION_SEED = 2_000_003  # bench/fidelity.py's held-out captions
HELDOUT_ROWS_SEED = 7  # rows WEST never ranked with (it draws seed 0), where fewer than all rows are probed


def budgets_at(levels: torch.Tensor, fraction: float) -> torch.Tensor:
    """Per (layer, head) of levels `[L, H, n, n]`: the lowest level whose mask keeps >= `fraction` of the pairs."""
    layers, heads = levels.shape[:2]
    every_level = torch.arange(DENSE_LEVEL + 1).view(-1, 1, 1).expand(-1, layers, heads)
    kept = density(levels, every_level)  # [256, L, H]
    return (kept >= fraction - 1e-12).to(torch.uint8).argmax(0)  # level 255 keeps everything: always found


def masks_at(levels: torch.Tensor, fraction: float) -> torch.Tensor:
    """Bool `[L, H, n, n]`: every head's mask at its budget for `fraction` (`levels.kept_blocks` per layer)."""
    budgets = budgets_at(levels, fraction)
    return torch.stack([kept_blocks(levels[layer], budgets[layer]) for layer in range(levels.shape[0])])


def off_diagonal(n: int) -> torch.Tensor:
    return ~torch.eye(n, dtype=torch.bool)


def iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per (layer, head) IoU of two masks `[L, H, n, n]`, diagonal excluded (every mask keeps it)."""
    off = off_diagonal(a.shape[-1])
    inter = (a & b & off).flatten(-2).sum(-1).double()
    union = ((a | b) & off).flatten(-2).sum(-1).double()
    return inter / union.clamp(min=1)


def compare(levels: torch.Tensor, reference: torch.Tensor) -> dict:
    off = off_diagonal(levels.shape[-1])
    a, b = levels.to(torch.int32)[..., off], reference.to(torch.int32)[..., off]
    out = {"levels_identical": float((a == b).double().mean()),
           "mean_abs_level_diff": float((a - b).abs().double().mean())}
    for d in DENSITIES:
        per_head = iou(masks_at(levels, d), masks_at(reference, d))
        out[f"iou_{d}"] = {"mean": float(per_head.mean()), "min": float(per_head.min())}
    return out


def heldout_set(model: str, loaded, count: int, calibration: list[str]) -> CalibrationSet:
    """`count` distinct held-out captions of the model's test scenes, encoded; none is a calibration caption."""
    module, preset = video_module(model), loaded.preset
    chosen: list[str] = []
    for scene in module.scenes(8 * count, TEST_CAPTION_SEED, held_out=True):
        if scene.caption() not in chosen and len(chosen) < count:
            chosen.append(scene.caption())
    assert all(module.is_held_out(c) for c in chosen), "a test caption is not held out"
    assert not set(chosen) & set(calibration), "calibration saw a test caption"
    embeddings = encode_prompts(loaded.path, chosen, max_length=preset.text_len)
    negative = negative_embeddings(loaded.path, preset.text_len, preset.config["text_dim"])
    return CalibrationSet(embeddings, negative, "; ".join(chosen))


def heldout_masses(calibrator: Calibrator, blocks: BlockedGrid, rows_per_block: int,
                   by_step: bool = False) -> torch.Tensor:
    """Attention mass of the probed rows summed per (query block, key block): float64 `[L, H, n, n]`, over every
    measured pass (with `by_step`, `[steps, L, H, n, n]`, per sampler step). A mask's share of the mass is then
    `(masses * mask).sum() / masses.sum()`."""
    preset, device, n = calibrator.loaded.preset, calibrator.device, blocks.num_blocks
    rows = SampledRows.draw(blocks.seq_len, blocks.block_size, rows_per_block, seed=HELDOUT_ROWS_SEED)
    block = rows.block.to(device)
    steps = calibrator.loop.steps if by_step else 1
    sums = Sums(total=torch.zeros(steps, preset.num_layers, preset.num_heads, n, n, dtype=torch.float64,
                                  device=device))

    def on_masses(into: Sums, run: Run, layer: int, masses: torch.Tensor) -> None:  # [batch, heads, R, n]
        into["total"][run.step if by_step else 0, layer].index_add_(1, block, masses.double().sum(0))

    calibrator.measure(blocks, rows, sums, on_masses, "")  # the probes record during each forward pass
    return sums["total"].cpu() if by_step else sums["total"][0].cpu()


def share_kept(masses: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per (layer, head) share of the held-out mass inside `mask`: `[L, H]`."""
    return (masses * mask).flatten(-2).sum(-1) / masses.flatten(-2).sum(-1)


def fmt_iou(entry: dict) -> str:
    return f"{entry['mean']:.3f} ({entry['min']:.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="wan2.1-eval", choices=sorted(VIDEO_MODULES))
    parser.add_argument("--resolution", help="Default: the model's.")
    parser.add_argument("--frames", type=int, help="Default: the model's.")
    parser.add_argument("--steps", type=int, help="Sampler steps (default: the model's).")
    parser.add_argument("--rows", default="4,8,16,32", help="Rows per block to calibrate with, comma-separated.")
    parser.add_argument("--reference", type=int, default=16, help="The map the others are compared with.")
    parser.add_argument("--prompts", type=int, default=4, help="Calibration captions (saexport topology's default).")
    parser.add_argument("--seeds", default="0", help="Calibration seeds (saexport topology's default: 0).")
    parser.add_argument("--heldout-captions", type=int, default=2)
    parser.add_argument("--heldout-seeds", default="100,101")
    parser.add_argument("--heldout-rows", type=int, default=0, help="Rows per block probed on the held-out runs "
                                                                     "(0: every row).")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--work", type=Path, required=True, help="Cache of maps and held-out masses; results.json.")
    args = parser.parse_args()

    counts = sorted({int(r) for r in args.rows.split(",")})
    if args.reference not in counts:
        raise SystemExit(f"--reference {args.reference} must be one of --rows {counts}")
    args.work.mkdir(parents=True, exist_ok=True)
    loaded = load_model(args.model, dtype=torch.float32)
    preset, run = loaded.preset, loaded.preset.defaults
    video = parse_video_shape(args.resolution or run.resolution, args.frames or run.frames, preset.codec)
    grid, layout, block_size = video.token_grid(preset.patch_size), parse_layout(run.layout), run.block_size
    blocks = BlockedGrid(grid, block_size, layout)
    steps, shift = args.steps or run.steps, flow_shift_for(video.height)
    seeds = tuple(int(s) for s in args.seeds.split(","))
    heldout_seeds = tuple(int(s) for s in args.heldout_seeds.split(","))
    assert not set(seeds) & set(heldout_seeds), "held-out seeds must differ from the calibration seeds"
    n = blocks.num_blocks
    heldout_rows = args.heldout_rows or block_size
    source = PromptSource(preset, args.prompts, None, loaded.path)
    prompts = source.load()
    calibration_captions = builtin_prompts(preset, loaded.path, args.prompts)
    passes = len(seeds) * args.prompts * steps * len(PASSES)
    settings = {"model": args.model, "weights_id": loaded.weights_id, "grid": list(grid), "block_size": block_size,
                "layout": run.layout, "steps": steps, "prompts": prompts.source, "seeds": list(seeds)}

    maps: dict[int, Topology] = {}
    timing: dict[int, dict] = {}
    for count in counts:
        path, meta = args.work / f"west_rows{count}.safetensors", args.work / f"west_rows{count}.json"
        key = {**settings, "rows_per_block": count}
        if path.is_file() and meta.is_file() and json.loads(meta.read_text())["key"] == key:
            maps[count], timing[count] = Topology.load(path), json.loads(meta.read_text())["timing"]
            print(f"rows {count}: reused {path}", flush=True)
            continue
        wall, cpu = time.perf_counter(), time.process_time()
        calibrator = Calibrator(loaded, prompts, CalibrationLoop(seeds, steps, shift), args.device)
        maps[count] = compute_topology(calibrator, blocks, rows_per_block=count)
        timing[count] = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
                         "load_avg": os.getloadavg()[0]}
        maps[count].save(path)
        meta.write_text(json.dumps({"key": key, "timing": timing[count]}))
        print(f"rows {count}: {timing[count]['wall_s']:.0f} s", flush=True)

    key = {**settings, "heldout_captions": args.heldout_captions, "heldout_seeds": list(heldout_seeds),
           "heldout_rows": heldout_rows}
    path, meta = args.work / "heldout_masses.pt", args.work / "heldout_masses.json"
    if path.is_file() and meta.is_file() and json.loads(meta.read_text())["key"] == key:
        masses, heldout = torch.load(path), json.loads(meta.read_text())
        print(f"held-out masses: reused {path}", flush=True)
    else:
        test = heldout_set(args.model, loaded, args.heldout_captions, calibration_captions)
        wall = time.perf_counter()
        calibrator = Calibrator(loaded, test, CalibrationLoop(heldout_seeds, steps, shift), args.device,
                                progress=lambda runs, **_: runs)
        masses = heldout_masses(calibrator, blocks, heldout_rows)
        heldout = {"key": key, "captions": test.source, "wall_s": time.perf_counter() - wall}
        torch.save(masses, path)
        meta.write_text(json.dumps(heldout))

    largest = counts[-1]
    own = levels_from_scores(masses)  # the held-out set's own map (equal key blocks: mass ranks as score does)
    own[..., torch.arange(n), torch.arange(n)] = 0
    rows: dict[str, dict] = {}
    for count in counts:
        levels = maps[count].levels
        rows[str(count)] = {"timing": timing[count],
                            "vs_reference": compare(levels, maps[args.reference].levels),
                            "vs_largest": compare(levels, maps[largest].levels)}
    mass: dict[str, dict] = {}
    for name, levels in [*((str(c), maps[c].levels) for c in counts), ("held-out own map", own)]:
        mass[name] = {}
        for d in DENSITIES:
            kept = share_kept(masses, masks_at(levels, d))
            reference = share_kept(masses, masks_at(maps[args.reference].levels, d))
            mass[name][str(d)] = {"pooled": float(kept.mean()),
                                  "worst_head_vs_reference": float((kept - reference).min()),
                                  "best_head_vs_reference": float((kept - reference).max()),
                                  "heads_below_reference": float((kept < reference).double().mean()),
                                  "blocks_kept": float(masks_at(levels, d).double().mean())}

    record = {"settings": settings, "n": n, "calibration_captions": calibration_captions,
              "calibration_passes": passes, "reference": args.reference, "largest": largest,
              "heldout": heldout, "densities": DENSITIES, "maps": rows, "mass_kept": mass,
              "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads",
              "date": date.today().isoformat()}
    (args.work / "results.json").write_text(json.dumps(record, indent=1))

    dens = " | ".join(f"IoU {d:.0%} mean (min)" for d in DENSITIES)
    print(f"\n{args.model} ({loaded.weights_id[:12]}), grid {tuple(grid)}, {n} blocks of {block_size} per row, "
          f"{run.layout}; WEST as `saexport topology` runs it: {args.prompts} built-in captions x seeds "
          f"{list(seeds)}, {steps} steps, guidance 5, both passes ({passes} probed passes), fp32, aggregation min; "
          f"{record['machine']} on {args.device}, {record['date']}")
    print(f"\n| rows per block | calibration wall s | CPU s | load avg | vs map | levels identical | mean abs level "
          f"diff | {dens} |")
    print("| --- | --- | --- | --- | --- | --- | --- |" + " --- |" * len(DENSITIES))
    for count in counts:
        t, row = timing[count], rows[str(count)]
        for label, other in {args.reference: row["vs_reference"], largest: row["vs_largest"]}.items():
            if count == label:
                continue
            cells = " | ".join(fmt_iou(other[f"iou_{d}"]) for d in DENSITIES)
            print(f"| {count} | {t['wall_s']:.0f} | {t['cpu_s']:.0f} | {t['load_avg']:.1f} | {label} rows | "
                  f"{other['levels_identical']:.3f} | {other['mean_abs_level_diff']:.2f} | {cells} |")
    print(f"\nAttention mass kept on held-out runs ({args.heldout_captions} held-out captions x seeds "
          f"{list(heldout_seeds)}, {steps} steps, both passes; {heldout_rows} of {block_size} rows per block probed; "
          f"{heldout['wall_s']:.0f} s): pooled share, and in brackets the worst head's difference from the "
          f"{args.reference}-row map's mask and the share of heads that keep less than it")
    print("\n| map | " + " | ".join(f"{d:.0%}" for d in DENSITIES) + " |")
    print("| --- |" + " --- |" * len(DENSITIES))
    for name, values in mass.items():
        label = f"{name} rows" if name.isdigit() else name
        cells = " | ".join(f"{v['pooled']:.4f} ({v['worst_head_vs_reference']:+.4f}, "
                           f"{v['heads_below_reference']:.0%})" for v in (values[str(d)] for d in DENSITIES))
        print(f"| {label} | {cells} |")
    kept = ", ".join(f"{d:.0%}: {min(v[str(d)]['blocks_kept'] for v in mass.values()):.3f}-"
                     f"{max(v[str(d)]['blocks_kept'] for v in mass.values()):.3f}" for d in DENSITIES)
    print(f"\nblocks kept by the masks (diagonal included), over the maps: {kept}")


if __name__ == "__main__":
    main()
