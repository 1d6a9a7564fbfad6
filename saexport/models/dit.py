"""The Wan2.1 DiT as saexport runs it, for one static token grid: `WanDiT` (dense self-attention, or probed for
calibration) and `SparseWanDiT` (frozen block-sparse self-attention, what is exported).

The forward pass is diffusers' `WanTransformer3DModel.forward` for text-to-video, top to bottom,
with four changes that the exported graph needs:
- `step_index` is an input, read by every layer's sparse attention to pick its budgets;
- the token layout's permutation is applied after patch embedding and undone after the output
  projection; the RoPE tables are permuted alike;
- the RoPE tables are fp32 buffers for the static grid (diffusers builds them in float64, which
  TensorRT does not support, on every call);
- the patch embedding (a Conv3d whose stride equals its kernel) runs as the matrix product it is:
  ONNX's Conv has no bfloat16 before opset 22, MatMul has.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from diffusers import WanTransformer3DModel

from saexport.errors import SaexportError
from saexport.layout import TokenLayout
from saexport.levels import pack_levels
from saexport.models.processors import (
    DenseSelfAttnProcessor,
    LayerMasks,
    MassCallback,
    ProbedSelfAttnProcessor,
    SparseSelfAttnProcessor,
    StepContext,
)


def rope_tables(transformer: WanTransformer3DModel, grid: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair cos/sin `[1, L, 1, head_dim/2]` (fp32, raster order), from diffusers' own RoPE."""
    pt, ph, pw = transformer.config.patch_size
    frames, height, width = grid
    if max(grid) > transformer.config.rope_max_seq_len:
        raise SaexportError(f"the token grid {tuple(grid)} is longer on an axis than the model's RoPE tables "
                            f"(rope_max_seq_len {transformer.config.rope_max_seq_len} in its config): choose a smaller "
                            "`resolution` or `frames`")
    shape_probe = torch.empty(1, 1, frames * pt, height * ph, width * pw)  # the RoPE reads only its shape
    cos, sin = transformer.rope.to("cpu")(shape_probe)
    return cos[..., 0::2].float().contiguous(), sin[..., 1::2].float().contiguous()


