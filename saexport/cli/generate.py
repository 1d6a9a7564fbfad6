"""`saexport generate`: Wan2.1's sampler loop over a back end, from an artifact folder to latents or a video."""

from __future__ import annotations

from pathlib import Path

import click

from saexport.cli.options import (
    DTYPE_NAMES,
    OptionGroup,
    check_device,
    clear_errors,
    model_group,
    output_group,
    was_given,
)
from saexport.errors import SaexportError


def _backend(backend: str, plugin_library: Path | None, dtype_name: str | None, compile_model: bool,
             device: str | None, ulysses: int, cfg_parallel: bool):
    from saexport.runtime.generation import BackendOptions

    if plugin_library is not None and backend != "tensorrt":
        raise SaexportError("--plugin is for --backend tensorrt")
    if (dtype_name is not None or compile_model) and backend != "torch":
        raise SaexportError("--dtype and --compile are for --backend torch")
    if device is not None and backend == "tensorrt":
        raise SaexportError("--device is for --backend torch and onnxruntime (TensorRT runs on the GPU)")
    return backend, BackendOptions(dtype_name, plugin_library, compile_model, ulysses, cfg_parallel,
                                   None if device is None else check_device(device))


backend_group = OptionGroup("backend", (
    click.option("--backend", type=click.Choice(["torch", "onnxruntime", "tensorrt"]), default="torch",
                 show_default=True),
    click.option("--plugin", "plugin_library", type=click.Path(path_type=Path), help="Plugin library (tensorrt)."),
    click.option("--dtype", "dtype_name", type=click.Choice(DTYPE_NAMES),
                 help="Precision of the torch back end. Default: the model's on a GPU (bf16 for Wan2.1), fp32 on a "
                      "CPU."),
    click.option("--compile", "compile_model", is_flag=True, help="torch.compile the DiT (torch back end, GPU)."),
    click.option("--device", help="cpu, cuda or cuda:N (torch and onnxruntime back ends). Default: torch on the GPU "
                                  "where there is one; onnxruntime on the CPU for an fp32 graph, on the GPU (its CUDA "
                                  "execution provider, onnxruntime-gpu) for fp16 and bf16 ones."),
    click.option("--ulysses", default=1, show_default=True, type=click.IntRange(min=1),
                 help="Ranks of sequence parallelism (torch back end, under `torchrun --nproc-per-node N`)."),
    click.option("--cfg-parallel", is_flag=True,
                 help="The guided step's two passes on two rank groups (x 2 ranks; torch back end, torchrun)."),
), _backend)


def _request(prompt, negative_prompt, embeddings_file, negative_file, guidance, seed):
    from saexport.runtime.generation import GenerationRequest

    return GenerationRequest(prompt, negative_prompt, embeddings_file, negative_file, guidance, seed)


request_group = OptionGroup("request", (
    click.option("--prompt", help="Prompt text, encoded by the checkpoint's text encoder (UMT5, or the demo's "
                                  "words)."),
    click.option("--negative-prompt", default="", help="Negative prompt text (with --prompt)."),
    click.option("--embeddings", "embeddings_file", type=click.Path(path_type=Path),
                 help="safetensors: `embeddings` [1, text_len, text_dim] (the prompt); synthetic if absent."),
    click.option("--negative", "negative_file", type=click.Path(path_type=Path),
                 help="safetensors: `embeddings` of the negative prompt; the empty prompt if absent."),
    click.option("--guidance", default=5.0, show_default=True, help="Classifier-free guidance scale."),
    click.option("--seed", default=0, show_default=True, help="Seed of the initial noise: which video."),
), _request)


@click.command()
@model_group
@click.option("--artifacts", required=True, type=click.Path(path_type=Path),
              help="A build or export folder (topology, budgets, model.onnx, and model.engine where built).")
@backend_group
@request_group
@click.option("--steps", type=click.IntRange(min=1), help="Sampler steps (must be the budgets' steps).")
@click.option("--vae", "vae_path", type=click.Path(path_type=Path),
              help="AutoencoderKLWan folder, for .gif/.mp4 of a Wan2.1 model (the demo model's latents are pixels).")
@click.option("--upscale", default=1, show_default=True, type=click.IntRange(min=1),
              help="Enlarge each frame N times (for tiny videos).")
@output_group("latents.safetensors, or video.gif / video.mp4.")
@clear_errors
def generate(source, artifacts, backend, request, steps, vae_path, upscale, out) -> None:
    """Run Wan2.1's sampler loop (UniPC, guidance) on a back end; write latents or a video."""
    from dataclasses import replace

    from saexport.artifacts import ArtifactFolder, Topology
    from saexport.runtime.generation import SparsePipeline, check_generation_target, generate
    from saexport.runtime.parallel.launch import writes_outputs

    model = Topology.load(ArtifactFolder(artifacts).topology).model
    if was_given("model") and source.model != model:
        raise SaexportError(f"the artifacts are for {model}, not --model {source.model}")
    source = replace(source, model=model)
    inputs = [*request.files(), *([source.weights] if source.weights is not None else [])]
    check_generation_target(out, artifacts, inputs, vae_path, upscale)
    backend_name, options = backend
    pipeline = SparsePipeline(artifacts, backend_name, source, options, vae_path)
    if steps is not None and steps != pipeline.steps:
        raise SaexportError(f"the budgets are for {pipeline.steps} steps; sample with --steps {pipeline.steps} or "
                            "rerun `saexport budgets` for this step count")
    generate(pipeline, request, out, upscale)
    if writes_outputs():  # rank 0 of a torchrun launch, or the only process
        click.echo(f"wrote {out.path}")
