"""Procedural captioned videos of textured objects: `wan2.1-eval`'s training data, calibration and test set.

`wan2.1-demo`'s videos (videos.py) are periodic full-frame textures that every token can attend to; these are
made to be *local*, as natural video is: two to four objects, each a colour with its own texture (band-limited
noise and a shading gradient that move with it), move over a non-periodic background (a smooth gradient, or
band-limited noise at a low or a middle frequency) that the camera may pan across, and pass over each other in
depth order. The caption says what is drawn, back to front:
"a red circle moving left and a white square and an orange ring moving up on blue clouds camera panning down".
What the caption leaves open (sizes, travel, how much texture detail, at which scales) is a `Look`: `PLAIN` is
wan2.1-eval's; `DETAILED` adds detail at several scales, smaller and slower objects; `CLUTTERED` adds small still
shapes in the background's tones; `INCOHERENT` is DETAILED with textures of many more waves (the last three were
candidates for wan2.1-eval's successor, issue 26; wan2.1-eval2 draws PLAIN videos at twice the resolution).

Motions are relative to the background (what a viewer reads as the object's own motion); a camera pan moves the
whole picture the other way, slower than any moving object (pans travel 0.08-0.16 of the frame over the clip,
objects 0.3-0.5, or 0.2-0.35 in DETAILED), so on screen a moving object still moves in its captioned direction.
`Scene`'s fields are the truth a caption checker needs (colours, shapes, motions, depth order, background, pan).

Backgrounds and object textures are sums of plane waves of random direction, frequency (in a band) and phase:
band-limited, non-periodic noise whose value is exact at any sub-pixel offset, so one scene renders alike at any
resolution and a pan is an exact shift. Videos are fp32 `[batch, 3, frames, height, width]` in [-1, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

# One palette, one set of shapes and one held-out rule with the demo's videos: the same words mean the same.
from saexport.demo.videos import COLOURS, DIRECTIONS, PANS, SHAPES, _shape_sdf, draw_scenes, is_held_out

__all__ = ["CLUTTERED", "DETAILED", "INCOHERENT", "PLAIN", "VOCABULARY", "MAX_WORDS", "Look", "ObjectSpec", "Scene",
           "is_held_out", "random_scene", "render", "scenes"]

BACKGROUNDS = ("gradient", "clouds", "noise")
# Cycles per frame width of each background's waves: smooth, low-frequency, middle-frequency.
BACKGROUND_BANDS = {"gradient": (0.3, 1.0), "clouds": (1.5, 4.0), "noise": (4.0, 9.0)}
MIN_OBJECTS, MAX_OBJECTS = 2, 4


@dataclass(frozen=True)
class Look:
    """How a scene is drawn, beyond what its caption says: sizes, travel, and texture detail.

    A texture is a sum of octaves, each `(band, weight)`: waves of magnitudes in the band (cycles per frame
    width, below the Nyquist rate of a 32-pixel frame, 16 cycles), the octave's field scaled by its weight."""

    object_octaves: tuple[tuple[tuple[float, float], float], ...]
    object_contrast: float  # an object's brightness is 1 - contrast + contrast * tanh(texture), times shading
    background_detail: tuple[tuple[tuple[float, float], float], ...]  # octaves added to every background's field
    size: tuple[float, float]  # object radius, frame widths
    travel: tuple[float, float]  # a moving object's travel over the clip, frame widths
    clutter: tuple[int, int] = (0, 0)  # how many small still shapes the background carries, in its own tones
    clutter_size: tuple[float, float] = (0.0, 0.0)  # their radius, frame widths
    # Waves in each texture field. 0: a fixed few (24 an octave; 6, 24 or 48 a background), which leaves a field
    # coherent across the frame: a few dozen sinusoids that every region shows. > 0: this many per real Fourier mode
    # of the band on a frame-sized torus (pi (hi^2 - lo^2) / 2), a field with as many degrees of freedom as the band
    # has, whose distant parts are as good as independent.
    waves_per_mode: float = 0.0


# wan2.1-eval's videos: faintly textured objects on a background of one scale.
PLAIN = Look(object_octaves=(((6.0, 11.0), 1.0),), object_contrast=0.2, background_detail=(),
             size=(0.09, 0.16), travel=(0.3, 0.5))
# Detail at several scales everywhere, smaller objects, slower motion (issue 26): in natural video a token's
# nearest neighbours in space and time predict its detail and distant tokens do not; on PLAIN videos the rest of a
# flat object or background predicts a token as well as its neighbours do. Measured: no more local than PLAIN
# (docs/BENCHMARKS.md, "A successor evaluation model").
DETAILED = Look(object_octaves=(((3.0, 6.0), 1.0), ((6.0, 10.0), 0.8), ((10.0, 14.0), 0.6)), object_contrast=0.22,
                background_detail=(((6.0, 10.0), 0.7), ((10.0, 14.0), 0.5)), size=(0.08, 0.14), travel=(0.2, 0.35))
