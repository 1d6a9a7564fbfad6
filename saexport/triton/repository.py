"""`saexport triton`: a Triton Inference Server model repository that takes a prompt and returns video frames.

    <name>_text_encoder  Python backend: prompt(s) STRING -> embeddings FP32 (UMT5 in bf16 on the GPU, or the demo
                         model's word encoder on the CPU)
    <name>_dit           one DiT pass: `tensorrt_plan` (model.plan + the plugin) where an engine is given; else a
                         Python-backend model with the same I/O: the sparse DiT in torch on the GPU (bf16/fp16
                         graphs, the CUDA kernel library), or the ONNX in ONNX Runtime on the CPU (fp32 graphs)
    <name>_vae           Python backend: latents -> frames UINT8 (AutoencoderKLWan on the GPU, tiled; or the demo's
                         pixel codec on the CPU)
    <name>_pipeline      Python backend, BLS: prompt, negative prompt, seed, steps, guidance -> frames, by THE
                         sampler loop calling <name>_dit per pass
    README.md            what each model does, how to start the server and call the pipeline

What is written follows from what is given: an engine gives the plan; a bf16/fp16 graph without one gives the torch
DiT, which loads the checkpoint the graph was exported from (referenced by absolute path, never copied) with the
topology and budgets (copied); an fp32 graph gives ONNX Runtime. A checkpoint without a text encoder (random
weights) gives a pipeline that takes embeddings; a Wan2.1 checkpoint without `vae/` one that answers latents.
Shapes and types come from the exported graph, so the configs match the engine built from it. The models' work is
in `saexport.triton.serving`; their `model.py` files in `saexport.triton.models`.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import onnx

from saexport import kernels
from saexport.artifacts import ArtifactFolder, Budgets, EngineMetadata, FidelityReport, OnnxMetadata, Topology
from saexport.errors import SaexportError
from saexport.folders import Output, check_output_folder, check_replaceable_folder, staged_folder
from saexport.models.checkpoint import detect_layout
from saexport.models.presets import ModelPreset, check_config_matches, get_preset
from saexport.models.text_encoder import has_text_encoder
from saexport.models.word_encoder import is_word_encoder
from saexport.runtime.schedule import flow_shift_for
from saexport.triton.serving import TRITON_TYPES, Spec, pipeline_inputs

log = logging.getLogger("saexport")

ONNX_DTYPES = {
    onnx.TensorProto.FLOAT: "fp32",
    onnx.TensorProto.FLOAT16: "fp16",
    onnx.TensorProto.BFLOAT16: "bf16",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.INT64: "int64",
}
CPU_ONLY_INPUTS = "FORCE_CPU_ONLY_INPUT_TENSORS"  # "no": the Python backend hands GPU tensors over as they are


def graph_io(onnx_path: Path) -> tuple[list[Spec], list[Spec]]:
    graph = onnx.load(str(onnx_path), load_external_data=False).graph

    def spec(value) -> Spec:
        t = value.type.tensor_type
        return Spec(value.name, ONNX_DTYPES[t.elem_type], tuple(d.dim_value for d in t.shape.dim))

    return [spec(v) for v in graph.input], [spec(v) for v in graph.output]


def _pbtxt(spec: Spec) -> str:
    text = f'  {{ name: "{spec.name}" data_type: {TRITON_TYPES[spec.dtype]} dims: [ {", ".join(map(str, spec.dims))} ]'
    return text + (" optional: true }" if spec.optional else " }")


def _warmup(inputs: list[Spec]) -> list[str]:
    """One zero request per instance at load (STRING zeros are empty strings; -1 dims become 1)."""
    entries = [f'    inputs {{ key: "{s.name}" value: {{ data_type: {TRITON_TYPES[s.dtype]} dims: '
               f'[ {", ".join(str(max(d, 1)) for d in s.dims)} ] zero_data: true }} }}' for s in inputs]
    return ["model_warmup [ {", '    name: "zeros"', "    batch_size: 1", *entries, "} ]"]


@dataclass(frozen=True)
class ModelConfig:
    """One model's `config.pbtxt`: its I/O, its backend (or platform), where its instances run, the warm-up
    request at load and the backend's parameters."""

    name: str
    inputs: list[Spec]
    outputs: list[Spec]
    backend: str = "python"
    platform: str | None = None
    group: tuple[str, tuple[int, ...]] = ("KIND_CPU", ())  # instance kind, and the GPUs of a KIND_GPU group
    warmup: bool = False
    parameters: dict[str, str] | None = None

    def text(self) -> str:
        lines = [f'name: "{self.name}"']
        lines += [f'platform: "{self.platform}"'] if self.platform else [f'backend: "{self.backend}"']
        lines.append("max_batch_size: 0")  # static shapes, batch included (the masks are tied to the grid)
        lines += ["input [", ",\n".join(_pbtxt(s) for s in self.inputs), "]"]
        lines += ["output [", ",\n".join(_pbtxt(s) for s in self.outputs), "]"]
        kind, gpus = self.group
        group = f"kind: {kind} count: 1"  # count per GPU: one instance on each GPU listed
        if kind == "KIND_GPU" and gpus:
            group += f" gpus: [ {', '.join(map(str, gpus))} ]"
        lines.append(f"instance_group [ {{ {group} }} ]")
        for key, value in (self.parameters or {}).items():
            lines.append(f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}')
        if self.warmup:
            lines += _warmup([s for s in self.inputs if not s.optional])
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


