"""The pipeline's stages, shared by `saexport build` and every single-stage command:

    weights ─► topology (WEST) ─► budgets (FAST) ─► export (ONNX) ─► engine (TensorRT) ─► triton

Each `make_*` function is one stage: inputs in, artifact files out. `saexport topology`, `budgets`, `export`,
`engine` and `triton` call one each; `run_build` calls them all in order, as stages keyed by a hash of their
inputs (the keys of the stages before them included). `OUT/build.json` records the key and outputs of every
finished stage; a stage whose key and outputs are unchanged is not run again, an interrupted build resumes at its
first unfinished stage, and a changed input reruns only the stages that depend on it. Because both paths run the
same functions on the same settings, a build and the single-stage commands write byte-identical artifacts.

Under torchrun every rank runs the calibration stages (topology, budgets), their prompt x seed work spread over the
ranks and merged in one process's order (`topology.calibration`), so the artifacts are byte-identical to a
single-process build; rank 0 alone claims and locks the folder, decides which stages are current, writes every
file and runs the stages after them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from saexport.artifacts import ArtifactFolder, BlockedGrid, Budgets, FidelityReport, Topology, artifact_kind
from saexport.atomic import atomic_path, write_text_atomic
from saexport.errors import SaexportError
from saexport.folders import (
    FolderLock,
    Output,
    check_replaceable_folder,
    check_writable_file_target,
    claim_output_folder,
    read_owner,
)
from saexport.layout import parse_layout
from saexport.levels import num_blocks
from saexport.models.checkpoint import LoadedModel, ModelSource, load_model, parse_dtype
from saexport.models.presets import ModelPreset, RunDefaults, get_preset
from saexport.models.video_shape import VideoShape, parse_video_shape, video_of_grid
from saexport.runtime.generation import generation_dtype, model_identity
from saexport.runtime.parallel.launch import writes_outputs
from saexport.runtime.parallel.spread import from_rank_zero, launched_ranks
from saexport.runtime.sampler import DEFAULT_GUIDANCE, PASSES
from saexport.runtime.schedule import flow_shift_for
from saexport.topology.goals import BudgetRule, Goal

log = logging.getLogger("saexport")
# Prompts of a quality goal's checks and of the fidelity report, where not given: what a batched GPU loop makes in
# seconds (8: intervals that mean something), and what a CPU affords (2).
HELD_OUT_PROMPTS = {"cuda": 8, "cpu": 2}


class Models:
    """Each precision of the model loaded once per command, whichever stages ask for it."""

    def __init__(self, source: ModelSource):
        self.source = source
        self._loaded: dict[torch.dtype, LoadedModel] = {}

    def get(self, dtype: torch.dtype = torch.float32) -> LoadedModel:
        if dtype not in self._loaded:
            log.info("loading %s (%s)", self.source.model, str(dtype).removeprefix("torch."))
            self._loaded[dtype] = load_model(self.source.model, self.source.checkpoint, dtype=dtype,
                                             random_weights=self.source.random_weights,
                                             seed=self.source.weights_seed)
        return self._loaded[dtype]


@dataclass(frozen=True)
class Calibration:
    """How WEST and FAST calibrate: the prompts, and the sampler loop they walk (as generation runs it; `steps`
    None: the model's)."""

    prompts: int = 4
    embeddings_file: Path | None = None
    seeds: tuple[int, ...] = (0,)
    rows_per_block: int = 16
    guidance: float = DEFAULT_GUIDANCE
    passes: tuple[str, ...] = PASSES
    device: str = "cpu"
    aggregation: str = "min"  # how WEST combines its runs (topology.west.AGGREGATIONS)
    steps: int | None = None
    check_prompts: int | None = None  # held-out calibration prompts a quality goal is checked on (None: by device)
    report_prompts: int | None = None  # prompts of the fidelity report, never calibrated on (None: by device)

    def __post_init__(self):
        if self.steps is not None and self.steps < 1:
            raise SaexportError(f"`steps` must be at least 1, got {self.steps}")

    def steps_for(self, preset: ModelPreset) -> int:
        return self.steps if self.steps is not None else preset.defaults.steps

    def prompt_source(self, source: ModelSource, role: str = "calibration"):
        from saexport.topology.prompts import PromptSource

        held_out = HELD_OUT_PROMPTS["cuda" if self.device.startswith("cuda") else "cpu"]
        count = {"calibration": self.prompts, "check": self.check_prompts or held_out,
                 "report": self.report_prompts or held_out}[role]
        return PromptSource(source.preset, count, self.embeddings_file, source.checkpoint, role)

    def calibrator(self, models: Models, video: VideoShape, out_path: Path, held_out: bool = False):
        """The calibrator of a stage writing `out_path`: the model as generation runs it on the calibration device
        (bf16 and the CUDA kernel on a GPU for Wan2.1, fp32 on a CPU), as many samples a forward pass as the device
        holds, the prompts (encoded once, cached beside `out_path`; with `held_out`, the quality checks' too), the
        loop, and its progress kept beside `out_path`."""
        from saexport.topology.calibration import CalibrationLoop, Calibrator

        preset = models.source.preset
        loaded = models.get(parse_dtype(generation_dtype(preset, self.device)))
        loop = CalibrationLoop(tuple(self.seeds), self.steps_for(preset), flow_shift_for(video.height),
                               self.guidance, tuple(self.passes))
        checks = prompt_set(models, self.prompt_source(models.source, "check"), out_path) if held_out else None
        prompts = prompt_set(models, self.prompt_source(models.source), out_path)
        check_rank_count(prompts.embeddings.shape[0] * len(loop.seeds))
        return Calibrator(loaded, prompts, loop, self.device,
                          samples_per_pass(preset, video, self.device, loaded), progress_file=partial_path(out_path),
                          held_out=checks)

    def reporter(self, models: Models, video: VideoShape, out_path: Path):
        """The calibrator of the fidelity report: report prompts (never calibrated on) at seeds the calibration
        never walked."""
        from saexport.topology.calibration import REPORT_SEED

        calibrator = self.calibrator(models, video, out_path)
        prompts = prompt_set(models, self.prompt_source(models.source, "report"), out_path)
        return replace(calibrator, prompts=prompts, progress_file=None,
                       loop=replace(calibrator.loop, seeds=tuple(REPORT_SEED + seed for seed in self.seeds)))

    def fingerprint(self, source: ModelSource) -> list:
        """What the topology depends on besides the model and grid (the device is not: results are the same)."""
        return [self.prompt_source(source).fingerprint(), list(self.seeds), self.rows_per_block, self.guidance,
                list(self.passes), self.aggregation]


def resolve_run(model: str, **given) -> RunDefaults:
    """The model's run defaults (resolution, frames, block size, layout, steps, dtype), overridden by the options
    given (those not None), checked before any compute."""
    run = replace(get_preset(model).defaults, **{k: v for k, v in given.items() if v is not None})
    if run.block_size < 1:
        raise SaexportError(f"`block_size` must be a positive number of tokens, got {run.block_size}")
    if run.steps < 1:
        raise SaexportError(f"`steps` must be at least 1, got {run.steps}")
    parse_dtype(run.dtype)
    parse_layout(run.layout)
    return run


def video_of(source: ModelSource, run: RunDefaults, device: str = "cpu") -> VideoShape:
    """The run's video, refused before any compute when one forward pass of it, or its map of blocks, cannot fit in
    `device`'s memory."""
    video = parse_video_shape(run.resolution, run.frames, source.preset.codec)
    check_fits_in_memory(source.preset, video, device)
    preset = source.preset
    n = num_blocks(math.prod(video.token_grid(preset.patch_size)), run.block_size)
    need = preset.num_layers * preset.num_heads * n * n + preset.num_heads * n * n * 8  # the map, a layer's scores
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have // 2:
        raise SaexportError(f"a {video.describe()} video cut into blocks of {run.block_size} is {n} blocks: its map "
                            f"of block pairs needs about {need / 2**30:.0f} GiB, this machine has "
                            f"{have / 2**30:.0f}: choose a smaller `resolution` or `frames`, or larger blocks")
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
                            "`resolution` or `frames`")


