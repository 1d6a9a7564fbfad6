"""Load a Wan2.1 DiT from a local path (diffusers or original layout), or build it with random weights.

Weights are read tensor by tensor from safetensors into a model built on the meta device, so a 14B
checkpoint never exists twice in memory and nothing is randomly initialised only to be overwritten.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed
from safetensors import SafetensorError, safe_open

from saexport.errors import SaexportError
from saexport.models.presets import ModelPreset, check_config_matches, get_preset
from saexport.models.wan_keys import original_config_to_diffusers, original_to_diffusers_key

log = logging.getLogger("saexport")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = WEIGHTS_NAME + ".index.json"


@dataclass
class LoadedModel:
    """A DiT ready for export, with what the artifacts' metadata must record about it (the record itself,
    `runtime.generation.model_identity`, is built a layer up: `models` and `artifacts` are siblings)."""

    preset: ModelPreset
    transformer: WanTransformer3DModel
    weights_id: str  # sha256 of the weight tensors by canonical name (`hash_state`), or "random:<seed>"
    source: str
    path: Path | None = None  # the checkpoint folder (None for random weights)

    @property
    def random_weights(self) -> bool:
        return self.weights_id.startswith("random:")

    @property
    def dtype(self) -> torch.dtype:
        """The precision it was loaded in (the norms Wan keeps in fp32 aside)."""
        return self.transformer.patch_embedding.weight.dtype


@dataclass
class CheckpointLayout:
    kind: str  # "diffusers" or "original"
    config: dict[str, Any]  # diffusers config fields
    files: list[Path]


def dtype_name(dtype: torch.dtype) -> str:
    """fp32, fp16 or bf16: the name the options and the artifacts use."""
    return next(name for name, value in DTYPES.items() if value == dtype)


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise SaexportError(f"unknown dtype '{name}'; use one of {', '.join(DTYPES)}") from None


def load_model(
    model: str,
    weights: str | Path | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    random_weights: bool = False,
    seed: int = 0,
    random_device: str | torch.device = "cpu",
) -> LoadedModel:
    """A checkpoint folder (or the preset's bundled weights) as a diffusers transformer in `dtype`; or, with
    `random_weights`, the preset's architecture with seeded random weights drawn on `random_device` (a GPU
    draws a 14B model in seconds, where the host takes minutes and twice the model's fp32 size in memory; its
    generator differs, so its weights, and their id, differ from the host's for the same seed)."""
    preset = get_preset(model)
    if random_weights:
        if weights is not None:
            raise SaexportError("give either `weights` or `random_weights`, not both")
        log.warning("WARNING: %s has RANDOM WEIGHTS (seed %d): for speed measurements only; its outputs are noise.",
                    model, seed)
        device = torch.device(random_device)
        transformer = _build_meta(preset.config)
        state = _random_state(transformer, seed, device, dtype)
        _assign(transformer, state, dtype)
        weights_id = f"random:{seed}" + ("" if device.type == "cpu" else f"@{device.type}")
        return LoadedModel(preset, transformer, weights_id, f"RANDOM WEIGHTS (seed {seed})")
    weights = resolve_weights(preset, weights)
    layout = detect_layout(weights)
    check_config_matches(preset, layout.config, str(weights))
    if layout.config.get("_text_len", preset.text_len) != preset.text_len:
        raise SaexportError(f"{weights}: its config's text_len is {layout.config['_text_len']}, {preset.name} encodes "
                            f"prompts to {preset.text_len} tokens: not a {preset.name} checkpoint")
    config = {**preset.config, **layout.config}
    transformer = _build_meta(config)
    state = _read_state(layout)
    _check_state(transformer, state, str(weights))
    weights_id = hash_state(state)
    _assign(transformer, state, dtype)
    return LoadedModel(preset, transformer, weights_id, str(weights), weights)


def resolve_weights(preset: ModelPreset, weights: str | Path | None) -> Path:
    """The given checkpoint folder, else the one that ships with the package (wan2.1-demo's)."""
    if weights is not None:
        return Path(weights)
    if preset.bundled_weights is not None:
        return preset.bundled_weights
    raise SaexportError(f"model {preset.name!r} needs `weights`, a checkpoint folder (or `random_weights`, for "
                        "benchmarks)")


def detect_layout(path: Path) -> CheckpointLayout:
    """Find the checkpoint's config and weight files; clear errors for anything else."""
    if not path.exists():
        raise SaexportError(f"weights path {path} does not exist")
    if not path.is_dir():
        raise SaexportError(f"weights path {path} is not a directory (expected a Wan2.1 checkpoint folder)")
    for config_dir in (path / "transformer", path):
        config_file = config_dir / "config.json"
        if not config_file.is_file():
            continue
        try:
            config = json.loads(config_file.read_text())
        except json.JSONDecodeError as e:
            raise SaexportError(f"{config_file} is not valid JSON: {e}") from None
        if not isinstance(config, dict):
            raise SaexportError(f"{config_file} is not a JSON object of config fields (found a "
                                f"{type(config).__name__})")
        if config.get("_class_name") == "WanTransformer3DModel":
            return CheckpointLayout("diffusers", check_diffusers_config(config, config_file), _weight_files(config_dir))
        if "dim" in config and "num_heads" in config:
            try:
                diffusers_config = original_config_to_diffusers(config)
            except (KeyError, ValueError, TypeError) as e:
                raise SaexportError(f"{config_file}: not a usable Wan config ({e})") from None
            return CheckpointLayout("original", check_diffusers_config(diffusers_config, config_file),
                                    _weight_files(config_dir))
        if config_dir == path / "transformer" or "_class_name" in config:
            raise SaexportError(
                f"{config_file} describes a {config.get('_class_name', 'unknown model')}, not a Wan2.1 DiT"
            )
    raise SaexportError(
        f"{path} is neither a diffusers Wan2.1 checkpoint (transformer/config.json) nor an original Wan2.1 "
        "checkpoint (config.json with dim/num_heads beside diffusion_pytorch_model*.safetensors)"
    )


def check_diffusers_config(config: dict[str, Any], source: Path) -> dict[str, Any]:
    """A `WanTransformer3DModel` config whose fields the class takes, each of the type Wan2.1's presets give it:
    one line naming the field, not a TypeError from inside diffusers."""
    import inspect

    known = set(inspect.signature(WanTransformer3DModel.__init__).parameters) - {"self"}
    unknown = sorted(k for k in config if not k.startswith("_") and k not in known)
    if unknown:
        raise SaexportError(f"{source}: unknown config field {unknown[0]!r} (WanTransformer3DModel takes "
                            f"{', '.join(sorted(known))})")
    reference = get_preset("wan2.1").config
    for key, value in config.items():
        want = reference.get(key)
        if isinstance(want, bool):
            ok = isinstance(value, bool)
        elif isinstance(want, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(want, float):
            ok = isinstance(value, int | float) and not isinstance(value, bool)
        elif isinstance(want, list):
            ok = isinstance(value, list) and all(isinstance(x, int) for x in value)
        else:
            ok = True
        if not ok:
            raise SaexportError(f"{source}: config field {key!r} must be {type(want).__name__}, got {value!r}")
    return config


def _weight_files(folder: Path) -> list[Path]:
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise SaexportError(f"{index} is not a safetensors index: {e}") from None
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise SaexportError(f"{index} names shards that are missing: {', '.join(missing[:5])}")
        return files
    single = folder / WEIGHTS_NAME
    if single.is_file():
        return [single]
    files = sorted(folder.glob("diffusion_pytorch_model*.safetensors"))
    if not files:
        raise SaexportError(f"no diffusion_pytorch_model*.safetensors in {folder}")
    return files


def _read_state(layout: CheckpointLayout) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    for file in layout.files:
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    name = key if layout.kind == "diffusers" else original_to_diffusers_key(key)
                    if name is None:
                        unmapped.append(key)
                    else:
                        state[name] = f.get_tensor(key)
        except (SafetensorError, OSError) as e:
            raise SaexportError(f"{file} is not a readable safetensors file ({e})") from None
    if unmapped:
        raise SaexportError(
            f"unexpected keys in the original Wan checkpoint ({len(unmapped)}): {', '.join(unmapped[:5])}"
        )
    return state


def _check_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {', '.join(missing[:5])}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:5])}")
        raise SaexportError(f"{source} does not match the model: " + "; ".join(parts))
    wrong = [
        f"{k}: checkpoint {tuple(state[k].shape)}, model {tuple(v.shape)}"
        for k, v in expected.items()
        if tuple(state[k].shape) != tuple(v.shape)
    ]
    if wrong:
        raise SaexportError(f"{source}: shape mismatch ({len(wrong)}): " + "; ".join(wrong[:5]))
    broken = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        raise SaexportError(f"{source}: non-finite values (NaN or Inf) in {len(broken)} weight tensors: "
                            f"{', '.join(broken[:5])}; the checkpoint is corrupt")


