"""Wan2.1's sampler schedule: diffusers' UniPC multistep scheduler, configured as Wan's pipeline is."""

from __future__ import annotations

from diffusers import UniPCMultistepScheduler

DEFAULT_STEPS = 50


def flow_shift_for(height: int) -> float:
    """Wan's recommendation: 3.0 at 480p, 5.0 at 720p and above."""
    return 5.0 if height >= 720 else 3.0


def wan_scheduler(flow_shift: float) -> UniPCMultistepScheduler:
    return UniPCMultistepScheduler(
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=flow_shift,
        num_train_timesteps=1000,
        solver_order=2,
        solver_type="bh2",
        final_sigmas_type="zero",
    )