@dataclass(frozen=True)
class RepositoryPlan:
    """What the repository holds, decided from what `write_triton_repository` is given, before anything is
    written."""

    dit: str  # "tensorrt", "torch" or "onnxruntime"
    text_encoder: str | None  # "umt5", "word", or None (the pipeline takes embeddings)
    vae: str | None  # "wan-vae", "pixels", or None (the pipeline answers latents)
    checkpoint: Path | None  # absolute; referenced by the models' json files, never copied
    gpu: bool = True  # the models run on the instance group's GPUs (else on the CPU: ONNX Runtime on an fp32 graph)


def checkpoint_of(metadata: OnnxMetadata, preset: ModelPreset, weights: str | Path | None) -> Path | None:
    """The checkpoint folder the models load: the one given, else the package's own (wan2.1-demo), else none."""
    if weights is not None:
        path = Path(weights).resolve()
        if not path.is_dir():
            raise SaexportError(f"weights path {path} is not a checkpoint folder")
        return path
    if metadata.random_weights or preset.bundled_weights is None or not preset.bundled_weights.is_dir():
        return None
    return preset.bundled_weights.resolve()


DIT_BACKENDS = ("tensorrt", "torch", "onnxruntime")


def plan_repository(onnx_path: Path, metadata: OnnxMetadata, engine_path: Path | None,
                    weights: str | Path | None, dit: str | None = None) -> RepositoryPlan:
    """`dit`: the DiT's back end; None: the engine where one is given, else ONNX Runtime for an fp32 graph (on the
    CPU) and torch for fp16/bf16 ones. ONNX Runtime serves fp16/bf16 graphs on the GPU (its CUDA provider)."""
    preset = get_preset(metadata.model)
    checkpoint = checkpoint_of(metadata, preset, weights)
    if dit is not None and dit not in DIT_BACKENDS:
        raise SaexportError(f"unknown DiT back end {dit!r}; use one of {', '.join(DIT_BACKENDS)}")
    if dit == "tensorrt" and engine_path is None:
        raise SaexportError("the tensorrt DiT needs its engine (`engine_path`)")
    if engine_path is not None and dit not in (None, "tensorrt"):
        raise SaexportError(f"an engine is served by TensorRT, not {dit}: give one or the other")
    if dit == "torch" and metadata.dtype == "fp32":
        raise SaexportError(f"{onnx_path} is an fp32 graph: the torch DiT serves fp16/bf16 graphs on the GPU (export "
                            "in bf16, or serve this one in onnxruntime)")
    if engine_path is not None:
        # An engine is served only with the metadata `saexport engine` wrote beside it, built from this graph.
        built = EngineMetadata.read(ArtifactFolder(Path(engine_path).parent).engine_metadata).onnx
        if not Path(engine_path).is_file() or built != metadata:
            raise SaexportError(f"{engine_path} is not an engine built from {onnx_path} (its engine.json names another "
                                "graph, or the file is missing): build it with `saexport engine` from this graph")
        dit = "tensorrt"
    elif dit is None and metadata.dtype == "fp32":
        dit = "onnxruntime"
    elif dit != "onnxruntime":
        fallback = "give it an engine (`engine_path`), serve it in onnxruntime on the GPU (`dit`), or export it in fp32"
        if metadata.random_weights:
            raise SaexportError(f"{onnx_path} is a {metadata.dtype} graph of random weights: without an engine its DiT "
                                "runs in torch on the GPU from the checkpoint it was exported from, and random weights "
                                f"have none; {fallback}")
        if checkpoint is None:
            raise SaexportError(f"{onnx_path} is a {metadata.dtype} graph: without an engine its DiT runs in torch on "
                                "the GPU from the checkpoint it was exported from; give that checkpoint "
                                f"(`weights`), or {fallback}")
        check_config_matches(preset, detect_layout(checkpoint).config, str(checkpoint))
        dit = "torch"
    from saexport.runtime.ort_session import graph_device  # onnxruntime loads only where a repository is planned

    gpu = dit != "onnxruntime" or graph_device(metadata.dtype).type == "cuda"
    text_encoder = None
    if checkpoint is not None and has_text_encoder(checkpoint):
        text_encoder = "word" if is_word_encoder(checkpoint) else "umt5"
    if preset.codec.name == "pixels":
        vae = "pixels"
    else:
        vae = "wan-vae" if checkpoint is not None and (checkpoint / "vae" / "config.json").is_file() else None
    return RepositoryPlan(dit, text_encoder, vae, checkpoint, gpu)


