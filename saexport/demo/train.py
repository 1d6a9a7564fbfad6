"""Train the project's own Wan2.1-architecture DiTs on procedural captioned videos in pixels: `wan2.1-demo`
(videos.py, 32x32x16), `wan2.1-eval` (objects.py, 64x64x16, the fidelity benchmark's model) and its candidate
successor `wan2.1-eval2` (the same videos at 128x128x16 in tokens of 4x4 pixels: the same token grid). The DiT
is diffusers' `WanTransformer3DModel` with the preset's config; the text encoder is a word-embedding table.

    python -m saexport.demo.train --model wan2.1-demo --out DIR --device cuda --minutes 7   # or --steps N
    python -m saexport.demo.train --model wan2.1-eval --out DIR --resume-dir out/eval_train --minutes 24 \\
        --call-minutes 9 --compile                                                  # rerun to continue
    python -m saexport.demo.train --model wan2.1-eval --out DIR --warm-start saexport/demo/eval_weights \\
        --resume-dir out/eval_more --extend-to 18000 --call-minutes 9 --compile     # train the shipped model on

Objective: the one Wan's sampler assumes (diffusers' flow-matching UniPC): x_t = (1 - s) x0 + s noise, timestep
1000 s, target noise - x0; s is drawn through the sampler's flow shift, so training sees the noise levels
sampling visits. One caption in ten is dropped (zero embeddings, the empty prompt) so that classifier-free
guidance works. bf16 autocast on a GPU (fp32 on the CPU); attention through PyTorch's SDPA (diffusers' default).

Progressive resolution (wan2.1-eval): most steps at low_height x low_width, then the rest at the full size, as
real video DiTs train low-resolution first. A quarter of the tokens makes attention ~16x cheaper per video, and
Wan's 3D RoPE lets the same weights run on the larger grid.

The plan: with --minutes the step counts are fixed after 50 timed steps (the full-size step time measured on a
few throwaway steps) so that the stages share the time as `low_time_fraction` says; they are recorded, and
--steps (with --low-steps) repeats the run. The learning rate warms up, then decays (cosine) to the last step.

Resuming: with --resume-dir, the whole training state (model, EMA, optimizer, step = data position, noise
generator, curves, plan) is written there atomically every `checkpoint_every` steps and when the call ends;
a rerun continues from it. --call-minutes ends a call (state saved, weights written) so that training spans
several calls of a time-limited machine. Batch i is rendered from seed (seed, i): the data stream resumes
exactly. --warm-start DIR continues from a checkpoint folder this script wrote (EMA weights, step and curves;
a fresh optimizer) where the resume state is lost. --extend-to STEP trains a resumed or warm-started run past its
plan, to global step STEP, at the plan's final learning rate (the held-out plateau still ends it, unless
--past-plateau): training longer without changing what the first steps did. A warm start's fresh optimizer warms
its learning rate up again. Fine-tuning: --phrase-context gives the text encoder phrase context (word_encoder.py;
the videos module's PHRASE_STARTS) and --extend-lr the extension's learning rate:

    python -m saexport.demo.train --model wan2.1-eval --out DIR --warm-start saexport/demo/eval_weights \\
        --resume-dir out/eval_phrase --phrase-context --extend-lr 1e-4 --extend-to 12000 --call-minutes 9 --compile

--edge-weight W adds W times an edge term to the training loss (flow_loss: the error of the clean-video
estimate's spatial gradients), weighing an object's outline more without moving the loss's minimiser; the
training loss curve includes the term.

Held-out loss: every `eval_every` steps, the EMA model's flow-matching loss (no edge term, so that runs with and
without one compare) on fixed held-out captions (never trained on), fixed render seeds, fixed noise and fixed noise
levels spread over the training distribution, at the full size (and at the low size when there is one). Stop
criterion (the plateau): in the full-size stage, the best of the last `plateau_evals` evaluations improved on the
best before them by less than `plateau_tolerance`; training also stops at the planned last step.

Writes DIR as a diffusers-layout checkpoint: `transformer/` (EMA weights, fp16, sharded when over
SHARD_BYTES), `text_encoder/`, `tokenizer/`, and `training.json` (every setting, the plan, the steps and
seconds run, the training loss curve, the held-out loss curve, the status, each call).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import save_file
from tqdm import tqdm

from saexport.atomic import atomic_path, write_text_atomic
from saexport.demo import VIDEO_MODULES
from saexport.models.checkpoint import INDEX_NAME, WEIGHTS_NAME
from saexport.models.presets import get_preset
from saexport.models.word_encoder import WordEncoder, WordTokenizer

MODEL = "wan2.1-demo"
UNPLANNED = 10_000_000  # a stage's length before the plan fixes it
HELD_OUT_SEED = 424_242  # held-out captions, render seeds and noise of the held-out loss
PROGRESS_SECONDS = 60.0  # slow steps (a CPU): a progress line at least this often, not only every 100 steps
SHARD_BYTES = 14 * 2**20  # files come back from the GPU machine at <= 16 MiB each
STATE_FILE = "state.pt"


@dataclass
class TrainSettings:
    seed: int = 0
    frames: int = 16
    height: int = 32
    width: int = 32
    batch: int = 32
    lr: float = 3e-4
    warmup: int = 250
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema: float = 0.999
    caption_dropout: float = 0.1
    flow_shift: float = 3.0  # the sampler's shift at these sizes (runtime.schedule.flow_shift_for)
    steps: int = 0  # steps at height x width; 0: fixed from --minutes after 50 timed steps
    extra_steps: int = 0  # full-size steps past the schedule's end (--extend-to), at its final learning rate
    extend_lr: float = 0.0  # the learning rate of those steps (--extend-lr); 0: lr * final_lr_fraction
    restart_step: int = 0  # where a warm start's fresh optimizer began: the learning rate warms up again there
    phrase_context: bool = False  # each word's text vector carries its phrase's (word_encoder.py)
    edge_weight: float = 0.0  # weight of the edge term of the training loss (flow_loss); 0: flow matching alone
    # Progressive resolution: low_steps steps at low_height x low_width (batch low_batch) first; 0: none.
    low_height: int = 0
    low_width: int = 0
    low_batch: int = 0
    low_steps: int = 0
    low_time_fraction: float = 0.0  # share of --minutes the plan gives the low-resolution stage
    eval_every: int = 250
    eval_videos: int = 48
    eval_batch: int = 8
    plateau_evals: int = 4
    plateau_tolerance: float = 0.01
    checkpoint_every: int = 1000


# Each model's settings; its videos are VIDEO_MODULES[model]'s.
RECIPES = {
    "wan2.1-demo": TrainSettings(),
    # The same 131,072 tokens a step at both sizes: 32 videos of 32x32 (4,096 tokens each), 8 of 64x64 (16,384).
    # A shorter EMA horizon (~500 steps) than the demo's: the final weights are mostly the full-size stage's.
    "wan2.1-eval": TrainSettings(height=64, width=64, batch=8, low_height=32, low_width=32, low_batch=32,
                                 low_time_fraction=0.6, ema=0.998),
}
# wan2.1-eval's held-out loss at 64x64 fell from 0.067 to 0.036 in its full-size stage alone (the low stage had
# left it flat): its successor spends most of its time on the grid it is measured on. Its 4x4-pixel tokens make
# the same token grids of twice the pixels: the same attention cost a step.
RECIPES["wan2.1-eval2"] = replace(RECIPES["wan2.1-eval"], height=128, width=128, low_height=64, low_width=64,
                                  low_time_fraction=0.3)


@dataclass(frozen=True)
class Stage:
    height: int
    width: int
    batch: int
    start: int  # first global step (= batch index) of the stage
    end: int  # one past its last


def stages_of(s: TrainSettings) -> list[Stage]:
    """The low-resolution stage (if any), then the full-size one, as global step ranges."""
    low = (s.low_steps or UNPLANNED) if s.low_height else 0
    full = Stage(s.height, s.width, s.batch, low, low + (s.steps + s.extra_steps if s.steps else UNPLANNED))
    return [Stage(s.low_height, s.low_width, s.low_batch, 0, low), full] if s.low_height else [full]


class VideoBatches(torch.utils.data.Dataset):
    """Item i is batch `stage.start + i`, rendered from seed (settings.seed, batch index): the data stream is the
    same with any worker count and resumes exactly at any step."""

    def __init__(self, videos: str, settings: TrainSettings, tokenizer: WordTokenizer, stage: Stage, start: int):
        self.videos, self.settings, self.tokenizer, self.stage, self.start = videos, settings, tokenizer, stage, start

    def __len__(self) -> int:
        return self.stage.end - self.start

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        module, stage = importlib.import_module(self.videos), self.stage
        seed = self.settings.seed * 10_000_000 + self.start + i
        batch = module.scenes(stage.batch, seed)
        videos = module.render(batch, self.settings.frames, stage.height, stage.width, seed)
        return videos, self.tokenizer([scene.caption() for scene in batch])


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)  # the workers render in parallel: threads inside each would only contend


class HeldOut:
    """Fixed held-out videos, noise and noise levels (evenly spread over the training distribution)."""

    def __init__(self, videos: str, tokenizer: WordTokenizer, s: TrainSettings, height: int, width: int):
        module = importlib.import_module(videos)
        scenes = module.scenes(s.eval_videos, HELD_OUT_SEED, held_out=True)
        self.x0 = module.render(scenes, s.frames, height, width, HELD_OUT_SEED)
        self.tokens = tokenizer([scene.caption() for scene in scenes])
        self.noise = torch.randn(self.x0.shape, generator=torch.Generator().manual_seed(HELD_OUT_SEED))
        u = (torch.arange(s.eval_videos) + 0.5) / s.eval_videos
        self.sigma = s.flow_shift * u / (1 + (s.flow_shift - 1) * u)


def flow_loss(model, encoder, x0, tokens, sigma, noise, edge_weight: float = 0.0) -> torch.Tensor:
    """Wan's flow-matching loss of noise prediction at noise levels `sigma` (per video): bf16 autocast on a GPU,
    fp32 on the CPU (a CPU without AVX512-BF16, like this project's CI, runs bf16 matmuls ~50x slower).

    With `edge_weight`, plus that times the edge term: the squared error of the error's differences between
    neighbouring pixels of a frame (x and y). The clean-video estimate's error is -sigma times the prediction's,
    so this is the error of the estimate's spatial gradients, weighted over noise levels as the main term is.
    Differences are linear, so the sum has the same minimiser (the conditional mean); it only makes an error at
    an object's outline cost more than the same error spread over its inside."""
    text = encoder(tokens)
    s = sigma.view(-1, 1, 1, 1, 1)
    noisy = (1 - s) * x0 + s * noise
    with torch.autocast(device_type=x0.device.type, dtype=torch.bfloat16, enabled=x0.device.type == "cuda"):
        pred = model(noisy, sigma * 1000, text, return_dict=False)[0]
    error = pred.float() - (noise - x0)
    loss = error.square().mean()
    if edge_weight:
        loss = loss + edge_weight * (error.diff(dim=-1).square().mean() + error.diff(dim=-2).square().mean())
    return loss


class Trainer:
    """Model, text encoder, their EMA copies, optimizer, noise generator and the record of the run."""

    def __init__(self, model_name: str, settings: TrainSettings, device: str):
        self.model_name, self.settings, self.device = model_name, settings, device
        self.preset = get_preset(model_name)
        self.videos = VIDEO_MODULES[model_name]
        torch.manual_seed(settings.seed)
        self.config = {k: (tuple(v) if k == "patch_size" else v) for k, v in self.preset.config.items()}
        self.model = WanTransformer3DModel(**self.config).to(device).train()
        captions = importlib.import_module(self.videos)
        vocabulary = list(captions.VOCABULARY)
        phrase_starts = tuple(captions.PHRASE_STARTS) if settings.phrase_context else ()
        self.encoder = WordEncoder(vocabulary, self.preset.config["text_dim"], self.preset.text_len,
                                   phrase_starts).to(device).train()
        self.params = list(self.model.parameters()) + list(self.encoder.parameters())
        self.optimizer = torch.optim.AdamW(self.params, lr=settings.lr, betas=(0.9, 0.99),
                                           weight_decay=settings.weight_decay, fused=device.startswith("cuda"))
        self.ema_model, self.ema_encoder = copy.deepcopy(self.model).eval(), copy.deepcopy(self.encoder).eval()
        self.ema_params = list(self.ema_model.parameters()) + list(self.ema_encoder.parameters())
        self.gen = torch.Generator(device=device).manual_seed(settings.seed + 1)
        self.step, self.seconds = 0, 0.0  # steps and training seconds over all calls (up to this call)
        self.call_start: float | None = None  # when this call's training began
        self.curve: list[tuple[int, float]] = []
        self.held_out: list[dict] = []
        self.calls: list[dict] = []
        self.plan: dict = {}
        self.compiled = False
        self._held_out_sets: dict[tuple[int, int], HeldOut] = {}

    # --- one step -------------------------------------------------------------------------------------------

    def train_step(self, videos: torch.Tensor, tokens: torch.Tensor, planned: int) -> torch.Tensor:
        s = self.settings
        x0 = videos.to(self.device, non_blocking=True)
        tokens = tokens.to(self.device, non_blocking=True)
        keep = torch.rand(tokens.shape[0], 1, device=self.device, generator=self.gen) >= s.caption_dropout
        u = torch.rand(x0.shape[0], device=self.device, generator=self.gen)
        sigma = s.flow_shift * u / (1 + (s.flow_shift - 1) * u)
        noise = torch.randn(x0.shape, device=self.device, generator=self.gen)
        loss = flow_loss(self.model, self.encoder, x0, tokens * keep, sigma, noise, s.edge_weight)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, s.grad_clip)
        for group in self.optimizer.param_groups:
            group["lr"] = s.lr * lr_factor(self.step + 1, s, planned)
        self.optimizer.step()
        decay = min(s.ema, (2 + self.step) / (11 + self.step))
        with torch.no_grad():
            torch._foreach_lerp_(self.ema_params, self.params, 1 - decay)
        self.step += 1
        return loss.detach()

    def guarded(self, fn, *args):
        """fn(*args); if the compiled blocks fail (a compiler problem), once more without them."""
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 - anything else fails again, eagerly, and is raised then
            if not self.compiled:
                raise
            print(f"compiled blocks failed ({type(e).__name__}: {e}); continuing eager", flush=True)
            self.uncompile_blocks()
            return fn(*args)

    def compile_blocks(self) -> None:
        """torch.compile each transformer block (the elementwise work between matmuls dominates eager time);
        the compiled code is cached on disk, so later calls on the same machine start fast."""
        # One code object, every block at two sizes: more entries than Dynamo's default limit of 8.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        for block in self.model.blocks:
            block.forward = torch.compile(block.forward, dynamic=False)
        self.compiled = True

    def uncompile_blocks(self) -> None:
        for block in self.model.blocks:
            block.__dict__.pop("forward", None)
        self.compiled = False

    def probe_step(self, stage: Stage, batch: int) -> Callable[[], None]:
        """A forward and backward at `stage`'s size on `batch` throwaway videos (no optimizer step; its own
        noise, so the run's random streams are untouched)."""
        module = importlib.import_module(self.videos)
        scenes = module.scenes(batch, HELD_OUT_SEED)
        x0 = module.render(scenes, self.settings.frames, stage.height, stage.width, 0).to(self.device)
        tokens = self.encoder.tokenizer([scene.caption() for scene in scenes]).to(self.device)
        sigma = torch.full((batch,), 0.5, device=self.device)
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(HELD_OUT_SEED)).to(self.device)

        def forward_backward() -> None:
            flow_loss(self.model, self.encoder, x0, tokens, sigma, noise).backward()
            self.optimizer.zero_grad(set_to_none=True)

        return forward_backward

    def check_cpu_memory(self, stages: list[Stage]) -> None:
        """On the CPU, refuse a run whose steps would not fit in memory: the kernel's OOM killer would end it
        without a word. Each stage's step is measured at half its batch (its peak growth, Linux's VmHWM reset
        first) and doubled, plus the optimizer's moments, against the memory available now; memory grows less
        than linearly with the batch (one video's growth times 32 overestimates 32 videos' by half), so one
        video is measured first only to tell whether the half batch itself could run."""
        if self.device != "cpu":
            return
        moments = 2 * sum(p.numel() * p.element_size() for p in self.params)  # AdamW's, made at the first step
        for stage in stages:
            try:
                available, one, half = available_memory(), self.peak_growth(stage, 1), stage.batch // 2
                if half > 1 and one * half <= available:  # the half batch can run: measure it
                    growth = self.peak_growth(stage, half) * stage.batch / half
                else:
                    growth = one * stage.batch  # an upper bound
            except OSError:  # not Linux: no measurement, no check
                return
            need = growth + moments
            if need > available:
                raise ValueError(
                    f"a training step of {self.model_name} at {stage.height}x{stage.width} x {stage.batch} videos "
                    f"needs about {need / 2**30:.1f} GiB on the CPU (measured on a smaller batch); "
                    f"{available / 2**30:.1f} GiB is available: train on a GPU, or with fewer videos "
                    "a step")

    def peak_growth(self, stage: Stage, batch: int) -> int:
        """Bytes the peak resident memory grows by in a probe step of `batch` videos (Linux /proc)."""
        before = _proc_kib("/proc/self/status", "VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := the RSS now
        self.probe_step(stage, batch)()
        return (_proc_kib("/proc/self/status", "VmHWM") - before) * 1024

    def seconds_per_step(self, stage: Stage, reps: int = 5) -> float:
        """Forward and backward at `stage`'s size on throwaway data, timed: the plan's full-size step time."""
        forward_backward = self.probe_step(stage, stage.batch)
        timed = 0.0
        for rep in range(reps + 2):  # two warm-up passes (compilation)
            _synchronize(self.device)
            start = time.perf_counter()
            self.guarded(forward_backward)
            _synchronize(self.device)
            timed += time.perf_counter() - start if rep >= 2 else 0.0
        return timed / reps

    def clock(self) -> float:
        """Training seconds over all calls, this one included."""
        return self.seconds + (time.perf_counter() - self.call_start if self.call_start is not None else 0.0)

    # --- held-out loss and the stop criterion ---------------------------------------------------------------

    def held_out_loss(self, height: int, width: int) -> float:
        if (height, width) not in self._held_out_sets:
            self._held_out_sets[height, width] = HeldOut(self.videos, self.encoder.tokenizer, self.settings, height,
                                                         width)
        data, total = self._held_out_sets[height, width], 0.0
        starts = range(0, len(data.sigma), self.settings.eval_batch)
        with torch.no_grad():  # a bar in a terminal only (disable=None): logs keep their step lines
            for i in tqdm(starts, desc=f"held-out loss {height}x{width}", leave=False, disable=None):
                part = slice(i, i + self.settings.eval_batch)
                loss = flow_loss(self.ema_model, self.ema_encoder, data.x0[part].to(self.device),
                                 data.tokens[part].to(self.device), data.sigma[part].to(self.device),
                                 data.noise[part].to(self.device))
                total += float(loss) * len(data.sigma[part])
        return total / len(data.sigma)

    def evaluate(self) -> None:
        s = self.settings
        entry = {"step": self.step, "seconds": round(self.clock(), 1), "loss": self.held_out_loss(s.height, s.width)}
        if s.low_height:
            entry["loss_low"] = self.held_out_loss(s.low_height, s.low_width)
        self.held_out.append(entry)
        print(f"step {self.step}: held-out loss {entry['loss']:.4f}"
              + (f" ({s.low_height}x{s.low_width}: {entry['loss_low']:.4f})" if s.low_height else ""), flush=True)

    def plateaued(self) -> bool:
        """The best of the last `plateau_evals` full-size-stage evaluations improved on the best before them by
        less than `plateau_tolerance` (relative)."""
        s, full = self.settings, stages_of(self.settings)[-1]
        losses = [e["loss"] for e in self.held_out if e["step"] > full.start]
        if len(losses) <= s.plateau_evals:
            return False
        before, recent = min(losses[:-s.plateau_evals]), min(losses[-s.plateau_evals:])
        return recent > (1 - s.plateau_tolerance) * before

    # --- saving and resuming --------------------------------------------------------------------------------

    def save_state(self, folder: Path) -> None:
        state = {"model_name": self.model_name, "settings": asdict(self.settings), "step": self.step,
                 "seconds": self.clock(), "curve": self.curve, "held_out": self.held_out, "calls": self.calls,
                 "plan": self.plan, "model": self.model.state_dict(), "encoder": self.encoder.state_dict(),
                 "ema_model": self.ema_model.state_dict(), "ema_encoder": self.ema_encoder.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "generator": self.gen.get_state()}
        with atomic_path(folder / STATE_FILE) as tmp:
            torch.save(state, tmp)

    def load_state(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.encoder.load_state_dict(state["encoder"])
        self.ema_model.load_state_dict(state["ema_model"])
        self.ema_encoder.load_state_dict(state["ema_encoder"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.gen.set_state(state["generator"])
        self._load_record(state)

    def warm_start(self, checkpoint: Path, record: dict) -> None:
        """Model and EMA from a checkpoint folder this script wrote (its EMA weights) and its record
        (training.json); the optimizer starts afresh (its learning rate warms up again), the noise generator from
        a seed of its own. The text encoder's phrase context is this run's (the tables are the checkpoint's)."""
        from saexport.models.checkpoint import load_model

        loaded = load_model(self.model_name, checkpoint)
        encoder = WordEncoder.load(checkpoint)
        for model, words in ((self.model, self.encoder), (self.ema_model, self.ema_encoder)):
            model.load_state_dict({k: v.float() for k, v in loaded.transformer.state_dict().items()})
            words.load_state_dict(encoder.state_dict())
        self._load_record({**record, "step": record["steps_run"], "curve": record["loss_curve"],
                           "held_out": record["held_out_loss"]})
        self.gen.manual_seed(self.settings.seed + 1 + self.step)
        self.settings.restart_step = self.step
        self.plan["warm_started_at"] = self.step

    def _load_record(self, state: dict) -> None:
        self.step, self.seconds = state["step"], state["seconds"]
        self.curve = [tuple(point) for point in state["curve"]]
        self.held_out, self.calls, self.plan = state["held_out"], state["calls"], state["plan"]

    def record(self, status: str) -> dict:
        return {"model": self.model_name, "settings": asdict(self.settings), "plan": self.plan,
                "steps_run": self.step, "seconds": round(self.clock(), 1), "status": status,
                "stop_criterion": f"held-out loss (full size, EMA) improved < {self.settings.plateau_tolerance:.0%} "
                                  f"over the last {self.settings.plateau_evals} evaluations "
                                  f"({self.settings.plateau_evals * self.settings.eval_every} steps), "
                                  "or the planned last step",
                "plateaued": self.plateaued(),
                "device": torch.cuda.get_device_name() if self.device.startswith("cuda") else "cpu",
                "torch": torch.__version__, "loss_curve": self.curve, "held_out_loss": self.held_out,
                "calls": self.calls}


def _proc_kib(path: str, field: str) -> int:
    """A `Field:  N kB` line of a /proc file, in KiB."""
    for line in Path(path).read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"{path} has no {field}")


def available_memory() -> int:
    """Bytes the system can give without swapping (Linux's MemAvailable)."""
    return _proc_kib("/proc/meminfo", "MemAvailable") * 1024


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def lr_factor(step: int, settings: TrainSettings, planned: int) -> float:
    """The learning rate over `settings.lr`: linear warm-up, then cosine decay to `final_lr_fraction` at the planned
    last step; an extension's `extra_steps` at `extend_lr` (default: the final rate). After a warm start (a fresh
    optimizer at `restart_step`), the same warm-up again, to the rate of the schedule there."""
    s = settings
    if step < s.warmup:
        return step / s.warmup
    ramp = min(1.0, (step - s.restart_step) / s.warmup) if s.restart_step else 1.0
    if planned >= UNPLANNED:
        return ramp  # the step count is not fixed yet (still timing)
    end = planned - s.extra_steps
    if step > end and s.extend_lr:
        return ramp * s.extend_lr / s.lr
    progress = min(1.0, (step - s.warmup) / max(1, end - s.warmup))
    return ramp * (s.final_lr_fraction + (1 - s.final_lr_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))


def fix_plan(trainer: Trainer, seconds_per_step: float, minutes: float) -> None:
    """Step counts that fill `minutes` of training: the low-resolution stage its share of the time, the full-size
    stage the rest (its step time measured on throwaway steps). 3% is left for evaluations and checkpoints."""
    s, margin = trainer.settings, 0.97
    left = minutes * 60 - trainer.clock()
    if not s.low_height:
        s.steps = trainer.step + int(margin * left / seconds_per_step)
        trainer.plan = {"seconds_per_step": round(seconds_per_step, 4)}
    else:
        full_per_step = trainer.seconds_per_step(stages_of(s)[-1])
        low_left = max(0.0, minutes * 60 * s.low_time_fraction - trainer.clock())  # the probe's time counted
        s.low_steps = trainer.step + int(margin * low_left / seconds_per_step)
        s.steps = int(margin * (minutes * 60 * (1 - s.low_time_fraction)) / full_per_step)
        trainer.plan = {"seconds_per_step_low": round(seconds_per_step, 4), "seconds_per_step": round(full_per_step, 4)}
    low = f"{s.low_steps} steps at {s.low_height}x{s.low_width}, then " if s.low_height else ""
    print(f"plan: {low}{s.steps} steps at {s.height}x{s.width} ({trainer.plan})", flush=True)


@dataclass(frozen=True)
class TrainingCall:
    """Where and how one call of a (resumable) training run goes: the weights' folder `out`, the device, a time
    budget for the whole run (`minutes`: the plan is fixed from the measured step time) and for this call
    (`call_minutes`, `call_steps`: it pauses, saving its state to `resume_dir`), data-loader workers, the model,
    `torch.compile` of the blocks, a checkpoint to start from (`warm_start`), the global step a resumed or
    warm-started run is extended to (`extend_to`), and whether a held-out plateau is recorded without ending the
    run (`past_plateau`: to measure what training changes once the loss no longer does). A warm start may give the
    text encoder phrase context (`phrase_context`) and run its extension at `extend_lr` (a fine-tune); a
    continued run may change its loss's edge weight (`edge_weight`)."""

    out: Path
    device: str = "cpu"
    minutes: float | None = None
    workers: int = 0
    model: str = MODEL
    resume_dir: Path | None = None
    call_minutes: float | None = None
    call_steps: int | None = None
    compile_blocks: bool = False
    warm_start: Path | None = None
    extend_to: int | None = None
    past_plateau: bool = False
    phrase_context: bool = False
    extend_lr: float | None = None
    edge_weight: float | None = None


def extended(settings: TrainSettings, extend_to: int) -> TrainSettings:
    """`settings` of a planned run whose full-size stage now ends at global step `extend_to` (never before its
    schedule's end): the steps past it run at the schedule's final learning rate."""
    if not settings.steps:
        raise ValueError("only a run whose plan is fixed can be extended")
    return replace(settings, extra_steps=max(0, extend_to - stages_of(settings)[-1].start - settings.steps))


def train(settings: TrainSettings, call: TrainingCall) -> dict:
    """Train (or continue training) `call.model` with `settings` (a resumed run's saved settings win) until its
    plan ends, its held-out loss plateaus (unless `call.past_plateau`), or the call's budget is spent; write the
    EMA weights and `training.json` to `call.out`. Returns the record."""
    out, device, minutes, workers, model = call.out, call.device, call.minutes, call.workers, call.model
    resume_dir, call_minutes, call_steps, warm_start = call.resume_dir, call.call_minutes, call.call_steps, \
        call.warm_start
    call_start = time.perf_counter()
    state_file = resume_dir / STATE_FILE if resume_dir else None
    # The generator state must stay on the CPU; load_state_dict moves the rest to the model's device.
    state = torch.load(state_file, map_location="cpu") if state_file and state_file.is_file() else None
    earlier = json.loads((warm_start / "training.json").read_text()) if state is None and warm_start else None
    if state is not None or earlier is not None:
        settings = TrainSettings(**(state or earlier)["settings"])  # the continued run's settings and plan win
        if call.extend_to is not None:
            settings = extended(settings, call.extend_to)
        if call.extend_lr is not None:
            settings.extend_lr = call.extend_lr
        if call.edge_weight is not None:
            settings.edge_weight = call.edge_weight
        if call.phrase_context and not settings.phrase_context:
            if state is not None:
                raise ValueError("the resumed run's text encoder has no phrase context; a resumed run keeps its "
                                 "encoder (warm-start from its weights to add it)")
            settings.phrase_context = True
    elif call.extend_to is not None:
        raise ValueError("extend_to continues a run: it needs a saved resume state or a warm-start checkpoint")
    trainer = Trainer(model, settings, device)
    if state is not None:
        trainer.load_state(state)
        print(f"resumed {resume_dir} at step {trainer.step} ({trainer.seconds:.0f} s trained)", flush=True)
        del state
    elif earlier is not None:
        trainer.warm_start(warm_start, earlier)
        print(f"warm start from {warm_start} at step {trainer.step} (fresh optimizer)", flush=True)
    trainer.check_cpu_memory([stage for stage in stages_of(trainer.settings) if trainer.step < stage.end])
    if call.compile_blocks:
        trainer.compile_blocks()
    s, first_step = trainer.settings, trainer.step
    if not trainer.held_out:
        trainer.evaluate()
    status, running, timed_from = "paused", 0.0, None
    trainer.call_start = last_line = time.perf_counter()

    def planned() -> int:
        return stages_of(s)[-1].end

    def step_of_plan(step: int) -> str:
        return f"step {step}/{planned() if planned() < UNPLANNED else '?'}"

    def call_over() -> bool:
        # Leave time to evaluate, save the state and write the weights before the call's limit.
        late = call_minutes is not None and time.perf_counter() - call_start > call_minutes * 60 - 20
        return late or (call_steps is not None and trainer.step - first_step >= call_steps)

    while status == "paused" and trainer.step < planned() and not call_over():
        index = next(i for i, st in enumerate(stages_of(s)) if trainer.step < st.end)
        stage = stages_of(s)[index]
        loader = torch.utils.data.DataLoader(
            VideoBatches(trainer.videos, s, trainer.encoder.tokenizer, stage, trainer.step), batch_size=None,
            shuffle=False, num_workers=workers, prefetch_factor=8 if workers else None, pin_memory=device != "cpu",
            worker_init_fn=_one_thread if workers else None)
        print(f"stage {stage.height}x{stage.width} x {stage.batch} videos from step {trainer.step}", flush=True)
        for videos, tokens in loader:
            loss = trainer.guarded(trainer.train_step, videos, tokens, planned())
            step = trainer.step
            running += loss.item() if step % 10 == 0 else 0.0  # one device sync in ten steps
            if step % 100 == 0:
                trainer.curve.append((step, running / 10))
                print(f"{step_of_plan(step)} loss {running / 10:.4f} "
                      f"lr {trainer.optimizer.param_groups[0]['lr']:.2e} "
                      f"{trainer.clock():.0f} s", flush=True)
                running, last_line = 0.0, time.perf_counter()
            elif time.perf_counter() - last_line > PROGRESS_SECONDS:
                print(f"{step_of_plan(step)} loss {loss.item():.4f} (this step) {trainer.clock():.0f} s", flush=True)
                last_line = time.perf_counter()
            if minutes is not None and planned() >= UNPLANNED:  # time 50 steps, then fix the plan
                if step == first_step + 20:
                    _synchronize(device)
                    timed_from = time.perf_counter()
                elif step == first_step + 70:
                    _synchronize(device)
                    fix_plan(trainer, (time.perf_counter() - timed_from) / 50, minutes)
            end = stages_of(s)[index].end  # the plan may have just fixed it
            if step % s.eval_every == 0 or step == end:
                trainer.evaluate()
                if trainer.plateaued() and not call.past_plateau:
                    status = "plateau"
            if resume_dir and step % s.checkpoint_every == 0:
                trainer.save_state(resume_dir)
            if status != "paused" or step >= end or call_over():
                break
        del loader
    if trainer.step >= planned() and status == "paused":
        status = "finished"
    if not trainer.held_out or trainer.held_out[-1]["step"] != trainer.step:
        trainer.evaluate()
    trainer.calls.append({"steps": [first_step, trainer.step], "seconds": round(time.perf_counter() - call_start, 1),
                          "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"})
    trainer.seconds, trainer.call_start = trainer.clock(), None
    if resume_dir:
        trainer.save_state(resume_dir)
    save_checkpoint(trainer.ema_model, trainer.ema_encoder, trainer.preset.config, out)
    record = trainer.record(status)
    write_text_atomic(out / "training.json", json.dumps(record, indent=1))
    return record


def save_checkpoint(model: WanTransformer3DModel, encoder: WordEncoder, config: dict, out: Path) -> None:
    """fp16 weights in the diffusers layout: one file, or shards of at most SHARD_BYTES and their index."""
    state = {k: v.detach().to(torch.float16).cpu().contiguous() for k, v in model.state_dict().items()}
    folder = out / "transformer"
    shards: list[dict[str, torch.Tensor]] = [{}]
    for name, tensor in state.items():
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and sum(t.numel() * t.element_size() for t in shards[-1].values()) + size > SHARD_BYTES:
            shards.append({})
        shards[-1][name] = tensor
    if len(shards) == 1:
        names = [WEIGHTS_NAME]
    else:
        stem = WEIGHTS_NAME.removesuffix(".safetensors")
        names = [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards, strict=True):
        with atomic_path(folder / name) as tmp:
            save_file(shard, str(tmp), metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": {k: name for name, shard in zip(names, shards, strict=True) for k in shard}}
        write_text_atomic(folder / INDEX_NAME, json.dumps(index, indent=2))
    # Files of an earlier save in the other layout would be read instead of (or beside) these: remove them.
    for stale in folder.glob(WEIGHTS_NAME.removesuffix(".safetensors") + "*"):
        if stale.name not in names and not (len(shards) > 1 and stale.name == INDEX_NAME):
            stale.unlink()
    write_text_atomic(folder / "config.json",
                      json.dumps({"_class_name": "WanTransformer3DModel", **config}, indent=2))
    encoder.save(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=MODEL, choices=sorted(RECIPES))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--minutes", type=float, help="Train for about this long in all (the step counts are "
                        "recorded).")
    parser.add_argument("--steps", type=int, default=0, help="Train exactly this many steps at the full size.")
    parser.add_argument("--low-steps", type=int, default=0, help="... after exactly this many at the low size.")
    parser.add_argument("--batch", type=int, help="Videos per step at the full size (default: the recipe's).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=8, help="Processes rendering training videos.")
    parser.add_argument("--resume-dir", type=Path, help="Keep the training state here; continue from it if there.")
    parser.add_argument("--call-minutes", type=float, help="End this call after about this long (the state is "
                        "saved; rerun to continue).")
    parser.add_argument("--call-steps", type=int, help="End this call after this many steps (as --call-minutes).")
    parser.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks.")
    parser.add_argument("--warm-start", type=Path, help="Without a resume state: continue from this checkpoint "
                        "folder's weights and record (fresh optimizer).")
    parser.add_argument("--extend-to", type=int, help="Continue a resumed or warm-started run to this global step "
                        "(the steps past its plan at its final learning rate; the held-out plateau still stops it, "
                        "unless --past-plateau).")
    parser.add_argument("--past-plateau", action="store_true", help="Record a held-out plateau without stopping "
                        "(train on to the plan's end, e.g. to see what attention does once the loss is flat).")
    parser.add_argument("--phrase-context", action="store_true", help="Each word's text vector carries its phrase's "
                        "(word_encoder.py); with --warm-start, added to the checkpoint's tables.")
    parser.add_argument("--extend-lr", type=float, help="The learning rate of the steps past the plan (default: "
                        "the plan's final rate).")
    parser.add_argument("--edge-weight", type=float, help="Add this times the squared error of the clean-video "
                        "estimate's spatial gradients to the training loss (default: the run's, or 0).")
    args = parser.parse_args()
    defaults = RECIPES[args.model]
    has_low = bool(defaults.low_height)
    if args.extend_to is not None and not args.warm_start and not (args.resume_dir and
                                                                    (args.resume_dir / STATE_FILE).is_file()):
        parser.error("--extend-to continues a run: give its --resume-dir (with a saved state) or --warm-start")
    if not args.steps and args.minutes is None and not args.resume_dir and not args.warm_start:
        parser.error("give --steps (and --low-steps), --minutes, or a --resume-dir or --warm-start to continue")
    if args.edge_weight is not None and not (math.isfinite(args.edge_weight) and args.edge_weight >= 0):
        parser.error(f"--edge-weight is a weight of the loss: 0 or more, finite, not {args.edge_weight}")
    if has_low and bool(args.steps) != bool(args.low_steps):
        parser.error(f"{args.model} trains in two stages: give both --low-steps and --steps, or --minutes")
    settings = replace(defaults, seed=args.seed, steps=args.steps, low_steps=args.low_steps,
                       batch=args.batch or defaults.batch, phrase_context=args.phrase_context,
                       edge_weight=args.edge_weight or 0.0)
    try:
        record = train(settings, TrainingCall(args.out, args.device, args.minutes, args.workers, args.model,
                                              args.resume_dir, args.call_minutes, args.call_steps, args.compile,
                                              args.warm_start, args.extend_to, args.past_plateau,
                                              args.phrase_context, args.extend_lr, args.edge_weight))
    except ValueError as error:  # what the run refuses (its settings, its memory): one line, nothing written
        parser.error(str(error))
    print(f"{record['status']}: {record['steps_run']} steps, {record['seconds']} s trained; wrote {args.out}")


if __name__ == "__main__":
    main()
