"""ONNX Runtime sessions for exported graphs, with `BlockSparseAttention` served by `libsaexport_ort_ops.so`.

The library (`plugins/ort/`, built by the project's CMake beside the kernel library) is ONNX Runtime's custom-op
library for the node (docs/ARCHITECTURE.md, "The ONNX node"): the CPU execution provider in fp32, fp16 and bf16
(computed in fp32), and, where it was built with CUDA, the CUDA execution provider in fp16 and bf16 (the kernel
library's C ABI on ONNX Runtime's stream). A step index outside the budgets is clamped, as the TensorRT plugin does;
every bad input is an ONNX Runtime error, never an abort.

The library is looked up in `$SAEXPORT_ORT_OPS_LIBRARY`, then in `build/` of a source checkout. Build it with
`cmake -S . -B build && cmake --build build`.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnxruntime as ort
import torch
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from saexport.errors import SaexportError

LIBRARY_NAME = "libsaexport_ort_ops.so"
BUILD_COMMAND = "cmake -S . -B build && cmake --build build"
PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}
_LOAD_ERRORS = (ort_state.Fail, ort_state.InvalidArgument, ort_state.InvalidGraph, ort_state.InvalidProtobuf,
                ort_state.NoSuchFile, ort_state.NotImplemented, ort_state.RuntimeException)


def library_candidates() -> list[Path]:
    env = os.environ.get("SAEXPORT_ORT_OPS_LIBRARY")
    if env:
        return [Path(env)]
    return [Path(__file__).resolve().parent.parent.parent / "build" / LIBRARY_NAME]


def library_path() -> Path:
    """The custom-op library, or a SaexportError that says how to build it."""
    for path in library_candidates():
        if path.is_file():
            return path
    where = " or ".join(str(p) for p in library_candidates())
    raise SaexportError(f"{LIBRARY_NAME} (the BlockSparseAttention op for ONNX Runtime) is not built (looked for "
                        f"{where}): build it in the source checkout with `{BUILD_COMMAND}`, or set "
                        "SAEXPORT_ORT_OPS_LIBRARY")


def ort_session(path: str | Path, threads: int = 0, device: str = "cpu") -> ort.InferenceSession:
    """A session on the exported graph at `path`; `device` "cpu" or "cuda" (the CUDA execution provider, with the CPU
    one for what it does not run)."""
    if device not in PROVIDERS:
        raise SaexportError(f"device must be one of {sorted(PROVIDERS)}, got {device!r}")
    if device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        raise SaexportError(f"this onnxruntime ({ort.__version__}) has no CUDA execution provider: install "
                            "onnxruntime-gpu for device cuda")
    library = library_path()
    options = ort.SessionOptions()
    try:
        options.register_custom_ops_library(str(library))
    except _LOAD_ERRORS as e:
        raise SaexportError(f"ONNX Runtime cannot load {library} ({str(e).splitlines()[0]}): rebuild it with "
                            f"`{BUILD_COMMAND}`") from None
    options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), options, providers=PROVIDERS[device])
    except ort_state.NotImplemented as e:  # an op of the graph has no kernel in this precision (bf16 on the CPU)
        raise SaexportError(f"ONNX Runtime cannot load {path} ({str(e).splitlines()[0]}): its {device} provider "
                            "lacks a kernel for this graph's precision; export it in fp32") from None
    except _LOAD_ERRORS as e:
        raise SaexportError(f"ONNX Runtime cannot load {path} ({str(e).splitlines()[0]}): export it again with "
                            "`saexport export`") from None


def run_dit(session: ort.InferenceSession, inputs: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> torch.Tensor:
    """Run an exported DiT on (hidden_states, timestep, encoder_hidden_states, step_index)."""
    names = [i.name for i in session.get_inputs()]
    (out,) = session.run(None, {name: t.numpy() for name, t in zip(names, inputs, strict=True)})
    return torch.from_numpy(out)
