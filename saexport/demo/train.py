"""Train `wan2.1-demo`: Wan2.1's DiT (diffusers `WanTransformer3DModel`, the preset's config) and a word
embedding text encoder, on procedural captioned videos in pixels, with Wan's flow-matching objective.

    python -m saexport.demo.train --out DIR --device cuda --minutes 7    # or --steps N to repeat a run

The objective is the one Wan's sampler assumes (diffusers' flow-matching UniPC): x_t = (1 - s) x0 + s noise,
timestep 1000 s, target noise - x0; s is drawn through the sampler's flow shift, so training sees the noise
levels sampling visits. One caption in ten is dropped (zero embeddings, the empty prompt) so that
classifier-free guidance works. Writes DIR as a diffusers-layout checkpoint: `transformer/` (EMA weights,
fp16), `text_encoder/`, `tokenizer/`, and `training.json` (every setting, the steps run, the loss curve).
With --minutes the step count is fixed after 50 timed steps and recorded: --steps with it repeats the run.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import save_file

from saexport.atomic import atomic_path, write_text_atomic
from saexport.demo.videos import VOCABULARY, render, scenes
from saexport.models.checkpoint import WEIGHTS_NAME
from saexport.models.presets import get_preset
from saexport.models.word_encoder import WordEncoder, WordTokenizer

MODEL = "wan2.1-demo"


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
    flow_shift: float = 3.0  # the sampler's shift at this size (engines.scheduler.flow_shift_for)
    steps: int = 0  # 0: fixed from --minutes after 50 timed steps


class VideoBatches(torch.utils.data.Dataset):
    """Batch i is rendered from seed (settings.seed, i): the data stream is the same with any worker count."""

    def __init__(self, settings: TrainSettings, tokenizer: WordTokenizer, length: int):
        self.settings, self.tokenizer, self.length = settings, tokenizer, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.settings
        seed = s.seed * 10_000_000 + i
        batch = scenes(s.batch, seed)
        videos = render(batch, s.frames, s.height, s.width, seed)
        return videos, self.tokenizer([scene.caption() for scene in batch])


def train(settings: TrainSettings, out: Path, device: str, minutes: float | None, workers: int) -> dict:
    torch.manual_seed(settings.seed)
    preset = get_preset(MODEL)
    config = {k: (tuple(v) if k == "patch_size" else v) for k, v in preset.config.items()}
    model = WanTransformer3DModel(**config).to(device).train()
    encoder = WordEncoder(list(VOCABULARY), preset.config["text_dim"], preset.text_len).to(device).train()
    params = list(model.parameters()) + list(encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=settings.lr, betas=(0.9, 0.99), weight_decay=settings.weight_decay)
    ema_model, ema_encoder = copy.deepcopy(model).eval(), copy.deepcopy(encoder).eval()
    ema_params = list(ema_model.parameters()) + list(ema_encoder.parameters())

    planned = settings.steps or 10_000_000
    batches = VideoBatches(settings, encoder.tokenizer, planned)
    loader = torch.utils.data.DataLoader(
        batches, batch_size=None, shuffle=False, num_workers=workers, persistent_workers=workers > 0,
        prefetch_factor=8 if workers else None, pin_memory=device != "cpu")
    gen = torch.Generator(device=device).manual_seed(settings.seed + 1)
    curve: list[tuple[int, float]] = []
    running, start, timed_from = 0.0, time.perf_counter(), None
    step = 0
    for step, (videos, tokens) in enumerate(loader, start=1):
        x0, tokens = videos.to(device, non_blocking=True), tokens.to(device, non_blocking=True)
        keep = torch.rand(tokens.shape[0], 1, device=device, generator=gen) >= settings.caption_dropout
        text = encoder(tokens * keep)
        u = torch.rand(x0.shape[0], device=device, generator=gen)
        sigma = settings.flow_shift * u / (1 + (settings.flow_shift - 1) * u)
        noise = torch.randn(x0.shape, device=device, generator=gen)
        s = sigma.view(-1, 1, 1, 1, 1)
        noisy = (1 - s) * x0 + s * noise
        with torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16):
            pred = model(noisy, sigma * 1000, text, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred.float(), noise - x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
        for group in optimizer.param_groups:
            group["lr"] = settings.lr * _lr_factor(step, settings, planned)
        optimizer.step()
        decay = min(settings.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        running += loss.item() if step % 10 == 0 else 0.0
        if step % 100 == 0:
            curve.append((step, running / 10))
            elapsed = time.perf_counter() - start
            print(f"step {step}/{planned if settings.steps or timed_from else '?'} loss {running / 10:.4f} "
                  f"lr {optimizer.param_groups[0]['lr']:.2e} {elapsed:.0f} s", flush=True)
            running = 0.0
        if minutes is not None and not settings.steps:
            if step == 20:
                timed_from = time.perf_counter()
            elif step == 70:
                per_step = (time.perf_counter() - timed_from) / 50
                remaining = minutes * 60 - (time.perf_counter() - start)
                settings.steps = planned = step + int(remaining / per_step)
                print(f"{per_step * 1000:.0f} ms/step: training {planned} steps", flush=True)
        if step >= planned:
            break

    elapsed = time.perf_counter() - start
    save_checkpoint(ema_model, ema_encoder, preset.config, out)
    record = {"model": MODEL, "settings": asdict(settings), "steps_run": step, "seconds": round(elapsed, 1),
              "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
              "torch": torch.__version__, "loss_curve": curve}
    write_text_atomic(out / "training.json", json.dumps(record, indent=1))
    return record


def _lr_factor(step: int, settings: TrainSettings, planned: int) -> float:
    """Linear warm-up, then cosine decay to `final_lr_fraction` at the planned last step."""
    if step < settings.warmup:
        return step / settings.warmup
    if planned >= 10_000_000:
        return 1.0  # the step count is not fixed yet (still timing)
    progress = min(1.0, (step - settings.warmup) / max(1, planned - settings.warmup))
    return settings.final_lr_fraction + (1 - settings.final_lr_fraction) * 0.5 * (1 + math.cos(math.pi * progress))


def save_checkpoint(model: WanTransformer3DModel, encoder: WordEncoder, config: dict, out: Path) -> None:
    state = {k: v.detach().to(torch.float16).cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(out / "transformer" / WEIGHTS_NAME) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    write_text_atomic(out / "transformer" / "config.json",
                      json.dumps({"_class_name": "WanTransformer3DModel", **config}, indent=2))
    encoder.save(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--minutes", type=float, help="Train for about this long (the step count is recorded).")
    parser.add_argument("--steps", type=int, default=0, help="Train exactly this many steps.")
    parser.add_argument("--batch", type=int, default=TrainSettings.batch)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=8, help="Processes rendering training videos.")
    args = parser.parse_args()
    if not args.steps and args.minutes is None:
        parser.error("give --steps or --minutes")
    settings = TrainSettings(seed=args.seed, batch=args.batch, steps=args.steps)
    record = train(settings, args.out, args.device, args.minutes, args.workers)
    print(f"trained {record['steps_run']} steps in {record['seconds']} s; wrote {args.out}")


if __name__ == "__main__":
    main()
