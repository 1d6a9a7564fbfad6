"""`saexport triton`: a Triton Inference Server model repository for the exported DiT.

    <name>_dit        the DiT: `platform: "tensorrt_plan"` (model.plan + the plugin), or, where TensorRT is
                      absent, a Python-backend model running the ONNX in ONNX Runtime with the same I/O
    <name>_pipeline   Python backend, BLS: Wan2.1's sampler loop calling <name>_dit every step
    README.md         loading the plugin, starting the server, calling the pipeline

Shapes and types come from the exported graph, so the configs match the engine built from it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import onnx

from saexport.artifacts import OnnxMetadata
from saexport.errors import SaexportError
from saexport.folders import check_output_folder, staged_folder
from saexport.runtime.schedule import flow_shift_for

TRITON_TYPES = {
    onnx.TensorProto.FLOAT: "TYPE_FP32",
    onnx.TensorProto.FLOAT16: "TYPE_FP16",
    onnx.TensorProto.BFLOAT16: "TYPE_BF16",
    onnx.TensorProto.INT32: "TYPE_INT32",
    onnx.TensorProto.INT64: "TYPE_INT64",
}
DTYPE_NAMES = {"TYPE_FP32": "fp32", "TYPE_FP16": "fp16", "TYPE_BF16": "bf16"}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    data_type: str
    dims: tuple[int, ...]

    def pbtxt(self) -> str:
        return f'  {{ name: "{self.name}" data_type: {self.data_type} dims: [ {", ".join(map(str, self.dims))} ] }}'


def graph_io(onnx_path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    graph = onnx.load(str(onnx_path), load_external_data=False).graph

    def spec(value) -> TensorSpec:
        t = value.type.tensor_type
        return TensorSpec(value.name, TRITON_TYPES[t.elem_type], tuple(d.dim_value for d in t.shape.dim))

    return [spec(v) for v in graph.input], [spec(v) for v in graph.output]


def model_config(name: str, inputs: list[TensorSpec], outputs: list[TensorSpec], *, platform: str | None = None,
                 backend: str | None = None, instance_kind: str = "KIND_GPU", gpus: list[int] | None = None) -> str:
    lines = [f'name: "{name}"']
    lines += [f'platform: "{platform}"'] if platform else [f'backend: "{backend}"']
    lines.append("max_batch_size: 0")  # static shapes, batch included (the masks are tied to the grid)
    lines += ["input [", ",\n".join(s.pbtxt() for s in inputs), "]"]
    lines += ["output [", ",\n".join(s.pbtxt() for s in outputs), "]"]
    group = f"kind: {instance_kind} count: 1"
    if instance_kind == "KIND_GPU" and gpus:
        group += f" gpus: [ {', '.join(map(str, gpus))} ]"
    lines.append(f"instance_group [ {{ {group} }} ]")
    return "\n".join(lines) + "\n"


def validate_config(text: str) -> None:
    """Parse with Triton's own model-config protobuf (tritonclient), where it is installed."""
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        return
    try:
        text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as e:
        raise SaexportError(f"generated an invalid config.pbtxt: {e}") from None


