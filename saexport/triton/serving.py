"""The work of the Triton repository's Python-backend models, as plain classes: no Triton in this module.

Each model's `model.py` (`saexport/triton/models/`) turns a request's tensors into one call of these and an
exception into an error response, so everything here runs, and is tested, outside Triton:

    TextEncoder  prompts -> fp32 embeddings `[n, text_len, text_dim]`: UMT5 (bf16 on a GPU) or the demo's words
    Dit          one DiT pass: the sparse DiT in torch (bf16 on a GPU, the CUDA kernel) or ONNX Runtime (fp32, CPU)
    Decoder      latents -> uint8 frames `[frames, height, width, 3]`: AutoencoderKLWan (fp32, tiled) or the pixels
    Pipeline     prompt, negative prompt, seed, steps, guidance -> frames: THE sampler loop over a Denoiser

Every call validates its inputs (presence, dtype, shape, range) before any compute and raises `SaexportError` for
a bad request; the model answers it with an error response and keeps serving. Each model's settings are a json
file in its version folder (`text_encoder.json`, `dit.json`, `vae.json`, `pipeline.json`), written by
`saexport.triton.repository`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from saexport.errors import SaexportError
from saexport.models.text_encoder import UMT5Encoder
from saexport.runtime.denoisers import Denoiser, check_step_index
from saexport.runtime.sampler import DEFAULT_GUIDANCE

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int32": torch.int32,
                "int64": torch.int64, "uint8": torch.uint8}
NUMPY_DTYPES = {"fp32": np.float32, "int32": np.int32, "int64": np.int64, "uint8": np.uint8, "string": np.object_}
TRITON_TYPES = {"fp32": "TYPE_FP32", "fp16": "TYPE_FP16", "bf16": "TYPE_BF16", "int32": "TYPE_INT32",
                "int64": "TYPE_INT64", "uint8": "TYPE_UINT8", "string": "TYPE_STRING"}


@dataclass(frozen=True)
class Spec:
    """One input or output of a model: name, dtype (a key of TRITON_TYPES), dims (-1: any size)."""

    name: str
    dtype: str
    dims: tuple[int, ...]
    optional: bool = False

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "dims": list(self.dims), "optional": self.optional}

    @classmethod
    def from_json(cls, value: dict) -> Spec:
        return cls(value["name"], value["dtype"], tuple(value["dims"]), bool(value.get("optional", False)))

    def describe(self) -> str:
        return f"{self.dtype} [{', '.join('?' if d < 0 else str(d) for d in self.dims)}]"

    def _check_shape(self, shape: tuple[int, ...], got: str) -> None:
        if len(shape) != len(self.dims) or any(d >= 0 and d != s for d, s in zip(self.dims, shape, strict=False)):
            raise SaexportError(f"input {self.name} must be {self.describe()}, got {got}")

    def check_tensor(self, tensor: torch.Tensor | None) -> torch.Tensor:
        if tensor is None:
            raise SaexportError(f"input {self.name} ({self.describe()}) is missing")
        got = f"{str(tensor.dtype).removeprefix('torch.')} {list(tensor.shape)}"
        if tensor.dtype != TORCH_DTYPES[self.dtype]:
            raise SaexportError(f"input {self.name} must be {self.describe()}, got {got}")
        self._check_shape(tuple(tensor.shape), got)
        return tensor

    def check_array(self, array: np.ndarray | None) -> np.ndarray:
        if array is None:
            raise SaexportError(f"input {self.name} ({self.describe()}) is missing")
        array = np.asarray(array)
        got = f"{array.dtype} {list(array.shape)}"
        is_text = array.dtype.kind in "OSU"
        if (not is_text) if self.dtype == "string" else array.dtype != NUMPY_DTYPES[self.dtype]:
            raise SaexportError(f"input {self.name} must be {self.describe()}, got {got}")
        self._check_shape(tuple(array.shape), got)
        return array


def read_config(folder: str | Path, name: str) -> dict:
    path = Path(folder) / name
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SaexportError(f"{path}: not a readable model config ({e}); write the repository again with "
                            "`saexport triton`") from None


def decode_strings(array: np.ndarray, name: str) -> list[str]:
    """Triton's STRING elements (bytes) -> str; anything but UTF-8 is a bad request."""
    out = []
    for item in np.asarray(array).reshape(-1):
        if isinstance(item, str):
            out.append(item)
            continue
        try:
            out.append(bytes(item).decode("utf-8"))
        except UnicodeDecodeError:
            raise SaexportError(f"input {name} must be UTF-8 text") from None
    return out


