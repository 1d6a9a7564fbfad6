"""`saexport generate`: an artifact folder and a back end -> Wan2.1's sampler loop -> latents or a video.

Every back end reads the same folder (`artifacts.ArtifactFolder`): `torch` the topology and budgets (with the
checkpoint they were made from), `onnxruntime` the ONNX, `tensorrt` the engine.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from saexport.artifacts import ArtifactFolder, Budgets, ModelIdentity, OnnxMetadata, Topology
from saexport.errors import SaexportError
from saexport.folders import Output, check_writable_file_target
from saexport.models.checkpoint import LoadedModel, ModelSource, load_model, parse_dtype
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
from saexport.runtime.parallel.cfg import CfgParallelDenoiser, cfg_pair_group
from saexport.runtime.parallel.launch import check_rank_count, join_ranks, writes_outputs
from saexport.runtime.parallel.ulysses import ulysses_dit
from saexport.runtime.sampler import DEFAULT_GUIDANCE, SamplerSettings, no_progress, sample
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
        """The folder's topology and budgets; where it holds a graph too, they must be the ones the graph froze
        (a hand-edited budgets file would make the torch back end and ONNX Runtime answer differently)."""
        folder = ArtifactFolder(root)
        topology, budgets = Topology.load(folder.topology), Budgets.load(folder.budgets)
        budgets.check_matches(topology)
        if folder.onnx.is_file():
            graph = OnnxMetadata.read(folder.onnx)
            for kind, found, frozen in (("topology", topology.hash(), graph.topology_hash),
                                        ("budgets", budgets.hash(), graph.budgets_hash)):
                if found != frozen:
                    raise SaexportError(f"{root}: its {kind}.safetensors is not the {kind} model.onnx froze (changed "
                                        "since the export?): export again, or put the exported one back")
        preset = get_preset(topology.model)
        return cls(folder, topology, budgets, preset, video_of_grid(topology.grid, preset.patch_size, preset.codec))


def machine_memory() -> int:
    """This machine's memory in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def generation_dtype(preset: ModelPreset, device: str | torch.device) -> str:
    """The precision generation runs `preset` in on `device`: the model's on a GPU (bf16 for Wan2.1: the attention
    runs the CUDA kernel), fp32 on a CPU. Calibration runs in it too."""
    return preset.defaults.dtype if torch.device(device).type == "cuda" else "fp32"


@dataclass(frozen=True)
class BackendOptions:
    """How a back end runs: the torch back end's precision (None: the model's on a GPU, fp32 on a CPU), whether
    it is `torch.compile`d, and over how many ranks launched by torchrun (`ulysses` ranks of sequence parallelism,
    twice as many with `cfg_parallel`); the TensorRT back end's plugin library; the `device` of the torch and ONNX
    Runtime back ends ("cpu", "cuda" or "cuda:N"; None: torch on the GPU where there is one, ONNX Runtime on the
    CPU for an fp32 graph and on the GPU for fp16 and bf16 ones, which its CUDA provider runs)."""

    dtype: str | None = None
    plugin: Path | None = None
    compile_model: bool = False
    ulysses: int = 1
    cfg_parallel: bool = False
    device: str | None = None

    def __post_init__(self):
        if self.ulysses < 1:
            raise SaexportError(f"`ulysses` must be at least 1, got {self.ulysses}")
        if self.device is not None:
            try:
                kind = torch.device(self.device).type
            except RuntimeError:
                kind = None
            if kind not in ("cpu", "cuda"):
                raise SaexportError(f"`device` must be cpu, cuda or cuda:N, got {self.device!r}")

    @property
    def parallel(self) -> bool:
        return self.ulysses > 1 or self.cfg_parallel


def model_identity(loaded: LoadedModel) -> ModelIdentity:
    """The model and weights an artifact made from `loaded` records, and every check against one compares."""
    # Here rather than on LoadedModel: `models` and `artifacts` are sibling layers and never import each other.
    return ModelIdentity(loaded.preset.name, loaded.preset.config_hash(), loaded.weights_id)


