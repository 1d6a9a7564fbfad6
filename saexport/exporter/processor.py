"""The sparse self-attention processor: Wan's q/k/v exactly, then `saexport::block_sparse_attention`."""

from __future__ import annotations

import math

import torch

from saexport.exporter import sparse_attention  # noqa: F401  (registers the op)


class StepContext:
    """The denoising step of the forward pass in flight, shared by every layer's processor.

    Set by `SparseWanDiT.forward` before the blocks run: diffusers' blocks do not forward extra
    arguments to their attention processors.
    """

    step_index: torch.Tensor | None = None


class LayerMasks(torch.nn.Module):
    """One layer's packed INT32 topology `[heads, n, ceil(n/4)]` and budgets `[steps, heads]`.

    Buffers, so that `.to(device)` moves them and the ONNX exporter writes them as initializers.
    """

    def __init__(self, topology: torch.Tensor, budgets: torch.Tensor):
        super().__init__()
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
        out = torch.ops.saexport.block_sparse_attention(
            query, key, value, self.masks.topology, self.masks.budgets, self.context.step_index,
            self.block_size, 1.0 / math.sqrt(query.shape[-1]),
        )
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))
