"""The pipeline's stages, shared by `saexport build` and every single-stage command:

    weights ─► topology (WEST) ─► budgets (FAST) ─► export (ONNX) ─► engine (TensorRT) ─► triton

Each `make_*` function is one stage: inputs in, artifact files out. `saexport topology`, `budgets`, `export`,
`engine` and `triton` call one each; `run_build` calls them all in order, as stages keyed by a hash of their
inputs (the keys of the stages before them included). `OUT/build.json` records the key and outputs of every
finished stage; a stage whose key and outputs are unchanged is not run again, an interrupted build resumes at its
first unfinished stage, and a changed input reruns only the stages that depend on it. Because both paths run the
same functions on the same settings, a build and the single-stage commands write byte-identical artifacts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from saexport.artifacts import ArtifactFolder, BlockedGrid, Budgets, Topology, artifact_kind
from saexport.atomic import write_text_atomic
from saexport.errors import SaexportError
from saexport.folders import (
    FolderLock,
    check_replaceable_folder,
    check_writable_file_target,
    claim_output_folder,
    read_owner,
)
from saexport.layout import parse_layout
from saexport.models.checkpoint import LoadedModel, detect_layout, load_model, parse_dtype, resolve_weights
from saexport.models.presets import ModelPreset, RunDefaults, get_preset
from saexport.models.video_shape import VideoShape, parse_video_shape, video_of_grid
from saexport.runtime.sampler import DEFAULT_GUIDANCE, PASSES
from saexport.runtime.schedule import flow_shift_for

log = logging.getLogger("saexport")


@dataclass(frozen=True)
class ModelSource:
    """Which model: a preset and its checkpoint (or random weights, for speed measurements only)."""

    model: str
    weights: Path | None = None
    random_weights: bool = False
    seed: int = 0

    @property
    def preset(self) -> ModelPreset:
        return get_preset(self.model)

    @property
    def checkpoint(self) -> Path | None:
        return None if self.random_weights else resolve_weights(self.preset, self.weights)

    def fingerprint(self) -> list | str:
        """Cheap to compute on every build (hashing 28 GB is not): names, sizes and modification times."""
        if self.checkpoint is None:
            return f"random:{self.seed}"
        return [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in detect_layout(self.checkpoint).files]


class Models:
    """Each precision of the model loaded once per command, whichever stages ask for it."""

    def __init__(self, source: ModelSource):
        self.source = source
        self._loaded: dict[torch.dtype, LoadedModel] = {}

    def get(self, dtype: torch.dtype = torch.float32) -> LoadedModel:
        if dtype not in self._loaded:
            log.info("loading %s (%s)", self.source.model, str(dtype).removeprefix("torch."))
            self._loaded[dtype] = load_model(self.source.model, self.source.checkpoint, dtype=dtype,
                                             random_weights=self.source.random_weights, seed=self.source.seed)
        return self._loaded[dtype]


@dataclass(frozen=True)
class BudgetRule:
    """How FAST allocates (docs/ARCHITECTURE.md, "The method in one page"): v1, the lowest level reaching a graded
    fidelity target; v2 (the default: docs/BENCHMARKS.md measured it 3.3-3.7 dB above v1 at every preset), per
    entry the level maximising w * Q - lambda * density, with the quality proxy Q measured along the sampler loop
    on `rows_per_head` rows a head, the weights w measured end to end (`sensitivity`, over `buckets` step buckets
    and every layer, on the first `sensitivity_prompts` calibration prompts: 1 + buckets + layers whole
    generations each) and `warmup` dense steps counted in the goal (or "auto")."""

    rule: str = "v2"
    proxy: str = "output"
    warmup: int | str = 0
    rows_per_head: int = 16
    sensitivity: bool = True
    buckets: int = 5
    sensitivity_prompts: int = 1

    def key(self) -> dict:
        """What the allocation depends on: v1 reads none of v2's settings."""
        return asdict(self) if self.rule == "v2" else {"rule": "v1"}

    def __post_init__(self):
        if self.rule not in ("v1", "v2"):
            raise SaexportError(f"--rule must be v1 or v2, got {self.rule}")
        if self.warmup != "auto" and (not isinstance(self.warmup, int) or self.warmup < 0):
            raise SaexportError(f"--warmup must be a number of steps or auto, got {self.warmup}")
        if self.sensitivity_prompts < 1:
            raise SaexportError(f"--sensitivity-prompts must be at least 1, got {self.sensitivity_prompts}")


