"""The artifact contract (docs/ARCHITECTURE.md, "Contracts"): every file saexport writes for another part to read,
written and read here only.

- `ArtifactFolder`: the names of the files in a build or export folder;
- `Topology` and `Budgets`: `topology.safetensors` and `budgets.safetensors`. Metadata values are JSON strings;
  a reader checks the format version and the tensors' shapes, and `check_*` refuse an artifact made for another
  model, grid, block size or topology with a message saying which;
- `OnnxMetadata`: the `metadata_props` of an exported `model.onnx`;
- `EngineMetadata`: `engine.json`, what a loader checks before deserialising a TensorRT engine.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from saexport.atomic import atomic_path, write_text_atomic
from saexport.errors import SaexportError
from saexport.layout import TokenLayout, parse_layout
from saexport.levels import num_blocks

FORMAT_VERSION = 1


@dataclass(frozen=True)
class ArtifactFolder:
    """The files of a build or export folder. `saexport build` writes them all; `export` writes the topology,
    budgets and ONNX; `engine` adds the engine; every back end of `generate` reads them from here."""

    root: Path

    @property
    def topology(self) -> Path:
        return self.root / "topology.safetensors"

    @property
    def budgets(self) -> Path:
        return self.root / "budgets.safetensors"

    @property
    def onnx(self) -> Path:
        return self.root / "model.onnx"  # + model.onnx.data beside it past 2 GB

    @property
    def engine(self) -> Path:
        return self.root / "model.engine"

    @property
    def engine_metadata(self) -> Path:
        return self.root / "engine.json"

    @property
    def timing_cache(self) -> Path:
        return self.root / "timing.cache"

    @property
    def triton(self) -> Path:
        return self.root / "triton"

    @property
    def manifest(self) -> Path:
        return self.root / "build.json"

    @property
    def calibration_embeddings(self) -> Path:
        return self.root / "calibration_embeddings.safetensors"

    @property
    def fidelity_report(self) -> Path:
        return self.root / "fidelity.json"

    @property
    def fidelity_picture(self) -> Path:
        return self.root / "quality.png"

    def holds_only_artifacts(self) -> bool:
        """Everything in the folder is a file saexport wrote there, recognised by its content (or a hidden
        temporary of one): a folder of single-stage outputs, or of an older saexport without an owner marker. A
        user's own `model.onnx` or `budgets.safetensors` is not saexport's because of its name."""
        ours = {
            self.topology.name: lambda: artifact_kind(self.topology) == "topology",
            self.budgets.name: lambda: artifact_kind(self.budgets) == "budgets",
            self.onnx.name: lambda: _is_saexport_onnx(self.onnx),
            self.onnx.name + ".data": lambda: _is_saexport_onnx(self.onnx),
            self.engine_metadata.name: lambda: _readable(EngineMetadata.read, self.engine_metadata),
            self.engine.name: lambda: _readable(EngineMetadata.read, self.engine_metadata),
            self.timing_cache.name: lambda: _readable(EngineMetadata.read, self.engine_metadata),
            self.manifest.name: lambda: _is_manifest(self.manifest),
            self.fidelity_report.name: lambda: _readable(FidelityReport.read, self.fidelity_report),
            self.fidelity_picture.name: lambda: _readable(FidelityReport.read, self.fidelity_report),
            self.triton.name: lambda: (self.triton / ".saexport-owner").is_file(),
        }

        def recognised(entry: Path) -> bool:
            if entry.name.startswith("."):  # hidden temporaries of saexport's atomic writes and staging
                return True
            if entry.name in ours:
                return ours[entry.name]()
            if entry.name.startswith(self.calibration_embeddings.stem + "."):
                return artifact_kind(entry) == "calibration_embeddings"
            if entry.name.startswith((self.topology.name + ".partial", self.budgets.name + ".partial")):
                return artifact_kind(entry) == "calibration_progress"
            return False

        return all(recognised(entry) for entry in self.root.iterdir())


def artifact_kind(path: Path) -> str | None:
    """What a safetensors file saexport wrote is, from its metadata: its `kind` (topology, budgets, latents), or
    the calibration prompts' cache, or a calibration's progress; None for any other file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError):
        return None
    if "key" in meta and "prompts" in meta:
        return "calibration_embeddings"
    if "key" in meta and "done" in meta:
        return "calibration_progress"
    try:
        kind = json.loads(meta.get("kind", "null"))
    except json.JSONDecodeError:
        return None
    return kind if isinstance(kind, str) else None


def _is_saexport_onnx(path: Path) -> bool:
    return path.is_file() and _readable(OnnxMetadata.read, path)


def _is_manifest(path: Path) -> bool:
    try:
        return isinstance(json.loads(path.read_text()).get("stages"), dict)
    except (OSError, ValueError, AttributeError):
        return False


