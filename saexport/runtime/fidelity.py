"""How close a video is to another (the sparse one to the dense one): PSNR, SSIM, and 95% intervals over samples.

Videos are `[videos, 3, frames, height, width]` with pixels in [0, 1] on any device; latents of a model whose
latents are pixels (the demo models) map to pixels by (x + 1) / 2. For Wan2.1, whose latents a VAE decodes,
`latent_psnr` is the same formula on the final latents (clamped to [-1, 1]): an equivalent of the pixel PSNR that
needs no decode, used by the build's quality targets and fidelity report (docs/ARCHITECTURE.md, "FAST").

**Intervals.** Two videos of one prompt are not independent, so an interval over videos is a Student-t interval
over *prompts*: a video's value is averaged with the other seeds' of its prompt, and the mean of those prompt
means is given +- t(0.975, prompts - 1) * sd / sqrt(prompts).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per video (pixels in [0, 1]): `[videos]`."""
    mse = ((a.double() - b.double()) ** 2).flatten(1).mean(1).clamp(min=1e-12)
    return (10 * torch.log10(1 / mse)).float().cpu()


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean SSIM of every frame and channel, per video (Gaussian window 11, sigma 1.5, valid positions only;
    Wang et al. 2004, C1 = 0.01^2, C2 = 0.03^2), pixels in [0, 1]: `[videos]`."""
    videos = a.shape[0]
    # float64: in float32, E[x^2] - E[x]^2 cancels to errors of ~1e-7, not small against C2 = 9e-4 on flat areas
    x, y = (v.double().reshape(-1, 1, *v.shape[-2:]) for v in (a, b))  # [videos*3*frames, 1, H, W]
    g = torch.exp(-((torch.arange(11, dtype=torch.float64) - 5.0) ** 2) / (2 * 1.5**2))
    window = (g[:, None] * g[None, :] / g.sum() ** 2).view(1, 1, 11, 11).to(x)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(t, window)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.reshape(videos, -1).mean(1).float().cpu()


# ------------------------------------------------------------------------------------------------- intervals


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (Lentz; Numerical Recipes 6.4)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def student_t_cdf(t: float, df: float) -> float:
    tail = 0.5 * _betainc(df / 2, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def student_t_ppf(p: float, df: float) -> float:
    """The p-quantile of Student's t with `df` degrees of freedom (bisection on the CDF)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p < 0.5:
        return -student_t_ppf(1 - p, df)
    low, high = 0.0, 1.0
    while student_t_cdf(high, df) < p:
        high *= 2
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if student_t_cdf(mid, df) < p else (low, mid)
    return (low + high) / 2


@dataclass(frozen=True)
class Interval:
    mean: float
    half: float  # half-width of the 95% interval (nan with fewer than 2 clusters)
    n: int  # clusters (captions) the interval is over

    def to_json(self, digits: int = 4) -> dict:
        return {"mean": round(self.mean, digits), "ci95": round(self.half, digits) if math.isfinite(self.half)
                else None, "n": self.n}


def t_interval(values: Sequence[float] | torch.Tensor, confidence: float = 0.95) -> Interval:
    """Mean and Student-t half-width of `values` (each one independent)."""
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    n = v.numel()
    if n == 0:
        return Interval(float("nan"), float("nan"), 0)
    mean = float(v.mean())
    if n < 2:
        return Interval(mean, float("nan"), n)
    half = student_t_ppf(0.5 + confidence / 2, n - 1) * float(v.std(unbiased=True)) / math.sqrt(n)
    return Interval(mean, half, n)


def cluster_means(values: torch.Tensor, clusters: Sequence[int]) -> torch.Tensor:
    """The mean of `values` per cluster id (first-seen order)."""
    ids = list(dict.fromkeys(clusters))
    index = torch.tensor([ids.index(c) for c in clusters])
    sums = torch.zeros(len(ids), dtype=torch.float64).index_add_(0, index, values.double().flatten())
    return sums / torch.bincount(index, minlength=len(ids)).double()


def clustered_interval(values: torch.Tensor, clusters: Sequence[int], confidence: float = 0.95) -> Interval:
    """The t-interval over cluster (caption) means: videos of one caption are not independent."""
    return t_interval(cluster_means(values, clusters), confidence)



def latent_psnr(latents: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per sample of final latents in [-1, 1] (clamped) against `reference`: the pixel PSNR of models
    whose latents are pixels, `psnr((x + 1) / 2, (y + 1) / 2)`."""
    return psnr((latents.clamp(-1, 1) + 1) / 2, (reference.clamp(-1, 1) + 1) / 2)
