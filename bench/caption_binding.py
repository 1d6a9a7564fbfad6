"""Does a trained model read which shape and which motion belong to which colour? Its loss under caption edits.

The caption check (bench/fidelity_metrics.py) finds each captioned object by its colour, then asks whether the
region has the captioned shape and moves the captioned way: it passes only if the model *binds* a colour to its
shape and motion. A model that reads the caption as a bag of words draws the right colours and some shapes and
motions, but not on the right objects. This measures that directly, without sampling: on held-out captions and
render seeds (never trained on) with fixed noise, the flow-matching loss of the model's prediction (train.py's
objective, the EMA weights as shipped, bf16 autocast on a GPU, fp32 on the CPU) given the true caption, and given
edits of it:
- *shapes swapped* / *motions swapped*: the caption's own shapes (motions) rotated among its objects, the same
  words in another binding (the test scenes are those whose objects' shapes and motions all differ, so that every
  object's changes);
- *shapes wrong* / *motions wrong*: each object's replaced by one it does not have (words the video lacks);
- *empty*: the unconditional prompt.
At noise levels where the caption decides what is drawn, a model that uses the binding loses more with swapped
captions than with true ones; the *binding share* (swapped - true) / (wrong - true) says how much of what the
words tell it comes through the binding (0: a bag of words, 1: all of it). Intervals: 95% t over videos (one
caption each). Writes `caption_binding.md` (the tables: each edit's loss added, in % of the as-captioned loss) and
`caption_binding.json` (the as-captioned loss and each edit's added loss, absolute, and the binding shares).

    python bench/caption_binding.py --model wan2.1-eval --weights DIR --device cuda --out out/binding
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from saexport.demo import video_module
from saexport.demo.train import flow_loss
from saexport.models.checkpoint import load_model
from saexport.models.word_encoder import WordEncoder
from saexport.runtime.fidelity import t_interval

SEED = 515_151  # held-out captions, render seeds, noise and edits: not the training script's held-out set
NOISE_LEVELS = (0.5, 0.8, 0.95)  # sigma: the caption matters more as less of the video is left


def swapped(scene, field: str, rng: random.Random):
    """The scene with `field` of its objects rotated among them: every object gets another's value."""
    values = [getattr(o, field) for o in scene.objects]
    shift = rng.randrange(1, len(values))
    moved = values[shift:] + values[:shift]
    return replace(scene, objects=tuple(replace(o, **{field: v}) for o, v in zip(scene.objects, moved, strict=True)))


def wrong(scene, field: str, options: list, rng: random.Random):
    """The scene with each object's `field` replaced by another value than its own."""
    def other(value):
        return rng.choice([v for v in options if v != value])

    return replace(scene, objects=tuple(replace(o, **{field: other(getattr(o, field))}) for o in scene.objects))


def edited_captions(scenes: list, module, seed: int) -> dict[str, list[str] | None]:
    rng = random.Random(seed)
    motions = [*module.PANS, None]
    return {
        "as captioned": [s.caption() for s in scenes],
        "shapes swapped": [swapped(s, "shape", rng).caption() for s in scenes],
        "motions swapped": [swapped(s, "motion", rng).caption() for s in scenes],
        "shapes wrong": [wrong(s, "shape", list(module.SHAPES), rng).caption() for s in scenes],
        "motions wrong": [wrong(s, "motion", motions, rng).caption() for s in scenes],
        "empty": None,
    }


