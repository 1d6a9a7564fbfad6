"""Heads balanced across ranks, offline: per (step, layer), which heads each rank of a Ulysses group attends.

Ulysses hands every rank whole sequences of H/R heads (equal counts: the all-to-all splits the head axis evenly),
and a rank's attention work is the kept block pairs of its heads at that step. FAST's budgets differ per head, so
the split by head index leaves some ranks far more work than others; since the topology and budgets are static,
the assignment that minimises the most loaded rank's work is computed once, here, from the artifacts.

Exact where the splits of the heads number at most `EXACT_SPLITS` (Wan2.1 1.3B's 12 heads on 2 or 4 ranks: 462 and
15,400; 8 heads: at most 105): branch and bound over the heads, heaviest first, ranks interchangeable, searched to
the end. Otherwise (14B's 40 heads: more than 10^20 splits) a heuristic: a greedy longest-first fill under the H/R
cardinality, pairwise swaps between the most loaded rank and the others, then the same search cut at
`SEARCH_NODES`. `BalanceResult.proven` counts the (step, layer) entries proven optimal (searched to the end, or found
equal to a lower bound).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from saexport.errors import SaexportError
from saexport.levels import density

EXACT_SPLITS = 10**6  # up to this many splits the search runs to the end (15,400 splits: 2 ms on a CPU core)
SEARCH_NODES = 1_000  # past EXACT_SPLITS: the search's nodes per (step, layer) after the heuristic (~5 ms)


def check_ranks(heads: int, ranks: int, parameter: str = "ranks") -> int:
    """The heads each rank attends, H / R; refused unless 1 <= R <= H and R divides H (`parameter`: the caller's
    name for R, which the message names)."""
    if ranks < 1:
        raise SaexportError(f"`{parameter}` must be at least 1, got {ranks}")
    if ranks > heads:
        raise SaexportError(f"`{parameter}` {ranks} is more than the model's {heads} heads: Ulysses gives each rank "
                            "whole heads, so use at most as many ranks as heads")
    if heads % ranks:
        raise SaexportError(f"`{parameter}` {ranks} does not divide the model's {heads} heads: Ulysses gives every "
                            f"rank as many heads, so use a divisor of {heads}")
    return heads // ranks


def head_work(topology_levels: torch.Tensor, budget_levels: torch.Tensor) -> torch.Tensor:
    """Kept block pairs int64 `[steps, layers, heads]` of levels `[layers, heads, n, n]` under budgets
    `[steps, layers, heads]`: the attention work of each head at each step."""
    pairs = topology_levels.shape[-1] * topology_levels.shape[-2]
    return (density(topology_levels, budget_levels) * pairs).round().to(torch.int64)


def _greedy(work: list[int], ranks: int, per_rank: int) -> list[list[int]]:
    """Longest first into the least loaded rank with room, then swaps that lower the most loaded rank's work."""
    groups: list[list[int]] = [[] for _ in range(ranks)]
    loads = [0] * ranks
    for head in sorted(range(len(work)), key=lambda h: -work[h]):
        rank = min((r for r in range(ranks) if len(groups[r]) < per_rank), key=lambda r: loads[r])
        groups[rank].append(head)
        loads[rank] += work[head]
    while True:  # each swap strictly lowers the sorted load vector, so this ends
        top = max(range(ranks), key=lambda r: loads[r])
        best = None  # (new max of the two ranks, other rank, head out of top, head into top)
        for other in range(ranks):
            for out in groups[top]:
                for into in groups[other]:
                    moved = work[out] - work[into]
                    if 0 < moved and loads[other] + moved < loads[top]:
                        candidate = (max(loads[top] - moved, loads[other] + moved), other, out, into)
                        best = candidate if best is None or candidate < best else best
        if best is None:
            return groups
        _, other, out, into = best
        groups[top][groups[top].index(out)] = into
        groups[other][groups[other].index(into)] = out
        moved = work[out] - work[into]
        loads[top] -= moved
        loads[other] += moved


