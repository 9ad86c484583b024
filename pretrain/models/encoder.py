"""Transformer encoder of wav2vec 2.0 / data2vec (fairseq `TransformerEncoder`).

Attention runs through `scaled_dot_product_attention` (flash / memory-efficient kernels where
available; see `pretrain.models.ops` for CPUs) with one fused input projection. Each layer also returns its FFN output before
dropout and residual: data2vec builds its targets from those.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pretrain.models import layerdrop
from pretrain.models.compiled import compiled_block
from pretrain.models.masked_select import padding_or_none
from pretrain.models.ops import dropout, self_attention
from pretrain.models.position import make_positional_conv


def init_bert_params(module: nn.Module) -> None:
    """fairseq's `init_bert_params` for linear layers: N(0, 0.02), zero bias."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"encoder_embed_dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.dropout = dropout
        self.qkv_proj = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        y = self_attention(self.qkv_proj(x), self.num_heads, attn_mask, self.dropout, self.training)
        return self.out_proj(y)


class EncoderLayer(nn.Module):
    use_compiled = False
    """Run through the shared `torch.compile` graph (`train.compile`; see `pretrain.models.compiled`)."""

    def __init__(
        self,
        dim: int,
        ffn_dim: int,
        num_heads: int,
        dropout: float,
        attention_dropout: float,
        activation_dropout: float,
        layer_norm_first: bool,
    ) -> None:
        super().__init__()
        self.self_attn = SelfAttention(dim, num_heads, attention_dropout)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim)
        self.dropout = dropout
        self.activation_dropout = activation_dropout
        self.layer_norm_first = layer_norm_first

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.fc1(x))
        return self.fc2(dropout(x, self.activation_dropout, self.training))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (output, FFN output before dropout and residual)."""
        if self.use_compiled and not torch.compiler.is_compiling():
            return compiled_block()(self, x, attn_mask)  # which calls back here, traced
        if self.layer_norm_first:
            x = x + dropout(self.self_attn(self.self_attn_layer_norm(x), attn_mask), self.dropout, self.training)
            ffn = self._ffn(self.final_layer_norm(x))
            x = x + dropout(ffn, self.dropout, self.training)
        else:
            x = self.self_attn_layer_norm(x + dropout(self.self_attn(x, attn_mask), self.dropout, self.training))
            ffn = self._ffn(x)
            x = self.final_layer_norm(x + dropout(ffn, self.dropout, self.training))
        return x, ffn


class TransformerEncoder(nn.Module):
    def __init__(
        self,
        dim: int,
        ffn_dim: int,
        num_layers: int,
        num_heads: int,
        dropout: float,
        attention_dropout: float,
        activation_dropout: float,
        layerdrop: float,
        layer_norm_first: bool,
        conv_pos: int,
        conv_pos_groups: int,
        pos_conv_depth: int = 1,
    ) -> None:
        super().__init__()
        self.pos_conv = make_positional_conv(dim, conv_pos, conv_pos_groups, pos_conv_depth)
        self.layer_norm = nn.LayerNorm(dim)
        self.layers = nn.ModuleList(
            EncoderLayer(dim, ffn_dim, num_heads, dropout, attention_dropout, activation_dropout, layer_norm_first)
            for _ in range(num_layers)
        )
        self.dropout = dropout
        self.layerdrop = layerdrop
        self.layer_norm_first = layer_norm_first
        self.activation_checkpointing = False
        """Recompute each layer's activations in the backward pass instead of keeping them
        (`train.activation_checkpointing`; set by the trainer)."""
        for layer in self.layers:
            layer.apply(init_bert_params)

    def forward(
        self,
        x: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        layer_drop_draws: torch.Tensor | None = None,
        num_layers: int | None = None,
        return_ffn: bool = False,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """x: (B, T, C); padding_mask: (B, T) True at padding.

        `num_layers` stops after that many layers (feature extraction from an inner layer);
        `layer_drop_draws` are uniform draws, one per layer (LayerDrop skips layer i when its
        draw is below `layerdrop`); with `return_ffn` the FFN outputs of the layers that ran are
        returned as well.
        """
        attn_mask = None
        padding_mask = padding_or_none(padding_mask)
        if padding_mask is not None:
            x = x.masked_fill(padding_mask.unsqueeze(-1), 0.0)
            attn_mask = (~padding_mask)[:, None, None, :]
        x = x + self.pos_conv(x)
        if not self.layer_norm_first:
            x = self.layer_norm(x)
        x = dropout(x, self.dropout, self.training)
        stop = len(self.layers) if num_layers is None else num_layers
        x, ffn_outputs = run_blocks(self, x, attn_mask, layer_drop_draws, stop, 0 if return_ffn else None)
        if self.layer_norm_first and stop == len(self.layers):
            x = self.layer_norm(x)
        return x, ffn_outputs


def run_blocks(
    encoder: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None, draws: torch.Tensor | None,
    stop: int, collect_from: int | None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Blocks 0..stop-1 of `encoder` (which has `layers`, `layerdrop`, `activation_checkpointing`)
    with LayerDrop and per-block activation checkpointing. Returns x and the FFN outputs of the
    blocks that ran, from block `collect_from` on (None: none)."""
    ffn_outputs: list[torch.Tensor] = []
    drops = layerdrop.plan(encoder, draws, stop)  # ranks agree under FSDP (see there)
    for i, layer in enumerate(encoder.layers[:stop]):
        if drops[i] != layerdrop.RUN:
            if drops[i] == layerdrop.GHOST:
                x = x + layerdrop.ghost(layer, x, attn_mask)
            continue
        if encoder.activation_checkpointing and encoder.training and torch.is_grad_enabled():
            # non-reentrant: works with DDP and with layers LayerDrop skips (no grad-less inputs
            # trick); the RNG state is replayed, so the recomputed dropout masks are the same
            x, ffn = checkpoint(layer, x, attn_mask, use_reentrant=False)
        else:
            x, ffn = layer(x, attn_mask)
        if collect_from is not None and i >= collect_from:
            ffn_outputs.append(ffn)
    return x, ffn_outputs


def set_activation_checkpointing(model: nn.Module, enabled: bool) -> None:
    """Turn per-layer activation checkpointing on or off in every transformer encoder of `model`."""
    for module in model.modules():
        if hasattr(module, "activation_checkpointing"):  # TransformerEncoder, Data2Vec2Encoder
            module.activation_checkpointing = enabled