def per_video_losses(model, encoder: WordEncoder, x0: torch.Tensor, tokens: torch.Tensor, sigma: float,
                     noise: torch.Tensor, bar: tqdm) -> torch.Tensor:
    """One loss per video (flow_loss averages its batch, so one video a call)."""
    sigmas = torch.full((1,), sigma, device=x0.device)
    losses = []
    for i in range(len(x0)):
        losses.append(float(flow_loss(model, encoder, x0[i:i + 1], tokens[i:i + 1], sigmas, noise[i:i + 1])))
        bar.update()
    return torch.tensor(losses, dtype=torch.float64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="wan2.1-eval")
    parser.add_argument("--weights", type=Path, help="Checkpoint folder (default: the model's shipped weights).")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--videos", type=int, default=64)
    parser.add_argument("--resolution", help="WxH (default: the model's); e.g. the low-resolution stage's for a CPU "
                        "run")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    loaded = load_model(args.model, args.weights)
    model = loaded.transformer.float().to(args.device).eval()
    encoder = WordEncoder.load(loaded.path).to(args.device)
    module = video_module(args.model)
    run = loaded.preset.defaults
    width, height = (int(v) for v in (args.resolution or run.resolution).split("x"))
    scenes = [s for s in module.scenes(8 * args.videos, SEED, held_out=True)
              if all(len({getattr(o, f) for o in s.objects}) == len(s.objects) for f in ("shape", "motion"))]
    scenes = scenes[:args.videos]
    x0 = module.render(scenes, run.frames, height, width, SEED).to(args.device)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(SEED)).to(args.device)
    variants = edited_captions(scenes, module, SEED)
    losses: dict[str, dict[float, torch.Tensor]] = {}
    # A forward a video, caption and noise level: on a CPU, minutes between the lines below.
    bar = tqdm(total=len(variants) * len(NOISE_LEVELS) * len(scenes), desc="forward passes", unit="pass",
               disable=None)
    with torch.no_grad():
        for name, texts in variants.items():
            tokens = (encoder.tokenizer(texts) if texts is not None
                      else torch.zeros(len(scenes), encoder.tokenizer.max_length, dtype=torch.int64))
            losses[name] = {sigma: per_video_losses(model, encoder, x0, tokens.to(args.device), sigma, noise, bar)
                            for sigma in NOISE_LEVELS}
            bar.write(f"{name}: " + ", ".join(f"sigma {s}: {float(v.mean()):.4f}" for s, v in losses[name].items()))
            sys.stdout.flush()
    bar.close()

    header = "| caption | " + " | ".join(f"loss, sigma {s}" for s in NOISE_LEVELS) + " |"
    lines = [f"{args.model} ({loaded.weights_id}), {len(scenes)} held-out videos of {width}x{height}, {args.device}",
             "", header,
             "| --- |" + " --- |" * len(NOISE_LEVELS)]
    result: dict = {"model": args.model, "weights_id": loaded.weights_id, "videos": len(scenes), "losses": {},
                     "binding_share": {}}
    for name, by_sigma in losses.items():
        cells = []
        for sigma, values in by_sigma.items():
            if name == "as captioned":
                interval = t_interval(values)
                cells.append(f"{interval.mean:.4f} ± {interval.half:.4f}")
            else:  # the loss added, in % of the as-captioned mean
                interval = t_interval(values - losses["as captioned"][sigma])
                scale = 100 / float(losses["as captioned"][sigma].mean())
                cells.append(f"{interval.mean * scale:+.2f} ± {interval.half * scale:.2f} %")
            result["losses"].setdefault(name, {})[str(sigma)] = interval.to_json(6)
        lines.append(f"| {name}{'' if name == 'as captioned' else ' (added loss)'} | " + " | ".join(cells)
                     + " |")
    lines += ["", "| binding share | " + " | ".join(f"sigma {s}" for s in NOISE_LEVELS) + " |",
              "| --- |" + " --- |" * len(NOISE_LEVELS)]
    for field in ("shapes", "motions"):
        shares = []
        for sigma in NOISE_LEVELS:
            true = losses["as captioned"][sigma].mean()
            share = float((losses[f"{field} swapped"][sigma].mean() - true)
                          / (losses[f"{field} wrong"][sigma].mean() - true))
            shares.append(share)
            result["binding_share"].setdefault(field, {})[str(sigma)] = round(share, 3)
        lines.append(f"| {field} | " + " | ".join(f"{v:.2f}" for v in shares) + " |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "caption_binding.json").write_text(json.dumps(result, indent=1))
    (args.out / "caption_binding.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
