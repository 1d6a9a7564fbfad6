"""Threshold levels: the packed INT32 form of docs/ARCHITECTURE.md, and the masks and densities they give.

A level is a uint8 0..255. Block pair (u, v) of a head is kept at step s when
`topology[h, u, v] <= budget[s, h]`; level 255 keeps everything.
"""

from __future__ import annotations

import math

import torch

DENSE_LEVEL = 255
_BYTE_SHIFTS = (0, 8, 16, 24)


def num_blocks(seq_len: int, block_size: int) -> int:
    return math.ceil(seq_len / block_size)


def pack_levels(levels: torch.Tensor) -> torch.Tensor:
    """uint8 `[..., n, n]` -> int32 `[..., n, ceil(n/4)]`: level (u, v) is byte v % 4 of word v // 4.

    Padding bytes are 255 (never kept below a dense budget, and harmless at 255 since n bounds the walk).
    """
    if levels.dtype != torch.uint8:
        raise TypeError(f"levels must be uint8, got {levels.dtype}")
    n = levels.shape[-1]
    words = math.ceil(n / 4)
    padded = torch.full((*levels.shape[:-1], words * 4), DENSE_LEVEL, dtype=torch.int64)
    padded[..., :n] = levels.to(torch.int64)
    grouped = padded.unflatten(-1, (words, 4))
    packed = sum(grouped[..., i] << shift for i, shift in enumerate(_BYTE_SHIFTS))
    # Words with a top byte >= 128 wrap to negative int32: the bits are what matter.
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def unpack_levels(packed: torch.Tensor) -> torch.Tensor:
    """int32 `[..., n, ceil(n/4)]` -> int32 levels `[..., n, n]` (endianness-independent shifts)."""
    n = packed.shape[-2]
    shifts = torch.tensor(_BYTE_SHIFTS, dtype=torch.int32, device=packed.device)
    levels = (packed.unsqueeze(-1) >> shifts) & 0xFF
    return levels.flatten(-2)[..., :n]


def kept_blocks(levels: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
    """Bool mask `[heads, n, n]` from levels `[heads, n, n]` and one step's budgets `[heads]`."""
    return levels.to(torch.int32) <= budget.to(torch.int32).view(-1, 1, 1)


def density(levels: torch.Tensor, budgets: torch.Tensor) -> torch.Tensor:
    """Fraction of block pairs kept, per budget entry.

    levels `[layers, heads, n, n]`, budgets `[steps, layers, heads]` -> `[steps, layers, heads]`. (Through each
    head's histogram of levels, so that no `[steps, layers, heads, n, n]` tensor is ever made.)
    """
    flat = levels.flatten(-2).to(torch.int64)  # [layers, heads, n*n]
    counts = torch.zeros(*flat.shape[:-1], DENSE_LEVEL + 1, dtype=torch.float64, device=levels.device)
    counts.scatter_add_(-1, flat, torch.ones(flat.shape, dtype=torch.float64, device=levels.device))
    kept = counts.cumsum(-1) / flat.shape[-1]  # [layers, heads, 256]: fraction kept at each level
    index = budgets.to(torch.int64).clamp(0, DENSE_LEVEL).to(levels.device)
    return kept.unsqueeze(0).expand(index.shape[0], -1, -1, -1).gather(-1, index.unsqueeze(-1)).squeeze(-1)


def levels_from_scores(scores: torch.Tensor) -> torch.Tensor:
    """Rank `[..., n, n]` scores into levels (rank 1 = highest score), docs/ARCHITECTURE.md's rule exactly.

    The pair of rank r is in Top(S, p), the ceil(p n^2) best pairs, iff p n^2 > r - 1; at level P
    (p = P / 255) that is P > 255 (r - 1) / n^2, so its level is floor(255 (r - 1) / n^2) + 1.
    Equal scores share the best rank of their tie group (1 + the number of strictly higher scores), so a pair
    never waits for a twin of the same score: a map of equal scores is level 1 everywhere.
    """
    n2 = scores.shape[-1] * scores.shape[-2]
    flat = scores.flatten(-2)
    ordered, order = flat.sort(dim=-1, descending=True, stable=True)
    position = torch.arange(n2, device=flat.device).expand_as(order)
    starts = torch.ones_like(order, dtype=torch.bool)
    starts[..., 1:] = ordered[..., 1:] != ordered[..., :-1]  # a new tie group begins here
    group_rank = torch.where(starts, position, 0).cummax(dim=-1).values + 1  # the rank of the group's first pair
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, group_rank)
    levels = torch.div((ranks - 1) * DENSE_LEVEL, n2, rounding_mode="floor") + 1
    return levels.clamp(max=DENSE_LEVEL).to(torch.uint8).view(scores.shape)