def open_output_folder(root: Path, owner: str) -> Path:
    """Claim `root` for `owner` before any compute: a new or empty folder, one marked as `owner`'s, or one holding
    only saexport's artifacts (single-stage outputs, or an older build). Anything else is refused, never touched."""
    return claim_output_folder(root, owner, adopt=lambda folder: ArtifactFolder(folder).holds_only_artifacts())


def partial_path(out_path: Path) -> Path:
    """Where an interrupted calibration keeps its progress; rerunning the same command resumes from it."""
    return out_path.with_name(out_path.name + ".partial")


def prompt_set(models: Models, prompts, out_path: Path):
    """A `PromptSource`'s prompts, encoded (cached beside `out_path`), and said where they come from. Under torchrun
    rank 0 encodes them (and keeps the cache) and hands them to the other ranks."""
    prompts.check()
    cache = ArtifactFolder(out_path.parent).calibration_embeddings
    if prompts.role != "calibration":
        cache = cache.with_name(f"{cache.stem}.{prompts.role}{cache.suffix}")
    encoded = from_rank_zero(prompts.load(cache=out_path.with_name(cache.name)) if writes_outputs() else None)
    if prompts.kind == "synthetic":
        log.warning("note: %d SYNTHETIC %s prompt embeddings (seeded normal): give calibration embeddings, or a "
                    "checkpoint with text_encoder/, for real prompts", prompts.count, prompts.role)
    else:
        log.info("%s prompts: %s", prompts.role, encoded.source)
    return encoded


