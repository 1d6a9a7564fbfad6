"""The fidelity instrument (issue 12): what static block-sparse masks keep of the evaluation model's videos.

Model: `wan2.1-eval` (5 layers, 8 heads x 64, 64x64 pixels x 16 frames = 16,384 tokens, blocks of 64, n = 256,
tile3d:4x4x4, 20 UniPC steps, guidance 5), or `--model wan2.1-demo` for development.

Test set: `--captions` held-out captions (`scenes(count, TEST_CAPTION_SEED, held_out=True)`: never in training,
which draws from the other split, nor in calibration, asserted) x 2 seeds, all generated in ONE sampler call
per configuration (a batch of prompts, one seed each).

Calibration, once: WEST (`compute_topology`) and FAST's fidelity table (`compute_hellinger_quality`) on the built-in
calibration captions (`PromptSource(...).load()`: training captions drawn with CALIBRATION_SEED), one seed,
along the sampler's loop with guidance (both passes), as `saexport build` calibrates.

Rows, each at mean densities 20 / 30 / 45 % (density = mean fraction of kept block pairs over steps x layers x
heads, dense steps counted as 1.0), each without and with a dense warm-up (the first 20% of steps dense, the
other steps at (goal - 0.2) / 0.8, so the mean meets the goal; at 20% nothing is left and the row is n/a):
- "FAST v1": `saexport.topology.fast.fit_budgets_v1(topology, fidelity_table, goal)` (v1's rule); with the
  warm-up, the same rule fitted over the non-warm-up steps to their goal;
- "uniform WEST": every (step, layer, head) at the WEST level whose mask keeps the fraction closest to the goal;
- "local window": block pairs ranked by the space-time distance of their centres (token units);
- "radial": Radial Attention's static energy decay (Li et al. 2025, `gen_log_mask_shrinked`: the spatial window
  halves each time the frame distance doubles) on blocks: pairs ranked by d * 2^bit_length(t), d the spatial
  distance of the block centres (tokens), t their frame distance; the goal sets the window. Radial's attention
  sink (a whole first frame kept) and its temporal subsampling of far frames are left out (a sink alone would
  cost 25% of the blocks on this 4-block-deep grid);
- "oracle" (dynamic): at every step, layer, head and video, the diagonal plus the block pairs with the most TRUE
  dense attention mass of that very call (softmax of the call's own q, k, summed over `--oracle-rows` sampled
  query rows per block against all keys), as many as the goal allows: most attention mass at that density at
  every head, an upper bound in mass only among masks that keep the same density at every head and step (and
  most mass is not least output error). Every static row keeps the diagonal too (level 0);
- "oracle at v2 densities": the same per-call choice of blocks, at FAST v2's density of every (step, layer, head)
  entry: the best any mask could do with FAST v2's allocation (what WEST's static map costs FAST v2);
- "FAST v2": `saexport.topology.allocation.fit_budgets_v2` on the attention-output proxy and end-to-end sensitivity
  weights measured on the calibration captions (`fast_v2_budgets`), warm-up counted inside the goal. The weights
  are measured once, at 30% (the build measures them at each preset's density), on the first
  `--sensitivity-prompts` calibration captions (the build: all of them).

Measures (mean +- 95% Student-t interval over captions, each caption the mean of its seeds; bench/
fidelity_metrics.py): PSNR and SSIM of the sparse video against the dense one (same caption, seed, sampler and
precision); the teacher-forced one-step error (at every step the sparse model's guided noise prediction from the
DENSE trajectory's latents, ||sparse - dense|| / ||dense||, averaged over steps; on `--tf-videos` of the videos);
the caption check (colour, motion, shape per object; fidelity_metrics' docstring), for dense, for every row, and
on the rendered ground truth; the scale anchor (PSNR / SSIM between the two seeds' dense videos of a caption);
WEST's locality (attention mass its map keeps at 10/20/30/50% of the blocks, per head, on `--locality-videos`
held-out videos along the dense trajectory).

Precision: the main column runs as users run `saexport generate --dtype bf16`: the checkpoint loaded in bf16,
sparse attention through `saexport::block_sparse_attention` (the CUDA kernel library: build it first; head_dim
64 with blocks of 64 runs its portable path), against the same dense model in bf16 (SDPA). The fp32 column
(`--fp32-videos` videos; fp32 model, the op's exact reference attention) repeats the static rows it has time
for, lowest priority.

Staging: every result is cached in --work (calibration, one JSON per row); a run does what --budget-s allows in
priority order and a rerun continues, so the bench fits in device calls of limited length. Writes
OUT/fidelity.json (everything), OUT/fidelity.md (the tables), OUT/side_by_side.gif.

    python bench/fidelity.py --device cuda --work out/fidelity --out out/fidelity/report --budget-s 480
    python bench/fidelity.py --quick --model wan2.1-demo --work /tmp/fq --out /tmp/fq/report   # CPU smoke test
    python bench/fidelity.py --families none --locality-videos 2 --no-proxy-study ...  # dense only: caption
        # check, scale anchor and WEST's locality (WEST alone is calibrated; no kernel library needed)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fidelity_metrics as fm  # noqa: E402

from saexport import kernels  # noqa: E402
from saexport.artifacts import BlockedGrid, Topology  # noqa: E402
from saexport.demo import VIDEO_MODULES, video_module  # noqa: E402
from saexport.layout import TokenLayout, parse_layout  # noqa: E402
from saexport.levels import DENSE_LEVEL, density, levels_from_scores, num_blocks  # noqa: E402
from saexport.models.checkpoint import load_model  # noqa: E402
from saexport.models.dit import SparseWanDiT, WanDiT  # noqa: E402
from saexport.models.processors import (  # noqa: E402
    block_masses,
    check_self_attention_call,
    dense_attention,
    project_output,
    project_qkv,
)
from saexport.models.text_encoder import encode_prompts, negative_embeddings  # noqa: E402
from saexport.models.video_shape import parse_video_shape  # noqa: E402
from saexport.runtime.denoisers import TorchDenoiser  # noqa: E402
from saexport.runtime.sampler import SamplerSettings, sample  # noqa: E402
from saexport.runtime.schedule import flow_shift_for  # noqa: E402
from saexport.runtime.video import latents_to_frames  # noqa: E402
from saexport.topology import fast  # noqa: E402
from saexport.topology.allocation import fit_budgets_v2  # noqa: E402
from saexport.topology.calibration import CalibrationLoop, Calibrator, SampledRows  # noqa: E402
from saexport.topology.goals import Goal, Warmup  # noqa: E402
from saexport.topology.prompts import PromptSource, builtin_prompts  # noqa: E402
from saexport.topology.quality import PROXIES, compute_quality  # noqa: E402
from saexport.topology.sensitivity import cell_errors, sensitivity_errors, step_buckets, uniform_levels  # noqa: E402
from saexport.topology.west import compute_topology  # noqa: E402

TEST_CAPTION_SEED = 2_000_003  # held-out captions; calibration draws training captions with CALIBRATION_SEED
SEED_BASES = (50_000, 60_000)  # video i of seed j: SEED_BASES[j] + i
DENSITIES = (0.20, 0.30, 0.45)
WARMUP_FRACTION = 0.2
LOCALITY_DENSITIES = (0.1, 0.2, 0.3, 0.5)
LOCALITY_ROWS_SEED = 7  # bench/locality.py's: rows WEST never ranked with (it draws seed 0)
ORACLE_ROWS_SEED = 3
STATIC_FAMILIES = ("FAST v1", "uniform WEST", "local window", "radial")
ORACLES = ("oracle", "oracle at v2 densities")
FAMILIES = ("FAST v1", "FAST v2", "uniform WEST", *ORACLES, "local window", "radial")
SIDE_BY_SIDE = ("dense", "FAST v2", "uniform WEST", "oracle", "local window")  # the GIF's columns, at 30%
SIDE_CAPTIONS = 4


def log(start: float, text: str) -> None:
    print(f"[{time.perf_counter() - start:6.0f} s] {text}", flush=True)


# ------------------------------------------------------------------------------------------ masks and budgets


def block_centres(grid: tuple[int, int, int], layout: TokenLayout, block_size: int) -> torch.Tensor:
    """`[n, 3]` mean (frame, row, column) of each block's tokens under the layout."""
    frames, height, width = grid
    perm = layout.permutation(grid)
    coords = torch.stack(torch.meshgrid(torch.arange(frames), torch.arange(height), torch.arange(width),
                                        indexing="ij"), -1).reshape(-1, 3).float()[perm]
    n = num_blocks(len(perm), block_size)
    block = torch.arange(len(perm)) // block_size
    return torch.zeros(n, 3).index_add_(0, block, coords) / torch.bincount(block, minlength=n).unsqueeze(-1)


