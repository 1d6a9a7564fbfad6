"""Video sizes -> latent shapes -> token grids, with Wan2.1's VAE (8x spatial, 4x temporal)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from saexport.errors import SaexportError

RESOLUTIONS = {"480p": (832, 480), "720p": (1280, 720)}  # width x height, as Wan2.1 generates
VAE_SPATIAL, VAE_TEMPORAL = 8, 4


@dataclass(frozen=True)
class VideoShape:
    width: int
    height: int
    frames: int

    def latent_shape(self, channels: int) -> tuple[int, int, int, int]:
        return (channels, (self.frames - 1) // VAE_TEMPORAL + 1, self.height // VAE_SPATIAL,
                self.width // VAE_SPATIAL)

    def token_grid(self, patch_size: tuple[int, int, int]) -> tuple[int, int, int]:
        _, f, h, w = self.latent_shape(1)
        pt, ph, pw = patch_size
        return (f // pt, h // ph, w // pw)

    def describe(self) -> str:
        return f"{self.width}x{self.height}x{self.frames}"


def parse_video_shape(resolution: str, frames: int) -> VideoShape:
    """`480p`, `720p` or `WxH`; frames = 4k+1; sizes divisible by 16 (VAE 8 x patch 2)."""
    if resolution in RESOLUTIONS:
        width, height = RESOLUTIONS[resolution]
    else:
        m = re.fullmatch(r"(\d+)x(\d+)", resolution)
        if not m:
            raise SaexportError(f"resolution '{resolution}' is not 480p, 720p or WIDTHxHEIGHT")
        width, height = int(m.group(1)), int(m.group(2))
    if width <= 0 or height <= 0 or width % 16 or height % 16:
        raise SaexportError(f"width and height must be positive multiples of 16, got {width}x{height}")
    if frames < 1 or (frames - 1) % VAE_TEMPORAL:
        raise SaexportError(f"frames must be 4k+1 (1, 5, ..., 81), got {frames}")
    return VideoShape(width, height, frames)
