"""fairseq checkpoints (`.pt`) of wav2vec 2.0, data2vec-audio, data2vec 2.0 (audio) and their CTC
fine-tunings, read without fairseq.

A fairseq checkpoint pickles its configuration either as an argparse `Namespace` under `args`
(fairseq <= 0.10: `wav2vec_small.pt`, `libri960_big.pt`, the `*_960h.pt` of that time) or as a
nested dict (once an omegaconf `DictConfig`) under `cfg`. Models we read: `wav2vec2`,
`data2vec_audio`, `data2vec_multi` (data2vec 2.0, `pretrain.interop.fairseq_data2vec2`) and
`wav2vec_ctc` around any of them; the weights map one to one onto ours (fairseq keeps q/k/v apart
where we fuse them, and names the modules of its `nn.Sequential`s by index).
"""

from __future__ import annotations

import argparse
import ast
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pretrain.config import ModelConfig
from pretrain.interop.keymap import eval_conv, rename_from, split_qkv

SUPPORTED = ("wav2vec2", "data2vec_audio", "data2vec_multi", "wav2vec_ctc")
#: what other fairseq speech models are, for the refusal message
OTHER_MODELS = {
    "hubert": "HuBERT", "hubert_ctc": "a HuBERT CTC fine-tuning", "hubert_seq2seq": "a HuBERT seq2seq model",
    "wav2vec": "wav2vec 1.0 / vq-wav2vec", "wav2vec_seq2seq": "a wav2vec 2.0 seq2seq (encoder-decoder) model",
    "wav2vec2_laser": "a wav2vec 2.0 LASER model",
    "wav2vec_classification": "a wav2vec 2.0 classifier",
}

# (our key pattern, fairseq key template); group references are {0}, {1}
_RENAMES = [
    (r"mask_emb", "mask_emb"),
    (r"feature_extractor\.conv_layers\.(\d+)\.conv\.(weight|bias)", "feature_extractor.conv_layers.{0}.0.{1}"),
    (r"feature_extractor\.conv_layers\.0\.norm\.(weight|bias)@group", "feature_extractor.conv_layers.0.2.{0}"),
    (r"feature_extractor\.conv_layers\.(\d+)\.norm\.(weight|bias)", "feature_extractor.conv_layers.{0}.2.1.{1}"),
    (r"layer_norm\.(weight|bias)", "layer_norm.{0}"),
    (r"post_extract_proj\.(weight|bias)", "post_extract_proj.{0}"),
    (r"encoder\.pos_conv\.conv\.bias", "encoder.pos_conv.0.bias"),
    (r"encoder\.pos_conv\.conv\.parametrizations\.weight\.original0", "encoder.pos_conv.0.weight_g"),
    (r"encoder\.pos_conv\.conv\.parametrizations\.weight\.original1", "encoder.pos_conv.0.weight_v"),
    (r"encoder\.pos_conv\.layers\.(\d+)\.conv\.(weight|bias)", "encoder.pos_conv.{0}.0.{1}"),
    (r"encoder\.layer_norm\.(weight|bias)", "encoder.layer_norm.{0}"),
    (r"encoder\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)", "encoder.layers.{0}.self_attn.out_proj.{1}"),
    (r"encoder\.layers\.(\d+)\.(self_attn_layer_norm|fc1|fc2|final_layer_norm)\.(weight|bias)", "encoder.layers.{0}.{1}.{2}"),
    (r"quantizer\.vars", "quantizer.vars"),
    (r"quantizer\.weight_proj\.(weight|bias)", "quantizer.weight_proj.{0}"),
    (r"project_q\.(weight|bias)", "project_q.{0}"),
    (r"final_proj\.(weight|bias)", "final_proj.{0}"),
]
_FS_QKV = re.compile(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)")


def _template_regex(template: str) -> re.Pattern:
    parts = re.split(r"(\{\d\})", template)
    return re.compile("".join("([^.]+)" if re.fullmatch(r"\{\d\}", p) else re.escape(p) for p in parts))


def to_fairseq_weights(state: dict[str, torch.Tensor], extractor_mode: str) -> dict[str, torch.Tensor]:
    """Our state dict -> fairseq `Wav2Vec2Model` / `Data2VecAudioModel` keys."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        split = split_qkv(key, value, "encoder.layers.{layer}.self_attn.{name}_proj.{kind}")
        if split:
            out.update(split)
            continue
        probe = key + ("@group" if extractor_mode == "default" else "")
        for pattern, template in _RENAMES:
            m = re.fullmatch(pattern, probe) or re.fullmatch(pattern, key)
            if m:
                out[template.format(*m.groups())] = value
                break
        else:
            raise KeyError(f"no fairseq name for parameter {key!r}")
    return out


def from_fairseq_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fairseq `Wav2Vec2Model` / `Data2VecAudioModel` keys -> ours. A key we have no place for raises."""
    inverse = [(_template_regex(t), re.sub(r"\([^)]*\)", "{}", p.split("@")[0]).replace("\\.", ".")) for p, t in _RENAMES]
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}  # released files are often fp16
    return rename_from(state, inverse, _FS_QKV, "fairseq")


