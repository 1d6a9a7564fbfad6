"""`saexport inspect`: pictures of a topology and its budgets, and the stability of a topology.

- masks.png: the kept blocks of every layer (rows) and head (columns) at one step;
- density.png: mean density over steps x layers (the FAST schedule at a glance);
- fidelity.png: what FAST measured against density per layer (v1: fidelity; v2: its quality proxy);
- quality.png: a build's fidelity report: PSNR against the dense video as the quality search measured it against
  density, the target, and what the chosen budgets gave on the report's held-out prompts;
- IoU of the masks of two topologies (e.g. calibrated on disjoint prompt halves) at equal density.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from saexport.artifacts import Budgets, FidelityReport, Topology  # noqa: E402
from saexport.atomic import atomic_path  # noqa: E402
from saexport.levels import density, kept_blocks  # noqa: E402


def _save(figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=80, bbox_inches="tight")
    plt.close(figure)


def masks_png(topology: Topology, budgets: Budgets, step: int, path: Path) -> None:
    layers, heads = topology.levels.shape[:2]
    figure, axes = plt.subplots(layers, heads, figsize=(1.2 * heads, 1.2 * layers), squeeze=False)
    for layer in range(layers):
        keep = kept_blocks(topology.levels[layer], budgets.levels[step, layer])
        for head in range(heads):
            ax = axes[layer][head]
            ax.imshow(keep[head].numpy(), cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if layer == 0:
                ax.set_title(f"head {head}", fontsize=7)
            if head == 0:
                ax.set_ylabel(f"layer {layer}", fontsize=7)
    figure.suptitle(f"kept blocks at step {step} (black = kept; rows: query blocks, columns: key blocks)",
                    y=1.0 + 0.3 / layers)
    _save(figure, path)


def density_png(topology: Topology, budgets: Budgets, path: Path) -> None:
    table = density(topology.levels, budgets.levels).mean(-1)  # [steps, layers]
    figure, ax = plt.subplots(figsize=(8, 4))
    image = ax.imshow(table.T.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1, origin="lower")
    ax.set_xlabel("denoising step")
    ax.set_ylabel("layer")
    ax.set_title(f"mean density per step and layer ({budgets.fidelity}, overall {budgets.mean_density:.2f})")
    figure.colorbar(image, ax=ax, label="fraction of blocks kept")
    _save(figure, path)


def fidelity_png(budgets: Budgets, path: Path) -> bool:
    """What FAST measured against density per layer: v1's fidelity, or v2's quality proxy Q."""
    curves = budgets.curve.get("fidelity_vs_density") or budgets.curve.get("quality_vs_density")
    if not curves:
        return False  # stand-in budgets have no measurements
    measure = ("fidelity 1 - Hellinger" if "fidelity_vs_density" in budgets.curve
               else f"quality Q ({budgets.curve.get('proxy')} proxy)")
    figure, ax = plt.subplots(figsize=(6, 4))
    colours = plt.cm.viridis(torch.linspace(0, 1, len(curves)).numpy())
    for layer, (curve, colour) in enumerate(zip(curves, colours, strict=True)):
        d, f = zip(*curve, strict=True)
        ax.plot(d, f, color=colour, label=f"layer {layer}" if len(curves) <= 12 else None)
    ax.set_xlabel("density (fraction of blocks kept)")
    ax.set_ylabel(measure)
    ax.set_title(f"{measure.split(' (')[0]} against density (mean over steps and heads)")
    if len(curves) <= 12:
        ax.legend(fontsize=7)
    _save(figure, path)
    return True


def quality_png(report: FidelityReport, path: Path) -> None:
    figure, ax = plt.subplots(figsize=(6, 4))
    if report.search is not None:
        points = sorted(report.search["psnr_vs_density"])
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-", color="tab:blue",
                label="quality search (held-out calibration prompts)")
        ax.axhline(report.search["psnr"], color="tab:red", linestyle="--", label=f"target {report.search['psnr']:g} dB")
    psnr = report.held_out["psnr"]
    ax.errorbar([report.mean_density], [psnr["mean"]], yerr=[psnr["ci95"] or 0.0], fmt="s", color="black",
                capsize=4, label=f"chosen: report prompts ({psnr['n']}), 95% interval")
    ax.set_xlabel("mean density (fraction of blocks kept)")
    ax.set_ylabel("PSNR against the dense video (dB)")
    ax.set_title(f"{report.model}, {report.goal}: {psnr['mean']:.1f} dB at {report.mean_density:.0%} of the blocks")
    ax.legend(fontsize=7)
    _save(figure, path)


def mask_iou(a: Topology, b: Topology, target_density: float = 0.3) -> float:
    """Mean IoU over layers and heads of the two maps' masks that keep `target_density` of the blocks."""
    if a.levels.shape != b.levels.shape:
        raise ValueError(f"topologies of shapes {tuple(a.levels.shape)} and {tuple(b.levels.shape)}")

    def masks(levels: torch.Tensor) -> torch.Tensor:
        flat = levels.flatten(-2).to(torch.int32)
        count = max(1, round(target_density * flat.shape[-1]))
        budget = flat.sort(-1).values[..., count - 1]
        return levels.to(torch.int32) <= budget[..., None, None]

    ma, mb = masks(a.levels), masks(b.levels)
    return float(((ma & mb).flatten(-2).sum(-1) / (ma | mb).flatten(-2).sum(-1)).mean())
