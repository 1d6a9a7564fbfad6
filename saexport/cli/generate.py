"""`saexport generate`: Wan2.1's sampler loop over a back end, from an artifact folder to latents or a video."""

from __future__ import annotations

from pathlib import Path

import click

from saexport.cli.options import DTYPE_NAMES, clear_errors, model_options, overwrite_option


@click.command()
@model_options
@click.option("--artifacts", required=True, type=click.Path(path_type=Path),
              help="A build or export folder (topology, budgets, model.onnx, and model.engine where built).")
@click.option("--backend", type=click.Choice(["torch", "onnxruntime", "tensorrt"]), default="torch", show_default=True)
@click.option("--plugin", "plugin_library", type=click.Path(path_type=Path), help="Plugin library (tensorrt).")
@click.option("--embeddings", "embeddings_path", type=click.Path(path_type=Path),
              help="safetensors: `embeddings` [1, text_len, text_dim] (the prompt); synthetic if absent.")
@click.option("--negative", "negative_path", type=click.Path(path_type=Path),
              help="safetensors: `embeddings` of the negative prompt; the empty prompt if absent.")
@click.option("--prompt", help="Prompt text, encoded by the checkpoint's text encoder (UMT5, or the demo's words).")
@click.option("--negative-prompt", default="", help="Negative prompt text (with --prompt).")
@click.option("--steps", type=click.IntRange(min=1), help="Sampler steps (must be the budgets' steps).")
@click.option("--guidance", default=5.0, show_default=True, help="Classifier-free guidance scale.")
@click.option("--sample-seed", default=0, show_default=True, help="Seed of the initial noise.")
@click.option("--vae", "vae_path", type=click.Path(path_type=Path),
              help="AutoencoderKLWan folder, for .gif/.mp4 of a Wan2.1 model (the demo model's latents are pixels).")
@click.option("--upscale", default=1, show_default=True, type=click.IntRange(min=1),
              help="Enlarge each frame N times (for tiny videos).")
@click.option("--dtype", "dtype_name", type=click.Choice(DTYPE_NAMES),
              help="Precision of the torch back end. Default: the model's on a GPU (bf16 for Wan2.1), fp32 on a CPU.")
@click.option("--compile", "compile_model", is_flag=True, help="torch.compile the DiT (torch back end, GPU).")
@click.option("--out", "out_path", required=True, type=click.Path(path_type=Path),
              help="latents.safetensors, or video.gif / video.mp4.")
@overwrite_option
@clear_errors
def generate(model, weights, random_weights, seed, artifacts, backend, plugin_library, embeddings_path,
             negative_path, prompt, negative_prompt, steps, guidance, sample_seed, vae_path, upscale, dtype_name,
             compile_model, out_path, overwrite) -> None:
    """Run Wan2.1's sampler loop (UniPC, guidance) on a back end; write latents or a video."""
    from saexport.runtime.generation import generate as run_generation

    model_given = click.get_current_context().get_parameter_source("model") != click.core.ParameterSource.DEFAULT
    run_generation(artifacts, out_path, backend, model=model if model_given else None, weights=weights,
                   random_weights=random_weights, seed=seed, dtype=dtype_name, plugin=plugin_library, prompt=prompt,
                   negative_prompt=negative_prompt, embeddings_file=embeddings_path, negative_file=negative_path,
                   steps=steps, guidance=guidance, sample_seed=sample_seed, vae=vae_path, upscale=upscale,
                   compile_model=compile_model, overwrite=overwrite)
    click.echo(f"wrote {out_path}")
