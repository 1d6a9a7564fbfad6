"""Wan2.1's sampler loop over any `Denoiser`: diffusers' UniPC (flow matching) with classifier-free guidance.

`sampling_loop` is the one loop: generation drains it (`sample`), and calibration walks it, learning from each
event which step and pass its probes are about to see, so it measures exactly what generation runs.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from saexport.errors import SaexportError
from saexport.runtime.denoisers import Denoiser
from saexport.runtime.schedule import wan_scheduler

DEFAULT_GUIDANCE = 5.0
PASSES = ("cond", "uncond")  # the passes of a guided step, in the order they run


def no_progress(steps, **_):
    """A `progress` that shows nothing (another rank's, a server's, calibration's inner loops)."""
    return steps


@dataclass(frozen=True)
class SamplerSettings:
    """What a sampler loop is fixed by: the latents' shape `[channels, frames, height, width]`, the step count the
    budgets were made for, the schedule's flow shift, and the guidance scale (1.0: one pass a step)."""

    latent_shape: tuple[int, int, int, int]
    steps: int
    flow_shift: float
    guidance: float = DEFAULT_GUIDANCE


def sampling_loop(
    denoiser: Denoiser,
    settings: SamplerSettings,
    text_embeddings: torch.Tensor,  # [batch, text_len, text_dim]
    negative_embeddings: torch.Tensor,  # [1 or batch, text_len, text_dim]
    seed: int | Sequence[int],  # one per prompt of the batch
    progress: Callable = tqdm,
) -> Generator[tuple[int, str], None, torch.Tensor]:
    """Denoise seeded noise into latents `[batch, *latent_shape]` (fp32, returned on the CPU).

    Yields `(step, pass)` just before each prediction runs (the prediction runs when the next event is asked
    for) and returns the latents. Guidance runs two passes per step (conditional, unconditional), each with
    the step's index, so the sparse attention uses the budgets tuned for that step. Latents stay on the
    denoiser's device for the whole loop; the noise is drawn on the CPU, per seed, so that a seed means the
    same video on every back end and in any batch. A denoiser with `predict_guided` (CFG parallel,
    `parallel.cfg`) runs both passes of a guided step in one call, after both events.
    """
    steps = settings.steps
    if steps != denoiser.steps:
        raise SaexportError(f"the budgets are for {denoiser.steps} steps, not {steps}: sample with `steps` = "
                            f"{denoiser.steps}, or make budgets for {steps} steps")
    scheduler = wan_scheduler(settings.flow_shift)
    scheduler.set_timesteps(steps)
    seeds = [seed] if isinstance(seed, int) else list(seed)
    if len(seeds) != text_embeddings.shape[0]:
        raise SaexportError(f"{text_embeddings.shape[0]} prompts need as many seeds, got {len(seeds)}")
    device = denoiser.device
    both_passes = getattr(denoiser, "predict_guided", None)  # a denoiser that runs a guided step's passes at once
    latents = torch.cat([torch.randn(1, *settings.latent_shape, generator=torch.Generator().manual_seed(s))
                         for s in seeds]).to(device)
    text_embeddings = text_embeddings.to(device)
    negative_embeddings = negative_embeddings.to(device).expand_as(text_embeddings)
    for step, t in enumerate(progress(scheduler.timesteps, desc=f"sampling ({denoiser.name})", unit="step")):
        timestep = t.reshape(1).float().to(device).expand(latents.shape[0])
        step_index = torch.tensor([step], dtype=torch.int32)  # on the host: each back end checks it, no sync
        yield step, "cond"
        if settings.guidance == 1.0:
            noise = denoiser.predict(latents, timestep, text_embeddings, step_index).float()
        else:
            if both_passes is None:
                noise = denoiser.predict(latents, timestep, text_embeddings, step_index).float()
                yield step, "uncond"
                uncond = denoiser.predict(latents, timestep, negative_embeddings, step_index).float()
            else:  # CFG parallel: the two passes at once, on two ranks (after both events)
                yield step, "uncond"
                noise, uncond = (n.float() for n in both_passes(latents, timestep, text_embeddings,
                                                                  negative_embeddings, step_index))
            noise = uncond + settings.guidance * (noise - uncond)
        latents = scheduler.step(noise, t, latents).prev_sample
    return latents.cpu()


def sample(
    denoiser: Denoiser,
    settings: SamplerSettings,
    text_embeddings: torch.Tensor,
    negative_embeddings: torch.Tensor,
    seed: int | Sequence[int],
    progress: Callable = tqdm,
) -> torch.Tensor:
    """`sampling_loop` run to its end: the latents `[batch, *latent_shape]` (fp32, on the CPU)."""
    loop = sampling_loop(denoiser, settings, text_embeddings, negative_embeddings, seed, progress)
    while True:
        try:
            next(loop)
        except StopIteration as finished:
            return finished.value
