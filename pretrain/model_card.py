"""Model cards: the `README.md` every export directory gets, in the style of the hub cards.

YAML front matter (language, datasets, tags, license; for CTC models a `model-index` with the
WER/CER we measured and on which split), then what the model is, how it was trained (read back
from the run: preset, updates, hours of audio, GPUs, final losses), how to load it in
transformers, fairseq, fairseq2 and here (those that have the architecture), and the 16 kHz note.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from data_prep.fsutil import atomic_write_text
from pretrain.config import RunConfig

PAPERS = {"wav2vec2": ("wav2vec 2.0", "https://arxiv.org/abs/2006.11477"),
          "data2vec": ("data2vec", "https://arxiv.org/abs/2202.03555"),
          "data2vec2": ("data2vec 2.0", "https://arxiv.org/abs/2212.07525")}
TAGS = {"wav2vec2": "wav2vec2", "data2vec": "data2vec-audio", "data2vec2": "data2vec2"}
#: the export formats each architecture has (transformers and fairseq2 have no data2vec 2.0 model)
FORMATS = {"wav2vec2": ("hf", "fairseq2", "fairseq", "safetensors"), "data2vec": ("hf", "fairseq", "safetensors"),
           "data2vec2": ("fairseq", "safetensors")}
_LIBRARIES = {"hf": "transformers", "fairseq": "fairseq", "fairseq2": "fairseq2"}
_FAIRSEQ_NAMES = {"wav2vec2": "wav2vec 2.0", "data2vec": "data2vec-audio", "data2vec2": "data2vec 2.0"}
_SPLITS = {"dev": "validation", "test": "test", "train": "train", "valid": "validation"}


def run_dir_of(source: str | Path) -> Path | None:
    """The run directory a checkpoint belongs to (None for a lone file)."""
    p = Path(source)
    if p.is_dir():
        return p if (p / "config.json").exists() else None
    run = p.parent.parent if p.parent.name == "checkpoints" else p.parent
    return run if (run / "config.json").exists() else None


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _last_rows(run: Path) -> tuple[dict, dict]:
    """The last train and valid rows of the run's metrics.jsonl."""
    last: dict[str, dict] = {}
    try:
        for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line cut by a kill
            last[row.get("split", "train")] = row
    except OSError:
        pass
    return last.get("train", {}), last.get("valid", {})


def _training_data(run: Path | None, split: str) -> tuple[str | None, float | None, bool]:
    """(data directory, hours of audio in its `split`, whether it is the synthetic corpus)."""
    info = _json(run / "run.json") if run else {}
    data = info.get("data")
    if not data:
        return None, None, False
    summary = _json(Path(data) / "summary.json")
    hours = (summary.get("splits", {}).get(split) or {}).get("hours")
    # a merged directory names its sources, and each source's summary names its corpus
    roots = [Path(summary["root"])] if summary.get("root") else []
    roots += [Path(r) for r in (_json(Path(s) / "summary.json").get("root") for s in summary.get("sources", [])) if r]
    synthetic = any((r / "SYNTHETIC.md").exists() or (r.parent / "SYNTHETIC.md").exists() for r in roots)
    return data, hours, synthetic


def _datasets(data: str | None, synthetic: bool) -> list[str]:
    if not data or synthetic:
        return []
    summaries = [_json(Path(data) / "summary.json")]
    summaries += [_json(Path(s) / "summary.json") for s in summaries[0].get("sources", [])]
    found = []
    for summary in summaries:
        root = str(summary.get("root", "")).lower()
        if "segment_seconds" in summary or "librilight" in root or "libri-light" in root:
            found.append("facebook/libri-light")
        elif "librispeech" in root:
            found.append("librispeech_asr")
    return sorted(set(found), key=found.index)


def _model_index(name: str, evals: list[dict], datasets: list[str]) -> list[str]:
    lines = ["model-index:", f"- name: {json.dumps(name)}", "  results:"]
    for report in evals:
        for split, r in report.get("splits", {}).items():
            part, _, config = split.partition("-")
            lines += ["  - task:", "      name: Automatic Speech Recognition", "      type: automatic-speech-recognition",
                      "    dataset:", f"      name: {json.dumps(split)}",
                      f"      type: {json.dumps(datasets[0] if datasets else 'custom')}",
                      f"      config: {json.dumps(config or split)}", f"      split: {json.dumps(_SPLITS.get(part, part))}",
                      "    metrics:"]
            decoder = report.get("decoder", "greedy")
            for metric in ("wer", "cer"):
                if isinstance(r.get(metric), (int, float)) and math.isfinite(r[metric]):
                    label = f"{split} {metric.upper()} ({decoder} decoding)"
                    lines += [f"    - name: {json.dumps(label)}", f"      type: {metric}",
                              f"      value: {round(float(r[metric]), 2)}"]
    return lines