def check_finite(tensor: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(tensor).all()):
        raise SaexportError(f"input {name} holds NaN or infinite values")


# ---------------------------------------------------------------------------------------------- text encoder


class TextEncoder:
    """`<name>_text_encoder`: prompts -> fp32 `[len(prompts), text_len, text_dim]`."""

    def __init__(self, encode: Callable[[list[str]], torch.Tensor], text_len: int, text_dim: int):
        self.encode, self.text_len, self.text_dim = encode, text_len, text_dim

    @classmethod
    def open(cls, folder: str | Path, device: torch.device | str = "cpu") -> TextEncoder:
        config = read_config(folder, "text_encoder.json")
        checkpoint, text_len = Path(config["checkpoint"]), int(config["text_len"])
        if config["kind"] == "word":
            from saexport.models.word_encoder import WordEncoder

            words = WordEncoder.load(checkpoint)
            if words.tokenizer.max_length != text_len:
                raise SaexportError(f"{checkpoint}: the word encoder reads {words.tokenizer.max_length} tokens, the "
                                    f"DiT attends to {text_len}")
            return cls(words.encode, text_len, int(config["text_dim"]))
        if config["kind"] == "umt5":
            umt5 = UMT5Encoder(checkpoint, text_len, torch.device(device), TORCH_DTYPES[config["dtype"]])  # once
            return cls(umt5.encode, text_len, int(config["text_dim"]))
        raise SaexportError(f"unknown text encoder kind {config['kind']!r} in {folder}/text_encoder.json")

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        if not prompts:
            raise SaexportError("input prompt holds no prompt")
        embeddings = self.encode(list(prompts))  # the word encoder refuses unknown words (SaexportError)
        if tuple(embeddings.shape) != (len(prompts), self.text_len, self.text_dim):
            raise SaexportError(f"the text encoder returned {list(embeddings.shape)}, the DiT takes "
                                f"[{len(prompts)}, {self.text_len}, {self.text_dim}]")
        return embeddings.float()


# ---------------------------------------------------------------------------------------------- DiT


def torch_denoiser(folder: Path, config: dict, device: torch.device):
    """The sparse DiT (`SparseWanDiT`) of the checkpoint, with the topology and budgets copied beside `dit.json`,
    as `generate --backend torch` builds it (`open_denoiser`), on `device` in the graph's precision; on a GPU
    `torch.compile`d when `dit.json` says `"compile": true` (Triton's warm-up request pays for the compilation)."""
    from saexport.models.checkpoint import ModelSource
    from saexport.runtime.denoisers import TorchDenoiser
    from saexport.runtime.generation import Artifacts, BackendOptions, open_denoiser

    library = config.get("kernel_library")
    if library and "SAEXPORT_KERNEL_LIBRARY" not in os.environ and Path(library).is_file():
        os.environ["SAEXPORT_KERNEL_LIBRARY"] = library  # read at the first attention call
    artifacts = Artifacts.open(folder)
    if artifacts.budgets.steps != int(config["steps"]):
        raise SaexportError(f"{folder}: budgets for {artifacts.budgets.steps} steps, dit.json says {config['steps']}")
    compiled = bool(config.get("compile", False)) and device.type == "cuda"
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        denoiser = open_denoiser(artifacts, "torch", ModelSource(artifacts.preset.name, Path(config["checkpoint"])),
                                 BackendOptions(config["dtype"], compile_model=compiled))
    if denoiser.device.type != device.type:  # a CPU instance on a machine with a GPU (never compiled)
        denoiser = TorchDenoiser(denoiser.model.to(device), denoiser.steps)
    return denoiser


def kernel_status(config: dict, device: torch.device) -> str | None:
    """Why the sparse attention of a torch DiT on `device` would run the slow reference, or None."""
    from saexport import kernels

    if device.type != "cuda":
        return "the DiT runs on the CPU: block-sparse attention runs the reference implementation"
    if kernels.load_library() is None:
        return (f"the CUDA kernel library is not found (looked in {[str(p) for p in kernels.library_candidates()]}): "
                "block-sparse attention runs the slow reference; build it and set SAEXPORT_KERNEL_LIBRARY")
    if int(config["block_size"]) not in kernels.SUPPORTED_BLOCK_SIZES or int(config["head_dim"]) not in \
            kernels.SUPPORTED_HEAD_DIMS:
        return (f"the CUDA kernel supports blocks of {kernels.SUPPORTED_BLOCK_SIZES} and heads of "
                f"{kernels.SUPPORTED_HEAD_DIMS}; this graph has blocks of {config['block_size']} and heads of "
                f"{config['head_dim']}: the reference runs")
    return None


