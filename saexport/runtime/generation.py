"""`saexport generate`: an artifact folder and a back end -> Wan2.1's sampler loop -> latents or a video.

Every back end reads the same folder (`artifacts.ArtifactFolder`): `torch` the topology and budgets (with the
checkpoint they were made from), `onnxruntime` the ONNX, `tensorrt` the engine.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from saexport.artifacts import ArtifactFolder, Budgets, Topology
from saexport.errors import SaexportError
from saexport.folders import check_writable_file_target
from saexport.models.checkpoint import load_model, parse_dtype, resolve_weights
from saexport.models.dit import SparseWanDiT
from saexport.models.presets import ModelPreset, get_preset
from saexport.models.text_encoder import (
    NEGATIVE_SEED,
    has_text_encoder,
    open_text_encoder,
    read_embeddings,
    synthetic_embeddings,
)
from saexport.models.video_shape import VideoShape, video_of_grid
from saexport.runtime.denoisers import Denoiser, OnnxRuntimeDenoiser, TensorRTDenoiser, TorchDenoiser
from saexport.runtime.sampler import DEFAULT_GUIDANCE, sample
from saexport.runtime.schedule import flow_shift_for
from saexport.runtime.video import (
    OUTPUT_SUFFIXES,
    VIDEO_SUFFIXES,
    decode_latents,
    latents_to_frames,
    load_vae,
    write_latents,
    write_video,
    written_by_generate,
)

log = logging.getLogger("saexport")
BACKENDS = ("torch", "onnxruntime", "tensorrt")
PROMPT_SEED = 1  # synthetic prompt embeddings, when neither a prompt nor a file is given


@dataclass(frozen=True)
class Artifacts:
    """What a folder holds for generation: its topology and budgets and the model and video they were made for."""

    folder: ArtifactFolder
    topology: Topology
    budgets: Budgets
    preset: ModelPreset
    video: VideoShape

    @classmethod
    def open(cls, root: Path) -> Artifacts:
        folder = ArtifactFolder(root)
        topology, budgets = Topology.load(folder.topology), Budgets.load(folder.budgets)
        budgets.check_matches(topology)
        preset = get_preset(topology.model)
        return cls(folder, topology, budgets, preset, video_of_grid(topology.grid, preset.patch_size, preset.codec))


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def open_denoiser(artifacts: Artifacts, backend: str, weights: Path | None, random_weights: bool, seed: int,
                  dtype: str | None, plugin: Path | None, compile_model: bool = False) -> Denoiser:
    """The back end over the folder's artifacts; `torch` loads the checkpoint they were made from, on the GPU in the
    model's precision (bf16 for Wan2.1: the attention runs the CUDA kernel) or on the CPU in fp32, and optionally
    compiles it (`torch.compile` keeps one graph around the attention op, whose fake implementation it traces)."""
    steps = artifacts.budgets.steps
    if backend == "torch":
        topo, preset = artifacts.topology, artifacts.preset
        device = default_device()
        dtype = dtype or (preset.defaults.dtype if device == "cuda" else "fp32")
        loaded = load_model(preset.name, weights, dtype=parse_dtype(dtype), random_weights=random_weights, seed=seed)
        topo.check_matches(loaded.identity)
        model = SparseWanDiT(loaded.transformer, topo.grid, topo.layout, topo.levels, artifacts.budgets.levels,
                             topo.block_size).to(device)
        return TorchDenoiser(model, steps, compiled=compile_model)
    if backend == "onnxruntime":
        return OnnxRuntimeDenoiser(artifacts.folder.onnx, steps)
    if backend == "tensorrt":
        if plugin is None:
            raise SaexportError("--backend tensorrt needs --plugin PATH/libsaexport_trt_plugin.so")
        return TensorRTDenoiser(artifacts.folder.engine, plugin, steps)
    raise SaexportError(f"unknown back end '{backend}'; use one of {', '.join(BACKENDS)}")


def prompt_embeddings(preset: ModelPreset, encode: Callable[[list[str]], torch.Tensor] | None, prompt: str | None,
                      negative_prompt: str, embeddings_file: Path | None,
                      negative_file: Path | None) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 `[1, text_len, text_dim]` of the prompt and of the negative prompt: text through `encode` (the
    checkpoint's text encoder), or embeddings from files, or synthetic (said so)."""
    text_len, text_dim = preset.text_len, preset.config["text_dim"]
    if prompt is not None:
        if encode is None:
            raise SaexportError("--prompt needs --weights with a text encoder (text_encoder/ and tokenizer/)")
        text, negative = encode([prompt, negative_prompt]).split(1)
        return text, negative
    if embeddings_file is None:
        log.warning("note: SYNTHETIC prompt embeddings (seeded normal); give --prompt or --embeddings")
        text = synthetic_embeddings(text_len, text_dim, 1, PROMPT_SEED)
    else:
        text = read_embeddings(embeddings_file, text_dim)
        if text.shape[0] != 1:
            raise SaexportError(f"{embeddings_file}: one prompt expected, got {text.shape[0]}")
    if negative_file is not None:
        negative = read_embeddings(negative_file, text_dim)[:1]
    elif encode is not None:
        negative = encode([""])  # the empty prompt, as Wan's pipeline encodes its default negative prompt
    else:
        negative = synthetic_embeddings(text.shape[1], text_dim, 1, NEGATIVE_SEED)
    return text, negative


