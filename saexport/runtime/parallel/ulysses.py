"""Ulysses sequence parallelism for the sparse DiT, on yunchang's `LongContextAttention` (no communication layer of
our own beyond one all-gather of the final tokens).

Every rank of the Ulysses group runs the blocks on its L/R tokens. In each self-attention layer, q, k, v of the
rank's tokens are permuted along the heads into that (step, layer)'s balanced order (`parallel.balance`), so that
yunchang's all-to-all (which hands rank r the r-th run of H/R heads) gives each rank its balanced set; the rank runs
`saexport::block_sparse_attention` over all tokens of its heads with their slice of the layer's topology and budgets;
the all-to-all back returns the rank's tokens, and the permutation is undone. After the blocks, the ranks' tokens
are gathered and each rank finishes the forward pass, so every rank returns the whole noise prediction and runs the
same sampler loop (`runtime.sampler`) on the same latents.

Launched in every rank after `torch.distributed.init_process_group` (`torchrun`): `ulysses_dit(dit, degree)` wraps a
`SparseWanDiT`, and `TorchDenoiser` takes the wrapper as it takes the DiT.
"""

from __future__ import annotations

import hashlib
import logging
import math
import warnings
from types import ModuleType

import torch
import torch.distributed as dist

from saexport.errors import SaexportError
from saexport.levels import unpack_levels
from saexport.models.dit import SparseWanDiT
from saexport.models.processors import LayerMasks, StepContext, check_self_attention_call, project_output, project_qkv
from saexport.runtime.parallel.balance import balance_summary, balanced_head_order, check_ranks, head_work

log = logging.getLogger("saexport")


def import_yunchang() -> ModuleType:
    try:
        with warnings.catch_warnings():  # yunchang 0.6 scripts two helpers with torch.jit, deprecated by torch 2.10
            warnings.filterwarnings("ignore", category=DeprecationWarning, module="torch.jit")
            import yunchang
    except ImportError:
        raise SaexportError("sequence parallelism runs on yunchang, which is not installed: "
                            "pip install 'saexport[parallel]' (or pip install 'yunchang>=0.6')") from None
    return yunchang


def dit_head_work(dit: SparseWanDiT) -> torch.Tensor:
    """Kept block pairs int64 `[steps, layers, heads]` of the DiT's frozen masks, one layer at a time (the unpacked
    levels of a whole 14B topology would not fit beside the model)."""
    per_layer = []
    for masks in dit.masks:
        levels = unpack_levels(masks.topology.cpu())  # [heads, n, n]
        per_layer.append(head_work(levels[None], masks.budgets.cpu()[:, None]))  # [steps, 1, heads]
    return torch.cat(per_layer, dim=1)


def _step_row(table: torch.Tensor, step_index: torch.Tensor) -> torch.Tensor:
    """`table[step]` for a one-element step tensor, gathered on its device (no host synchronisation)."""
    return table.index_select(0, step_index.reshape(1).to(table.device, torch.int64)).squeeze(0)


class RankSparseAttention:
    """yunchang's `attn_processor` for one layer: this rank's heads, all tokens, through the block-sparse op."""

    def __init__(self, masks: LayerMasks, context: StepContext, head_order: torch.Tensor, rank: int, ranks: int,
                 block_size: int):
        self.masks, self.context, self.block_size = masks, context, block_size
        self.head_order = head_order  # int64 [steps, heads]: the layer's balanced order
        per_rank = head_order.shape[1] // ranks
        self.positions = slice(rank * per_rank, (rank + 1) * per_rank)  # this rank's run of the ordered heads

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float,
                 **flash_options) -> tuple[torch.Tensor, torch.Tensor]:
        """q, k, v `[batch, L, heads / R, head_dim]` -> (out, log-sum-exp `[batch, heads / R, L]`).

        `flash_options` are flash attention's (dropout 0, not causal, no window): nothing block-sparse attention
        uses. The op returns no log-sum-exp; with a ring degree of 1 (what `ulysses_dit` sets up) yunchang merges
        no partial outputs and drops it, so a placeholder of its shape is returned."""
        step_index = self.context.step_index
        heads = _step_row(self.head_order, step_index)[self.positions].to(q.device)
        out = torch.ops.saexport.block_sparse_attention(
            q, k, v, self.masks.topology.index_select(0, heads), self.masks.budgets.index_select(1, heads),
            step_index, self.block_size, softmax_scale,
        )
        batch, seq_len, local_heads, _ = q.shape
        return out, torch.zeros(batch, local_heads, seq_len, dtype=torch.float32, device=q.device)


class UlyssesSelfAttnProcessor:
    """Wan's self-attention on this rank's tokens: heads permuted into the step's balanced order, yunchang's
    Ulysses attention, the permutation undone."""

    def __init__(self, attention: torch.nn.Module, head_order: torch.Tensor, context: StepContext):
        self.attention, self.head_order, self.context = attention, head_order, context

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        check_self_attention_call(encoder_hidden_states, attention_mask, rotary_emb)
        query, key, value = project_qkv(attn, hidden_states, rotary_emb)  # [batch, L / R, heads, head_dim]
        order = _step_row(self.head_order, self.context.step_index).to(query.device)
        permuted = (t.index_select(2, order) for t in (query, key, value))
        out = self.attention(*permuted, softmax_scale=1.0 / math.sqrt(query.shape[-1]))
        return project_output(attn, out.index_select(2, order.argsort()), query)


