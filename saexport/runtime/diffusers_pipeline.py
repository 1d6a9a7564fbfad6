"""`saexport.apply(pipe, topology, budgets)`: a diffusers `WanPipeline` with frozen block-sparse self-attention.

The pipeline keeps its own transformer, forward pass, scheduler and loop; only each block's self-attention
processor changes. Inside diffusers' forward the tokens are in raster order and RoPE comes as diffusers' tables,
so the processor takes Wan's q, k, v exactly as diffusers computes them, permutes them into the topology's token
layout, runs `saexport::block_sparse_attention` (the CUDA kernel on a GPU) and permutes the output back. The step
index — which budgets apply — is the pipeline's own: its scheduler's `step_index` (None before the first step).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from saexport.artifacts import Budgets, Topology
from saexport.errors import SaexportError
from saexport.levels import pack_levels
from saexport.models.presets import config_hash
from saexport.models.processors import LayerMasks, check_self_attention_call, project_qkv


class PipelineSparseSelfAttnProcessor:
    """Block-sparse self-attention inside diffusers' own `WanTransformer3DModel.forward`."""

    def __init__(self, masks: LayerMasks, topology: Topology, scheduler):
        self.masks, self.scheduler = masks, scheduler
        self.block_size, self.tokens = topology.block_size, math.prod(topology.grid)
        perm = topology.layout.permutation(topology.grid)
        self.perm, self.inverse = perm, perm.argsort()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        check_self_attention_call(encoder_hidden_states, attention_mask, rotary_emb)
        if hidden_states.shape[1] != self.tokens:
            raise SaexportError(f"the topology was made for {self.tokens} tokens, the pipeline runs "
                                f"{hidden_states.shape[1]}: generate at the topology's resolution and frames")
        device = hidden_states.device
        if self.masks.topology.device != device:
            self.masks.to(device)
            self.perm, self.inverse = self.perm.to(device), self.inverse.to(device)
        cos, sin = rotary_emb  # diffusers' tables, full head width: one value per pair, as saexport's RoPE takes
        query, key, value = project_qkv(attn, hidden_states, (cos[..., 0::2], sin[..., 1::2]))
        query, key, value = (t[:, self.perm] for t in (query, key, value))
        step = self.scheduler.step_index or 0  # the loop's step: both guidance passes run before scheduler.step
        if step >= self.masks.budgets.shape[0]:  # the kernel would clamp it: refuse rather than reuse a budget
            raise SaexportError(f"the budgets are for {self.masks.budgets.shape[0]} steps; run the pipeline with "
                                f"num_inference_steps={self.masks.budgets.shape[0]}")
        out = torch.ops.saexport.block_sparse_attention(
            query, key, value, self.masks.topology, self.masks.budgets,
            torch.tensor([step], dtype=torch.int32, device=device), self.block_size,
            1.0 / math.sqrt(query.shape[-1]))
        out = out[:, self.inverse].flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


def apply(pipe, topology: Topology | str | Path, budgets: Budgets | str | Path):
    """Make `pipe` (a diffusers `WanPipeline`, or any pipeline with a Wan `transformer` and a `scheduler` that
    counts steps) run block-sparse self-attention with `topology`'s maps and `budgets`' per-step levels.

    Generate with `num_inference_steps` = the budgets' steps and the topology's video size. Returns `pipe`."""
    topology = topology if isinstance(topology, Topology) else Topology.load(topology)
    budgets = budgets if isinstance(budgets, Budgets) else Budgets.load(budgets)
    budgets.check_matches(topology)
    transformer = pipe.transformer
    found = config_hash(dict(transformer.config))
    if found != topology.config_hash:
        raise SaexportError(f"the topology was made for {topology.model} (config {topology.config_hash}); the "
                            f"pipeline's transformer has config {found}")
    for index, block in enumerate(transformer.blocks):
        masks = LayerMasks(pack_levels(topology.levels[index]), budgets.levels[:, index])
        block.attn1.set_processor(PipelineSparseSelfAttnProcessor(masks, topology, pipe.scheduler))
    return pipe
