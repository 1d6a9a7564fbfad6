"""Independent work items (calibration trajectories, batches of generations) spread over the ranks of a launch, their
results handed to every rank in item order.

Items go round-robin in rounds of one item per rank; after each round every rank receives the round's results
(`all_gather_object`, pickled, so results are CPU objects) and the caller folds them in item order. A caller that
folds results in item order and computes each item the same way whichever rank runs it gets, bit for bit, what one
process gets folding the same items one by one: floating-point sums are not associative, so the order is the
contract, not the split. Without a process group (one process) the items are computed one after another.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import torch.distributed as dist

Item = TypeVar("Item")
Result = TypeVar("Result")
Value = TypeVar("Value")


def launched_ranks() -> tuple[int, int]:
    """This process's rank and the launch's rank count ((0, 1) without a process group)."""
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def spread(items: Sequence[Item], compute: Callable[[Item], Result]) -> Iterator[tuple[Item, Result]]:
    """(item, compute(item)) for every item, in item order on every rank; each item computed by one rank. Every rank
    must call this with the same items (the rounds are collectives)."""
    rank, ranks = launched_ranks()
    if ranks == 1:
        for item in items:
            yield item, compute(item)
        return
    for start in range(0, len(items), ranks):
        round_items = items[start:start + ranks]
        mine = compute(round_items[rank]) if rank < len(round_items) else None
        results: list[Result | None] = [None] * ranks
        dist.all_gather_object(results, mine)
        yield from zip(round_items, results, strict=False)


def from_rank_zero(value: Value) -> Value:
    """Rank 0's `value` on every rank (the others' is ignored): what only rank 0 reads or makes, such as whether a
    stage of the folder it alone writes is current."""
    if not dist.is_initialized():
        return value
    chosen = [value]
    dist.broadcast_object_list(chosen, src=0)
    return chosen[0]
