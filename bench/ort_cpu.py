"""The demo model's fp32 graph in ONNX Runtime's CPU provider: the node served by libsaexport_ort_ops.so against the
path it replaced, an onnxruntime-extensions PyOp running the project's reference attention in Python (registered
here as the runtime registered it until issue 22; `pip install onnxruntime-extensions` for this script only). Same
graph, same inputs, one DiT forward at mid-loop; wall-clock median of --reps after a warm-up; prints a table.
    python bench/ort_cpu.py [--model wan2.1-demo] [--density 0.3] [--reps 5] [--threads 0]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from saexport.kernels import PackedMasks
from saexport.models.attention_op import reference_block_sparse_attention
from saexport.models.checkpoint import ModelSource
from saexport.models.onnx_op import OP_TYPE
from saexport.pipeline import Models, make_export, make_standins, resolve_run
from saexport.runtime.generation import Artifacts
from saexport.runtime.ort_session import ort_session


def pyop_session(path: Path, threads: int) -> ort.InferenceSession:
    """The graph with its node run by the reference attention through onnxruntime-extensions (fp32 only)."""
    from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op

    @onnx_op(op_type=OP_TYPE, inputs=[PyCustomOpDef.dt_float] * 3 + [PyCustomOpDef.dt_int32] * 3,
             outputs=[PyCustomOpDef.dt_float],
             attrs={"plugin_version": PyCustomOpDef.dt_string, "plugin_namespace": PyCustomOpDef.dt_string,
                    "num_heads": PyCustomOpDef.dt_int64, "head_dim": PyCustomOpDef.dt_int64,
                    "block_size": PyCustomOpDef.dt_int64, "scale": PyCustomOpDef.dt_float})
    def block_sparse_attention(q, k, v, topology, budgets, step_index, **attrs):
        q, k, v, topology, budgets, step_index = (torch.from_numpy(np.ascontiguousarray(a))
                                                  for a in (q, k, v, topology, budgets, step_index))
        masks = PackedMasks(topology, budgets, int(attrs["block_size"]))
        return reference_block_sparse_attention(q, k, v, masks, step_index, float(attrs["scale"])).numpy()

    options = ort.SessionOptions()
    options.register_custom_ops_library(get_library_path())
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def timed(session: ort.InferenceSession, feeds: dict, reps: int) -> tuple[float, np.ndarray]:
    (out,) = session.run(None, feeds)  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3, out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="wan2.1-demo")
    parser.add_argument("--density", type=float, default=0.3)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime's intra-op threads (0: all cores).")
    args = parser.parse_args()

    source = ModelSource(args.model)
    models = Models(source)
    run = resolve_run(args.model, dtype="fp32")
    with tempfile.TemporaryDirectory() as work:
        topology, budgets = make_standins(models, run, args.density)
        make_export(models, run, topology, budgets, Path(work))
        artifacts = Artifacts.open(Path(work))
        preset = artifacts.preset
        torch.manual_seed(0)
        values = (torch.randn(1, *artifacts.video.latent_shape()), torch.tensor([500.0]),
                  torch.randn(1, preset.text_len, preset.config["text_dim"]),
                  torch.tensor([budgets.steps // 2], dtype=torch.int32))
        library = ort_session(artifacts.folder.onnx, args.threads)
        feeds = {i.name: v.numpy() for i, v in zip(library.get_inputs(), values, strict=True)}
        library_ms, got = timed(library, feeds, args.reps)
        pyop_ms, want = timed(pyop_session(artifacts.folder.onnx, args.threads), feeds, args.reps)
    error = float(np.abs(got - want).max() / np.abs(want).max())
    tokens = artifacts.video.frames * artifacts.video.height * artifacts.video.width
    print(f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; onnxruntime "
          f"{ort.__version__}; {args.model} fp32, {tokens} pixels, mean density {budgets.mean_density:.2f}, one "
          f"forward (median of {args.reps})")
    print("| node served by | ms | speed-up | max abs. difference / max abs. |")
    print("|---|---|---|---|")
    print(f"| onnxruntime-extensions PyOp (reference attention in Python) | {pyop_ms:.0f} | 1.00x | |")
    print(f"| libsaexport_ort_ops.so (C++) | {library_ms:.0f} | {pyop_ms / library_ms:.2f}x | {error:.1e} |")


if __name__ == "__main__":
    main()
