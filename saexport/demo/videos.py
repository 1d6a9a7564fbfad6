"""Procedural captioned videos: the demo model's training data, calibration prompts and held-out test set.

One or two shapes (circle, square, triangle, ring) move, rotate or change colour over a textured
background (stripes, checks, dots, waves) that the camera may pan across; the caption says all of it:
"a red circle moving left and a white square rotating on blue stripes camera panning up". Rendering is
vectorised torch (soft signed-distance edges, so shapes are anti-aliased) and runs on any device.
Videos are fp32 `[batch, 3, frames, height, width]` in [-1, 1]: the demo model's latents are pixels.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

COLOURS = {
    "red": (0.90, 0.12, 0.10), "green": (0.10, 0.72, 0.20), "blue": (0.12, 0.30, 0.95),
    "yellow": (0.96, 0.86, 0.10), "white": (0.95, 0.95, 0.95), "purple": (0.60, 0.20, 0.80),
    "orange": (1.00, 0.55, 0.10), "cyan": (0.10, 0.85, 0.90),
}
SHAPES = ("circle", "square", "triangle", "ring")
MOTIONS = ("moving left", "moving right", "moving up", "moving down", "rotating", "turning")
TEXTURES = ("stripes", "checks", "dots", "waves")
PANS = ("left", "right", "up", "down")
DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}

# Every word a caption can use, in a fixed order: the demo tokenizer's vocabulary.
VOCABULARY = (
    ["a", "an", "and", "on", "camera", "panning", "moving", "rotating", "turning", *PANS]
    + list(COLOURS) + list(SHAPES) + list(TEXTURES)
)


@dataclass(frozen=True)
class ShapeSpec:
    shape: str
    colour: str
    motion: str  # one of MOTIONS
    end_colour: str | None = None  # for "turning"

    def caption(self) -> str:
        motion = f"turning {self.end_colour}" if self.motion == "turning" else self.motion
        article = "an" if self.colour[0] in "aeiou" else "a"
        return f"{article} {self.colour} {self.shape} {motion}"


@dataclass(frozen=True)
class Scene:
    shapes: tuple[ShapeSpec, ...]
    background: str  # a colour name
    texture: str
    pan: str | None  # camera pan direction, or None for a static camera

    def caption(self) -> str:
        text = " and ".join(s.caption() for s in self.shapes) + f" on {self.background} {self.texture}"
        return text + (f" camera panning {self.pan}" if self.pan else "")


def random_scene(gen: torch.Generator) -> Scene:
    """A scene drawn from the caption grammar; a seeded generator gives the same scene everywhere."""

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=gen))]

    colours = list(COLOURS)
    background = pick(colours)
    shapes = []
    for _ in range(1 + int(torch.rand((), generator=gen) < 0.35)):
        shape = pick(SHAPES)
        colour = pick([c for c in colours if c != background])
        # A circle or ring looks the same rotated: give it a motion one can see.
        motion = pick([m for m in MOTIONS if not (m == "rotating" and shape in ("circle", "ring"))])
        end = pick([c for c in colours if c not in (colour, background)]) if motion == "turning" else None
        shapes.append(ShapeSpec(shape, colour, motion, end))
    pan = pick(PANS) if torch.rand((), generator=gen) < 0.5 else None
    return Scene(tuple(shapes), background, pick(TEXTURES), pan)


def is_held_out(caption: str) -> bool:
    """About one caption in ten never appears in training or calibration: the fidelity benchmark's test set."""
    return int(hashlib.sha256(caption.encode()).hexdigest(), 16) % 10 == 0


def scenes(count: int, seed: int, held_out: bool = False) -> list[Scene]:
    """`count` training scenes (or, with `held_out`, test scenes) drawn from a seed."""
    return draw_scenes(random_scene, count, seed, held_out)


def draw_scenes(draw: Callable[[torch.Generator], Any], count: int, seed: int, held_out: bool) -> list:
    """`count` scenes of `draw` from one seeded stream, keeping those on the asked side of the held-out split."""
    gen = torch.Generator().manual_seed(seed)
    chosen: list = []
    while len(chosen) < count:
        scene = draw(gen)
        if is_held_out(scene.caption()) == held_out:
            chosen.append(scene)
    return chosen


def render(scene_list: list[Scene], frames: int, height: int, width: int, seed: int,
           device: str | torch.device = "cpu") -> torch.Tensor:
    """Videos `[len(scene_list), 3, frames, height, width]` in [-1, 1]; `seed` draws positions, sizes,
    speeds and texture phases (the caption fixes what is drawn, the seed where and how)."""
    gen = torch.Generator().manual_seed(seed)
    videos = []
    for scene in scene_list:
        videos.append(_render_scene(scene, frames, height, width, gen))
    return torch.stack(videos).to(device) * 2 - 1


