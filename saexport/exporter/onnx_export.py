"""Export a `SparseWanDiT` to `model.onnx` (docs/ARCHITECTURE.md, "The ONNX node" and the graph I/O), with the metadata
of `artifacts.OnnxMetadata`."""

from __future__ import annotations

import logging
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch

import saexport
from saexport.artifacts import ArtifactFolder, Budgets, OnnxMetadata, Topology
from saexport.errors import SaexportError
from saexport.folders import clean_stale, temporary_folder
from saexport.models.checkpoint import LoadedModel, dtype_name
from saexport.models.dit import SparseWanDiT
from saexport.models.onnx_op import register_schema, translation_table
from saexport.models.video_shape import VideoShape
from saexport.runtime.generation import model_identity

INPUT_NAMES = ["hidden_states", "timestep", "encoder_hidden_states", "step_index"]
OUTPUT_NAMES = ["noise_pred"]
STAGING_PREFIX = ".export-"
EXTERNAL_DATA_LIMIT = 2 * 1024**3  # protobuf's limit for one file


@dataclass(frozen=True)
class ExportedModel:
    path: Path
    metadata: OnnxMetadata


def example_inputs(loaded: LoadedModel, video: VideoShape, dtype: torch.dtype, batch: int = 1) -> tuple:
    """Inputs of the exported graph's shapes and dtypes (random values, never zeros)."""
    config = loaded.transformer.config
    if video.codec.channels != config.in_channels:
        raise SaexportError(f"the video's latents have {video.codec.channels} channels ({video.codec.name}), "
                            f"the model takes {config.in_channels}")
    return (
        torch.randn(batch, *video.latent_shape(), dtype=dtype),
        torch.full((batch,), 999.0, dtype=torch.float32),  # fp32 always: 999 is 1000 in bf16
        torch.randn(batch, loaded.preset.text_len, config.text_dim, dtype=dtype),
        torch.zeros(1, dtype=torch.int32),
    )


def build_sparse_dit(loaded: LoadedModel, topology: Topology, budgets: Budgets, video: VideoShape) -> SparseWanDiT:
    """The sparse DiT for `video`, after checking that topology and budgets were made for it."""
    grid = video.token_grid(loaded.preset.patch_size)
    topology.check_matches(model_identity(loaded), grid)
    shape, model = tuple(topology.levels.shape[:2]), (loaded.preset.num_layers, loaded.preset.num_heads)
    if shape != model:
        raise SaexportError(f"the topology covers {shape[0]} layers x {shape[1]} heads, {loaded.preset.name} has "
                            f"{model[0]} x {model[1]}: it was not made for this model (or was edited)")
    budgets.check_matches(topology)
    return SparseWanDiT(loaded.transformer, grid, topology.layout, topology.levels, budgets.levels,
                        topology.block_size)


@contextmanager
def quiet_exporter() -> Iterator[None]:
    """torch.onnx without the notices that are not the user's concern: the optional torchvision ops it skips
    registering, and deprecations between torch's own modules. Its progress lines stay."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        registration.setLevel(level)


def export_onnx(loaded: LoadedModel, topology: Topology, budgets: Budgets, video: VideoShape, out_dir: str | Path,
                batch: int = 1) -> ExportedModel:
    """Write `out_dir/model.onnx` (+ `model.onnx.data` past 2 GB) atomically, then run the checker. The graph's
    precision is the model's as loaded (fp32, or bf16/fp16 with the norms Wan keeps in fp32)."""
    param_dtypes = {p.dtype for p in loaded.transformer.parameters()} - {torch.float32}
    if len(param_dtypes) > 1:
        raise SaexportError(f"the model mixes precisions {sorted(map(str, param_dtypes))}: load it in one")
    dtype = param_dtypes.pop() if param_dtypes else torch.float32
    register_schema()
    module = build_sparse_dit(loaded, topology, budgets, video).cpu().eval()  # calibration may have moved it
    args = example_inputs(loaded, video, dtype, batch)
    with torch.no_grad(), quiet_exporter():
        program = torch.onnx.export(
            module, args, dynamo=True, input_names=INPUT_NAMES, output_names=OUTPUT_NAMES,
            custom_translation_table=translation_table(),
            optimize=True,
        )
    metadata = OnnxMetadata(
        model=loaded.preset.name, config_hash=loaded.preset.config_hash(), weights_id=loaded.weights_id,
        random_weights=loaded.random_weights, width=video.width, height=video.height, frames=video.frames,
        grid=module.grid, block_size=topology.block_size, layout=topology.layout.to_metadata(), steps=budgets.steps,
        topology_hash=topology.hash(), budgets_hash=budgets.hash(), fidelity=budgets.fidelity,
        mean_density=round(budgets.mean_density, 6), dtype=dtype_name(dtype), batch=batch,
        saexport_version=saexport.__version__)
    program.model.metadata_props.update(metadata.to_props())

    out_dir = Path(out_dir)
    target = ArtifactFolder(out_dir).onnx
    out_dir.mkdir(parents=True, exist_ok=True)
    weight_bytes = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    external = weight_bytes > EXTERNAL_DATA_LIMIT * 0.9
    clean_stale(out_dir, STAGING_PREFIX)  # what a killed export left (gigabytes for 14B)
    with temporary_folder(out_dir, STAGING_PREFIX) as tmp:
        staged = Path(tmp) / target.name
        program.save(staged, external_data=external)
        check_onnx(staged)
        # The data file first, the graph last: a model.onnx on disk always has its data beside it.
        for produced in sorted(Path(tmp).iterdir(), key=lambda p: p.name == target.name):
            shutil.move(produced, out_dir / produced.name)
    return ExportedModel(target, metadata)


def check_onnx(path: Path) -> None:
    """`onnx.checker` with full type and shape inference; a path, so external data is allowed."""
    register_schema()
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise SaexportError(f"the exported graph {path} fails onnx.checker: {e}") from None
