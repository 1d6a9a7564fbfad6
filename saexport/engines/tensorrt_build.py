"""`saexport engine`: a TensorRT engine from the exported ONNX, with the BlockSparseAttention plugin.

Works with TensorRT 10.x and 11.x. Precision comes from the ONNX (the network is strongly typed; 11.x is
always strongly typed, so no FP16/BF16 builder flags are ever set). Shapes are static per build. Writes
`model.engine` and `engine.json` atomically; the timing cache is reused across builds.
"""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from saexport import kernels
from saexport.artifacts import ArtifactFolder, EngineMetadata, FidelityReport, OnnxMetadata
from saexport.atomic import atomic_path
from saexport.errors import SaexportError
from saexport.models.onnx_op import PLUGIN_VERSION
from saexport.runtime.denoisers import import_tensorrt, load_plugin_library


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
    onnx_path, plugin_library, folder = Path(onnx_path), Path(plugin_library), ArtifactFolder(Path(out_dir))
    onnx_metadata = OnnxMetadata.read(onnx_path)
    if onnx_metadata.dtype == "fp32":
        raise SaexportError(f"{onnx_path} is an fp32 graph; the plugin runs fp16 and bf16: export it in bf16")
    load_plugin_library(trt, plugin_library)
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
    cache_path = Path(timing_cache) if timing_cache else folder.timing_cache
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
    folder.root.mkdir(parents=True, exist_ok=True)
    with atomic_path(cache_path) as tmp:
        tmp.write_bytes(memoryview(config.get_timing_cache().serialize()))
    with atomic_path(folder.engine) as tmp:
        tmp.write_bytes(memoryview(serialized))
    gpu = kernels.current_gpu()
    EngineMetadata(onnx=onnx_metadata, tensorrt_version=trt.__version__, plugin_version=PLUGIN_VERSION,
                   kernel_abi=kernels.ABI_VERSION, gpu_name=gpu[0] if gpu else None,
                   gpu_capability=gpu[1] if gpu else None, plugin_libraries=(plugin_library.name,),
                   version_compatible=version_compatible,
                   fidelity=_fidelity_summary(ArtifactFolder(onnx_path.parent))).write(folder.engine_metadata)
    return folder.engine


def _fidelity_summary(folder: ArtifactFolder) -> str | None:
    """The fidelity report's line, carried into the engine's metadata, where the graph's folder has one."""
    return FidelityReport.read(folder.fidelity_report).summary() if folder.fidelity_report.is_file() else None
