"""`saexport export | engine | triton`: the ONNX graph, the TensorRT engine, the Triton model repository."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from saexport.cli.options import (
    clear_errors,
    int_list,
    model_group,
    output_group,
    refuse_unused,
    run_group,
    stage,
)
from saexport.errors import SaexportError

log = logging.getLogger("saexport")


@click.command()
@model_group
@run_group("video", "dtype", "blocks", "steps")
@click.option("--batch", default=1, show_default=True, type=click.IntRange(min=1), help="Batch of the static graph.")
@click.option("--topology", "topology_path", type=click.Path(path_type=Path),
              help="topology.safetensors (default: a stand-in, until calibration has run).")
@click.option("--budgets", "budgets_path", type=click.Path(path_type=Path), help="budgets.safetensors.")
@click.option("--density", default=0.3, show_default=True, type=click.FloatRange(0, 1),
              help="Mean density of stand-in budgets.")
@click.option("--verify", is_flag=True, help="Run the ONNX in ONNX Runtime and compare with PyTorch (an fp32 graph "
                                            "on the CPU, fp16/bf16 on the GPU); fails when they disagree.")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Output folder.")
@clear_errors
def export(source, run, batch, topology_path, budgets_path, density, verify, out_dir) -> None:
    """Export the sparse DiT to OUT/model.onnx (one BlockSparseAttention node per layer), with the topology and
    budgets it freezes beside it (--block-size, --layout, --steps and --density shape a stand-in without them)."""
    from saexport.artifacts import Budgets, Topology
    from saexport.folders import FolderLock
    from saexport.pipeline import (
        Models,
        copy_fidelity_report,
        make_export,
        make_standins,
        open_output_folder,
        video_of,
    )

    if verify:
        from saexport.runtime.ort_session import graph_device, providers

        providers(graph_device(run.dtype))  # refused now, not after the export, where it cannot run
    if (topology_path is None) != (budgets_path is None):
        raise SaexportError("give --topology and --budgets together")
    if topology_path is not None:
        refuse_unused({"block_size": "--block-size", "layout": "--layout", "steps": "--steps", "density": "--density"},
                      "with --topology and --budgets (they shape a stand-in; the files have their own)")
    out_dir = open_output_folder(out_dir, "export")
    models = Models(source)
    if topology_path is not None:
        topology, budgets = Topology.load(topology_path), Budgets.load(budgets_path)
    else:
        log.warning("WARNING: no --topology given: using a STAND-IN topology and budgets (not calibrated; they keep "
                    "the graph's shape, not the model's quality).")
        topology, budgets = make_standins(models, run, density)
    video = video_of(source, run)
    with FolderLock(out_dir), stage(f"exporting ONNX ({video.describe()}, {run.dtype}, mean density "
                                    f"{budgets.mean_density:.2f})"):
        exported = make_export(models, run, topology, budgets, out_dir, batch)
        if budgets_path is not None:
            copy_fidelity_report(budgets_path, out_dir)
    click.echo(f"wrote {exported.path}")
    if verify:
        from saexport.exporter.verify import verify_graph
        from saexport.models.checkpoint import parse_dtype
        from saexport.runtime.generation import Artifacts

        with stage("verifying in ONNX Runtime"):
            report = verify_graph(models.get(parse_dtype(run.dtype)), Artifacts.open(out_dir))
        show_verification(report)


def show_verification(report) -> None:
    for runner, error in report.max_errors.items():
        click.echo(f"{runner} vs torch: max relative error {error:.2e}")
    if not report.passed:
        raise SaexportError("the exported graph disagrees with PyTorch beyond the tolerance (see above)")


@click.command()
@model_group
@click.option("--artifacts", required=True, type=click.Path(path_type=Path),
              help="An export or build folder with a model.onnx.")
@click.option("--device", help="cpu, cuda or cuda:N. Default: the CPU for an fp32 graph, the GPU (ONNX Runtime's "
                               "CUDA execution provider) for fp16 and bf16 ones.")
@click.option("--atol", default=1e-4, show_default=True, help="Absolute tolerance (fp32 graphs, element-wise).")
@click.option("--rtol", default=1e-3, show_default=True, help="Relative tolerance (fp32 graphs, element-wise).")
@click.option("--rel-l2", type=float,
              help="Largest relative L2 error of an fp16/bf16 graph's output. Default: 5e-3 fp16, 3e-2 bf16.")
@click.option("--save", "save_dir", type=click.Path(path_type=Path),
              help="Folder for the inputs and outputs in polygraphy's JSON format (`polygraphy inspect data`).")
@clear_errors
def verify(source, artifacts, device, atol, rtol, rel_l2, save_dir) -> None:
    """Compare the exported graph with the PyTorch model on polygraphy's runners (torch vs ONNX Runtime, on one
    device in the graph's precision); exits non-zero when they disagree."""
    from dataclasses import replace

    from saexport.artifacts import OnnxMetadata
    from saexport.cli.options import check_device, was_given
    from saexport.exporter.verify import Tolerance, verify_graph
    from saexport.folders import claim_output_folder
    from saexport.models.checkpoint import parse_dtype
    from saexport.pipeline import Models
    from saexport.runtime.generation import Artifacts
    from saexport.runtime.ort_session import graph_device, providers

    opened = Artifacts.open(artifacts)
    if was_given("model") and source.model != opened.preset.name:
        raise SaexportError(f"the artifacts are for {opened.preset.name}, not --model {source.model}")
    if not opened.folder.onnx.is_file():
        raise SaexportError(f"{artifacts} holds no model.onnx: export it with `saexport export`")
    graph_dtype = OnnxMetadata.read(opened.folder.onnx).dtype
    device = graph_device(graph_dtype, None if device is None else check_device(device))
    providers(device)  # refused before the model loads
    loaded = Models(replace(source, model=opened.preset.name)).get(parse_dtype(graph_dtype))
    if save_dir is not None:
        save_dir = claim_output_folder(save_dir, "verify", inputs=[opened.folder.root], option="--save")
    with stage(f"verifying on polygraphy's runners ({graph_dtype}, {device})"):
        report = verify_graph(loaded, opened, Tolerance(atol, rtol, rel_l2), save_dir, device)
    show_verification(report)


