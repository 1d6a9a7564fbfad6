"""Calibration runs: the dense model along the sampler's own loop, with every self-attention layer probed.

The loop is generation's (`runtime.sampler.sampling_loop`): Wan's UniPC schedule with classifier-free guidance,
two passes per step. A probe computes the layer's ordinary dense output (so the trajectory is the dense
model's) and, for a few sampled query rows per block (`SampledRows`), the row's full softmax over all keys summed
per key block: the *block masses* `[batch, heads, rows, n]`. Both WEST (which blocks matter) and FAST v1 (how much
of each row a budget keeps) are computed from block masses, so neither ever holds an L x L matrix. FAST v2's
output proxies sample a few rows per head instead (`HeadRows`) and also take each row's per-key-block partial
outputs (`models.processors.RowProbe`). Which passes are measured is a setting; the default measures both, as
generation runs both.

Each prompt x seed trajectory is measured into an accumulator of its own, and the trajectories' accumulators are
merged into the stage's in (prompt, seed) order (`Accumulator`). Under torchrun the trajectories are spread over
the ranks (`runtime.parallel.spread`) and every rank merges all of them in that same order: a trajectory's
measurement does not depend on which rank walked it nor on the others (one trajectory a sampler loop), so the
merged state, and the artifacts made from it, are byte-identical to one process's. Rank 0 alone keeps the progress
file and shows progress.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from saexport.artifacts import BlockedGrid
from saexport.atomic import atomic_path
from saexport.errors import SaexportError
from saexport.levels import num_blocks
from saexport.models.checkpoint import LoadedModel
from saexport.models.dit import WanDiT
from saexport.models.processors import BlockInputs, ProbedRowsSelfAttnProcessor
from saexport.runtime.denoisers import TorchDenoiser
from saexport.runtime.parallel.launch import writes_outputs
from saexport.runtime.parallel.spread import launched_ranks, spread
from saexport.runtime.sampler import DEFAULT_GUIDANCE, PASSES, SamplerSettings, no_progress, sampling_loop
from saexport.topology.prompts import CalibrationSet

log = logging.getLogger("saexport")
CHECK_SEED = 1000  # the held-out checks' seeds are the calibration's plus this: videos the calibration never walked
REPORT_SEED = 2000  # the fidelity report's seeds, likewise


@dataclass(frozen=True)
class SampledRows:
    """`rows_per_block` query rows drawn (seeded) from every query block."""

    rows: torch.Tensor  # int64 [R], token positions
    block: torch.Tensor  # int64 [R], their query block

    @classmethod
    def draw(cls, seq_len: int, block_size: int, rows_per_block: int, seed: int) -> SampledRows:
        gen = torch.Generator().manual_seed(seed)
        rows, blocks = [], []
        for u in range(num_blocks(seq_len, block_size)):
            size = min(block_size, seq_len - u * block_size)
            take = min(rows_per_block, size)
            rows.append(u * block_size + torch.randperm(size, generator=gen)[:take])
            blocks.append(torch.full((take,), u))
        return cls(torch.cat(rows), torch.cat(blocks))

    def install(self, model: WanDiT, block_size: int, callback: Callable) -> Callable[[], None]:
        """Probe every self-attention layer: `callback(layer, block masses [batch, heads, R, n])`."""
        model.probe(self.rows, block_size, callback)
        return lambda: None


@dataclass(frozen=True)
class HeadRows:
    """`rows_per_head` query rows drawn (seeded) from the whole sequence, independently for every head."""

    rows: torch.Tensor  # int64 [heads, R], token positions (in the layout's order)
    block: torch.Tensor  # int64 [heads, R], their query block
    residual: bool = False  # also hand the probe the residual stream at the rows and the block's gate

    @classmethod
    def draw(cls, seq_len: int, heads: int, block_size: int, rows_per_head: int, seed: int,
             residual: bool = False) -> HeadRows:
        if rows_per_head < 1:
            raise SaexportError(f"rows per head must be at least 1, got {rows_per_head}")
        gen = torch.Generator().manual_seed(seed)
        take = min(rows_per_head, seq_len)
        rows = torch.stack([torch.randperm(seq_len, generator=gen)[:take].sort().values for _ in range(heads)])
        return cls(rows, torch.div(rows, block_size, rounding_mode="floor"), residual)

    def install(self, model: WanDiT, block_size: int, callback: Callable) -> Callable[[], None]:
        """Probe every self-attention layer: `callback(layer, RowProbe)`; returns what removes the hooks."""
        handles = []
        for layer, block in enumerate(model.transformer.blocks):
            inputs = None
            if self.residual:
                inputs = BlockInputs()
                handles.append(block.register_forward_pre_hook(inputs))
            block.attn1.set_processor(ProbedRowsSelfAttnProcessor(layer, self.rows, block_size, callback, inputs))

        def remove() -> None:
            for handle in handles:
                handle.remove()

        return remove


@dataclass(frozen=True)
class CalibrationLoop:
    """The sampler loop calibration walks: as generation runs it, unless told otherwise."""

    seeds: tuple[int, ...]
    steps: int
    flow_shift: float
    guidance: float = DEFAULT_GUIDANCE
    passes: tuple[str, ...] = PASSES  # which passes the probes measure

    def __post_init__(self):
        unknown = set(self.passes) - set(PASSES)
        if not self.passes or unknown:
            raise SaexportError(f"calibration passes must be among {', '.join(PASSES)}, got {self.passes}")
        if self.steps < 1:
            raise SaexportError(f"`steps` must be at least 1, got {self.steps}")

    def sampler(self, latent_shape: tuple[int, int, int, int]) -> SamplerSettings:
        """The sampler settings of this loop for latents of `latent_shape`."""
        return SamplerSettings(latent_shape, self.steps, self.flow_shift, self.guidance)

    def settings(self) -> dict:
        """What the artifacts record of the loop."""
        return {"seeds": list(self.seeds), "steps": self.steps, "flow_shift": self.flow_shift,
                "guidance": self.guidance, "passes": list(self.passes)}


@dataclass(frozen=True)
class Run:
    """One pass of the loop: the probes' measurements during it belong to this prompt, seed, step and pass."""

    prompt: int
    seed: int
    step: int
    pass_name: str


