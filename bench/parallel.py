"""One video on several GPUs (issue 23): a full-size DiT forward, sparse, on 1, 2, 4 ... GPUs (Ulysses, heads
balanced offline) against one GPU sparse and one GPU dense (cuDNN SDPA), the NCCL kernels' share of the step, and
optionally whole guided generations (each on a GPU count, Ulysses alone or Ulysses x CFG parallel).

Random weights, stand-in masks (`topology.standin`: a jittered density per head, as FAST's budgets vary), the
preset's blocks and layout, bf16, eager (the Ulysses all-to-all is not compiled here; both sides run eager, so the
ratios compare like with like). The script launches itself under torchrun once per GPU count and prints one table
from what the launches wrote; each launch checks its output against the one-GPU sparse forward of the same weights.
On a machine without a GPU it runs on gloo with host-clock times (a check of the script, not a measurement).

    python bench/parallel.py --gpus 1,2,4 [--model wan2.1-14b] [--resolution 720p] [--density 0.3]
                             [--generate-steps 50 --generate 4,4cfg] [--out DIR]

`--generate 4,4cfg`: one generation on 4 GPUs as Ulysses 4, one as Ulysses 2 x CFG parallel 2.
"""

from __future__ import annotations

import argparse
import json
import os
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
from saexport.models.presets import ModelPreset
from saexport.models.text_encoder import synthetic_embeddings
from saexport.models.video_shape import VideoShape, parse_video_shape
from saexport.runtime.denoisers import TorchDenoiser
from saexport.runtime.generation import model_identity
from saexport.runtime.parallel.cfg import CfgParallelDenoiser, cfg_pair_group
from saexport.runtime.parallel.launch import join_ranks
from saexport.runtime.parallel.ulysses import ulysses_dit
from saexport.runtime.sampler import SamplerSettings, no_progress, sample
from saexport.runtime.schedule import flow_shift_for
from saexport.topology.sensitivity import relative_error
from saexport.topology.standin import standin_budgets, standin_topology

WEIGHTS_SEED = 0  # every rank draws the same random weights (same seed, same kind of GPU)