def write_triton_repository(
    onnx_path: str | Path,
    out_dir: str | Path,
    name: str,
    engine_path: str | Path | None = None,
    gpus: list[int] | None = None,
) -> Path:
    """Write the repository atomically (a staging folder swapped into place). Without an engine, the DiT
    model runs the ONNX in ONNX Runtime (CPU) behind the same interface. The sampler's step count and flow
    shift come from the graph's metadata: the budgets frozen into it were made for that many steps."""
    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    sources = [onnx_path, *([Path(engine_path)] if engine_path is not None else [])]
    check_output_folder(out_dir, "triton", sources)  # before anything is read or written
    metadata = OnnxMetadata.read(onnx_path)
    if engine_path is None and metadata.dtype != "fp32":
        raise SaexportError(f"{onnx_path} is a {metadata.dtype} graph: without an engine the DiT runs in ONNX "
                            "Runtime, which runs fp32 graphs; give --engine, or export with --dtype fp32")
    steps, flow_shift = metadata.steps, flow_shift_for(metadata.height)
    inputs, outputs = graph_io(onnx_path)
    latents = outputs[0]
    if latents.dims[0] != 1:
        raise SaexportError("the Triton pipeline serves graphs of batch 1 (guidance runs two passes)")
    dit, pipeline = f"{name}_dit", f"{name}_pipeline"
    text_spec = next(s for s in inputs if s.name == "encoder_hidden_states")

    # Built beside the target and swapped in: the old repository stays whole until the new one is complete, and
    # only a folder this command wrote (marked as the triton repository's) is ever replaced.
    with staged_folder(out_dir, "triton", sources) as staging:
        version = staging / dit / "1"
        version.mkdir(parents=True)
        if engine_path is not None:
            shutil.copy2(engine_path, version / "model.plan")
            dit_config = model_config(dit, inputs, outputs, platform="tensorrt_plan", gpus=gpus)
            instance_kind = "KIND_GPU"
        else:
            for file in onnx_path.parent.glob(onnx_path.name + "*"):  # model.onnx and model.onnx.data
                shutil.copy2(file, version / file.name)
            _copy_model_py("dit_onnxruntime_model.py", version)
            dit_config = model_config(dit, inputs, outputs, backend="python", instance_kind="KIND_CPU")
            instance_kind = "KIND_CPU"
        pipeline_inputs = [
            TensorSpec("prompt_embeds", "TYPE_FP32", text_spec.dims),
            TensorSpec("negative_embeds", "TYPE_FP32", text_spec.dims),
            TensorSpec("seed", "TYPE_INT64", (1,)),
            TensorSpec("guidance_scale", "TYPE_FP32", (1,)),
        ]
        pipeline_config = model_config(pipeline, pipeline_inputs, [TensorSpec("latents", "TYPE_FP32", latents.dims)],
                                       backend="python", instance_kind=instance_kind, gpus=gpus)
        for folder, config in ((dit, dit_config), (pipeline, pipeline_config)):
            validate_config(config)
            (staging / folder / "config.pbtxt").parent.mkdir(parents=True, exist_ok=True)
            (staging / folder / "config.pbtxt").write_text(config)
        pipeline_version = staging / pipeline / "1"
        pipeline_version.mkdir(parents=True)
        _copy_model_py("pipeline_model.py", pipeline_version)
        (pipeline_version / "pipeline.json").write_text(json.dumps({
            "dit_model": dit, "steps": steps, "flow_shift": flow_shift, "latent_shape": list(latents.dims[1:]),
            "dtype": DTYPE_NAMES[inputs[0].data_type],
        }, indent=2))
        (staging / "README.md").write_text(_readme(name, text_spec, latents, engine_path is not None))
    return out_dir


def _copy_model_py(source: str, version: Path) -> None:
    text = resources.files("saexport.triton.models").joinpath(source).read_text()
    (version / "model.py").write_text(text)


def _readme(name: str, text: TensorSpec, latents: TensorSpec, tensorrt: bool) -> str:
    dims = ", ".join(map(str, text.dims))
    serving = (
        "The DiT is a TensorRT plan with the `BlockSparseAttention` plugin; load the plugin into the server:\n\n"
        "    tritonserver --model-repository . --backend-config=tensorrt,plugins=/path/libsaexport_trt_plugin.so\n"
        "    # or: LD_PRELOAD=/path/libsaexport_trt_plugin.so tritonserver --model-repository .\n"
        if tensorrt else
        "The DiT runs the exported ONNX in ONNX Runtime (Python backend, CPU): no TensorRT was available when this\n"
        "repository was written. Rebuild with an engine for the GPU version.\n\n"
        "    tritonserver --model-repository .\n"
    )
    return f"""# Triton model repository: {name}

- `{name}_dit`: one denoising step of the Wan2.1 DiT with frozen block-sparse attention.
- `{name}_pipeline`: the whole sampler loop (UniPC, classifier-free guidance), calling `{name}_dit` per step.

{serving}
Both Python-backend models import `saexport` (and torch, diffusers): start the server with them on
`PYTHONPATH`, in the Python environment whose `triton_python_backend_stub` the server uses.

Calling the pipeline with tritonclient:

    import numpy as np, tritonclient.http as http
    client = http.InferenceServerClient("127.0.0.1:8000")
    def tensor(name, value, dtype):
        t = http.InferInput(name, list(value.shape), dtype); t.set_data_from_numpy(value); return t
    inputs = [tensor("prompt_embeds", prompt, "FP32"),      # [{dims}] text-encoder output
              tensor("negative_embeds", negative, "FP32"),  # [{dims}]
              tensor("seed", np.array([0], np.int64), "INT64"),
              tensor("guidance_scale", np.array([5.0], np.float32), "FP32")]
    latents = client.infer("{name}_pipeline", inputs).as_numpy("latents")  # {list(latents.dims)}
"""