@dataclass(frozen=True)
class Calibration:
    """How WEST and FAST calibrate: the prompts, and the sampler loop they walk (as generation runs it)."""

    prompts: int = 4
    embeddings_file: Path | None = None
    seeds: tuple[int, ...] = (0,)
    rows_per_block: int = 16
    guidance: float = DEFAULT_GUIDANCE
    passes: tuple[str, ...] = PASSES
    device: str = "cpu"
    aggregation: str = "min"  # how WEST combines its runs (topology.west.AGGREGATIONS)

    def prompt_source(self, source: ModelSource):
        from saexport.topology.prompts import PromptSource

        return PromptSource(source.preset, self.prompts, self.embeddings_file, source.checkpoint)

    def loop(self, steps: int, video: VideoShape):
        from saexport.topology.calibration import CalibrationLoop

        return CalibrationLoop(tuple(self.seeds), steps, flow_shift_for(video.height), self.guidance,
                               tuple(self.passes))

    def fingerprint(self, source: ModelSource) -> list:
        """What the topology depends on besides the model and grid (the device is not: results are the same)."""
        return [self.prompt_source(source).fingerprint(), list(self.seeds), self.rows_per_block, self.guidance,
                list(self.passes), self.aggregation]


def resolve_run(model: str, **given) -> RunDefaults:
    """The model's run defaults (resolution, frames, block size, layout, steps, dtype), overridden by the options
    given (those not None), checked before any compute."""
    run = replace(get_preset(model).defaults, **{k: v for k, v in given.items() if v is not None})
    if run.block_size < 1:
        raise SaexportError(f"--block-size must be a positive number of tokens, got {run.block_size}")
    if run.steps < 1:
        raise SaexportError(f"--steps must be at least 1, got {run.steps}")
    parse_dtype(run.dtype)
    parse_layout(run.layout)
    return run


def video_of(source: ModelSource, run: RunDefaults, device: str = "cpu") -> VideoShape:
    """The run's video, refused before any compute when one forward pass of it cannot fit in `device`'s memory."""
    video = parse_video_shape(run.resolution, run.frames, source.preset.codec)
    check_fits_in_memory(source.preset, video, device)
    return video


def check_fits_in_memory(preset: ModelPreset, video: VideoShape, device: str) -> None:
    """A lower bound of one batch-1 forward's activations (the FFN's hidden layer beside a few residual-width
    tensors, fp32) against the device's memory: a video that cannot fit is an error, not an allocation failure."""
    tokens = math.prod(video.token_grid(preset.patch_size))
    width = preset.num_heads * preset.head_dim
    need = tokens * (preset.config["ffn_dim"] + 8 * width) * 4
    if device.startswith("cuda") and torch.cuda.is_available():
        have, where = torch.cuda.get_device_properties(torch.device(device)).total_memory, "the GPU"
    else:
        have, where = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine"
    if need > have:
        raise SaexportError(f"a {video.describe()} video is {tokens} tokens; one forward pass of {preset.name} needs "
                            f"at least {need / 2**30:.0f} GiB and {where} has {have / 2**30:.0f} GiB: choose a smaller "
                            "--resolution or --frames")


def open_output_folder(root: Path, owner: str) -> Path:
    """Claim `root` for `owner` before any compute: a new or empty folder, one marked as `owner`'s, or one holding
    only saexport's artifacts (single-stage outputs, or an older build). Anything else is refused, never touched."""
    return claim_output_folder(root, owner, adopt=lambda folder: ArtifactFolder(folder).holds_only_artifacts())


def partial_path(out_path: Path) -> Path:
    """Where an interrupted calibration keeps its progress; rerunning the same command resumes from it."""
    return out_path.with_name(out_path.name + ".partial")


