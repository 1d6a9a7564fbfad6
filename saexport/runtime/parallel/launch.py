"""Joining the ranks `torchrun` launched: the default process group and this rank's device."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from saexport.errors import SaexportError

TIMEOUT = timedelta(minutes=10)  # a rank that dies leaves the others waiting at most this long, then erring


def join_ranks() -> torch.device:
    """This rank's device, the default process group initialised if it is not yet (NCCL with each rank on its
    `LOCAL_RANK`'s GPU; gloo on a CPU). Refused outside a launch by torchrun."""
    if not dist.is_initialized() and "RANK" not in os.environ:
        raise SaexportError("several ranks run one video only when launched together: launch every rank with "
                            "torchrun (or initialise torch.distributed in every rank first)")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    return torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")


def check_rank_count(ulysses: int, cfg_parallel: bool) -> None:
    """The launched ranks are `ulysses` x (2 with `cfg_parallel`)."""
    needed = ulysses * (2 if cfg_parallel else 1)
    launched = dist.get_world_size()
    if launched != needed:
        what = f"`ulysses` {ulysses}" + (" with `cfg_parallel` (x 2)" if cfg_parallel else "")
        raise SaexportError(f"{what} runs on {needed} ranks, {launched} were launched")


def writes_outputs() -> bool:
    """Whether this process writes what a run produces: the only one, or rank 0 of a launch (the others computed
    the same video)."""
    return not dist.is_initialized() or dist.get_rank() == 0
