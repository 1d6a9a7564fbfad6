"""One launch of the kernel at Wan2.1's shape, for profilers: ncu --kernel-name regex:bsa_forward python ..."""

import argparse

import torch

from saexport import kernels
from saexport.levels import num_blocks, pack_levels


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--seq-len", type=int, default=32760)
    parser.add_argument("--density", type=float, default=1.0)
    args = parser.parse_args()
    n = num_blocks(args.seq_len, 128)
    q, k, v = (torch.randn(1, args.seq_len, args.heads, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    levels = torch.randint(1, 255, (args.heads, n, n), dtype=torch.uint8)
    levels[:, torch.arange(n), torch.arange(n)] = 0
    budgets = torch.full((1, args.heads), round(args.density * 255), dtype=torch.int32, device="cuda")
    step = torch.zeros(1, dtype=torch.int32, device="cuda")
    for _ in range(2):
        kernels.forward(q, k, v, kernels.PackedMasks(pack_levels(levels).cuda(), budgets, 128), step, 128**-0.5)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
