"""Classifier-free guidance on two ranks (CFG parallel): a guided step's conditional and unconditional passes run at
once, the conditional one on the first rank of a pair and the unconditional one on the second, exchanged by one
all-gather so that both ranks get both and walk the same sampler loop (`runtime.sampler`, which asks a denoiser
with `predict_guided` for the two passes in one call).

With Ulysses as well, the world's first half is one Ulysses group (the conditional passes) and its second half
another (the unconditional ones): yunchang builds its groups from consecutive ranks, so `cfg_pair_group` pairs
rank i with rank i + world / 2.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from saexport.errors import SaexportError


def cfg_pair_group() -> dist.ProcessGroup:
    """This rank's CFG pair (rank i and i + world / 2); every rank calls it, after any Ulysses setup."""
    if not dist.is_initialized():
        raise SaexportError("CFG parallel needs torch.distributed initialised in every rank (launch with torchrun, "
                            "then torch.distributed.init_process_group)")
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % 2:
        raise SaexportError(f"CFG parallel runs the two passes on two halves of the ranks: {world} ranks launched")
    half, mine = world // 2, None
    for first in range(half):
        group = dist.new_group([first, first + half])  # collective: every rank creates every pair, in one order
        if rank in (first, first + half):
            mine = group
    return mine


class CfgParallelDenoiser:
    """A `Denoiser` (runtime/denoisers.py) whose guided passes run on the two ranks of `group`."""

    def __init__(self, denoiser, group: dist.ProcessGroup):
        if dist.get_world_size(group) != 2:
            raise SaexportError(f"a CFG group has two ranks, `group` has {dist.get_world_size(group)}")
        self.denoiser, self.group = denoiser, group
        self.conditional = dist.get_rank(group) == 0  # which pass this rank runs
        self.name = f"{denoiser.name}, CFG parallel"
        self.steps, self.device, self.dtype = denoiser.steps, denoiser.device, denoiser.dtype

    def predict(self, latents: torch.Tensor, timestep: torch.Tensor, text_embeddings: torch.Tensor,
                step_index: torch.Tensor) -> torch.Tensor:
        """One unguided pass (guidance 1.0): both ranks run it."""
        return self.denoiser.predict(latents, timestep, text_embeddings, step_index)

    def predict_guided(self, latents: torch.Tensor, timestep: torch.Tensor, text_embeddings: torch.Tensor,
                       negative_embeddings: torch.Tensor,
                       step_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The conditional and unconditional noise predictions, each computed on one rank of the pair."""
        embeddings = text_embeddings if self.conditional else negative_embeddings
        noise = self.denoiser.predict(latents, timestep, embeddings, step_index).contiguous()
        both = [torch.empty_like(noise) for _ in range(2)]
        dist.all_gather(both, noise, group=self.group)
        return both[0], both[1]
