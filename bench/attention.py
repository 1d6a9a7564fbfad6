"""Block-sparse attention kernel vs cuDNN SDPA (dense) and FlexAttention (same block mask).

Prints one table: median of device-event timings after warm-up, the GPU named. Usage:
    python bench/attention.py [--reps 10] [--shapes wan2.1,wan2.1-14b] [--densities 1,0.5,0.25,0.1,0.05]
"""

from __future__ import annotations

import argparse
import math
from functools import partial

import torch
from timing import time_ms  # bench/timing.py: scripts run as python bench/<name>.py
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from saexport import kernels
from saexport.levels import kept_blocks, pack_levels, unpack_levels

SHAPES = {  # batch, heads, L, head_dim: Wan2.1 1.3B at 480p x 81 and 14B at 720p x 81
    "wan2.1": (1, 12, 32760, 128),
    "wan2.1-14b": (1, 40, 75600, 128),
}
BLOCK = 128



def topology_for(heads: int, n: int, density: float):
    """Random per-head levels (diagonal kept); one budget per head that keeps `density` of the blocks."""
    levels = torch.randint(1, 255, (heads, n, n), dtype=torch.uint8)
    levels[:, torch.arange(n), torch.arange(n)] = 0
    budget = 255 if density >= 1 else int(torch.quantile(levels.float().flatten(1), density, dim=1).mean())
    budgets = torch.full((1, heads), budget, dtype=torch.int32)
    return pack_levels(levels).cuda(), budgets.cuda()


def flex_block_mask(topology: torch.Tensor, budgets: torch.Tensor, seq_len: int) -> BlockMask:
    keep = kept_blocks(unpack_levels(topology), budgets[0])  # [heads, n, n]
    counts = keep.sum(-1).to(torch.int32)
    indices = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True).to(torch.int32)  # kept blocks first
    return BlockMask.from_kv_blocks(counts[None], indices[None], BLOCK_SIZE=BLOCK, seq_lengths=(seq_len, seq_len))


def bench_shape(name: str, densities: list[float], reps: int, flex) -> list[str]:
    batch, heads, seq_len, dim = SHAPES[name]
    n = math.ceil(seq_len / BLOCK)
    q, k, v = (torch.randn(batch, seq_len, heads, dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, L, D] views for SDPA and flex
    scale = dim**-0.5
    dense_flops = 4 * batch * heads * seq_len**2 * dim
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        cudnn_ms = time_ms(partial(torch.nn.functional.scaled_dot_product_attention, qt, kt, vt, scale=scale), reps)
    step = torch.zeros(1, dtype=torch.int32, device="cuda")
    rows = []
    for density in densities:
        topology, budgets = topology_for(heads, n, density)
        kept = float(kept_blocks(unpack_levels(topology), budgets[0]).float().mean())
        ours_ms = time_ms(partial(kernels.forward, q, k, v, topology, budgets, step, BLOCK, scale), reps)
        try:
            mask = flex_block_mask(topology, budgets, seq_len)
            flex_ms = time_ms(partial(flex, qt, kt, vt, block_mask=mask, scale=scale), reps)
        except Exception as e:  # report, don't hide: the table says nan and the log says why
            print(f"flex attention failed for {name} density {density}: {type(e).__name__}: {e}")
            flex_ms = float("nan")
        flops = dense_flops * kept
        rows.append(f"{name:11s} {density:7.2f} {kept:6.3f} {ours_ms:11.2f} {flops / ours_ms / 1e9:8.0f} "
                    f"{cudnn_ms:9.2f} {dense_flops / cudnn_ms / 1e9:8.0f} {flex_ms:8.2f} "
                    f"{flops / flex_ms / 1e9:8.0f} {cudnn_ms / ours_ms:7.2f}x")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--shapes", default="wan2.1,wan2.1-14b")
    parser.add_argument("--densities", default="1,0.5,0.25,0.1,0.05")
    args = parser.parse_args()
    densities = [float(d) for d in args.densities.split(",")]
    flex = torch.compile(flex_attention, dynamic=False)
    print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}  bf16, block {BLOCK}, "
          f"median of {args.reps}")
    rows = [row for name in args.shapes.split(",") for row in bench_shape(name, densities, args.reps, flex)]
    print()
    print(f"{'shape':11s} {'density':>7s} {'kept':>6s} {'saexport ms':>11s} {'TFLOP/s':>8s} "
          f"{'cuDNN ms':>9s} {'TFLOP/s':>8s} {'flex ms':>8s} {'TFLOP/s':>8s} {'vs cuDNN':>8s}")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
