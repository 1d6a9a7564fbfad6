"""Architecture presets: the diffusers `WanTransformer3DModel` config of each supported model."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from saexport.errors import SaexportError

# Fields that define the architecture; a checkpoint's config must agree with the preset on these.
ARCHITECTURE_FIELDS = (
    "patch_size",
    "num_attention_heads",
    "attention_head_dim",
    "in_channels",
    "out_channels",
    "text_dim",
    "freq_dim",
    "ffn_dim",
    "num_layers",
    "cross_attn_norm",
    "qk_norm",
    "eps",
)


def _wan_config(**overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "patch_size": [1, 2, 2],
        "num_attention_heads": 12,
        "attention_head_dim": 128,
        "in_channels": 16,
        "out_channels": 16,
        "text_dim": 4096,
        "freq_dim": 256,
        "ffn_dim": 8960,
        "num_layers": 30,
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
        "eps": 1e-6,
        "image_dim": None,
        "added_kv_proj_dim": None,
        "rope_max_seq_len": 1024,
    }
    config.update(overrides)
    return config


@dataclass(frozen=True)
class LatentCodec:
    """How a model's latents map to video pixels: the VAE's strides and latent channels."""

    name: str  # "wan-vae": diffusers' AutoencoderKLWan; "pixels": latents are RGB in [-1, 1]
    spatial: int
    temporal: int
    channels: int


WAN_VAE = LatentCodec("wan-vae", spatial=8, temporal=4, channels=16)
PIXELS = LatentCodec("pixels", spatial=1, temporal=1, channels=3)


@dataclass(frozen=True)
class RunDefaults:
    """The command-line defaults that suit a model: video size, blocks, sampler steps, precision."""

    resolution: str = "480p"
    frames: int = 81
    block_size: int = 128
    layout: str = "tile3d"
    steps: int = 50
    dtype: str = "bf16"


@dataclass(frozen=True)
class ModelPreset:
    name: str
    description: str
    config: dict[str, Any] = field(hash=False)
    text_len: int = 512  # tokens of the text encoder's output the DiT attends to
    codec: LatentCodec = WAN_VAE
    defaults: RunDefaults = RunDefaults()
    bundled_weights: Path | None = None  # a checkpoint shipped inside the package

    @property
    def num_heads(self) -> int:
        return self.config["num_attention_heads"]

    @property
    def head_dim(self) -> int:
        return self.config["attention_head_dim"]

    @property
    def num_layers(self) -> int:
        return self.config["num_layers"]

    @property
    def patch_size(self) -> tuple[int, int, int]:
        return tuple(self.config["patch_size"])  # type: ignore[return-value]

    def config_hash(self) -> str:
        return config_hash(self.config)


def config_hash(config: dict[str, Any]) -> str:
    """A short hash of the architecture fields: equal for the same architecture however it was loaded."""
    arch = {k: _normalise(config[k]) for k in ARCHITECTURE_FIELDS}
    return hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest()[:16]


def _normalise(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


# How the evaluation models (wan2.1-eval and its candidate successor) run: their training grid, bf16 as measured.
EVAL_RUN = RunDefaults(resolution="64x64", frames=16, block_size=64, layout="tile3d:4x4x4", steps=20, dtype="bf16")
# The same token grid (16x32x32) from four times the pixels: tokens of 4x4 pixels.
EVAL2_RUN = replace(EVAL_RUN, resolution="128x128")

PRESETS: dict[str, ModelPreset] = {
    p.name: p
    for p in [
        ModelPreset("wan2.1", "Wan2.1-T2V-1.3B", _wan_config()),
        ModelPreset(
            "wan2.1-14b",
            "Wan2.1-T2V-14B",
            _wan_config(num_attention_heads=40, ffn_dim=13824, num_layers=40),
        ),
        # Small presets with Wan2.1's exact structure, for tests and quick runs.
        ModelPreset(
            "wan2.1-tiny",
            "2 layers, 4 heads x 16: the structure of Wan2.1 at test size",
            _wan_config(num_attention_heads=4, attention_head_dim=16, text_dim=32, freq_dim=32,
                        ffn_dim=128, num_layers=2),
            text_len=8,
        ),
        # Trained by the project on procedural videos (saexport/demo): a model with learned attention
        # structure that runs on a CPU. Its latents are pixels (no VAE) and its text encoder is a word table.
        ModelPreset(
            "wan2.1-demo",
            "6 layers, 4 heads x 64, trained on procedural captioned videos (pixels, 32x32x16)",
            _wan_config(num_attention_heads=4, attention_head_dim=64, in_channels=3, out_channels=3, text_dim=64,
                        ffn_dim=1024, num_layers=6),
            text_len=24,
            codec=PIXELS,
            defaults=RunDefaults(resolution="32x32", frames=16, block_size=64, layout="tile3d:4x4x4", steps=20,
                                 dtype="fp32"),
            bundled_weights=Path(__file__).resolve().parent.parent / "demo" / "weights",
        ),
        # The fidelity benchmark's model: trained like wan2.1-demo but on local, non-periodic videos (textured
        # objects, saexport/demo/objects.py) at 16,384 tokens (16x32x32), cut into 256 blocks of 64 per row as
        # Wan2.1 480p is into 256 blocks of 128. 18.1M parameters: its fp16 weights stay under 36 MB.
        ModelPreset(
            "wan2.1-eval",
            "5 layers, 8 heads x 64, trained on procedural videos of textured objects (pixels, 64x64x16)",
            _wan_config(num_attention_heads=8, attention_head_dim=64, in_channels=3, out_channels=3, text_dim=64,
                        ffn_dim=1024, num_layers=5),
            text_len=32,
            codec=PIXELS,
            defaults=EVAL_RUN,
            bundled_weights=Path(__file__).resolve().parent.parent / "demo" / "eval_weights",
        ),
        # The candidate successor (issue 26): wan2.1-eval on the same videos at twice the resolution, each token a
        # 4x4-pixel patch instead of 2x2, so that a token holds more of the picture and its neighbours repeat less
        # of it, as a Wan2.1 token holds a VAE latent of 16x16 pixels (depth, detail, clutter and incoherent
        # textures were no more local: docs/BENCHMARKS.md). No weights ship while it is under study: give --weights.
        ModelPreset(
            "wan2.1-eval2",
            "5 layers, 8 heads x 64, 4x4-pixel tokens of wan2.1-eval's videos: under study, no weights (128x128x16)",
            _wan_config(patch_size=[1, 4, 4], num_attention_heads=8, attention_head_dim=64, in_channels=3,
                        out_channels=3, text_dim=64, ffn_dim=1024, num_layers=5),
            text_len=32,
            codec=PIXELS,
            defaults=EVAL2_RUN,
        ),
        ModelPreset(
            "wan2.1-small",
            "4 layers, 8 heads x 64: a small Wan2.1 for CPU experiments",
            _wan_config(num_attention_heads=8, attention_head_dim=64, text_dim=256, freq_dim=64,
                        ffn_dim=1024, num_layers=4),
            text_len=32,
        ),
    ]
}


def get_preset(name: str) -> ModelPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise SaexportError(f"unknown model '{name}'; known models: {', '.join(PRESETS)}") from None


def check_config_matches(preset: ModelPreset, config: dict[str, Any], source: str) -> None:
    """A checkpoint's own config wins over the preset, but may not contradict its architecture."""
    diffs = [
        f"{k}: checkpoint has {config[k]!r}, {preset.name} has {preset.config[k]!r}"
        for k in ARCHITECTURE_FIELDS
        if k in config and _normalise(config[k]) != _normalise(preset.config[k])
    ]
    if diffs:
        matching = [other.name for other in PRESETS.values() if all(
            _normalise(config[k]) == _normalise(other.config[k]) for k in ARCHITECTURE_FIELDS if k in config)]
        hint = (f"Pass --model {' or '.join(matching)}." if matching
                else f"It matches none of the presets saexport knows ({', '.join(PRESETS)}).")
        raise SaexportError(f"{source} is not a {preset.name} checkpoint ({preset.description}): "
                            + "; ".join(diffs) + ". " + hint)
