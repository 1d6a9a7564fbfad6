"""`saexport`: small subcommands over composable loaders (models, topology, export)."""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from pathlib import Path

import click
import torch

from saexport.errors import SaexportError
from saexport.exporter.layout import parse_layout
from saexport.exporter.video_shape import parse_video_shape
from saexport.models.checkpoint import DTYPES, LoadedModel, load_model, parse_dtype
from saexport.models.presets import PRESETS, RunDefaults, get_preset
from saexport.topology.files import Budgets, Topology
from saexport.topology.standin import standin_budgets, standin_topology

DEFAULT_MODEL = "wan2.1-demo"


def _clear_errors(command: Callable) -> Callable:
    """Bad input ends with `error: <what and how to fix it>` and exit status 2, not a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except SaexportError as e:
            raise click.ClickException(str(e)) from None

    return wrapper


class _Stage:
    """Prints `name ...` then `done in N s`: every long step says what it is doing."""

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        click.echo(f"[saexport] {self.name} ...", err=True)
        self.start = time.perf_counter()

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            click.echo(f"[saexport] {self.name}: done in {time.perf_counter() - self.start:.1f} s", err=True)


def model_options(command: Callable) -> Callable:
    command = click.option("--model", default=DEFAULT_MODEL, show_default=True,
                           type=click.Choice(list(PRESETS)), help="Architecture preset.")(command)
    command = click.option("--weights", type=click.Path(path_type=Path),
                           help="Checkpoint folder (diffusers or original Wan layout); wan2.1-demo's ships with "
                                "saexport.")(command)
    command = click.option("--random-weights", is_flag=True,
                           help="Random weights, for benchmarks only (marked in every artifact).")(command)
    command = click.option("--seed", default=0, show_default=True, help="Seed of --random-weights.")(command)
    return command


PRESET_DEFAULT = "Default: the model's (see `saexport models`)."


def video_options(command: Callable) -> Callable:
    command = click.option("--resolution", help=f"480p, 720p or WIDTHxHEIGHT. {PRESET_DEFAULT}")(command)
    return click.option("--frames", type=int, help=f"Video frames (4k+1 with Wan's VAE). {PRESET_DEFAULT}")(command)


def block_options(command: Callable) -> Callable:
    command = click.option("--block-size", type=int, help=f"Attention block size. {PRESET_DEFAULT}")(command)
    return click.option("--layout", help=f"identity, tile3d or tile3d:FxHxW. {PRESET_DEFAULT}")(command)


def _preset_defaults(model: str, **given) -> RunDefaults:
    """The model's run defaults, overridden by the options the user gave (those not None)."""
    return dataclasses.replace(get_preset(model).defaults, **{k: v for k, v in given.items() if v is not None})


def _load(model: str, weights: Path | None, random_weights: bool, seed: int, dtype: torch.dtype) -> LoadedModel:
    with _Stage(f"loading {model}"):
        loaded = load_model(model, weights, dtype=dtype, random_weights=random_weights, seed=seed)
    if loaded.random_weights:
        click.secho(f"WARNING: {model} has RANDOM WEIGHTS (seed {seed}): for speed measurements only; "
                    "its outputs are noise.", fg="yellow", err=True)
    return loaded


@click.group()
@click.version_option()
def main() -> None:
    """Export Wan2.1 with ScalingAttention block-sparse attention to ONNX, TensorRT and Triton."""


@main.command()
def models() -> None:
    """List the architecture presets."""
    for preset in PRESETS.values():
        c = preset.config
        d = preset.defaults
        click.echo(f"{preset.name:14s} {c['num_layers']:3d} layers {c['num_attention_heads']:3d} heads x "
                   f"{c['attention_head_dim']}  ffn {c['ffn_dim']:6d}  {preset.description}")
        click.echo(f"{'':14s} latents: {preset.codec.name}; defaults: {d.resolution} x {d.frames} frames, blocks of "
                   f"{d.block_size}, layout {d.layout}, {d.steps} steps, {d.dtype}"
                   + ("; weights ship with saexport" if preset.bundled_weights else ""))


@main.command()
@model_options
@video_options
@click.option("--dtype", "dtype_name", type=click.Choice(list(DTYPES)), help=f"Precision. {PRESET_DEFAULT}")
@click.option("--batch", default=1, show_default=True, help="Batch of the static graph.")
@click.option("--topology", "topology_path", type=click.Path(path_type=Path),
              help="topology.safetensors (default: a stand-in, until calibration has run).")