def _readable(read, path: Path) -> bool:
    try:
        read(path)
    except SaexportError:
        return False
    return True


@dataclass(frozen=True)
class ModelIdentity:
    """Which model and weights an artifact was made from: the preset, its config hash, and the weights' id."""

    model: str
    config_hash: str
    weights_id: str


@dataclass(frozen=True)
class BlockedGrid:
    """A token grid `(frames, height, width)` in a token layout, cut into blocks of `block_size` tokens: the shape
    a topology is made for (its file records all three)."""

    grid: tuple[int, int, int]
    block_size: int
    layout: TokenLayout

    @property
    def seq_len(self) -> int:
        return math.prod(self.grid)

    @property
    def num_blocks(self) -> int:
        return num_blocks(self.seq_len, self.block_size)


@dataclass
class Topology:
    """Threshold levels uint8 `[layers, heads, n, n]` for one model, token grid, block size and layout."""

    levels: torch.Tensor
    model: str
    config_hash: str
    weights_id: str
    grid: tuple[int, int, int]
    block_size: int
    layout: TokenLayout
    calibration: dict[str, Any] = field(default_factory=dict)

    def metadata(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "kind": "topology",
            "model": self.model,
            "config_hash": self.config_hash,
            "weights_id": self.weights_id,
            "grid": list(self.grid),
            "block_size": self.block_size,
            "layout": self.layout.to_metadata(),
            "calibration": self.calibration,
        }

    @property
    def blocks(self) -> BlockedGrid:
        return BlockedGrid(tuple(self.grid), self.block_size, self.layout)

    def hash(self) -> str:
        return _content_hash(self.levels, self.metadata())

    def save(self, path: str | Path) -> None:
        _save(path, self.levels, self.metadata())

    @classmethod
    def load(cls, path: str | Path) -> Topology:
        levels, meta = _load(path, "topology")
        try:
            grid, block_size = tuple(int(x) for x in meta["grid"]), int(meta["block_size"])
        except (KeyError, TypeError, ValueError):
            raise SaexportError(f"{path}: the metadata has no valid grid and block_size") from None
        if len(grid) != 3 or min(grid) < 1 or block_size < 1:
            raise SaexportError(f"{path}: grid {grid} and block size {block_size} must be positive")
        n = num_blocks(math.prod(grid), block_size)
        if levels.dim() != 4 or tuple(levels.shape[2:]) != (n, n):
            raise SaexportError(f"{path}: levels must be [layers, heads, {n}, {n}] for grid {grid} and blocks of "
                                f"{block_size}, got {list(levels.shape)}")
        return cls(
            levels=levels,
            model=meta["model"],
            config_hash=meta["config_hash"],
            weights_id=meta["weights_id"],
            grid=grid,  # type: ignore[arg-type]
            block_size=block_size,
            layout=parse_layout(meta["layout"]),
            calibration=meta.get("calibration", {}),
        )

    @property
    def made_for(self) -> ModelIdentity:
        return ModelIdentity(self.model, self.config_hash, self.weights_id)

    def check_matches(self, model: ModelIdentity, grid: tuple[int, int, int] | None = None) -> None:
        """Refuse a topology made for another model or other weights, or (when `grid` is given) another token
        grid. The block size and layout are the topology's own: whoever reads it uses them."""
        if model.weights_id != self.weights_id:
            raise SaexportError(f"the artifacts were made from weights {self.weights_id[:16]}, these are "
                                f"{model.weights_id[:16]}: load the same weights (or the same random-weights seed)")
        problems = []
        if (self.model, self.config_hash) != (model.model, model.config_hash):
            problems.append(f"it was built for model {self.model} (config {self.config_hash}), "
                            f"not {model.model} (config {model.config_hash})")
        if grid is not None and tuple(self.grid) != tuple(grid):
            problems.append(f"its token grid is {tuple(self.grid)}, the export's is {tuple(grid)} "
                            "(resolution or frames differ)")
        if problems:
            raise SaexportError("the topology does not fit this export: " + "; ".join(problems))