def _params(cfg: RunConfig) -> str:
    m = cfg.model
    if m.arch == "data2vec2":
        blocks = f"{m.prenet_depth} + {m.encoder_layers}" if m.prenet_depth else f"{m.encoder_layers}"
        return (f"{blocks} transformer blocks of width {m.encoder_embed_dim} ({m.encoder_attention_heads} heads, "
                f"FFN {m.encoder_ffn_embed_dim}) with ALiBi attention biases, post-LN, "
                f"{'LayerNorm' if m.extractor_mode == 'layer_norm' else 'GroupNorm'} conv feature encoder")
    return (f"{m.encoder_layers} transformer layers of width {m.encoder_embed_dim} ({m.encoder_attention_heads} heads, "
            f"FFN {m.encoder_ffn_embed_dim}), {'pre' if m.layer_norm_first else 'post'}-LN, "
            f"{'LayerNorm' if m.extractor_mode == 'layer_norm' else 'GroupNorm'} conv feature encoder")


def _usage(fmt: str, kind: str, arch: str, out: Path) -> list[str]:
    where = str(out)
    if fmt == "hf":
        cls = ("Wav2Vec2ForCTC" if arch == "wav2vec2" else "Data2VecAudioForCTC") if kind == "ctc" else (
            "Wav2Vec2ForPreTraining" if arch == "wav2vec2" else "Data2VecAudioModel")
        lines = ["```python", f"from transformers import {cls}, AutoFeatureExtractor", "",
                 f"model = {cls}.from_pretrained({where!r})",
                 f"features = AutoFeatureExtractor.from_pretrained({where!r})(audio_16khz, sampling_rate=16_000, return_tensors=\"pt\")"]
        if kind == "ctc":
            lines += ["from transformers import Wav2Vec2Processor", f"processor = Wav2Vec2Processor.from_pretrained({where!r})",
                      "text = processor.batch_decode(model(**features).logits.argmax(-1))"]
        return lines + ["```"]
    if fmt == "fairseq":
        return ["```python", "from fairseq import checkpoint_utils", "",
                f"models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([{str(out / 'checkpoint.pt')!r}])",
                "```"] + ([f"{_FAIRSEQ_NAMES[arch]} needs fairseq's `examples/data2vec` as a user dir "
                           "(`fairseq.utils.import_user_module`) before loading."] if arch != "wav2vec2" else [])
    if fmt == "safetensors":
        return _native_usage(kind, arch, out)
    return ["```python", "from fairseq2.models.hub import load_model  # with FAIRSEQ2_USER_ASSET_DIR set to this directory",
            f"model = load_model({out.name!r})", "```"]


def _native_usage(kind: str, arch: str, out: Path) -> list[str]:
    where = str(out)
    if kind == "ctc":
        load = ["from finetune.decoder import GreedyDecoder", "from finetune.inference import emissions, load_ctc", "",
                f"cfg, model, dictionary, _ = load_ctc({where!r})",
                "text = GreedyDecoder(dictionary)(emissions(model, audio_16khz, cfg.data.normalize))"]
    else:
        load = ["from pretrain.extract import encode, load_encoder", "",
                f"cfg, model = load_encoder({where!r}, 'cpu')",
                "features = encode(model, audio_16khz, 'cpu')  # standardise the audio first if cfg.data.normalize"]
    teacher = " (the EMA teacher's encoder under the `teacher.` prefix)" if kind != "ctc" and arch != "wav2vec2" else ""
    vocab = " and the vocabulary in `ctc.symbols`" if kind == "ctc" else ""
    lines = [(f"This project's own format: `model.safetensors` holds the state dict under its parameter "
              f"names{teacher}; `config.json` holds the run's full config with "
              f"`\"format\": \"speech-pretrain-safetensors\"`, `kind`, `step`{vocab}."), ""]
    if arch == "data2vec2":
        lines += [("transformers and fairseq2 have no data2vec 2.0 model, so no transformers class loads this; "
                   "load it with this project (a checkout on `PYTHONPATH`):"), ""]
    else:
        lines += ["Load it with this project (a checkout on `PYTHONPATH`):", ""]
    reader = "Any safetensors reader gets the tensors: `safetensors.torch.load_file(\"model.safetensors\")`."
    return lines + ["```python", *load, "```", "", reader]


