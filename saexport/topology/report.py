"""The fidelity report of a build: what its budgets deliver, measured where nothing was calibrated.

The budgets' videos of report prompts (the demo models' held-out test captions, never trained on; built-in
prompts of their own role for UMT5) at seeds the calibration never walked are generated with the dense videos of
the same prompts and seeds (one batched sampler loop, `sensitivity.final_latents_of_tables`): PSNR against dense
for every model (`runtime.fidelity.latent_psnr`), SSIM where the latents are pixels, each a mean with its 95%
interval over the prompts. Beside them: the mean density, the curve the quality search measured on the held-out
calibration prompts, and the expected speed-up — of attention, from the kernel's measured time against density
(`KERNEL_TFLOPS`), and of the DiT step where the model's attention share of a step was measured
(`ATTENTION_SHARE`).
"""

from __future__ import annotations

import math

from saexport.artifacts import Budgets, FidelityReport, Topology
from saexport.runtime.fidelity import clustered_interval, latent_psnr, ssim
from saexport.topology.calibration import Calibrator
from saexport.topology.sensitivity import final_latents_of_tables

# Kernel v7 on an H100, 12 heads x 32760 tokens, random masks (docs/BENCHMARKS.md): effective TFLOP/s by density.
KERNEL_TFLOPS = ((0.05, 521.0), (0.102, 584.0), (0.252, 615.0), (0.502, 642.0), (1.0, 616.0))
KERNEL_SOURCE = "kernel v7, H100, 12 x 32760 tokens (docs/BENCHMARKS.md)"
# The share of attention in a compiled dense DiT step, measured on an H100 (docs/BENCHMARKS.md).
ATTENTION_SHARE = {"wan2.1": 0.65, "wan2.1-14b": 0.72}


def attention_speedup(density: float) -> float:
    """The kernel's time at `density` against its dense time: density x dense TFLOP/s / TFLOP/s at the density
    (interpolated in log density; clamped to the measured range)."""
    points = [(math.log(d), t) for d, t in KERNEL_TFLOPS]
    x = min(max(math.log(max(density, 1e-6)), points[0][0]), points[-1][0])
    for (x0, t0), (x1, t1) in zip(points, points[1:], strict=False):
        if x <= x1:
            tflops = t0 + (t1 - t0) * (x - x0) / (x1 - x0)
            break
    return KERNEL_TFLOPS[-1][1] / (tflops * max(density, 1e-6))


def dit_speedup(model: str, density: float) -> float | None:
    """Amdahl's bound on the DiT step at `density`, where the model's attention share was measured."""
    share = ATTENTION_SHARE.get(model)
    return None if share is None else 1 / ((1 - share) + share / attention_speedup(density))


def fidelity_report(reporter: Calibrator, topology: Topology, budgets: Budgets, pixels: bool) -> FidelityReport:
    """Measure `budgets` against dense on the reporter's prompts and seeds (`pixels`: the latents are pixels, so
    SSIM is measured too)."""
    dense, sparse = final_latents_of_tables(reporter, topology, [None, budgets.levels])
    prompts = [p for p in range(reporter.prompts.embeddings.shape[0]) for _ in reporter.loop.seeds]
    quality = {"psnr": clustered_interval(latent_psnr(sparse, dense), prompts).to_json(3)}
    if pixels:
        to_pixels = lambda x: (x.clamp(-1, 1) + 1) / 2  # noqa: E731
        quality["ssim"] = clustered_interval(ssim(to_pixels(sparse), to_pixels(dense)), prompts).to_json(4)
    attention = attention_speedup(budgets.mean_density)
    dit = dit_speedup(topology.model, budgets.mean_density)
    return FidelityReport(
        model=topology.model, goal=budgets.fidelity, rule=budgets.curve.get("rule", ""),
        mean_density=round(budgets.mean_density, 5), prompts=reporter.prompts.source,
        seeds=list(reporter.loop.seeds), held_out=quality,
        search=budgets.curve.get("quality_target"),
        speedup={"attention": round(attention, 2), "dit": None if dit is None else round(dit, 2),
                 "source": KERNEL_SOURCE, "attention_share": ATTENTION_SHARE.get(topology.model)},
        budgets_hash=budgets.hash())
