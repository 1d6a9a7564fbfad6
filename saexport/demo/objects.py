"""Procedural captioned videos of textured objects: `wan2.1-eval`'s training data, calibration and test set.

`wan2.1-demo`'s videos (videos.py) are periodic full-frame textures that every token can attend to; these are
made to be *local*, as natural video is: two to four objects, each a colour with its own texture (band-limited
noise and a shading gradient that move with it), move over a non-periodic background (a smooth gradient, or
band-limited noise at a low or a middle frequency) that the camera may pan across, and pass over each other in
depth order. The caption says what is drawn, back to front:
"a red circle moving left and a white square and an orange ring moving up on blue clouds camera panning down".
What the caption leaves open (sizes, travel, texture detail) is a `Look`: `PLAIN` is wan2.1-eval's (wan2.1-eval2
draws the same videos at twice the resolution). Other looks were tried as the videos of a successor evaluation
model (issue 26: detail at several scales, background clutter, incoherent textures) and made attention no more
local; docs/BENCHMARKS.md names the commits that drew them.

Motions are relative to the background (what a viewer reads as the object's own motion); a camera pan moves the
whole picture the other way, slower than any moving object (pans travel 0.08-0.16 of the frame over the clip,
objects 0.3-0.5), so on screen a moving object still moves in its captioned direction.
`Scene`'s fields are the truth a caption checker needs (colours, shapes, motions, depth order, background, pan).

Backgrounds and object textures are sums of plane waves of random direction, frequency (in a band) and phase:
band-limited, non-periodic noise whose value is exact at any sub-pixel offset, so one scene renders alike at any
resolution and a pan is an exact shift. Videos are fp32 `[batch, 3, frames, height, width]` in [-1, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# One palette, one set of shapes and one held-out rule with the demo's videos: the same words mean the same.
from saexport.demo.videos import COLOURS, DIRECTIONS, PANS, SHAPES, _shape_sdf, draw_scenes, is_held_out

__all__ = ["PLAIN", "PHRASE_STARTS", "VOCABULARY", "MAX_WORDS", "Look", "ObjectSpec", "Scene",
           "is_held_out", "random_scene", "render", "scenes"]

BACKGROUNDS = ("gradient", "clouds", "noise")
# Cycles per frame width of each background's waves: smooth, low-frequency, middle-frequency.
BACKGROUND_BANDS = {"gradient": (0.3, 1.0), "clouds": (1.5, 4.0), "noise": (4.0, 9.0)}
MIN_OBJECTS, MAX_OBJECTS = 2, 4


@dataclass(frozen=True)
class Look:
    """How a scene is drawn, beyond what its caption says: sizes, travel, and the objects' texture.

    An object's texture is a sum of octaves, each `(band, weight)`: 24 waves of magnitudes in the band (cycles per
    frame width, below the Nyquist rate of a 32-pixel frame, 16 cycles), the octave's field scaled by its weight."""

    object_octaves: tuple[tuple[tuple[float, float], float], ...]
    object_contrast: float  # an object's brightness is 1 - contrast + contrast * tanh(texture), times shading
    size: tuple[float, float]  # object radius, frame widths
    travel: tuple[float, float]  # a moving object's travel over the clip, frame widths


# wan2.1-eval's videos: faintly textured objects on a background of one scale.
PLAIN = Look(object_octaves=(((6.0, 11.0), 1.0),), object_contrast=0.2, size=(0.09, 0.16), travel=(0.3, 0.5))
STILL_FRACTION = 0.2  # objects that do not move (the caption names no motion)

VOCABULARY = (
    ["a", "an", "and", "on", "camera", "panning", "moving", *PANS]
    + list(COLOURS) + list(SHAPES) + list(BACKGROUNDS)
)
# The words that open a caption's phrases (an object's, the background's, the pan's): the text encoder's phrase
# context (word_encoder.py) binds each object's words to one another.
PHRASE_STARTS = ("and", "on", "camera")
# The longest caption: four moving objects ("a red circle moving left" and ...), background, camera pan.
MAX_WORDS = MAX_OBJECTS * 5 + (MAX_OBJECTS - 1) + 3 + 3


@dataclass(frozen=True)
class ObjectSpec:
    shape: str
    colour: str
    motion: str | None  # "left", "right", "up" or "down" relative to the background; None: still

    def caption(self) -> str:
        article = "an" if self.colour[0] in "aeiou" else "a"
        return f"{article} {self.colour} {self.shape}" + (f" moving {self.motion}" if self.motion else "")