@click.option("--budgets", "budgets_path", type=click.Path(path_type=Path), help="budgets.safetensors.")
@click.option("--block-size", type=int, help=f"Block size of a stand-in topology. {PRESET_DEFAULT}")
@click.option("--layout", help=f"Token layout of a stand-in topology. {PRESET_DEFAULT}")
@click.option("--steps", type=int, help=f"Denoising steps of stand-in budgets. {PRESET_DEFAULT}")
@click.option("--density", default=0.3, show_default=True, help="Mean density of stand-in budgets.")
@click.option("--verify", is_flag=True, help="Run the ONNX in ONNX Runtime and compare with PyTorch (fp32).")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Output folder.")
@_clear_errors
def export(model, weights, random_weights, seed, resolution, frames, dtype_name, batch, topology_path,
           budgets_path, block_size, layout, steps, density, verify, out_dir) -> None:
    """Export the sparse DiT to OUT/model.onnx with one BlockSparseAttention node per layer."""
    from saexport.exporter.onnx_export import export_onnx

    d = _preset_defaults(model, resolution=resolution, frames=frames, dtype=dtype_name, block_size=block_size,
                         layout=layout, steps=steps)
    video = parse_video_shape(d.resolution, d.frames, get_preset(model).codec)
    dtype_name, block_size, layout, steps = d.dtype, d.block_size, d.layout, d.steps
    dtype = parse_dtype(dtype_name)
    if verify and dtype != torch.float32:
        raise SaexportError("--verify runs ONNX Runtime on the CPU: export with --dtype fp32")
    loaded = _load(model, weights, random_weights, seed, dtype)
    topology, budgets = _topology_and_budgets(loaded, video, topology_path, budgets_path, block_size,
                                              layout, steps, density, out_dir)
    with _Stage(f"exporting ONNX ({video.describe()}, grid {video.token_grid(loaded.preset.patch_size)}, "
                f"{dtype_name}, mean density {budgets.mean_density:.2f})"):
        exported = export_onnx(loaded, topology, budgets, video, out_dir, dtype, batch)
    click.echo(f"wrote {exported.path}")
    if verify:
        with _Stage("verifying in ONNX Runtime"):
            errors = _verify(loaded, topology, budgets, video, exported.path, batch)
        for step, err in errors.items():
            click.echo(f"step {step}: relative error ONNX Runtime vs PyTorch {err:.2e}")