def slowest_rank_ms(fn: Callable[[], object], reps: int, warmup: int, device: torch.device) -> float:
    """The largest of the ranks' median times: a step ends when the last rank's does."""
    dist.barrier()
    ms = time_ms(fn, reps, warmup)
    slowest = torch.tensor([ms], dtype=torch.float64, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return float(slowest)


def nccl_shares(fn: Callable[[], object], forward_ms: float) -> dict[str, float]:
    """The NCCL kernels' device time in one profiled forward on this rank (rank 0's is reported), as shares of
    `forward_ms`: all-to-all (NCCL runs it as grouped send/receive), the final all-gather of the tokens, and any other
    NCCL kernel. Waiting for a slower rank is inside these kernels, so it counts as communication."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        fn()
        torch.cuda.synchronize()
    shares = {"all_to_all": 0.0, "all_gather": 0.0, "other": 0.0}
    for kernel in profile.key_averages():
        name = kernel.key.lower()
        if "nccl" in name:
            key = ("all_gather" if "allgather" in name else "all_to_all" if "sendrecv" in name or "alltoall" in name
                   else "other")
            shares[key] += kernel.self_device_time_total / 1e3 / forward_ms
    return shares


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
    timed = partial(slowest_rank_ms, reps=args.reps, warmup=args.warmup, device=device)
    degree = world // 2 if args.cfg_parallel else world
    result = {"gpu": torch.cuda.get_device_name() if cuda else "CPU (gloo, host clock)", "ranks": world,
              "ulysses_degree": degree, "model": preset.name, "video": video.describe(),
              "tokens": grid[0] * grid[1] * grid[2], "heads": preset.num_heads, "density": budgets.mean_density,
              "torch": torch.__version__, "dtype": str(dtype).removeprefix("torch."),
              "dense_backend": "cuDNN SDPA" if cuda else "SDPA, math"}
    with torch.no_grad(), sdpa_kernel(SDPBackend.CUDNN_ATTENTION if cuda else SDPBackend.MATH):
        if world == 1 and not args.generate_steps:  # diffusers' processors: building the sparse DiT replaces them
            result["dense_ms"] = timed(partial(loaded.transformer, *feed[:3], return_dict=False))
        dit = build_sparse_dit(loaded, topology, budgets, video).to(device)
        model = ulysses_dit(dit, degree) if degree > 1 else dit
        if args.generate_steps:
            result.update(generation(args, model, preset, feed, video))
        else:
            forward = partial(model, *feed)
            result["sparse_ms"] = timed(forward)
            if cuda and world > 1:
                result["nccl_share"] = nccl_shares(forward, result["sparse_ms"])
            output = forward()
            if world == 1:
                torch.save(output.cpu(), args.reference)
            elif args.reference.exists():
                result["difference_to_one_gpu"] = relative_error(output, torch.load(args.reference))
    if rank == 0:
        args.result.write_text(json.dumps(result))
    dist.destroy_process_group()


def generation(args: argparse.Namespace, model: torch.nn.Module, preset: ModelPreset, feed: list[torch.Tensor],
               video: VideoShape) -> dict:
    """A whole guided generation's wall time on rank 0, after one untimed guided step (communicators, kernels)."""
    denoiser = TorchDenoiser(model, args.generate_steps)
    if args.cfg_parallel:
        denoiser = CfgParallelDenoiser(denoiser, cfg_pair_group())
    text, negative = synthetic_embeddings(preset.text_len, model.transformer.config.text_dim, 2, 0).split(1)
    latents, timestep, _, step_index = feed
    if args.cfg_parallel:
        denoiser.predict_guided(latents, timestep, text, negative, step_index)
    else:
        denoiser.predict(latents, timestep, text, step_index)
    settings = SamplerSettings(model.latent_shape(), args.generate_steps, flow_shift_for(video.height))
    dist.barrier()
    started = time.perf_counter()
    sample(denoiser, settings, text, negative, seed=0, progress=no_progress)
    return {"generation_s": time.perf_counter() - started,
            "generation": f"{args.generate_steps} steps, guided" + (", CFG parallel" if args.cfg_parallel else "")}


def launch(gpus: int, args: argparse.Namespace, work: Path, cfg_parallel: bool | None = None) -> dict:
    """This script under torchrun on `gpus` ranks: the forward timings, or (`cfg_parallel` given) a generation;
    what its rank 0 wrote."""
    what = "forward" if cfg_parallel is None else "generation, CFG parallel" if cfg_parallel else "generation"
    result = work / f"{gpus} GPU {what}.json"
    options = ["--model", args.model, "--density", str(args.density), "--reps", str(args.reps),
               "--warmup", str(args.warmup), "--reference", str(work / "reference.pt"), "--result", str(result)]
    options += ["--resolution", args.resolution] if args.resolution else []
    options += ["--frames", str(args.frames)] if args.frames else []
    if cfg_parallel is not None:
        options += ["--generate-steps", str(args.generate_steps)] + (["--cfg-parallel"] if cfg_parallel else [])
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}",
               __file__, "--rank-run", *options]
    started = time.perf_counter()
    done = subprocess.run(command, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if done.returncode != 0:
        raise SystemExit(f"the launch on {gpus} GPU(s) ({what}) failed (exit {done.returncode}); its log is above")
    print(f"[{gpus} GPU(s), {what}: {time.perf_counter() - started:.0f} s]", flush=True)
    return json.loads(result.read_text())


def parse_generations(spec: str) -> list[tuple[int, bool]]:
    """`4,4cfg` -> [(4, False), (4, True)]: GPU counts, `cfg` for Ulysses on half of them x CFG parallel."""
    generations = []
    for item in filter(None, spec.split(",")):
        count, cfg_parallel = int(item.removesuffix("cfg")), item.endswith("cfg")
        if cfg_parallel and count % 2:
            raise SystemExit(f"--generate {item}: CFG parallel runs the two passes on two halves of an even count")
        generations.append((count, cfg_parallel))
    return generations


def table(runs: list[dict], generations: list[dict]) -> str:
    one = next(run for run in runs if run["ranks"] == 1)
    first = runs[0]
    lines = [f"{first['gpu']}, torch {first['torch']}: {first['model']} {first['video']} ({first['tokens']} tokens, "
             f"{first['heads']} heads), {first['dtype']}, eager, stand-in masks at density {first['density']:.3f}; "
             "each time the largest of the ranks' medians",
             "",
             "| GPUs | DiT forward | ms | x 1 GPU sparse | scaling | x 1 GPU dense | all-to-all | all-gather | "
             "other NCCL | difference to 1 GPU |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
             f"| 1 | dense ({one['dense_backend']}) | {one['dense_ms']:.1f} | {one['sparse_ms'] / one['dense_ms']:.2f} "
             "| — | 1.00 | — | — | — | — |"]
    for run in runs:
        speedup = one["sparse_ms"] / run["sparse_ms"]
        shares = run.get("nccl_share")
        lines.append(f"| {run['ranks']} | sparse{', Ulysses' if run['ranks'] > 1 else ''} | {run['sparse_ms']:.1f} | "
                     f"{speedup:.2f} | {speedup / run['ranks']:.0%} | {one['dense_ms'] / run['sparse_ms']:.2f} | "
                     + (" | ".join(f"{shares[key]:.1%}" for key in ("all_to_all", "all_gather", "other")) + " | "
                        if shares else "— | — | — | ")
                     + (f"{run['difference_to_one_gpu']:.1e} |" if "difference_to_one_gpu" in run else "— |"))
    if generations:
        lines += ["", "| GPUs | whole generation | Ulysses degree | s |", "| --- | --- | --- | --- |"]
        lines += [f"| {run['ranks']} | {run['generation']} | {run['ulysses_degree']} | {run['generation_s']:.1f} |"
                  for run in generations]
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
    parser.add_argument("--generate-steps", type=int, default=0, help="the steps of each --generate generation")
    parser.add_argument("--generate", default="", help="whole generations: GPU counts, `cfg` after one for CFG "
                        "parallel (e.g. 4,4cfg)")
    parser.add_argument("--out", type=Path, help="keep the launches' results here (default: a temporary folder)")
    parser.add_argument("--rank-run", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cfg-parallel", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--reference", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_run:
        rank_run(args)
        return
    gpus = sorted({int(g) for g in args.gpus.split(",")} | {1})
    generations = parse_generations(args.generate)
    if generations and args.generate_steps < 1:
        raise SystemExit("--generate needs --generate-steps")
    most = max([*gpus, *(count for count, _ in generations)])
    if torch.cuda.is_available() and torch.cuda.device_count() < most:
        raise SystemExit(f"{most} GPUs asked for, this machine has {torch.cuda.device_count()}")
    with tempfile.TemporaryDirectory() as scratch:
        work = args.out or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        runs = [launch(count, args, work) for count in gpus]
        generated = [launch(count, args, work, cfg_parallel) for count, cfg_parallel in generations]
    print()
    print(table(runs, generated))


if __name__ == "__main__":
    main()
