"""What do a trained model's diffuse heads write? Per head, its share of the layer's attention output, how much of
that output is the same for every token, and what keeping a third of its keys costs it.

A head that attends to the whole video near-uniformly (bench/locality.py: it keeps about the density itself) may
carry something video-wide, or it may be a bias: the mean of its values, written alike to every token. On
held-out captions (bench/locality.py's) the clean video is rendered, noised to each of --noise-levels as the
flow-matching sampler's input (x = (1 - s) x0 + s noise, timestep 1000 s) and run through the dense model once,
conditional pass only. Each self-attention's output projection is split by head: head h contributes
O_h W_o[:, h]^T to the layer's output (the projection's bias aside). Two numbers per head, averaged over captions:

- share: the root-mean-square of its contribution over the sum of the layer's heads' (1/heads each if equal);
- constancy: the RMS of its contribution's mean over tokens, over the RMS of the contribution (1: it writes the
  same vector to every token, a bias; near 0: what it writes varies from token to token);
- at 30% of the keys, for --rows sampled query rows: the attention mass the row's own top 30% of keys hold (an
  oracle, per row and per token, the most any mask of that size keeps) and the relative error of the head's
  output when attention is renormalised over those keys alone (RMS of the error over RMS of the output): what
  the mass a mask drops costs where it is spent.

With --locality (a locality.json of bench/locality.py for the same model and weights), each head's WEST share of
the mass at 30% is set beside them, and the diffuse heads (below 0.5 at 30%) are compared with the rest. Writes
`head_outputs.json` and `head_outputs.md` to --out.

    python bench/head_outputs.py --model wan2.1-eval --locality out/locality/locality.json --out out/heads
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from locality import TEST_SEED

from saexport.demo import VIDEO_MODULES, video_module
from saexport.models.checkpoint import load_model, parse_dtype
from saexport.models.dit import rope_tables
from saexport.models.processors import dense_attention, project_output, project_qkv
from saexport.models.text_encoder import encode_prompts
from saexport.models.video_shape import parse_video_shape

DIFFUSE = 0.5  # a head keeping less than this share of the mass at 30% of the blocks is called diffuse here
KEPT = 0.3  # the share of keys the oracle keeps


def head_contributions(attended: torch.Tensor, projection: torch.nn.Linear, heads: int) -> torch.Tensor:
    """The output projection's input `[tokens, heads * head_dim]` (heads outermost, as diffusers' Wan attention
    flattens them) split into each head's contribution to its output, without the bias: `[heads, tokens, dim]`."""
    per_head = attended.unflatten(-1, (heads, -1)).transpose(0, 1)  # [heads, tokens, head_dim]
    weight = projection.weight.unflatten(-1, (heads, -1)).transpose(0, 1)  # [heads, dim, head_dim]
    return per_head @ weight.transpose(1, 2)