class Dit:
    """`<name>_dit`: one pass of the sparse DiT with the exported graph's interface (hidden_states, timestep,
    encoder_hidden_states, step_index -> noise_pred), over a Denoiser: ONNX Runtime or torch."""

    def __init__(self, denoiser: Denoiser, inputs: list[Spec], output: Spec, steps: int, warning: str | None = None):
        self.denoiser, self.inputs, self.output, self.steps = denoiser, inputs, output, steps
        self.warning = warning  # why this DiT is slower than it should be (the reference attention), or None

    @classmethod
    def open(cls, folder: str | Path, device: torch.device | str = "cpu") -> Dit:
        folder, device = Path(folder), torch.device(device)
        config = read_config(folder, "dit.json")
        inputs = [Spec.from_json(s) for s in config["inputs"]]
        output, steps = Spec.from_json(config["output"]), int(config["steps"])
        if config["backend"] == "onnxruntime":
            from saexport.runtime.denoisers import OnnxRuntimeDenoiser

            if config.get("device", "cpu") == "cuda" and device.type != "cuda":
                raise SaexportError(f"{folder}/dit.json runs the graph on the GPU, and this instance is on the CPU: "
                                    "give the model a KIND_GPU instance group")
            ort_device = device if config.get("device", "cpu") == "cuda" else torch.device("cpu")
            return cls(OnnxRuntimeDenoiser(folder / "model.onnx", steps, ort_device), inputs, output, steps)
        if config["backend"] == "torch":
            denoiser = torch_denoiser(folder, config, device)
            return cls(denoiser, inputs, output, steps, kernel_status(config, denoiser.device))
        raise SaexportError(f"unknown DiT back end {config['backend']!r} in {folder}/dit.json")

    def check(self, tensors: dict[str, torch.Tensor | None]) -> list[torch.Tensor]:
        """The inputs in the graph's order, validated: dtypes, shapes, a finite timestep, step_index in range."""
        checked = [spec.check_tensor(tensors.get(spec.name)) for spec in self.inputs]
        named = dict(zip([s.name for s in self.inputs], checked, strict=True))
        check_step_index(named["step_index"], self.steps)
        check_finite(named["timestep"], "timestep")
        return checked

    def __call__(self, tensors: dict[str, torch.Tensor | None]) -> torch.Tensor:
        noise = self.denoiser.predict(*self.check(tensors))  # the graph's inputs, in the graph's order
        return noise.to(TORCH_DTYPES[self.output.dtype])


# ---------------------------------------------------------------------------------------------- VAE


class Decoder:
    """`<name>_vae`: latents `[1, channels, f, h, w]` -> uint8 frames `[frames, height, width, 3]`."""

    def __init__(self, decode: Callable[[torch.Tensor], np.ndarray], latents: Spec, frames: Spec):
        self.decode, self.latents, self.frames = decode, latents, frames

    @classmethod
    def open(cls, folder: str | Path, device: torch.device | str = "cpu") -> Decoder:
        config = read_config(folder, "vae.json")
        latents, frames = Spec.from_json(config["input"]), Spec.from_json(config["output"])
        if config["codec"] == "pixels":
            from saexport.models.presets import PIXELS
            from saexport.runtime.video import latents_to_frames

            return cls(lambda x: latents_to_frames(PIXELS, x, None), latents, frames)
        if config["codec"] == "wan-vae":  # loaded once (fp32, tiled) on the instance's device; decoded per request
            from saexport.runtime.video import decode_latents, load_vae

            vae = load_vae(Path(config["vae"]), torch.device(device))
            return cls(lambda x: decode_latents(vae, x), latents, frames)
        raise SaexportError(f"unknown latent codec {config['codec']!r} in {folder}/vae.json")

    def __call__(self, latents: torch.Tensor | None) -> np.ndarray:
        latents = self.latents.check_tensor(latents)
        check_finite(latents, self.latents.name)
        frames = self.decode(latents)
        if tuple(frames.shape) != self.frames.dims:
            raise SaexportError(f"decoded frames {list(frames.shape)}, expected {list(self.frames.dims)}")
        return frames


