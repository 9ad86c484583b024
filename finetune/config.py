"""Fine-tuning configuration: the pretraining sections plus a `ctc` section (fairseq `Wav2Vec2AsrConfig`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from pretrain.config import RunConfig


@dataclass
class CTCConfig:
    """What fine-tuning adds to a pretrained encoder."""

    freeze_finetune_updates: int = 0
    """Updates during which only the CTC head trains (the pretrained model runs under no_grad)."""
    apply_mask: bool = True
    """Time and channel masking during training (SpecAugment-like, on the encoder input)."""
    mask_channel_prob: float = 0.0
    mask_channel_length: int = 64
    final_dropout: float = 0.0
    """Dropout on the encoder output before the CTC projection."""
    best_metric: str = "wer"
    """Validation metric that picks `best.pt`: `wer` (fairseq), `cer` or `loss`."""
    labels: str = "ltr"
    """Label file extension next to each manifest (`.ltr`: letters with `|` word boundaries)."""
    init_from: str = ""
    """The pretrained source (our run or checkpoint, or a transformers directory); recorded, not re-read on resume."""
    symbols: list = field(default_factory=list)
    """The output vocabulary, index order (fairseq: `<s>` (the CTC blank), `<pad>`, `</s>`, `<unk>`, then dict.ltr.txt)."""


@dataclass
class FinetuneConfig(RunConfig):
    ctc: CTCConfig = field(default_factory=CTCConfig)

    @classmethod
    def from_dict(cls, d: dict) -> "FinetuneConfig":
        if "ctc" not in d:
            raise ValueError("not a fine-tuning configuration (no `ctc` section): this is a pretraining run")
        base = RunConfig.from_dict(d)
        return cls(**{f.name: getattr(base, f.name) for f in dataclasses.fields(RunConfig)}, ctc=CTCConfig(**d["ctc"]))


#: model fields a pretrained source decides; every other model field is the fine-tuning preset's
ARCHITECTURE_FIELDS = (
    "arch", "conv_feature_layers", "extractor_mode", "conv_bias", "encoder_layers", "encoder_embed_dim",
    "encoder_ffn_embed_dim", "encoder_attention_heads", "layer_norm_first", "conv_pos", "conv_pos_groups",
    "pos_conv_depth", "prenet_depth",
)