@dataclass
class Budgets:
    """Budget levels uint8 `[steps, layers, heads]` tuned on one topology."""

    levels: torch.Tensor
    topology_hash: str
    fidelity: str
    curve: dict[str, Any] = field(default_factory=dict)
    mean_density: float = 1.0

    @property
    def steps(self) -> int:
        return self.levels.shape[0]

    def metadata(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "kind": "budgets",
            "topology_hash": self.topology_hash,
            "fidelity": self.fidelity,
            "curve": self.curve,
            "mean_density": self.mean_density,
        }

    def hash(self) -> str:
        return _content_hash(self.levels, self.metadata())

    def save(self, path: str | Path) -> None:
        _save(path, self.levels, self.metadata())

    @classmethod
    def load(cls, path: str | Path) -> Budgets:
        levels, meta = _load(path, "budgets")
        if levels.dim() != 3 or levels.shape[0] < 1:
            raise SaexportError(f"{path}: levels must be [steps, layers, heads], got {list(levels.shape)}")
        return cls(levels, meta["topology_hash"], meta["fidelity"], meta.get("curve", {}),
                   float(meta["mean_density"]))

    def check_matches(self, topology: Topology, steps: int | None = None) -> None:
        if self.topology_hash != topology.hash():
            raise SaexportError("the budgets were tuned on another topology "
                                f"({self.topology_hash[:12]}, this one is {topology.hash()[:12]}); rerun budgets")
        layers, heads = topology.levels.shape[:2]
        if tuple(self.levels.shape[1:]) != (layers, heads):
            raise SaexportError(f"budgets cover {tuple(self.levels.shape[1:])} layers x heads, "
                                f"the topology {(layers, heads)}")
        if steps is not None and self.steps != steps:
            raise SaexportError(f"budgets are for {self.steps} denoising steps, not {steps}")


REQUIRED_METADATA = {
    "topology": ("model", "config_hash", "weights_id", "grid", "block_size", "layout"),
    "budgets": ("topology_hash", "fidelity", "mean_density"),
}


def _content_hash(levels: torch.Tensor, meta: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    digest.update(levels.contiguous().numpy().tobytes())
    return digest.hexdigest()


def _save(path: str | Path, levels: torch.Tensor, meta: dict[str, Any]) -> None:
    """Write a one-tensor safetensors file with a sorted header, so equal inputs give equal bytes.

    (The safetensors library writes metadata in hash-map order, which changes from run to run.)
    """
    if levels.dtype != torch.uint8:
        raise TypeError(f"levels must be uint8, got {levels.dtype}")
    data = levels.contiguous().numpy().tobytes()
    header = {
        "__metadata__": {k: json.dumps(v, sort_keys=True) for k, v in meta.items()},
        "levels": {"dtype": "U8", "shape": list(levels.shape), "data_offsets": [0, len(data)]},
    }
    encoded = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format aligns the data to 8 bytes
    with atomic_path(path) as tmp:
        tmp.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)