def _build_meta(config: dict[str, Any]) -> WanTransformer3DModel:
    fields = {k: v for k, v in config.items() if not k.startswith("_")}
    fields["patch_size"] = tuple(fields["patch_size"])
    with torch.device("meta"):
        return WanTransformer3DModel(**fields)


def _keeps_fp32(name: str) -> bool:
    """diffusers' rule: modules named in `_keep_in_fp32_modules` stay fp32 in any dtype."""
    parts = name.split(".")
    return any(keep in parts for keep in WanTransformer3DModel._keep_in_fp32_modules)


def _assign(model: WanTransformer3DModel, state: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    cast = {k: v.to(torch.float32 if _keeps_fp32(k) else dtype) for k, v in state.items()}
    model.load_state_dict(cast, strict=True, assign=True)
    # Non-persistent RoPE buffers were built on the meta device: build them for real.
    cfg = model.config
    model.rope = WanRotaryPosEmbed(cfg.attention_head_dim, tuple(cfg.patch_size), cfg.rope_max_seq_len)
    model.eval().requires_grad_(False)


def _random_state(model: torch.nn.Module, seed: int, device: torch.device, dtype: torch.dtype
                  ) -> dict[str, torch.Tensor]:
    """Fan-in scaled normal weights: activations stay O(1) through the layers, as in a trained model. Each
    tensor is cast as soon as it is drawn, so memory peaks at the model in `dtype` plus one fp32 tensor."""
    gen = torch.Generator(device).manual_seed(seed)
    state = {}
    for name, ref in model.state_dict().items():
        noise = torch.randn(ref.shape, generator=gen, device=device)
        if name.endswith("scale_shift_table"):
            noise = noise / math.sqrt(ref.shape[-1])
        elif name.endswith(".bias"):
            noise = noise * 0.02
        elif ref.ndim == 1:  # norm weights
            noise = 1.0 + 0.05 * noise
        else:
            noise = noise / math.sqrt(math.prod(ref.shape[1:]))
        state[name] = noise.to(torch.float32 if _keeps_fp32(name) else dtype)
    return state


def hash_state(state: dict[str, torch.Tensor]) -> str:
    """The weights' identity: sha256 over the tensors by their diffusers name (sorted), each name, dtype, shape and
    bytes as stored. The same tensors are the same weights in either checkpoint layout and any sharding."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


@dataclass(frozen=True)
class ModelSource:
    """Which model: a preset and its checkpoint (or random weights, for speed measurements only)."""

    model: str
    weights: Path | None = None
    random_weights: bool = False
    weights_seed: int = 0  # the seed of random weights

    @property
    def preset(self) -> ModelPreset:
        return get_preset(self.model)

    @property
    def checkpoint(self) -> Path | None:
        return None if self.random_weights else resolve_weights(self.preset, self.weights)

    def fingerprint(self) -> list | str:
        """Cheap to compute on every build (hashing 28 GB is not): names, sizes and modification times."""
        if self.checkpoint is None:
            return f"random:{self.weights_seed}"
        return [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in detect_layout(self.checkpoint).files]
