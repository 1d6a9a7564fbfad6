"""One DiT forward of the exported graph in ONNX Runtime's CUDA execution provider (onnxruntime-gpu, the node served
by libsaexport_ort_ops.so on the kernel library) against the torch back end on the same weights, topology and
budgets (SparseWanDiT, eager, the kernel library), full-size Wan2.1 with random weights. Exports once per dtype into
--work (kept: a later call resumes there); prints a table, GPU named. Nodes ONNX Runtime could not place on the CUDA
provider are named in its own warning at session creation.
    python bench/ort_cuda.py [--model wan2.1] [--resolution 480p] [--frames 81] [--density 0.3] [--dtypes bf16,fp16]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import onnxruntime as ort
import torch
from timing import time_ms  # bench/timing.py: scripts run as python bench/<name>.py

from saexport.artifacts import ArtifactFolder
from saexport.models.checkpoint import ModelSource, parse_dtype
from saexport.pipeline import Models, make_export, make_standins, resolve_run
from saexport.runtime.denoisers import OnnxRuntimeDenoiser, TorchDenoiser
from saexport.runtime.generation import Artifacts, BackendOptions, open_denoiser


def export(source: ModelSource, run, density: float, folder: Path) -> None:
    models = Models(source)
    start = time.perf_counter()
    topology, budgets = make_standins(models, run, density)
    make_export(models, run, topology, budgets, folder)
    print(f"{run.dtype}: exported in {time.perf_counter() - start:.0f} s", flush=True)


def measure(source: ModelSource, folder: Path, dtype: str, reps: int, warmup: int, profile: bool) -> tuple:
    """(density, ONNX Runtime ms, torch ms, relative L2 error, session creation s) of one forward at mid-loop."""
    artifacts = Artifacts.open(folder)
    preset, torch_dtype = artifacts.preset, parse_dtype(dtype)
    torch.manual_seed(0)
    inputs = (torch.randn(1, *artifacts.video.latent_shape(), device="cuda", dtype=torch_dtype),
              torch.tensor([500.0], device="cuda"),
              torch.randn(1, preset.text_len, preset.config["text_dim"], device="cuda", dtype=torch_dtype),
              torch.tensor([artifacts.budgets.steps // 2], dtype=torch.int32))
    start = time.perf_counter()
    graph = OnnxRuntimeDenoiser(artifacts.folder.onnx, artifacts.budgets.steps, "cuda")
    session_s = time.perf_counter() - start
    ort_ms, got = timed(graph, inputs, reps, warmup)
    if profile:
        print(f"{dtype}, ONNX Runtime:\n{kernel_table(graph, inputs)}", flush=True)
    graph = None  # its weights leave the GPU before the torch model's arrive
    torch.cuda.empty_cache()
    eager = open_denoiser(artifacts, "torch", source, BackendOptions(dtype))
    assert isinstance(eager, TorchDenoiser)
    torch_ms, want = timed(eager, inputs, reps, warmup)
    if profile:
        print(f"{dtype}, torch eager:\n{kernel_table(eager, inputs)}", flush=True)
    error = float((got - want).norm() / want.norm())
    return artifacts.budgets.mean_density, ort_ms, torch_ms, error, session_s


def timed(denoiser, inputs: tuple, reps: int, warmup: int) -> tuple[float, torch.Tensor]:
    """Median ms of `denoiser.predict(*inputs)`, and its output in fp32."""
    return time_ms(lambda: denoiser.predict(*inputs), reps, warmup), denoiser.predict(*inputs).float()


def kernel_table(denoiser, inputs: tuple, rows: int = 14) -> str:
    """The GPU kernels and copies of one forward by total device time (CUPTI sees every library's launches: ONNX
    Runtime's as well as torch's)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        denoiser.predict(*inputs)
        torch.cuda.synchronize()
    events = [e for e in profile.key_averages() if e.device_time_total > 0]
    events.sort(key=lambda e: e.device_time_total, reverse=True)
    total = sum(e.device_time_total for e in events)
    lines = [f"  {total / 1e3:8.1f} ms on the GPU in all"]
    lines += [f"  {e.device_time_total / 1e3:8.1f} ms {e.count:5d}x  {e.key[:110]}" for e in events[:rows]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="wan2.1")
    parser.add_argument("--resolution", default="480p")
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--density", type=float, default=0.3)
    parser.add_argument("--dtypes", default="bf16,fp16")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("/tmp/ort_cuda"))
    parser.add_argument("--export-only", action="store_true", help="Export the graphs and stop.")
    parser.add_argument("--profile", action="store_true", help="Print each side's GPU kernels by time.")
    args = parser.parse_args()

    source = ModelSource(args.model, random_weights=True, weights_seed=0)
    dtypes = args.dtypes.split(",")
    for dtype in dtypes:
        if not ArtifactFolder(args.work / dtype).onnx.is_file():
            export(source, resolve_run(args.model, resolution=args.resolution, frames=args.frames, dtype=dtype),
                   args.density, args.work / dtype)
    if args.export_only:
        return
    print(f"GPU: {torch.cuda.get_device_name()}; onnxruntime {ort.__version__} "
          f"({', '.join(ort.get_available_providers())}); torch {torch.__version__}")
    rows = [(dtype, *measure(source, args.work / dtype, dtype, args.reps, args.warmup, args.profile))
            for dtype in dtypes]
    print(f"\n{args.model} {args.resolution} x {args.frames}, one DiT forward (median of {args.reps}, device events)")
    print("| dtype | density | ONNX Runtime CUDA ms | torch eager ms | ORT / torch | rel. L2 vs torch | session s |")
    print("|---|---|---|---|---|---|---|")
    for dtype, density, ort_ms, torch_ms, error, session_s in rows:
        print(f"| {dtype} | {density:.2f} | {ort_ms:.1f} | {torch_ms:.1f} | {ort_ms / torch_ms:.3f} | {error:.2e} "
              f"| {session_s:.0f} |")


if __name__ == "__main__":
    main()
