"""data2vec 2.0 for audio (fairseq `Data2VecMultiModel`, audio modality only).

The student runs the conv feature encoder and projection once per utterance, then `clone_batch`
differently masked copies through the transformer, each seeing only its unmasked frames (the
positional convolution runs first, over the whole zero-masked sequence, so kept frames still carry
their context). A small conv decoder fills the masked positions with noise, restores the time
order and predicts every frame; the loss uses the masked ones. `Data2Vec2Encoder` (positional conv,
ALiBi scales, prenet LayerNorm, blocks) is what the EMA teacher copies; the teacher runs it on the
unmasked features of each utterance once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pretrain.config import ModelConfig
from pretrain.models.alibi import alibi_bias, alibi_slopes
from pretrain.models.decoder1d import Decoder1d
from pretrain.models.encoder import EncoderLayer, init_bert_params, run_blocks
from pretrain.models.feature_extractor import FeatureExtractor
from pretrain.models.masked_select import select_masked
from pretrain.models.ops import dropout
from pretrain.models.position import StackedPositionalConv
from pretrain.models.wav2vec2 import ConvFrontend


class AltBlock(EncoderLayer):
    """fairseq's `AltBlock` (post-LN): `EncoderLayer`, except that the MLP applies its dropout
    (`activation_dropout`) after fc2 as well, inside the FFN output that becomes a target."""

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(super()._ffn(x), self.activation_dropout, self.training)


class Data2Vec2Encoder(nn.Module):
    """Positional conv -> (gather kept frames) -> LayerNorm -> dropout -> prenet + main blocks, every
    block with the same ALiBi bias. Blocks are post-LN (fairseq `AltBlock` with layer_norm_first
    False computes what `EncoderLayer` does); there is no final LayerNorm."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        dim, heads = cfg.encoder_embed_dim, cfg.encoder_attention_heads
        self.pos_conv = StackedPositionalConv(dim, cfg.conv_pos, cfg.conv_pos_groups, cfg.pos_conv_depth)
        self.alibi_scale = nn.Parameter(torch.ones(heads))
        """Per-head multiplier of the ALiBi slopes, clamped at 0, shared by all blocks."""
        self.register_buffer("alibi_slopes", torch.tensor(alibi_slopes(heads)), persistent=False)
        self.layer_norm = nn.LayerNorm(dim)
        self.layers = nn.ModuleList(
            AltBlock(dim, cfg.encoder_ffn_embed_dim, heads, cfg.dropout, cfg.attention_dropout,
                     cfg.activation_dropout, layer_norm_first=False)
            for _ in range(cfg.prenet_depth + cfg.encoder_layers)
        )
        self.prenet_depth = cfg.prenet_depth
        self.dropout = cfg.dropout  # fairseq `prenet_dropout`, equal to the block dropouts in its recipes
        self.layerdrop = cfg.encoder_layerdrop  # and `prenet_layerdrop` equal to `layerdrop`
        self.activation_checkpointing = False
        for layer in self.layers:
            layer.apply(init_bert_params)

    def forward(
        self,
        x: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        layer_drop_draws: torch.Tensor | None = None,
        num_layers: int | None = None,
        return_ffn: bool = False,
        mask: torch.Tensor | None = None,
        keep: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """x: (N, T, D) projected features; padding_mask: (N, T) True at padding.

        With `mask` (N, T), masked frames are zeroed before the positional conv; with `keep`
        (N, T_keep) only those frames (taken from the unzeroed `x`) go through the blocks.
        `return_ffn` returns the main blocks' FFN outputs (data2vec targets); the prenet's are not.
        """
        if padding_mask is not None:
            x = x.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        pos = self.pos_conv(x if mask is None else x.masked_fill(mask.unsqueeze(-1), 0.0))
        if keep is None:
            x = x + pos
            positions = torch.arange(x.shape[1], device=x.device)
        else:
            index = keep.unsqueeze(-1).expand(-1, -1, x.shape[-1])
            x = x.gather(1, index) + pos.gather(1, index)
            positions = keep
            if padding_mask is not None:
                padding_mask = padding_mask.gather(1, keep)
        bias = alibi_bias(positions, self.alibi_slopes, self.alibi_scale, padding_mask)
        x = dropout(self.layer_norm(x), self.dropout, self.training)
        stop = len(self.layers) if num_layers is None else num_layers
        # the targets are the main blocks' FFN outputs: the prenet's are not collected
        return run_blocks(self, x, bias, layer_drop_draws, stop, self.prenet_depth if return_ffn else None)


@dataclass
class Data2Vec2Output:
    predictions: torch.Tensor
    """(M, D) decoder outputs at the masked frames of all clones (clone-major within utterances)."""
    teacher_input: torch.Tensor
    """(B, T, D) projected features of the un-cloned batch, detached: the teacher's input."""
    padding_mask: torch.Tensor | None
    encoder_out: torch.Tensor
    """(B * clone_batch, T_keep, D) the student's encoder output at its kept frames."""


class Data2Vec2Model(ConvFrontend, nn.Module):
    def __init__(self, cfg: ModelConfig, pretraining_heads: bool = True) -> None:
        """`pretraining_heads=False` leaves out the decoder (fine-tuning)."""
        super().__init__()
        self.cfg = cfg
        self.feature_extractor = FeatureExtractor(cfg.conv_feature_layers, cfg.extractor_mode, cfg.conv_bias)
        conv_dim = cfg.conv_feature_layers[-1][0]
        self.layer_norm = nn.LayerNorm(conv_dim)
        self.post_extract_proj = nn.Linear(conv_dim, cfg.encoder_embed_dim)  # PyTorch's default init
        self.encoder = Data2Vec2Encoder(cfg)
        if pretraining_heads:
            self.decoder = Decoder1d(cfg.encoder_embed_dim, cfg.decoder_dim, cfg.decoder_kernel,
                                     cfg.decoder_layers, cfg.decoder_groups)

    def apply_mask(self, x: torch.Tensor, mask_indices: torch.Tensor | None) -> torch.Tensor:
        """Fine-tuning: masked frames become N(0, mask_noise_std) noise (no learned embedding)."""
        if mask_indices is None:
            return x
        noise = torch.randn_like(x) * self.cfg.mask_noise_std
        return torch.where(mask_indices.unsqueeze(-1), noise, x)

    def forward(
        self,
        source: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        keep: torch.Tensor | None = None,
        layer_drop_draws: torch.Tensor | None = None,
        num_masked: int | None = None,
    ) -> Data2Vec2Output:
        """mask: (B * clone_batch, T) bool, rows utterance-major; keep: (B * clone_batch, T_keep)
        the frames each row encodes (`pretrain.objectives.block_mask`); num_masked: the mask's True
        count, known on the host (saves reading it back)."""
        front = self.frontend(source, padding_mask)
        clones = mask.shape[0] // front.features.shape[0]
        x = front.features.repeat_interleave(clones, 0)
        pad = None if front.padding_mask is None else front.padding_mask.repeat_interleave(clones, 0)
        enc, _ = self.encoder(x, pad, layer_drop_draws, mask=mask, keep=keep)
        # decoder input: kept frames back at their times, N(0, std) noise everywhere else
        y = dropout(enc, self.cfg.decoder_dropout, self.training)
        full = torch.randn(x.shape, device=y.device, dtype=y.dtype) * self.cfg.mask_noise_std
        full = full.scatter(1, keep.unsqueeze(-1).expand(-1, -1, y.shape[-1]), y)
        preds = select_masked(self.decoder(full), mask, num_masked)
        return Data2Vec2Output(preds, front.projected.detach(), front.padding_mask, enc)
