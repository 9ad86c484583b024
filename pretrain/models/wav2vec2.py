"""wav2vec 2.0 (fairseq `Wav2Vec2Model`): conv features -> masked transformer -> contrastive logits.

The model returns tensors; the loss is computed by `pretrain.objectives.wav2vec2_loss`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.config import ModelConfig
from pretrain.models.encoder import TransformerEncoder
from pretrain.models.feature_extractor import FeatureExtractor
from pretrain.models.masked_select import padding_or_none, select_masked
from pretrain.models.ops import dropout
from pretrain.models.quantizer import GumbelQuantizer, QuantizerOutput


class GradMultiply(torch.autograd.Function):
    """Identity forward; gradient scaled by `scale` (fairseq `feature_grad_mult`)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


@dataclass
class Frontend:
    """Conv features and what the objectives need of them."""

    features: torch.Tensor
    """(B, T, D) projected, after dropout_input, before masking."""
    projected: torch.Tensor
    """(B, T, D) projected, before dropout_input (the data2vec teacher's input)."""
    unmasked: torch.Tensor
    """(B, T, C) LayerNormed conv features (quantizer input), after dropout_features."""
    features_pen: torch.Tensor
    padding_mask: torch.Tensor | None


@dataclass
class Wav2Vec2Output:
    logits: torch.Tensor | None
    """(B, M, 1 + K) fp32 cosine logits / logit_temp; the positive is index 0."""
    features_pen: torch.Tensor
    quantizer: QuantizerOutput | None
    encoder_out: torch.Tensor
    """(B, T, D) encoder output (every frame)."""
    padding_mask: torch.Tensor | None
    predictions: torch.Tensor | None = None
    """(B, M, F) final_proj of the masked frames."""
    targets: torch.Tensor | None = None
    """(B, M, F) project_q of the quantized masked frames."""


class ConvFrontend:
    """The conv feature encoder, its LayerNorm and projection, shared by every model: needs
    `cfg`, `feature_extractor`, `layer_norm` and `post_extract_proj` attributes."""

    def frame_padding_mask(self, padding_mask: torch.Tensor | None, num_frames: int) -> torch.Tensor | None:
        if padding_or_none(padding_mask) is None:
            return None
        lengths = self.feature_extractor.output_lengths((~padding_mask).long().sum(-1))
        return torch.arange(num_frames, device=padding_mask.device)[None, :] >= lengths[:, None]

    def frontend(self, source: torch.Tensor, padding_mask: torch.Tensor | None = None) -> Frontend:
        mult = self.cfg.feature_grad_mult
        if mult > 0:
            features = self.feature_extractor(source)
            if mult != 1.0 and torch.is_grad_enabled():
                features = GradMultiply.apply(features, mult)
        else:
            with torch.no_grad():
                features = self.feature_extractor(source)
        features_pen = features.float().pow(2).mean()
        features = self.layer_norm(features)
        unmasked = features
        if self.post_extract_proj is not None:
            features = self.post_extract_proj(features)
        return Frontend(
            features=dropout(features, self.cfg.dropout_input, self.training),
            projected=features,
            unmasked=dropout(unmasked, self.cfg.dropout_features, self.training),
            features_pen=features_pen,
            padding_mask=self.frame_padding_mask(padding_mask, features.shape[1]),
        )


class Wav2Vec2Model(ConvFrontend, nn.Module):
    def __init__(self, cfg: ModelConfig, pretraining_heads: bool = True) -> None:
        """`pretraining_heads=False` leaves out the quantizer and projections (fine-tuning)."""
        super().__init__()
        self.cfg = cfg
        self.feature_extractor = FeatureExtractor(cfg.conv_feature_layers, cfg.extractor_mode, cfg.conv_bias)
        conv_dim = cfg.conv_feature_layers[-1][0]
        dim = cfg.encoder_embed_dim
        self.layer_norm = nn.LayerNorm(conv_dim)
        # fairseq's wav2vec 2.0 skips the projection when the widths agree; Data2VecAudioModel always has it
        needs_proj = conv_dim != dim or cfg.arch == "data2vec"
        self.post_extract_proj = nn.Linear(conv_dim, dim) if needs_proj else None
        self._register_load_state_dict_pre_hook(_identity_projection_if_absent, with_module=True)
        self.mask_emb = nn.Parameter(torch.empty(dim).uniform_())
        self.encoder = TransformerEncoder(
            dim, cfg.encoder_ffn_embed_dim, cfg.encoder_layers, cfg.encoder_attention_heads,
            cfg.dropout, cfg.attention_dropout, cfg.activation_dropout, cfg.encoder_layerdrop,
            cfg.layer_norm_first, cfg.conv_pos, cfg.conv_pos_groups, cfg.pos_conv_depth,
        )
        if cfg.arch == "wav2vec2" and pretraining_heads:
            vq_dim = cfg.latent_dim or cfg.final_dim
            self.quantizer = GumbelQuantizer(conv_dim, cfg.latent_vars, cfg.latent_groups, vq_dim)
            self.project_q = nn.Linear(vq_dim, cfg.final_dim)
            self.final_proj = nn.Linear(dim, cfg.final_dim)

    def apply_mask(self, x: torch.Tensor, mask_indices: torch.Tensor | None) -> torch.Tensor:
        if mask_indices is None:
            return x
        return torch.where(mask_indices.unsqueeze(-1), self.mask_emb.to(x.dtype), x)

    # -- wav2vec 2.0 -----------------------------------------------------------------------------
    def forward(
        self,
        source: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        mask_indices: torch.Tensor | None = None,
        negatives: torch.Tensor | None = None,
        layer_drop_draws: torch.Tensor | None = None,
    ) -> Wav2Vec2Output:
        """mask_indices: (B, T) bool with the same count per row; negatives: (B, M, K) indices
        into each row's masked frames (see `pretrain.objectives.masking`). Without them, only the encoder runs."""
        front = self.frontend(source, padding_mask)
        x = self.apply_mask(front.features, mask_indices)
        x, _ = self.encoder(x, front.padding_mask, layer_drop_draws)
        if mask_indices is None or negatives is None:
            return Wav2Vec2Output(None, front.features_pen, None, x, front.padding_mask)
        b, m = negatives.shape[:2]  # every row has m masked frames; counted on the host, not read back
        y = select_masked(front.unmasked, mask_indices, b * m).view(b, m, -1)
        q = self.quantizer(y)
        targets = self.project_q(q.x)
        preds = self.final_proj(select_masked(x, mask_indices, b * m).view(b, m, -1))
        logits = contrastive_logits(preds, targets, negatives, self.cfg.logit_temp)
        return Wav2Vec2Output(logits, front.features_pen, q, x, front.padding_mask, preds, targets)

    def set_num_updates(self, step: int) -> None:
        """Anneal the Gumbel temperature: max(start * decay**step, end)."""
        if hasattr(self, "quantizer"):
            start, end, decay = self.cfg.latent_temp
            self.quantizer.temperature = max(start * decay**step, end)


