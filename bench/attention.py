"""Block-sparse attention kernel vs cuDNN SDPA (dense) and FlexAttention (same block mask).

Prints one table: median of device-event timings after warm-up, the GPU named. Masks are random per head
(every row keeps about the same number of blocks), and with --west-map also calibrated ones: a WEST threshold
map (e.g. the evaluation model's, out/fidelity/west.safetensors), its layers x heads taken as heads and resized to
the shape's block count, cut at each head's own level quantile — rows and heads keep very different numbers of
blocks, as real maps do. Usage:
    python bench/attention.py [--reps 10] [--shapes wan2.1,wan2.1-14b] [--densities 1,0.5,0.25,0.1,0.05]
                              [--west-map out/fidelity/west.safetensors]
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
from timing import time_ms  # bench/timing.py: scripts run as python bench/<name>.py
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from saexport import kernels
from saexport.artifacts import Topology
from saexport.levels import kept_blocks, num_blocks, pack_levels, unpack_levels

SHAPES = {  # batch, heads, L, head_dim: Wan2.1 1.3B at 480p x 81 and 14B at 720p x 81
    "wan2.1": (1, 12, 32760, 128),
    "wan2.1-14b": (1, 40, 75600, 128),
}
BLOCK = 128


def random_levels(heads: int, n: int) -> torch.Tensor:
    return torch.randint(1, 255, (heads, n, n), dtype=torch.uint8)


def west_levels(path: str, heads: int, n: int) -> torch.Tensor:
    """A calibrated map's [layers, heads, m, m] levels as `heads` maps of n x n (cycled, nearest-resized)."""
    maps = Topology.load(path).levels.flatten(0, 1)  # [layers * heads, m, m]
    maps = maps[torch.arange(heads) % maps.shape[0]].float()
    return torch.nn.functional.interpolate(maps[:, None], size=(n, n), mode="nearest")[:, 0].to(torch.uint8)


def topology_for(levels: torch.Tensor, density: float):
    """The levels (diagonal kept) and one budget per head that keeps about `density` of its blocks."""
    levels = levels.clone()
    n = levels.shape[-1]
    levels[:, torch.arange(n), torch.arange(n)] = 0
    if density >= 1:
        budgets = torch.full((1, levels.shape[0]), 255, dtype=torch.int32)
    else:
        budgets = torch.quantile(levels.float().flatten(1), density, dim=1).floor().to(torch.int32)[None]
    return pack_levels(levels).cuda(), budgets.cuda()


def flex_block_mask(topology: torch.Tensor, budgets: torch.Tensor, seq_len: int) -> BlockMask:
    keep = kept_blocks(unpack_levels(topology), budgets[0])  # [heads, n, n]
    counts = keep.sum(-1).to(torch.int32)
    indices = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True).to(torch.int32)  # kept blocks first
    return BlockMask.from_kv_blocks(counts[None], indices[None], BLOCK_SIZE=BLOCK, seq_lengths=(seq_len, seq_len))


def bench_shape(name: str, masks: str, levels: torch.Tensor, densities: list[float], reps: int, flex) -> list[str]:
    batch, heads, seq_len, dim = SHAPES[name]
    q, k, v = (torch.randn(batch, seq_len, heads, dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, L, D] views for SDPA and flex
    scale = dim**-0.5
    dense_flops = 4 * batch * heads * seq_len**2 * dim
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        cudnn_ms = time_ms(partial(torch.nn.functional.scaled_dot_product_attention, qt, kt, vt, scale=scale), reps)
    step = torch.zeros(1, dtype=torch.int32, device="cuda")
    rows = []
    for density in densities:
        topology, budgets = topology_for(levels, density)
        kept = float(kept_blocks(unpack_levels(topology), budgets[0]).float().mean())
        ours_ms = time_ms(partial(kernels.forward, q, k, v, kernels.PackedMasks(topology, budgets, BLOCK), step, scale),
                          reps)
        try:
            mask = flex_block_mask(topology, budgets, seq_len)
            flex_ms = time_ms(partial(flex, qt, kt, vt, block_mask=mask, scale=scale), reps)
        except Exception as e:  # report, don't hide: the table says nan and the log says why
            print(f"flex attention failed for {name} density {density}: {type(e).__name__}: {e}")
            flex_ms = float("nan")
        flops = dense_flops * kept
        rows.append(f"{name:11s} {masks:6s} {density:7.2f} {kept:6.3f} {ours_ms:11.2f} {flops / ours_ms / 1e9:8.0f} "
                    f"{cudnn_ms:9.2f} {dense_flops / cudnn_ms / 1e9:8.0f} {flex_ms:8.2f} "
                    f"{flops / flex_ms / 1e9:8.0f} {cudnn_ms / ours_ms:7.2f}x")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--shapes", default="wan2.1,wan2.1-14b")
    parser.add_argument("--densities", default="1,0.5,0.25,0.1,0.05")
    parser.add_argument("--west-map", help="A topology.safetensors whose maps are also benchmarked (resized).")
    args = parser.parse_args()
    densities = [float(d) for d in args.densities.split(",")]
    flex = torch.compile(flex_attention, dynamic=False)
    print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}  bf16, block {BLOCK}, "
          f"median of {args.reps}")
    rows = []
    for name in args.shapes.split(","):
        heads, n = SHAPES[name][1], num_blocks(SHAPES[name][2], BLOCK)
        rows += bench_shape(name, "random", random_levels(heads, n), densities, args.reps, flex)
        if args.west_map:
            rows += bench_shape(name, "west", west_levels(args.west_map, heads, n), densities, args.reps, flex)
    print()
    print(f"{'shape':11s} {'masks':6s} {'density':>7s} {'kept':>6s} {'saexport ms':>11s} {'TFLOP/s':>8s} "
          f"{'cuDNN ms':>9s} {'TFLOP/s':>8s} {'flex ms':>8s} {'TFLOP/s':>8s} {'vs cuDNN':>8s}")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
