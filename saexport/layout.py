"""Token layouts: the order of latent tokens inside the DiT (docs/ARCHITECTURE.md, "Token layout").

Wan flattens tokens in raster order (frame, row, column), so a block of 128 tokens is a thin strip
of one frame. The `tile3d` layout orders tokens tile by tile, so that a block is a compact
space-time cube whose attention is more uniform and therefore easier to keep or drop whole.
Every op between patch embedding and the output head is token-wise, so a fixed permutation applied
after the embedding (and to the RoPE tables), undone before unpatchify, leaves the function unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from saexport.errors import SaexportError

DEFAULT_TILE = (2, 8, 8)  # 128 tokens: one GPU block


@dataclass(frozen=True)
class TokenLayout:
    name: str  # "identity" or "tile3d"
    tile: tuple[int, int, int] | None = None

    def permutation(self, grid: tuple[int, int, int]) -> torch.Tensor:
        """`perm` such that new token i is raster token `perm[i]` (int64 `[F*H*W]`)."""
        frames, height, width = grid
        raster = torch.arange(frames * height * width).view(frames, height, width)
        if self.name == "identity":
            return raster.flatten()
        tf, th, tw = self.tile  # type: ignore[misc]
        f, h, w = torch.meshgrid(
            torch.arange(frames), torch.arange(height), torch.arange(width), indexing="ij"
        )
        # Sort by (tile index in raster order of tiles, position inside the tile). Edge tiles may be
        # partial; the order stays a permutation for any grid.
        tiles_h, tiles_w = -(-height // th), -(-width // tw)
        tile_id = ((f // tf) * tiles_h + h // th) * tiles_w + w // tw
        inner = ((f % tf) * th + h % th) * tw + w % tw
        key = tile_id * (tf * th * tw) + inner
        return raster.flatten()[key.flatten().argsort()]

    def is_identity(self) -> bool:
        return self.name == "identity"

    def to_metadata(self) -> str:
        return self.name if self.tile is None else f"{self.name}:{'x'.join(map(str, self.tile))}"


def parse_layout(text: str) -> TokenLayout:
    """`identity`, `tile3d` (tile 2x8x8) or `tile3d:FxHxW`."""
    name, _, tile = text.partition(":")
    if name == "identity" and not tile:
        return TokenLayout("identity")
    if name == "tile3d":
        if not tile:
            return TokenLayout("tile3d", DEFAULT_TILE)
        try:
            dims = tuple(int(x) for x in tile.split("x"))
        except ValueError:
            dims = ()
        if len(dims) == 3 and all(d > 0 for d in dims):
            return TokenLayout("tile3d", dims)  # type: ignore[arg-type]
    raise SaexportError(f"unknown token layout '{text}'; use identity, tile3d or tile3d:FxHxW")