def write_triton_repository(
    onnx_path: str | Path,
    out: Output,
    name: str,
    engine_path: str | Path | None = None,
    gpus: list[int] | None = None,
    weights: str | Path | None = None,
    dit: str | None = None,
) -> Path:
    """Write the repository atomically (a staging folder swapped into place). `weights`: the checkpoint folder the
    graph was exported from (text encoder, VAE, and the torch DiT load it from there); without it, the package's
    own checkpoint where the model ships one. `dit`: the DiT's back end (`plan_repository`). The sampler's step
    count and flow shift come from the graph's metadata: the budgets frozen into it were made for that many steps.
    A file of the old repository edited since it was written (a hand-tuned `config.pbtxt`) refuses the
    replacement, unless `out.overwrite`."""
    onnx_path, out_dir, overwrite = Path(onnx_path), Path(out.path), out.overwrite
    engine_path = Path(engine_path) if engine_path is not None else None
    sources = [onnx_path, *([engine_path] if engine_path is not None else [])]
    check_replaceable_folder(out_dir, "triton", sources, overwrite=overwrite)  # before anything is read or written
    metadata = OnnxMetadata.read(onnx_path)
    plan = plan_repository(onnx_path, metadata, engine_path, weights, dit)
    if plan.checkpoint is not None:
        sources.append(plan.checkpoint)
        check_output_folder(out_dir, "triton", sources)  # the swap must never take the checkpoint with it
    inputs, outputs = graph_io(onnx_path)
    latents = outputs[0]
    if latents.dims[0] != 1:
        raise SaexportError("the Triton pipeline serves graphs of batch 1 (guidance runs two passes)")
    text_spec = next(s for s in inputs if s.name == "encoder_hidden_states")
    artifacts = _torch_artifacts(onnx_path, metadata) if plan.dit == "torch" else None
    names = {part: f"{name}_{part}" for part in ("text_encoder", "dit", "vae", "pipeline")}
    if plan.text_encoder is None:
        log.warning("note: %s has no text encoder here (random weights, or no text_encoder/): %s takes prompt "
                    "embeddings, not prompts", metadata.model, names["pipeline"])
    if plan.vae is None:
        log.warning("note: no VAE (the checkpoint's vae/ folder): %s answers latents, not frames", names["pipeline"])
    frames = Spec("frames", "uint8", (metadata.frames, metadata.height, metadata.width, 3))

    # Built beside the target and swapped in: the old repository stays whole until the new one is complete, and
    # only a folder this command wrote (marked as the triton repository's) is ever replaced.
    with staged_folder(out_dir, "triton", sources, overwrite=overwrite) as staging:
        writer = _Writer(staging, names, plan, metadata, ("KIND_GPU", tuple(gpus or ())) if plan.gpu
                         else ("KIND_CPU", ()))
        configs = [writer.text_encoder(text_spec), writer.dit(onnx_path, engine_path, inputs, outputs, artifacts),
                   writer.vae(latents, frames)]
        request = pipeline_inputs(plan.text_encoder is not None, text_spec.dims[1:])
        response = frames if plan.vae is not None else Spec("latents", "fp32", latents.dims)
        configs.append(writer.pipeline(request, response, latents, inputs[0].dtype))
        for config in filter(None, configs):
            text = config.text()
            validate_config(text)
            (staging / config.name / "config.pbtxt").write_text(text)
        readme = _readme(names, plan, metadata, text_spec.dims[1:], request, response, gpus)
        report = ArtifactFolder(onnx_path.parent).fidelity_report
        if report.is_file():  # what the budgets frozen into the graph deliver, measured by the build
            readme += f"\n## Fidelity\n\n{FidelityReport.read(report).summary()} (`fidelity.json`).\n"
            FidelityReport.read(report).write(staging / "fidelity.json")
        (staging / "README.md").write_text(readme)
    return out_dir