def open_denoiser(artifacts: Artifacts, backend: str, source: ModelSource,
                  options: BackendOptions = BackendOptions()) -> Denoiser:
    """The back end over the folder's artifacts; `torch` loads the checkpoint they were made from, on the GPU in the
    model's precision (bf16 for Wan2.1: the attention runs the CUDA kernel) or on the CPU in fp32, and optionally
    compiles it (`torch.compile` keeps one graph around the attention op, whose fake implementation it traces)."""
    steps = artifacts.budgets.steps
    if options.parallel and backend != "torch":
        raise SaexportError(f"`ulysses` and `cfg_parallel` run on the torch back end, not {backend}")
    if options.parallel and options.device is not None:
        raise SaexportError("under torchrun each rank runs on its LOCAL_RANK's GPU: leave `device` unset")
    if backend == "torch":
        topo, preset = artifacts.topology, artifacts.preset
        device = join_ranks() if options.parallel else options.device or default_device()
        dtype = options.dtype or generation_dtype(preset, device)
        loaded = load_model(preset.name, source.checkpoint, dtype=parse_dtype(dtype),
                            random_weights=source.random_weights, seed=source.weights_seed)
        topo.check_matches(model_identity(loaded))
        model = SparseWanDiT(loaded.transformer, topo.grid, topo.layout, topo.levels, artifacts.budgets.levels,
                             topo.block_size).to(device)
        if not options.parallel:
            return TorchDenoiser(model, steps, compiled=options.compile_model)
        check_rank_count(options.ulysses, options.cfg_parallel)
        if options.ulysses > 1:
            model = ulysses_dit(model, options.ulysses)
        denoiser = TorchDenoiser(model, steps, compiled=options.compile_model)
        return CfgParallelDenoiser(denoiser, cfg_pair_group()) if options.cfg_parallel else denoiser
    if backend == "onnxruntime":
        return OnnxRuntimeDenoiser(artifacts.folder.onnx, steps, options.device)
    if options.device is not None and torch.device(options.device).type != "cuda":
        raise SaexportError(f"the {backend} back end runs on the GPU, not on {options.device}")
    if backend == "tensorrt":
        if options.plugin is None:
            raise SaexportError("the tensorrt back end needs the `plugin` library (libsaexport_trt_plugin.so)")
        return TensorRTDenoiser(artifacts.folder.engine, options.plugin, steps)
    raise SaexportError(f"unknown back end '{backend}'; use one of {', '.join(BACKENDS)}")


@dataclass(frozen=True)
class GenerationRequest:
    """One video: the prompt as text (through the checkpoint's text encoder) or as embeddings in a file (synthetic
    when neither is given), the negative prompt alike, the guidance scale and the noise seed."""

    prompt: str | None = None
    negative_prompt: str = ""
    embeddings_file: Path | None = None
    negative_file: Path | None = None
    guidance: float = DEFAULT_GUIDANCE
    seed: int = 0

    def __post_init__(self):
        if not math.isfinite(self.guidance):
            raise SaexportError(f"`guidance` must be a finite number, got {self.guidance}")
        if not 0 <= self.seed < 2**63:
            raise SaexportError(f"`seed` must be within 0..2^63-1, got {self.seed}")
        if self.prompt is not None and self.embeddings_file is not None:
            raise SaexportError("give a `prompt` or its `embeddings_file`, not both (the file would be ignored)")
        if self.negative_file is not None and self.negative_prompt:
            raise SaexportError("give a `negative_prompt` or its `negative_file`, not both")

    def files(self) -> list[Path]:
        return [path for path in (self.embeddings_file, self.negative_file) if path is not None]


