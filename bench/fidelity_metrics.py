"""The measures of bench/fidelity.py: PSNR, SSIM, 95% intervals, and the caption check.

Videos are `[videos, 3, frames, height, width]` with pixels in [0, 1] on any device.

**Intervals.** The test set is captions x seeds; two videos of one caption are not independent, so every
interval is a Student-t interval over *captions*: a video's value is averaged with the other seed's of its
caption, and the mean of those caption means is given +- t(0.975, captions - 1) * sd / sqrt(captions). A paired
interval (row A minus row B, caption by caption) is the same interval over the per-caption differences.

**Caption check.** A detector that knows the scene's truth (the `Scene` dataclass of saexport/demo/objects.py,
or of saexport/demo/videos.py for wan2.1-demo) and asks, per captioned object:
- *colour*: is there a region of the object's colour? A pixel has colour c when, among the palette's colours
  (each scaled by a brightness factor 0.4-1.35 and clipped, as texture and shading scale the renderer's flat
  colour) and the background's own tone curve (the scene's background colour mixed with grey, as the renderer
  draws it), the nearest point is c's and lies within 0.12 (RGB distance, pixels in [0, 1]). The colour is
  present in a frame when at least 0.4% of the frame has it, and present when that holds in at least half of the
  frames checked (all frames; the first or last quarter for the demo's "turning" colours).
- *motion*: the colour's centroid (mean x and y of its pixels, frame widths) is fitted by a line over the
  frames where the colour is present (at least 4); its displacement over the clip, plus the background's
  expected displacement undone (objects.py: a camera pan moves the picture 0.08-0.16 frame the other way, the
  check adds back the middle, 0.12, along the pan), must be >= 0.1 frame along the captioned direction and
  larger than across it; an object the caption leaves still (objects.py; the demo's "rotating") must move less
  than 0.1 frame. The demo's "turning" objects have no motion check.
- *shape*: in the 3 frames where the colour covers most pixels, the region is compared (IoU) with templates of
  the four shapes (the renderer's signed distances) at 12 rotations and 3 sizes (from the region's area) around
  the region's centroid, within +-0.25 frame of it; the shape with the best IoUs summed over those frames must
  be the captioned one.
Each colour's pixels are cleaned by a 2x2 morphological opening first (anti-aliased edges blend two colours into
thin seams that can come near a third). A video's score per category is the share of its checks that pass;
"all" pools the three categories. The detector is validated on the rendered ground-truth videos of the test
captions (it should pass nearly all) and on the same videos against shuffled captions (it should fail most).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from saexport.demo.videos import COLOURS, DIRECTIONS, SHAPES, _shape_sdf

# ---------------------------------------------------------------------------------------------- PSNR, SSIM, intervals
# (the library's: the build's fidelity report measures with the same functions)
from saexport.runtime.fidelity import (  # noqa: E402,F401
    Interval,
    cluster_means,
    clustered_interval,
    psnr,
    ssim,
    student_t_cdf,
    student_t_ppf,
    t_interval,
)


def ranks(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks of a flat tensor, ties sharing their mean rank."""
    v = values.double().flatten()
    order = v.argsort()
    r = torch.empty_like(v)
    r[order] = torch.arange(1, v.numel() + 1, dtype=torch.float64)
    for value in v.unique():
        tied = v == value
        r[tied] = r[tied].mean()
    return r


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two equally long flat tensors (the Pearson correlation of their ranks)."""
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp(min=1e-300))


# ------------------------------------------------------------------------------------------------ the truth

PALETTE = list(COLOURS)
NOMINAL_PAN = 0.12  # objects.py draws a pan's travel in [0.08, 0.16] of the frame


@dataclass(frozen=True)
class ObjectTruth:
    colour: str
    shape: str
    motion: str | None  # "left" | "right" | "up" | "down" | "still" | None (not checked)
    frames: str = "all"  # which frames the colour is checked in: "all", "first" or "last" quarter
    check_shape: bool = True


@dataclass(frozen=True)
class VideoTruth:
    objects: tuple[ObjectTruth, ...]
    background: str
    tone: tuple[float, float, float, float]  # background pixel = o0 + o1 s + colour (k0 + k1 s), s in [0, 1]
    correction: tuple[float, float]  # added to a centroid's displacement: the background's, undone


def truth_of(scene) -> VideoTruth:
    """The checkable truth of an objects.py or a videos.py scene."""
    if hasattr(scene, "objects"):  # saexport/demo/objects.py: motions relative to the background
        objects = tuple(ObjectTruth(o.colour, o.shape, o.motion or "still") for o in scene.objects)
        pan = DIRECTIONS[scene.pan] if scene.pan else (0.0, 0.0)
        return VideoTruth(objects, scene.background, (0.05, 0.25, 0.3, 0.3),
                          (NOMINAL_PAN * pan[0], NOMINAL_PAN * pan[1]))
    objects = []  # saexport/demo/videos.py: motions on screen
    for s in scene.shapes:
        if s.motion.startswith("moving"):
            objects.append(ObjectTruth(s.colour, s.shape, s.motion.split()[-1]))
        elif s.motion == "rotating":
            objects.append(ObjectTruth(s.colour, s.shape, "still"))
        else:  # turning: the start colour early, the end colour late
            objects.append(ObjectTruth(s.colour, s.shape, None, "first", check_shape=False))
            objects.append(ObjectTruth(s.end_colour, s.shape, None, "last", check_shape=False))
    return VideoTruth(tuple(objects), scene.background, (0.08, 0.27, 0.3, 0.15), (0.0, 0.0))


# ---------------------------------------------------------------------------------------------- the detector

TOLERANCE = 0.12
MIN_AREA = 0.004
MIN_TRAVEL = 0.1
SCALES = torch.linspace(0.4, 1.35, 24)
TONES = torch.linspace(0.0, 1.0, 17)


def colour_labels(video: torch.Tensor, background: str, tone: tuple[float, float, float, float]) -> torch.Tensor:
    """Per pixel the palette index of its colour, or -1 (background, or nothing within TOLERANCE):
    `[frames, H, W]` int64 of a video `[3, frames, H, W]`."""
    device = video.device
    palette = torch.tensor([COLOURS[c] for c in PALETTE], dtype=torch.float32, device=device)  # [P, 3]
    points = (palette[:, None, :] * SCALES.to(device)[None, :, None]).clamp(0, 1)  # [P, K, 3]
    o0, o1, k0, k1 = tone
    base = torch.tensor(COLOURS[background], dtype=torch.float32, device=device)
    s = TONES.to(device)[:, None]
    bg = (o0 + o1 * s + base * (k0 + k1 * s)).clamp(0, 1)  # [S, 3]
    candidates = torch.cat([points.reshape(-1, 3), bg])  # [P*K + S, 3]
    pixels = video.float().permute(1, 2, 3, 0).reshape(-1, 3)
    labels = torch.empty(pixels.shape[0], dtype=torch.int64, device=device)
    for start in range(0, pixels.shape[0], 1 << 16):
        chunk = pixels[start:start + (1 << 16)]
        d = torch.cdist(chunk, candidates)  # [N, P*K + S]
        per_colour = d[:, :points.numel() // 3].reshape(-1, len(PALETTE), len(SCALES)).amin(-1)  # [N, P]
        nearest, index = per_colour.min(-1)
        is_colour = (nearest < TOLERANCE) & (nearest < d[:, points.numel() // 3:].amin(-1))
        labels[start:start + chunk.shape[0]] = torch.where(is_colour, index, -1)
    return labels.view(video.shape[1:])


def opening(mask: torch.Tensor) -> torch.Tensor:
    """2x2 morphological opening of `[frames, H, W]` masks: drops the one-pixel seams where an edge's blend of
    two colours comes near a third, keeps every region at least 2 pixels wide (a ring's band too)."""
    m = mask.float().unsqueeze(1)
    pool = torch.nn.functional.max_pool2d
    eroded = -pool(torch.nn.functional.pad(-m, (0, 1, 0, 1), value=0.0), 2, stride=1)  # min over the 2x2 below-right
    return pool(torch.nn.functional.pad(eroded, (1, 0, 1, 0)), 2, stride=1).squeeze(1) > 0.5  # max over above-left


def _frame_range(frames: int, which: str) -> range:
    quarter = max(1, frames // 4)
    return {"all": range(frames), "first": range(quarter), "last": range(frames - quarter, frames)}[which]


SHAPE_AREAS = {"circle": math.pi, "ring": 0.96 * math.pi, "square": 2.89, "triangle": 2.546}  # area / size^2
THETAS = 12
SIZE_FACTORS = (0.85, 1.0, 1.15)


def shape_scores(regions: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor) -> torch.Tensor:
    """Best IoU of each shape's templates (12 rotations x 3 sizes, centred on (cx, cy), sized from the region's
    area) with each region, inside a window of +-0.25 frame around the centre: `[N, len(SHAPES)]` for regions
    `[N, H, W]` (bool) and centres `[N]` (frame units)."""
    count, height, width = regions.shape
    device = regions.device
    y = ((torch.arange(height, device=device) + 0.5) / height).view(1, 1, height, 1)
    x = ((torch.arange(width, device=device) + 0.5) / width).view(1, 1, 1, width)
    px, py = x - cx.view(-1, 1, 1, 1), y - cy.view(-1, 1, 1, 1)  # [N, 1, 1, W], [N, 1, H, 1]
    window = (px.abs() <= 0.25) & (py.abs() <= 0.25)  # [N, 1, H, W]
    region = regions.unsqueeze(1) & window
    area = region.flatten(1).float().sum(1) / (height * width)  # [N]
    thetas = (torch.arange(THETAS, device=device) * math.pi / THETAS).view(1, -1, 1, 1)
    scores = []
    for shape in SHAPES:
        best = torch.zeros(count, device=device)
        for factor in SIZE_FACTORS:
            size = ((area / SHAPE_AREAS[shape]).sqrt() * factor).view(-1, 1, 1, 1)
            template = _shape_sdf(shape, px, py, thetas, size) < 0  # [N, THETAS, H, W]
            inter = (template & region).flatten(2).sum(2).float()
            union = ((template | region) & window).flatten(2).sum(2).float().clamp(min=1)
            best = torch.maximum(best, (inter / union).amax(1))
        scores.append(best)
    return torch.stack(scores, 1)


def check_video(video: torch.Tensor, truth: VideoTruth) -> dict[str, list[bool]]:
    """Each check's pass/fail per category for one video `[3, frames, H, W]` in [0, 1]."""
    frames, height, width = video.shape[1:]
    device = video.device
    labels = colour_labels(video, truth.background, truth.tone)
    colours = torch.tensor([PALETTE.index(o.colour) for o in truth.objects], device=device)
    masks = opening((labels.unsqueeze(0) == colours.view(-1, 1, 1, 1)).flatten(0, 1)).view(-1, frames, height,
                                                                                           width)  # [O, F, H, W]
    pixels = masks.flatten(2).float().sum(2)  # [O, F]
    x = ((torch.arange(width, device=device) + 0.5) / width).view(1, 1, 1, width)
    y = ((torch.arange(height, device=device) + 0.5) / height).view(1, 1, height, 1)
    cx = (masks * x).flatten(2).sum(2) / pixels.clamp(min=1)
    cy = (masks * y).flatten(2).sum(2) / pixels.clamp(min=1)
    area, centres = (pixels / (height * width)).cpu(), torch.stack([cx, cy], -1).double().cpu()  # [O, F], [O, F, 2]
    result: dict[str, list[bool]] = {"colour": [], "motion": [], "shape": []}
    picks: list[tuple[int, int]] = []  # (object, frame) of the shape check
    for o, obj in enumerate(truth.objects):
        checked = list(_frame_range(frames, obj.frames))
        present = [f for f in checked if area[o, f] >= MIN_AREA]
        result["colour"].append(2 * len(present) >= len(checked))
        if obj.motion is not None:
            result["motion"].append(_moves_as_captioned(centres[o], present, obj.motion, truth.correction, frames))
        if obj.check_shape:
            picks += [(o, f) for f in sorted(present, key=lambda f: -float(area[o, f]))[:3]]
    if picks:
        index_o = torch.tensor([o for o, _ in picks], device=device)
        index_f = torch.tensor([f for _, f in picks], device=device)
        scores = shape_scores(masks[index_o, index_f], cx[index_o, index_f], cy[index_o, index_f]).cpu()
    for o, obj in enumerate(truth.objects):
        if obj.check_shape:
            rows = [i for i, (p, _) in enumerate(picks) if p == o]
            fitted = SHAPES[int(scores[rows].sum(0).argmax())] if rows else None
            result["shape"].append(fitted == obj.shape)
    return result


def _moves_as_captioned(centres: torch.Tensor, present: list[int], motion: str, correction: tuple[float, float],
                        frames: int) -> bool:
    """Fit the centroid `[frames, 2]` over the `present` frames with a line; judge its displacement over the clip."""
    if len(present) < 4:
        return False
    c = centres[present]  # [present, 2]
    t = torch.tensor(present, dtype=torch.float64) / max(frames - 1, 1)
    t = t - t.mean()
    slope = (t[:, None] * (c - c.mean(0))).sum(0) / (t * t).sum()  # displacement over the whole clip
    rel = slope + torch.tensor(correction, dtype=torch.float64)
    if motion == "still":
        return float(rel.norm()) < MIN_TRAVEL
    dx, dy = DIRECTIONS[motion]
    along = float(rel[0] * dx + rel[1] * dy)
    across = abs(float(-rel[0] * dy + rel[1] * dx))
    return along >= MIN_TRAVEL and along > across


CATEGORIES = ("colour", "motion", "shape", "all")


def caption_scores(videos: torch.Tensor, truths: Sequence[VideoTruth]) -> dict[str, torch.Tensor]:
    """Per video, the share of checks passed per category and over all checks: `{category: [videos]}` (nan
    where a video has no check of a category)."""
    scores: dict[str, list[float]] = {c: [] for c in CATEGORIES}
    for video, truth in zip(videos, truths, strict=True):
        checks = check_video(video, truth)
        pooled = [v for c in ("colour", "motion", "shape") for v in checks[c]]
        for category in CATEGORIES:
            values = pooled if category == "all" else checks[category]
            scores[category].append(sum(values) / len(values) if values else float("nan"))
    return {c: torch.tensor(v, dtype=torch.float64) for c, v in scores.items()}


def nanmean_interval(values: torch.Tensor, clusters: Sequence[int]) -> Interval:
    """The clustered interval over the videos that have a value."""
    keep = ~torch.isnan(values)
    return clustered_interval(values[keep], [c for c, k in zip(clusters, keep.tolist(), strict=True) if k])
