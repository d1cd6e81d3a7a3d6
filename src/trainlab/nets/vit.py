from typing import Annotated

import torch
from pydantic import Field, PositiveInt
from torch import nn

from trainlab.engine import UserError


class ViT(nn.Module):
    """A small Vision Transformer: non-overlapping patches embedded by a strided conv, a class
    token, learned position embeddings, a pre-norm Transformer encoder with GELU, and a linear
    head on the class token's final LayerNorm-ed state.
    """

    def __init__(
        self,
        input_shape: list[PositiveInt],
        num_classes: PositiveInt,
        patch_size: PositiveInt = 4,
        dim: PositiveInt = 64,
        depth: PositiveInt = 4,
        heads: PositiveInt = 4,
        mlp_ratio: Annotated[float, Field(gt=0)] = 4.0,
        dropout: Annotated[float, Field(ge=0, lt=1)] = 0.1,
    ):
        super().__init__()
        channels, height, width = input_shape
        if height % patch_size or width % patch_size:
            fits = [p for p in range(2, min(height, width) + 1) if not height % p and not width % p]
            raise UserError(
                f"model.net.patch_size={patch_size} does not tile {height}x{width} images "
                f"into whole patches: choose one of {', '.join(map(str, fits))}."
            )
        if dim % heads:
            raise UserError(
                f"model.net.dim={dim} must split evenly across model.net.heads={heads}: "
                "choose a dim that is a multiple of heads."
            )
        self.num_patches = (height // patch_size) * (width // patch_size)
        self.patch_embed = nn.Conv2d(channels, dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.empty(1, self.num_patches + 1, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        layer = nn.TransformerEncoderLayer(
            dim,
            heads,
            dim_feedforward=int(dim * mlp_ratio),
            dropout=dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        # nested tensors only speed up padded batches, and pre-norm layers cannot use them
        self.encoder = nn.TransformerEncoder(
            layer, depth, norm=nn.LayerNorm(dim), enable_nested_tensor=False
        )
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embed(x).flatten(2).transpose(1, 2)  # [N, patches, dim]
        cls = self.cls_token.expand(len(x), -1, -1)
        tokens = torch.cat([cls, patches], dim=1) + self.pos_embed
        return self.head(self.encoder(tokens)[:, 0])
