"""One video on several GPUs (issue 23): a full-size DiT forward, sparse, on 1, 2, 4 ... GPUs (Ulysses, heads
balanced offline) against one GPU sparse and one GPU dense (cuDNN SDPA), the NCCL kernels' share of the step, and
optionally a whole guided generation (CFG parallel on top when asked).

Random weights, stand-in masks (`topology.standin`: a jittered density per head, as FAST's budgets vary), the
preset's blocks and layout, bf16, eager (the Ulysses all-to-all is not compiled here; both sides run eager, so the
ratios compare like with like). The script launches itself under torchrun once per GPU count and prints one table
from what the launches wrote; each launch checks its output against the one-GPU sparse forward of the same weights.
On a machine without a GPU it runs on gloo with wall-clock times (a check of the script, not a measurement).

    python bench/parallel.py --gpus 1,2,4 [--model wan2.1-14b] [--resolution 720p] [--density 0.3]
                             [--generate-steps 50 --generate-gpus 4 [--cfg-parallel]] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from timing import time_ms  # bench/timing.py: scripts run as python bench/<name>.py
from torch.nn.attention import SDPBackend, sdpa_kernel

from saexport.artifacts import BlockedGrid
from saexport.exporter.onnx_export import build_sparse_dit, example_inputs
from saexport.layout import parse_layout
from saexport.models.checkpoint import load_model
from saexport.models.text_encoder import synthetic_embeddings
from saexport.models.video_shape import parse_video_shape
from saexport.runtime.denoisers import TorchDenoiser
from saexport.runtime.generation import model_identity
from saexport.runtime.parallel.cfg import CfgParallelDenoiser, cfg_pair_group
from saexport.runtime.parallel.launch import join_ranks
from saexport.runtime.parallel.ulysses import ulysses_dit
from saexport.runtime.sampler import SamplerSettings, sample
from saexport.runtime.schedule import flow_shift_for
from saexport.topology.standin import standin_budgets, standin_topology

WEIGHTS_SEED = 0  # every rank draws the same random weights (same seed, same kind of GPU)


def wall_ms(fn: Callable[[], object], reps: int, warmup: int) -> float:
    """`time_ms`'s protocol by the host clock, for the CPU check of the script."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def slowest_rank_ms(fn: Callable[[], object], reps: int, warmup: int, cuda: bool) -> float:
    """The median forward time of the slowest rank: the step ends when the last rank's does."""
    dist.barrier()
    ms = (time_ms if cuda else wall_ms)(fn, reps, warmup)
    slowest = torch.tensor([ms], dtype=torch.float64, device="cuda" if cuda else "cpu")
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return float(slowest)