class Accumulator(Protocol):
    """What a calibration stage accumulates from the probes: a fresh one measures each trajectory (`empty`), and
    the trajectories' `state()`s are merged into the stage's in (prompt, seed) order."""

    def empty(self) -> Accumulator: ...

    def state(self) -> dict[str, torch.Tensor]:
        """The live tensors (what a checkpoint saves and restores in place)."""
        ...

    def merge(self, trajectory: dict[str, torch.Tensor]) -> None:
        """Fold one finished trajectory's state in (its tensors may be on the CPU)."""
        ...


class Sums:
    """Named tensors summed over trajectories: the accumulator of a measurement that only adds (a bench's share
    of attention mass, say). `sums["name"]` is the live tensor a probe callback adds into."""

    def __init__(self, **tensors: torch.Tensor):
        self.tensors = tensors

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def empty(self) -> Sums:
        return Sums(**{name: torch.zeros_like(t) for name, t in self.tensors.items()})

    def state(self) -> dict[str, torch.Tensor]:
        return self.tensors

    def merge(self, trajectory: dict[str, torch.Tensor]) -> None:
        for name, t in self.tensors.items():
            t += trajectory[name].to(t.device)


class CalibrationCheckpoint:
    """Resumes an interrupted calibration: the accumulated state and the finished trajectories, saved
    atomically after each trajectory to `path` (a safetensors file), valid only for the same settings `key`.

    `state` tensors are the consumer's live accumulators; a matching checkpoint is copied into them. Every rank of a
    launch reads it; rank 0 alone writes and removes it.
    """

    def __init__(self, path: Path | None, key: str, state: dict[str, torch.Tensor]):
        self.path, self.key, self.state = path, key, state
        self.done: set[tuple[int, int]] = set()
        if path is None or not path.is_file():
            return
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("key") != key:
                    return  # another calibration's leftovers: start over (and overwrite them)
                for name, tensor in state.items():
                    tensor.copy_(f.get_tensor(name))
            self.done = {tuple(pair) for pair in json.loads(meta["done"])}
        except (SafetensorError, OSError, KeyError, json.JSONDecodeError):
            self.done = set()  # unreadable: start over

    def finish(self, trajectory: tuple[int, int]) -> None:
        self.done.add(trajectory)
        if self.path is not None and writes_outputs():
            with atomic_path(self.path) as tmp:
                save_file({k: v.contiguous().cpu() for k, v in self.state.items()}, str(tmp),
                          metadata={"key": self.key, "done": json.dumps(sorted(self.done))})

    def remove(self) -> None:
        if self.path is not None and writes_outputs():
            self.path.unlink(missing_ok=True)