def patch_embed(conv: torch.nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """`conv(x).flatten(2).transpose(1, 2)` for a non-overlapping Conv3d, as one matrix product."""
    batch, channels, frames, height, width = x.shape
    pt, ph, pw = conv.kernel_size
    patches = x.reshape(batch, channels, frames // pt, pt, height // ph, ph, width // pw, pw)
    patches = patches.permute(0, 2, 4, 6, 1, 3, 5, 7).flatten(4).flatten(1, 3)  # [batch, tokens, C*pt*ph*pw]
    return patches @ conv.weight.flatten(1).t() + conv.bias


def latent_shape(transformer: WanTransformer3DModel, grid: tuple[int, int, int]) -> tuple[int, int, int, int]:
    """`[channels, frames, height, width]` of the transformer's latents whose tokens form `grid`."""
    pt, ph, pw = transformer.config.patch_size
    return (transformer.config.in_channels, grid[0] * pt, grid[1] * ph, grid[2] * pw)


class Conditioning(NamedTuple):
    """What conditions every block of one forward pass."""

    temb: torch.Tensor  # [batch, dim]: the timestep embedding (the output norm's shift and scale)
    timestep_proj: torch.Tensor  # [batch, 6, dim]: the blocks' shifts, scales and gates
    text: torch.Tensor  # [batch, text_len, dim]: the projected text embeddings


class WanDiT(torch.nn.Module):
    """The DiT for `grid` in `layout`, with dense self-attention until `probe` or a subclass installs another."""

    def __init__(self, transformer: WanTransformer3DModel, grid: tuple[int, int, int], layout: TokenLayout):
        super().__init__()
        self.transformer = transformer
        self.grid = tuple(grid)
        self.layout = layout
        self.context = StepContext()
        for block in transformer.blocks:
            block.attn1.set_processor(DenseSelfAttnProcessor())

        perm = layout.permutation(self.grid)
        cos, sin = rope_tables(transformer, self.grid)
        self.register_buffer("rope_cos", cos[:, perm].contiguous(), persistent=False)
        self.register_buffer("rope_sin", sin[:, perm].contiguous(), persistent=False)
        self.register_buffer("perm", perm, persistent=False)
        self.register_buffer("inverse_perm", perm.argsort(), persistent=False)

    def probe(self, rows: torch.Tensor, block_size: int, on_masses: MassCallback) -> WanDiT:
        """Hand every self-attention layer's block masses of the query `rows` (token positions in the layout's
        order) to `on_masses` during each forward pass; attention stays dense."""
        for layer, block in enumerate(self.transformer.blocks):
            block.attn1.set_processor(ProbedSelfAttnProcessor(layer, rows, block_size, on_masses))
        return self

    def latent_shape(self) -> tuple[int, int, int, int]:
        """`[channels, frames, height, width]` of the latents whose tokens form the grid."""
        return latent_shape(self.transformer, self.grid)


    def forward(
        self,
        hidden_states: torch.Tensor,  # latents [batch, in_channels, frames, height, width]
        timestep: torch.Tensor,  # fp32 [batch]
        encoder_hidden_states: torch.Tensor,  # text embeddings [batch, text_len, text_dim]
        step_index: torch.Tensor,  # int32 [1]
    ) -> torch.Tensor:
        tokens, conditioning = self.embed(hidden_states, timestep, encoder_hidden_states, step_index)
        tokens = self.run_blocks(tokens, conditioning, (self.rope_cos, self.rope_sin))
        return self.unembed(tokens, conditioning)

    def embed(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
              step_index: torch.Tensor) -> tuple[torch.Tensor, Conditioning]:
        """The forward pass up to the blocks: tokens `[batch, L, dim]` in the layout's order, and what conditions
        every block. (Split out of `forward` so that a sequence-parallel DiT runs the blocks on a shard.)"""
        model = self.transformer
        _, _, num_frames, height, width = hidden_states.shape
        p_t, p_h, p_w = model.config.patch_size
        grid = (num_frames // p_t, height // p_h, width // p_w)
        if grid != self.grid:
            raise ValueError(f"latents of token grid {grid} given to a DiT built for {self.grid}")
        self.context.step_index = step_index

        hidden_states = patch_embed(model.patch_embedding, hidden_states)
        if not self.layout.is_identity():
            hidden_states = hidden_states[:, self.perm]
        hidden_states = hidden_states.contiguous()

        temb, timestep_proj, encoder_hidden_states, _ = model.condition_embedder(timestep, encoder_hidden_states)
        return hidden_states, Conditioning(temb, timestep_proj.unflatten(1, (6, -1)), encoder_hidden_states)

    def run_blocks(self, tokens: torch.Tensor, conditioning: Conditioning,
                   rotary_emb: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """The transformer blocks over `tokens` `[batch, tokens, dim]` with their RoPE tables `rotary_emb`."""
        for block in self.transformer.blocks:
            tokens = block(tokens, conditioning.text, conditioning.timestep_proj, rotary_emb)
        return tokens

    def unembed(self, tokens: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        """The forward pass after the blocks: all tokens `[batch, L, dim]` -> the noise prediction, latents' shape."""
        model = self.transformer
        p_t, p_h, p_w = model.config.patch_size
        shift, scale = (model.scale_shift_table + conditioning.temb.unsqueeze(1)).chunk(2, dim=1)
        hidden_states = (model.norm_out(tokens.float()) * (1 + scale) + shift).type_as(tokens)
        hidden_states = model.proj_out(hidden_states)
        if not self.layout.is_identity():
            hidden_states = hidden_states[:, self.inverse_perm]

        frames, rows, cols = self.grid
        hidden_states = hidden_states.reshape(tokens.shape[0], frames, rows, cols, p_t, p_h, p_w, -1)
        hidden_states = hidden_states.permute(0, 7, 1, 4, 2, 5, 3, 6)
        return hidden_states.flatten(6, 7).flatten(4, 5).flatten(2, 3)


class SparseWanDiT(WanDiT):
    def __init__(
        self,
        transformer: WanTransformer3DModel,
        grid: tuple[int, int, int],
        layout: TokenLayout,
        topology_levels: torch.Tensor,  # uint8 [layers, heads, n, n], in the layout's token order
        budget_levels: torch.Tensor,  # uint8 [steps, layers, heads], or [steps, layers, samples, heads]: per sample
        block_size: int,
    ):
        super().__init__(transformer, grid, layout)
        layers = len(transformer.blocks)
        if topology_levels.shape[:2] != (layers, transformer.config.num_attention_heads):
            raise ValueError(f"topology covers {tuple(topology_levels.shape[:2])} layers x heads, the model "
                             f"{(layers, transformer.config.num_attention_heads)}")
        self.block_size = block_size
        self.masks = torch.nn.ModuleList(
            LayerMasks(pack_levels(topology_levels[i]), budget_levels[:, i]) for i in range(layers)
        )
        for block, masks in zip(transformer.blocks, self.masks, strict=True):
            block.attn1.set_processor(SparseSelfAttnProcessor(masks, self.context, block_size))
