"""Video sizes -> latent shapes -> token grids, through the model's latent codec (Wan2.1's VAE: 8x spatial,
4x temporal; the demo model: pixels)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from saexport.errors import SaexportError
from saexport.models.presets import WAN_VAE, LatentCodec

RESOLUTIONS = {"480p": (832, 480), "720p": (1280, 720)}  # width x height, as Wan2.1 generates
PATCH = 2  # every preset's spatial patch


@dataclass(frozen=True)
class VideoShape:
    width: int
    height: int
    frames: int
    codec: LatentCodec = WAN_VAE

    def latent_shape(self) -> tuple[int, int, int, int]:
        c = self.codec
        return (c.channels, (self.frames - 1) // c.temporal + 1, self.height // c.spatial, self.width // c.spatial)

    def token_grid(self, patch_size: tuple[int, int, int]) -> tuple[int, int, int]:
        _, f, h, w = self.latent_shape()
        pt, ph, pw = patch_size
        return (f // pt, h // ph, w // pw)

    def describe(self) -> str:
        return f"{self.width}x{self.height}x{self.frames}"


def parse_video_shape(resolution: str, frames: int, codec: LatentCodec = WAN_VAE) -> VideoShape:
    """`480p`, `720p` or `WxH`; frames = 4k+1 with Wan's VAE; sizes divisible by the VAE's stride x patch 2."""
    if resolution in RESOLUTIONS:
        width, height = RESOLUTIONS[resolution]
    else:
        m = re.fullmatch(r"(\d+)x(\d+)", resolution)
        if not m:
            raise SaexportError(f"resolution '{resolution}' is not 480p, 720p or WIDTHxHEIGHT")
        width, height = int(m.group(1)), int(m.group(2))
    stride = codec.spatial * PATCH
    if width <= 0 or height <= 0 or width % stride or height % stride:
        raise SaexportError(f"width and height must be positive multiples of {stride}, got {width}x{height}")
    if frames < 1:
        raise SaexportError(f"`frames` must be at least 1, got {frames}")
    if (frames - 1) % codec.temporal:  # a codec of temporal stride 1 (pixels) takes any count
        raise SaexportError(f"`frames` must be {codec.temporal}k+1 (1, {1 + codec.temporal}, "
                            f"{1 + 2 * codec.temporal}, ...) with Wan's VAE, got {frames}")
    return VideoShape(width, height, frames, codec)


def video_of_grid(grid: tuple[int, int, int], patch_size: tuple[int, int, int], codec: LatentCodec) -> VideoShape:
    """The video whose tokens form `grid` (the inverse of `token_grid`)."""
    pt, ph, pw = patch_size
    return VideoShape(grid[2] * pw * codec.spatial, grid[1] * ph * codec.spatial,
                      (grid[0] * pt - 1) * codec.temporal + 1, codec)
