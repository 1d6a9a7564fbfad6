"""`Denoiser` back ends (docs/ARCHITECTURE.md, "The runtime"): one `predict` over an engine, an ONNX file or the
torch model.

All take and return torch tensors: latents `[batch, 16, frames, h, w]`, timestep fp32 `[batch]`,
step_index int32 `[1]` (the denoising step, which picks the budgets), text embeddings
`[batch, text_len, text_dim]`; `predict` returns the noise prediction shaped like the latents.
"""

from __future__ import annotations

import contextlib
import ctypes
from pathlib import Path
from typing import Protocol

import torch

from saexport import kernels
from saexport.artifacts import ArtifactFolder, EngineMetadata, OnnxMetadata
from saexport.errors import SaexportError
from saexport.models.onnx_op import PLUGIN_VERSION


class Denoiser(Protocol):
    name: str
    steps: int  # denoising steps the budgets were made for
    device: torch.device
    dtype: torch.dtype

    def predict(self, latents: torch.Tensor, timestep: torch.Tensor, text_embeddings: torch.Tensor,
                step_index: torch.Tensor) -> torch.Tensor: ...


class TorchDenoiser:
    """The DiT in PyTorch (sparse: on a GPU its attention runs the CUDA kernel library; or dense, or probed), in
    one process (a `WanDiT`) or on this rank's share of a Ulysses group (`parallel.ulysses.UlyssesWanDiT`): any
    module with WanDiT's forward and its `transformer`."""

    name = "torch"

    def __init__(self, model: torch.nn.Module, steps: int, compiled: bool = False):
        weight = model.transformer.patch_embedding.weight  # the latents' first product (norms may stay fp32)
        self.device, self.dtype = weight.device, weight.dtype
        self.model = torch.compile(model.eval()) if compiled else model.eval()
        self.steps = steps

    @torch.no_grad()
    def predict(self, latents, timestep, text_embeddings, step_index):
        check_step_index(step_index, self.steps)
        return self.model(latents.to(self.device, self.dtype), timestep.to(self.device, torch.float32),
                          text_embeddings.to(self.device, self.dtype), step_index.to(self.device, torch.int32))


class OnnxRuntimeDenoiser:
    """The exported graph in ONNX Runtime, its node served by the project's custom-op library
    (`libsaexport_ort_ops.so`): on the CPU (fp32 graphs; fp16 where the CPU provider has every op's kernel) or on a
    GPU through the CUDA execution provider (fp16 and bf16 graphs: the CUDA op runs the kernel library). Tensors are
    bound in place (IO binding) in the graph's precision on the session's device."""

    name = "onnxruntime"

    def __init__(self, onnx_path: str | Path, steps: int, device: str | torch.device | None = None):
        """`device`: None for the graph's default (`ort_session.graph_device`)."""
        from saexport.runtime.ort_session import element_type, graph_device, ort_session

        path = Path(onnx_path)
        if not path.is_file():
            raise SaexportError(f"no ONNX model at {path}")
        self.device = graph_device(OnnxMetadata.read(path).dtype, device)
        self.session = ort_session(path, device=self.device)  # refuses a GPU this machine lacks
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.steps = steps
        first, output = self.session.get_inputs()[0], self.session.get_outputs()[0]
        self.dtype = element_type(first)[0]
        self.output_shape, self.batch = tuple(output.shape), first.shape[0]  # static: exported for that batch
        self.stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None

    def predict(self, latents, timestep, text_embeddings, step_index):
        from saexport.runtime.ort_session import run_bound

        check_step_index(step_index, self.steps)
        if latents.shape[0] != self.batch:
            raise SaexportError(f"the graph was exported for batch {self.batch}; this pass has {latents.shape[0]} "
                                "(the sampler runs batch 1 a pass: export it for batch 1)")
        with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
            names = [value.name for value in self.session.get_inputs()]
            inputs = dict(zip(names, (latents.to(self.device, self.dtype), timestep.to(self.device, torch.float32),
                                      text_embeddings.to(self.device, self.dtype),
                                      step_index.to(self.device, torch.int32)), strict=True))
            output = torch.empty(self.output_shape, dtype=self.dtype, device=self.device)
            run_bound(self.session, inputs, output)
        return output