def calibration_set(models: Models, calibration: Calibration, out_path: Path):
    """The calibration prompts, encoded (cached beside `out_path`), and said where they come from."""
    prompts = calibration.prompt_source(models.source)
    prompts.check()
    encoded = prompts.load(cache=out_path.with_name(ArtifactFolder(out_path.parent).calibration_embeddings.name))
    if prompts.kind == "synthetic":
        log.warning("note: %d SYNTHETIC prompt embeddings (seeded normal): give --calib-embeddings, or a checkpoint "
                    "with text_encoder/, for real prompts", calibration.prompts)
    else:
        log.info("calibration prompts: %s", encoded.source)
    return encoded


def check_artifact_target(out_path: Path, kind: str, inputs: list[Path | None], overwrite: bool) -> None:
    """`out_path` may receive a `kind` file: not an input nor inside one (a checkpoint), and not a file saexport
    did not write unless `overwrite` (a topology rerun replaces its own topology, never a user's file)."""
    check_writable_file_target(out_path, (".safetensors",), inputs=[p for p in inputs if p is not None],
                               overwrite=overwrite, ours=lambda path: artifact_kind(path) == kind)


def make_topology(models: Models, run: RunDefaults, calibration: Calibration, out_path: Path,
                  overwrite: bool = False) -> Topology:
    """WEST: calibrate the dense model along the sampler's loop; write the threshold map to `out_path`."""
    from saexport.topology.west import compute_topology

    check_artifact_target(out_path, "topology", [calibration.embeddings_file, models.source.checkpoint], overwrite)
    source = models.source
    video = video_of(source, run, calibration.device)
    topology = compute_topology(models.get(), video.token_grid(source.preset.patch_size), run.block_size,
                                parse_layout(run.layout), calibration_set(models, calibration, out_path),
                                calibration.loop(run.steps, video), calibration.rows_per_block, calibration.device,
                                checkpoint_path=partial_path(out_path), aggregation=calibration.aggregation)
    topology.save(out_path)
    return topology


def make_budgets(models: Models, topology_path: Path, fidelity: str, calibration: Calibration, steps: int,
                 out_path: Path, rule: BudgetRule = BudgetRule(), overwrite: bool = False) -> Budgets:
    """FAST: measure along the sampler's loop what each level of the map costs; allocate the preset's budgets by
    `rule` and write them to `out_path`."""
    from saexport.topology.fast import DENSITY_GOALS, compute_fidelity, fit_budgets
    from saexport.topology.fast_v2 import compute_budgets_v2

    if fidelity not in DENSITY_GOALS:
        raise SaexportError(f"unknown fidelity preset '{fidelity}'; use one of {', '.join(DENSITY_GOALS)}")
    check_artifact_target(out_path, "budgets", [topology_path, calibration.embeddings_file,
                                                models.source.checkpoint], overwrite)
    source = models.source
    topology = Topology.load(topology_path)
    topology.check_matches(models.get().identity)
    video = video_of_grid(topology.grid, source.preset.patch_size, source.preset.codec)
    check_fits_in_memory(source.preset, video, calibration.device)
    prompts, loop = calibration_set(models, calibration, out_path), calibration.loop(steps, video)
    if rule.rule == "v2":
        budgets = compute_budgets_v2(models.get(), topology, prompts, loop, fidelity, proxy=rule.proxy,
                                     rows_per_head=rule.rows_per_head, sensitivity=rule.sensitivity,
                                     sensitivity_prompts=min(rule.sensitivity_prompts, len(prompts.embeddings)),
                                     buckets=rule.buckets, warmup=rule.warmup, device=calibration.device,
                                     checkpoint_path=partial_path(out_path))
    else:
        table = compute_fidelity(models.get(), topology, prompts, loop, calibration.rows_per_block,
                                 calibration.device, checkpoint_path=partial_path(out_path))
        budgets = fit_budgets(topology, table, fidelity)
    budgets.save(out_path)
    return budgets


def make_export(models: Models, run: RunDefaults, topology: Topology, budgets: Budgets, out_dir: Path,
                batch: int = 1):
    """The sparse DiT as `out_dir/model.onnx`, with the topology and budgets it freezes beside it, so the folder
    is complete for every back end of `generate`."""
    from saexport.exporter.onnx_export import export_onnx

    folder = ArtifactFolder(out_dir)
    for artifact, path in ((topology, folder.topology), (budgets, folder.budgets)):
        if not path.is_file() or type(artifact).load(path).hash() != artifact.hash():
            artifact.save(path)
    dtype = parse_dtype(run.dtype)
    return export_onnx(models.get(dtype), topology, budgets, video_of(models.source, run), out_dir, dtype, batch)


