"""Calibration runs: the dense model along the sampler's trajectory, with every self-attention layer probed.

A probe computes the layer's ordinary dense output (so the trajectory is the dense model's) and, for a
few sampled query rows per block, the row's full softmax over all keys, summed per key block: the
*block masses* `[batch, heads, rows, n]`. Both WEST (which blocks matter) and FAST (how much of each
row a budget keeps) are computed from block masses, so neither ever holds an L x L matrix.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from saexport.atomic import atomic_path
from saexport.engines.scheduler import wan_scheduler
from saexport.errors import SaexportError
from saexport.exporter.processor import check_self_attention_call, project_qkv
from saexport.exporter.sparse_dit import SparseWanDiT

MassCallback = Callable[[int, torch.Tensor], None]  # (layer, block masses [batch, heads, rows, n])


@dataclass(frozen=True)
class SampledRows:
    """`rows_per_block` query rows drawn (seeded) from every query block."""

    rows: torch.Tensor  # int64 [R], token positions
    block: torch.Tensor  # int64 [R], their query block

    @classmethod
    def draw(cls, seq_len: int, block_size: int, rows_per_block: int, seed: int) -> SampledRows:
        gen = torch.Generator().manual_seed(seed)
        rows, blocks = [], []
        for u in range(math.ceil(seq_len / block_size)):
            size = min(block_size, seq_len - u * block_size)
            take = min(rows_per_block, size)
            rows.append(u * block_size + torch.randperm(size, generator=gen)[:take])
            blocks.append(torch.full((take,), u))
        return cls(torch.cat(rows), torch.cat(blocks))


def block_masses(q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, block_size: int, chunk: int = 512):
    """Softmax of the sampled rows over all keys, summed per key block: fp32 `[batch, heads, R, n]`."""
    batch, seq_len, heads, dim = q.shape
    n = math.ceil(seq_len / block_size)
    keys = k.transpose(1, 2).float()  # [B, H, L, D]
    out = []
    for start in range(0, rows.numel(), chunk):
        idx = rows[start:start + chunk].to(q.device)
        logits = q[:, idx].transpose(1, 2).float() @ keys.transpose(-1, -2) / math.sqrt(dim)
        probs = torch.softmax(logits, dim=-1)
        probs = F.pad(probs, (0, n * block_size - seq_len))
        out.append(probs.unflatten(-1, (n, block_size)).sum(-1))
    return torch.cat(out, dim=2)


class AttentionProbe:
    """Self-attention processor: dense output as diffusers computes it, block masses to a callback."""

    def __init__(self, layer: int, rows: SampledRows, block_size: int, on_masses: MassCallback):
        self.layer, self.rows, self.block_size, self.on_masses = layer, rows, block_size, on_masses

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        check_self_attention_call(encoder_hidden_states, attention_mask, rotary_emb)
        query, key, value = project_qkv(attn, hidden_states, rotary_emb)
        self.on_masses(self.layer, block_masses(query, key, self.rows.rows, self.block_size))
        out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))
        out = out.transpose(1, 2).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


def install_probes(model: SparseWanDiT, rows: SampledRows, on_masses: MassCallback) -> None:
    for layer, block in enumerate(model.transformer.blocks):
        block.attn1.set_processor(AttentionProbe(layer, rows, model.block_size, on_masses))


@dataclass(frozen=True)
class Run:
    prompt: int
    seed: int
    step: int


def trajectories(
    model: SparseWanDiT,
    embeddings: torch.Tensor,  # [prompts, text_len, text_dim]
    seeds: list[int],
    steps: int,
    flow_shift: float,
    latent_shape: tuple[int, ...],
    skip: frozenset[tuple[int, int]] = frozenset(),  # (prompt, seed) trajectories already done
) -> Iterator[Run]:
    """Run the (probed) model along each prompt x seed trajectory.

    Yields each run *before* its forward pass, so the consumer can label what the probes are about to see;
    the forward pass runs when the consumer asks for the next run.
    """
    device = next(model.parameters()).device
    dtype = embeddings.dtype
    for prompt, text in enumerate(embeddings):
        for seed in seeds:
            if (prompt, seed) in skip:
                continue
            scheduler = wan_scheduler(flow_shift)
            scheduler.set_timesteps(steps)
            gen = torch.Generator().manual_seed(seed)
            latents = torch.randn(1, *latent_shape, generator=gen).to(device)
            for step, t in enumerate(scheduler.timesteps):
                yield Run(prompt, seed, step)
                with torch.no_grad():
                    noise = model(latents.to(dtype), t.reshape(1).float().to(device), text[None].to(device),
                                  torch.tensor([step], dtype=torch.int32, device=device))
                latents = scheduler.step(noise.float(), t, latents).prev_sample


def probed_model(
    transformer, grid: tuple[int, int, int], layout, block_size: int, rows: SampledRows, on_masses: MassCallback,
    device: torch.device,
) -> SparseWanDiT:
    """The dense DiT for `grid` and `layout`, every self-attention layer probed."""
    layers, heads = len(transformer.blocks), transformer.config.num_attention_heads
    n = math.ceil(math.prod(grid) / block_size)
    unused_topology = torch.zeros(layers, heads, n, n, dtype=torch.uint8)  # probes never read masks
    unused_budgets = torch.full((1, layers, heads), 255, dtype=torch.uint8)
    model = SparseWanDiT(transformer, grid, layout, unused_topology, unused_budgets, block_size)
    install_probes(model, rows, on_masses)
    return model.to(device).eval()


def latent_shape_of(transformer, grid: tuple[int, int, int]) -> tuple[int, int, int, int]:
    pt, ph, pw = transformer.config.patch_size
    return (transformer.config.in_channels, grid[0] * pt, grid[1] * ph, grid[2] * pw)


def calibration_embeddings(text_len: int, text_dim: int, prompts: int, seed: int,
                           dtype: torch.dtype) -> torch.Tensor:
    """SYNTHETIC text embeddings (seeded normal), for models without a text encoder at hand."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(prompts, text_len, text_dim, generator=gen).to(dtype)


