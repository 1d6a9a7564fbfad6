"""Wan2.1's sampler loop over any `Denoiser`: diffusers' UniPC (flow matching) with classifier-free guidance."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from tqdm import tqdm

from saexport.engines.denoiser import Denoiser
from saexport.engines.scheduler import wan_scheduler
from saexport.errors import SaexportError

DEFAULT_GUIDANCE = 5.0


def sample(
    denoiser: Denoiser,
    text_embeddings: torch.Tensor,  # [batch, text_len, text_dim]
    negative_embeddings: torch.Tensor,  # [1 or batch, text_len, text_dim]
    latent_shape: tuple[int, int, int, int],
    steps: int,
    flow_shift: float,
    seed: int | Sequence[int],  # one per prompt of the batch
    guidance_scale: float = DEFAULT_GUIDANCE,
    progress: Callable = tqdm,
) -> torch.Tensor:
    """Denoise seeded noise into latents `[batch, *latent_shape]` (fp32, returned on the CPU).

    Guidance runs two passes per step (conditional, unconditional), each with the step's index, so the
    sparse attention uses the budgets tuned for that step. Latents stay on the denoiser's device for the
    whole loop; the noise is drawn on the CPU, per seed, so that a seed means the same video on every back
    end and in any batch.
    """
    if steps != denoiser.steps:
        raise SaexportError(f"the budgets are for {denoiser.steps} steps; sample with --steps {denoiser.steps} "
                            "or rerun `saexport budgets` for this step count")
    scheduler = wan_scheduler(flow_shift)
    scheduler.set_timesteps(steps)
    seeds = [seed] if isinstance(seed, int) else list(seed)
    if len(seeds) != text_embeddings.shape[0]:
        raise SaexportError(f"{text_embeddings.shape[0]} prompts need as many seeds, got {len(seeds)}")
    device = denoiser.device
    latents = torch.cat([torch.randn(1, *latent_shape, generator=torch.Generator().manual_seed(s))
                         for s in seeds]).to(device)
    text_embeddings = text_embeddings.to(device)
    negative_embeddings = negative_embeddings.to(device).expand_as(text_embeddings)
    for step, t in enumerate(progress(scheduler.timesteps, desc=f"sampling ({denoiser.name})", unit="step")):
        timestep = t.reshape(1).float().to(device).expand(latents.shape[0])
        step_index = torch.tensor([step], dtype=torch.int32, device=device)
        cond = denoiser.predict(latents, timestep, step_index, text_embeddings).float()
        if guidance_scale != 1.0:
            uncond = denoiser.predict(latents, timestep, step_index, negative_embeddings).float()
            noise = uncond + guidance_scale * (cond - uncond)
        else:
            noise = cond
        latents = scheduler.step(noise, t, latents).prev_sample
    return latents.cpu()