def make_standins(models: Models, run: RunDefaults, density: float) -> tuple[Topology, Budgets]:
    """A STAND-IN topology and budgets (not calibrated): the graph's shape, not the model's quality."""
    from saexport.topology.standin import standin_budgets, standin_topology

    loaded, preset = models.get(parse_dtype(run.dtype)), models.source.preset  # the export's precision: one load
    grid = video_of(models.source, run).token_grid(preset.patch_size)
    topology = standin_topology(loaded.identity, preset.num_layers, preset.num_heads,
                                BlockedGrid(grid, run.block_size, parse_layout(run.layout)))
    return topology, standin_budgets(topology, run.steps, density)


def make_engine(onnx_path: Path, plugin: Path, out_dir: Path, **options) -> Path:
    """The engine beside its graph: `out_dir` is an export or build folder (or a new one), locked while written."""
    from saexport.engines.tensorrt_build import build_engine

    folder = claim_output_folder(out_dir, read_owner(out_dir) or "engine", inputs=[plugin],
                                 adopt=lambda f: ArtifactFolder(f).holds_only_artifacts())
    with FolderLock(folder):
        return build_engine(onnx_path, plugin, folder, **options)


def make_triton(onnx_path: Path, out_dir: Path, name: str, engine_path: Path | None, gpus: list[int],
                weights: Path | None = None, overwrite: bool = False) -> Path:
    """`weights`: the checkpoint the graph was exported from (its text encoder, VAE and, for a bf16 graph without
    an engine, its DiT serve from there); None: the package's own checkpoint where the model ships one.
    `overwrite`: replace the old repository even where a file of it was edited by hand."""
    from saexport.triton.repository import write_triton_repository

    return write_triton_repository(onnx_path, out_dir, name, engine_path=engine_path, gpus=gpus, weights=weights,
                                   overwrite=overwrite)


def engine_unavailable(plugin: Path | None, dtype: str) -> str | None:
    """Why the engine stage cannot run here, or None."""
    from saexport.runtime.denoisers import import_tensorrt

    try:
        import_tensorrt()
    except SaexportError as e:
        return str(e)
    if plugin is None or not plugin.is_file():
        return "no --plugin library given (build it with cmake -DTensorRT_ROOT=...)"
    if dtype == "fp32":
        return "the plugin runs fp16 and bf16 graphs: build with --dtype bf16 or fp16"
    return None


@dataclass(frozen=True)
class BuildSettings:
    source: ModelSource
    run: RunDefaults
    calibration: Calibration = Calibration()
    fidelity: str = "high"
    budget_rule: BudgetRule = BudgetRule()
    plugin: Path | None = None
    triton_name: str = "wan"
    gpus: tuple[int, ...] = (0,)
    overwrite: bool = False  # replace a Triton repository whose files were edited by hand


def content_digest(path: Path) -> str:
    """A file's or folder's content hash: all of a file under 1 GiB; past that its size and first and last MiB
    (hashing a 28 GB graph on every build would cost minutes); a folder, its files' digests by relative path."""
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.is_file())
        return stage_key([(str(f.relative_to(path)), content_digest(f)) for f in files])
    digest, size = hashlib.sha256(), path.stat().st_size
    with open(path, "rb") as f:
        if size < 2**30:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
        else:
            digest.update(f.read(1 << 20))
            f.seek(size - (1 << 20))
            digest.update(f.read())
            digest.update(str(size).encode())
    return digest.hexdigest()


@dataclass
class Manifest:
    """`build.json`: each finished stage's key and its outputs' content digests. A stage is current only when its
    key matches and every output still has the digest it was written with, so a file changed since (by hand, or
    by another build) is rebuilt rather than trusted."""

    path: Path
    stages: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> Manifest:
        if not path.is_file():
            return cls(path)
        try:
            stages = json.loads(path.read_text())["stages"]
            if not all(isinstance(entry["outputs"], dict) for entry in stages.values()):
                raise KeyError("outputs")
            return cls(path, stages)
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise SaexportError(f"{path} is corrupt or from an older saexport: delete it to rebuild every "
                                "stage") from None

    def is_current(self, name: str, key: str) -> bool:
        entry = self.stages.get(name)
        if entry is None or entry["key"] != key:
            return False
        outputs = {self.path.parent / output: digest for output, digest in entry["outputs"].items()}
        return all(path.exists() and content_digest(path) == digest for path, digest in outputs.items())

    def record(self, name: str, key: str, outputs: list[Path]) -> None:
        root = self.path.parent
        self.stages[name] = {"key": key, "outputs": {str(p.relative_to(root)): content_digest(p) for p in outputs}}
        write_text_atomic(self.path, json.dumps({"stages": self.stages}, indent=2))


