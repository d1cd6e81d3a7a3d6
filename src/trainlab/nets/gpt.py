"""A small decoder-only Transformer (GPT): it reads a sequence of tokens and predicts, at every
position, the next one from those before it."""

import math
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt
from torch import nn


class GPT(nn.Module):
    """Token and position embeddings, `n_layer` pre-norm blocks of causal self-attention and an
    MLP, a final LayerNorm, and an output layer that shares its weights with the token embedding.

    forward(idx) maps (batch, time) token ids to (batch, time, vocab_size) logits; the logits at
    position t depend on idx[:, : t + 1] only.
    """

    def __init__(
        self,
        vocab_size: PositiveInt = 256,
        block_size: PositiveInt = 128,
        n_layer: PositiveInt = 4,
        n_head: PositiveInt = 4,
        n_embd: PositiveInt = 128,
        dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0,
    ):
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd={n_embd} must be a multiple of n_head={n_head}")
        self.block_size = block_size
        self.token_embedding = nn.Embedding(vocab_size, n_embd)
        self.position_embedding = nn.Embedding(block_size, n_embd)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout) for _ in range(n_layer))
        self.norm = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, vocab_size, bias=False)
        self.head.weight = self.token_embedding.weight  # tied: one matrix reads and writes tokens
        self.apply(_init_weights)
        # GPT-2's scaling of the layers that write into the residual stream, so that its
        # variance does not grow with depth
        for block in self.blocks:
            for layer in (block.attention.proj, block.mlp[2]):
                nn.init.normal_(layer.weight, std=0.02 / math.sqrt(2 * n_layer))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.block_size:
            raise ValueError(
                f"a sequence of {t} tokens is longer than block_size={self.block_size}"
            )
        positions = torch.arange(t, device=idx.device)
        x = self.dropout(self.token_embedding(idx) + self.position_embedding(positions))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Extend idx (batch, time) by max_new_tokens tokens, each drawn from the predicted
        distribution, sharpened by temperature < 1 and cut to the top_k most likely (top_k=1:
        always the most likely). Put the net in eval mode first, or dropout stays on."""
        for _ in range(max_new_tokens):
            # forward, not self(): eager even when the net is compiled, where each new length
            # of the context would compile again
            logits = self.forward(idx[:, -self.block_size :])[:, -1, :] / temperature
            if top_k is not None:
                values, indices = torch.topk(logits, min(top_k, logits.shape[-1]))
                logits = torch.full_like(logits, -math.inf).scatter(1, indices, values)
            probs = F.softmax(logits, dim=-1)
            idx = torch.cat([idx, torch.multinomial(probs, 1, generator=generator)], dim=1)
        return idx


class Block(nn.Module):
    """x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, n_embd: int, n_head: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(n_embd)
        self.attention = CausalSelfAttention(n_embd, n_head, dropout)
        self.norm2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(n_embd, 4 * n_embd),
            nn.GELU(),
            nn.Linear(4 * n_embd, n_embd),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which each position sees itself and the positions before."""

    def __init__(self, n_embd: int, n_head: int, dropout: float):
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.attention_dropout = dropout
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        # (b, t, 3c) -> three of (b, n_head, t, head size)
        q, k, v = self.qkv(x).view(b, t, 3, self.n_head, c // self.n_head).permute(2, 0, 3, 1, 4)
        dropout = self.attention_dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        return self.dropout(self.proj(y.transpose(1, 2).reshape(b, t, c)))


def _init_weights(module: nn.Module) -> None:
    # GPT-2's: small normal weights, zero biases; LayerNorms keep torch's ones and zeros
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