# ---------------------------------------------------------------------------------------------- pipeline


def pipeline_inputs(text_encoder: bool, text_dims: tuple[int, int]) -> list[Spec]:
    """The pipeline's request: a prompt (with a text encoder) or its embeddings (without one), seed, and optional
    negative prompt (""), steps (must be the budgets'), guidance scale (5.0)."""
    if text_encoder:
        text = [Spec("prompt", "string", (1,)), Spec("negative_prompt", "string", (1,), optional=True)]
    else:
        text = [Spec("prompt_embeds", "fp32", (1, *text_dims)),
                Spec("negative_embeds", "fp32", (1, *text_dims), optional=True)]
    return [*text, Spec("seed", "int64", (1,)), Spec("steps", "int32", (1,), optional=True),
            Spec("guidance_scale", "fp32", (1,), optional=True)]


@dataclass(frozen=True)
class PipelineRequest:
    text: list[str] | torch.Tensor  # [prompt, negative prompt], or their embeddings [2, text_len, text_dim]
    seed: int
    guidance_scale: float


class Pipeline:
    """`<name>_pipeline`: a request -> frames (or latents where the repository has no VAE), by THE sampler loop
    (`saexport.runtime.sampler.sample`) over `denoiser`, with the prompts through `encode` and the latents
    through `decode` (in Triton: BLS calls to `<name>_text_encoder`, `<name>_dit` and `<name>_vae`)."""

    def __init__(self, config: dict, denoiser: Denoiser,
                 encode: Callable[[list[str]], torch.Tensor] | None = None,
                 decode: Callable[[torch.Tensor], np.ndarray] | None = None):
        self.config, self.denoiser, self.encode, self.decode = config, denoiser, encode, decode
        self.steps = int(config["steps"])
        self.inputs = [Spec.from_json(s) for s in config["inputs"]]
        self.output = Spec.from_json(config["output"])
        if (encode is None) == bool(config["text_encoder_model"]) or (decode is None) == bool(config["vae_model"]):
            raise SaexportError("the pipeline needs exactly the text encoder and decoder its pipeline.json names")

    def parse(self, arrays: dict[str, np.ndarray | None]) -> PipelineRequest:
        """Validate a request before any compute."""
        given = {}
        for spec in self.inputs:
            array = arrays.get(spec.name)
            given[spec.name] = None if array is None and spec.optional else spec.check_array(array)
        if given.get("steps") is not None and int(given["steps"][0]) != self.steps:
            raise SaexportError(f"steps must be {self.steps} (the budgets were made for {self.steps} steps), "
                                f"got {int(given['steps'][0])}")
        guidance = DEFAULT_GUIDANCE if given.get("guidance_scale") is None else float(given["guidance_scale"][0])
        if not math.isfinite(guidance):
            raise SaexportError(f"guidance_scale must be a finite number, got {guidance}")
        seed = int(given["seed"][0])
        if "prompt" in given:
            negative = "" if given["negative_prompt"] is None else decode_strings(given["negative_prompt"],
                                                                                  "negative_prompt")[0]
            return PipelineRequest([decode_strings(given["prompt"], "prompt")[0], negative], seed, guidance)
        from saexport.models.text_encoder import negative_embeddings

        prompt = torch.from_numpy(given["prompt_embeds"].copy())
        check_finite(prompt, "prompt_embeds")
        if given["negative_embeds"] is None:  # as `saexport generate` does without a text encoder
            negative = negative_embeddings(None, prompt.shape[1], prompt.shape[2])
        else:
            negative = torch.from_numpy(given["negative_embeds"].copy())
            check_finite(negative, "negative_embeds")
        return PipelineRequest(torch.cat([prompt, negative]), seed, guidance)

    def __call__(self, arrays: dict[str, np.ndarray | None]) -> np.ndarray:
        """The response's one output (`self.output.name`): uint8 frames, or fp32 latents."""
        from saexport.runtime.sampler import SamplerSettings, no_progress, sample

        request = self.parse(arrays)
        embeddings = self.encode(request.text) if self.encode is not None else request.text
        text, negative = embeddings[:1], embeddings[1:2]
        settings = SamplerSettings(tuple(self.config["latent_shape"]), self.steps, float(self.config["flow_shift"]),
                                   request.guidance_scale)
        latents = sample(self.denoiser, settings, text, negative, request.seed, progress=no_progress)
        if self.decode is None:
            return latents.float().numpy()
        return self.decode(latents)
