"""`saexport build`: topology -> budgets -> export -> engine -> Triton repository, as resumable stages.

Each stage has a key: a hash of everything it depends on, the keys of the stages before it included.
`OUT/build.json` records the key and outputs of every finished stage; a stage whose key and outputs are
unchanged is not run again. An interrupted build resumes at its first unfinished stage, and a changed
input reruns only the stages that depend on it. Every output is written atomically.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from saexport.atomic import write_text_atomic
from saexport.errors import SaexportError
from saexport.exporter.layout import parse_layout
from saexport.exporter.video_shape import parse_video_shape
from saexport.models.checkpoint import LoadedModel, detect_layout, load_model, parse_dtype, resolve_weights
from saexport.models.presets import get_preset
from saexport.topology.files import Budgets, Topology

MANIFEST = "build.json"


@dataclass(frozen=True)
class BuildSettings:
    model: str
    fidelity: str = "high"
    weights: str | None = None
    random_weights: bool = False
    seed: int = 0
    resolution: str = "480p"
    frames: int = 81
    dtype: str = "bf16"
    steps: int = 50
    block_size: int = 128
    layout: str = "tile3d"
    prompts: int = 4
    calib_embeddings: str | None = None
    seeds: tuple[int, ...] = (0,)
    rows_per_block: int = 16
    device: str = "cpu"
    plugin: str | None = None
    triton_name: str = "wan"
    gpus: tuple[int, ...] = (0,)


@dataclass
class Manifest:
    path: Path
    stages: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def load(cls, out_dir: Path) -> Manifest:
        path = out_dir / MANIFEST
        if not path.is_file():
            return cls(path)
        try:
            return cls(path, json.loads(path.read_text())["stages"])
        except (json.JSONDecodeError, KeyError):
            raise SaexportError(f"{path} is corrupt: delete it to rebuild every stage") from None

    def is_current(self, name: str, key: str) -> bool:
        entry = self.stages.get(name)
        return (entry is not None and entry["key"] == key
                and all((self.path.parent / output).exists() for output in entry["outputs"]))

    def record(self, name: str, key: str, outputs: list[str]) -> None:
        self.stages[name] = {"key": key, "outputs": outputs}
        write_text_atomic(self.path, json.dumps({"stages": self.stages}, indent=2))


def stage_key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def file_fingerprint(paths: list[Path]) -> list:
    """Names, sizes and modification times: cheap enough to check on every build (hashing 28 GB is not)."""
    return [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in paths]


def run_build(settings: BuildSettings, out_dir: str | Path, echo: Callable[[str], None] = print) -> dict[str, str]:
    """Run the stages that are not current. Returns each stage's fate: "ran", "current" or "skipped: why"."""
    from saexport.engines.scheduler import flow_shift_for
    from saexport.engines.triton_repo import write_triton_repository
    from saexport.exporter.onnx_export import export_onnx
    from saexport.topology.calibration import calibration_set
    from saexport.topology.fast import compute_fidelity, fit_budgets
    from saexport.topology.west import compute_topology

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = Manifest.load(out_dir)
    preset = get_preset(settings.model)
    video = parse_video_shape(settings.resolution, settings.frames, preset.codec)
    grid = video.token_grid(preset.patch_size)
    flow_shift = flow_shift_for(video.height)
    checkpoint = None if settings.random_weights else resolve_weights(preset, settings.weights)
    if checkpoint is None:
        weights = f"random:{settings.seed}"
    else:
        weights = file_fingerprint(detect_layout(checkpoint).files)
    from saexport.models.text_encoder import encoder_fingerprint, has_text_encoder

    if settings.calib_embeddings:
        embeddings_source = file_fingerprint([Path(settings.calib_embeddings)])
    elif checkpoint is not None and has_text_encoder(checkpoint):
        embeddings_source = ["text encoder", encoder_fingerprint(checkpoint), settings.prompts]
    else:
        embeddings_source = f"synthetic:{settings.prompts}"
    calibration = (embeddings_source, list(settings.seeds), settings.steps, settings.rows_per_block)
    fates: dict[str, str] = {}
    models: dict[torch.dtype, LoadedModel] = {}

    def model(dtype: torch.dtype) -> LoadedModel:
        if dtype not in models:
            models[dtype] = load_model(settings.model, checkpoint, dtype=dtype,
                                       random_weights=settings.random_weights, seed=settings.seed)
        return models[dtype]

    def embeddings() -> torch.Tensor:
        calib_file = Path(settings.calib_embeddings) if settings.calib_embeddings else None
        return calibration_set(preset, settings.prompts, calib_file, checkpoint,
                               out_dir / "calibration_embeddings.safetensors")[0]

    def stage(name: str, key: str, outputs: list[str], run: Callable[[], None]) -> None:
        if manifest.is_current(name, key):
            fates[name] = "current"
            echo(f"[build] {name}: up to date")
            return
        echo(f"[build] {name}: running")
        run()
        manifest.record(name, key, outputs)
        fates[name] = "ran"

    calib_device = settings.device
    topology_key = stage_key("topology", preset.name, preset.config_hash(), weights, grid, settings.block_size,
                             settings.layout, calibration)
    stage("topology", topology_key, ["topology.safetensors"], lambda: compute_topology(
        model(torch.float32), grid, settings.block_size, parse_layout(settings.layout), embeddings(),
        list(settings.seeds), settings.steps, flow_shift, settings.rows_per_block, calib_device,
        settings={"embeddings": str(embeddings_source)},
        checkpoint_path=out_dir / "topology.safetensors.partial").save(out_dir / "topology.safetensors"))

    budgets_key = stage_key("budgets", topology_key, settings.fidelity)

    def make_budgets() -> None:
        topology = Topology.load(out_dir / "topology.safetensors")
        table = compute_fidelity(model(torch.float32), topology, embeddings(), [s + 1000 for s in settings.seeds],
                                 settings.steps, flow_shift, settings.rows_per_block, calib_device,
                                 checkpoint_path=out_dir / "budgets.safetensors.partial")
        fit_budgets(topology, table, settings.fidelity).save(out_dir / "budgets.safetensors")

    stage("budgets", budgets_key, ["budgets.safetensors"], make_budgets)

    export_key = stage_key("export", budgets_key, settings.dtype)
    stage("export", export_key, ["model.onnx"], lambda: export_onnx(
        model(parse_dtype(settings.dtype)), Topology.load(out_dir / "topology.safetensors"),
        Budgets.load(out_dir / "budgets.safetensors"), video, out_dir, parse_dtype(settings.dtype)))

    engine_path, engine_key = None, None
    skip = _engine_unavailable(settings)
    if skip:
        fates["engine"] = f"skipped: {skip}"
        echo(f"[build] engine: skipped ({skip}); the ONNX and a Triton repository on ONNX Runtime are built")
    else:
        from saexport.engines.denoiser import import_tensorrt
        from saexport.engines.tensorrt_build import build_engine

        engine_key = stage_key("engine", export_key, file_fingerprint([Path(settings.plugin)]),
                               import_tensorrt().__version__)
        stage("engine", engine_key, ["engine/model.engine"],
              lambda: build_engine(out_dir / "model.onnx", settings.plugin, out_dir / "engine"))
        engine_path = out_dir / "engine" / "model.engine"

    triton_key = stage_key("triton", export_key, engine_key,
                           settings.triton_name, list(settings.gpus), settings.steps)
    stage("triton", triton_key, ["triton"], lambda: write_triton_repository(
        out_dir / "model.onnx", out_dir / "triton", settings.triton_name, settings.steps, flow_shift,
        engine_path=engine_path, gpus=list(settings.gpus)))
    return fates


def _engine_unavailable(settings: BuildSettings) -> str | None:
    from saexport.engines.denoiser import import_tensorrt

    try:
        import_tensorrt()
    except SaexportError as e:
        return str(e)
    if settings.plugin is None or not Path(settings.plugin).is_file():
        return "no --plugin library given (build it with cmake -DTensorRT_ROOT=...)"
    if settings.dtype == "fp32":
        return "the plugin runs fp16 and bf16 graphs: build with --dtype bf16 or fp16"
    return None
