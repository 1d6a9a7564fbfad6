"""`saexport build`: every stage of the pipeline into one folder, resumable."""

from __future__ import annotations

from pathlib import Path

import click

from saexport.cli.options import (
    OptionGroup,
    calibration_group,
    clear_errors,
    goal_group,
    int_list,
    join_launch,
    model_group,
    output_group,
    rule_group,
    run_group,
)


def _deployment(plugin_library: Path | None, triton_name: str, gpus: str):
    from saexport.pipeline import Serving

    return plugin_library, Serving(triton_name, tuple(int_list(gpus, "--gpus")))


deployment_group = OptionGroup("deployment", (
    click.option("--plugin", "plugin_library", type=click.Path(path_type=Path),
                 help="libsaexport_trt_plugin.so, for the engine stage."),
    click.option("--triton-name", default="wan", show_default=True),
    click.option("--gpus", default="0", show_default=True, help="GPU ids of the Triton instance group."),
), _deployment)


@click.command()
@model_group
@goal_group
@run_group("video", "dtype", "blocks")
@calibration_group(west=True, fast=True)
@rule_group(runs_west=True)
@deployment_group
@output_group("Build folder.")
@clear_errors
def build(source, goal, run, calibration, rule, deployment, out) -> None:
    """topology -> budgets -> export -> engine -> Triton repository; reruns only what changed (OUT/build.json).
    Under `torchrun --nproc-per-node N` the calibration is spread over the N ranks; the files are one process's."""
    from dataclasses import replace

    from saexport.pipeline import BuildSettings, run_build
    from saexport.runtime.parallel.launch import writes_outputs

    join_launch()
    plugin, serving = deployment
    settings = BuildSettings(source=source, run=replace(run, steps=calibration.steps_for(source.preset)),
                             calibration=calibration, goal=goal, budget_rule=rule, plugin=plugin, serving=serving,
                             overwrite=out.overwrite)
    fates = run_build(settings, out.path, echo=lambda line: click.echo(line, err=True))
    if writes_outputs():
        for name, fate in fates.items():
            click.echo(f"{name:9s} {fate}")
