"""Typed configuration: model, optimisation and training settings, named presets, checked overrides."""

from __future__ import annotations

import ast
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field

from data_prep.loader import LoaderConfig

BASE_CONV = [(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] * 2


@dataclass
class ModelConfig:
    """Architecture and objective (fairseq `Wav2Vec2Config` / `Data2VecAudioConfig` names)."""

    arch: str = "wav2vec2"
    """`wav2vec2` (contrastive, quantized targets), `data2vec` (EMA teacher regression) or `data2vec2`
    (data2vec 2.0: the student encodes only unmasked frames, several masks per teacher pass)."""
    conv_feature_layers: list = field(default_factory=lambda: list(BASE_CONV))
    """(dim, kernel, stride) per conv layer; the default downsamples 320x (49 frames/s)."""
    extractor_mode: str = "default"
    """`default`: GroupNorm in the first conv only; `layer_norm`: LayerNorm in every conv."""
    conv_bias: bool = False
    feature_grad_mult: float = 0.1
    """Scales the gradient into the conv stack (0 freezes it)."""
    encoder_layers: int = 12
    encoder_embed_dim: int = 768
    encoder_ffn_embed_dim: int = 3072
    encoder_attention_heads: int = 12
    """12 for BASE (the paper says 8; the code and released checkpoint use 12)."""
    layer_norm_first: bool = False
    """Pre-LN transformer (LARGE-LV60k); False is post-LN (BASE, LARGE LS-960, data2vec)."""
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.0
    encoder_layerdrop: float = 0.05
    dropout_input: float = 0.1
    dropout_features: float = 0.1
    conv_pos: int = 128
    """Positional conv kernel (data2vec: total kernel split over `pos_conv_depth` layers)."""
    conv_pos_groups: int = 16
    pos_conv_depth: int = 1
    latent_vars: int = 320
    """Codebook entries per group."""
    latent_groups: int = 2
    latent_dim: int = 0
    """Quantized vector size before `project_q` (0: `final_dim`)."""
    final_dim: int = 256
    latent_temp: list = field(default_factory=lambda: [2.0, 0.5, 0.999995])
    """Gumbel temperature (start, end, decay per update)."""
    logit_temp: float = 0.1
    num_negatives: int = 100
    mask_prob: float = 0.65
    mask_length: int = 10
    mask_min_masks: int = 2
    diversity_weight: float = 0.1
    feature_pen_weight: float = 10.0
    # data2vec (fairseq `Data2VecAudioConfig`)
    average_top_k_layers: int = 8
    """Teacher layers whose FFN outputs are averaged into the target."""
    instance_norm_target_layer: bool = True
    loss_beta: float = 0.0
    """0: L2 loss; > 0: smooth L1 with this beta."""
    loss_scale: float = 0.0
    """Loss multiplier (0: 1 / sqrt(encoder_embed_dim), fairseq's default)."""
    ema_decay: float = 0.999
    """Teacher EMA decay at update 0, annealed linearly to `ema_end_decay` by `ema_anneal_end_step`.
    The teacher takes one EMA step per optimizer update, whatever `train.update_freq` is. fairseq
    steps it once per micro-batch (its `set_num_updates` runs in every `train_step`), so with
    update_freq F > 1 fairseq's teacher moves F times per update; ours reproduces the reference
    run (16 GPUs x update_freq 1) on fewer GPUs instead."""
    ema_end_decay: float = 0.9999
    ema_anneal_end_step: int = 30_000
    min_target_var: float = 0.1
    min_pred_var: float = 0.01
    collapse_check_after: int = 5_000
    """Updates after which target / prediction variance below the minimum stops the run."""
    # data2vec 2.0 (fairseq `Data2VecMultiConfig`, audio modality); its teacher uses the fields above
    prenet_depth: int = 0
    """Blocks before the `encoder_layers` main ones; their outputs are not targets (large: 8)."""
    clone_batch: int = 8
    """Differently masked copies of each utterance per teacher pass."""
    mask_prob_adjust: float = 0.05
    """Extra span centres drawn to make up for overlapping spans (rows are then cut to mask_prob)."""
    mask_exact_after_crop: bool = False
    """fairseq crops each utterance's mask rows to the batch with their own offset, so rows of a
    cropped utterance no longer have int(T * mask_prob) masked frames, and its model then keeps row 0's
    count of frames in every row: up to a few masked frames reach the student with their content
    while still being targets. False keeps that (what the released models saw); True re-counts the
    rows after cropping."""
    mask_noise_std: float = 0.01
    """Masked positions enter the decoder (and, fine-tuning, the encoder) as N(0, std) noise."""
    decoder_dim: int = 384
    decoder_kernel: int = 7
    decoder_layers: int = 4
    decoder_groups: int = 16
    decoder_dropout: float = 0.1
    """Dropout on the encoder output before the decoder (fairseq `input_dropout`)."""


@dataclass
class OptimConfig:
    """Adam with decoupled weight decay and a learning-rate schedule (fairseq names)."""

    lr: float = 5e-4
    betas: list = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    weight_decay: float = 0.01
    clip_norm: float = 0.0
    """Gradient-norm clipping (0: off, as in wav2vec 2.0 pretraining)."""
    decay_all: bool = True
    """Weight decay on every parameter. fairseq's data2vec 2.0 marks biases, norms and the ALiBi
    scales for no decay, but its optimizers never read the mark, so the released models had decay
    on all of them; false leaves 1-D parameters undecayed, as that code intended."""
    schedule: str = "polynomial_decay"
    """`polynomial_decay` (linear warm-up, then decay to `end_lr`), `tri_stage` or `cosine`
    (linear warm-up from 0, then half a cosine to 0 at `train.max_steps`)."""
    warmup_updates: int = 32_000
    end_lr: float = 0.0
    power: float = 1.0
    phase_ratio: list = field(default_factory=lambda: [0.03, 0.9, 0.07])
    """tri_stage: warm-up, hold and decay fractions of `train.max_steps`."""
    init_lr_scale: float = 0.01
    final_lr_scale: float = 0.01


#: `train.precision` values: autocast dtypes, plus fp32 for none
PRECISIONS = ("fp32", "bf16", "fp16")
#: `train.parallelism` values: how the model is spread over several ranks
PARALLELISMS = ("ddp", "fsdp")


@dataclass
class TrainConfig:
    max_steps: int = 400_000
    """Optimizer updates (fairseq `max_update`); the schedule is laid out over this many."""
    update_freq: int = 1
    """Micro-batches accumulated per update (simulates update_freq x more GPUs)."""
    precision: str = "fp16"
    """One of `PRECISIONS`: `fp16` (dynamic loss scaling), `bf16` or `fp32`; on a CPU, fp16 falls back to fp32."""
    bf16_for_fp16: bool = True
    """On a GPU with bf16 (Ampere and later), train a run set to fp16 (fairseq's recipes, written for
    V100s) in bf16: as fast, with no loss scaling and no overflow skips. false keeps fp16."""
    fp16_init_scale: float = 128.0
    seed: int = 1
    log_interval: int = 200
    valid_interval: int = 10_000
    save_interval: int = 25_000
    keep_last: int = 3
    max_bad_steps: int = 20
    """Consecutive non-finite steps after which the run stops."""
    train_split: str = "train"
    valid_split: str = "valid"
    max_valid_batches: int = 0
    """Cap on validation batches (0: the whole split)."""
    activation_checkpointing: bool = False
    """Recompute each transformer layer's activations in the backward pass instead of storing them:
    less memory (a larger batch fits) for about a third more compute; gradients are unchanged."""
    compile: bool = False
    """Run the transformer blocks (student, teacher, CTC encoder) as `torch.compile` graphs with
    symbolic batch and time sizes: one compile serves every layer and batch length
    (`pretrain.models.compiled`). Needs inductor: a C++ compiler on CPUs, Triton on GPUs."""
    reference_batch: int = 0
    """GPUs x update_freq of the published recipe (0: none); a run with another product is warned."""
    parallelism: str = "ddp"
    """One of `PARALLELISMS`, used on several ranks: `ddp` keeps a whole copy of the model, its
    gradients and optimizer state on every rank; `fsdp` (FSDP2, `fully_shard` per transformer block)
    shards all three, and the EMA teacher, over the ranks (`pretrain.training.parallel`)."""

    def validate(self) -> None:
        """Raise ValueError for a value the trainer would only trip over later (after data loading)."""
        if self.precision not in PRECISIONS:
            raise ValueError(f"train.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.parallelism not in PARALLELISMS:
            raise ValueError(f"train.parallelism must be one of {', '.join(PARALLELISMS)}, got {self.parallelism!r}")


def batch_summary(world_size: int, update_freq: int, max_tokens: int, reference: int = 0) -> tuple[str, str | None]:
    """fairseq's batch arithmetic: each update sums `update_freq` batches of at most `max_tokens`
    samples on each of `world_size` ranks. Returns a description and, when the product differs
    from the recipe's, a warning with the update_freq that restores it."""
    product = world_size * update_freq
    hours = product * max_tokens / 16_000 / 3600
    text = (f"effective batch: {world_size} rank(s) x update_freq {update_freq} x up to {max_tokens:,} samples "
            f"= up to {hours:.3g} h of audio per update")
    if reference and product != reference:
        fix = max(1, -(-reference // world_size))
        return text, (f"the recipe's batch is {reference} x max_tokens (GPUs x update_freq) but this run has {product}; "
                      f"--set train.update_freq={fix} restores it on {world_size} rank(s)")
    return text, None


@dataclass
class RunConfig:
    preset: str = "wav2vec2_base"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: LoaderConfig = field(default_factory=LoaderConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        cfg = cls(
            preset=d["preset"],
            model=ModelConfig(**d["model"]),
            data=LoaderConfig(**d["data"]),
            optim=OptimConfig(**d["optim"]),
            train=TrainConfig(**d["train"]),
        )
        cfg.train.validate()
        return cfg


def _coerce(value: str, typ, key: str):
    origin = typing.get_origin(typ)
    if typ is bool:
        low = value.lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ValueError(f"{key} expects true or false, got {value!r}")
    if typ in (int, float, str):
        try:
            return typ(value) if typ is not int else int(value, 0)
        except ValueError:
            raise ValueError(f"{key} expects {typ.__name__}, got {value!r}") from None
    if typ is list or origin is list:
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise ValueError(f"{key} expects a list such as [0.9, 0.98], got {value!r}") from None
        if not isinstance(parsed, (list, tuple)):
            raise ValueError(f"{key} expects a list, got {value!r}")
        return list(parsed)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value.lower() in ("none", "null"):
            return None
        return _coerce(value, args[0], key)
    raise ValueError(f"{key}: unsupported type {typ}")


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """Apply `section.key=value` strings; unknown keys and ill-typed values raise ValueError."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set expects section.key=value, got {item!r}")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        sections = {f.name for f in dataclasses.fields(cfg) if dataclasses.is_dataclass(getattr(cfg, f.name))}
        if len(parts) != 2 or parts[0] not in sections:
            raise ValueError(f"unknown config key {key!r}: use one of {sorted(sections)} then .name, e.g. optim.lr=1e-4")
        section = getattr(cfg, parts[0])
        hints = typing.get_type_hints(type(section))
        if parts[1] not in hints:
            close = sorted(hints)
            raise ValueError(f"unknown config key {key!r}; {parts[0]} has: {', '.join(close)}")
        setattr(section, parts[1], _coerce(value.strip(), hints[parts[1]], key))
    cfg.train.validate()  # a known key can still hold a value the trainer cannot use
    cfg.data.validate()
    return cfg


def dumps(cfg: RunConfig) -> str:
    return json.dumps(cfg.to_dict(), indent=2, default=list) + "\n"