def contrastive_logits(
    preds: torch.Tensor, targets: torch.Tensor, negatives: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Cosine similarity of each prediction with its target and K distractors, / temperature.

    Distractors of utterance b are other rows of targets[b], so all similarities within an
    utterance come from one (M x M) matrix instead of gathering K vectors per frame. A distractor
    identical to the positive gets -inf (fairseq compares the vectors exactly).
    """
    # Autocast would run the bmm in bf16/fp16: 3 significant digits, times 1 / logit_temp, is too
    # coarse for logits that differ by little (fairseq takes the cosine in fp32 as well).
    with torch.autocast(preds.device.type, enabled=False):
        p = F.normalize(preds.float(), dim=-1, eps=1e-8)
        t = F.normalize(targets.float(), dim=-1, eps=1e-8)
        sim = torch.bmm(p, t.transpose(1, 2))  # (B, M, M): sim[b, i, j] = cos(pred_i, target_j)
    pos = sim.diagonal(dim1=1, dim2=2).unsqueeze(-1)
    neg = torch.gather(sim, 2, negatives)
    logits = torch.cat([pos, neg], dim=-1) / temperature
    with torch.no_grad():
        same = _identical_rows(targets, negatives)
    return logits.masked_fill(torch.cat([torch.zeros_like(same[..., :1]), same], dim=-1), float("-inf"))


def _identical_rows(targets: torch.Tensor, negatives: torch.Tensor, dense: bool | None = None) -> torch.Tensor:
    """(B, M, K) True where targets[b, negatives[b, m, k]] == targets[b, m] exactly. `dense`
    (default: off the CPU) compares every pair: picking candidates out would stall a GPU."""
    b, m, k = negatives.shape
    flat = targets.reshape(b * m, -1)
    rows = (torch.arange(b, device=negatives.device)[:, None, None] * m + negatives).reshape(-1)
    own = torch.arange(b * m, device=negatives.device).repeat_interleave(k)
    fingerprint = flat.float().sum(-1)
    if flat.device.type != "cpu" if dense is None else dense:
        return ((fingerprint[rows] == fingerprint[own]) & (flat[rows] == flat[own]).all(-1)).view(b, m, k)
    # CPUs: compare a cheap fingerprint first, then only the candidate pairs element by element
    cand = (fingerprint[rows] == fingerprint[own]).nonzero(as_tuple=True)[0]
    same = torch.zeros(b * m * k, dtype=torch.bool, device=negatives.device)
    if len(cand):
        same[cand] = (flat[rows[cand]] == flat[own[cand]]).all(-1)
    return same.view(b, m, k)


def _identity_projection_if_absent(module: Wav2Vec2Model, state: dict, prefix: str, *args) -> None:
    """A state dict saved without `post_extract_proj` (equal widths: older data2vec checkpoints, or a
    transformers identity projection that the import dropped) loads as the identity, which is
    exactly the function it computed."""
    proj = module.post_extract_proj
    if proj is None or f"{prefix}post_extract_proj.weight" in state or f"{prefix}layer_norm.weight" not in state:
        return
    if proj.in_features == proj.out_features:
        state[f"{prefix}post_extract_proj.weight"] = torch.eye(proj.in_features)
        state[f"{prefix}post_extract_proj.bias"] = torch.zeros(proj.out_features)