def calibration_options(command: Callable) -> Callable:
    command = click.option("--prompts", default=4, show_default=True,
                           help="Calibration prompts (synthetic embeddings unless --calib-embeddings).")(command)
    command = click.option("--calib-embeddings", type=click.Path(path_type=Path),
                           help="safetensors: `embeddings` [prompts, text_len, text_dim] (e.g. UMT5 output).")(command)
    command = click.option("--seeds", default="0", show_default=True, help="Comma-separated latent seeds.")(command)
    command = click.option("--steps", type=int, help=f"Sampler steps of the trajectory. {PRESET_DEFAULT}")(command)
    command = click.option("--rows-per-block", default=16, show_default=True,
                           help="Query rows sampled per block.")(command)
    command = click.option("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                           show_default=True)(command)
    return command


def _embeddings(loaded: LoadedModel, prompts: int, calib_embeddings: Path | None,
                cache: Path) -> tuple[torch.Tensor, str]:
    from saexport.topology.calibration import calibration_set

    with _Stage("preparing the calibration prompts"):
        embeddings, source = calibration_set(loaded.preset, prompts, calib_embeddings, loaded.path, cache)
    if source == "synthetic":
        click.secho(f"note: {prompts} SYNTHETIC prompt embeddings (seeded normal): give --calib-embeddings, or a "
                    "checkpoint with text_encoder/, for real prompts", fg="yellow", err=True)
    else:
        click.echo(f"[saexport] calibration prompts: {source}", err=True)
    return embeddings, source


def _partial(out_path: Path) -> Path:
    """Where an interrupted calibration keeps its progress; rerunning the same command resumes from it."""
    return out_path.with_name(out_path.name + ".partial")


def _int_list(text: str, option: str = "--seeds") -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise SaexportError(f"{option} must be comma-separated integers, got '{text}'") from None


@main.command()
@model_options
@video_options
@block_options
@calibration_options
@click.option("--out", "out_path", required=True, type=click.Path(path_type=Path), help="topology.safetensors")
@_clear_errors
def topology(model, weights, random_weights, seed, resolution, frames, block_size, layout, prompts, calib_embeddings,
             seeds, steps, rows_per_block, device, out_path) -> None:
    """WEST: calibrate the dense model and write the per-head threshold map."""
    from saexport.engines.scheduler import flow_shift_for
    from saexport.topology.west import compute_topology

    d = _preset_defaults(model, resolution=resolution, frames=frames, block_size=block_size, layout=layout,
                         steps=steps)
    block_size, layout, steps = d.block_size, d.layout, d.steps
    video = parse_video_shape(d.resolution, d.frames, get_preset(model).codec)
    loaded = _load(model, weights, random_weights, seed, torch.float32)
    embeddings, source = _embeddings(loaded, prompts, calib_embeddings,
                                     out_path.with_name("calibration_embeddings.safetensors"))
    result = compute_topology(loaded, video.token_grid(loaded.preset.patch_size), block_size, parse_layout(layout),
                              embeddings, _int_list(seeds), steps, flow_shift_for(video.height), rows_per_block, device,
                              settings={"embeddings": source}, checkpoint_path=_partial(out_path))
    result.save(out_path)
    click.echo(f"wrote {out_path} (grid {result.grid}, {result.levels.shape[-1]} blocks per side)")


@main.command()
@click.option("--topology", "topology_path", required=True, type=click.Path(path_type=Path))
@click.option("--resolution", required=True, help="Target 480p, 720p or WIDTHxHEIGHT.")
@click.option("--frames", required=True, type=int, help="Target video frames.")
@click.option("--out", "out_path", required=True, type=click.Path(path_type=Path), help="topology.safetensors")
@_clear_errors
def transfer(topology_path, resolution, frames, out_path) -> None:
    """Derive a threshold map for another resolution from a computed one (min over covered block pairs)."""
    from saexport.models.presets import get_preset
    from saexport.topology.transfer import transfer_topology

    source = Topology.load(topology_path)
    preset = get_preset(source.model)
    grid = parse_video_shape(resolution, frames, preset.codec).token_grid(preset.patch_size)
    result = transfer_topology(source, grid)
    result.save(out_path)
    click.echo(f"wrote {out_path}: grid {source.grid} -> {grid} (budgets must be tuned on it: saexport budgets)")


@main.command()
@model_options
@click.option("--topology", "topology_path", required=True, type=click.Path(path_type=Path))
@click.option("--fidelity", type=click.Choice(["high", "medium", "low"]), default="high", show_default=True)
@calibration_options
@click.option("--out", "out_path", required=True, type=click.Path(path_type=Path), help="budgets.safetensors")
@_clear_errors
def budgets(model, weights, random_weights, seed, topology_path, fidelity, prompts, calib_embeddings, seeds, steps,
            rows_per_block, device, out_path) -> None:
    """FAST: measure fidelity per level along the trajectory and fit the preset's budgets."""
    from saexport.engines.scheduler import flow_shift_for
    from saexport.exporter.video_shape import video_of_grid
    from saexport.topology.fast import compute_fidelity, fit_budgets

    steps = _preset_defaults(model, steps=steps).steps
    topo = Topology.load(topology_path)
    loaded = _load(model, weights, random_weights, seed, torch.float32)
    topo.check_matches(loaded.preset.name, loaded.preset.config_hash(), topo.grid, topo.block_size)
    embeddings, _ = _embeddings(loaded, prompts, calib_embeddings,
                                out_path.with_name("calibration_embeddings.safetensors"))
    height = video_of_grid(topo.grid, loaded.preset.patch_size, loaded.preset.codec).height
    table = compute_fidelity(loaded, topo, embeddings, _int_list(seeds), steps, flow_shift_for(height), rows_per_block,
                             device, checkpoint_path=_partial(out_path))
    result = fit_budgets(topo, table, fidelity)
    result.save(out_path)
    click.echo(f"wrote {out_path}: {fidelity}, mean density {result.mean_density:.3f}, "
               f"mean fidelity {result.curve['mean_fidelity']:.3f}")


@main.command()
@click.option("--onnx", "onnx_path", required=True, type=click.Path(path_type=Path), help="model.onnx from export.")
@click.option("--plugin", "plugin_library", required=True, type=click.Path(path_type=Path),
              help="libsaexport_trt_plugin.so (the plugin_dynamic library with --version-compatible).")
@click.option("--workspace-gib", default=8.0, show_default=True)
@click.option("--timing-cache", type=click.Path(path_type=Path), help="Default: OUT/timing.cache, reused.")
@click.option("--version-compatible", is_flag=True, help="Version-compatible engine with the plugin serialized.")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path))
@_clear_errors
def engine(onnx_path, plugin_library, workspace_gib, timing_cache, version_compatible, out_dir) -> None:
    """Build a TensorRT engine (OUT/model.engine + engine.json) from the exported ONNX."""
    from saexport.engines.tensorrt_build import build_engine

    with _Stage("building the TensorRT engine"):
        path = build_engine(onnx_path, plugin_library, out_dir, workspace_gib, timing_cache, version_compatible)
    click.echo(f"wrote {path}")


