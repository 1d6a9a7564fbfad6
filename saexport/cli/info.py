"""`saexport models`: the architecture presets."""

from __future__ import annotations

import click

from saexport.models.presets import PRESETS


@click.command()
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
