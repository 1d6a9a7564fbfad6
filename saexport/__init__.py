"""saexport: Wan2.1 with ScalingAttention block-sparse attention, exported for production.

Python API (the heavy imports happen on first use):

    pipe = saexport.apply(pipe, "out/topology.safetensors", "out/budgets.safetensors")  # a diffusers WanPipeline
    generate = saexport.load("out", backend="torch")  # an artifact folder: prompt, seed -> uint8 frames
    frames = generate("a red circle moving left on blue stripes", seed=0)
"""

from __future__ import annotations

__version__ = "0.1.0"


def apply(pipe, topology, budgets):
    """Make a diffusers `WanPipeline` run the topology's block-sparse attention with the budgets of its own steps."""
    from saexport.runtime.diffusers_pipeline import apply as apply_to_pipeline

    return apply_to_pipeline(pipe, topology, budgets)


def load(artifacts, backend: str = "torch", **options):
    """A callable pipeline over a build or export folder: `(prompt, seed=0, negative_prompt="", guidance=5.0)` ->
    uint8 frames `[frames, height, width, 3]`. Options: `weights` (the checkpoint the artifacts were made from;
    default: the model's shipped weights) or `random_weights` seeded by `weights_seed`; `dtype` and `compile_model`
    for the torch back end, and in each rank of a torchrun launch `ulysses` (sequence-parallel ranks) and
    `cfg_parallel` (a guided step's two passes on two halves of the ranks); `plugin` for tensorrt; `vae` to decode
    Wan2.1's latents."""
    from saexport.runtime.generation import open_pipeline

    return open_pipeline(artifacts, backend, **options)