@main.command()
@model_options
@click.option("--artifacts", required=True, type=click.Path(path_type=Path),
              help="Folder with topology/budgets.safetensors and model.onnx (and model.engine).")
@click.option("--backend", type=click.Choice(["torch", "onnxruntime", "tensorrt"]), default="torch", show_default=True)
@click.option("--plugin", "plugin_library", type=click.Path(path_type=Path), help="Plugin library (tensorrt).")
@click.option("--embeddings", "embeddings_path", type=click.Path(path_type=Path),
              help="safetensors: `embeddings` [1, text_len, text_dim] (the prompt); synthetic if absent.")
@click.option("--negative", "negative_path", type=click.Path(path_type=Path),
              help="safetensors: `embeddings` of the negative prompt; synthetic if absent.")
@click.option("--prompt", help="Prompt text, encoded by the checkpoint's text encoder (UMT5, or the demo's words).")
@click.option("--negative-prompt", default="", help="Negative prompt text (with --prompt).")
@click.option("--steps", type=int, help="Sampler steps (default: the budgets' steps).")
@click.option("--guidance", default=5.0, show_default=True, help="Classifier-free guidance scale.")
@click.option("--sample-seed", default=0, show_default=True, help="Seed of the initial noise.")
@click.option("--vae", "vae_path", type=click.Path(path_type=Path),
              help="AutoencoderKLWan folder, for .gif/.mp4 of a Wan2.1 model (the demo model's latents are pixels).")
@click.option("--upscale", default=1, show_default=True, help="Enlarge each frame N times (for tiny videos).")
@click.option("--dtype", "dtype_name", default="fp32", show_default=True, type=click.Choice(list(DTYPES)),
              help="Precision of the torch back end.")
@click.option("--out", "out_path", required=True, type=click.Path(path_type=Path),
              help="latents.safetensors, or video.gif / video.mp4.")
@_clear_errors
def generate(model, weights, random_weights, seed, artifacts, backend, plugin_library, embeddings_path,
             negative_path, prompt, negative_prompt, steps, guidance, sample_seed, vae_path, upscale, dtype_name,
             out_path) -> None:
    """Run Wan2.1's sampler loop (UniPC, guidance) on a back end; write latents or a video."""
    from safetensors.torch import save_file

    from saexport.engines.denoiser import OnnxRuntimeDenoiser, TensorRTDenoiser, TorchDenoiser
    from saexport.engines.sampler import sample
    from saexport.engines.scheduler import flow_shift_for
    from saexport.engines.video import latents_to_frames, write_video
    from saexport.exporter.video_shape import video_of_grid

    topo = Topology.load(artifacts / "topology.safetensors")
    budget = Budgets.load(artifacts / "budgets.safetensors")
    budget.check_matches(topo)
    preset = get_preset(topo.model)
    model_given = click.get_current_context().get_parameter_source("model") != click.core.ParameterSource.DEFAULT
    if preset.name != model and model_given:
        raise SaexportError(f"the artifacts are for {preset.name}, not --model {model}")
    video = video_of_grid(topo.grid, preset.patch_size, preset.codec)
    if weights is None and not random_weights:
        weights = preset.bundled_weights
    if backend == "torch":
        from saexport.exporter.sparse_dit import SparseWanDiT

        dtype = parse_dtype(dtype_name)
        loaded = _load(preset.name, weights, random_weights, seed, dtype)
        topo.check_matches(preset.name, preset.config_hash(), topo.grid, topo.block_size)
        if loaded.weights_id != topo.weights_id:
            raise SaexportError(f"the artifacts were made from weights {topo.weights_id[:16]}, these are "
                                f"{loaded.weights_id[:16]}: pass the same --weights (or --random-weights --seed)")
        sparse = SparseWanDiT(loaded.transformer, topo.grid, topo.layout, topo.levels, budget.levels, topo.block_size)
        denoiser = TorchDenoiser(sparse.to("cuda" if torch.cuda.is_available() else "cpu"), budget.steps)
    elif backend == "onnxruntime":
        denoiser = OnnxRuntimeDenoiser(artifacts / "model.onnx", budget.steps)
    else:
        if plugin_library is None:
            raise SaexportError("--backend tensorrt needs --plugin PATH/libsaexport_trt_plugin.so")
        denoiser = TensorRTDenoiser(artifacts / "model.engine", plugin_library, budget.steps)
    if prompt is not None:
        from saexport.models.text_encoder import encode_prompts

        if weights is None:
            raise SaexportError("--prompt needs --weights (a checkpoint with text_encoder/ and tokenizer/)")
        with _Stage("encoding the prompts with the checkpoint's text encoder"):
            text, negative = encode_prompts(weights, [prompt, negative_prompt], max_length=preset.text_len).split(1)
    else:
        text = _prompt_embeddings(embeddings_path, preset, seed=1)
        negative = _prompt_embeddings(negative_path, preset, seed=2)
    latents = sample(denoiser, text, negative, video.latent_shape(), steps or budget.steps,
                     flow_shift_for(video.height), sample_seed, guidance)
    if out_path.suffix == ".safetensors":
        from saexport.atomic import atomic_path

        with atomic_path(out_path) as tmp:
            save_file({"latents": latents.contiguous()}, str(tmp))
    else:
        write_video(latents_to_frames(preset.codec, latents, vae_path), out_path, scale=upscale)
    click.echo(f"wrote {out_path}")