class SparsePipeline:
    """Prompt and seed in, video frames out, over an artifact folder and a back end: what `saexport.load` returns.

    The text encoder, the back end and the latent codec are opened once; each call runs Wan2.1's sampler loop.
    """

    def __init__(self, root: str | Path, backend: str = "torch", *, weights: Path | None = None,
                 random_weights: bool = False, seed: int = 0, dtype: str | None = None, plugin: Path | None = None,
                 vae: Path | None = None, model: str | None = None, compile_model: bool = False):
        self.artifacts = Artifacts.open(Path(root))
        preset = self.artifacts.preset
        if model is not None and model != preset.name:
            raise SaexportError(f"the artifacts are for {preset.name}, not --model {model}")
        if weights is None and not random_weights and preset.bundled_weights:
            weights = resolve_weights(preset, None)
        self.weights, self.vae_path = weights, vae
        self._encode: Callable[[list[str]], torch.Tensor] | None = None
        self._vae = None
        self.denoiser = open_denoiser(self.artifacts, backend, weights, random_weights, seed, dtype, plugin,
                                      compile_model)

    @property
    def steps(self) -> int:
        return self.artifacts.budgets.steps

    def text_encoder(self) -> Callable[[list[str]], torch.Tensor] | None:
        """The checkpoint's text encoder, loaded at first use (UMT5 in bf16 on a GPU); None without one."""
        if self._encode is None and self.weights is not None and has_text_encoder(self.weights):
            device = default_device()
            log.info("loading the checkpoint's text encoder")
            self._encode = open_text_encoder(self.weights, self.artifacts.preset.text_len, device,
                                             torch.bfloat16 if device == "cuda" else torch.float32)
        return self._encode

    def frames(self, latents: torch.Tensor) -> np.ndarray:
        """uint8 `[frames, height, width, 3]`: the pixels of a demo model, or Wan's VAE decode (loaded once)."""
        if self.artifacts.preset.codec.name == "pixels" or self.vae_path is None:
            return latents_to_frames(self.artifacts.preset.codec, latents, self.vae_path)
        if self._vae is None:
            self._vae = load_vae(self.vae_path, default_device())
        return decode_latents(self._vae, latents)

    def latents(self, prompt: str | None = None, seed: int = 0, negative_prompt: str = "",
                guidance: float = DEFAULT_GUIDANCE, embeddings_file: Path | None = None,
                negative_file: Path | None = None) -> torch.Tensor:
        """fp32 latents `[1, channels, frames, height, width]`."""
        text, negative = prompt_embeddings(self.artifacts.preset, self.text_encoder(), prompt, negative_prompt,
                                           embeddings_file, negative_file)
        video = self.artifacts.video
        return sample(self.denoiser, text, negative, video.latent_shape(), self.steps, flow_shift_for(video.height),
                      seed, guidance)

    def __call__(self, prompt: str, seed: int = 0, negative_prompt: str = "",
                 guidance: float = DEFAULT_GUIDANCE) -> np.ndarray:
        """uint8 frames `[frames, height, width, 3]` (Wan2.1 latents are decoded with the `vae` given at load)."""
        return self.frames(self.latents(prompt, seed, negative_prompt, guidance))


def generate(root: Path, out_path: Path, backend: str = "torch", *, model: str | None = None,
             weights: Path | None = None, random_weights: bool = False, seed: int = 0, dtype: str | None = None,
             plugin: Path | None = None, prompt: str | None = None, negative_prompt: str = "",
             embeddings_file: Path | None = None, negative_file: Path | None = None, steps: int | None = None,
             guidance: float = DEFAULT_GUIDANCE, sample_seed: int = 0, vae: Path | None = None,
             upscale: int = 1, compile_model: bool = False, overwrite: bool = False) -> Path:
    """Run the sampler on the folder's artifacts and write `out_path` (.safetensors latents, or .gif / .mp4). An
    existing `out_path` is replaced only when `generate` wrote it, or with `overwrite`."""
    folder = ArtifactFolder(Path(root))
    check_writable_file_target(out_path, OUTPUT_SUFFIXES, inputs=[
        folder.topology, folder.budgets, folder.onnx, folder.engine,
        *(path for path in (embeddings_file, negative_file, weights, vae) if path is not None)],
        overwrite=overwrite, ours=written_by_generate)
    preset = get_preset(Topology.load(folder.topology).model)
    if out_path.suffix.lower() in VIDEO_SUFFIXES and preset.codec.name != "pixels" and vae is None:
        raise SaexportError(f"a video of {preset.name}'s latents needs --vae (the checkpoint's vae/ folder); "
                            "or write .safetensors")
    pipeline = SparsePipeline(root, backend, weights=weights, random_weights=random_weights, seed=seed, dtype=dtype,
                              plugin=plugin, vae=vae, model=model, compile_model=compile_model)
    if steps is not None and steps != pipeline.steps:
        raise SaexportError(f"the budgets are for {pipeline.steps} steps; sample with --steps {pipeline.steps} or "
                            "rerun `saexport budgets` for this step count")
    latents = pipeline.latents(prompt, sample_seed, negative_prompt, guidance, embeddings_file, negative_file)
    if out_path.suffix.lower() in VIDEO_SUFFIXES:
        write_video(pipeline.frames(latents), out_path, scale=upscale)
    else:
        write_latents(latents, out_path)
    return out_path
