"""A whole guided generation on the GPU, as `saexport generate --backend torch` runs it: dense against sparse.

Wan2.1 with random weights (full-size architecture), Wan's sampler loop (UniPC, 50 steps, guidance 5: 100 DiT
forwards), then the VAE decode (diffusers' AutoencoderKLWan at Wan's configuration, random weights, fp32, tiled).
Dense = the same static-grid DiT with SDPA (cuDNN) attention; sparse = stand-in masks at --density through the
CUDA kernel. Each is run eager and, with --compile, through torch.compile; prompts are synthetic embeddings (UMT5
takes about 0.1 s of a generation and is not timed). Prints wall time (host clock around synchronised work) and
peak GPU memory; the GPU named.
    python bench/generation.py [--model wan2.1] [--resolution 480p] [--frames 81] [--steps 50] [--density 0.3]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from saexport import kernels
from saexport.artifacts import BlockedGrid
from saexport.layout import parse_layout
from saexport.models.checkpoint import load_model
from saexport.models.dit import SparseWanDiT, WanDiT
from saexport.models.text_encoder import synthetic_embeddings
from saexport.models.video_shape import parse_video_shape
from saexport.runtime.denoisers import TorchDenoiser
from saexport.runtime.generation import model_identity
from saexport.runtime.sampler import SamplerSettings, sample
from saexport.runtime.schedule import flow_shift_for
from saexport.runtime.video import decode_latents
from saexport.topology.standin import standin_budgets, standin_topology


def timed(fn) -> tuple[object, float, float]:
    """(result, seconds, peak GiB) of one call, after a synchronise on both sides."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = fn()
    torch.cuda.synchronize()
    return result, time.perf_counter() - start, torch.cuda.max_memory_allocated() / 2**30


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="wan2.1")
    parser.add_argument("--resolution", default="480p")
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--density", type=float, default=0.3)
    parser.add_argument("--compile", action="store_true", help="Also run both through torch.compile.")
    parser.add_argument("--no-vae", action="store_true")
    args = parser.parse_args()
    assert kernels.load_library() is not None, "build the kernel library first (cmake -S . -B build ...)"
    loaded = load_model(args.model, random_weights=True, dtype=torch.bfloat16, random_device="cuda")
    preset, video = loaded.preset, parse_video_shape(args.resolution, args.frames)
    grid = video.token_grid(preset.patch_size)
    text = synthetic_embeddings(preset.text_len, preset.config["text_dim"], 2, 0)
    prompt, negative = text[:1], text[1:]
    topology = standin_topology(model_identity(loaded), preset.num_layers, preset.num_heads,
                                BlockedGrid(grid, 128, parse_layout(preset.defaults.layout)))
    budgets = standin_budgets(topology, args.steps, args.density)
    print(f"GPU: {torch.cuda.get_device_name()}  {args.model} {video.describe()} grid {grid}, bf16, {args.steps} "
          f"steps x 2 passes; sparse: stand-in masks, mean density {budgets.mean_density:.3f}", flush=True)
    rows = []
    variants = [("dense", False), ("sparse", False)] + ([("dense", True), ("sparse", True)] if args.compile else [])
    for kind, compiled in variants:
        if kind == "dense":
            model = WanDiT(loaded.transformer, grid, topology.layout)
        else:
            model = SparseWanDiT(loaded.transformer, grid, topology.layout, topology.levels, budgets.levels, 128)
        denoiser = TorchDenoiser(model.cuda(), args.steps, compiled=compiled)
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            if compiled:  # compile before the timed run
                denoiser.predict(torch.randn(1, *video.latent_shape()), torch.tensor([999.0]), prompt,
                                 torch.tensor([0], dtype=torch.int32))
            settings = SamplerSettings(video.latent_shape(), args.steps, flow_shift_for(video.height))
            latents, seconds, peak = timed(lambda d=denoiser, s=settings: sample(d, s, prompt, negative, 0,
                                                                                 progress=lambda it, **_: it))
        name = f"{kind}{' compiled' if compiled else ''}"
        rows.append((name, seconds, peak))
        print(f"{name:16s} sampler {seconds:7.1f} s  peak {peak:5.1f} GiB", flush=True)
    if not args.no_vae:
        from diffusers import AutoencoderKLWan

        vae = AutoencoderKLWan().cuda().eval()  # Wan2.1's VAE configuration, random weights
        vae.enable_tiling()
        _, decode_s, decode_peak = timed(lambda: decode_latents(vae, latents))
        print(f"{'VAE decode':16s}         {decode_s:7.1f} s  peak {decode_peak:5.1f} GiB (fp32, tiled)")
    print()
    print(f"{'generation':16s} {'sampler s':>10s} {'peak GiB':>9s} {'speed-up':>9s}")
    dense_seconds = {name.removeprefix("dense"): seconds for name, seconds, _ in rows if name.startswith("dense")}
    for name, seconds, peak in rows:
        baseline = dense_seconds[name.removeprefix("dense").removeprefix("sparse")]
        print(f"{name:16s} {seconds:10.1f} {peak:9.1f} {baseline / seconds:8.2f}x")


if __name__ == "__main__":
    main()
