"""Fused Triton kernel for WEST's calibration probe: `block_masses` on a GPU.

For each sampled query row r, the softmax of its logits q_r . k_j / sqrt(head_dim) over all L keys, summed per key
block of `block_size` keys (the last block may be short): fp32 `[batch, heads, R, n]`, each row summing to 1.

The torch path materialises `[batch, heads, chunk, L]` fp32 logits several times over; at Wan2.1-1.3B 480p that
costs more than the dense forward it rides on. Here one program holds a tile of sampled rows in registers and
streams K once: per key block it keeps only the block's row max and sum of exponentials (base 2, the scale times
log2(e) folded into the logits, as FlashAttention does). A second, tiny kernel turns those `[.., R, n]` pairs into
masses: `sum_b * 2^(max_b - max) / sum_b' (sum_b' * 2^(max_b' - max))`, the torch path's normalisation (the row's
block masses divided by their sum). Memory traffic is q[rows], K (once per 64-row tile, mostly from L2) and the
`[.., R, n]` outputs; the logits never leave registers. One sweep over K rather than two (the row
max and sum first, then each block's share) halves the products and exponentials, the kernel's whole cost.

Products: half-precision q and k go to the tensor cores with fp32 accumulation (their products are exact in fp32);
fp32 q and k use IEEE fp32 products (no TF32 rounding).

Importing this module imports Triton: `saexport.models.processors` does it lazily, for CUDA tensors only. Under
`TRITON_INTERPRET=1` the kernels also run on CPU tensors, which is how the tests check them without a GPU.
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl
from triton.errors import TritonError

from saexport import levels

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
ROWS_PER_PROGRAM = 64  # sampled rows per program: the M of the tile products (tl.dot needs >= 16)
NORMALISE_WIDTH = 1024  # key blocks per step of the normalising kernel's loops


def _power_of_two(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def supports(q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, block_size: int) -> bool:
    """Whether `block_masses_triton` takes these inputs (whatever their device)."""
    return (
        q.dim() == 4
        and k.shape == q.shape
        and q.dtype == k.dtype
        and q.dtype in SUPPORTED_DTYPES
        and q.device == k.device
        and _power_of_two(q.shape[-1])
        and 16 <= q.shape[-1] <= 256
        and _power_of_two(block_size)
        and block_size >= 16
        and rows.dim() == 1
        and rows.numel() > 0
        and (not q.is_cuda or q.dtype == torch.float32 or torch.cuda.get_device_capability(q.device) >= (8, 0))
    )


# What Triton raises when it cannot build or launch a kernel here (compilation, ptxas, shared memory): the caller
# falls back to the torch probe.
BUILD_FAILURES = (TritonError,)


@triton.jit
def _block_sums_kernel(
    q_ptr, k_ptr, sums_ptr, maxes_ptr,
    num_rows, seq_len, num_blocks, heads,
    stride_qb, stride_qh, stride_qr,
    stride_kb, stride_kl, stride_kh,
    stride_ob, stride_oh, stride_or,
    qk_scale,
    BLOCK_SIZE: tl.constexpr, ROWS: tl.constexpr, KEYS: tl.constexpr, HEAD_DIM: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """Per (row, key block): the max of the base-2 logits and the sum of 2^(logit - max) over the block's keys."""
    row_tile = tl.program_id(0)
    batch_head = tl.program_id(1).to(tl.int64)  # int64 offsets: batch * L * heads * head_dim may pass 2^31
    b = batch_head // heads
    h = batch_head % heads
    row_offs = row_tile * ROWS + tl.arange(0, ROWS)
    dims = tl.arange(0, HEAD_DIM)
    row_ok = row_offs < num_rows
    q_ptrs = q_ptr + b * stride_qb + h * stride_qh + row_offs[:, None] * stride_qr + dims[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)  # rows past R read zeros: finite logits, never stored
    k_base = k_ptr + b * stride_kb + h * stride_kh
    out_offs = b * stride_ob + h * stride_oh + row_offs * stride_or
    for block in range(0, num_blocks):
        block_max = tl.full([ROWS], float("-inf"), tl.float32)
        block_sum = tl.zeros([ROWS], dtype=tl.float32)
        # Blocks wider than a key tile take several tiles, merged online; one tile otherwise (a trip count of 1).
        for tile in range(0, BLOCK_SIZE // KEYS):
            keys = block * BLOCK_SIZE + tile * KEYS + tl.arange(0, KEYS)
            key_ok = keys < seq_len
            k_tile = tl.load(k_base + keys[None, :] * stride_kl + dims[:, None], mask=key_ok[None, :], other=0.0)
            logits = tl.dot(q, k_tile, input_precision=INPUT_PRECISION) * qk_scale  # [ROWS, KEYS], base 2
            logits = tl.where(key_ok[None, :], logits, float("-inf"))  # keys past L: the short last block
            # Every block's first tile holds a key below L, so new_max is finite and no -inf - -inf arises.
            new_max = tl.maximum(block_max, tl.max(logits, 1))
            block_sum = block_sum * tl.exp2(block_max - new_max) + tl.sum(tl.exp2(logits - new_max[:, None]), 1)
            block_max = new_max
        tl.store(sums_ptr + out_offs + block, block_sum, mask=row_ok)
        tl.store(maxes_ptr + out_offs + block, block_max, mask=row_ok)


@triton.jit
def _normalise_kernel(sums_ptr, maxes_ptr, out_ptr, num_blocks, WIDTH: tl.constexpr):
    """One row of `[.., n]` (block sum, block max) pairs -> its block masses, divided by their sum."""
    base = tl.program_id(0).to(tl.int64) * num_blocks
    offs = tl.arange(0, WIDTH)
    row_max = tl.full([WIDTH], float("-inf"), tl.float32)
    for start in range(0, num_blocks, WIDTH):
        ok = start + offs < num_blocks
        row_max = tl.maximum(row_max, tl.load(maxes_ptr + base + start + offs, mask=ok, other=float("-inf")))
    top = tl.max(row_max, 0)
    total = tl.zeros([WIDTH], dtype=tl.float32)
    for start in range(0, num_blocks, WIDTH):
        ok = start + offs < num_blocks
        block_max = tl.load(maxes_ptr + base + start + offs, mask=ok, other=float("-inf"))
        block_sum = tl.load(sums_ptr + base + start + offs, mask=ok, other=0.0)
        total += block_sum * tl.exp2(block_max - top)  # masked lanes: 0 * 2^-inf = 0
    norm = tl.sum(total, 0)
    for start in range(0, num_blocks, WIDTH):
        ok = start + offs < num_blocks
        block_max = tl.load(maxes_ptr + base + start + offs, mask=ok, other=float("-inf"))
        block_sum = tl.load(sums_ptr + base + start + offs, mask=ok, other=0.0)
        tl.store(out_ptr + base + start + offs, block_sum * tl.exp2(block_max - top) / norm, mask=ok)


def block_masses_triton(q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, block_size: int) -> torch.Tensor:
    """`processors.block_masses` fused: fp32 `[batch, heads, R, n]` for q, k `[batch, L, heads, head_dim]`.

    CUDA tensors, or CPU tensors under `TRITON_INTERPRET=1`; `supports` must hold."""
    if not supports(q, k, rows, block_size):
        raise ValueError(f"the probe kernel does not take q {tuple(q.shape)} {q.dtype}, k {tuple(k.shape)} "
                         f"{k.dtype}, {rows.numel()} rows, block size {block_size}")
    batch, seq_len, heads, dim = q.shape
    num_blocks = levels.num_blocks(seq_len, block_size)
    q_rows = q[:, rows.to(q.device)].transpose(1, 2).contiguous()  # [B, H, R, D]: the sampled rows, small
    if k.stride(-1) != 1:
        k = k.contiguous()
    num_rows = q_rows.shape[2]
    sums = torch.empty(batch, heads, num_rows, num_blocks, dtype=torch.float32, device=q.device)
    maxes = torch.empty_like(sums)
    # Key tiles of at most 128 keys (64 at head_dim 256): a [ROWS, KEYS] fp32 logit tile and a [D, KEYS] K tile
    # stay within one program's registers.
    keys = min(block_size, 128 if dim <= 128 else 64)
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        _block_sums_kernel[(triton.cdiv(num_rows, ROWS_PER_PROGRAM), batch * heads)](
            q_rows, k, sums, maxes,
            num_rows, seq_len, num_blocks, heads,
            q_rows.stride(0), q_rows.stride(1), q_rows.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            sums.stride(0), sums.stride(1), sums.stride(2),
            math.log2(math.e) / math.sqrt(dim),
            BLOCK_SIZE=block_size, ROWS=ROWS_PER_PROGRAM, KEYS=keys, HEAD_DIM=dim,
            INPUT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # tf32: Triton's default, unused by halves
        )
        masses = torch.empty_like(sums)
        width = min(NORMALISE_WIDTH, triton.next_power_of_2(num_blocks))
        _normalise_kernel[(batch * heads * num_rows,)](
            sums, maxes, masses, num_blocks, WIDTH=width, num_warps=1 if width <= 256 else 4,
        )
    return masses