def read_embeddings(path: Path, text_dim: int) -> torch.Tensor:
    """The `embeddings` tensor `[prompts, text_len, text_dim]` of a safetensors file (e.g. UMT5 outputs)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            embeddings = f.get_tensor("embeddings")
    except (OSError, SafetensorError) as e:
        raise SaexportError(f"{path}: not a safetensors file with an `embeddings` tensor ({e})") from None
    if embeddings.dim() != 3 or embeddings.shape[-1] != text_dim:
        raise SaexportError(f"{path}: embeddings must be [prompts, text_len, {text_dim}], "
                            f"got {tuple(embeddings.shape)}")
    return embeddings.float()


def calibration_set(preset, prompts: int, embeddings_file: Path | None = None, weights: Path | None = None,
                    cache: Path | None = None) -> tuple[torch.Tensor, str]:
    """fp32 calibration embeddings and where they came from: a file; else the checkpoint's text encoder on the
    built-in prompts (cached in `cache`); else synthetic ("synthetic")."""
    from saexport.models.text_encoder import calibration_prompts, encode_prompts, has_text_encoder

    text_dim = preset.config["text_dim"]
    if embeddings_file is not None:
        return read_embeddings(embeddings_file, text_dim), str(embeddings_file)
    if weights is not None and has_text_encoder(weights):
        chosen = calibration_prompts(weights, prompts)
        embeddings = encode_prompts(weights, chosen, cache, max_length=preset.text_len)
        return embeddings, f"built-in prompts ({len(chosen)}), text encoder of {weights}"
    return calibration_embeddings(preset.text_len, text_dim, prompts, 0, torch.float32), "synthetic"


class CalibrationCheckpoint:
    """Resumes an interrupted calibration: the accumulated state and the finished trajectories, saved
    atomically after each trajectory to `path` (a safetensors file), valid only for the same settings `key`.

    `state` tensors are the consumer's live accumulators; a matching checkpoint is copied into them.
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
        if self.path is not None:
            with atomic_path(self.path) as tmp:
                save_file({k: v.contiguous() for k, v in self.state.items()}, str(tmp),
                          metadata={"key": self.key, "done": json.dumps(sorted(self.done))})

    def remove(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def calibration_key(*parts) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.contiguous().cpu().numpy().tobytes() if isinstance(part, torch.Tensor)
                      else json.dumps(part, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def calibration_runs(
    loaded, grid: tuple[int, int, int], layout, block_size: int, rows: SampledRows, on_masses: MassCallback,
    embeddings: torch.Tensor, seeds: list[int], steps: int, flow_shift: float, device: str | torch.device,
    progress: Callable, desc: str, checkpoint: CalibrationCheckpoint | None = None,
) -> Iterator[Run]:
    """Probe every layer and walk all prompt x seed trajectories, with a progress bar; see `trajectories`.

    With a checkpoint, finished trajectories are skipped and each one that finishes is recorded."""
    if embeddings.shape[0] == 0 or not seeds:
        raise SaexportError("the calibration set is empty: give at least one prompt and one seed")
    done = frozenset(checkpoint.done) if checkpoint else frozenset()
    model = probed_model(loaded.transformer, grid, layout, block_size, rows, on_masses, torch.device(device))
    runs = trajectories(model, embeddings, seeds, steps, flow_shift, latent_shape_of(loaded.transformer, grid), done)
    total = (len(embeddings) * len(seeds) - len(done)) * steps
    return _recording(progress(runs, total=total, desc=desc, unit="step"), checkpoint)


def _recording(runs: Iterator[Run], checkpoint: CalibrationCheckpoint | None) -> Iterator[Run]:
    """A trajectory is finished once the forward pass after its last yield has run: when the next is asked for."""
    previous = None
    for run in runs:
        if checkpoint and previous is not None and (run.prompt, run.seed) != (previous.prompt, previous.seed):
            checkpoint.finish((previous.prompt, previous.seed))
        yield run
        previous = run
    if checkpoint and previous is not None:
        checkpoint.finish((previous.prompt, previous.seed))