class UlyssesWanDiT(torch.nn.Module):
    """A `SparseWanDiT` run by the R ranks of a Ulysses group (same inputs and output as the DiT, in every rank)."""

    def __init__(self, dit: SparseWanDiT, group: dist.ProcessGroup, head_order: torch.Tensor):
        super().__init__()
        self.dit, self.group = dit, group
        self.rank, self.ranks = dist.get_rank(group), dist.get_world_size(group)
        self.head_order = head_order  # int64 [steps, layers, heads]

    @property
    def transformer(self):
        return self.dit.transformer

    def latent_shape(self) -> tuple[int, int, int, int]:
        return self.dit.latent_shape()

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                step_index: torch.Tensor) -> torch.Tensor:
        tokens, conditioning = self.dit.embed(hidden_states, timestep, encoder_hidden_states, step_index)
        shard = tokens.shape[1] // self.ranks
        mine = slice(self.rank * shard, (self.rank + 1) * shard)
        rope = (self.dit.rope_cos[:, mine], self.dit.rope_sin[:, mine])
        tokens = self.dit.run_blocks(tokens[:, mine].contiguous(), conditioning, rope)
        shards = [torch.empty_like(tokens) for _ in range(self.ranks)]
        dist.all_gather(shards, tokens, group=self.group)
        return self.dit.unembed(torch.cat(shards, dim=1), conditioning)


def check_same_masks(dit: SparseWanDiT, head_order: torch.Tensor) -> None:
    """Refuse, in every rank, to run when the ranks hold different grids, masks or head orders (artifacts that
    differ across ranks would give each rank's heads another rank's masks, silently)."""
    digest = hashlib.sha256(repr((dit.grid, dit.block_size)).encode())
    for tensor in (*(t for masks in dit.masks for t in (masks.topology, masks.budgets)), head_order):
        digest.update(tensor.cpu().contiguous().numpy().tobytes())
    digests: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest.hexdigest())
    if len(set(digests)) > 1:
        differing = [rank for rank, other in enumerate(digests) if other != digests[0]]
        raise SaexportError(f"the ranks hold different artifacts: ranks {differing} differ from rank 0 in grid, "
                            "topology, budgets or head order; give every rank the same topology and budgets files")


def ulysses_dit(dit: SparseWanDiT, degree: int, head_order: torch.Tensor | None = None) -> UlyssesWanDiT:
    """`dit` (its processors replaced) run by Ulysses groups of `degree` ranks of the initialised default process
    group; every rank calls it. `head_order` `[steps, layers, heads]` (rank r of a group attends positions
    r*H/R .. (r+1)*H/R - 1 of each row) defaults to the balanced assignment of the DiT's own masks."""
    heads = dit.transformer.config.num_attention_heads
    check_ranks(heads, degree, parameter="degree")
    seq_len = math.prod(dit.grid)
    if seq_len % degree:
        raise SaexportError(f"`degree` {degree} does not divide the {seq_len} tokens of grid {dit.grid}: Ulysses "
                            "gives every rank as many tokens")
    if any(masks.samples for masks in dit.masks):
        raise SaexportError("a DiT with per-sample budgets (calibration's) cannot run sequence-parallel")
    steps, layers = dit.masks[0].budgets.shape[0], len(dit.masks)
    if head_order is not None and tuple(head_order.shape) != (steps, layers, heads):
        raise SaexportError(f"`head_order` must be [steps, layers, heads] = {[steps, layers, heads]}, got "
                            f"{list(head_order.shape)}")
    if head_order is not None and not torch.equal(head_order.sort(-1).values.cpu(),
                                                  torch.arange(heads).expand(steps, layers, heads)):
        raise SaexportError(f"every row of `head_order` must be a permutation of the {heads} heads")
    yunchang = import_yunchang()
    if not dist.is_initialized():
        raise SaexportError("sequence parallelism needs torch.distributed initialised in every rank (launch with "
                            "torchrun, then torch.distributed.init_process_group)")
    if dist.get_world_size() % degree:
        raise SaexportError(f"`degree` {degree} does not divide the {dist.get_world_size()} ranks launched")
    if head_order is None:
        work = dit_head_work(dit)
        head_order = balanced_head_order(work, degree).order
        if dist.get_rank() == 0:
            log.info("%s", balance_summary(work, head_order, degree))
    check_same_masks(dit, head_order)
    device = dit.rope_cos.device
    head_order = head_order.to(device, torch.int64)
    yunchang.set_seq_parallel_pg(degree, 1, dist.get_rank(), dist.get_world_size())  # ring degree 1: Ulysses only
    group = yunchang.globals.PROCESS_GROUP.ULYSSES_PG
    rank = dist.get_rank(group)
    for layer, (block, masks) in enumerate(zip(dit.transformer.blocks, dit.masks, strict=True)):
        local = RankSparseAttention(masks, dit.context, head_order[:, layer], rank, degree, dit.block_size)
        attention = yunchang.LongContextAttention(attn_type=None, attn_processor=local)
        block.attn1.set_processor(UlyssesSelfAttnProcessor(attention, head_order[:, layer], dit.context))
    return UlyssesWanDiT(dit, group, head_order)