def balance_heads(work: list[int], ranks: int) -> tuple[list[list[int]], bool]:
    """The heads of each rank (H/R each, sorted) minimising the most loaded rank's summed `work`, and whether that
    minimum is proven. `work` is one (step, layer)'s per-head work."""
    per_rank = check_ranks(len(work), ranks)
    groups = _greedy(work, ranks, per_rank)
    best = max(sum(work[h] for h in g) for g in groups)
    heaviest = sorted(range(len(work)), key=lambda h: -work[h])
    ordered = [work[h] for h in heaviest]
    # no assignment beats the mean, nor the heaviest head with the lightest H/R - 1 others
    bound = max(math.ceil(sum(work) / ranks), ordered[0] + sum(ordered[len(ordered) - per_rank + 1:]))
    if best <= bound:
        return [sorted(g) for g in groups], True
    splits = math.factorial(len(work)) // (math.factorial(per_rank) ** ranks * math.factorial(ranks))
    node_budget = math.inf if splits <= EXACT_SPLITS else SEARCH_NODES
    remaining = [sum(ordered[i:]) for i in range(len(ordered) + 1)]
    loads, counts = [0] * ranks, [0] * ranks
    slots = [0] * len(ordered)  # the rank of each head, heaviest first, on the current path
    found: list[int] | None = None
    nodes = 0

    def search(i: int) -> bool:  # True: stop (the bound is reached or the node budget spent)
        nonlocal best, found, nodes
        nodes += 1
        if nodes > node_budget:
            return True
        if i == len(ordered):
            best, found = max(loads), slots.copy()
            return best <= bound
        # every rank must end below `best`: the work left has to fit in the room left
        if remaining[i] > sum(best - 1 - loads[r] for r in range(ranks) if counts[r] < per_rank):
            return False
        tried = set()
        for r in sorted(range(ranks), key=loads.__getitem__):  # least loaded first: good leaves early
            state = (loads[r], counts[r])
            if counts[r] == per_rank or loads[r] + ordered[i] >= best or state in tried:
                continue  # full, too heavy, or the same as a rank already tried (ranks are interchangeable)
            tried.add(state)
            loads[r] += ordered[i]
            counts[r] += 1
            slots[i] = r
            stop = search(i + 1)
            loads[r] -= ordered[i]
            counts[r] -= 1
            if stop:
                return True
        return False

    exhausted = not search(0)
    proven = exhausted or best <= bound
    if found is not None:
        groups = [[] for _ in range(ranks)]
        for position, rank in enumerate(found):
            groups[rank].append(heaviest[position])
    return [sorted(g) for g in groups], proven


@dataclass(frozen=True)
class BalanceResult:
    """Per (step, layer), the heads in rank order: rank r attends `order[s, l, r*H/R:(r+1)*H/R]`."""

    order: torch.Tensor  # int64 [steps, layers, heads], a permutation of the heads per entry
    ranks: int
    proven: int  # (step, layer) entries whose assignment is proven optimal


def balanced_head_order(work: torch.Tensor, ranks: int) -> BalanceResult:
    """The balanced assignment of `balance_heads` for every (step, layer) of `work` `[steps, layers, heads]`."""
    steps, layers, heads = work.shape
    check_ranks(heads, ranks)
    order = torch.empty(steps, layers, heads, dtype=torch.int64)
    proven = 0
    cache: dict[tuple[int, ...], tuple[list[int], bool]] = {}  # equal work vectors recur (dense steps)
    for s in range(steps):
        for layer in range(layers):
            key = tuple(work[s, layer].tolist())
            if key not in cache:
                groups, exact = balance_heads(list(key), ranks)
                cache[key] = ([h for g in groups for h in g], exact)
            flat, exact = cache[key]
            order[s, layer] = torch.tensor(flat)
            proven += exact
    return BalanceResult(order, ranks, proven)


def contiguous_head_order(work: torch.Tensor, ranks: int) -> BalanceResult:
    """The split by head index (rank r attends heads r*H/R .. (r+1)*H/R - 1): what balancing is measured against."""
    steps, layers, heads = work.shape
    check_ranks(heads, ranks)
    return BalanceResult(torch.arange(heads).expand(steps, layers, heads).clone(), ranks, 0)


def rank_work(work: torch.Tensor, order: torch.Tensor, ranks: int) -> torch.Tensor:
    """Summed work `[steps, layers, ranks]` of each rank under `order` (both `[steps, layers, heads]`)."""
    return work.gather(-1, order).unflatten(-1, (ranks, -1)).sum(-1)


def imbalance(work: torch.Tensor, order: torch.Tensor, ranks: int) -> torch.Tensor:
    """max / mean rank work fp64 `[steps, layers]` (1.0 where a step keeps nothing)."""
    loads = rank_work(work, order, ranks).to(torch.float64)
    mean = loads.mean(-1)
    return torch.where(mean > 0, loads.amax(-1) / mean.clamp(min=1e-12), torch.ones_like(mean))


def attention_overhead(work: torch.Tensor, order: torch.Tensor, ranks: int) -> float:
    """How much longer attention takes under `order` than under a perfect balance, over all (step, layer) entries:
    each layer waits for its busiest rank, so the time is the summed max rank work against the summed mean."""
    loads = rank_work(work, order, ranks).to(torch.float64)
    mean = loads.mean(-1).sum()
    return float(loads.amax(-1).sum() / mean) - 1.0 if mean > 0 else 0.0


def balance_summary(work: torch.Tensor, order: torch.Tensor, ranks: int) -> str:
    """One line for the user: how much longer attention takes under `order` than under a perfect balance, and the
    worst (step, layer), against the split by head index."""
    naive = contiguous_head_order(work, ranks).order
    return (f"heads balanced over {ranks} ranks: attention {attention_overhead(work, order, ranks):.1%} longer than a "
            f"perfect balance, the worst layer and step {imbalance(work, order, ranks).max() - 1:.1%} (heads split by "
            f"index: {attention_overhead(work, naive, ranks):.1%} and {imbalance(work, naive, ranks).max() - 1:.1%})")
