"""`saexport engine`: a TensorRT engine from the exported ONNX, with the BlockSparseAttention plugin.

Works with TensorRT 10.x and 11.x. Precision comes from the ONNX (the network is strongly typed; 11.x is
always strongly typed, so no FP16/BF16 builder flags are ever set). Shapes are static per build. Writes
`model.engine` and `engine.json` atomically; the timing cache is reused across builds.
"""

from __future__ import annotations

import ctypes
import json
from pathlib import Path

import onnx
import torch
from tqdm import tqdm

from saexport import kernels
from saexport.atomic import atomic_path, write_text_atomic
from saexport.engines.denoiser import import_tensorrt
from saexport.errors import SaexportError
from saexport.exporter.onnx_op import PLUGIN_VERSION

ENGINE_NAME = "model.engine"
METADATA_NAME = "engine.json"


def _progress_monitor(trt):
    """A TensorRT IProgressMonitor that shows each build phase as a progress bar."""

    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.bars: dict[str, tqdm] = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            self.bars[phase_name] = tqdm(total=num_steps, desc=phase_name, leave=parent_phase is None)

        def step_complete(self, phase_name, step):
            self.bars[phase_name].update(step + 1 - self.bars[phase_name].n)
            return True  # keep building

        def phase_finish(self, phase_name):
            self.bars.pop(phase_name).close()

    return Monitor()


def build_engine(
    onnx_path: str | Path,
    plugin_library: str | Path,
    out_dir: str | Path,
    workspace_gib: float = 8.0,
    timing_cache: str | Path | None = None,
    version_compatible: bool = False,
) -> Path:
    trt = import_tensorrt()
    onnx_path, plugin_library, out_dir = Path(onnx_path), Path(plugin_library), Path(out_dir)
    if not plugin_library.is_file():
        raise SaexportError(f"plugin library {plugin_library} not found (cmake -DTensorRT_ROOT=... && cmake --build)")
    ctypes.CDLL(str(plugin_library), mode=ctypes.RTLD_GLOBAL)  # registers BlockSparseAttention v1
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):  # 10.x; 11.x is strongly typed always
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # a path: external data is found beside it
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise SaexportError(f"TensorRT's ONNX parser rejected {onnx_path}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    config.progress_monitor = _progress_monitor(trt)
    cache_path = Path(timing_cache) if timing_cache else out_dir / "timing.cache"
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    profile = builder.create_optimization_profile()  # static shapes: min = opt = max
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        profile.set_shape(tensor.name, tensor.shape, tensor.shape, tensor.shape)
    config.add_optimization_profile(profile)
    if version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
        config.plugins_to_serialize = [str(plugin_library)]

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise SaexportError("TensorRT failed to build the engine (see its log above)")
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(cache_path) as tmp:
        tmp.write_bytes(memoryview(config.get_timing_cache().serialize()))
    with atomic_path(out_dir / ENGINE_NAME) as tmp:
        tmp.write_bytes(memoryview(serialized))
    write_text_atomic(out_dir / METADATA_NAME, json.dumps(engine_metadata(onnx_path, trt.__version__), indent=2))
    return out_dir / ENGINE_NAME


def engine_metadata(onnx_path: Path, tensorrt_version: str) -> dict:
    """What a loader checks before deserialising: the ONNX's own metadata plus plugin, TensorRT and GPU."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    return {
        "model": meta.get("model"),
        "video": meta.get("video"),
        "grid": json.loads(meta.get("grid", "null")),
        "fidelity": meta.get("fidelity"),
        "topology_hash": meta.get("topology_hash"),
        "budgets_hash": meta.get("budgets_hash"),
        "random_weights": json.loads(meta.get("random_weights", "false")),
        "tensorrt_version": tensorrt_version,
        "plugin_version": PLUGIN_VERSION,
        "kernel_abi": kernels.ABI_VERSION,
        "gpu_name": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "gpu_capability": list(torch.cuda.get_device_capability()) if torch.cuda.is_available() else None,
    }