def prompt_embeddings(preset: ModelPreset, encode: Callable[[list[str]], torch.Tensor] | None,
                      request: GenerationRequest) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 `[1, text_len, text_dim]` of the prompt and of the negative prompt: text through `encode` (the
    checkpoint's text encoder), or embeddings from files, or synthetic (said so)."""
    prompt, negative_prompt = request.prompt, request.negative_prompt
    embeddings_file, negative_file = request.embeddings_file, request.negative_file
    text_len, text_dim = preset.text_len, preset.config["text_dim"]
    if prompt is not None:
        if encode is None:
            raise SaexportError("a `prompt` needs `weights` with a text encoder (text_encoder/ and tokenizer/)")
        text, negative = encode([prompt, negative_prompt]).split(1)
        return text, negative
    if embeddings_file is None:
        log.warning("note: SYNTHETIC prompt embeddings (seeded normal); give a prompt or its embeddings")
        text = synthetic_embeddings(text_len, text_dim, 1, PROMPT_SEED)
    else:
        text = read_embeddings(embeddings_file, text_dim, text_len)
        if text.shape[0] != 1:
            raise SaexportError(f"{embeddings_file}: one prompt expected, got {text.shape[0]}")
    if negative_file is not None:
        negative = read_embeddings(negative_file, text_dim, text_len)[:1]
    elif encode is not None:
        negative = encode([""])  # the empty prompt, as Wan's pipeline encodes its default negative prompt
    else:
        negative = synthetic_embeddings(text.shape[1], text_dim, 1, NEGATIVE_SEED)
    return text, negative


class SparsePipeline:
    """Prompt and seed in, video frames out, over an artifact folder and a back end: what `saexport.load` returns.

    The text encoder, the back end and the latent codec are opened once; each call runs Wan2.1's sampler loop.
    """

    def __init__(self, root: str | Path, backend: str = "torch", source: ModelSource | None = None,
                 options: BackendOptions = BackendOptions(), vae: Path | None = None):
        self.artifacts = Artifacts.open(Path(root))
        preset = self.artifacts.preset
        source = source or ModelSource(preset.name)
        if source.model != preset.name:
            raise SaexportError(f"the artifacts are for {preset.name}, not `model` {source.model}")
        self.weights, self.vae_path = source.checkpoint, vae
        self._encode: Callable[[list[str]], torch.Tensor] | None = None
        self._vae = None
        self.denoiser = open_denoiser(self.artifacts, backend, source, options)

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

    def latents(self, request: GenerationRequest) -> torch.Tensor:
        """fp32 latents `[1, channels, frames, height, width]`."""
        text, negative = prompt_embeddings(self.artifacts.preset, self.text_encoder(), request)
        video = self.artifacts.video
        settings = SamplerSettings(video.latent_shape(), self.steps, flow_shift_for(video.height), request.guidance)
        bar = tqdm if writes_outputs() else no_progress  # the other ranks of a launch walk the same steps silently
        return sample(self.denoiser, settings, text, negative, request.seed, bar)

    def __call__(self, prompt: str, seed: int = 0, negative_prompt: str = "",
                 guidance: float = DEFAULT_GUIDANCE) -> np.ndarray:
        """uint8 frames `[frames, height, width, 3]` (Wan2.1 latents are decoded with the `vae` given at load)."""
        return self.frames(self.latents(GenerationRequest(prompt, negative_prompt, guidance=guidance, seed=seed)))


def open_pipeline(root: str | Path, backend: str = "torch", **options) -> SparsePipeline:
    """`SparsePipeline` from keyword options (what `saexport.load` takes): weights, random_weights, weights_seed,
    dtype, plugin, compile_model, ulysses, cfg_parallel, device, vae."""
    known = {"weights", "random_weights", "weights_seed", "dtype", "plugin", "compile_model", "ulysses",
             "cfg_parallel", "device", "vae"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise SaexportError(f"unknown option {', '.join(unknown)}; the options are {', '.join(sorted(known))}")
    model = Artifacts.open(Path(root)).preset.name
    source = ModelSource(model, options.get("weights"), options.get("random_weights", False),
                         options.get("weights_seed", 0))
    backend_options = BackendOptions(options.get("dtype"), options.get("plugin"), options.get("compile_model", False),
                                     options.get("ulysses", 1), options.get("cfg_parallel", False),
                                     options.get("device"))
    return SparsePipeline(root, backend, source, backend_options, options.get("vae"))


def check_generation_target(out: Output, root: Path, inputs: list[Path], vae: Path | None, upscale: int = 1) -> Path:
    """Before any model is loaded: `out` can receive what `generate` writes, and is none of its inputs (the
    folder's artifacts, `inputs`: embeddings, checkpoint; the `vae`) nor inside one, and a video enlarged `upscale`
    times fits in memory. Returns the resolved path."""
    folder = ArtifactFolder(Path(root))
    path = check_writable_file_target(out.path, OUTPUT_SUFFIXES, overwrite=out.overwrite, ours=written_by_generate,
                                      inputs=[folder.topology, folder.budgets, folder.onnx, folder.engine, *inputs,
                                              *([vae] if vae is not None else [])])
    topology = Topology.load(folder.topology)
    preset = get_preset(topology.model)
    video = video_of_grid(topology.grid, preset.patch_size, preset.codec)
    frame_bytes = video.frames * video.height * video.width * 3 * upscale**2
    if path.suffix.lower() in VIDEO_SUFFIXES and frame_bytes > machine_memory() // 4:
        raise SaexportError(f"`upscale` {upscale} makes a {frame_bytes / 2**30:.0f} GiB video, more than a quarter of "
                            "this machine's memory: choose a smaller one")
    if path.suffix.lower() == ".mp4":
        try:
            import imageio_ffmpeg  # noqa: F401  (imageio's MP4 writer)
        except ImportError:
            raise SaexportError("writing .mp4 needs imageio-ffmpeg (pip install imageio-ffmpeg); or write .gif"
                                ) from None
    if path.suffix.lower() in VIDEO_SUFFIXES and preset.codec.name != "pixels" and vae is None:
        raise SaexportError(f"a video of {preset.name}'s latents is decoded by a `vae` (the checkpoint's vae/ "
                            "folder); or write .safetensors")
    return path


def generate(pipeline: SparsePipeline, request: GenerationRequest, out: Output, upscale: int = 1) -> Path:
    """Run the sampler on the pipeline and write `out` (.safetensors latents, or .gif / .mp4 enlarged `upscale`
    times); `check_generation_target(out, ...)` first, before the pipeline is opened. Under torchrun every rank
    samples and rank 0 alone decodes and writes."""
    latents = pipeline.latents(request)
    if not writes_outputs():
        return out.path
    if out.path.suffix.lower() in VIDEO_SUFFIXES:
        write_video(pipeline.frames(latents), out.path, scale=upscale)
    else:
        write_latents(latents, out.path)
    return out.path