@dataclass(frozen=True)
class _Writer:
    """Writes each model's version folder into the staging repository and returns its config."""

    staging: Path
    names: dict[str, str]
    plan: RepositoryPlan
    metadata: OnnxMetadata
    gpu_group: tuple[str, tuple[int, ...]]

    def version(self, part: str) -> Path:
        folder = self.staging / self.names[part] / "1"
        folder.mkdir(parents=True)
        return folder

    def text_encoder(self, text_spec: Spec) -> ModelConfig | None:
        """`<name>_text_encoder`: prompts -> embeddings (UMT5 in bf16 on the GPU, or the demo's words)."""
        plan = self.plan
        if plan.text_encoder is None:
            return None
        folder = self.version("text_encoder")
        on_gpu = plan.text_encoder == "umt5" and plan.gpu
        _write_json(folder / "text_encoder.json", {
            "kind": plan.text_encoder, "checkpoint": str(plan.checkpoint), "text_len": text_spec.dims[1],
            "text_dim": text_spec.dims[2], "dtype": "bf16" if on_gpu else "fp32"})
        _copy_model_py("text_encoder_model.py", folder)
        return ModelConfig(self.names["text_encoder"], [Spec("prompt", "string", (-1,))],
                           [Spec("embeddings", "fp32", (-1, *text_spec.dims[1:]))], warmup=True,
                           group=self.gpu_group if on_gpu else ("KIND_CPU", ()))

    def dit(self, onnx_path: Path, engine_path: Path | None, inputs: list[Spec], outputs: list[Spec],
            artifacts: tuple[Path, Path] | None) -> ModelConfig:
        """`<name>_dit`: the engine, or the torch DiT (bf16/fp16 graph), or the graph in ONNX Runtime (fp32 on the
        CPU, fp16/bf16 on the GPU)."""
        plan, metadata, name = self.plan, self.metadata, self.names["dit"]
        folder = self.version("dit")
        if plan.dit == "tensorrt":
            shutil.copy2(engine_path, folder / "model.plan")
            return ModelConfig(name, inputs, outputs, platform="tensorrt_plan", group=self.gpu_group, warmup=True)
        settings = {"backend": plan.dit, "steps": metadata.steps, "inputs": [s.to_json() for s in inputs],
                    "output": outputs[0].to_json()}
        parameters = None
        if plan.dit == "torch":
            topology, budgets = artifacts
            shutil.copy2(topology, ArtifactFolder(folder).topology)
            shutil.copy2(budgets, ArtifactFolder(folder).budgets)
            library = next((p.resolve() for p in kernels.library_candidates() if p.is_file()), None)
            settings.update(checkpoint=str(plan.checkpoint), dtype=metadata.dtype, block_size=metadata.block_size,
                            head_dim=get_preset(metadata.model).head_dim,
                            kernel_library=str(library) if library else None,
                            compile=True)  # on a GPU: 1.3-1.5x faster than eager at 30% (docs/BENCHMARKS.md)
            parameters = {CPU_ONLY_INPUTS: "no"}
        else:
            settings["device"] = "cuda" if plan.gpu else "cpu"
            for file in onnx_path.parent.glob(onnx_path.name + "*"):  # model.onnx and model.onnx.data
                shutil.copy2(file, folder / file.name)
        _write_json(folder / "dit.json", settings)
        _copy_model_py("dit_model.py", folder)
        return ModelConfig(name, inputs, outputs, group=self.gpu_group, warmup=True, parameters=parameters)

    def vae(self, latents: Spec, frames: Spec) -> ModelConfig | None:
        """`<name>_vae`: latents -> frames (Wan's VAE on the GPU, tiled; or the demo's pixels)."""
        plan = self.plan
        if plan.vae is None:
            return None
        folder = self.version("vae")
        on_gpu = plan.vae == "wan-vae" and plan.gpu
        _write_json(folder / "vae.json", {
            "codec": plan.vae, "vae": str(plan.checkpoint / "vae") if plan.vae == "wan-vae" else None,
            "input": Spec("latents", "fp32", latents.dims).to_json(), "output": frames.to_json()})
        _copy_model_py("vae_model.py", folder)
        return ModelConfig(self.names["vae"], [Spec("latents", "fp32", latents.dims)], [frames], warmup=True,
                           parameters={CPU_ONLY_INPUTS: "no"} if on_gpu else None,
                           group=self.gpu_group if on_gpu else ("KIND_CPU", ()))

    def pipeline(self, request: list[Spec], response: Spec, latents: Spec, dtype: str) -> ModelConfig:
        """`<name>_pipeline` (BLS): the sampler loop over the other three."""
        plan, names, metadata = self.plan, self.names, self.metadata
        folder = self.version("pipeline")
        _write_json(folder / "pipeline.json", {
            "text_encoder_model": names["text_encoder"] if plan.text_encoder else None, "dit_model": names["dit"],
            "vae_model": names["vae"] if plan.vae else None, "steps": metadata.steps,
            "flow_shift": flow_shift_for(metadata.height), "latent_shape": list(latents.dims[1:]),
            "dtype": dtype, "inputs": [s.to_json() for s in request], "output": response.to_json()})
        _copy_model_py("pipeline_model.py", folder)
        # No warm-up request: it would run a whole generation through models that may not be loaded yet. The
        # three models it calls are warmed up.
        return ModelConfig(names["pipeline"], request, [response], group=self.gpu_group)


