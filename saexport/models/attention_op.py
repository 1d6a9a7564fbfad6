"""The `saexport::block_sparse_attention` torch op: the semantics of docs/ARCHITECTURE.md's ONNX node.

q, k, v are `[batch, L, heads, head_dim]`; `topology` is the layer's packed INT32 threshold map
`[heads, n, ceil(n/4)]`; `budgets` is `[steps, heads]`; `step_index` is INT32 `[1]`. Query block u of
head h attends to the key blocks v with `level(h, u, v) <= budgets[step, h]`; a query block with no
kept key block outputs zeros.

The reference implementation below runs on any device and works one query block at a time, so it
never holds more than `block_size x L` scores per head. A fake implementation lets torch.export and
the ONNX exporter trace the op without running it. On CUDA tensors the op runs the kernel library
(`saexport.kernels`) when it is built and supports the case, else the reference.
"""

from __future__ import annotations

import math
import warnings

import torch

from saexport import kernels
from saexport.kernels import PackedMasks
from saexport.levels import kept_blocks, num_blocks, unpack_levels

OP_NAME = "saexport::block_sparse_attention"


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masks: PackedMasks,
                           step_index: torch.Tensor, scale: float) -> torch.Tensor:
    """The op, `torch.ops.saexport.block_sparse_attention`, whose inputs are the ONNX node's one for one."""
    return torch.ops.saexport.block_sparse_attention(q, k, v, masks.topology, masks.budgets, step_index,
                                                     masks.block_size, scale)


# The op's schema is the ONNX node's: q, k, v, topology, budgets, step_index, and the attributes block_size and
# scale. Reached through `torch.ops` (or `block_sparse_attention` above), never by these private names.
@torch.library.custom_op(OP_NAME, mutates_args=())
def _op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, topology: torch.Tensor, budgets: torch.Tensor,
        step_index: torch.Tensor, block_size: int, scale: float) -> torch.Tensor:
    return reference_block_sparse_attention(q, k, v, PackedMasks(topology, budgets, block_size), step_index, scale)


@_op.register_fake
def _(q, k, v, topology, budgets, step_index, block_size, scale):
    return torch.empty_like(q)


@_op.register_kernel("cpu")
def _(q, k, v, topology, budgets, step_index, block_size, scale):
    return gathered_block_sparse_attention(q, k, v, PackedMasks(topology, budgets, block_size), step_index, scale)


