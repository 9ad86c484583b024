"""Fine-tuning presets (fairseq `examples/wav2vec/config/finetuning/base_*.yaml`), one per labelled split.

The encoder architecture comes from the pretrained source (`--init-from`); a preset sets only
what fine-tuning decides: masking, dropout, LayerDrop, the frozen period, the schedule, the data.
"""

from __future__ import annotations

from typing import Callable

from .config import FinetuneConfig

PRESETS: dict[str, Callable[[], FinetuneConfig]] = {}


def preset(fn: Callable[[], FinetuneConfig]) -> Callable[[], FinetuneConfig]:
    PRESETS[fn.__name__] = fn
    return fn


def get_preset(name: str) -> FinetuneConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(sorted(PRESETS))}")
    cfg = PRESETS[name]()
    cfg.preset = name
    return cfg


def _shared() -> FinetuneConfig:
    """What every base_*.yaml shares: Adam (0.9, 0.98) eps 1e-8, tri-stage [0.1, 0.4, 0.5] ending at
    5% of the peak, 3.2M samples per GPU, padded batches, frozen conv stack, activation dropout 0.1,
    best checkpoint by dev-other WER."""
    c = FinetuneConfig()
    m = c.model
    m.feature_grad_mult = 0.0
    m.dropout = m.attention_dropout = m.dropout_input = 0.0
    m.activation_dropout = 0.1
    m.mask_prob, m.mask_length, m.mask_min_masks = 0.65, 10, 2
    c.ctc.mask_channel_length = 64
    d = c.data
    d.max_tokens, d.min_sample_size, d.max_sample_size, d.pad = 3_200_000, 0, None, True
    o = c.optim
    o.betas, o.eps, o.weight_decay = [0.9, 0.98], 1e-8, 0.0
    o.schedule, o.phase_ratio, o.init_lr_scale, o.final_lr_scale = "tri_stage", [0.1, 0.4, 0.5], 0.01, 0.05
    t = c.train
    t.valid_split = "dev-other"
    t.log_interval, t.valid_interval, t.save_interval = 200, 1000, 1000
    return c


def _limited(split: str, max_steps: int, channel_prob: float, layerdrop: float) -> FinetuneConfig:
    """10m / 1h / 10h: 2 GPUs x update_freq 4, lr 5e-5, encoder frozen for the first 10k updates."""
    c = _shared()
    c.model.encoder_layerdrop = layerdrop
    c.ctc.mask_channel_prob, c.ctc.freeze_finetune_updates = channel_prob, 10_000
    c.optim.lr = 5e-5
    c.train.max_steps, c.train.update_freq, c.train.train_split = max_steps, 4, split
    c.train.reference_batch = 8
    return c


@preset
def ctc_10m() -> FinetuneConfig:
    return _limited("train-10m", 13_000, 0.25, 0.1)


@preset
def ctc_1h() -> FinetuneConfig:
    return _limited("train-1h", 13_000, 0.25, 0.1)


@preset
def ctc_10h() -> FinetuneConfig:
    return _limited("train-10h", 20_000, 0.5, 0.05)


@preset
def ctc_100h() -> FinetuneConfig:
    """train-clean-100, 2 GPUs x 4, lr 3e-5, 80k updates, no frozen period."""
    c = _limited("train-clean-100", 80_000, 0.5, 0.1)
    c.ctc.freeze_finetune_updates = 0
    c.optim.lr = 3e-5
    return c


@preset
def ctc_960h() -> FinetuneConfig:
    """All of LibriSpeech, 8 GPUs x 1, lr 1e-4, 320k updates, lighter masking."""
    c = _shared()
    c.model.mask_prob, c.model.encoder_layerdrop = 0.5, 0.1
    c.ctc.mask_channel_prob = 0.1
    c.optim.lr = 1e-4
    c.train.max_steps, c.train.train_split, c.train.reference_batch = 320_000, "train", 8
    return c


@preset
def ctc_tiny() -> FinetuneConfig:
    """For the tiny pretrained models and the synthetic corpus (not a paper setting): train-1h
    (6 minutes of speech here), one process, a short frozen period, 100x the lr, and lighter
    masking so that the few hundred updates a CPU affords go into learning the letters.
    Checkpoints are ranked by CER: at this scale nearly every word is wrong, so WER cannot rank them."""
    c = ctc_1h()
    c.model.encoder_layerdrop, c.model.mask_prob = 0.0, 0.25
    c.ctc.mask_channel_prob, c.ctc.mask_channel_length = 0.1, 8
    c.ctc.freeze_finetune_updates, c.ctc.best_metric = 50, "cer"
    c.data.max_tokens, c.data.required_batch_size_multiple = 400_000, 1
    c.optim.lr = 5e-3
    t = c.train
    t.max_steps, t.update_freq, t.precision, t.reference_batch = 600, 1, "fp32", 0
    t.log_interval, t.valid_interval, t.save_interval = 50, 200, 200
    return c
