"""Latents -> pixels through the model's codec (Wan's VAE, diffusers `AutoencoderKLWan`; or none, for a model
whose latents are pixels), and pixels -> GIF / MP4 files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from saexport.artifacts import artifact_kind
from saexport.atomic import atomic_path
from saexport.errors import SaexportError
from saexport.models.presets import LatentCodec

FPS = 16  # Wan2.1's frame rate
SIGNATURE = b"saexport generate"  # in a GIF's comment: the file is one saexport wrote, replaceable on a rerun
VIDEO_SUFFIXES = (".gif", ".mp4")
OUTPUT_SUFFIXES = (".safetensors", *VIDEO_SUFFIXES)


def write_latents(latents: torch.Tensor, path: Path) -> None:
    """Latents `[1, channels, f, h, w]` as `.safetensors` (tensor `latents`)."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({"latents": latents.contiguous()}, str(tmp), metadata={"kind": json.dumps("latents")})


def written_by_generate(path: Path) -> bool:
    """Whether an existing output file is one `generate` wrote (latents, or a GIF with its signature); an MP4
    carries no mark, so an existing one is never taken for saexport's."""
    if path.suffix.lower() == ".safetensors":
        return artifact_kind(path) == "latents"
    if path.suffix.lower() == ".gif":
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as image:
                return image.info.get("comment") == SIGNATURE
        except (OSError, UnidentifiedImageError):
            return False
    return False


def latents_to_frames(codec: LatentCodec, latents: torch.Tensor, vae_path: str | Path | None,
                      device: str | torch.device = "cpu") -> np.ndarray:
    """uint8 frames `[frames, height, width, 3]` of latents `[1, channels, f, h, w]`."""
    if codec.name == "pixels":
        return _to_uint8(latents[0])
    if vae_path is None:
        raise SaexportError("a video of Wan2.1 latents needs a `vae` (the checkpoint's vae/ folder); "
                            "or write .safetensors")
    return decode_latents(load_vae(vae_path, device), latents)


def load_vae(vae_path: str | Path, device: str | torch.device = "cpu"):
    """diffusers' `AutoencoderKLWan` from a folder, on `device`, in fp32 (Wan's pipeline decodes in fp32: the VAE's
    causal convolutions drift in bf16), tiled so that 720p x 81 decodes within a GPU's memory."""
    from diffusers import AutoencoderKLWan

    path = Path(vae_path)
    if not (path / "config.json").is_file():
        raise SaexportError(f"{path} is not a diffusers AutoencoderKLWan folder (config.json + weights)")
    vae = AutoencoderKLWan.from_pretrained(str(path), torch_dtype=torch.float32).to(device).eval()
    vae.enable_tiling()
    return vae


def decode_latents(vae, latents: torch.Tensor) -> np.ndarray:
    """uint8 frames `[frames, height, width, 3]` from latents `[1, 16, f, h, w]`, as Wan's pipeline decodes."""
    device = next(vae.parameters()).device
    mean = torch.tensor(vae.config.latents_mean, device=device).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, device=device).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        video = vae.decode(latents.to(device, torch.float32) * std + mean).sample  # [1, 3, frames, H, W] in [-1, 1]
    return _to_uint8(video[0].cpu())


def _to_uint8(video: torch.Tensor) -> np.ndarray:
    """`[3, frames, H, W]` in [-1, 1] -> uint8 `[frames, H, W, 3]`."""
    frames = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return frames.permute(1, 2, 3, 0).numpy()


def write_video(frames: np.ndarray, path: str | Path, fps: int = FPS, scale: int = 1) -> None:
    """GIF or MP4 by the extension; `scale` enlarges each frame (nearest neighbour) for tiny videos."""
    import imageio.v3 as iio

    path = Path(path)
    if path.suffix.lower() not in VIDEO_SUFFIXES:
        raise SaexportError(f"write videos as .gif or .mp4, not {path.suffix}")
    if scale < 1:
        raise SaexportError(f"the scale must be a positive integer, got {scale}")
    frames = frames.repeat(scale, axis=1).repeat(scale, axis=2)
    with atomic_path(path) as tmp:
        target = tmp.with_suffix(path.suffix)  # imageio picks the format by extension
        try:
            if path.suffix.lower() == ".gif":
                iio.imwrite(target, frames, extension=".gif", duration=1000 / fps, loop=0, comment=SIGNATURE)
            else:
                iio.imwrite(target, frames, extension=".mp4", fps=fps)
        except (ImportError, OSError, ValueError) as e:
            raise SaexportError(f"could not write {path}: {e} (MP4 needs imageio-ffmpeg)") from None
        target.replace(tmp)