class TensorRTDenoiser:
    """A TensorRT engine with the `BlockSparseAttention` plugin: torch tensors bound as I/O, execute_async_v3.

    The engine's `engine.json` must name the plugin ABI and GPU it was built for; a mismatch is refused.
    """

    name = "tensorrt"

    def __init__(self, engine_path: str | Path, plugin_library: str | Path, steps: int, cuda_graph: bool = False):
        trt = import_tensorrt()
        engine_path, plugin_library = Path(engine_path), Path(plugin_library)
        metadata = check_engine_metadata(engine_path)
        load_plugin_library(trt, plugin_library)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        if metadata.version_compatible:
            self.runtime.engine_host_code_allowed = True  # the plugin's code is serialised inside the engine
        self.engine = self.runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise SaexportError(f"TensorRT could not load {engine_path} (see its log above)")
        self.context = self.engine.create_execution_context()
        self.steps = steps
        self.device = torch.device("cuda")
        self.dtype = _torch_dtype(trt, self.engine.get_tensor_dtype("hidden_states"))
        self.stream = torch.cuda.Stream()
        self.cuda_graph = cuda_graph
        self._graph: torch.cuda.CUDAGraph | None = None
        self._inputs: dict[str, torch.Tensor] = {}
        self._output: torch.Tensor | None = None

    def _bind(self, feeds: dict[str, torch.Tensor]) -> None:
        for name, tensor in feeds.items():
            self._inputs[name] = tensor.contiguous()
            self.context.set_tensor_address(name, self._inputs[name].data_ptr())
        shape = tuple(self.engine.get_tensor_shape("noise_pred"))
        self._output = torch.empty(shape, dtype=self.dtype, device=self.device)
        self.context.set_tensor_address("noise_pred", self._output.data_ptr())

    def predict(self, latents, timestep, text_embeddings, step_index):
        check_step_index(step_index, self.steps)
        feeds = {"hidden_states": latents.to(self.device, self.dtype),
                 "timestep": timestep.to(self.device, torch.float32),
                 "encoder_hidden_states": text_embeddings.to(self.device, self.dtype),
                 "step_index": step_index.to(self.device, torch.int32)}
        with torch.cuda.stream(self.stream):
            if self.cuda_graph and self._graph is not None:
                for name, tensor in feeds.items():  # same addresses every step: copy into the bound buffers
                    self._inputs[name].copy_(tensor)
                self._graph.replay()
            else:
                self._bind(feeds)
                if not self.context.execute_async_v3(self.stream.cuda_stream):
                    raise SaexportError("TensorRT execute_async_v3 failed (see its log above)")
                if self.cuda_graph:
                    self._graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(self._graph, stream=self.stream):
                        self.context.execute_async_v3(self.stream.cuda_stream)
        self.stream.synchronize()
        return self._output.clone()


def check_step_index(step_index: torch.Tensor, steps: int) -> int:
    """The denoising step of a one-element integer step_index, refused (SaexportError) outside [0, steps): every
    back end's `predict` calls it first (docs/ARCHITECTURE.md, "The runtime": one policy for all), so no back end
    runs a step its budgets were not made for (the kernel and the plugin would clamp it silently). A host tensor
    is read without a device synchronisation."""
    if step_index.dtype.is_floating_point or step_index.dtype.is_complex or step_index.numel() != 1:
        raise SaexportError(f"step_index must be one integer (int32 [1]), got "
                            f"{str(step_index.dtype).removeprefix('torch.')} {list(step_index.shape)}")
    step = int(step_index.reshape(-1)[0])
    if not 0 <= step < steps:
        raise SaexportError(f"step_index {step} is outside [0, {steps}): the budgets are for {steps} steps")
    return step


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise SaexportError("TensorRT is not installed: install NVIDIA TensorRT 10.x or 11.x with its Python "
                            "bindings (pip install tensorrt) on a machine with an NVIDIA GPU") from None
    return trt


def load_plugin_library(trt, path: Path) -> None:
    """Register `BlockSparseAttention` with TensorRT: the static library registers itself when loaded; the
    dynamic one (`getCreators`, for version-compatible engines) goes through the plugin registry's loader."""
    if not path.is_file():
        raise SaexportError(f"plugin library {path} not found (build it: cmake -DTensorRT_ROOT=...)")
    library = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    if hasattr(library, "getCreators"):
        trt.get_plugin_registry().load_library(str(path))


def check_engine_metadata(engine_path: Path) -> EngineMetadata:
    """Refuse an engine built for another plugin version, kernel ABI or GPU, before TensorRT fails obscurely."""
    meta = EngineMetadata.read(ArtifactFolder(engine_path.parent).engine_metadata)
    meta.check_loadable(engine_path, PLUGIN_VERSION, kernels.ABI_VERSION, kernels.current_gpu())
    return meta


def _torch_dtype(trt, dtype) -> torch.dtype:
    return {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16}[dtype]