def _torch_artifacts(onnx_path: Path, metadata: OnnxMetadata) -> tuple[Path, Path]:
    """The topology and budgets the graph froze (beside it, as `export` and `build` write them), checked by hash."""
    folder = ArtifactFolder(onnx_path.parent)
    for path, kind, loader, expected in ((folder.topology, "topology", Topology, metadata.topology_hash),
                                         (folder.budgets, "budgets", Budgets, metadata.budgets_hash)):
        if not path.is_file():
            raise SaexportError(f"the torch DiT needs the {kind} the graph froze: {path} is missing (export again)")
        if loader.load(path).hash() != expected:
            raise SaexportError(f"{path} is not the {kind} {onnx_path} was exported with: export again")
    return folder.topology, folder.budgets


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")


def _copy_model_py(source: str, version: Path) -> None:
    text = resources.files("saexport.triton.models").joinpath(source).read_text()
    (version / "model.py").write_text(text)


def _dims(spec: Spec) -> str:
    dims = ", ".join("n" if d < 0 else str(d) for d in spec.dims)
    return f"{TRITON_TYPES[spec.dtype].removeprefix('TYPE_')} [{dims}]"


def _readme(names: dict[str, str], plan: RepositoryPlan, metadata: OnnxMetadata, text_dims: tuple[int, ...],
            request: list[Spec], response: Spec, gpus: list[int] | None) -> str:
    """The repository's README: what each model does, how to start the server, how to call the pipeline."""
    lines = _readme_models(names, plan, metadata, text_dims, request, response, gpus)
    lines += _readme_server(plan)
    lines += _readme_client(names, plan, metadata, request, response)
    return "\n".join(lines)