def _render_scene(scene: Scene, frames: int, height: int, width: int, gen: torch.Generator) -> torch.Tensor:
    def uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=gen))

    t = torch.linspace(0, 1, frames).view(frames, 1, 1)  # clip time, 0 -> 1
    y = (torch.arange(height) + 0.5).view(1, height, 1) / height
    x = (torch.arange(width) + 0.5).view(1, 1, width) / width
    pixel = 1.0 / max(height, width)

    # Background: two tones of the background colour in a texture, shifted by the camera pan.
    pan_x, pan_y = DIRECTIONS[scene.pan] if scene.pan else (0.0, 0.0)
    speed = uniform(0.25, 0.45)
    bx, by = x + pan_x * speed * t, y + pan_y * speed * t
    freq, angle, phase = uniform(3.0, 5.0), uniform(0, math.pi), uniform(0, 2 * math.pi)
    pattern = _texture(scene.texture, bx, by, freq, angle, phase)  # [frames, H, W] in [0, 1]
    base = torch.tensor(COLOURS[scene.background]).view(3, 1, 1, 1)
    light, dark = 0.35 + 0.45 * base, 0.08 + 0.3 * base
    video = dark + (light - dark) * pattern.unsqueeze(0)

    for spec in scene.shapes:
        size = uniform(0.13, 0.2)
        start_x, start_y = uniform(0.3, 0.7), uniform(0.3, 0.7)
        travel = uniform(0.25, 0.4)
        dx, dy = DIRECTIONS[spec.motion.split()[-1]] if spec.motion.startswith("moving") else (0.0, 0.0)
        cx = start_x - dx * travel / 2 + dx * travel * t
        cy = start_y - dy * travel / 2 + dy * travel * t
        turn = (uniform(0.5, 1.0) * math.pi * (1 if torch.rand((), generator=gen) < 0.5 else -1)
                if spec.motion == "rotating" else 0.0)
        theta = uniform(0, math.pi) + turn * t
        sdf = _shape_sdf(spec.shape, x - cx, y - cy, theta, size)
        alpha = torch.sigmoid(-sdf / (0.6 * pixel)).unsqueeze(0)  # [1, frames, H, W]
        start = torch.tensor(COLOURS[spec.colour]).view(3, 1, 1, 1)
        end = torch.tensor(COLOURS[spec.end_colour]).view(3, 1, 1, 1) if spec.end_colour else start
        colour = start + (end - start) * t.unsqueeze(0)
        video = video * (1 - alpha) + colour * alpha
    return video.clamp(0, 1)


def _texture(kind: str, x: torch.Tensor, y: torch.Tensor, freq: float, angle: float, phase: float) -> torch.Tensor:
    u = x * math.cos(angle) + y * math.sin(angle)
    v = -x * math.sin(angle) + y * math.cos(angle)
    if kind == "stripes":
        return 0.5 + 0.5 * torch.sin(2 * math.pi * freq * u + phase)
    if kind == "checks":
        return torch.sigmoid(8 * torch.sin(2 * math.pi * freq * u / 2 + phase) * torch.sin(2 * math.pi * freq * v / 2))
    if kind == "dots":
        du = torch.remainder(u * freq + phase, 1.0) - 0.5
        dv = torch.remainder(v * freq, 1.0) - 0.5
        return torch.sigmoid(30 * (0.3 - torch.sqrt(du**2 + dv**2)))
    if kind == "waves":
        return 0.5 + 0.5 * torch.sin(2 * math.pi * freq * (u + 0.08 * torch.sin(2 * math.pi * 2 * v)) + phase)
    raise ValueError(f"unknown texture {kind}")


def _shape_sdf(shape: str, px: torch.Tensor, py: torch.Tensor, theta: torch.Tensor, size: float) -> torch.Tensor:
    """Signed distance (negative inside) of a shape of radius `size` centred at the origin, rotated by theta."""
    c, s = torch.cos(theta), torch.sin(theta)
    u, v = c * px + s * py, -s * px + c * py
    if shape == "circle":
        return torch.sqrt(u**2 + v**2) - size
    if shape == "ring":
        return (torch.sqrt(u**2 + v**2) - size * 0.8).abs() - size * 0.3
    if shape == "square":
        half = size * 0.85
        return torch.maximum(u.abs(), v.abs()) - half
    if shape == "triangle":
        # Intersection of three half-planes whose normals are 120 degrees apart.
        normals = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        return torch.stack([u * nx + v * ny for nx, ny in normals]).amax(0) - size * 0.7
    raise ValueError(f"unknown shape {shape}")