def write_model_card(out: Path, cfg: RunConfig, *, kind: str, fmt: str, source: str, step: int,
                     evals: list[dict] | None = None, name: str | None = None) -> Path:
    """Write `out/README.md` for an export of `kind` ("pretrained" or "ctc") in format `fmt`."""
    out = Path(out)
    arch = cfg.model.arch
    paper, url = PAPERS[arch]
    name = name or out.name
    run = run_dir_of(source)
    data, hours, synthetic = _training_data(run, cfg.train.train_split)
    datasets = _datasets(data, synthetic)
    info = _json(run / "run.json") if run else {}
    train_row, valid_row = _last_rows(run) if run else ({}, {})
    tags = ["speech", "audio", TAGS[arch], "self-supervised-learning"]
    if kind == "ctc":
        tags += ["automatic-speech-recognition", "ctc"]
    front = ["---", "language: en", "license: apache-2.0"]
    front += [f"library_name: {_LIBRARIES[fmt]}"] if fmt in _LIBRARIES else []  # our own format has no library
    front += ["datasets:" + ("" if datasets else " []")]
    front += [f"- {d}" for d in datasets] + ["tags:"] + [f"- {t}" for t in tags]
    if kind == "ctc" and evals:
        front += _model_index(name, evals, datasets)
    front.append("---")
    what = "fine-tuned for speech recognition with CTC (letters)" if kind == "ctc" else "pretrained on unlabelled speech"
    body = [f"# {name}", "",
            f"A [{paper}]({url}) model {what}: {_params(cfg)}. Exported in {fmt} format from `{source}`.", "",
            "**The model expects 16 kHz mono audio.** Resample other audio first"
            + (" and standardise each utterance (zero mean, unit variance), as the model was trained on."
               if cfg.data.normalize else "; it was trained on raw (not standardised) waveforms."), "",
            "## Training", "", f"- preset `{cfg.preset}`, {step:,} updates"]
    if data:
        body.append(f"- data: `{data}` (split `{cfg.train.train_split}`"
                    + (f", {hours:.2f} h of audio)" if hours is not None else ")")
                    + (" -- the synthetic corpus of `python -m data_prep toy`, not LibriSpeech" if synthetic else ""))
    if info:
        body.append(f"- {info.get('world_size', 1)} x {info.get('device', 'cpu')}, torch {info.get('torch', '?')}")
    if kind == "ctc" and getattr(cfg, "ctc", None) is not None and cfg.ctc.init_from:
        body.append(f"- fine-tuned from `{cfg.ctc.init_from}`")
    keys = [k for k in ("loss", "contrastive", "diversity", "features_pen", "accuracy", "target_var", "pred_var",
                        "loss_per_token") if isinstance(train_row.get(k), (int, float))]
    if keys:
        body.append(f"- final training numbers (update {train_row.get('step')}): "
                    + ", ".join(f"{k} {train_row[k]:.4g}" for k in keys))
    if valid_row:
        shown = [k for k in ("loss", "wer", "cer") if isinstance(valid_row.get(k), (int, float))]
        body.append(f"- last validation (update {valid_row.get('step')}): " + ", ".join(f"{k} {valid_row[k]:.4g}" for k in shown))
    if kind == "ctc" and evals:
        body += ["", "## Evaluation", "", "| split | decoder | WER % | CER % |", "|---|---|---|---|"]
        for report in evals:
            for split, r in report.get("splits", {}).items():
                body.append(f"| {split} | {report.get('decoder', 'greedy')} | {r['wer']:.2f} | {r['cer']:.2f} |")
    exporter = "finetune.export" if kind == "ctc" else "pretrain.export"
    others = [f for f in FORMATS[arch] if f != fmt]
    body += ["", "## Usage", ""] + _usage(fmt, kind, arch, out) + [
        "", "The same model in the other formats: " + ", ".join(
            f"`python -m {exporter} {source} --format {f} --out DIR`" for f in others) + "."] + [
        "", "In this project: `python -m finetune --init-from DIR_OR_FILE ...` fine-tunes it, "
        "`python -m pretrain.extract DIR_OR_FILE --manifest TSV --out FEATURES` extracts features"
        + (", `python -m finetune.transcribe DIR_OR_FILE audio.flac` transcribes" if kind == "ctc" else "") + ".", ""]
    path = out / "README.md"
    atomic_write_text(path, "\n".join(front + body))
    return path


def eval_reports(run: Path | None, checkpoint: str | Path | None = None) -> list[dict]:
    """The evaluation reports (`RUN/eval/*.json`) of the exported checkpoint (all the run's if none names it)."""
    if run is None or not (run / "eval").is_dir():
        return []
    reports = [_json(p) for p in sorted((run / "eval").glob("*.json"))]
    reports = [r for r in reports if r.get("splits")]
    if checkpoint is not None:
        target = str(Path(checkpoint).resolve())
        mine = [r for r in reports if str(Path(r.get("checkpoint", "")).resolve()) == target]
        reports = mine or reports
    return reports


def step_of(checkpoint: str | Path) -> int:
    """The update count in a checkpoint file name of ours (`step_00000600.pt`), or the one a
    safetensors export records, else 0."""
    import re

    if Path(checkpoint).is_dir():
        return int(_json(Path(checkpoint) / "config.json").get("step") or 0)
    m = re.search(r"step_(\d+)", Path(checkpoint).name)
    return int(m.group(1)) if m else 0
