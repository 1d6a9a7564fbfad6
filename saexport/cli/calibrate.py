"""`saexport topology | transfer | budgets | inspect`: WEST, map transfer, FAST, and pictures of them."""

from __future__ import annotations

from pathlib import Path

import click

from saexport.cli.options import (
    calibration_group,
    clear_errors,
    goal_group,
    join_launch,
    model_group,
    output_group,
    rule_group,
    run_group,
    stage,
)
from saexport.errors import SaexportError


@click.command()
@model_group
@run_group("video", "blocks")
@calibration_group(west=True, fast=False)
@output_group("topology.safetensors")
@clear_errors
def topology(source, run, calibration, out) -> None:
    """WEST: calibrate the dense model along the sampler's loop and write the per-head threshold map."""
    from saexport.pipeline import Models, make_topology
    from saexport.runtime.parallel.launch import writes_outputs

    join_launch()
    with stage("WEST calibration"):
        result = make_topology(Models(source), run, calibration, out)
    if writes_outputs():
        click.echo(f"wrote {out.path} (grid {result.grid}, {result.levels.shape[-1]} blocks per side)")


@click.command()
@click.option("--topology", "topology_path", required=True, type=click.Path(path_type=Path))
@click.option("--resolution", required=True, help="Target 480p, 720p or WIDTHxHEIGHT.")
@click.option("--frames", required=True, type=int, help="Target video frames.")
@click.option("--rule", default="min", show_default=True, type=click.Choice(["min", "bilinear"]),
              help="min over the covered block pairs, or the method's bilinear upsampling with levels rounded up.")
@output_group("topology.safetensors")
@clear_errors
def transfer(topology_path, resolution, frames, rule, out) -> None:
    """Derive a threshold map for another resolution from a computed one."""
    from saexport.artifacts import Topology
    from saexport.models.presets import get_preset
    from saexport.models.video_shape import parse_video_shape
    from saexport.pipeline import check_artifact_target
    from saexport.topology.transfer import transfer_topology

    check_artifact_target(out, "topology", [topology_path])
    source = Topology.load(topology_path)
    preset = get_preset(source.model)
    grid = parse_video_shape(resolution, frames, preset.codec).token_grid(preset.patch_size)
    transfer_topology(source, grid, rule=rule).save(out.path)
    click.echo(f"wrote {out.path}: grid {source.grid} -> {grid} (budgets must be tuned on it: saexport budgets)")


@click.command()
@model_group
@click.option("--topology", "topology_path", required=True, type=click.Path(path_type=Path))
@goal_group
@calibration_group(west=False, fast=True)
@rule_group(runs_west=False)
@output_group("budgets.safetensors")
@clear_errors
def budgets(source, topology_path, goal, calibration, rule, out) -> None:
    """FAST: measure along the sampler's loop what each level costs and allocate the preset's budgets."""
    from saexport.pipeline import Models, make_budgets
    from saexport.runtime.parallel.launch import writes_outputs

    join_launch()
    with stage(f"FAST {rule.rule}"):
        result = make_budgets(Models(source), topology_path, calibration, goal, rule, out)
    if writes_outputs():
        click.echo(f"wrote {out.path}: {goal.name}, rule {rule.rule}, mean density {result.mean_density:.3f}")


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
    from saexport.artifacts import FidelityReport
    from saexport.pipeline import report_paths
    from saexport.topology.pictures import quality_png

    report_path, _ = report_paths(Path(budgets_path))
    if report_path.is_file():
        report = FidelityReport.read(report_path)
        quality_png(report, out_dir / "quality.png")
        click.echo(f"fidelity report: {report.summary()}; wrote {out_dir / 'quality.png'}")
    if compare_path is not None:
        other = Topology.load(compare_path)
        if (other.grid, other.block_size, other.layout) != (topo.grid, topo.block_size, topo.layout):
            raise SaexportError("--compare must be a topology of the same grid, block size and layout")
        click.echo(f"IoU of 30%-density masks against {compare_path}: {mask_iou(topo, other):.3f}")