def calibration_key(*parts) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.contiguous().cpu().numpy().tobytes() if isinstance(part, torch.Tensor)
                      else json.dumps(part, sort_keys=True, default=str).encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class Calibrator:
    """What every calibration stage shares (ModelOpt's calibrator: the settings on one object, each stage a function
    of it and of what it measures): the model as loaded, the prompts, the sampler loop walked, where it runs, how
    many prompt x seed samples go through the DiT at once, how progress is shown, and the file where an interrupted
    stage keeps what it has measured (each stage adds its suffix: `progress_path`)."""

    loaded: LoadedModel
    prompts: CalibrationSet
    loop: CalibrationLoop
    device: str | torch.device = "cpu"
    batch_size: int = 1
    progress: Callable = tqdm
    progress_file: Path | None = None
    held_out: CalibrationSet | None = None  # prompts no stage measures from: the end-to-end quality checks'

    def progress_path(self, suffix: str = "") -> Path | None:
        """Where the stage named by `suffix` keeps its progress (None: not kept)."""
        if self.progress_file is None:
            return None
        return self.progress_file.with_name(self.progress_file.name + suffix)

    def checker(self) -> Calibrator:
        """The same calibrator on the held-out prompts, with seeds the calibration loop does not walk: what an
        end-to-end quality check generates from."""
        if self.held_out is None:
            raise SaexportError("a quality target needs held-out calibration prompts to check it on")
        seeds = tuple(CHECK_SEED + seed for seed in self.loop.seeds)
        return replace(self, prompts=self.held_out, loop=replace(self.loop, seeds=seeds), held_out=None)

    def first_prompts(self, count: int) -> Calibrator:
        """The same calibrator on the first `count` prompts."""
        total = self.prompts.embeddings.shape[0]
        if not 1 <= count <= total:
            raise SaexportError(f"`sensitivity_prompts` must be within 1..{total} (the calibration prompts), "
                                f"got {count}")
        subset = CalibrationSet(self.prompts.embeddings[:count], self.prompts.negative,
                                f"{self.prompts.source}, first {count}")
        return replace(self, prompts=subset)

    def with_steps(self, steps: int) -> Calibrator:
        """The same calibrator on a sampler loop of `steps` steps."""
        return replace(self, loop=replace(self.loop, steps=steps))

    def bar(self, items, **kwargs):
        """`self.progress` over `items` on rank 0 (or the only process); the other ranks of a launch show nothing."""
        return self.progress(items, **kwargs) if writes_outputs() else items

    def measure(self, blocks: BlockedGrid, rows: SampledRows | HeadRows, accumulator: Accumulator,
                on_data: Callable[[Accumulator, Run, int, Any], None], desc: str,
                checkpoint: CalibrationCheckpoint | None = None) -> None:
        """Walk the dense sampler loop of every prompt x seed, probed, with a progress bar over the runs (passes).

        The probes of the measured passes call `on_data(trajectory's accumulator, run, layer, masses)` for
        `SampledRows` and `on_data(trajectory's accumulator, run, layer, RowProbe)` for `HeadRows`, `run` naming the
        prompt, seed, step and pass they saw; each trajectory's accumulator is then merged into `accumulator` in
        (prompt, seed) order, whichever rank walked it (the module's docstring). With a checkpoint (of
        `accumulator.state()`), finished trajectories are skipped and each one merged is recorded."""
        prompts, loop = self.prompts, self.loop
        if prompts.embeddings.shape[0] == 0 or not loop.seeds:
            raise SaexportError("the calibration set is empty: give at least one prompt and one seed")
        done = frozenset(checkpoint.done) if checkpoint else frozenset()
        pending = [(prompt, seed) for prompt in range(prompts.embeddings.shape[0]) for seed in loop.seeds
                   if (prompt, seed) not in done]
        if done:
            log.info("resuming: %d of %d calibration runs done", len(done), len(done) + len(pending))
        current: Run | None = None
        measuring: Accumulator | None = None

        def measured(layer: int, data) -> None:
            if current is not None and current.pass_name in loop.passes:
                on_data(measuring, current, layer, data)

        model = WanDiT(self.loaded.transformer, blocks.grid, blocks.layout)
        remove_probe = rows.install(model, blocks.block_size, measured)
        model = model.to(self.device).eval()
        denoiser = TorchDenoiser(model, loop.steps)
        sampler = loop.sampler(model.latent_shape())
        passes_per_step = len(PASSES) if loop.guidance != 1.0 else 1
        rank, ranks = launched_ranks()
        bar = self.bar(range(len(pending[rank::ranks]) * loop.steps * passes_per_step), desc=desc, unit="pass")
        passes = iter(bar)

        def walk(trajectory: tuple[int, int]) -> dict[str, torch.Tensor]:
            nonlocal current, measuring
            prompt, seed = trajectory
            measuring = accumulator.empty()
            events = sampling_loop(denoiser, sampler, prompts.embeddings[prompt:prompt + 1], prompts.negative,
                                   seed, progress=no_progress)
            for step, pass_name in events:  # each event comes before its forward pass, which runs on the next
                next(passes, None)
                current = Run(prompt, seed, step, pass_name)
            current = None  # the loop has ended: its last forward pass has run
            return {name: tensor.cpu() for name, tensor in measuring.state().items()}

        try:
            for trajectory, state in spread(pending, walk):
                accumulator.merge(state)
                if checkpoint:
                    checkpoint.finish(trajectory)
            next(passes, None)  # closes the bar
        finally:  # the transformer is shared: leave no hook on it
            remove_probe()