def _readme_models(names: dict[str, str], plan: RepositoryPlan, metadata: OnnxMetadata, text_dims: tuple[int, ...],
                   request: list[Spec], response: Spec, gpus: list[int] | None) -> list[str]:
    where = f"one instance on each of the GPUs {gpus}" if gpus else "one instance on each GPU"
    dit = {
        "tensorrt": "the TensorRT plan (`model.plan`) with the `BlockSparseAttention` plugin, " + where,
        "torch": ("the sparse DiT in PyTorch (`SparseWanDiT`, " + metadata.dtype + ") on the GPU, " + where + ", "
                  "through `torch.compile` (`\"compile\": true` in `dit.json`, false serves it eagerly; the warm-up "
                  "request at load pays for the compilation, a minute or more): attention runs the CUDA kernel library "
                  "(`libsaexport_kernels.so`: `dit.json` names the one found when this repository was written; "
                  "`SAEXPORT_KERNEL_LIBRARY` overrides it; without it the slow "
                  "reference runs, said in the server log). The topology and budgets are copied beside "
                  "`dit.json`; the checkpoint is not"),
        "onnxruntime": ((f"the exported {metadata.dtype} graph in ONNX Runtime's CUDA execution provider "
                         "(onnxruntime-gpu), " + where) if plan.gpu else
                        "the exported fp32 graph in ONNX Runtime on the CPU (a correctness back end; export fp16 or "
                        "bf16 for the GPU)") + "; the block-sparse node runs the project's custom-op library, "
                       "`libsaexport_ort_ops.so` (`SAEXPORT_ORT_OPS_LIBRARY` names it, else the checkout's build/)",
    }[plan.dit]
    lines = [f"# Triton model repository: {names['pipeline'].removesuffix('_pipeline')}", ""]
    lines.append(f"Model `{metadata.model}`, {metadata.width}x{metadata.height}, {metadata.frames} frames, "
                 f"{metadata.steps} sampler steps (the budgets' count: the only one the pipeline accepts), fidelity "
                 f"`{metadata.fidelity}` ({metadata.mean_density:.0%} of attention blocks kept on average).")
    lines.append("")
    if plan.text_encoder is not None:
        kind = ("UMT5 (`text_encoder/` + `tokenizer/` of the checkpoint), " +
                ("bf16 on the GPU" if plan.gpu else "fp32 on the CPU") if plan.text_encoder == "umt5"
                else "the demo model's word encoder, on the CPU")
        lines.append(f"- `{names['text_encoder']}`: `prompt` STRING [n] -> `embeddings` FP32 [n, "
                     f"{', '.join(map(str, text_dims))}], {kind}; zeros past each prompt's "
                     "end.")
    lines.append(f"- `{names['dit']}`: one DiT pass (`hidden_states`, `timestep`, `encoder_hidden_states`, "
                 f"`step_index` -> `noise_pred`): {dit}. `step_index` must be in [0, {metadata.steps}).")
    if plan.vae is not None:
        kind = (("diffusers `AutoencoderKLWan` (the checkpoint's `vae/`), fp32, tiled, " +
                 ("on the GPU" if plan.gpu else "on the CPU")) if plan.vae == "wan-vae"
                else "the demo model's pixel codec (its latents are the pixels), on the CPU")
        lines.append(f"- `{names['vae']}`: `latents` FP32 -> `frames` UINT8 [frames, height, width, 3]: {kind}.")
    lines.append(f"- `{names['pipeline']}` (BLS): "
                 + ", ".join(f"`{s.name}` {_dims(s)}" + (" (optional)" if s.optional else "") for s in request)
                 + f" -> `{response.name}` {_dims(response)}: THE sampler loop of saexport (UniPC, classifier-free "
                 f"guidance in two passes a step), calling `{names['dit']}` per pass"
                 + (f", `{names['text_encoder']}` for the prompts" if plan.text_encoder else "")
                 + (f" and `{names['vae']}` for the frames" if plan.vae else "") + ".")
    lines.append("")
    lines.append("Every model checks its inputs (dtypes, shapes, ranges) before it runs and answers a bad request "
                 "with an error response, then keeps serving. The text encoder, DiT and VAE are warmed up at load "
                 "(`model_warmup`: one zero request per instance).")
    lines.append("")
    if plan.checkpoint is not None:
        lines.append(f"The checkpoint is referenced, not copied (its weights are gigabytes): `{plan.checkpoint}` "
                     "(the `checkpoint` / `vae` paths in the models' json files). Keep it there, or edit those "
                     "paths, on the serving machine.")
        lines.append("")
    return lines