def _load(path: str | Path, kind: str) -> tuple[torch.Tensor, dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise SaexportError(f"{kind} file {path} does not exist")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
        meta = {k: json.loads(v) for k, v in raw.items()}
    except (SafetensorError, OSError, json.JSONDecodeError) as e:
        raise SaexportError(f"{path} is not a readable {kind} file ({e})") from None
    missing = [name for name in REQUIRED_METADATA[kind] if name not in meta]
    if meta.get("kind") == kind and missing:
        raise SaexportError(f"{path}: the {kind} metadata lacks {', '.join(missing)}; regenerate it")
    if meta.get("kind") != kind or "levels" not in tensors:
        raise SaexportError(f"{path} is not a {kind} file (kind: {meta.get('kind')!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise SaexportError(f"{path} has format version {meta.get('format_version')}, "
                            f"this saexport reads version {FORMAT_VERSION}; regenerate it")
    if tensors["levels"].dtype != torch.uint8:
        raise SaexportError(f"{path}: levels must be uint8, got {tensors['levels'].dtype}")
    return tensors["levels"], meta


@dataclass(frozen=True)
class OnnxMetadata:
    """The `metadata_props` of an exported `model.onnx`: what made the graph, for the stages that read it."""

    model: str
    config_hash: str
    weights_id: str
    random_weights: bool
    width: int
    height: int
    frames: int
    grid: tuple[int, int, int]
    block_size: int
    layout: str
    steps: int
    topology_hash: str
    budgets_hash: str
    fidelity: str
    mean_density: float
    dtype: str  # fp32, fp16 or bf16
    batch: int
    saexport_version: str

    def to_props(self) -> dict[str, str]:
        return {k: json.dumps(v) if not isinstance(v, str) else v for k, v in asdict(self).items()}

    @classmethod
    def read(cls, onnx_path: str | Path) -> OnnxMetadata:
        import onnx
        from google.protobuf.message import DecodeError

        try:
            props = {p.key: p.value for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props}
        except (OSError, DecodeError) as e:
            raise SaexportError(f"{onnx_path} is not a readable ONNX model ({e})") from None
        try:
            return cls.from_props(props)
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise SaexportError(f"{onnx_path} lacks saexport's metadata ({e}): export it with `saexport export` "
                                "of this version") from None

    @classmethod
    def from_props(cls, props: dict[str, str]) -> OnnxMetadata:
        values = {name: props[name] if f.type == "str" else json.loads(props[name])
                  for name, f in cls.__dataclass_fields__.items()}
        values["grid"] = tuple(values["grid"])
        return cls(**values)


@dataclass(frozen=True)
class FidelityReport:
    """`fidelity.json` beside the budgets (`topology.report`): what the budgets deliver against the dense model on
    prompts and seeds the calibration did not use (PSNR, and SSIM for pixel models: mean and 95% half-width over
    prompts), the quality search's curve on the held-out calibration prompts, the mean density and the expected
    speed-up. Written by `budgets` and `build`, copied by `export`, shown by `inspect`, carried into `engine.json`
    and the Triton repository's README."""

    model: str
    goal: str
    rule: str
    mean_density: float
    prompts: str
    seeds: list[int]
    held_out: dict[str, Any]  # {"psnr": {"mean", "ci95", "n"}, "ssim": {...}}
    search: dict[str, Any] | None  # the quality target's search (target, achieved, psnr_vs_density), or None
    speedup: dict[str, Any]  # {"attention", "dit" (or None), "source", "attention_share"}
    budgets_hash: str

    KIND = "saexport fidelity report"

    @property
    def target(self) -> float | None:
        return None if self.search is None else self.search["psnr"]

    def summary(self) -> str:
        """One line for the end of a build."""
        psnr = self.held_out["psnr"]
        text = f"{self.goal}: {psnr['mean']:.1f} dB"
        if psnr.get("ci95") is not None:
            text += f" +- {psnr['ci95']:.1f}"
        if "ssim" in self.held_out:
            text += f", SSIM {self.held_out['ssim']['mean']:.3f}"
        text += f" against dense on {psnr['n']} held-out prompts, at {self.mean_density:.0%} of the blocks"
        if self.target is not None:
            text += f" (target {self.target:g} dB: {'met' if psnr['mean'] >= self.target else 'MISSED'} on average)"
        speed = self.speedup
        text += f"; expected attention speed-up {speed['attention']:.1f}x"
        if speed.get("dit") is not None:
            text += f", DiT step {speed['dit']:.2f}x"
        return text

    def write(self, path: Path) -> None:
        write_text_atomic(path, json.dumps({"kind": self.KIND, "format_version": FORMAT_VERSION, **asdict(self)},
                                           indent=1) + "\n")

    @classmethod
    def read(cls, path: Path) -> FidelityReport:
        try:
            record = json.loads(Path(path).read_text())
            if record.pop("kind") != cls.KIND or record.pop("format_version") != FORMAT_VERSION:
                raise KeyError("kind")
            return cls(**record)
        except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise SaexportError(f"{path} is not a fidelity report of this saexport ({e})") from None


@dataclass(frozen=True)
class EngineMetadata:
    """`engine.json` beside `model.engine`: the graph's metadata plus what the engine was built with and for.

    A loader refuses an engine whose plugin version, kernel ABI or GPU differs from its own, before TensorRT
    would fail obscurely."""

    onnx: OnnxMetadata
    tensorrt_version: str
    plugin_version: str
    kernel_abi: int
    gpu_name: str | None
    gpu_capability: tuple[int, int] | None
    plugin_libraries: tuple[str, ...] = ()  # what must ship with the engine (Triton's plugins= option)
    version_compatible: bool = False
    fidelity: str | None = None  # the fidelity report's summary, where the graph's folder has one

    def write(self, path: Path) -> None:
        record = asdict(self)
        record["onnx"] = self.onnx.to_props()
        write_text_atomic(path, json.dumps(record, indent=2))

    @classmethod
    def read(cls, path: Path) -> EngineMetadata:
        if not path.is_file():
            raise SaexportError(f"{path} is missing: engines are built by `saexport engine`")
        try:
            record = json.loads(path.read_text())
            onnx_meta = OnnxMetadata.from_props(record.pop("onnx"))
            record["gpu_capability"] = tuple(record["gpu_capability"]) if record.get("gpu_capability") else None
            record["plugin_libraries"] = tuple(record.get("plugin_libraries", ()))
            return cls(onnx=onnx_meta, **record)
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise SaexportError(f"{path} is not an engine.json of this saexport ({e}): rebuild the engine") from None

    def check_loadable(self, path: Path, plugin_version: str, kernel_abi: int,
                       gpu: tuple[str, tuple[int, int]] | None) -> None:
        """Refuse an engine of another plugin version, kernel ABI or GPU (`gpu`: this machine's name, capability)."""
        if self.kernel_abi != kernel_abi or self.plugin_version != plugin_version:
            raise SaexportError(f"{path} was built with plugin version {self.plugin_version} / kernel ABI "
                                f"{self.kernel_abi}; this saexport has {plugin_version} / {kernel_abi}: rebuild it")
        if gpu is not None and self.gpu_capability != gpu[1]:
            raise SaexportError(f"{path} was built for {self.gpu_name} ({self.gpu_capability}), this GPU is "
                                f"{gpu[0]} ({gpu[1]}): rebuild the engine here")