# DETAILED on a cluttered background: many small still shapes in the background's own tones (the caption check
# reads them as background). Natural scenes are not stationary: what lies in one place says little about what lies
# a few objects away, while every one of PLAIN's and DETAILED's backgrounds is one texture over the whole frame, so
# the best estimate of a noisy background token averages all of it. Clutter makes the nearest tokens, in space and
# at the same place in other frames, the ones worth attending to. Measured: no more local either.
CLUTTERED = replace(DETAILED, clutter=(24, 48), clutter_size=(0.03, 0.08))
# DETAILED with every texture a generic band-limited field (issue 26): in PLAIN, DETAILED and CLUTTERED a texture is
# a few dozen sinusoids, which a head pooling the whole frame might estimate better than a neighbourhood can, where a
# natural texture's far parts say nothing about a token. The same bands and weights, two waves per mode (a sum near
# enough to Gaussian). Measured: no more local either (0.554 of the mass at 30%, the others' 0.55-0.58 at that length).
INCOHERENT = replace(DETAILED, waves_per_mode=2.0)
STILL_FRACTION = 0.2  # objects that do not move (the caption names no motion)

VOCABULARY = (
    ["a", "an", "and", "on", "camera", "panning", "moving", *PANS]
    + list(COLOURS) + list(SHAPES) + list(BACKGROUNDS)
)
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

    field = _background_field(scene.kind, draw, look, camera, x, y)  # [frames, H, W], about N(0, 1)
    field = field + _octaves(draw, look, look.background_detail, camera, x, y)
    base = torch.tensor(COLOURS[scene.background], dtype=torch.float64, device=device).view(3, 1, 1, 1)
    light, dark = 0.3 + 0.6 * base, 0.05 + 0.3 * base
    tone = torch.sigmoid(1.3 * field)  # [frames, H, W] in (0, 1): where on the background's tone curve
    tone = _clutter(tone, look, draw, camera, x, y, pixel)
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
        texture = _octaves(draw, look, look.object_octaves, -centre, x, y)
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


def _clutter(tone: torch.Tensor, look: Look, draw: _Draw, camera: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
             pixel: float) -> torch.Tensor:
    """`tone` with look.clutter's shapes drawn over it, each one flat tone, fixed in the world (a pan moves them)."""
    if look.clutter[1] == 0:  # no draws: PLAIN's and DETAILED's videos stay as they were
        return tone
    lo, hi = look.clutter
    for _ in range(lo + int(torch.randint(hi - lo + 1, (1,), generator=draw.gen))):
        shape = SHAPES[int(torch.randint(len(SHAPES), (1,), generator=draw.gen))]
        size = float(draw.uniform(*look.clutter_size))
        world = draw.uniform(-0.1, 1.1, (2,))  # the pan shows up to 0.08 of the world beyond each edge
        px, py = _offsets(world - camera, x, y)
        theta = float(draw.uniform(0.0, math.pi))
        level = float(draw.uniform(0.0, 1.0))
        alpha = _coverage(shape, px, py, theta, size, pixel)
        tone = tone * (1 - alpha) + level * alpha
    return tone


def _background_field(kind: str, draw: _Draw, look: Look, camera: torch.Tensor, x: torch.Tensor, y: torch.Tensor):
    band = BACKGROUND_BANDS[kind]
    waves = _waves(draw, _wave_count(look, band, {"gradient": 6, "clouds": 24, "noise": 48}[kind]), band)
    field = _wave_field(waves, camera, x, y)
    if kind == "gradient":
        # A linear ramp across the frame in a random direction, its low-frequency waves a gentle unevenness.
        angle = float(draw.angle())
        u = torch.tensor([math.cos(angle), math.sin(angle)], dtype=torch.float64)
        offset = (camera @ u).to(x.device).view(-1, 1, 1)
        ramp = 2.5 * ((x.view(1, 1, -1) - 0.5) * u[0] + (y.view(1, -1, 1) - 0.5) * u[1] + offset)
        field = ramp + 0.5 * field
    return field


def _octaves(draw: _Draw, look: Look, octaves: tuple[tuple[tuple[float, float], float], ...],
             offset: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | float:
    """The sum of `octaves` at `offset` per frame, each scaled by its weight; 0 for none."""
    return sum((weight * _wave_field(_waves(draw, _wave_count(look, band, 24), band), offset, x, y)
                for band, weight in octaves), 0.0)


def _wave_count(look: Look, band: tuple[float, float], few: int) -> int:
    """How many waves a field of `band` sums: `few`, or look.waves_per_mode per real Fourier mode of the band
    when that is more."""
    if look.waves_per_mode == 0:
        return few
    return max(few, math.ceil(look.waves_per_mode * math.pi * (band[1] ** 2 - band[0] ** 2) / 2))


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
