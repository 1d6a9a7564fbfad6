"""`saexport topology | transfer | budgets | inspect`: WEST, resolution transfer, FAST, and pictures of them."""

from __future__ import annotations

from pathlib import Path

import click

from saexport.cli.options import (
    FIDELITY,
    block_options,
    budget_rule,
    budget_rule_options,
    calibration,
    calibration_options,
    clear_errors,
    model_options,
    model_source,
    overwrite_option,
    stage,
    video_options,
)
from saexport.errors import SaexportError


@click.command()
@model_options
@video_options
@block_options
@calibration_options
@click.option("--out", "out_path", required=True, type=click.Path(path_type=Path), help="topology.safetensors")
@overwrite_option
@clear_errors
def topology(model, weights, random_weights, seed, resolution, frames, block_size, layout, prompts, calib_embeddings,
             seeds, steps, rows_per_block, calib_guidance, calib_passes, aggregation, device, out_path,
             overwrite) -> None:
    """WEST: calibrate the dense model along the sampler's loop and write the per-head threshold map."""
    from saexport.pipeline import Models, make_topology, resolve_run

    source = model_source(model, weights, random_weights, seed)
    run = resolve_run(model, resolution=resolution, frames=frames, block_size=block_size, layout=layout, steps=steps)
    calib = calibration(prompts, calib_embeddings, seeds, rows_per_block, calib_guidance, calib_passes, aggregation,
                        device)
    with stage("WEST calibration"):
        result = make_topology(Models(source), run, calib, out_path, overwrite)
    click.echo(f"wrote {out_path} (grid {result.grid}, {result.levels.shape[-1]} blocks per side)")


@click.command()
@click.option("--topology", "topology_path", required=True, type=click.Path(path_type=Path))
@click.option("--resolution", required=True, help="Target 480p, 720p or WIDTHxHEIGHT.")
@click.option("--frames", required=True, type=int, help="Target video frames.")
@click.option("--rule", default="min", show_default=True, type=click.Choice(["min", "bilinear"]),
              help="min over the covered block pairs, or the method's bilinear upsampling with levels rounded up.")
@click.option("--out", "out_path", required=True, type=click.Path(path_type=Path), help="topology.safetensors")
@overwrite_option
@clear_errors
def transfer(topology_path, resolution, frames, rule, out_path, overwrite) -> None:
    """Derive a threshold map for another resolution from a computed one."""
    from saexport.artifacts import Topology
    from saexport.models.presets import get_preset
    from saexport.models.video_shape import parse_video_shape
    from saexport.pipeline import check_artifact_target
    from saexport.topology.transfer import transfer_topology

    check_artifact_target(out_path, "topology", [topology_path], overwrite)
    source = Topology.load(topology_path)
    preset = get_preset(source.model)
    grid = parse_video_shape(resolution, frames, preset.codec).token_grid(preset.patch_size)
    transfer_topology(source, grid, rule=rule).save(out_path)
    click.echo(f"wrote {out_path}: grid {source.grid} -> {grid} (budgets must be tuned on it: saexport budgets)")


@click.command()
@model_options
@click.option("--topology", "topology_path", required=True, type=click.Path(path_type=Path))
@click.option("--fidelity", type=FIDELITY, default="high", show_default=True)
@calibration_options
@budget_rule_options
@click.option("--out", "out_path", required=True, type=click.Path(path_type=Path), help="budgets.safetensors")
@overwrite_option
@clear_errors
def budgets(model, weights, random_weights, seed, topology_path, fidelity, prompts, calib_embeddings, seeds, steps,
            rows_per_block, calib_guidance, calib_passes, aggregation, device, rule, proxy, warmup, rows_per_head,
            sensitivity, sensitivity_prompts, out_path, overwrite) -> None:
    """FAST: measure along the sampler's loop what each level costs and allocate the preset's budgets."""
    from saexport.pipeline import Models, make_budgets, resolve_run

    source = model_source(model, weights, random_weights, seed)
    run = resolve_run(model, steps=steps)
    calib = calibration(prompts, calib_embeddings, seeds, rows_per_block, calib_guidance, calib_passes, aggregation,
                        device)
    allocation = budget_rule(rule, proxy, warmup, rows_per_head, sensitivity, sensitivity_prompts)
    with stage(f"FAST {allocation.rule}"):
        result = make_budgets(Models(source), topology_path, fidelity, calib, run.steps, out_path, allocation,
                              overwrite)
    click.echo(f"wrote {out_path}: {fidelity}, rule {allocation.rule}, mean density {result.mean_density:.3f}")


@click.command()
@click.option("--topology", "topology_path", required=True, type=click.Path(path_type=Path))
@click.option("--budgets", "budgets_path", required=True, type=click.Path(path_type=Path))
@click.option("--step", default=0, show_default=True, help="Denoising step of the mask picture.")
@click.option("--compare", "compare_path", type=click.Path(path_type=Path),
              help="Another topology (e.g. from other prompts): report the IoU of their masks.")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path))
@clear_errors
def inspect(topology_path, budgets_path, step, compare_path, out_dir) -> None:
    """Pictures: OUT/masks.png, density.png, fidelity.png; and the IoU against --compare."""
    from saexport.artifacts import Budgets, Topology
    from saexport.folders import claim_output_folder
    from saexport.topology.pictures import density_png, fidelity_png, mask_iou, masks_png

    topo, budget = Topology.load(topology_path), Budgets.load(budgets_path)
    budget.check_matches(topo)
    if not 0 <= step < budget.steps:
        raise SaexportError(f"--step must be in [0, {budget.steps})")
    out_dir = claim_output_folder(out_dir, "inspect", inputs=[topology_path, budgets_path])
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