@_op.register_kernel("cuda")
def _(q, k, v, topology, budgets, step_index, block_size, scale):
    masks = PackedMasks(topology, budgets, block_size)
    check_inputs(q, k, v, masks)
    if kernels.supports(q, block_size):
        return kernels.forward(q, k, v, masks, step_index, scale)
    if kernels.load_library() is None:
        warnings.warn("the CUDA kernel library is not built: block-sparse attention runs the slow reference",
                      stacklevel=2)
    return reference_block_sparse_attention(q, k, v, masks, step_index, scale)


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masks: PackedMasks) -> int:
    """Validate shapes and dtypes against docs/ARCHITECTURE.md; return the number of blocks."""
    topology, budgets, block_size = masks
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must share one [batch, L, heads, head_dim] shape, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    _, seq_len, heads, _ = q.shape
    n = num_blocks(seq_len, block_size)
    expected = (heads, n, (n + 3) // 4)
    if topology.dtype != torch.int32 or tuple(topology.shape) != expected:
        raise ValueError(f"topology must be int32 {expected} for L={seq_len}, block {block_size}; "
                         f"got {topology.dtype} {tuple(topology.shape)}")
    if budgets.dtype != torch.int32 or budgets.dim() != 2 or budgets.shape[1] != heads:
        raise ValueError(f"budgets must be int32 [steps, {heads}], got {budgets.dtype} {tuple(budgets.shape)}")
    return n


def kept_at_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masks: PackedMasks,
                 step_index: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Validate the inputs and the step; return the number of blocks and the step's kept blocks `[heads, n, n]`."""
    n = check_inputs(q, k, v, masks)
    step = int(step_index.reshape(-1)[0])
    if not 0 <= step < masks.budgets.shape[0]:
        raise ValueError(f"step_index {step} is outside [0, {masks.budgets.shape[0]})")
    return n, kept_blocks(unpack_levels(masks.topology), masks.budgets[step])


MASKED_ABOVE = 0.45  # a head keeping more of its blocks is computed masked, not gathered (measured crossover)


def gathered_block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masks: PackedMasks,
                                    step_index: torch.Tensor, scale: float) -> torch.Tensor:
    """The op on a CPU, in at least float32: each query block of each head attends only the keys of its kept
    blocks, gathered (one attention call a row of blocks), so the work follows the density where the reference
    computes every score and masks; a head that keeps more than `MASKED_ABOVE` of its blocks is one masked
    attention call (gathering that much costs more than computing it), one that keeps every block plain attention.
    Same semantics as the reference. (On 2 cores at 4096 tokens, 2 x 4 heads: dense 298 ms; gathered 181 / 368 /
    619 ms at 15 / 40 / 70% of the blocks, masked 409 ms at any density.)"""
    n, keep = kept_at_step(q, k, v, masks, step_index)
    block_size = masks.block_size
    seq_len = q.shape[1]
    compute = torch.promote_types(q.dtype, torch.float32)
    qh, kh, vh = (t.to(compute).transpose(1, 2) for t in (q, k, v))  # [batch, heads, L, D]
    attention = torch.nn.functional.scaled_dot_product_attention
    out = torch.zeros_like(qh)
    key_block = torch.arange(seq_len, device=q.device) // block_size
    kept = keep.float().mean((1, 2))
    whole = (kept == 1).nonzero().squeeze(1)
    if len(whole):
        out[:, whole] = attention(qh[:, whole], kh[:, whole], vh[:, whole], scale=scale)
    masked = ((kept > MASKED_ABOVE) & (kept < 1)).nonzero().squeeze(1)
    if len(masked):  # one call for all of them: the CPU's fused attention takes a mask per head
        blocked = torch.zeros(keep[masked].shape, dtype=compute, device=q.device).masked_fill(~keep[masked], -math.inf)
        mask = blocked.repeat_interleave(block_size, 1).repeat_interleave(block_size, 2)[:, :seq_len, :seq_len]
        # a row that keeps nothing comes out 0 (torch's attention on a fully masked row; the test checks it)
        out[:, masked] = attention(qh[:, masked], kh[:, masked], vh[:, masked], attn_mask=mask[None], scale=scale)
    for head in ((kept <= MASKED_ABOVE) & (kept > 0)).nonzero().squeeze(1).tolist():
        for u in range(n):
            if not bool(keep[head, u].any()):
                continue  # a row that keeps nothing stays zeros
            keys = keep[head, u][key_block].nonzero().squeeze(1)
            rows = slice(u * block_size, min(seq_len, (u + 1) * block_size))
            out[:, head, rows] = attention(qh[:, head, rows], kh[:, head, keys], vh[:, head, keys], scale=scale)
    return out.transpose(1, 2).to(q.dtype).contiguous()


def reference_block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masks: PackedMasks,
                                     step_index: torch.Tensor, scale: float) -> torch.Tensor:
    """Exact block-sparse attention in at least float32, one query block at a time."""
    n, keep = kept_at_step(q, k, v, masks, step_index)
    block_size = masks.block_size
    seq_len = q.shape[1]
    compute = torch.promote_types(q.dtype, torch.float32)
    qh, kh, vh = (t.to(compute).transpose(1, 2) for t in (q, k, v))  # [batch, heads, L, D]
    key_block = torch.arange(seq_len, device=q.device) // block_size
    out = torch.empty_like(qh)
    for u in range(n):
        rows = slice(u * block_size, min(seq_len, (u + 1) * block_size))
        scores = (qh[:, :, rows] @ kh.transpose(-1, -2)) * scale  # [batch, heads, rows, L]
        key_kept = keep[:, u, key_block]  # [heads, L]
        scores = scores.masked_fill(~key_kept[None, :, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with nothing kept -> zeros
        out[:, :, rows] = probs @ vh
    return out.transpose(1, 2).to(q.dtype).contiguous()