# ---------------------------------------------------------------------------------------- reading


class _Stub:
    """Stands in for a pickled fairseq / hydra class (a `Dictionary`, an enum) so the file loads
    without fairseq; its attributes are kept for what we read from it."""

    def __init__(self, *args, **kwargs) -> None:
        self._args = args

    def __setstate__(self, state) -> None:
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self._state = state


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module.split(".")[0] in ("fairseq", "hydra", "fairseq2"):
            return type(name, (_Stub,), {})
        return super().find_class(module, name)


class _KeysUnpickler(_Unpickler):
    """Reads a checkpoint's structure only: every tensor becomes None."""

    def find_class(self, module: str, name: str):
        if module.startswith("torch") and name.startswith("_rebuild"):
            return lambda *args, **kwargs: None
        if module.split(".")[0] == "omegaconf":  # the keys are visible without omegaconf installed
            return type(name, (_Stub,), {})
        return super().find_class(module, name)


class _PickleModule:
    """What `torch.load(pickle_module=...)` needs: an Unpickler that tolerates fairseq's classes."""

    Unpickler = _Unpickler
    load = pickle.load
    __name__ = "fairseq_tolerant_pickle"


def load_fairseq_file(path: str | Path) -> dict:
    """The unpickled checkpoint (tensors on the CPU)."""
    path = Path(path)
    torch.serialization.add_safe_globals([argparse.Namespace])
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass  # a pickled fairseq Dictionary or omegaconf config: load with stand-ins
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_PickleModule)
    except ModuleNotFoundError as err:
        raise ValueError(f"{path} pickles objects of module {err.name!r}; `pip install omegaconf` reads the "
                         "fairseq checkpoints of 2020-21 that store their config as an omegaconf object") from err


