"""`saexport build`: every stage of the pipeline into one folder, resumable."""

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
    dtype_option,
    int_list,
    model_options,
    model_source,
    overwrite_option,
    video_options,
)


@click.command()
@model_options
@click.option("--fidelity", type=FIDELITY, default="high", show_default=True)
@video_options
@dtype_option
@block_options
@calibration_options
@budget_rule_options
@click.option("--plugin", "plugin_library", type=click.Path(path_type=Path),
              help="libsaexport_trt_plugin.so, for the engine stage.")
@click.option("--triton-name", default="wan", show_default=True)
@click.option("--gpus", default="0", show_default=True, help="GPU ids of the Triton instance group.")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path))
@overwrite_option
@clear_errors
def build(model, weights, random_weights, seed, fidelity, resolution, frames, dtype_name, block_size, layout, prompts,
          calib_embeddings, seeds, steps, rows_per_block, calib_guidance, calib_passes, aggregation, device, rule,
          proxy, warmup, rows_per_head, sensitivity, sensitivity_prompts, plugin_library, triton_name, gpus,
          out_dir, overwrite) -> None:
    """topology -> budgets -> export -> engine -> Triton repository; reruns only what changed (OUT/build.json)."""
    from saexport.pipeline import BuildSettings, resolve_run, run_build

    settings = BuildSettings(
        source=model_source(model, weights, random_weights, seed),
        run=resolve_run(model, resolution=resolution, frames=frames, dtype=dtype_name, steps=steps,
                        block_size=block_size, layout=layout),
        calibration=calibration(prompts, calib_embeddings, seeds, rows_per_block, calib_guidance, calib_passes,
                                aggregation, device),
        fidelity=fidelity,
        budget_rule=budget_rule(rule, proxy, warmup, rows_per_head, sensitivity, sensitivity_prompts),
        plugin=plugin_library, triton_name=triton_name, gpus=tuple(int_list(gpus, "--gpus")), overwrite=overwrite)
    fates = run_build(settings, out_dir, echo=lambda line: click.echo(line, err=True))
    for name, fate in fates.items():
        click.echo(f"{name:9s} {fate}")