def static_levels(scores: torch.Tensor, layers: int, heads: int) -> torch.Tensor:
    """A map ranked from `scores` `[n, n]` (higher = kept first), the same for every layer and head, diagonal 0.
    Exact ties (equal distances) are broken by a fixed seeded jitter far below any distance step: equal scores
    would share one level, and a budget could then only keep whole tie groups, missing the density goal."""
    n = scores.shape[-1]
    jitter = torch.rand(n, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 1e-6
    levels = levels_from_scores((scores.double() + jitter).expand(layers, heads, n, n).clone())
    levels[..., torch.arange(n), torch.arange(n)] = 0
    return levels


def local_window_scores(centres: torch.Tensor) -> torch.Tensor:
    return -torch.cdist(centres, centres)


def radial_scores(centres: torch.Tensor) -> torch.Tensor:
    """Radial Attention's energy decay on blocks: the spatial window halves each time the frame distance doubles,
    so pairs rank by d * 2^bit_length(t) (t = 0: plain d); ties go to the nearer frame."""
    t = (centres[:, None, 0] - centres[None, :, 0]).abs().round().long()
    d = torch.cdist(centres[:, 1:], centres[:, 1:])
    group = torch.where(t > 0, torch.floor(torch.log2(t.clamp(min=1).double())).long() + 1, 0)
    return -(d.double() * 2.0**group + 1e-3 * t)


def uniform_budgets(levels: torch.Tensor, steps: int, target: float) -> torch.Tensor:
    """uint8 `[steps, layers, heads]`: per (layer, head) the level whose mask keeps the fraction closest to
    `target` (bench/locality.py's `masks_at_density` rule)."""
    flat = levels.flatten(-2).to(torch.int64).sort(-1).values
    count = max(1, round(target * flat.shape[-1]))
    return flat[..., count - 1].to(torch.uint8).expand(steps, -1, -1).contiguous()


def warm_split(steps: int, goal: float, warmup: bool) -> tuple[int, float] | None:
    """(dense steps, density of the others) whose mean is `goal`; None when the warm-up alone spends it."""
    if not warmup:
        return 0, goal
    warm = round(WARMUP_FRACTION * steps)
    rest = (goal * steps - warm) / (steps - warm)
    return (warm, rest) if rest > 0.5 / 256 else None


def with_warmup(budgets: torch.Tensor, warm: int) -> torch.Tensor:
    dense = torch.full((warm, *budgets.shape[1:]), DENSE_LEVEL, dtype=torch.uint8)
    return torch.cat([dense, budgets])


def fast_v1_budgets(topology: Topology, table: torch.Tensor, goal: float, warm: int) -> torch.Tensor:
    """FAST v1: `fit_budgets_v1` at the density goal, or (with a warm-up) its rule at the rest's goal."""
    return with_warmup(fast.fit_budgets_v1(topology, table[warm:], Goal.of_density(goal)).levels, warm)


def fast_v2_budgets(topology: Topology, quality: torch.Tensor, weights: torch.Tensor, goal: float,
                    warm: int) -> torch.Tensor:
    """FAST v2 (issue 13): per entry the level maximising w * Q - lambda * density at the goal, Q the attention-output
    proxy and w the end-to-end sensitivity, both measured on the calibration captions; dense warm-up steps are
    counted inside the goal by the allocation itself."""
    return fit_budgets_v2(topology, quality, Goal.of_density(goal), "output", weights, Warmup(warm)).levels


# ------------------------------------------------------------------------------- attention processors (hooks)


def pack_levels_device(levels: torch.Tensor) -> torch.Tensor:
    """uint8 `[..., n, n]` -> the op's packed int32 `[..., n, ceil(n/4)]` on the levels' device (little-endian
    bytes: level (u, v) is byte v % 4 of word v // 4, padding 255; the same words as `levels.pack_levels`)."""
    n = levels.shape[-1]
    pad = (-n) % 4
    if pad:
        levels = torch.nn.functional.pad(levels, (0, pad), value=DENSE_LEVEL)
    return levels.contiguous().view(torch.int32)


def oracle_block_mass(q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, rows_per_block: int, block_size: int,
                      chunk: int = 8) -> torch.Tensor:
    """True dense attention mass of each block pair, from `rows_per_block` sampled query rows of every block:
    fp32 `[batch, heads, n, n]` (each query block's row sums to rows_per_block)."""
    batch, seq_len, heads, dim = q.shape
    n = num_blocks(seq_len, block_size)
    qs = q[:, rows].transpose(1, 2)  # [B, H, R, D]
    kt = k.transpose(1, 2).transpose(-1, -2)  # [B, H, D, L]
    out = []
    for start in range(0, batch, chunk):
        s = torch.matmul(qs[start:start + chunk], kt[start:start + chunk]) * dim**-0.5  # [c, H, R, L]
        s = (s - s.amax(-1, keepdim=True)).exp_()
        if seq_len % block_size:
            s = torch.nn.functional.pad(s, (0, n * block_size - seq_len))
        blocks = s.unflatten(-1, (n, block_size)).sum(-1, dtype=torch.float32)  # [c, H, R, n]
        blocks = blocks / blocks.sum(-1, keepdim=True)
        out.append(blocks.unflatten(2, (n, rows_per_block)).sum(3))
    return torch.cat(out)


def oracle_keep(mass: torch.Tensor, densities: torch.Tensor) -> torch.Tensor:
    """Per head, the diagonal and the pairs of most mass, round(density * n^2) in all: bool `[B, H, n, n]` from
    the mass `[B, H, n, n]` and each head's density `[H]`."""
    n = mass.shape[-1]
    counts = (densities.to(mass.device).double() * n * n).round().clamp(n, n * n).long()  # [H]
    scores = mass.clone()
    scores.diagonal(dim1=-2, dim2=-1).fill_(float("inf"))
    order = scores.flatten(-2).argsort(-1, descending=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(n * n, device=mass.device).expand_as(order))
    return (rank < counts.view(1, -1, 1)).view(mass.shape)


class OracleProcessor:
    """Self-attention through `saexport::block_sparse_attention` with a mask made per call from the call's own
    q, k (the dynamic oracle): every video and head its own mask, the batch folded into the heads. `densities`
    `[steps, heads]`: the fraction of pairs each head keeps at each step of this layer."""

    def __init__(self, context, densities: torch.Tensor, rows: SampledRows, rows_per_block: int, block_size: int):
        self.context, self.densities, self.block_size = context, densities, block_size
        self.rows, self.rows_per_block = rows.rows, rows_per_block

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        check_self_attention_call(encoder_hidden_states, attention_mask, rotary_emb)
        q, k, v = project_qkv(attn, hidden_states, rotary_emb)
        batch, seq_len, heads, dim = q.shape
        n = num_blocks(seq_len, self.block_size)
        densities = self.densities[int(self.context.step_index.reshape(-1)[0])]
        if bool((densities >= 1.0).all()):
            levels = torch.zeros(batch * heads, n, n, dtype=torch.uint8, device=q.device)
        else:
            mass = oracle_block_mass(q, k, self.rows.to(q.device), self.rows_per_block, self.block_size)
            keep = oracle_keep(mass, densities).flatten(0, 1)  # [B*H, n, n]
            levels = torch.where(keep, 0, DENSE_LEVEL).to(torch.uint8)
        fold = [t.permute(1, 0, 2, 3).reshape(1, seq_len, batch * heads, dim) for t in (q, k, v)]
        budgets = torch.zeros(1, batch * heads, dtype=torch.int32, device=q.device)
        step = torch.zeros(1, dtype=torch.int32, device=q.device)
        out = torch.ops.saexport.block_sparse_attention(*fold, pack_levels_device(levels), budgets, step,
                                                         self.block_size, dim**-0.5)
        out = out.reshape(seq_len, batch, heads, dim).permute(1, 0, 2, 3)
        return project_output(attn, out, q)


class LocalityProbe:
    """Dense attention; for the first `videos` of the batch, the attention mass of sampled rows inside WEST's
    masks at LOCALITY_DENSITIES, accumulated per (density, layer, head)."""

    def __init__(self, layer: int, rows: SampledRows, row_keep: torch.Tensor, kept: torch.Tensor,
                 total: torch.Tensor, videos: int, block_size: int):
        self.layer, self.rows, self.row_keep, self.kept, self.total = layer, rows, row_keep, kept, total
        self.videos, self.block_size = videos, block_size

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        check_self_attention_call(encoder_hidden_states, attention_mask, rotary_emb)
        q, k, v = project_qkv(attn, hidden_states, rotary_emb)
        if self.videos > 0:
            masses = block_masses(q[:self.videos], k[:self.videos], self.rows.rows, self.block_size)
            masses = masses.double().sum(0)  # [H, R, n]
            self.kept[:, self.layer] += (masses * self.row_keep[:, self.layer]).sum((-2, -1))
            self.total[self.layer] += masses.sum((-2, -1))
        return project_output(attn, dense_attention(q, k, v), q)


class Recorder:
    """A Denoiser that records, for the videos `keep`, the latents, timestep and guided prediction of every step
    (the dense trajectory the teacher-forced error replays)."""

    def __init__(self, inner: TorchDenoiser, keep: torch.Tensor, guidance: float):
        self.inner, self.keep, self.guidance = inner, keep, guidance
        self.name, self.steps, self.device, self.dtype = inner.name, inner.steps, inner.device, inner.dtype
        self.records: list[dict] = []
        self._cond: torch.Tensor | None = None

    def predict(self, latents, timestep, text_embeddings, step_index):
        out = self.inner.predict(latents, timestep, text_embeddings, step_index)
        if self._cond is None:
            self.records.append({"latents": latents[self.keep].float().clone(), "timestep": timestep[self.keep],
                                 "step_index": step_index.clone()})
            self._cond = out[self.keep].float()
            if self.guidance == 1.0:
                self.records[-1]["guided"], self._cond = self._cond, None
        else:
            uncond = out[self.keep].float()
            self.records[-1]["guided"] = uncond + self.guidance * (self._cond - uncond)
            self._cond = None
        return out


# ------------------------------------------------------------------------------------------------- the bench


@dataclass(frozen=True)
class Row:
    family: str
    goal: float
    warmup: bool
    precision: str  # "bf16" (the kernel) or "fp32" (the reference)

    @property
    def key(self) -> str:
        return f"{self.family.replace(' ', '_')}-{self.goal:.2f}-{'warm' if self.warmup else 'cold'}-{self.precision}"

    @property
    def label(self) -> str:
        return self.family + (" + warm-up" if self.warmup else "")


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args, self.start = args, time.perf_counter()
        self.device = torch.device(args.device)
        self.dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
        self.loaded = load_model(args.model, args.weights, dtype=self.dtype)
        self._loaded32 = None
        preset, run = self.loaded.preset, self.loaded.preset.defaults
        self.preset, self.checkpoint = preset, self.loaded.path
        self.video = parse_video_shape(args.resolution or run.resolution, args.frames or run.frames, preset.codec)
        self.grid = self.video.token_grid(preset.patch_size)
        self.layout, self.block_size = parse_layout(run.layout), run.block_size
        self.steps = args.steps or run.steps
        self.shift, self.guidance = flow_shift_for(self.video.height), args.guidance
        self.n = num_blocks(math.prod(self.grid), self.block_size)
        module = video_module(args.model)

        # The test set: held-out captions (distinct), two seeds each; calibration's captions, disjoint.
        scenes, seen = [], set()
        for scene in module.scenes(4 * args.captions, TEST_CAPTION_SEED, held_out=True):
            if scene.caption() not in seen and len(scenes) < args.captions:
                scenes.append(scene)
                seen.add(scene.caption())
        captions = [s.caption() for s in scenes]
        calibration = builtin_prompts(preset, self.checkpoint, args.calib_prompts)
        assert all(module.is_held_out(c) for c in captions), "a test caption is not held out"
        assert not any(module.is_held_out(c) for c in calibration), "a calibration caption is held out"
        assert not set(captions) & set(calibration), "calibration saw a test caption"
        self.captions, self.calibration_captions = captions, calibration
        self.scenes = scenes + scenes  # video v: caption v % C, seed v // C
        self.clusters = list(range(len(captions))) * 2
        self.seeds = [SEED_BASES[j] + i for j in range(2) for i in range(len(captions))]
        self.truths = [fm.truth_of(s) for s in self.scenes]
        self.text = encode_prompts(self.checkpoint, captions, max_length=preset.text_len).repeat(2, 1, 1)
        self.negative = negative_embeddings(self.checkpoint, preset.text_len, preset.config["text_dim"])
        videos = len(self.seeds)
        self.tf_index = torch.linspace(0, videos - 1, min(args.tf_videos, videos)).round().long().unique()
        self.side_index = torch.arange(min(SIDE_CAPTIONS, len(captions)))  # seed 0 of the first captions
        self.fp32_index = torch.tensor([i + j * len(captions) for j in range(2)
                                        for i in range(min(args.fp32_videos // 2, len(captions)))], dtype=torch.long)
        self.work = args.work
        (self.work / "results").mkdir(parents=True, exist_ok=True)
        self._check_work()
        self.timings: dict[str, float] = {}

    # -------------------------------------------------------------------------------------------- bookkeeping

    def settings(self) -> dict:
        a = self.args
        return {"model": a.model, "weights_id": self.loaded.weights_id, "dtype": a.dtype, "steps": self.steps,
                "grid": list(self.grid), "block_size": self.block_size, "layout": self.layout.to_metadata(),
                "guidance": self.guidance, "flow_shift": self.shift, "captions": self.captions,
                "seeds": self.seeds, "calibration_captions": self.calibration_captions,
                "calib_dtype": a.calib_dtype, "rows_per_block": a.rows_per_block,
                "sensitivity_prompts": a.sensitivity_prompts, "oracle_rows": a.oracle_rows,
                "tf_videos": self.tf_index.tolist(), "fp32_videos": self.fp32_index.tolist()}

    def _check_work(self) -> None:
        meta = self.work / "settings.json"
        fingerprint = hashlib.sha256(json.dumps(self.settings(), sort_keys=True).encode()).hexdigest()
        if meta.is_file():
            old = json.loads(meta.read_text())
            if old["fingerprint"] != fingerprint:
                raise SystemExit(f"{self.work} holds results of other settings: give another --work or delete it")
        else:
            meta.write_text(json.dumps({"fingerprint": fingerprint, "settings": self.settings()}, indent=1))

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def say(self, text: str) -> None:
        log(self.start, text)

    def result_path(self, row: Row) -> Path:
        return self.work / "results" / f"{row.key}.json"

    def loaded32(self):
        if self._loaded32 is None:
            self._loaded32 = load_model(self.args.model, self.args.weights, dtype=torch.float32)
        return self._loaded32

    # ---------------------------------------------------------------------------------------------- calibration

    def calibrator(self) -> Calibrator:
        """The model in --calib-dtype, the calibration captions and loop, on the device (a progress bar with
        --verbose): made on first use."""
        if not hasattr(self, "_calibrator"):
            dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[self.args.calib_dtype]
            loaded = self.loaded if dtype == self.dtype else load_model(self.args.model, self.args.weights,
                                                                         dtype=dtype)
            prompts = PromptSource(self.preset, self.args.calib_prompts, None, self.checkpoint).load()
            loop = CalibrationLoop((0,), self.steps, self.shift, self.guidance)
            self._calibrator = Calibrator(loaded, prompts, loop, self.device,
                                          progress=_tqdm if self.args.verbose else _quiet)
        return self._calibrator

    def sensitivity_calibrator(self) -> Calibrator:
        """The calibrator on the first --sensitivity-prompts captions, all of them in one batch."""
        calibrator = self.calibrator()
        count = min(self.args.sensitivity_prompts, len(calibrator.prompts.embeddings))
        return replace(calibrator.first_prompts(count), batch_size=count)

    def calibrate(self) -> None:
        """WEST, FAST's fidelity table and FAST v2's proxy and sensitivity weights, each cached in --work as soon
        as it is measured (a device call that ends mid-calibration keeps what it finished)."""
        timing_path = self.work / "calibration_timing.json"
        self.timings = json.loads(timing_path.read_text()) if timing_path.is_file() else {}

        def stage(name: str, compute: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
            path = self.work / f"calibration_{name}.safetensors"
            if path.is_file():
                return {k: v.double() for k, v in load_file(str(path)).items()}
            self.calibrator()  # made (the model loaded, the captions encoded) before the clock starts
            t0 = time.perf_counter()
            tensors = compute()
            save_file({k: v.float().contiguous() for k, v in tensors.items()}, str(path))
            self.timings[f"{name}_s"] = round(time.perf_counter() - t0, 1)
            timing_path.write_text(json.dumps(self.timings))
            self.say(f"calibration, {name}: {self.timings[f'{name}_s']:.0f} s")
            # What a rerun reads back (float32): both runs fit the same tables.
            return {k: v.float().double() for k, v in tensors.items()}

        west_path = self.work / "west.safetensors"
        if not west_path.is_file():
            calibrator = self.calibrator()
            t0 = time.perf_counter()
            compute_topology(calibrator, BlockedGrid(self.grid, self.block_size, self.layout),
                             self.args.rows_per_block).save(west_path)
            self.timings["west_s"] = round(time.perf_counter() - t0, 1)
            timing_path.write_text(json.dumps(self.timings))
            self.say(f"calibration, WEST: {len(self.calibration_captions)} captions x 1 seed, "
                     f"{self.timings['west_s']:.0f} s")
        self.west = Topology.load(west_path)
        self.table = self.quality = self.sensitivity = None
        if "FAST v1" in self.args.families:
            self.table = stage("fast_table", lambda: {"fidelity": fast.compute_hellinger_quality(
                self.calibrator(), self.west, self.args.rows_per_block)})["fidelity"]
        if "FAST v2" in self.args.families:
            # FAST v2's measurements, once: the output-error proxy along the loop (16 rows a head) and the
            # end-to-end sensitivity of step buckets and layers at 30% (the middle preset).
            self.quality = stage("fast_v2_quality", lambda: {"quality": compute_quality(
                self.calibrator(), self.west, proxies=("output",))["output"]})["quality"]

            def sensitivity() -> dict[str, torch.Tensor]:
                # 11 whole generations: on the first --sensitivity-prompts captions (one batch): device time
                errors = sensitivity_errors(self.sensitivity_calibrator(), self.west, density=0.30)
                (self.work / "fast_v2_sensitivity.json").write_text(json.dumps(errors.to_metadata()))
                return {"weights": errors.weights()}

            self.sensitivity = stage("fast_v2_sensitivity", sensitivity)["weights"]
        self.loaded.transformer.to(self.device)
        layers, heads = self.west.levels.shape[:2]
        centres = block_centres(self.grid, self.layout, self.block_size)
        self.maps = {"uniform WEST": self.west.levels, "FAST v1": self.west.levels, "FAST v2": self.west.levels,
                     "local window": static_levels(local_window_scores(centres), layers, heads),
                     "radial": static_levels(radial_scores(centres), layers, heads)}

    def proxy_study(self) -> dict:
        """Which proxy predicts the final video error (issue 13). Every (step bucket, layer) cell made sparse alone
        (uniform WEST at 30%, every other entry dense; the sensitivity captions) gives a final latent error; each
        proxy predicts the cell's loss as 1 - Q at the cell's levels, averaged over its steps and heads (measured
        on the same captions); so does the sensitivity weights' product a[k] * b[l]. Spearman over the cells.
        Cached in --work."""
        path = self.work / "proxy_study.json"
        if path.is_file():
            return json.loads(path.read_text())
        t0 = time.perf_counter()
        subset = replace(self.sensitivity_calibrator(), progress=_quiet)
        quality = compute_quality(subset, self.west, proxies=PROXIES)
        cells = cell_errors(subset, self.west, density=0.30)
        reference = uniform_levels(self.west, 0.30).long()  # [L, H]
        buckets = step_buckets(self.steps, cells.shape[0])
        predictions = {}
        for proxy, q in quality.items():
            loss = 1 - q.gather(-1, reference.expand(self.steps, -1, -1).unsqueeze(-1)).squeeze(-1)  # [S, L, H]
            predictions[proxy] = torch.stack([loss[a:b].mean((0, 2)) for a, b in buckets])  # [buckets, L]
        sensitivity = json.loads((self.work / "fast_v2_sensitivity.json").read_text())
        predictions["sensitivity product a[k] b[l]"] = (torch.tensor(sensitivity["bucket_errors"])[:, None]
                                                        * torch.tensor(sensitivity["layer_errors"])[None, :])
        result = {"cells": cells.tolist(), "buckets": [list(b) for b in buckets], "density": 0.30,
                  "captions": len(subset.prompts.embeddings),
                  "spearman": {name: round(fm.spearman(p.flatten(), cells.flatten()), 4)
                               for name, p in predictions.items()},
                  "predictions": {name: p.tolist() for name, p in predictions.items()},
                  "seconds": round(time.perf_counter() - t0, 1)}
        path.write_text(json.dumps(result))
        self.say("proxy study, Spearman over (step bucket, layer) cells: "
                 + ", ".join(f"{k} {v:+.2f}" for k, v in result["spearman"].items())
                 + f" ({result['seconds']:.0f} s)")
        return result

    def budgets(self, row: Row) -> torch.Tensor | None:
        """uint8 `[steps, layers, heads]` of a static row; None where it does not exist (n/a)."""
        split = warm_split(self.steps, row.goal, row.warmup)
        if split is None:
            return None
        warm, rest = split
        if row.family == "FAST v1":
            return fast_v1_budgets(self.west, self.table, row.goal if warm == 0 else rest, warm)
        if row.family == "FAST v2":
            return fast_v2_budgets(self.west, self.quality, self.sensitivity, row.goal, warm)
        return with_warmup(uniform_budgets(self.maps[row.family], self.steps - warm, rest), warm)

    def oracle_densities(self, row: Row) -> torch.Tensor | None:
        """float64 `[steps, layers, heads]`: the fraction of pairs the oracle keeps per entry (dense steps 1.0):
        the row's density at every head ("oracle"), or FAST v2's density of each entry ("oracle at v2
        densities": the best any mask could do with FAST v2's allocation); None where the row cannot exist."""
        layers, heads = self.west.levels.shape[:2]
        if row.family == "oracle at v2 densities":
            budgets = self.budgets(Row("FAST v2", row.goal, row.warmup, row.precision))
            return None if budgets is None else density(self.west.levels, budgets)
        split = warm_split(self.steps, row.goal, row.warmup)
        if split is None:
            return None
        warm, rest = split
        goals = torch.tensor([1.0] * warm + [rest] * (self.steps - warm), dtype=torch.float64)
        return goals.view(-1, 1, 1).expand(-1, layers, heads).contiguous()

    # ------------------------------------------------------------------------------------------------ running

    def model_for(self, row: Row | None, loaded) -> WanDiT | None:
        transformer = loaded.transformer.to(self.device)
        if row is None:
            return WanDiT(transformer, self.grid, self.layout).to(self.device)
        if row.family in ORACLES:
            densities = self.oracle_densities(row)
            if densities is None:
                return None
            model = WanDiT(transformer, self.grid, self.layout).to(self.device)
            rows = SampledRows.draw(math.prod(self.grid), self.block_size, self.args.oracle_rows, ORACLE_ROWS_SEED)
            for layer, block in enumerate(transformer.blocks):
                block.attn1.set_processor(OracleProcessor(model.context, densities[:, layer], rows,
                                                          self.args.oracle_rows, self.block_size))
            return model
        budgets = self.budgets(row)
        if budgets is None:
            return None
        return SparseWanDiT(transformer, self.grid, self.layout, self.maps[row.family], budgets,
                            self.block_size).to(self.device)

    def generate(self, model: WanDiT, index: torch.Tensor, denoiser=None) -> torch.Tensor:
        """Pixels in [0, 1] `[videos, 3, frames, H, W]` (on the device) of the test videos `index`, one call."""
        denoiser = denoiser or TorchDenoiser(model, self.steps)
        settings = SamplerSettings(self.video.latent_shape(), self.steps, self.shift, self.guidance)
        latents = sample(denoiser, settings, self.text[index], self.negative, [self.seeds[i] for i in index],
                         progress=_quiet)
        return ((latents.clamp(-1, 1) + 1) / 2).to(self.device)

    @torch.no_grad()
    def teacher_forced(self, model: WanDiT) -> torch.Tensor:
        """Per video of `tf_index`: the mean over steps of ||sparse guided - dense guided|| / ||dense guided||."""
        denoiser = TorchDenoiser(model, self.steps)
        text = self.text[self.tf_index]
        negative = self.negative.expand_as(text)
        errors = []
        for record in self.trajectory:
            cond = denoiser.predict(record["latents"], record["timestep"], text, record["step_index"]).float()
            if self.guidance != 1.0:
                uncond = denoiser.predict(record["latents"], record["timestep"], negative,
                                          record["step_index"]).float()
                cond = uncond + self.guidance * (cond - uncond)
            ref = record["guided"]
            errors.append(((cond - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1)).cpu())
        return torch.stack(errors).mean(0)

    def dense(self) -> None:
        """The dense bf16 run of every test video: the reference videos, the trajectory of the teacher-forced
        videos, WEST's locality on the first --locality-videos, the scale anchor and the caption check."""
        t0 = time.perf_counter()
        model = self.model_for(None, self.loaded)
        layers, heads = self.west.levels.shape[:2]
        seq_len = math.prod(self.grid)
        rows = SampledRows.draw(seq_len, self.block_size, self.args.locality_rows, LOCALITY_ROWS_SEED)
        keep = torch.stack([self.west.levels.int() <= uniform_budgets(self.west.levels, 1, d)[0, ..., None, None]
                            for d in LOCALITY_DENSITIES])  # [D, L, H, n, n]
        self.locality_blocks_kept = keep.float().mean((1, 2, 3, 4)).tolist()
        row_keep = keep[:, :, :, rows.block].to(self.device)  # [D, L, H, R, n]
        kept = torch.zeros(len(LOCALITY_DENSITIES), layers, heads, dtype=torch.float64, device=self.device)
        total = torch.zeros(layers, heads, dtype=torch.float64, device=self.device)
        cached = self.work / "locality.pt"  # measured once: a rerun's dense run skips the probes
        videos = 0 if cached.is_file() else min(self.args.locality_videos, len(self.seeds))
        for layer, block in enumerate(model.transformer.blocks):
            block.attn1.set_processor(LocalityProbe(layer, rows, row_keep, kept, total, videos, self.block_size))
        everything = torch.arange(len(self.seeds))
        recorder = Recorder(TorchDenoiser(model, self.steps), self.tf_index.to(self.device), self.guidance)
        self.dense_videos = self.generate(model, everything, recorder)
        self.trajectory = recorder.records
        if videos:
            torch.save({"locality": (kept / total).cpu(), "videos": videos}, cached)
        self.locality = torch.load(cached)["locality"]  # [D, L, H]
        seconds = time.perf_counter() - t0
        self.dense_caption = fm.caption_scores(self.dense_videos, self.truths)
        c = len(self.captions)
        anchor_psnr = fm.psnr(self.dense_videos[:c], self.dense_videos[c:])
        anchor_ssim = fm.ssim(self.dense_videos[:c], self.dense_videos[c:])
        self.dense_record = {"seconds": round(seconds, 1), "anchor": {
            "psnr": fm.t_interval(anchor_psnr).to_json(), "ssim": fm.t_interval(anchor_ssim).to_json(),
            "psnr_per_caption": anchor_psnr.tolist(), "ssim_per_caption": anchor_ssim.tolist()},
            "caption": {k: fm.nanmean_interval(v, self.clusters).to_json() for k, v in self.dense_caption.items()},
            "caption_per_video": {k: v.tolist() for k, v in self.dense_caption.items()}}
        side = self._uint8(self.dense_videos[self.side_index])
        previous = self.work / "dense_side.pt"
        if previous.is_file():  # a rerun's dense videos against the first run's: is the reference the same?
            old = torch.load(previous)
            self.dense_record["max_abs_diff_vs_earlier_run_uint8"] = int((old.int() - side.int()).abs().max())
        else:
            torch.save(side, previous)
        self.dense_record["device"] = torch.cuda.get_device_name() if self.device.type == "cuda" else "CPU"
        self.dense_record["torch"] = torch.__version__
        self.dense_record["locality_blocks_kept"] = self.locality_blocks_kept
        (self.work / "dense_record.json").write_text(json.dumps(self.dense_record))
        self.say(f"dense: {len(self.seeds)} videos in {seconds:.0f} s; anchor (other seed) PSNR "
                 f"{_fmt(self.dense_record['anchor']['psnr'])} dB; caption check "
                 f"{_fmt(self.dense_record['caption']['all'], 100)} %")

    def ground_truth(self) -> dict:
        """The detector on the rendered videos of the test captions and seeds, and against shuffled captions."""
        cached = self.work / "ground_truth.json"
        if cached.is_file():
            return json.loads(cached.read_text())
        module = video_module(self.args.model)
        frames, height, width = self.video.frames, self.video.height, self.video.width
        truth_videos = torch.cat([(module.render([s], frames, height, width, seed, device=self.device) + 1) / 2
                                  for s, seed in zip(self.scenes, self.seeds, strict=True)])
        right = fm.caption_scores(truth_videos, self.truths)
        shift = len(self.captions) // 2 or 1
        wrong = [self.truths[(i + shift) % len(self.truths)] for i in range(len(self.truths))]
        shuffled = fm.caption_scores(truth_videos, wrong)
        result = {"rendered": {k: fm.nanmean_interval(v, self.clusters).to_json() for k, v in right.items()},
                  "rendered_shuffled_captions": {k: fm.nanmean_interval(v, self.clusters).to_json()
                                                 for k, v in shuffled.items()}}
        cached.write_text(json.dumps(result))
        return result

    def run_row(self, row: Row) -> dict | None:
        t0 = time.perf_counter()
        loaded = self.loaded if row.precision == "bf16" else self.loaded32()
        unavailable = (self.oracle_densities(row) if row.family in ORACLES else self.budgets(row)) is None
        if unavailable:
            record = {"row": row.__dict__, "available": False,
                      "reason": "the dense warm-up alone spends the density goal"}
            self.result_path(row).write_text(json.dumps(record))
            return record
        # The reference first: every model here shares the checkpoint's transformer and installs its processors.
        if row.precision == "bf16":
            index, reference = torch.arange(len(self.seeds)), self.dense_videos
        else:
            index, reference = self.fp32_index, self.dense32()
        t0 = time.perf_counter()
        model = self.model_for(row, loaded)
        videos = self.generate(model, index)
        seconds_generate = time.perf_counter() - t0
        clusters = [self.clusters[i] for i in index]
        psnr, ssim = fm.psnr(videos, reference), fm.ssim(videos, reference)
        caption = fm.caption_scores(videos, [self.truths[i] for i in index])
        record = {"row": row.__dict__, "available": True, "videos": index.tolist(),
                  "psnr": fm.clustered_interval(psnr, clusters).to_json(),
                  "ssim": fm.clustered_interval(ssim, clusters).to_json(),
                  "caption": {k: fm.nanmean_interval(v, clusters).to_json() for k, v in caption.items()},
                  "psnr_per_video": psnr.tolist(), "ssim_per_video": ssim.tolist(),
                  "caption_per_video": {k: v.tolist() for k, v in caption.items()}}
        if row.family in ORACLES:
            record["density"] = float(self.oracle_densities(row).mean())
        else:
            budgets = self.budgets(row)
            record["density"] = float(density(self.maps[row.family], budgets).mean())
            record["budget_levels_mean"] = float(budgets.float().mean())
        if row.precision == "bf16":
            if len(self.tf_index):  # --tf-videos 0: no teacher-forced error (the kernel takes no empty batch)
                tf = self.teacher_forced(model)
                record["teacher_forced"] = fm.clustered_interval(
                    tf, [self.clusters[i] for i in self.tf_index]).to_json()
                record["teacher_forced_per_video"] = tf.tolist()
            if row.family in SIDE_BY_SIDE and row.goal == 0.30 and not row.warmup:
                torch.save(self._uint8(videos[self.side_index]), self.work / "results" / f"{row.key}.side.pt")
        record["seconds"] = round(time.perf_counter() - t0, 1)
        record["seconds_generate"] = round(seconds_generate, 1)
        self.result_path(row).write_text(json.dumps(record))
        precision = self.args.dtype if row.precision == "bf16" else "fp32"
        self.say(f"{row.label} {row.goal:.0%} ({precision}): density {record['density']:.3f}, PSNR "
                 f"{_fmt(record['psnr'])} dB, SSIM {_fmt(record['ssim'], digits=3)}, "
                 + (f"teacher-forced err {_fmt(record['teacher_forced'], digits=3)}, "
                    if "teacher_forced" in record else "")
                 + f"caption {_fmt(record['caption']['all'], 100)} % ({record['seconds']:.0f} s)")
        return record

    def dense32(self) -> torch.Tensor:
        path = self.work / "dense32.pt"
        if not hasattr(self, "_dense32"):
            t0 = time.perf_counter()
            model = self.model_for(None, self.loaded32())
            self._dense32 = self.generate(model, self.fp32_index)
            bf16 = self.dense_videos[self.fp32_index]
            clusters = [self.clusters[i] for i in self.fp32_index]
            floor = {"psnr": fm.clustered_interval(fm.psnr(bf16, self._dense32), clusters).to_json(),
                     "ssim": fm.clustered_interval(fm.ssim(bf16, self._dense32), clusters).to_json(),
                     "caption_fp32": {k: fm.nanmean_interval(v, clusters).to_json() for k, v in
                                      fm.caption_scores(self._dense32, [self.truths[i] for i in self.fp32_index]
                                                        ).items()},
                     "seconds": round(time.perf_counter() - t0, 1)}
            path.with_suffix(".json").write_text(json.dumps(floor))
            self.say(f"dense fp32 ({len(self.fp32_index)} videos, {floor['seconds']:.0f} s): bf16 dense vs fp32 "
                     f"dense PSNR {_fmt(floor['psnr'])} dB")
        return self._dense32

    @staticmethod
    def _uint8(videos: torch.Tensor) -> torch.Tensor:
        return (videos.clamp(0, 1) * 255).round().to(torch.uint8).cpu()

    # ------------------------------------------------------------------------------------------------ the plan

    def plan(self) -> list[Row]:
        """Every row, in the order they run (what a short device call must not miss comes first): no warm-up at
        30, 45, 20%; the warm-up rows that cannot exist (n/a, free); warm-up for the methods at 30%, then the fp32
        column's FAST v1 and uniform WEST at 30%; warm-up for the methods at 45%; warm-up for the baselines; the
        rest of the fp32 column."""
        families = [f for f in FAMILIES if f in self.args.families]
        goals = [g for g in (0.30, 0.45, 0.20) if g in self.args.densities]
        methods = [f for f in families if f in ("FAST v1", "FAST v2", "uniform WEST", *ORACLES)]
        baselines = [f for f in families if f not in methods]
        rows = [Row(f, g, False, "bf16") for g in goals for f in families]
        rows += [Row(f, g, True, "bf16") for g in goals for f in families if warm_split(self.steps, g, True) is None]
        warm_goals = [g for g in goals if warm_split(self.steps, g, True) is not None]
        fp32 = [Row(f, g, False, "fp32") for g in goals for f in ("FAST v1", "uniform WEST", "oracle", "local window",
                                                                   "radial", "FAST v2") if f in families]
        fp32 = fp32 if self.args.fp32_videos > 0 else []
        rows += [Row(f, g, True, "bf16") for g in warm_goals[:1] for f in methods]
        rows += fp32[:2]
        rows += [Row(f, g, True, "bf16") for g in warm_goals[1:] for f in methods]
        rows += [Row(f, g, True, "bf16") for g in warm_goals for f in baselines]
        return rows + fp32[2:]

    def estimate(self, row: Row) -> float:
        """Seconds a row will take, from the rows done so far (same precision; the oracle costs more); nothing for a
        warm-up row the warm-up alone spends (it only records "n/a")."""
        if warm_split(self.steps, row.goal, row.warmup) is None:
            return 0.0
        done = [json.loads(p.read_text()) for p in (self.work / "results").glob("*.json")]
        same = [d["seconds"] for d in done if d.get("available") and d["row"]["precision"] == row.precision
                and d.get("seconds") and d["row"]["family"] == row.family]
        if same:
            return max(same)
        similar = [d["seconds"] for d in done if d.get("available") and d["row"]["precision"] == row.precision
                   and d.get("seconds")]
        guess = max(similar) if similar else (self.timings.get("dense_s", 60.0) * (3.0 if row.precision == "fp32"
                                                                                    else 1.0))
        return guess * (2.5 if row.family in ORACLES else 1.0)


# ---------------------------------------------------------------------------------------------------- report


def _quiet(iterable=None, **_):
    return iterable


def _tqdm(iterable=None, **kwargs):
    from tqdm import tqdm

    return tqdm(iterable, **kwargs)


def _fmt(interval: dict | None, scale: float = 1.0, digits: int = 2) -> str:
    if not interval or interval.get("mean") is None:
        return "—"
    mean = interval["mean"] * scale
    half = interval.get("ci95")
    if digits == 2 and scale == 100:
        digits = 1
    return f"{mean:.{digits}f}" + (f" ± {half * scale:.{digits}f}" if half is not None else "")


def paired(a: dict, b: dict, metric: str, clusters_of: Callable[[list[int]], list[int]]) -> dict | None:
    """Row a minus row b on their common videos, as a clustered t-interval."""
    if not (a and b and a.get("available") and b.get("available")):
        return None
    va, vb = dict(zip(a["videos"], a[f"{metric}_per_video"], strict=True)), dict(
        zip(b["videos"], b[f"{metric}_per_video"], strict=True))
    common = sorted(set(va) & set(vb))
    diff = torch.tensor([va[i] - vb[i] for i in common])
    return fm.clustered_interval(diff, clusters_of(common)).to_json()


def report(bench: Bench, ground_truth: dict, out: Path, not_run: list[Row]) -> None:
    results = {p.stem: json.loads(p.read_text()) for p in sorted((bench.work / "results").glob("*.json"))}
    rows = bench.plan()
    by_key = {r.key: results.get(r.key) for r in rows}
    args = bench.args
    gpu = bench.dense_record.get("device", "CPU")
    locality = {f"{d:.0%}": {"blocks_kept": round(bench.locality_blocks_kept[i], 4),
                             **_summary(bench.locality[i]),
                             "median_per_layer": [round(float(v), 4) for v in bench.locality[i].median(-1).values],
                             "per_head": bench.locality[i].tolist()}
                for i, d in enumerate(LOCALITY_DENSITIES)}
    dense32_path = bench.work / "dense32.json"
    record = {"model": args.model, "weights_id": bench.loaded.weights_id, "gpu": gpu,
              "torch": torch.__version__, "kernel_library": str(kernels.load_library()) if bench.device.type ==
              "cuda" else None, "date": time.strftime("%Y-%m-%d"), "settings": bench.settings(),
              "fast_v2_sensitivity": json.loads((bench.work / "fast_v2_sensitivity.json").read_text())
              if (bench.work / "fast_v2_sensitivity.json").is_file() else None,
              "calibration_timing": json.loads((bench.work / "calibration_timing.json").read_text())
              if (bench.work / "calibration_timing.json").is_file() else None,
              "ground_truth_caption_check": ground_truth, "dense": bench.dense_record,
              "dense_fp32_vs_bf16": json.loads(dense32_path.read_text()) if dense32_path.is_file() else None,
              "locality": locality, "rows": by_key, "not_run": [r.key for r in not_run],
              "proxy_study": json.loads((bench.work / "proxy_study.json").read_text())
              if (bench.work / "proxy_study.json").is_file() else None}

    def clusters_of(videos: list[int]) -> list[int]:
        return [bench.clusters[i] for i in videos]

    comparisons = {}
    for goal in DENSITIES:
        for warm in (False, True):
            def get(family: str, goal=goal, warm=warm) -> dict | None:
                return by_key.get(Row(family, goal, warm, "bf16").key)

            for a, b in (("FAST v1", "uniform WEST"), ("oracle", "FAST v1"), ("oracle", "uniform WEST"),
                         ("uniform WEST", "local window"), ("uniform WEST", "radial"), ("FAST v1", "local window"),
                         ("FAST v2", "uniform WEST"), ("FAST v2", "oracle"),
                         ("oracle at v2 densities", "FAST v2")):
                for metric in ("psnr", "ssim"):
                    value = paired(get(a), get(b), metric, clusters_of)
                    if value:
                        comparisons[f"{a} - {b}, {goal:.0%}{' + warm-up' if warm else ''}, {metric}"] = value
    record["paired_differences"] = comparisons
    out.mkdir(parents=True, exist_ok=True)
    (out / "fidelity.json").write_text(json.dumps(record, indent=1, default=str))

    families = [f for f in FAMILIES if any(by_key.get(Row(f, g, w, "bf16").key) for g in DENSITIES
                                           for w in (False, True))]
    labels = [(f, w) for f in families for w in (False, True)]

    def table(metric: str, title: str, scale: float = 1.0, digits: int = 2, precision: str = "bf16") -> list[str]:
        lines = [f"**{title}**", "", "| row | 20% | 30% | 45% |", "| --- | --- | --- | --- |"]
        for family, warm in labels:
            cells = []
            for goal in DENSITIES:
                r = by_key.get(Row(family, goal, warm, precision).key)
                if r is None:
                    cells.append("not run")
                elif not r.get("available"):
                    cells.append("failed" if str(r.get("reason", "")).startswith("failed") else "n/a")
                else:
                    value = r[metric]["all"] if metric == "caption" else r.get(metric)
                    cells.append(f"{value:.{digits}f}" if isinstance(value, float) else _fmt(value, scale, digits))
            if any(c not in ("not run",) for c in cells):
                lines.append(f"| {family}{' + warm-up' if warm else ''} | " + " | ".join(cells) + " |")
        return lines + [""]

    d = bench.dense_record
    gt = ground_truth["rendered"]
    lines = [f"`{args.model}` ({bench.loaded.weights_id[:12]}), {gpu}, PyTorch "
             f"{bench.dense_record.get('torch', torch.__version__)}, "
             f"{record['date']}. {len(bench.captions)} held-out captions x 2 seeds = {len(bench.seeds)} videos, "
             f"{bench.steps} steps, guidance {bench.guidance}, grid {tuple(bench.grid)}, blocks of "
             f"{bench.block_size} (n = {bench.n}), {bench.layout.name}. Calibration (WEST + FAST table): "
             f"{len(bench.calibration_captions)} training captions x 1 seed, {args.calib_dtype} (+ FAST v2's "
             f"proxy and sensitivity). Main column: {args.dtype} checkpoint, sparse attention through "
             f"{'the kernel library' if gpu != 'CPU' and args.dtype == 'bf16' else 'the op reference'}"
             f", dense reference = the same model in {args.dtype} (SDPA). Mean ± 95% t-interval over captions "
             f"(each caption the mean of its 2 seeds).", "",
             f"Scale anchor (dense, seed A vs seed B of the same caption): PSNR {_fmt(d['anchor']['psnr'])} dB, "
             f"SSIM {_fmt(d['anchor']['ssim'], digits=3)}. Caption check: dense {_fmt(d['caption']['all'], 100)} % "
             f"(colour {_fmt(d['caption']['colour'], 100)}, motion {_fmt(d['caption']['motion'], 100)}, shape "
             f"{_fmt(d['caption']['shape'], 100)}); the rendered ground truth {_fmt(gt['all'], 100)} % (colour "
             f"{_fmt(gt['colour'], 100)}, motion {_fmt(gt['motion'], 100)}, shape {_fmt(gt['shape'], 100)}); the "
             f"ground truth against shuffled captions "
             f"{_fmt(ground_truth['rendered_shuffled_captions']['all'], 100)} %.", ""]
    lines += table("psnr", "PSNR against dense (dB), bf16")
    lines += table("ssim", "SSIM against dense, bf16", digits=3)
    if len(bench.tf_index):
        lines += table("teacher_forced", f"Teacher-forced one-step relative error of the guided prediction "
                                         f"({len(bench.tf_index)} videos)", digits=3)
    lines += table("caption", "Caption check, all checks (%)", scale=100)
    lines += table("density", "Achieved mean density (steps x layers x heads, dense steps = 1)", digits=3)
    if any(r and r.get("available") for k, r in by_key.items() if k.endswith("fp32")):
        floor = record["dense_fp32_vs_bf16"]
        lines += [f"fp32 column: {len(bench.fp32_index)} videos, fp32 checkpoint, the op's exact reference "
                  f"attention, against the fp32 dense run. bf16 dense vs fp32 dense on these videos: PSNR "
                  f"{_fmt(floor['psnr']) if floor else '—'} dB.", ""]
        lines += table("psnr", "PSNR against dense (dB), fp32", precision="fp32")
    lines += ["**Paired differences (dB of PSNR, same videos)**", "", "| comparison | difference |", "| --- | --- |"]
    lines += [f"| {k.removesuffix(', psnr')} | {_fmt(v)} |" for k, v in comparisons.items() if k.endswith("psnr")]
    study = record["proxy_study"]
    if study:
        lines += ["", f"**Which proxy predicts the final error**: Spearman rank correlation over the "
                  f"{len(study['cells']) * len(study['cells'][0])} (step bucket, layer) cells between the final latent "
                  f"error with only that cell sparse (uniform WEST, {study['density']:.0%}, {study['captions']} "
                  f"calibration captions) and each predictor of it", "", "| predictor | Spearman |", "| --- | --- |"]
        lines += [f"| {name} | {value:+.2f} |" for name, value in study["spearman"].items()]
    lines += ["", f"**WEST locality**: attention mass WEST's map keeps, per head ({bench.locality.shape[1]} layers x "
              f"{bench.locality.shape[2]} heads), on {min(args.locality_videos, len(bench.seeds))} held-out videos "
              f"along the dense trajectory ({args.locality_rows} sampled query rows per block, both passes, "
              f"every step)", "", "| blocks kept | min | q25 | median | q75 | max |", "| --- | --- | --- | --- | "
              "--- | --- |"]
    for name, row in locality.items():
        lines.append(f"| {name} ({row['blocks_kept']:.3f}) | {row['min']:.3f} | {row['q25']:.3f} | "
                     f"{row['median']:.3f} | {row['q75']:.3f} | {row['max']:.3f} |")
    if not_run:
        lines += ["", "Not run (time budget): " + ", ".join(f"{r.label} {r.goal:.0%} {r.precision}"
                                                             for r in not_run)]
    (out / "fidelity.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    side_by_side(bench, out)


def _summary(values: torch.Tensor) -> dict[str, float]:
    q = torch.quantile(values.flatten().double(), torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64))
    return dict(zip(("min", "q25", "median", "q75", "max"), (round(float(v), 4) for v in q), strict=True))


def side_by_side(bench: Bench, out: Path, limit_bytes: int = 1_000_000) -> None:
    """dense | FAST v2 | uniform WEST | oracle | local window at 30%, the first captions (seed A) stacked, with a
    header naming the columns; the largest upscale (3, 2, 1) whose GIF stays under `limit_bytes`."""
    from PIL import Image, ImageDraw

    columns = {"dense": bench.work / "dense_side.pt"}
    for family in SIDE_BY_SIDE[1:]:
        columns[family] = bench.work / "results" / f"{Row(family, 0.30, False, 'bf16').key}.side.pt"
    columns = {k: torch.load(p) for k, p in columns.items() if p.is_file()}
    if len(columns) < 2:
        return
    videos = torch.cat([torch.cat(list(columns.values()), dim=-1)[i] for i in range(len(bench.side_index))], -2)
    frames = latents_to_frames(bench.preset.codec, videos.unsqueeze(0).float() / 255 * 2 - 1, None)
    for scale in (3, 2, 1):
        big = frames.repeat(scale, axis=1).repeat(scale, axis=2)
        width = big.shape[2]
        header = Image.new("RGB", (width, 14), "white")
        draw = ImageDraw.Draw(header)
        step = width // len(columns)
        for i, name in enumerate(columns):
            short = {"uniform WEST": "uniform", "local window": "local"}.get(name, name)
            draw.text((i * step + 2, 1), short + (" 30%" if name != "dense" else ""), fill="black")
        head = np.asarray(header)[None].repeat(big.shape[0], 0)
        images = [Image.fromarray(f) for f in np.concatenate([head, big], 1)]
        path = out / "side_by_side.gif"
        images[0].save(path, save_all=True, append_images=images[1:], duration=125, loop=0, optimize=True)
        if path.stat().st_size <= limit_bytes:
            break
    (out / "side_by_side.txt").write_text("columns: " + " | ".join(columns) + " (30% of the blocks)\nrows:\n"
                                          + "\n".join(bench.captions[i] for i in bench.side_index) + "\n")


# ------------------------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="wan2.1-eval", choices=sorted(VIDEO_MODULES))
    parser.add_argument("--weights", type=Path, help="Checkpoint folder (default: the model's shipped weights).")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"), help="The main column's precision.")
    parser.add_argument("--calib-dtype", default="bf16", choices=("bf16", "fp32"))
    parser.add_argument("--captions", type=int, default=32, help="Held-out captions (x 2 seeds).")
    parser.add_argument("--calib-prompts", type=int, default=16)
    parser.add_argument("--sensitivity-prompts", type=int, default=8,
                        help="Calibration captions of FAST v2's sensitivity (11 whole generations of each).")
    parser.add_argument("--rows-per-block", type=int, default=16, help="WEST/FAST probes (the build's default).")
    parser.add_argument("--oracle-rows", type=int, default=8, help="Sampled query rows per block of the oracle.")
    parser.add_argument("--locality-rows", type=int, default=8)
    parser.add_argument("--locality-videos", type=int, default=16)
    parser.add_argument("--tf-videos", type=int, default=8, help="Videos of the teacher-forced error.")
    parser.add_argument("--fp32-videos", type=int, default=8, help="Videos of the fp32 column (0: none).")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--resolution")
    parser.add_argument("--frames", type=int)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--densities", default="0.2,0.3,0.45")
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--budget-s", type=float, default=1e9, help="Stop starting rows after this many seconds.")
    parser.add_argument("--work", type=Path, default=Path("out/fidelity"), help="Cache of intermediate results.")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="Smoke test: half-size video, 2 captions, 3 steps.")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--report-only", action="store_true", help="Write the report from --work; run nothing.")
    parser.add_argument("--no-proxy-study", dest="proxy_study", action="store_false",
                        help="Skip the study of which proxy predicts the final error (1 + 5 x layers generations).")
    args = parser.parse_args()
    args.densities = tuple(float(d) for d in args.densities.split(","))
    args.families = tuple(f.strip() for f in args.families.split(","))
    if args.quick:  # half the model's width and height, 2 captions, 3 steps
        from saexport.models.presets import get_preset

        width, height = (int(v) for v in get_preset(args.model).defaults.resolution.split("x"))
        args.resolution = args.resolution or f"{width // 2}x{height // 2}"
        args.captions, args.calib_prompts, args.steps = 2, 2, args.steps or 3
        args.rows_per_block, args.oracle_rows, args.locality_rows = 4, 4, 4
        args.locality_videos, args.tf_videos, args.fp32_videos = 2, 2, min(args.fp32_videos, 2)
    sparse_bf16 = args.dtype == "bf16" and any(f in FAMILIES for f in args.families)
    if args.device.startswith("cuda") and sparse_bf16 and kernels.load_library() is None:
        raise SystemExit("the kernel library is not built (cmake -S . -B build -DCMAKE_CUDA_ARCHITECTURES=90a -G Ninja "
                         "&& cmake --build build): sparse bf16 attention would run the slow reference")

    bench = Bench(args)
    bench.say(f"{args.model} on {args.device} ({args.dtype}): {len(bench.captions)} captions x 2 seeds, "
              f"{bench.steps} steps, grid {bench.grid}, n = {bench.n}")
    if args.report_only:  # the tables from --work alone (no model runs): what a device call left behind
        bench.dense_record = json.loads((bench.work / "dense_record.json").read_text())
        bench.locality_blocks_kept = bench.dense_record["locality_blocks_kept"]
        bench.locality = torch.load(bench.work / "locality.pt")["locality"]
        not_run = [r for r in bench.plan() if not bench.result_path(r).is_file()]
        report(bench, bench.ground_truth(), args.out, not_run)
        return
    with torch.no_grad():
        bench.calibrate()
        bench.dense()
        bench.timings["dense_s"] = bench.dense_record["seconds"]
        ground_truth = bench.ground_truth()
        bench.say(f"caption check on the rendered ground truth: {_fmt(ground_truth['rendered']['all'], 100)} %, "
                  f"against shuffled captions {_fmt(ground_truth['rendered_shuffled_captions']['all'], 100)} %")
        not_run = []
        plan = bench.plan()
        for position, row in enumerate(plan):
            if (position == 0 or plan[position - 1].warmup is False) and (row.warmup or row.precision != "bf16"):
                # after the plain bf16 rows, before the warm-up and fp32 ones: the proxy study (~26 generations)
                if args.proxy_study and bench.elapsed() + bench.timings.get("proxy_study_s", 200) <= args.budget_s:
                    bench.proxy_study()
            if bench.result_path(row).is_file():
                continue
            estimate = bench.estimate(row)
            if bench.elapsed() + estimate > args.budget_s:
                not_run.append(row)
                continue
            try:
                bench.run_row(row)
            except Exception as error:  # noqa: BLE001 - one broken row must not cost the device call's other rows
                bench.say(f"{row.key} FAILED: {type(error).__name__}: {error}")
                bench.result_path(row).write_text(json.dumps({"row": row.__dict__, "available": False,
                                                              "reason": f"failed: {type(error).__name__}: {error}"}))
                if bench.device.type == "cuda":
                    torch.cuda.empty_cache()
        if not_run:
            bench.say(f"{len(not_run)} rows left for a rerun with the same --work: "
                      + ", ".join(r.key for r in not_run))
        report(bench, ground_truth, args.out, not_run)
    bench.say("done")


if __name__ == "__main__":
    main()
