"""One DiT forward of a full-size Wan2.1 with random weights: dense (cuDNN SDPA) against sparse (our kernel).

Also times WEST calibration passes (a dense forward with every layer probed, the rank update on the GPU)
against the dense forward. Prints a table; GPU named.
With --compile both sides run through torch.compile (inductor fuses the norms, RoPE, modulation and
GELU around the attention, as a TensorRT engine does): the closer proxy of a deployed engine.
    python bench/e2e.py [--model wan2.1] [--resolution 480p] [--frames 81] [--densities 0.5,0.3,0.15] [--compile]
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
from timing import time_ms  # bench/timing.py: scripts run as python bench/<name>.py
from torch.nn.attention import SDPBackend, sdpa_kernel

from saexport import kernels
from saexport.exporter.onnx_export import build_sparse_dit, example_inputs
from saexport.layout import parse_layout
from saexport.models.checkpoint import load_model
from saexport.models.text_encoder import synthetic_embeddings
from saexport.models.video_shape import parse_video_shape
from saexport.runtime.schedule import flow_shift_for
from saexport.topology.calibration import CalibrationLoop
from saexport.topology.prompts import CalibrationSet
from saexport.topology.standin import standin_budgets, standin_topology
from saexport.topology.west import compute_topology


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="wan2.1")
    parser.add_argument("--resolution", default="480p")
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--densities", default="0.5,0.3,0.15")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-calibration", action="store_true", help="Skip timing WEST calibration passes.")
    parser.add_argument("--calib-rows", default="16,4", help="Sampled query rows per block of the timed WEST runs.")
    parser.add_argument("--compile", action="store_true", help="torch.compile the dense and the sparse model.")
    args = parser.parse_args()
    assert kernels.load_library() is not None, "build the kernel library first"
    dtype = torch.bfloat16
    loaded = load_model(args.model, random_weights=True, dtype=dtype, random_device="cuda")
    loaded.transformer.cuda()
    video = parse_video_shape(args.resolution, args.frames)
    grid = video.token_grid(loaded.preset.patch_size)
    args_cpu = example_inputs(loaded, video, dtype)
    inputs = [t.cuda() for t in args_cpu]
    print(f"GPU: {torch.cuda.get_device_name()}  {args.model} {video.describe()} grid {grid} "
          f"(L = {grid[0] * grid[1] * grid[2]}), bf16, median of {args.reps}"
          + (", torch.compile on both sides" if args.compile else ""))
    compiled = torch.compile if args.compile else (lambda module: module)
    rows = []
    with torch.no_grad(), sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        # diffusers' own processors first: building the sparse DiT replaces them in place.
        dense = compiled(loaded.transformer)
        dense_ms = time_ms(partial(dense, *inputs[:3], return_dict=False), args.reps, args.warmup)
        rows.append(("dense (cuDNN SDPA)", 1.0, dense_ms))
        p = loaded.preset
        topology = standin_topology(p.name, p.config_hash(), loaded.weights_id, p.num_layers, p.num_heads, grid,
                                    128, parse_layout("tile3d"))
        for density in [float(d) for d in args.densities.split(",")]:
            budgets = standin_budgets(topology, steps=1, target_density=density)
            sparse = compiled(build_sparse_dit(loaded, topology, budgets, video).cuda())
            ms = time_ms(partial(sparse, *inputs), args.reps, args.warmup)
            rows.append(("sparse, stand-in masks", budgets.mean_density, ms))
    print()
    print(f"{'DiT forward':28s} {'density':>8s} {'ms':>9s} {'speed-up':>9s}")
    for name, density, ms in rows:
        print(f"{name:28s} {density:8.3f} {ms:9.1f} {dense_ms / ms:8.2f}x")
    if not args.no_calibration:
        # WEST along 2 guided steps (4 probed passes) of one prompt, per rows-per-block setting; the rank update
        # runs on the GPU beside the probes.
        text = synthetic_embeddings(p.text_len, loaded.transformer.config.text_dim, 2, 0)
        prompts = CalibrationSet(text[:1], text[1:], "synthetic")
        loop = CalibrationLoop((0,), 2, flow_shift_for(video.height))
        print()
        print(f"{'WEST calibration pass':28s} {'rows/blk':>8s} {'ms':>9s} {'x dense':>9s}")
        for rows_per_block in [int(r) for r in args.calib_rows.split(",")]:
            passes = loop.steps * len(loop.passes)
            for _ in range(2):  # a warm-up run, then the timed one
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                compute_topology(loaded, grid, 128, parse_layout("tile3d"), prompts, loop, rows_per_block, "cuda",
                                 progress=lambda it, **_: it)
                end.record()
                torch.cuda.synchronize()
            ms = start.elapsed_time(end) / passes
            print(f"{'dense forward + probes':28s} {rows_per_block:8d} {ms:9.1f} {ms / dense_ms:8.2f}x")

if __name__ == "__main__":
    main()