@click.command()
@click.option("--onnx", "onnx_path", required=True, type=click.Path(path_type=Path), help="model.onnx from export.")
@click.option("--plugin", "plugin_library", required=True, type=click.Path(path_type=Path),
              help="libsaexport_trt_plugin.so (the plugin_dynamic library with --version-compatible).")
@click.option("--workspace-gib", default=8.0, show_default=True)
@click.option("--timing-cache", type=click.Path(path_type=Path), help="Default: OUT/timing.cache, reused.")
@click.option("--version-compatible", is_flag=True, help="Version-compatible engine with the plugin serialized.")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path))
@clear_errors
def engine(onnx_path, plugin_library, workspace_gib, timing_cache, version_compatible, out_dir) -> None:
    """Build a TensorRT engine (OUT/model.engine + engine.json) from the exported ONNX."""
    from saexport.pipeline import make_engine

    with stage("building the TensorRT engine"):
        path = make_engine(onnx_path, plugin_library, out_dir, workspace_gib=workspace_gib, timing_cache=timing_cache,
                           version_compatible=version_compatible)
    click.echo(f"wrote {path}")


@click.command()
@click.option("--onnx", "onnx_path", required=True, type=click.Path(path_type=Path), help="model.onnx from export.")
@click.option("--engine", "engine_path", type=click.Path(path_type=Path),
              help="model.engine; without it the DiT runs the fp32 graph in ONNX Runtime (CPU), or a bf16 graph's "
                   "sparse model in torch on the GPU.")
@click.option("--weights", type=click.Path(path_type=Path),
              help="The checkpoint the graph was exported from: its text encoder and VAE serve prompts and frames "
                   "(and its DiT, for a bf16 graph without an engine). Default: the model's shipped weights.")
@click.option("--dit", type=click.Choice(["tensorrt", "torch", "onnxruntime"]),
              help="The DiT's back end. Default: tensorrt with --engine, else onnxruntime for an fp32 graph (CPU) and "
                   "torch for fp16/bf16 (GPU); onnxruntime serves fp16/bf16 graphs on the GPU (onnxruntime-gpu).")
@click.option("--name", default="wan", show_default=True, help="Model name prefix.")
@click.option("--gpus", default="0", show_default=True, help="Comma-separated GPU ids of the instance group.")
@output_group("Repository folder.")
@clear_errors
def triton(onnx_path, engine_path, weights, dit, name, gpus, out) -> None:
    """Write a Triton model repository: NAME_text_encoder, NAME_dit, NAME_vae and NAME_pipeline (prompt in,
    frames out; the sampler loop over NAME_dit with the graph's step count)."""
    from saexport.pipeline import Serving, make_triton

    repo = make_triton(onnx_path, out, Serving(name, tuple(int_list(gpus, "--gpus")), dit), engine_path,
                       weights)
    click.echo(f"wrote {repo} (see {repo / 'README.md'})")