def nccl_shares(fn: Callable[[], object], forward_ms: float) -> dict[str, float]:
    """The NCCL kernels' device time in one profiled forward on this rank, as shares of `forward_ms`: all-to-all
    (point-to-point send/receive kernels) and the final all-gather of the tokens. Waiting for a slower rank is
    inside these kernels, so it counts as communication."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        fn()
        torch.cuda.synchronize()
    shares = {"all_to_all": 0.0, "all_gather": 0.0}
    for kernel in profile.key_averages():
        name = kernel.key.lower()
        if "nccl" in name:
            key = "all_gather" if "allgather" in name else "all_to_all"
            shares[key] += kernel.self_device_time_total / 1e3 / forward_ms
    return shares


def relative_difference(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.float().cpu(), want.float().cpu()
    return float((got - want).norm() / want.norm())


def quiet(items, **_):
    return items


def rank_run(args: argparse.Namespace) -> None:
    """One launch: every rank builds the same model and masks; rank 0 writes `args.result` (JSON)."""
    device = join_ranks()
    world, rank, cuda = dist.get_world_size(), dist.get_rank(), device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    loaded = load_model(args.model, random_weights=True, dtype=dtype, seed=WEIGHTS_SEED, random_device=device)
    loaded.transformer.to(device)
    preset, run = loaded.preset, loaded.preset.defaults
    video = parse_video_shape(args.resolution or run.resolution, args.frames or run.frames, preset.codec)
    grid = video.token_grid(preset.patch_size)
    steps = max(args.generate_steps, 1)
    topology = standin_topology(model_identity(loaded), preset.num_layers, preset.num_heads,
                                BlockedGrid(grid, run.block_size, parse_layout(run.layout)))
    budgets = standin_budgets(topology, steps, args.density)
    torch.manual_seed(WEIGHTS_SEED)  # the same inputs in every rank and every launch
    feed = [t.to(device) for t in example_inputs(loaded, video, dtype)]
    timed = partial(slowest_rank_ms, reps=args.reps, warmup=args.warmup, cuda=cuda)
    result = {"gpu": torch.cuda.get_device_name() if cuda else "CPU (gloo, wall clock)", "ranks": world,
              "model": preset.name, "video": video.describe(), "tokens": grid[0] * grid[1] * grid[2],
              "heads": preset.num_heads, "density": budgets.mean_density, "torch": torch.__version__,
              "dtype": str(dtype).removeprefix("torch."), "dense": "cuDNN SDPA" if cuda else "SDPA, math"}
    with torch.no_grad(), sdpa_kernel(SDPBackend.CUDNN_ATTENTION if cuda else SDPBackend.MATH):
        if world == 1 and not args.generate_only:  # diffusers' own processors: building the sparse DiT replaces them
            result["dense_ms"] = timed(partial(loaded.transformer, *feed[:3], return_dict=False))
        dit = build_sparse_dit(loaded, topology, budgets, video).to(device)
        degree = world // 2 if args.cfg_parallel else world
        model = ulysses_dit(dit, degree) if degree > 1 else dit
        if not args.generate_only:
            forward = partial(model, *feed)
            result["sparse_ms"] = timed(forward)
            if cuda and world > 1:
                result["nccl_share"] = nccl_shares(forward, result["sparse_ms"])
            output = forward()
            if world == 1:
                torch.save(output.cpu(), args.reference)
            elif args.reference.exists():
                result["difference_to_one_gpu"] = relative_difference(output, torch.load(args.reference))
        if args.generate_steps:
            denoiser = TorchDenoiser(model, steps)
            if args.cfg_parallel:
                denoiser = CfgParallelDenoiser(denoiser, cfg_pair_group())
            text, negative = synthetic_embeddings(preset.text_len, loaded.transformer.config.text_dim, 2, 0).split(1)
            settings = SamplerSettings(dit.latent_shape(), steps, flow_shift_for(video.height))
            dist.barrier()
            started = time.perf_counter()
            sample(denoiser, settings, text, negative, seed=0, progress=quiet)
            result["generation_s"] = time.perf_counter() - started
            result["generation"] = f"{steps} steps, guided" + (" (CFG parallel)" if args.cfg_parallel else "")
    result["ulysses_degree"] = degree
    if rank == 0:
        args.result.write_text(json.dumps(result))
    dist.destroy_process_group()


def launch(gpus: int, args: argparse.Namespace, work: Path, generate: bool) -> dict:
    """This script under torchrun on `gpus` ranks; what its rank 0 wrote."""
    result = work / f"{gpus}{'_generation' if generate else ''}.json"
    options = ["--model", args.model, "--density", str(args.density), "--reps", str(args.reps),
               "--warmup", str(args.warmup), "--reference", str(work / "reference.pt"), "--result", str(result)]
    options += ["--resolution", args.resolution] if args.resolution else []
    options += ["--frames", str(args.frames)] if args.frames else []
    if generate:
        options += ["--generate-steps", str(args.generate_steps), "--generate-only"]
        options += ["--cfg-parallel"] if args.cfg_parallel else []
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}",
               __file__, "--rank-run", *options]
    started = time.perf_counter()
    done = subprocess.run(command, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if done.returncode != 0:
        raise SystemExit(f"the launch on {gpus} GPUs failed (exit {done.returncode}); its log is above")
    print(f"[{gpus} GPUs{', generation' if generate else ''}: {time.perf_counter() - started:.0f} s]", flush=True)
    return json.loads(result.read_text())


def table(runs: list[dict], generations: list[dict]) -> str:
    one = next(run for run in runs if run["ranks"] == 1)
    head = runs[0]
    lines = [f"{head['gpu']}, torch {head['torch']}: {head['model']} {head['video']} ({head['tokens']} tokens, "
             f"{head['heads']} heads), {head['dtype']}, eager, stand-in masks at density {head['density']:.3f}, "
             f"median of the slowest rank",
             "",
             "| GPUs | DiT forward | ms | x 1 GPU sparse | scaling | x 1 GPU dense | all-to-all | all-gather | "
             "difference to 1 GPU |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
             f"| 1 | dense ({one['dense']}) | {one['dense_ms']:.1f} | {one['sparse_ms'] / one['dense_ms']:.2f} | — "
             "| 1.00 | — | — | — |"]
    for run in runs:
        speedup = one["sparse_ms"] / run["sparse_ms"]
        shares = run.get("nccl_share")
        lines.append(f"| {run['ranks']} | sparse{', Ulysses' if run['ranks'] > 1 else ''} | {run['sparse_ms']:.1f} | "
                     f"{speedup:.2f} | {speedup / run['ranks']:.0%} | {one['dense_ms'] / run['sparse_ms']:.2f} | "
                     + (f"{shares['all_to_all']:.1%} | {shares['all_gather']:.1%} | " if shares else "— | — | ")
                     + (f"{run['difference_to_one_gpu']:.1e} |" if "difference_to_one_gpu" in run else "— |"))
    for run in generations:
        lines.append(f"\nWhole generation on {run['ranks']} GPUs (Ulysses degree {run['ulysses_degree']}, "
                     f"{run['generation']}): {run['generation_s']:.1f} s")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", default="1,2,4", help="GPU counts, one launch each (1 is the baseline)")
    parser.add_argument("--model", default="wan2.1-14b")
    parser.add_argument("--resolution", help="default: the model's")
    parser.add_argument("--frames", type=int, help="default: the model's")
    parser.add_argument("--density", type=float, default=0.3, help="the stand-in masks' mean density")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--generate-steps", type=int, default=0, help="also time a whole guided generation")
    parser.add_argument("--generate-gpus", default="", help="GPU counts the generation runs on (default: the most)")
    parser.add_argument("--cfg-parallel", action="store_true", help="the generation's passes on two rank halves")
    parser.add_argument("--out", type=Path, help="keep the launches' results here (default: a temporary folder)")
    parser.add_argument("--rank-run", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--generate-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--reference", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_run:
        rank_run(args)
        return
    gpus = sorted({int(g) for g in args.gpus.split(",")} | {1})
    with tempfile.TemporaryDirectory() as scratch:
        work = args.out or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        runs = [launch(count, args, work, generate=False) for count in gpus]
        generating = [int(g) for g in args.generate_gpus.split(",") if g] or [gpus[-1]]
        generations = [launch(count, args, work, generate=True) for count in generating] if args.generate_steps else []
    print()
    print(table(runs, generations))


if __name__ == "__main__":
    main()
