"""DINO's ViT-B/8 on torchvision's VisionTransformer at any input size (imported only to build ``dino_vitb8``:
torchvision costs seconds to import, and running a bundle's export needs none of it)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torchvision import models

from tasks.features.weights import BackboneError


class AnySizeViT(models.VisionTransformer):
    """torchvision's ViT for any input size that is a multiple of the patch size (torchvision's asserts
    224): the 28x28 positional embeddings are interpolated bicubically the way DINO's release does it
    (``interpolate_pos_encoding``), so dino_vitb8 runs at any ``transforms.input_height/width``, as the
    reference's torch.hub model does. At 224x224 nothing is interpolated (the plain ViT forward)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.encoder.ln(self.encoder.layers(self.encoder.dropout(self.embed(x))))
        return self.heads(x[:, 0])

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The token sequence (B, 1 + patches, hidden) entering the first block: CLS token, patch embeddings and
        the positions for this input size."""
        # exports trace one fixed size (model.json's input_size); the batch stays free
        h, w = int(x.shape[2]), int(x.shape[3])
        p = self.patch_size
        if h % p or w % p:
            raise BackboneError(
                f"dino_vitb8 needs an input size that is a multiple of {p}, got {h}x{w}; "
                f"set transforms.input_height/input_width to multiples of {p} (e.g. 224)"
            )
        x = self.conv_proj(x).flatten(2).transpose(1, 2)  # (B, tokens, hidden)
        return torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1) + self._positions(h // p, w // p)

    def _positions(self, gh: int, gw: int) -> torch.Tensor:
        pos = self.encoder.pos_embedding
        side = round(math.sqrt(pos.shape[1] - 1))
        if (gh, gw) == (side, side):
            return pos
        grid = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        # DINO's +0.1 keeps floor(side * scale) at exactly (gh, gw) despite float rounding
        grid = nn.functional.interpolate(grid, scale_factor=((gh + 0.1) / side, (gw + 0.1) / side), mode="bicubic")
        return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)], dim=1)
