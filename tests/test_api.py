"""The Python API: `saexport.apply` on diffusers' own WanPipeline, `saexport.load` on an artifact folder."""

import numpy as np
import pytest
import torch
from diffusers import WanPipeline
from safetensors.torch import load_file

import saexport
from saexport.artifacts import BlockedGrid, ModelIdentity
from saexport.errors import SaexportError
from saexport.layout import parse_layout
from saexport.models.dit import SparseWanDiT
from saexport.models.video_shape import parse_video_shape
from saexport.runtime.denoisers import TorchDenoiser
from saexport.runtime.generation import model_identity
from saexport.runtime.sampler import SamplerSettings, sample
from saexport.runtime.schedule import wan_scheduler
from saexport.topology.standin import standin_budgets, standin_topology
from tests.conftest import rel_err

VIDEO = parse_video_shape("64x64", 9)  # grid 3 x 4 x 4, blocks of 8: n = 6


def test_apply_makes_diffusers_wan_pipeline_run_the_sparse_attention(tiny, tmp_path):
    p = tiny.preset
    topology = standin_topology(model_identity(tiny), p.num_layers, p.num_heads,
                                BlockedGrid(VIDEO.token_grid(p.patch_size), 8, parse_layout("tile3d:1x2x4")), seed=5)
    budgets = standin_budgets(topology, steps=4, target_density=0.3)
    topology.save(tmp_path / "t.safetensors")
    budgets.save(tmp_path / "b.safetensors")
    text, negative = torch.randn(1, p.text_len, 32), torch.randn(1, p.text_len, 32)
    seed = int(torch.randint(0, 1000, ()))
    noise = torch.randn(1, *VIDEO.latent_shape(), generator=torch.Generator().manual_seed(seed))

    def run_pipeline(pipe):
        return pipe(prompt_embeds=text, negative_prompt_embeds=negative, height=64, width=64, num_frames=9,
                    num_inference_steps=4, guidance_scale=5.0, latents=noise.clone(), output_type="latent").frames

    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=tiny.transformer,
                       scheduler=wan_scheduler(3.0))
    pipe.set_progress_bar_config(disable=True)
    dense = run_pipeline(pipe)
    saexport.apply(pipe, tmp_path / "t.safetensors", tmp_path / "b.safetensors")
    sparse = run_pipeline(pipe)
    # saexport's own sampler on its own sparse DiT: the same video, step by step the same budgets.
    own = sample(TorchDenoiser(SparseWanDiT(tiny.transformer, topology.grid, topology.layout, topology.levels,
                                            budgets.levels, 8), 4), SamplerSettings(VIDEO.latent_shape(), 4, 3.0),
                 text, negative, seed, progress=lambda it, **_: it)
    assert rel_err(sparse, own) < 1e-4
    assert rel_err(sparse, dense) > 1e-3  # the sparse attention is in effect


def test_apply_refuses_a_topology_of_another_model(tiny, tmp_path):
    topology = standin_topology(ModelIdentity("wan2.1-small", "other", "w"), 2, 4,
                                BlockedGrid((3, 4, 4), 8, parse_layout("identity")))
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=tiny.transformer,
                       scheduler=wan_scheduler(3.0))
    with pytest.raises(SaexportError, match="made for wan2.1-small"):
        saexport.apply(pipe, topology, standin_budgets(topology, 2))


@pytest.mark.slow
def test_load_gives_a_callable_pipeline_from_prompt_to_frames(tmp_path):
    from click.testing import CliRunner

    from saexport.cli import main

    small = ["--resolution", "16x16", "--frames", "2", "--block-size", "16", "--layout", "tile3d:1x4x4",
             "--steps", "2", "--prompts", "1", "--rows-per-block", "4", "--device", "cpu", "--density", "0.3"]
    assert CliRunner().invoke(main, ["build", *small, "--out", str(tmp_path)]).exit_code == 0
    generate = saexport.load(tmp_path)
    prompt = "a red circle moving left on blue stripes"
    frames = generate(prompt, seed=3)
    assert frames.shape == (2, 16, 16, 3) and frames.dtype == np.uint8 and frames.std() > 5
    result = CliRunner().invoke(main, ["generate", "--artifacts", str(tmp_path), "--prompt", prompt,
                                       "--seed", "3", "--out", str(tmp_path / "x.safetensors")])
    assert result.exit_code == 0, result.output
    latents = load_file(str(tmp_path / "x.safetensors"))["latents"]
    expected = ((latents[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
    assert np.array_equal(frames, expected)