def _readme_server(plan: RepositoryPlan) -> list[str]:
    lines = []
    if plan.dit == "tensorrt":
        lines += ["Start the server with the plugin loaded (the plan's `BlockSparseAttention` layers need it):", "",
                  "    tritonserver --model-repository . "
                  "--backend-config=tensorrt,plugins=/path/libsaexport_trt_plugin.so",
                  "    # or: LD_PRELOAD=/path/libsaexport_trt_plugin.so tritonserver --model-repository .", ""]
    else:
        lines += ["Start the server (no TensorRT plugin: the DiT is a Python-backend model; to serve a TensorRT "
                  "engine instead, write the repository again with `--engine model.engine` and load the plugin with "
                  "`--backend-config=tensorrt,plugins=/path/libsaexport_trt_plugin.so` or `LD_PRELOAD`):", "",
                  "    tritonserver --model-repository .", ""]
    return lines + ["The Python-backend models import `saexport` (and torch, diffusers, transformers): start the "
                    "server with it on `PYTHONPATH`, in the Python environment whose `triton_python_backend_stub` "
                    "the server uses.", ""]


def _readme_client(names: dict[str, str], plan: RepositoryPlan, metadata: OnnxMetadata, request: list[Spec],
                   response: Spec) -> list[str]:
    lines = ["Calling the pipeline with tritonclient:", "",
              "    import numpy as np, tritonclient.http as http",
              '    client = http.InferenceServerClient("127.0.0.1:8000")',
              "    def tensor(name, value, dtype):",
              "        t = http.InferInput(name, list(value.shape), dtype); t.set_data_from_numpy(value); return t"]
    if plan.text_encoder is not None:
        lines += ['    inputs = [tensor("prompt", np.array(["a red circle moving right"], dtype=object), "BYTES"),',
                  '              tensor("negative_prompt", np.array([""], dtype=object), "BYTES"),  # optional']
    else:
        lines += ['    inputs = [tensor("prompt_embeds", embeddings, "FP32"),  # float32 '
                  f'[{", ".join(map(str, request[0].dims))}] text-encoder output',
                  '              tensor("negative_embeds", negative, "FP32"),  # optional']
    lines += ['              tensor("seed", np.array([0], np.int64), "INT64"),',
              f'              tensor("steps", np.array([{metadata.steps}], np.int32), "INT32"),  # optional',
              '              tensor("guidance_scale", np.array([5.0], np.float32), "FP32")]  # optional',
              f'    result = client.infer("{names["pipeline"]}", inputs)',
              f'    {response.name} = result.as_numpy("{response.name}")  # {_dims(response)}',
              "", "A bad request raises `tritonclient.utils.InferenceServerException` with the model's message.", ""]
    return lines