def stage_key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def run_build(settings: BuildSettings, out_dir: str | Path, echo: Callable[[str], None] = print) -> dict[str, str]:
    """Run the stages that are not current. Returns each stage's fate: "ran", "current" or "skipped: why".

    The folder is claimed for `build` before any compute and locked while the stages run: a second build on it
    refuses, naming the first."""
    folder = ArtifactFolder(open_output_folder(Path(out_dir), "build"))
    with FolderLock(folder.root):
        return _run_stages(settings, folder, echo)


def _run_stages(settings: BuildSettings, folder: ArtifactFolder, echo: Callable[[str], None]) -> dict[str, str]:
    if (settings.run.dtype != "fp32" and settings.source.checkpoint is None
            and engine_unavailable(settings.plugin, settings.run.dtype)):
        raise SaexportError(f"a {settings.run.dtype} build without an engine serves its DiT from the checkpoint, and "
                            "random weights have none: give --plugin with TensorRT, or build with --dtype fp32")
    manifest = Manifest.load(folder.manifest)
    check_replaceable_folder(folder.triton, "triton", overwrite=settings.overwrite)  # before hours of calibration
    source, run, calibration = settings.source, settings.run, settings.calibration
    preset = source.preset
    video = video_of(source, run)
    grid = video.token_grid(preset.patch_size)
    models = Models(source)
    fates: dict[str, str] = {}

    def stage(name: str, key: str, outputs: list[Path], make: Callable[[], object]) -> None:
        if manifest.is_current(name, key):
            fates[name] = "current"
            echo(f"[build] {name}: up to date")
            return
        echo(f"[build] {name}: running")
        make()
        manifest.record(name, key, outputs)
        fates[name] = "ran"

    topology_key = stage_key("topology", preset.name, preset.config_hash(), source.fingerprint(), grid,
                             run.block_size, run.layout, run.steps, calibration.fingerprint(source))
    stage("topology", topology_key, [folder.topology],
          lambda: make_topology(models, run, calibration, folder.topology))

    budgets_key = stage_key("budgets", topology_key, settings.fidelity, settings.budget_rule.key())
    stage("budgets", budgets_key, [folder.budgets], lambda: make_budgets(
        models, folder.topology, settings.fidelity, calibration, run.steps, folder.budgets, settings.budget_rule))

    export_key = stage_key("export", budgets_key, run.dtype)
    stage("export", export_key, [folder.onnx], lambda: make_export(
        models, run, Topology.load(folder.topology), Budgets.load(folder.budgets), folder.root))

    engine_key, engine_path = None, None
    skip = engine_unavailable(settings.plugin, run.dtype)
    if skip:
        fates["engine"] = f"skipped: {skip}"
        echo(f"[build] engine: skipped ({skip}); the ONNX and a Triton repository on ONNX Runtime are built")
    else:
        from saexport.runtime.denoisers import import_tensorrt

        plugin = settings.plugin
        engine_key = stage_key("engine", export_key, [plugin.name, plugin.stat().st_size, plugin.stat().st_mtime_ns],
                               import_tensorrt().__version__)
        stage("engine", engine_key, [folder.engine, folder.engine_metadata],
              lambda: make_engine(folder.onnx, plugin, folder.root))
        engine_path = folder.engine

    triton_key = stage_key("triton", export_key, engine_key, settings.triton_name, list(settings.gpus),
                           str(source.checkpoint))  # the repository references the checkpoint by its path
    stage("triton", triton_key, [folder.triton], lambda: make_triton(
        folder.onnx, folder.triton, settings.triton_name, engine_path, list(settings.gpus), source.checkpoint,
        settings.overwrite))
    return fates

