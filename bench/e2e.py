"""One DiT forward of a full-size Wan2.1 with random weights: dense (cuDNN SDPA) against sparse (our kernel).

Also times WEST calibration passes (a dense forward with every layer probed, the rank update on the GPU)
against the dense forward. Prints a table; GPU named.
--modes picks how both sides run: `eager`; `compile` (torch.compile: inductor fuses the norms, RoPE, modulation
and GELU around the attention, as a TensorRT engine does — the closer proxy of a deployed engine); `graphs`
(torch.compile with CUDA graphs, mode "reduce-overhead": the whole step replayed as one graph). One sparse model
serves every density (its budgets are overwritten in place), so each mode compiles it once; the compiled sparse
output is checked against the eager one.
    python bench/e2e.py [--model wan2.1] [--resolution 480p] [--frames 81] [--densities 0.45,0.3,0.2]
                        [--modes eager,compile,graphs]
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch
from timing import time_ms  # bench/timing.py: scripts run as python bench/<name>.py
from torch.nn.attention import SDPBackend, sdpa_kernel

from saexport import kernels
from saexport.artifacts import BlockedGrid
from saexport.exporter.onnx_export import build_sparse_dit, example_inputs
from saexport.layout import parse_layout
from saexport.models.checkpoint import load_model
from saexport.models.text_encoder import synthetic_embeddings
from saexport.models.video_shape import parse_video_shape
from saexport.runtime.generation import model_identity
from saexport.runtime.schedule import flow_shift_for
from saexport.topology.calibration import CalibrationLoop, Calibrator
from saexport.topology.prompts import CalibrationSet
from saexport.topology.standin import standin_budgets, standin_topology
from saexport.topology.west import compute_topology

COMPILE_MODES = {"eager": None, "compile": "default", "graphs": "reduce-overhead"}


def run_mode(module: torch.nn.Module, mode: str):
    return module if COMPILE_MODES[mode] is None else torch.compile(module, mode=COMPILE_MODES[mode])


def set_budgets(sparse: torch.nn.Module, budgets) -> None:
    """Overwrite the sparse model's per-layer budgets in place (buffers: a compiled graph reads them)."""
    for layer, masks in enumerate(sparse.masks):
        masks.budgets.copy_(budgets.levels[:, layer].to(masks.budgets))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="wan2.1")
    parser.add_argument("--resolution", default="480p")
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--densities", default="0.45,0.3,0.2")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-calibration", action="store_true", help="Skip timing WEST calibration passes.")
    parser.add_argument("--calib-rows", default="16,4", help="Sampled query rows per block of the timed WEST runs.")
    parser.add_argument("--modes", default="eager,compile", help=f"Comma-separated, of {', '.join(COMPILE_MODES)}.")
    args = parser.parse_args()
    assert kernels.load_library() is not None, "build the kernel library first"
    modes = args.modes.split(",")
    assert set(modes) <= set(COMPILE_MODES), f"--modes takes {', '.join(COMPILE_MODES)}"
    assert args.no_calibration or "eager" in modes, "calibration passes are eager: compare them with --modes eager"
    dtype = torch.bfloat16
    loaded = load_model(args.model, random_weights=True, dtype=dtype, random_device="cuda")
    loaded.transformer.cuda()
    video = parse_video_shape(args.resolution, args.frames)
    grid = video.token_grid(loaded.preset.patch_size)
    args_cpu = example_inputs(loaded, video, dtype)
    inputs = [t.cuda() for t in args_cpu]
    print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}  {args.model} {video.describe()} "
          f"grid {grid} (L = {grid[0] * grid[1] * grid[2]}), bf16, median of {args.reps}", flush=True)
    dense_ms, rows, started = {}, [], time.perf_counter()
    with torch.no_grad(), sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        # diffusers' own processors first: building the sparse DiT replaces them in place.
        for mode in modes:
            dense = run_mode(loaded.transformer, mode)
            dense_ms[mode] = time_ms(partial(dense, *inputs[:3], return_dict=False), args.reps, args.warmup)
            rows.append((mode, "dense (cuDNN SDPA)", 1.0, dense_ms[mode]))
            print(*rows[-1], f"(at {time.perf_counter() - started:.0f} s: compiling is in the first call)", flush=True)
        p = loaded.preset
        blocks = BlockedGrid(grid, 128, parse_layout("tile3d"))
        topology = standin_topology(model_identity(loaded), p.num_layers, p.num_heads, blocks)
        densities = [float(d) for d in args.densities.split(",")]
        sparse = build_sparse_dit(loaded, topology, standin_budgets(topology, steps=1, target_density=1.0),
                                  video).cuda()
        for mode in modes:
            model = run_mode(sparse, mode)
            for density in densities:
                budgets = standin_budgets(topology, steps=1, target_density=density)
                set_budgets(sparse, budgets)
                ms = time_ms(partial(model, *inputs), args.reps, args.warmup)
                rows.append((mode, "sparse, stand-in masks", budgets.mean_density, ms))
                print(*rows[-1], f"(at {time.perf_counter() - started:.0f} s)", flush=True)
            if mode != "eager":  # the compiled graph read the budgets written last, not stale copies
                got = model(*inputs).clone()
                want = sparse(*inputs)
                err = float((got.float() - want.float()).norm() / want.float().norm())
                print(f"{mode}: relative difference to eager at density {densities[-1]}: {err:.2e}", flush=True)
                assert err < 2e-2, "the compiled sparse model disagrees with the eager one"
    print()
    print(f"{'mode':8s} {'DiT forward':24s} {'density':>8s} {'ms':>9s} {'speed-up':>9s}")
    for mode, name, density, ms in rows:
        print(f"{mode:8s} {name:24s} {density:8.3f} {ms:9.1f} {dense_ms[mode] / ms:8.2f}x")
    if not args.no_calibration:
        # WEST along 2 guided steps (4 probed passes) of one prompt, per rows-per-block setting; the rank update
        # runs on the GPU beside the probes.
        text = synthetic_embeddings(p.text_len, loaded.transformer.config.text_dim, 2, 0)
        prompts = CalibrationSet(text[:1], text[1:], "synthetic")
        loop = CalibrationLoop((0,), 2, flow_shift_for(video.height))
        calibrator = Calibrator(loaded, prompts, loop, "cuda", progress=lambda it, **_: it)
        print()
        print(f"{'WEST calibration pass':28s} {'rows/blk':>8s} {'ms':>9s} {'x dense':>9s}")
        for rows_per_block in [int(r) for r in args.calib_rows.split(",")]:
            passes = loop.steps * len(loop.passes)
            for _ in range(2):  # a warm-up run, then the timed one
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                compute_topology(calibrator, blocks, rows_per_block)
                end.record()
                torch.cuda.synchronize()
            ms = start.elapsed_time(end) / passes
            print(f"{'dense forward + probes':28s} {rows_per_block:8d} {ms:9.1f} {ms / dense_ms['eager']:8.2f}x")

if __name__ == "__main__":
    main()
