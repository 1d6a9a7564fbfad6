"""`topology.safetensors` and `budgets.safetensors` (DESIGN.md, "Topology and budgets files").

Metadata values are JSON strings. A reader checks the format version, and `check_*` refuse an
artifact made for another model, grid, block size or topology with a message saying which.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from saexport.atomic import atomic_path
from saexport.errors import SaexportError
from saexport.exporter.layout import TokenLayout, parse_layout

FORMAT_VERSION = 1


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

    def hash(self) -> str:
        return _content_hash(self.levels, self.metadata())

    def save(self, path: str | Path) -> None:
        _save(path, self.levels, self.metadata())

    @classmethod
    def load(cls, path: str | Path) -> Topology:
        levels, meta = _load(path, "topology")
        return cls(
            levels=levels,
            model=meta["model"],
            config_hash=meta["config_hash"],
            weights_id=meta["weights_id"],
            grid=tuple(meta["grid"]),  # type: ignore[arg-type]
            block_size=int(meta["block_size"]),
            layout=parse_layout(meta["layout"]),
            calibration=meta.get("calibration", {}),
        )

    def check_matches(self, model: str, config_hash: str, grid: tuple[int, int, int], block_size: int) -> None:
        problems = []
        if self.model != model or self.config_hash != config_hash:
            problems.append(f"it was built for model {self.model} (config {self.config_hash}), "
                            f"not {model} (config {config_hash})")
        if tuple(self.grid) != tuple(grid):
            problems.append(f"its token grid is {tuple(self.grid)}, the export's is {tuple(grid)} "
                            "(resolution or frames differ)")
        if self.block_size != block_size:
            problems.append(f"its block size is {self.block_size}, not {block_size}")
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
    if meta.get("kind") != kind or "levels" not in tensors:
        raise SaexportError(f"{path} is not a {kind} file (kind: {meta.get('kind')!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise SaexportError(f"{path} has format version {meta.get('format_version')}, "
                            f"this saexport reads version {FORMAT_VERSION}; regenerate it")
    return tensors["levels"], meta
