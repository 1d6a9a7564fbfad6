"""One rank of tests/test_parallel.py's and tests/test_parallel_gpu.py's multi-rank runs (launched by torchrun: gloo
on the CPU; with `--cuda`, NCCL with each rank on its own GPU).

Every rank builds the same tiny sparse DiT (seeded random weights, random per-head levels, uneven per-head
budgets) and saves to `OUT/rank{R}.pt` a single-process result (the reference) and the same computed by all ranks:
one DiT forward sequence-parallel over every rank (default), or with `--cfg` a whole guided sampling with its two
passes on the two halves of the ranks (each half a Ulysses group when it has more than one rank). `--kernel` makes
the DiT one the CUDA kernel runs (bf16, 8 heads x 64, blocks of 64) instead of the fp32 reference op's tiny one.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist

import saexport
from saexport.errors import SaexportError
from saexport.layout import parse_layout
from saexport.levels import DENSE_LEVEL
from saexport.models.checkpoint import load_model
from saexport.models.dit import SparseWanDiT
from saexport.runtime.denoisers import TorchDenoiser
from saexport.runtime.generation import GenerationRequest
from saexport.runtime.parallel.cfg import CfgParallelDenoiser, cfg_pair_group
from saexport.runtime.parallel.launch import join_ranks
from saexport.runtime.parallel.ulysses import ulysses_dit
from saexport.runtime.sampler import SamplerSettings, no_progress, sample

STEPS = 3
# the first half of the heads keeps most of their blocks, the second half few: the split by index is the worst
HEAD_BUDGETS = (220, 250, 25, 60)  # repeated per head (4 heads: as is; 8 heads: each twice)
# The tiny DiT: 9 frames of 64x48 pixels (Wan's VAE, 4x in time and 8x in space, then 1x2x2 patches), 36 tokens in
# 9 blocks of 4. The kernel's: 4 x 8 x 16 pixels (no VAE, 1x2x2 patches), 512 tokens in 8 blocks of 64.
TINY = ("wan2.1-tiny", (3, 3, 4), 4, "tile3d:1x3x2", torch.float32)
KERNEL = ("wan2.1-eval", (4, 8, 16), 64, "tile3d:1x8x8", torch.bfloat16)


def small_sparse_dit(seed: int, kind: tuple = TINY, device: torch.device | None = None) -> SparseWanDiT:
    """`kind`'s sparse DiT (TINY or KERNEL): seeded random weights, random per-head levels, uneven budgets."""
    name, grid, block_size, layout, dtype = kind
    loaded = load_model(name, random_weights=True, seed=seed, dtype=dtype)
    layers, heads = len(loaded.transformer.blocks), loaded.transformer.config.num_attention_heads
    gen = torch.Generator().manual_seed(seed)
    n = -(-grid[0] * grid[1] * grid[2] // block_size)
    levels = torch.randint(1, DENSE_LEVEL, (layers, heads, n, n), generator=gen, dtype=torch.uint8)
    levels[..., torch.arange(n), torch.arange(n)] = 0
    jitter = torch.randint(-15, 16, (STEPS, layers, heads), generator=gen)
    uneven = torch.tensor(HEAD_BUDGETS).repeat_interleave(heads // len(HEAD_BUDGETS))  # heavy heads first
    budgets = (uneven + jitter).clamp(0, DENSE_LEVEL).to(torch.uint8)
    dit = SparseWanDiT(loaded.transformer, grid, parse_layout(layout), levels, budgets, block_size)
    return dit.to(device).eval()


def inputs(seed: int, dit: SparseWanDiT, batch: int = 2) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed + 1)
    config = dit.transformer.config
    latents = torch.randn(batch, *dit.latent_shape(), generator=gen)
    timestep = torch.rand(batch, generator=gen) * 1000
    text = torch.randn(batch, 8, config.text_dim, generator=gen)
    weight = dit.transformer.patch_embedding.weight
    return (latents.to(weight), timestep.to(weight.device), text.to(weight),
            torch.tensor([1], dtype=torch.int32, device=weight.device))


def forward(seed: int, contiguous: bool, kind: tuple, device: torch.device) -> dict:
    dit = small_sparse_dit(seed, kind, device)
    feed = inputs(seed, dit)
    reference = dit(*feed)
    order = None
    if contiguous:
        heads = dit.transformer.config.num_attention_heads
        order = torch.arange(heads).expand(STEPS, len(dit.masks), heads).clone()
    parallel = ulysses_dit(dit, dist.get_world_size(), order)
    return {"reference": reference.cpu(), "output": parallel(*feed).cpu(), "order": parallel.head_order.cpu()}


def mismatched(seed: int) -> dict:
    """Rank 1 holds other budgets than rank 0: every rank must refuse."""
    dit = small_sparse_dit(seed)
    if dist.get_rank() == 1:
        dit.masks[0].budgets[0, 0] += 1
    try:
        ulysses_dit(dit, dist.get_world_size())
    except SaexportError as refused:
        return {"refused": str(refused)}
    return {"refused": None}


def loaded_pipeline(folder: Path, ulysses: int, cfg_parallel: bool) -> dict:
    """`saexport.load` on every rank, as a user's script under torchrun: the latents of one guided generation."""
    request = GenerationRequest("a red circle moving left on blue stripes", seed=3)
    reference = saexport.load(folder).latents(request)
    pipeline = saexport.load(folder, ulysses=ulysses, cfg_parallel=cfg_parallel)
    runs = f"{type(pipeline.denoiser).__name__} over {type(pipeline.denoiser.denoiser.model).__name__}"
    return {"reference": reference, "output": pipeline.latents(request), "runs": runs}


def guided_sampling(seed: int, kind: tuple, device: torch.device) -> dict:
    dit = small_sparse_dit(seed, kind, device)
    gen = torch.Generator().manual_seed(seed + 2)
    text, negative = torch.randn(2, 1, 8, dit.transformer.config.text_dim, generator=gen)
    settings = SamplerSettings(dit.latent_shape(), STEPS, flow_shift=3.0, guidance=5.0)
    reference = sample(TorchDenoiser(dit, STEPS), settings, text, negative, seed, no_progress)
    degree = dist.get_world_size() // 2
    model = ulysses_dit(dit, degree) if degree > 1 else dit
    denoiser = CfgParallelDenoiser(TorchDenoiser(model, STEPS), cfg_pair_group())
    return {"reference": reference, "output": sample(denoiser, settings, text, negative, seed, no_progress)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--contiguous", action="store_true", help="split the heads by index, not balanced")
    parser.add_argument("--cfg", action="store_true", help="a guided sampling, CFG parallel")
    parser.add_argument("--mismatch", action="store_true", help="ranks with different budgets")
    parser.add_argument("--load", type=Path, help="an artifact folder to open with saexport.load")
    parser.add_argument("--ulysses", type=int, default=1, help="with --load: the Ulysses degree")
    parser.add_argument("--cuda", action="store_true", help="NCCL, each rank on its GPU")
    parser.add_argument("--kernel", action="store_true", help="with --cuda: the DiT the CUDA kernel runs")
    args = parser.parse_args()
    if args.cuda and (args.load or args.mismatch):
        parser.error("--cuda runs the forward and --cfg cases only")
    torch.set_num_threads(1)
    if args.cuda:
        device = join_ranks()
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    kind = KERNEL if args.kernel else TINY
    with torch.no_grad():
        if args.load:
            result = loaded_pipeline(args.load, args.ulysses, args.cfg)
        elif args.mismatch:
            result = mismatched(args.seed)
        elif args.cfg:
            result = guided_sampling(args.seed, kind, device)
        else:
            result = forward(args.seed, args.contiguous, kind, device)
    torch.save(result, args.out / f"rank{dist.get_rank()}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
