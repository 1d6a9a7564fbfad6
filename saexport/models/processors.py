"""Wan's self-attention as the static-grid DiT runs it: q/k/v exactly as diffusers computes them (projections,
RMSNorm across heads, RoPE from the DiT's fp32 tables), then one of three attentions:

- `DenseSelfAttnProcessor`: scaled-dot-product attention over all tokens;
- `SparseSelfAttnProcessor`: `saexport::block_sparse_attention` with the layer's frozen masks;
- `ProbedSelfAttnProcessor`: dense, and for a few sampled query rows the softmax over all keys summed per key
  block (*block masses* `[batch, heads, rows, n]`) handed to a callback: what WEST and FAST calibrate from,
  without ever holding an L x L matrix (on a GPU with Triton, one fused kernel: `probe_kernel`);
- `ProbedRowsSelfAttnProcessor`: dense, and for a few sampled query rows *per head* the block masses and the
  per-key-block partial outputs `sum_{j in block} p_j v_j` (`RowProbe`), from which the attention output of
  every sparse mask of those rows follows (FAST's output-error proxies); with `BlockInputs` hooked on the
  transformer block, also the residual stream at those rows and the block's self-attention gate.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F

from saexport.levels import num_blocks
from saexport.models import attention_op  # noqa: F401  (registers the op)

MassCallback = Callable[[int, torch.Tensor], None]  # (layer, block masses [batch, heads, rows, n])


class StepContext:
    """The denoising step of the forward pass in flight, shared by every layer's processor.

    Set by `SparseWanDiT.forward` before the blocks run: diffusers' blocks do not forward extra
    arguments to their attention processors.
    """

    step_index: torch.Tensor | None = None


class LayerMasks(torch.nn.Module):
    """One layer's packed INT32 topology `[heads, n, ceil(n/4)]` and budgets `[steps, heads]`.

    Buffers, so that `.to(device)` moves them and the ONNX exporter writes them as initializers.

    Budgets `[steps, samples, heads]` give each sample of a batch of `samples` its own budgets (calibration runs
    many budget tables in one sampler loop): the topology is then held once per sample, `[samples * heads, ...]`,
    and the budgets `[steps, samples * heads]`, the layout the op sees when the batch is folded into the heads.
    """

    def __init__(self, topology: torch.Tensor, budgets: torch.Tensor):
        super().__init__()
        self.samples = budgets.shape[1] if budgets.dim() == 3 else 0
        if self.samples:
            topology, budgets = topology.repeat(self.samples, 1, 1), budgets.flatten(1)
        self.register_buffer("topology", topology.to(torch.int32).contiguous())
        self.register_buffer("budgets", budgets.to(torch.int32).contiguous())


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's RoPE on interleaved pairs; cos/sin are the per-pair tables `[1, L, 1, head_dim/2]` (fp32)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).float().unbind(-1)
    rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


def project_qkv(attn, hidden_states: torch.Tensor, rotary_emb: tuple[torch.Tensor, torch.Tensor]):
    """Wan's self-attention q, k, v `[batch, L, heads, head_dim]`: projections, RMSNorm across heads, RoPE."""
    query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
    key = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
    value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
    return apply_rotary(query, *rotary_emb), apply_rotary(key, *rotary_emb), value


def check_self_attention_call(encoder_hidden_states, attention_mask, rotary_emb) -> None:
    if encoder_hidden_states is not None or attention_mask is not None or rotary_emb is None:
        raise ValueError("this processor serves Wan's self-attention (with RoPE) only")


def project_output(attn, out: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`[batch, L, heads, head_dim]` -> the layer's output projection."""
    return attn.to_out[1](attn.to_out[0](out.flatten(2, 3).type_as(like)))


def dense_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))
    return out.transpose(1, 2)


@contextlib.contextmanager
def tf32_products(enabled: bool):
    """fp32 matrix products on a GPU's TF32 tensor cores inside the block, when `enabled`."""
    if not enabled:
        yield
        return
    before = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.fp32_precision = before


@functools.cache
def _probe_kernel() -> ModuleType | None:
    """`saexport.models.probe_kernel`, or None where Triton does not import (CI, CPU-only installs)."""
    try:
        from saexport.models import probe_kernel
    except ImportError:
        return None
    return probe_kernel


_unbuildable: set[tuple] = set()  # (dtype, head_dim, block_size, device) the fused probe failed to build for