@dataclass(frozen=True)
class Scene:
    objects: tuple[ObjectSpec, ...]  # back to front: a later object passes over an earlier one
    background: str  # a colour name, distinct from every object's colour
    kind: str  # one of BACKGROUNDS
    pan: str | None  # camera pan direction (the picture moves the other way), or None for a static camera

    def caption(self) -> str:
        text = " and ".join(o.caption() for o in self.objects) + f" on {self.background} {self.kind}"
        return text + (f" camera panning {self.pan}" if self.pan else "")


def random_scene(gen: torch.Generator) -> Scene:
    """A scene drawn from the caption grammar; a seeded generator gives the same scene everywhere."""

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=gen))]

    def chance(p: float) -> bool:
        return bool(torch.rand((), generator=gen) < p)

    background = pick(list(COLOURS))
    count = MIN_OBJECTS + int(torch.randint(MAX_OBJECTS - MIN_OBJECTS + 1, (1,), generator=gen))
    # Distinct colours, none the background's: a checker can find each object by its colour.
    free = [c for c in COLOURS if c != background]
    order = torch.randperm(len(free), generator=gen)[:count].tolist()
    objects = tuple(
        ObjectSpec(pick(SHAPES), free[i], None if chance(STILL_FRACTION) else pick(PANS)) for i in order
    )
    pan = pick(PANS) if chance(0.5) else None
    return Scene(objects, background, pick(BACKGROUNDS), pan)


def scenes(count: int, seed: int, held_out: bool = False) -> list[Scene]:
    """`count` training scenes (or, with `held_out`, test scenes) drawn from a seed."""
    return draw_scenes(random_scene, count, seed, held_out)


def render(scene_list: list[Scene], frames: int, height: int, width: int, seed: int,
           device: str | torch.device = "cpu", look: Look = PLAIN) -> torch.Tensor:
    """Videos `[len(scene_list), 3, frames, height, width]` in [-1, 1]; `seed` draws positions, sizes, speeds,
    textures and the pan's speed (the caption fixes what is drawn, the seed where and how). Every random draw
    comes from one CPU generator, so a seed gives the same video on any device and at any resolution."""
    gen = torch.Generator().manual_seed(seed)
    videos = [_render_scene(scene, frames, height, width, gen, torch.device(device), look) for scene in scene_list]
    return torch.stack(videos) * 2 - 1


class _Draw:
    """Uniform draws from the scene's generator, as Python floats or CPU tensors."""

    def __init__(self, gen: torch.Generator):
        self.gen = gen

    def uniform(self, lo: float, hi: float, shape: tuple[int, ...] = ()) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(shape, generator=self.gen, dtype=torch.float64)

    def angle(self, shape: tuple[int, ...] = ()) -> torch.Tensor:
        return self.uniform(0.0, 2 * math.pi, shape)


def _render_scene(scene: Scene, frames: int, height: int, width: int, gen: torch.Generator,
                  device: torch.device, look: Look) -> torch.Tensor:
    draw = _Draw(gen)
    t = torch.linspace(0, 1, frames, dtype=torch.float64)  # clip time, 0 -> 1
    # Screen coordinates in frame widths/heights (pixel centres); the world is what the camera looks at.
    y = ((torch.arange(height, dtype=torch.float64) + 0.5) / height).to(device)
    x = ((torch.arange(width, dtype=torch.float64) + 0.5) / width).to(device)
    pixel = 1.0 / max(height, width)

    # The camera's offset at each frame (zero mid-clip): a screen point shows world point screen + camera.
    pan_x, pan_y = DIRECTIONS[scene.pan] if scene.pan else (0.0, 0.0)
    pan = float(draw.uniform(0.08, 0.16))
    camera = torch.stack([pan_x * pan * (t - 0.5), pan_y * pan * (t - 0.5)], -1)  # [frames, 2]

    field = _background_field(scene.kind, draw, camera, x, y)  # [frames, H, W], about N(0, 1)
    base = torch.tensor(COLOURS[scene.background], dtype=torch.float64, device=device).view(3, 1, 1, 1)
    light, dark = 0.3 + 0.6 * base, 0.05 + 0.3 * base
    tone = torch.sigmoid(1.3 * field)  # [frames, H, W] in (0, 1): where on the background's tone curve
    video = dark + (light - dark) * tone.unsqueeze(0)  # [3, frames, H, W]

    for spec in scene.objects:
        size = float(draw.uniform(*look.size))
        middle = draw.uniform(0.22, 0.78, (2,))
        dx, dy = DIRECTIONS[spec.motion] if spec.motion else (0.0, 0.0)
        travel = float(draw.uniform(*look.travel)) if spec.motion else 0.0
        world = middle + torch.tensor([dx, dy], dtype=torch.float64) * travel * (t - 0.5).unsqueeze(-1)
        centre = world - camera  # [frames, 2] on screen
        theta = float(draw.uniform(0.0, math.pi))
        # The texture and the shading live in the object's own coordinates: they move with it.
        texture = _octaves(draw, look.object_octaves, -centre, x, y)
        light_dir = float(draw.angle())
        px, py = _offsets(centre, x, y)
        shading = 1 + 0.3 * ((px * math.cos(light_dir) + py * math.sin(light_dir)) / size).clamp(-1, 1)
        colour = torch.tensor(COLOURS[spec.colour], dtype=torch.float64, device=device).view(3, 1, 1, 1)
        brightness = 1 - look.object_contrast + look.object_contrast * torch.tanh(texture)
        surface = (colour * brightness * shading).clamp(0, 1)
        alpha = _coverage(spec.shape, px, py, theta, size, pixel).unsqueeze(0)
        video = video * (1 - alpha) + surface * alpha
    return video.clamp(0, 1).float()