def _prompt_embeddings(path: Path | None, preset, seed: int) -> torch.Tensor:
    from saexport.topology.calibration import calibration_embeddings, read_embeddings

    text_dim = preset.config["text_dim"]
    if path is None:
        click.secho("note: SYNTHETIC prompt embeddings (seeded normal); give --embeddings for a real prompt",
                    fg="yellow", err=True)
        return calibration_embeddings(preset.text_len, text_dim, 1, seed, torch.float32)
    embeddings = read_embeddings(path, text_dim)
    if embeddings.shape[0] != 1:
        raise SaexportError(f"{path}: one prompt expected, got {embeddings.shape[0]}")
    return embeddings


@main.command()
@click.option("--onnx", "onnx_path", required=True, type=click.Path(path_type=Path), help="model.onnx from export.")
@click.option("--engine", "engine_path", type=click.Path(path_type=Path),
              help="model.engine; without it the DiT runs the ONNX in ONNX Runtime (CPU).")
@click.option("--steps", required=True, type=int, help="Sampler steps (the budgets' steps).")
@click.option("--name", default="wan", show_default=True, help="Model name prefix.")
@click.option("--gpus", default="0", show_default=True, help="Comma-separated GPU ids of the instance group.")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path))
@_clear_errors
def triton(onnx_path, engine_path, steps, name, gpus, out_dir) -> None:
    """Write a Triton model repository: NAME_dit (TensorRT plan) and NAME_pipeline (BLS sampler loop)."""
    from saexport.engines.scheduler import flow_shift_for
    from saexport.engines.triton_repo import exported_video_height, write_triton_repository

    height = exported_video_height(onnx_path)
    repo = write_triton_repository(onnx_path, out_dir, name, steps, flow_shift_for(height), engine_path,
                                   _int_list(gpus, "--gpus"))
    click.echo(f"wrote {repo} (see {repo / 'README.md'})")


@main.command()
@model_options
@click.option("--fidelity", type=click.Choice(["high", "medium", "low"]), default="high", show_default=True)
@video_options
@click.option("--dtype", "dtype_name", type=click.Choice(list(DTYPES)), help=f"Precision. {PRESET_DEFAULT}")
@block_options
@calibration_options
@click.option("--plugin", "plugin_library", type=click.Path(path_type=Path),
              help="libsaexport_trt_plugin.so, for the engine stage.")