def block_masses(q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, block_size: int,
                 chunk: int = 512) -> torch.Tensor:
    """Softmax of the sampled rows over all keys, summed per key block: fp32 `[batch, heads, R, n]`.

    On CUDA tensors with Triton and shapes it takes, the fused kernel (`probe_kernel`); else, or where Triton cannot
    build it on this GPU (said once), `block_masses_torch`."""
    if q.is_cuda:
        kernel = _probe_kernel()
        key = (q.dtype, q.shape[-1], block_size, q.device)
        if kernel is not None and key not in _unbuildable and kernel.supports(q, k, rows, block_size):
            try:
                return kernel.block_masses_triton(q, k, rows, block_size)
            except kernel.BUILD_FAILURES as e:
                _unbuildable.add(key)
                warnings.warn(f"the fused probe does not build for {key} here ({type(e).__name__}: {e}); "
                              "calibration probes with the slower torch path", stacklevel=2)
    return block_masses_torch(q, k, rows, block_size, chunk)


def block_masses_torch(q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, block_size: int,
                       chunk: int = 512) -> torch.Tensor:
    """`block_masses` in torch, `chunk` rows at a time: the reference the fused kernel is checked against.

    Half-precision q and k are exact in TF32 (their 8-bit significands fit its 11), so on a GPU their logits
    come from the tensor cores with fp32 accumulation and nothing lost; fp32 inputs keep full fp32 products.
    The softmax runs in place on each chunk's logits (one L-wide buffer per chunk, no padded copy)."""
    batch, seq_len, heads, dim = q.shape
    full = seq_len // block_size * block_size  # keys in whole blocks; the rest is one short last block
    keys = k.transpose(1, 2).float()  # [B, H, L, D]
    out = []
    with tf32_products(q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)):
        for start in range(0, rows.numel(), chunk):
            idx = rows[start:start + chunk].to(q.device)
            logits = q[:, idx].transpose(1, 2).float() @ keys.transpose(-1, -2)  # [B, H, c, L]
            weights = logits.sub_(logits.amax(-1, keepdim=True)).mul_(1 / math.sqrt(dim)).exp_()
            blocks = weights[..., :full].unflatten(-1, (full // block_size, block_size)).sum(-1)
            if full < seq_len:
                blocks = torch.cat([blocks, weights[..., full:].sum(-1, keepdim=True)], -1)
            out.append(blocks / blocks.sum(-1, keepdim=True))
    return torch.cat(out, dim=2)


class DenseSelfAttnProcessor:
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        check_self_attention_call(encoder_hidden_states, attention_mask, rotary_emb)
        query, key, value = project_qkv(attn, hidden_states, rotary_emb)
        return project_output(attn, dense_attention(query, key, value), query)


class ProbedSelfAttnProcessor:
    """Dense attention (so the trajectory is the dense model's); block masses of `rows` to `on_masses`."""

    def __init__(self, layer: int, rows: torch.Tensor, block_size: int, on_masses: MassCallback):
        self.layer, self.rows, self.block_size, self.on_masses = layer, rows, block_size, on_masses

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        check_self_attention_call(encoder_hidden_states, attention_mask, rotary_emb)
        query, key, value = project_qkv(attn, hidden_states, rotary_emb)
        self.on_masses(self.layer, block_masses(query, key, self.rows, self.block_size))
        return project_output(attn, dense_attention(query, key, value), query)


class SparseSelfAttnProcessor:
    def __init__(self, masks: LayerMasks, context: StepContext, block_size: int):
        self.masks = masks
        self.context = context
        self.block_size = block_size

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        check_self_attention_call(encoder_hidden_states, attention_mask, rotary_emb)
        query, key, value = project_qkv(attn, hidden_states, rotary_emb)
        batch, seq_len, heads, dim = query.shape
        samples = self.masks.samples
        if samples:  # per-sample budgets: fold the batch into the heads, [1, L, samples * heads, D]
            if batch != samples:
                raise ValueError(f"budgets for {samples} samples, a batch of {batch}")
            query, key, value = (t.transpose(0, 1).reshape(1, seq_len, batch * heads, dim) for t in (query, key, value))
        out = torch.ops.saexport.block_sparse_attention(
            query, key, value, self.masks.topology, self.masks.budgets, self.context.step_index,
            self.block_size, 1.0 / math.sqrt(dim),
        )
        if samples:
            out = out.reshape(seq_len, batch, heads, dim).transpose(0, 1)
        return project_output(attn, out, query)


@dataclass(frozen=True)
class RowProbe:
    """What `ProbedRowsSelfAttnProcessor` hands its callback for one layer and forward pass."""

    masses: torch.Tensor  # fp32 [batch, heads, R, n]: softmax mass of each sampled row per key block
    partials: torch.Tensor  # fp32 [batch, heads, R, n, head_dim]: sum over the block's keys of p_j v_j
    out_weight: torch.Tensor  # [dim, heads * head_dim]: the layer's output projection (to_out[0].weight)
    stream: torch.Tensor | None = None  # [batch, heads, R, dim]: the block's input hidden states at the rows
    gate: torch.Tensor | None = None  # fp32 [batch, dim]: the block's self-attention gate (gate_msa)


RowCallback = Callable[[int, RowProbe], None]


def block_partials(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor, block_size: int,
                   chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """For query `rows` `[heads, R]` (token positions, per head) of q, k, v `[batch, L, heads, head_dim]`: the
    block masses `[batch, heads, R, n]` and partial outputs `[batch, heads, R, n, head_dim]` (at least fp32)."""
    batch, seq_len, heads, dim = q.shape
    n = num_blocks(seq_len, block_size)
    dtype = torch.promote_types(q.dtype, torch.float32)
    pad = n * block_size - seq_len
    keys = k.transpose(1, 2).to(dtype)  # [B, H, L, D]
    values = F.pad(v.transpose(1, 2).to(dtype), (0, 0, 0, pad)).unflatten(2, (n, block_size))  # [B, H, n, bs, D]
    queries = q.transpose(1, 2)
    masses, partials = [], []
    for start in range(0, rows.shape[1], chunk):
        idx = rows[:, start:start + chunk].to(q.device)
        picked = queries.gather(2, idx.view(1, heads, -1, 1).expand(batch, -1, -1, dim)).to(dtype)  # [B, H, r, D]
        probs = torch.softmax(picked @ keys.transpose(-1, -2) / math.sqrt(dim), dim=-1)
        probs = F.pad(probs, (0, pad)).unflatten(-1, (n, block_size))  # [B, H, r, n, bs]
        masses.append(probs.sum(-1))
        partials.append(torch.einsum("bhrnk,bhnkd->bhrnd", probs, values))
    return torch.cat(masses, dim=2), torch.cat(partials, dim=2)


class BlockInputs:
    """A forward pre-hook for a Wan transformer block: keeps its input hidden states (the residual stream) and
    its self-attention gate, for the block's `ProbedRowsSelfAttnProcessor`."""

    hidden_states: torch.Tensor | None = None
    gate: torch.Tensor | None = None

    def __call__(self, block, args) -> None:
        hidden_states, temb = args[0], args[2]
        if temb.dim() != 3:
            raise ValueError("the residual probe serves Wan2.1's blocks (timestep projection [batch, 6, dim])")
        self.hidden_states = hidden_states
        self.gate = (block.scale_shift_table + temb.float()).chunk(6, dim=1)[2].squeeze(1)


class ProbedRowsSelfAttnProcessor:
    """Dense attention (so the trajectory is the dense model's); a `RowProbe` of `rows` `[heads, R]` to `on_rows`."""

    def __init__(self, layer: int, rows: torch.Tensor, block_size: int, on_rows: RowCallback,
                 inputs: BlockInputs | None = None):
        self.layer, self.rows, self.block_size, self.on_rows, self.inputs = layer, rows, block_size, on_rows, inputs

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        check_self_attention_call(encoder_hidden_states, attention_mask, rotary_emb)
        query, key, value = project_qkv(attn, hidden_states, rotary_emb)
        masses, partials = block_partials(query, key, value, self.rows, self.block_size)
        stream = gate = None
        if self.inputs is not None and self.inputs.hidden_states is not None:
            x = self.inputs.hidden_states  # [B, L, dim]
            stream = x[:, self.rows.to(x.device).flatten()].unflatten(1, tuple(self.rows.shape))
            gate = self.inputs.gate
        self.on_rows(self.layer, RowProbe(masses, partials, attn.to_out[0].weight, stream, gate))
        return project_output(attn, dense_attention(query, key, value), query)