def _offsets(centre: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each pixel's offset from a per-frame screen point `centre` `[frames, 2]`: x `[frames, 1, W]`, y `[frames, H,
    1]`."""
    centre = centre.to(x.device)
    return x.view(1, 1, -1) - centre[:, 0].view(-1, 1, 1), y.view(1, -1, 1) - centre[:, 1].view(-1, 1, 1)


def _coverage(shape: str, px: torch.Tensor, py: torch.Tensor, theta: float, size: float,
              pixel: float) -> torch.Tensor:
    """How much of each pixel a shape covers, its edge anti-aliased over about a pixel: `[frames, H, W]`."""
    sdf = _shape_sdf(shape, px, py, torch.tensor(theta, dtype=torch.float64, device=px.device), size)
    return torch.sigmoid(-sdf / (0.6 * pixel))


def _background_field(kind: str, draw: _Draw, camera: torch.Tensor, x: torch.Tensor, y: torch.Tensor):
    band = BACKGROUND_BANDS[kind]
    waves = _waves(draw, {"gradient": 6, "clouds": 24, "noise": 48}[kind], band)
    field = _wave_field(waves, camera, x, y)
    if kind == "gradient":
        # A linear ramp across the frame in a random direction, its low-frequency waves a gentle unevenness.
        angle = float(draw.angle())
        u = torch.tensor([math.cos(angle), math.sin(angle)], dtype=torch.float64)
        offset = (camera @ u).to(x.device).view(-1, 1, 1)
        ramp = 2.5 * ((x.view(1, 1, -1) - 0.5) * u[0] + (y.view(1, -1, 1) - 0.5) * u[1] + offset)
        field = ramp + 0.5 * field
    return field


def _octaves(draw: _Draw, octaves: tuple[tuple[tuple[float, float], float], ...], offset: torch.Tensor,
             x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | float:
    """The sum of `octaves` at `offset` per frame, each scaled by its weight."""
    return sum((weight * _wave_field(_waves(draw, 24, band), offset, x, y) for band, weight in octaves), 0.0)


def _waves(draw: _Draw, count: int, band: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` plane waves: wave vectors `[count, 2]` (cycles per frame, random directions, magnitudes in
    `band`) and phases `[count]`."""
    angle = draw.angle((count,))
    magnitude = draw.uniform(*band, (count,))
    return torch.stack([magnitude * angle.cos(), magnitude * angle.sin()], -1), draw.angle((count,))


def _wave_field(waves: tuple[torch.Tensor, torch.Tensor], offset: torch.Tensor, x: torch.Tensor,
                y: torch.Tensor) -> torch.Tensor:
    """sqrt(2 / K) sum_k sin(2 pi k . (p + offset_t) + phase_k) on the pixel grid, about N(0, 1): `[frames, H, W]`.

    Each wave factors into a frame term, a row term and a column term, so the sum is one batched product."""
    vectors, phases = waves
    frame_term = torch.polar(torch.full_like(phases, math.sqrt(2 / len(phases))),
                             phases + 2 * math.pi * offset @ vectors.T)  # [frames, K]
    device = x.device
    columns = torch.polar(torch.ones(len(x), len(phases), dtype=torch.float64, device=device),
                          2 * math.pi * x.view(-1, 1) * vectors[:, 0].to(device))  # [W, K]
    rows = torch.polar(torch.ones(len(y), len(phases), dtype=torch.float64, device=device),
                       2 * math.pi * y.view(-1, 1) * vectors[:, 1].to(device))  # [H, K]
    weighted = frame_term.to(device).unsqueeze(1) * rows.unsqueeze(0)  # [frames, H, K]
    return (weighted @ columns.T).imag  # [frames, H, W]