def is_fairseq_file(path: str | Path) -> bool:
    """Whether `path` is a fairseq checkpoint, told from its top-level keys without loading tensors."""
    import zipfile

    path = Path(path)
    if not path.is_file():
        return False
    try:
        with zipfile.ZipFile(path) as z:
            name = next((n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
            if name is None:
                return False
            unpickler = _KeysUnpickler(z.open(name))
            unpickler.persistent_load = lambda pid: None  # tensors are not needed to see the keys
            return is_fairseq_checkpoint(unpickler.load())
    except zipfile.BadZipFile:  # torch's format before 1.6 (2020 fairseq releases): load it whole
        try:
            return is_fairseq_checkpoint(load_fairseq_file(path))
        except Exception:  # noqa: BLE001 - not a checkpoint of any kind we know
            return False
    except Exception:  # noqa: BLE001
        return False


def plain(obj):
    """A config as plain Python: Namespaces and omegaconf configs become dicts, recursively."""
    if isinstance(obj, argparse.Namespace):
        return {k: plain(v) for k, v in vars(obj).items()}
    if type(obj).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        return plain(OmegaConf.to_container(obj, resolve=False))
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


def is_fairseq_checkpoint(state: dict) -> bool:
    return isinstance(state, dict) and "model" in state and ("cfg" in state or "args" in state) and "config" not in state


def config_of(state: dict) -> tuple[dict, dict]:
    """(model section, task section) of a checkpoint, from `cfg` or from an old `args` Namespace."""
    if state.get("cfg") is not None:
        cfg = plain(state["cfg"])
        return dict(cfg.get("model") or {}), dict(cfg.get("task") or {})
    if state.get("args") is not None:
        args = plain(state["args"])
        return dict(args, _name=args.get("arch")), {"_name": args.get("task"), **args}
    raise ValueError("the checkpoint has neither `cfg` nor `args`: not a fairseq checkpoint")


#: fairseq's `Wav2Vec2Config` / `Data2VecAudioConfig` defaults for the fields we read: a field a
#: checkpoint leaves out (older files lack the later ones) has fairseq's value, not our preset's
FAIRSEQ_DEFAULTS = dict(
    extractor_mode="default", conv_bias=False, encoder_layers=12, encoder_embed_dim=768, encoder_ffn_embed_dim=3072,
    encoder_attention_heads=12, layer_norm_first=False, dropout=0.1, attention_dropout=0.1, activation_dropout=0.0,
    encoder_layerdrop=0.0, dropout_input=0.0, dropout_features=0.0, conv_pos=128, conv_pos_groups=16,
    pos_conv_depth=1, latent_vars=320, latent_groups=2, latent_dim=0, final_dim=0, logit_temp=0.1, num_negatives=100,
    mask_prob=0.65, mask_length=10, feature_grad_mult=1.0, latent_temp=[2.0, 0.5, 0.999995],
    average_top_k_layers=8, instance_norm_target_layer=False, loss_beta=0.0, ema_decay=0.999, ema_end_decay=0.9999,
    min_target_var=0.1, min_pred_var=0.01,
)
_DEFAULT_CONV = [[512, 10, 5]] + [[512, 3, 2]] * 4 + [[512, 2, 2]] * 2


def _value(model: dict, name: str):
    default = FAIRSEQ_DEFAULTS[name]
    value = model.get(name)
    if value is None:
        return default
    if isinstance(value, str) and not isinstance(default, str):  # fairseq <= 0.10 kept numbers and tuples as strings
        value = ast.literal_eval(value)
    if isinstance(default, list):
        return [float(x) for x in value]
    return type(default)(value)


def model_config_from_fairseq(model: dict, arch: str, pretraining: bool = True) -> ModelConfig:
    """Our ModelConfig from a fairseq `Wav2Vec2Config` / `Data2VecAudioConfig` section (or old `args`)."""
    unsupported = [f"{k}={model[k]!r}" for k, bad in (
        ("layer_type", lambda v: v not in (None, "transformer")), ("quantize_input", bool), ("target_glu", bool),
        ("quantizer_depth", lambda v: v not in (None, 1)), ("pos_enc_type", lambda v: v not in (None, "abs")),
    ) if model.get(k) is not None and bad(model[k])]
    if pretraining and arch == "wav2vec2" and not model.get("quantize_targets", False):
        unsupported.append("quantize_targets=False (targets without the quantizer)")
    if unsupported:
        raise ValueError(f"this fairseq {arch} model uses {', '.join(unsupported)}, which we do not implement")
    c = ModelConfig(arch="data2vec" if arch == "data2vec_audio" else "wav2vec2")
    conv = model.get("conv_feature_layers")
    c.conv_feature_layers = [list(x) for x in (eval_conv(conv) if isinstance(conv, str) else conv or _DEFAULT_CONV)]
    for name in FAIRSEQ_DEFAULTS:
        setattr(c, name, _value(model, name))
    c.final_dim = c.final_dim or c.encoder_embed_dim
    if model.get("loss_scale") is not None:
        c.loss_scale = float(model["loss_scale"])
    anneal = model.get("ema_anneal_end_step")
    if isinstance(anneal, int):  # otherwise an interpolation of the optimisation's max_update
        c.ema_anneal_end_step = anneal
    return c


@dataclass
class FairseqModel:
    """What a fairseq checkpoint holds, in our terms."""

    kind: str  # "pretrain" or "ctc"
    model: ModelConfig
    normalize: bool
    weights: dict[str, torch.Tensor]
    """Our names: the whole pretraining model, or for CTC the encoder (`Wav2Vec2Model` without heads)."""
    proj: tuple[torch.Tensor, torch.Tensor] | None = None
    """CTC output projection (weight, bias)."""
    symbols: list[str] | None = None
    """CTC vocabulary, index order (from the checkpoint, `--dict` or the dict.ltr.txt beside it)."""
    teacher: dict[str, torch.Tensor] = field(default_factory=dict)
    """The EMA teacher (fairseq's `_ema`). data2vec: its encoder parameters in encoder-relative fairseq
    names; data2vec 2.0: the state of our `Data2Vec2Encoder` (our names)."""
    num_updates: int = 0


def _model_name(model: dict, task: dict, path: Path) -> str:
    name = model.get("_name") or model.get("arch")
    if name in SUPPORTED:
        return name
    if name in OTHER_MODELS:
        raise ValueError(f"{path} is {OTHER_MODELS[name]} (fairseq model {name!r}); only wav2vec 2.0, data2vec-audio, "
                         "data2vec 2.0 audio and their CTC fine-tunings (wav2vec2, data2vec_audio, data2vec_multi, "
                         "wav2vec_ctc) can be read")
    raise ValueError(f"{path} is a fairseq {name!r} model; only wav2vec2, data2vec_audio, data2vec_multi and "
                     "wav2vec_ctc can be read")


def read_fairseq(path: str | Path, dict_path: str | Path | None = None) -> FairseqModel:
    """Read a fairseq wav2vec 2.0 / data2vec-audio checkpoint, pretrained or CTC fine-tuned."""
    path = Path(path)
    state = load_fairseq_file(path)
    if not is_fairseq_checkpoint(state):
        raise ValueError(f"{path} is not a fairseq checkpoint (no `model` with `cfg` or `args`)")
    model_cfg, task_cfg = config_of(state)
    name = _model_name(model_cfg, task_cfg, path)
    history = state.get("optimizer_history") or [{}]
    updates = int(history[-1].get("num_updates", 0) or 0)
    weights = dict(state["model"])
    if name == "data2vec_multi":
        from pretrain.interop.fairseq_data2vec2 import read_pretrained

        model, normalize, ours, teacher = read_pretrained(weights, model_cfg, task_cfg, path)
        return FairseqModel("pretrain", model, normalize, ours, teacher=teacher, num_updates=updates)
    if name != "wav2vec_ctc":
        teacher = weights.pop("_ema", None) or {}
        weights = {("final_proj." + k[len("final_proj.0."):] if k.startswith("final_proj.0.") else k): v
                   for k, v in weights.items()}  # released data2vec files name it final_proj.0
        normalize = bool(task_cfg.get("normalize", model_cfg.get("normalize", False)))
        model = model_config_from_fairseq(model_cfg, name)
        weights_of_loss = _loss_weights(state)
        if weights_of_loss is not None and model.arch == "wav2vec2":  # fairseq keeps them in the criterion
            model.diversity_weight, model.feature_pen_weight = (list(weights_of_loss) + [0.0, 0.0])[:2]
        return FairseqModel("pretrain", model, normalize, from_fairseq_weights(weights), teacher=dict(teacher),
                            num_updates=updates)
    inner = plain(model_cfg.get("w2v_args"))
    if inner is None:
        raise ValueError(f"{path} is a CTC checkpoint without `w2v_args` (its pretraining config); it cannot be read")
    inner_model, inner_task = (inner.get("model") or {}, inner.get("task") or {}) if "model" in inner else (
        dict(inner, _name=inner.get("arch")), inner)
    inner_name = _model_name(inner_model, inner_task, path)
    prefix = "w2v_encoder.w2v_model."
    encoder = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    heads = ("quantizer.", "project_q.", "final_proj.", "target_glu.")
    encoder = {k: v for k, v in encoder.items() if not k.startswith(heads)}
    extra = [k for k in weights if not k.startswith(prefix) and not k.startswith("w2v_encoder.proj.")]
    if extra:
        raise ValueError(f"{path} holds parameters we do not know how to use: {extra[:5]}")
    normalize = bool(model_cfg.get("normalize", inner_task.get("normalize", False)))
    proj = (weights["w2v_encoder.proj.weight"].float(), weights["w2v_encoder.proj.bias"].float())
    symbols = _ctc_symbols(state, path, dict_path, task_cfg.get("labels") or "ltr", proj[0].shape[0])
    if inner_name == "data2vec_multi":
        from pretrain.interop.fairseq_data2vec2 import read_encoder

        model, encoder = read_encoder(encoder, inner_model, path)
    else:
        model = model_config_from_fairseq(inner_model, inner_name, pretraining=False)
        encoder = from_fairseq_weights(encoder)
    return FairseqModel("ctc", model, normalize, encoder, proj, symbols, num_updates=updates)


def _loss_weights(state: dict) -> list[float] | None:
    """The wav2vec criterion's `loss_weights` (diversity, feature penalty)."""
    if state.get("cfg") is not None:
        value = (plain(state["cfg"]).get("criterion") or {}).get("loss_weights")
    else:
        value = plain(state.get("args") or {}).get("loss_weights")
    if isinstance(value, str):
        value = ast.literal_eval(value)
    return [float(x) for x in value] if value else None


def _ctc_symbols(state: dict, path: Path, dict_path, labels: str, size: int) -> list[str] | None:
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    stored = (state.get("task_state") or {}).get("target_dictionary")
    if dict_path is None and stored is not None and hasattr(stored, "symbols"):
        symbols = list(stored.symbols)
    else:
        where = Path(dict_path) if dict_path else path.parent / f"dict.{labels}.txt"
        if not where.is_file():
            return None  # the caller says what to pass when it needs the vocabulary
        symbols = specials + [line.rstrip().rsplit(" ", 2)[0] if line.rstrip().endswith("#fairseq:overwrite")
                              else line.rstrip().rsplit(" ", 1)[0]
                              for line in where.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(symbols) != size:
        raise ValueError(f"the dictionary for {path} has {len(symbols)} symbols but its output layer has {size}; "
                         "pass the dict.ltr.txt it was trained with (--dict PATH)")
    return symbols