@click.option("--triton-name", default="wan", show_default=True)
@click.option("--gpus", default="0", show_default=True, help="GPU ids of the Triton instance group.")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path))
@_clear_errors
def build(model, weights, random_weights, seed, fidelity, resolution, frames, dtype_name, block_size, layout, prompts,
          calib_embeddings, seeds, steps, rows_per_block, device, plugin_library, triton_name, gpus, out_dir) -> None:
    """topology -> budgets -> export -> engine -> Triton repository; reruns only what changed (OUT/build.json)."""
    from saexport.build import BuildSettings, run_build

    if random_weights:
        click.secho(f"WARNING: {model} has RANDOM WEIGHTS (seed {seed}): for speed measurements only.",
                    fg="yellow", err=True)
    d = _preset_defaults(model, resolution=resolution, frames=frames, dtype=dtype_name, steps=steps,
                         block_size=block_size, layout=layout)
    settings = BuildSettings(
        model=model, fidelity=fidelity, weights=str(weights) if weights else None, random_weights=random_weights,
        seed=seed, resolution=d.resolution, frames=d.frames, dtype=d.dtype, steps=d.steps, block_size=d.block_size,
        layout=d.layout, prompts=prompts, calib_embeddings=str(calib_embeddings) if calib_embeddings else None,
        seeds=tuple(_int_list(seeds)), rows_per_block=rows_per_block, device=device,
        plugin=str(plugin_library) if plugin_library else None, triton_name=triton_name,
        gpus=tuple(_int_list(gpus, "--gpus")))
    fates = run_build(settings, out_dir, echo=lambda line: click.echo(line, err=True))
    for stage, fate in fates.items():
        click.echo(f"{stage:9s} {fate}")


@main.command()
@click.option("--topology", "topology_path", required=True, type=click.Path(path_type=Path))
@click.option("--budgets", "budgets_path", required=True, type=click.Path(path_type=Path))
@click.option("--step", default=0, show_default=True, help="Denoising step of the mask picture.")
@click.option("--compare", "compare_path", type=click.Path(path_type=Path),
              help="Another topology (e.g. from other prompts): report the IoU of their masks.")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path))
@_clear_errors
def inspect(topology_path, budgets_path, step, compare_path, out_dir) -> None:
    """Pictures: OUT/masks.png, density.png, fidelity.png; and the IoU against --compare."""
    from saexport.topology.pictures import density_png, fidelity_png, mask_iou, masks_png

    topo, budget = Topology.load(topology_path), Budgets.load(budgets_path)
    budget.check_matches(topo)
    if not 0 <= step < budget.steps:
        raise SaexportError(f"--step must be in [0, {budget.steps})")
    masks_png(topo, budget, step, out_dir / "masks.png")
    density_png(topo, budget, out_dir / "density.png")
    written = ["masks.png", "density.png"] + (["fidelity.png"] if fidelity_png(budget, out_dir / "fidelity.png")
                                              else [])
    click.echo(f"wrote {', '.join(str(out_dir / name) for name in written)}")
    if compare_path is not None:
        other = Topology.load(compare_path)
        if (other.grid, other.block_size, other.layout) != (topo.grid, topo.block_size, topo.layout):
            raise SaexportError("--compare must be a topology of the same grid, block size and layout")
        click.echo(f"IoU of 30%-density masks against {compare_path}: {mask_iou(topo, other):.3f}")


def _topology_and_budgets(loaded, video, topology_path, budgets_path, block_size, layout, steps, density,
                          out_dir) -> tuple[Topology, Budgets]:
    if (topology_path is None) != (budgets_path is None):
        raise SaexportError("give --topology and --budgets together")
    if topology_path is not None:
        return Topology.load(topology_path), Budgets.load(budgets_path)
    click.secho("WARNING: no --topology given: using a STAND-IN topology and budgets (not calibrated; "
                "they keep the graph's shape, not the model's quality).", fg="yellow", err=True)
    grid = video.token_grid(loaded.preset.patch_size)
    topology = standin_topology(loaded.preset.name, loaded.preset.config_hash(), loaded.weights_id,
                                loaded.preset.num_layers, loaded.preset.num_heads, grid, block_size,
                                parse_layout(layout))
    budgets = standin_budgets(topology, steps, density)
    topology.save(out_dir / "topology.safetensors")
    budgets.save(out_dir / "budgets.safetensors")
    return topology, budgets


def _verify(loaded, topology, budgets, video, onnx_path, batch) -> dict[int, float]:
    from saexport.engines.ort_session import ort_session, run_dit
    from saexport.exporter.onnx_export import build_sparse_dit, example_inputs

    session = ort_session(onnx_path)
    module = build_sparse_dit(loaded, topology, budgets, video)
    errors = {}
    for step in sorted({0, budgets.steps - 1}):
        inputs = list(example_inputs(loaded, video, torch.float32, batch))
        inputs[3] = torch.tensor([step], dtype=torch.int32)
        got = run_dit(session, inputs)
        with torch.no_grad():
            want = module(*inputs)
        errors[step] = float((got - want).norm() / want.norm())
    return errors


if __name__ == "__main__":
    main()
