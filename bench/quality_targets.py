"""The builds a user runs, timed, and the quality they promise, checked where nothing was calibrated.

For each `--fidelity` preset (and any `--target-psnr` given), `saexport build --device cuda` runs as a user runs it
(a fresh folder, its own process, wall clock); then the build's budgets generate the model's held-out test
captions (never trained on, never calibrated on) at seeds no stage used, in one batched sampler loop beside the
dense videos, and the PSNR and SSIM against dense are given with 95% intervals over captions. Prints a table, the
GPU named, and writes it as JSON.

    python bench/quality_targets.py --model wan2.1-eval --presets high,medium,low --captions 16 --out DIR
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from saexport.artifacts import ArtifactFolder, Budgets, FidelityReport, Topology
from saexport.demo import captions
from saexport.models.checkpoint import load_model, parse_dtype, resolve_weights
from saexport.models.presets import get_preset
from saexport.models.text_encoder import negative_embeddings, open_text_encoder
from saexport.models.video_shape import video_of_grid
from saexport.runtime.fidelity import clustered_interval, latent_psnr, ssim
from saexport.runtime.schedule import flow_shift_for
from saexport.topology.calibration import CalibrationLoop, Calibrator
from saexport.topology.prompts import CalibrationSet
from saexport.topology.sensitivity import final_latents_of_tables

BENCH_SEED = 4_000_003  # the bench's draw of held-out captions
NOISE_SEEDS = (7001, 7002)  # seeds no build stage uses (calibration 0.., checks 1000.., report 2000..)


def timed_build(model: str, goal: list[str], out: Path) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "saexport", "build", "--model", model, "--device", "cuda", *goal,
                           "--out", str(out)], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        return seconds, done.stderr.strip().splitlines()[-1]
    return seconds, "ok"


def evaluate(model: str, folder: ArtifactFolder, count: int, batch: int, device: str = "cuda") -> dict:
    preset = get_preset(model)
    topology, budgets = Topology.load(folder.topology), Budgets.load(folder.budgets)
    weights = resolve_weights(preset, None)
    loaded = load_model(model, weights, dtype=parse_dtype(preset.defaults.dtype))
    loaded.transformer.to(device)
    encode = open_text_encoder(weights, preset.text_len)
    texts = captions(model, count, seed=BENCH_SEED, held_out=True)
    prompts = CalibrationSet(encode(texts), negative_embeddings(weights, preset.text_len, preset.config["text_dim"]),
                             f"{count} held-out test captions, seed {BENCH_SEED}")
    video = video_of_grid(topology.grid, preset.patch_size, preset.codec)
    loop = CalibrationLoop(NOISE_SEEDS, budgets.steps, flow_shift_for(video.height))
    calibrator = Calibrator(loaded, prompts, loop, device, batch, progress=lambda it, **_: it)
    dense, sparse = final_latents_of_tables(calibrator, topology, [None, budgets.levels])
    clusters = [p for p in range(count) for _ in NOISE_SEEDS]
    pixels = [(x.clamp(-1, 1) + 1) / 2 for x in (sparse, dense)]
    psnr = clustered_interval(latent_psnr(sparse, dense), clusters)
    return {"density": budgets.mean_density, "psnr": psnr.to_json(3), "psnr_low95": round(psnr.mean - psnr.half, 3),
            "ssim": clustered_interval(ssim(*pixels), clusters).to_json(4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="wan2.1-eval")
    parser.add_argument("--presets", default="high,medium,low")
    parser.add_argument("--target-psnr", default="", help="comma-separated dB targets besides the presets")
    parser.add_argument("--captions", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--skip-builds", action="store_true", help="evaluate the folders already in --out")
    args = parser.parse_args()
    goals = [(name, ["--fidelity", name]) for name in args.presets.split(",") if name]
    goals += [(f"psnr {t}", ["--target-psnr", t]) for t in args.target_psnr.split(",") if t]
    print(f"GPU: {torch.cuda.get_device_name()}, model {args.model}", flush=True)
    rows = []
    for name, goal in goals:
        out = args.out / name.replace(" ", "_")
        seconds, status = (0.0, "ok") if args.skip_builds else timed_build(args.model, goal, out)
        row = {"goal": name, "build_s": round(seconds, 1), "status": status}
        if status == "ok":
            folder = ArtifactFolder(out)
            report = FidelityReport.read(folder.fidelity_report)
            row.update(target=report.target, report=report.held_out, speedup=report.speedup,
                       bench=evaluate(args.model, folder, args.captions, args.batch))
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| goal | build s | target dB | density | PSNR dB (95%) | lower 95% | SSIM | met | attention speed-up |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        if row["status"] != "ok":
            print(f"| {row['goal']} | {row['build_s']} | | | {row['status']} | | | | |")
            continue
        b = row["bench"]
        met = "" if row["target"] is None else ("yes" if b["psnr"]["mean"] >= row["target"] else "NO")
        print(f"| {row['goal']} | {row['build_s']} | {row['target'] or ''} | {b['density']:.3f} | "
              f"{b['psnr']['mean']:.2f} ± {b['psnr']['ci95']} | {b['psnr_low95']:.2f} | {b['ssim']['mean']:.3f} | "
              f"{met} | {row['speedup']['attention']}x |")
    (args.out / "quality_targets.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