def check_rank_count(trajectories: int) -> None:
    """A launch spreads the calibration's prompt x seed trajectories over its ranks: no more ranks than them."""
    _, ranks = launched_ranks()
    if ranks > trajectories:
        raise SaexportError(f"{ranks} ranks were launched for {trajectories} calibration trajectories (`prompts` x "
                            f"`seeds`): launch at most {trajectories} ranks, or calibrate on more prompts or seeds")


def samples_per_pass(preset: ModelPreset, video: VideoShape, device: str, loaded: LoadedModel) -> int:
    """How many samples a calibration forward pass takes: on a GPU as many as a third of its free memory holds
    (the activations' bound of `check_fits_in_memory`, at the model's precision; at most 64); one on a CPU, where
    a batch saves nothing."""
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return 1
    tokens = math.prod(video.token_grid(preset.patch_size))
    width = preset.num_heads * preset.head_dim
    element = next(loaded.transformer.parameters()).element_size()
    need = tokens * (preset.config["ffn_dim"] + 8 * width) * element
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return max(1, min(64, int(free / 3 // need)))


def check_artifact_target(out: Output, kind: str, inputs: list[Path | None]) -> None:
    """`out.path` may receive a `kind` file: not an input nor inside one (a checkpoint), and not a file saexport
    did not write unless `out.overwrite` (a topology rerun replaces its own topology, never a user's file)."""
    check_writable_file_target(out.path, (".safetensors",), inputs=[p for p in inputs if p is not None],
                               overwrite=out.overwrite, ours=lambda path: artifact_kind(path) == kind)


def make_topology(models: Models, run: RunDefaults, calibration: Calibration, out: Output) -> Topology:
    """WEST: calibrate the dense model along the sampler's loop; write the threshold map to `out`."""
    from saexport.topology.west import Aggregation, compute_topology

    check_artifact_target(out, "topology", [calibration.embeddings_file, models.source.checkpoint])
    source = models.source
    video = video_of(source, run, calibration.device)
    blocks = BlockedGrid(video.token_grid(source.preset.patch_size), run.block_size, parse_layout(run.layout))
    topology = compute_topology(calibration.calibrator(models, video, out.path), blocks, calibration.rows_per_block,
                                Aggregation(calibration.aggregation))
    if writes_outputs():
        topology.save(out.path)
    return topology


def make_budgets(models: Models, topology_path: Path, calibration: Calibration, goal: Goal, rule: BudgetRule,
                 out: Output) -> Budgets:
    """FAST: measure along the sampler's loop what each level of the map costs; allocate budgets for `goal` by
    `rule` and write them to `out`."""
    from saexport.topology.fast import compute_hellinger_quality, fit_budgets_v1
    from saexport.topology.fast_v2 import compute_budgets_v2

    check_artifact_target(out, "budgets", [topology_path, calibration.embeddings_file, models.source.checkpoint])
    for path in report_paths(out.path):  # the fidelity report beside the budgets: never a user's file
        check_writable_file_target(path, overwrite=out.overwrite, ours=lambda _: is_saexport_report(out.path))
    check_goal(goal, rule)
    source = models.source
    topology = Topology.load(topology_path)
    calibration_dtype = parse_dtype(generation_dtype(source.preset, calibration.device))
    topology.check_matches(model_identity(models.get(calibration_dtype)))
    video = video_of_grid(topology.grid, source.preset.patch_size, source.preset.codec)
    check_fits_in_memory(source.preset, video, calibration.device)
    calibrator = calibration.calibrator(models, video, out.path, held_out=goal.psnr is not None)
    if rule.rule == "v2":
        count = min(rule.sensitivity_prompts, len(calibrator.prompts.embeddings))
        budgets = compute_budgets_v2(calibrator, topology, goal, replace(rule, sensitivity_prompts=count))
    else:
        budgets = fit_budgets_v1(topology, compute_hellinger_quality(calibrator, topology, calibration.rows_per_block),
                                 goal)
    if writes_outputs():
        budgets.save(out.path)
    make_report(calibration.reporter(models, video, out.path), topology, budgets, out.path)
    return budgets


def make_report(reporter, topology: Topology, budgets: Budgets, budgets_path: Path) -> FidelityReport:
    """The budgets' fidelity report (`topology.report`), written beside them with its picture (by rank 0 under
    torchrun, every rank measuring), and logged."""
    from saexport.topology.pictures import quality_png
    from saexport.topology.report import fidelity_report

    report = fidelity_report(reporter, topology, budgets, reporter.loaded.preset.codec.name == "pixels")
    if not writes_outputs():
        return report
    json_path, picture = report_paths(budgets_path)
    report.write(json_path)
    quality_png(report, picture)
    log.info("fidelity: %s", report.summary())
    return report


def report_paths(budgets_path: Path) -> tuple[Path, Path]:
    """Where the fidelity report of `budgets_path` goes: `fidelity.json` and `quality.png` beside a folder's
    `budgets.safetensors`, `<name>.fidelity.json` and `<name>.quality.png` beside any other budgets file."""
    folder = ArtifactFolder(budgets_path.parent)
    if budgets_path.name == folder.budgets.name:
        return folder.fidelity_report, folder.fidelity_picture
    stem = budgets_path.name.removesuffix(".safetensors")
    return budgets_path.with_name(f"{stem}.fidelity.json"), budgets_path.with_name(f"{stem}.quality.png")


def is_saexport_report(budgets_path: Path) -> bool:
    """Whether the report beside `budgets_path` is one saexport wrote (its picture goes with it)."""
    try:
        FidelityReport.read(report_paths(budgets_path)[0])
    except SaexportError:
        return False
    return True


def copy_fidelity_report(budgets_path: Path, out_dir: Path) -> None:
    """The report of the budgets an export freezes, beside them in the export folder (when it was made)."""
    source, picture = report_paths(budgets_path)
    target = ArtifactFolder(out_dir)
    if not source.is_file() or source.resolve() == target.fidelity_report.resolve():
        return
    FidelityReport.read(source).write(target.fidelity_report)
    if picture.is_file():
        with atomic_path(target.fidelity_picture) as tmp:
            shutil.copyfile(picture, tmp)


def check_goal(goal: Goal, rule: BudgetRule) -> None:
    """A quality goal is met by FAST v2's end-to-end search; v1 allocates for a density only."""
    if goal.psnr is not None and rule.rule == "v1":
        raise SaexportError(f"the quality target {goal.name} needs `rule` v2 (FAST v1 allocates for a density): "
                            "ask for a `density`, or use v2")


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
    return export_onnx(models.get(dtype), topology, budgets, video_of(models.source, run), out_dir, batch)


def make_standins(models: Models, run: RunDefaults, density: float) -> tuple[Topology, Budgets]:
    """A STAND-IN topology and budgets (not calibrated): the graph's shape, not the model's quality."""
    from saexport.topology.standin import standin_budgets, standin_topology

    loaded, preset = models.get(parse_dtype(run.dtype)), models.source.preset  # the export's precision: one load
    grid = video_of(models.source, run).token_grid(preset.patch_size)
    topology = standin_topology(model_identity(loaded), preset.num_layers, preset.num_heads,
                                BlockedGrid(grid, run.block_size, parse_layout(run.layout)))
    return topology, standin_budgets(topology, run.steps, density)


def make_engine(onnx_path: Path, plugin: Path, out_dir: Path, **options) -> Path:
    """The engine beside its graph: `out_dir` is an export or build folder (or a new one), locked while written."""
    from saexport.engines.tensorrt_build import build_engine

    folder = claim_output_folder(out_dir, read_owner(out_dir) or "engine", inputs=[plugin],
                                 adopt=lambda f: ArtifactFolder(f).holds_only_artifacts())
    with FolderLock(folder):
        return build_engine(onnx_path, plugin, folder, **options)


def make_triton(onnx_path: Path, out: Output, serving: Serving, engine_path: Path | None,
                weights: Path | None = None) -> Path:
    """`weights`: the checkpoint the graph was exported from (its text encoder, VAE and, for a bf16 graph without
    an engine, its DiT serve from there); None: the package's own checkpoint where the model ships one.
    `out.overwrite`: replace the old repository even where a file of it was edited by hand."""
    from saexport.triton.repository import write_triton_repository

    return write_triton_repository(onnx_path, out, serving.name, engine_path=engine_path, gpus=list(serving.gpus),
                                   weights=weights, dit=serving.dit)


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
class Serving:
    """How the Triton repository serves: its models' name prefix, the GPUs of their instance group, and the DiT's
    back end (None: the engine where one is given, else ONNX Runtime for an fp32 graph, torch for fp16/bf16)."""

    name: str = "wan"
    gpus: tuple[int, ...] = (0,)
    dit: str | None = None


@dataclass(frozen=True)
class BuildSettings:
    source: ModelSource
    run: RunDefaults
    calibration: Calibration = Calibration()
    goal: Goal = Goal.preset("high")
    budget_rule: BudgetRule = BudgetRule()
    plugin: Path | None = None
    serving: Serving = Serving()
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
            if not all(isinstance(entry["outputs"], dict) and isinstance(entry["key"], str)
                       for entry in stages.values()):
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
    refuses, naming the first. The other ranks of a torchrun launch compute the calibration stages with rank 0
    and touch nothing (the module's docstring)."""
    if not writes_outputs():
        return _run_stages(settings, ArtifactFolder(Path(out_dir)), lambda _: None)
    folder = ArtifactFolder(open_output_folder(Path(out_dir), "build"))
    with FolderLock(folder.root):
        return _run_stages(settings, folder, echo)


def _run_stages(settings: BuildSettings, folder: ArtifactFolder, echo: Callable[[str], None]) -> dict[str, str]:
    if (settings.run.dtype != "fp32" and settings.source.checkpoint is None
            and engine_unavailable(settings.plugin, settings.run.dtype)):
        raise SaexportError(f"a {settings.run.dtype} build without an engine serves its DiT from the checkpoint, and "
                            "random weights have none: give --plugin with TensorRT, or build with --dtype fp32")
    writes = writes_outputs()
    manifest = Manifest.load(folder.manifest) if writes else None
    check_goal(settings.goal, settings.budget_rule)
    check_replaceable_folder(folder.triton, "triton", overwrite=settings.overwrite)  # before hours of calibration
    source, run, calibration = settings.source, settings.run, settings.calibration
    preset = source.preset
    steps = calibration.steps_for(preset)
    video = video_of(source, run)
    grid = video.token_grid(preset.patch_size)
    models = Models(source)
    fates: dict[str, str] = {}

    def stage(name: str, key: str, outputs: list[Path], make: Callable[[], object], every_rank: bool = False) -> None:
        """`every_rank`: a calibration stage, which every rank of a launch runs when rank 0 finds it not current;
        the others run on rank 0 alone."""
        if not (writes or every_rank):
            return
        current = manifest.is_current(name, key) if writes else None
        if every_rank:
            current = from_rank_zero(current)
        if current:
            fates[name] = "current"
            echo(f"[build] {name}: up to date")
            return
        echo(f"[build] {name}: running")
        make()
        if writes:
            manifest.record(name, key, outputs)
        fates[name] = "ran"

    topology_key = stage_key("topology", preset.name, preset.config_hash(), source.fingerprint(), grid,
                             run.block_size, run.layout, steps, calibration.fingerprint(source))
    stage("topology", topology_key, [folder.topology],
          lambda: make_topology(models, run, calibration, Output(folder.topology)), every_rank=True)

    budgets_key = stage_key("budgets", topology_key, settings.goal.name, settings.budget_rule.key(),
                            *([calibration.check_prompts] if settings.goal.psnr is not None else []))
    stage("budgets", budgets_key, [folder.budgets, folder.fidelity_report, folder.fidelity_picture],
          lambda: make_budgets(models, folder.topology, calibration, settings.goal, settings.budget_rule,
                               Output(folder.budgets)), every_rank=True)

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

    serving = settings.serving
    triton_key = stage_key("triton", export_key, engine_key, serving.name, list(serving.gpus),
                           str(source.checkpoint))  # the repository references the checkpoint by its path
    stage("triton", triton_key, [folder.triton], lambda: make_triton(
        folder.onnx, Output(folder.triton, settings.overwrite), serving, engine_path, source.checkpoint))
    if writes and folder.fidelity_report.is_file():
        echo(f"[build] fidelity: {FidelityReport.read(folder.fidelity_report).summary()}")
    return fates

