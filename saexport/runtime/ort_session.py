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
# ONNX's element types of the graphs' inputs and outputs, as torch dtypes (IO binding takes bf16 by its ONNX type:
# numpy has none).
TORCH_ELEMENT_TYPES = {"tensor(float)": (torch.float32, 1), "tensor(float16)": (torch.float16, 10),
                       "tensor(bfloat16)": (torch.bfloat16, 16), "tensor(int32)": (torch.int32, 6)}
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


def graph_device(graph_dtype: str, device: str | torch.device | None = None) -> torch.device:
    """Where ONNX Runtime runs a graph of `graph_dtype` ("fp32", "fp16" or "bf16"): `device`, by default the CPU for
    fp32 and the GPU for fp16 and bf16 (the CPU provider lacks most ops' bf16 kernels). fp32 on the GPU is refused:
    the CUDA op runs fp16 and bf16."""
    chosen = torch.device(device if device is not None else "cpu" if graph_dtype == "fp32" else "cuda")
    if graph_dtype == "fp32" and chosen.type == "cuda":
        raise SaexportError("an fp32 graph runs on the cpu: ONNX Runtime's CUDA op runs fp16 and bf16 graphs (export "
                            "it in bf16 for the GPU)")
    return chosen


def providers(device: str | torch.device) -> list:
    """ONNX Runtime's execution providers for `device`: "cpu", or "cuda"/"cuda:N": the CUDA execution provider on
    GPU N (the current one by default) computing on torch's current stream there, so that it is ordered with the
    torch work around it, with the CPU provider for what it does not run."""
    device = torch.device(device)
    if device.type == "cpu":
        return ["CPUExecutionProvider"]
    if device.type != "cuda":
        raise SaexportError(f"ONNX Runtime runs on cpu or cuda, not {device.type}")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise SaexportError(f"this onnxruntime ({ort.__version__}) has no CUDA execution provider: install "
                            "onnxruntime-gpu (built for the CUDA major version of this machine) to run on cuda")
    if not torch.cuda.is_available():
        raise SaexportError("ONNX Runtime on cuda needs a CUDA device, and torch sees none")
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = torch.cuda.current_stream(index).cuda_stream
    return [("CUDAExecutionProvider", {"device_id": str(index), "user_compute_stream": str(stream)}),
            "CPUExecutionProvider"]


def ort_session(path: str | Path, threads: int = 0, device: str | torch.device = "cpu") -> ort.InferenceSession:
    """A session on the exported graph at `path` with the custom-op library registered, on `device` (see
    `providers`)."""
    chosen = providers(device)
    library = library_path()
    options = ort.SessionOptions()
    try:
        options.register_custom_ops_library(str(library))
    except _LOAD_ERRORS as e:
        raise SaexportError(f"ONNX Runtime cannot load {library} ({str(e).splitlines()[0]}): rebuild it with "
                            f"`{BUILD_COMMAND}`") from None
    options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), options, providers=chosen)
    except ort_state.NotImplemented as e:  # an op of the graph has no kernel in this precision (bf16 on the CPU)
        raise SaexportError(f"ONNX Runtime cannot load {path} ({str(e).splitlines()[0]}): its {chosen[0]} "
                            "lacks a kernel for this graph's precision; export it in fp32") from None
    except _LOAD_ERRORS as e:
        raise SaexportError(f"ONNX Runtime cannot load {path} ({str(e).splitlines()[0]}): export it again with "
                            "`saexport export`") from None


def run_dit(session: ort.InferenceSession, inputs: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> torch.Tensor:
    """Run an exported DiT on (hidden_states, timestep, encoder_hidden_states, step_index)."""
    names = [i.name for i in session.get_inputs()]
    (out,) = session.run(None, {name: t.numpy() for name, t in zip(names, inputs, strict=True)})
    return torch.from_numpy(out)


def element_type(value: ort.NodeArg) -> tuple[torch.dtype, int]:
    """A graph input's or output's torch dtype and ONNX element type."""
    if value.type not in TORCH_ELEMENT_TYPES:
        raise SaexportError(f"the graph's {value.name} is a {value.type}, which the runtime does not bind")
    return TORCH_ELEMENT_TYPES[value.type]


def run_bound(session: ort.InferenceSession, inputs: dict[str, torch.Tensor], output: torch.Tensor) -> None:
    """One run on torch tensors in place, through IO binding: nothing is copied between host and device, and the
    output lands in `output` (its shape and dtype the graph's). On the GPU the tensors must be on the session's
    device, written on the stream it computes on (`providers`)."""
    binding = session.io_binding()
    bound = {name: tensor.contiguous() for name, tensor in inputs.items()}  # alive until the run has read them
    for value in session.get_inputs():
        tensor = bound[value.name]
        binding.bind_input(value.name, tensor.device.type, tensor.device.index or 0, element_type(value)[1],
                           list(tensor.shape), tensor.data_ptr())
    (out,) = session.get_outputs()
    binding.bind_output(out.name, output.device.type, output.device.index or 0, element_type(out)[1],
                        list(output.shape), output.data_ptr())
    session.run_with_iobinding(binding)