def share_and_constancy(contributions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per head of `[heads, tokens, dim]`: its RMS over the heads' sum of RMS, and its token-mean's RMS over its RMS."""
    rms = contributions.double().pow(2).mean((1, 2)).sqrt()
    constant = contributions.double().mean(1).pow(2).mean(-1).sqrt()
    return rms / rms.sum(), constant / rms


def top_keys_cost(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor,
                  kept: float) -> tuple[torch.Tensor, torch.Tensor]:
    """For query `rows` of q, k, v `[L, heads, head_dim]`, per head: the softmax mass of each row's top `kept`
    share of keys (mean over rows) and the relative error of the output renormalised over them alone."""
    q, k, v = (t.transpose(0, 1).double() for t in (q[rows], k, v))  # [heads, R or L, head_dim]
    probs = torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1)  # [heads, R, L]
    count = max(1, round(kept * probs.shape[-1]))
    top = torch.zeros_like(probs).scatter_(-1, probs.topk(count, dim=-1).indices, 1.0)  # exactly count keys, ties too
    chosen = probs * top
    mass = chosen.sum(-1, keepdim=True)
    dense, sparse = probs @ v, (chosen / mass) @ v  # [heads, R, head_dim]
    error = (sparse - dense).pow(2).mean((1, 2)).sqrt() / dense.pow(2).mean((1, 2)).sqrt()
    return mass.squeeze(-1).mean(-1), error


class MeasuredSelfAttention:
    """A Wan self-attention processor that runs the model's own and, beside it, recomputes q, k, v (saexport's
    `project_qkv` with its RoPE tables `rope`, checked against the model's output) to keep the layer's per-head
    attention output and the sampled rows' top-key cost."""

    def __init__(self, original, rope: tuple[torch.Tensor, torch.Tensor], rows: torch.Tensor, found: dict):
        self.original, self.rope, self.rows, self.found = original, rope, rows, found

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None,
                 **kwargs):
        out = self.original(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, **kwargs)
        query, key, value = project_qkv(attn, hidden_states, self.rope)
        attended = dense_attention(query, key, value)  # [1, L, heads, head_dim]
        mine = project_output(attn, attended, query)
        if not torch.allclose(mine.float(), out.float(), rtol=2e-2, atol=2e-3 * float(out.abs().max())):
            raise RuntimeError("the recomputed attention differs from the model's: Wan's attention changed")
        self.found["attended"] = attended[0].flatten(1)
        self.found["mass"], self.found["error"] = top_keys_cost(query[0], key[0], value[0], self.rows, KEPT)
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="wan2.1-eval", choices=sorted(VIDEO_MODULES))
    parser.add_argument("--weights", type=Path, help="Checkpoint folder (default: the model's shipped weights).")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--captions", type=int, default=2, help="Held-out captions (bench/locality.py's first).")
    parser.add_argument("--seed", type=int, default=1000, help="Seed of the rendered videos and their noise.")
    parser.add_argument("--noise-levels", default="0.9,0.6,0.3", help="Flow-matching sigmas, comma-separated.")
    parser.add_argument("--rows", type=int, default=128, help="Query rows a head's top-key cost is measured on.")
    parser.add_argument("--locality", type=Path, help="bench/locality.py's locality.json for the same weights.")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    started = time.perf_counter()
    loaded = load_model(args.model, args.weights, dtype=parse_dtype(args.dtype))
    preset, run = loaded.preset, loaded.preset.defaults
    model = loaded.transformer.to(args.device).eval()
    heads = preset.config["num_attention_heads"]
    west = None  # each head's WEST share at 30% [layers, heads], read before anything runs
    if args.locality:
        located = json.loads(args.locality.read_text())
        if located.get("weights_id") != loaded.weights_id:
            raise SystemExit(f"{args.locality} measured other weights ({located.get('weights_id')}), not "
                             f"{loaded.weights_id}")
        west = torch.tensor(located["per_head"]["WEST"]["30%"], dtype=torch.float64)
        if west.shape != (len(model.blocks), heads):
            raise SystemExit(f"{args.locality}: per-head shares of shape {tuple(west.shape)}, the model has "
                             f"{len(model.blocks)} layers x {heads} heads")
    video = parse_video_shape(run.resolution, run.frames, preset.codec)
    scenes = video_module(args.model).scenes(args.captions, TEST_SEED, held_out=True)
    captions = [scene.caption() for scene in scenes]
    text = encode_prompts(loaded.path, captions, max_length=preset.text_len)
    # The demo models' latents are pixels: the rendered video is the sampler's x0.
    clean = video_module(args.model).render(scenes, video.frames, video.height, video.width, args.seed)
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(args.seed))
    levels = [float(s) for s in args.noise_levels.split(",")]

    grid = video.token_grid(preset.patch_size)
    rows = torch.randperm(math.prod(grid), generator=torch.Generator().manual_seed(args.seed))[:args.rows]
    rope = tuple(t.to(args.device) for t in rope_tables(model, grid))
    found: list[dict] = [{} for _ in model.blocks]
    originals = [block.attn1.processor for block in model.blocks]
    for block, original, place in zip(model.blocks, originals, found, strict=True):
        block.attn1.set_processor(MeasuredSelfAttention(original, rope, rows.to(args.device), place))
    layers = len(model.blocks)
    share = torch.zeros(len(levels), len(captions), layers, heads, dtype=torch.float64)
    constancy, top_mass, top_error = torch.zeros_like(share), torch.zeros_like(share), torch.zeros_like(share)
    dtype = next(model.parameters()).dtype
    for i, sigma in enumerate(levels):
        for c in range(len(captions)):
            noisy = ((1 - sigma) * clean[c:c + 1] + sigma * noise[c:c + 1]).to(args.device, dtype)
            with torch.no_grad():
                model(hidden_states=noisy, timestep=torch.tensor([1000 * sigma], device=args.device),
                      encoder_hidden_states=text[c:c + 1].to(args.device, dtype), return_dict=False)
            for layer, block in enumerate(model.blocks):
                parts = head_contributions(found[layer]["attended"].float(), block.attn1.to_out[0].float(), heads)
                share[i, c, layer], constancy[i, c, layer] = share_and_constancy(parts)
                top_mass[i, c, layer], top_error[i, c, layer] = found[layer]["mass"], found[layer]["error"]
            print(f"noise {sigma}: caption {c + 1}/{len(captions)} ({time.perf_counter() - started:.0f} s)",
                  flush=True)
    for block, original in zip(model.blocks, originals, strict=True):
        block.attn1.set_processor(original)

    record = {"model": args.model, "weights": str(loaded.path), "weights_id": loaded.weights_id,
              "grid": list(grid), "dtype": args.dtype, "captions": captions,
              "seed": args.seed, "noise_levels": levels, "device": str(args.device),
              "rows": args.rows, "share": share.mean(1).tolist(), "constancy": constancy.mean(1).tolist(),
              "top_30_mass": top_mass.mean(1).tolist(), "top_30_error": top_error.mean(1).tolist()}
    mean_share, mean_constancy = share.mean((0, 1)), constancy.mean((0, 1))
    mean_mass, mean_error = top_mass.mean((0, 1)), top_error.mean((0, 1))
    lines = [f"{args.model}: each head's share of its layer's attention output, its constancy over tokens and the cost "
             f"of its top 30% of keys ({args.rows} rows), {len(captions)} held-out captions, noise levels "
             f"{args.noise_levels}, {args.dtype}, grid {tuple(grid)}", ""]
    if west is not None:
        record["west_30"] = west.tolist()
    cell = "share x {heads} / constancy / top-30% mass / top-30% error" + (" / WEST 30%" if west is not None else "")
    lines += [f"| layer | {' | '.join(f'head {h}' for h in range(heads))} |", "|---" * (heads + 1) + "|"]
    for layer in range(layers):
        cells = [f"{heads * mean_share[layer, h]:.2f} / {mean_constancy[layer, h]:.2f} / {mean_mass[layer, h]:.2f} / "
                 f"{mean_error[layer, h]:.3f}" + (f" / {west[layer, h]:.2f}" if west is not None else "")
                 for h in range(heads)]
        lines.append(f"| {layer} | {' | '.join(cells)} |")
    lines += ["", f"Each cell: {cell.format(heads=heads)}."]
    if west is not None:
        diffuse = west < DIFFUSE
        groups = {"diffuse": diffuse, "the rest": ~diffuse}
        record["groups"] = {}
        lines += ["", f"| heads (WEST at 30%) | count | share x {heads} | constancy | top-30% mass | top-30% error |",
                  "|---|---|---|---|---|---|"]
        for name, chosen in groups.items():
            if chosen.any():
                entry = {"count": int(chosen.sum()), "share": float(heads * mean_share[chosen].mean()),
                         "constancy": float(mean_constancy[chosen].mean()),
                         "top_30_mass": float(mean_mass[chosen].mean()),
                         "top_30_error": float(mean_error[chosen].mean())}
                record["groups"][name] = entry
                label = f"< {DIFFUSE}" if name == "diffuse" else f">= {DIFFUSE}"
                lines.append(f"| {name} ({label}) | {entry['count']} | {entry['share']:.2f} | "
                             f"{entry['constancy']:.2f} | {entry['top_30_mass']:.2f} | {entry['top_30_error']:.3f} |")
    seconds = time.perf_counter() - started
    record["seconds"] = round(seconds, 1)
    lines += ["", f"{seconds:.1f} s on {args.device}"]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "head_outputs.json").write_text(json.dumps(record, indent=1))
    (args.out / "head_outputs.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
