"""`python -m finetune.export RUN_OR_CKPT --format hf|fairseq2|fairseq|safetensors --out DIR`: ship a CTC model.

`hf` writes a transformers directory that `Wav2Vec2ForCTC` (or `Data2VecAudioForCTC`) and
`Wav2Vec2Processor` load. The vocabulary keeps our indices, with the first two names swapped as
transformers' own fairseq converter does: index 0, the CTC blank, is called `<pad>` there.
`fairseq2` writes a `wav2vec2_asr` checkpoint and an asset card (`pretrain.interop.fairseq2`).
`fairseq` writes a `Wav2VecCtc` checkpoint with `dict.ltr.txt` beside it, for fairseq and the tools
built on it (s3prl). `safetensors` writes our own names and full config, vocabulary included
(`pretrain.interop.native`): every architecture has it, data2vec 2.0 has no transformers or
fairseq2 model. The input may also be a fairseq CTC checkpoint (`--dict` names its dictionary) or
a safetensors export.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from data_prep.fsutil import atomic_write_text
from pretrain.export import UnsupportedFormat, check_format, preprocessor_config, save_safetensors
from pretrain.interop.hf import hf_config, to_hf
from pretrain.model_card import eval_reports, run_dir_of, step_of, write_model_card

from .config import FinetuneConfig
from .dictionary import Dictionary
from .inference import load_ctc

HF_CLASSES = {"wav2vec2": ("Wav2Vec2ForCTC", "wav2vec2."), "data2vec": ("Data2VecAudioForCTC", "data2vec_audio.")}


def hf_vocab(dictionary: Dictionary) -> dict[str, int]:
    names = {0: "<pad>", 1: "<s>"}  # transformers' CTC blank is its pad token
    return {names.get(i, s): i for i, s in enumerate(dictionary.symbols)}


def hf_ctc_config(cfg: FinetuneConfig, vocab_size: int) -> dict:
    arch_class, _ = HF_CLASSES[cfg.model.arch]
    config = hf_config(cfg.model, cfg.data.normalize)
    config.update(
        architectures=[arch_class], vocab_size=vocab_size, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        ctc_loss_reduction="sum", ctc_zero_infinity=True, final_dropout=cfg.ctc.final_dropout,
        mask_feature_prob=cfg.ctc.mask_channel_prob, mask_feature_length=cfg.ctc.mask_channel_length,
    )
    return config


def export_fairseq(checkpoint: str | Path, out: Path, dict_path: str | None = None) -> Path:
    """`out/checkpoint.pt` (fairseq `Wav2VecCtc`, the pretraining config embedded as `w2v_args`) and
    `out/dict.ltr.txt`."""
    from pretrain.interop.fairseq_write import write_ctc

    cfg, model, dictionary, where = load_ctc(checkpoint, dict_path=dict_path)
    state = model.state_dict()
    encoder = {k[len("w2v."):]: v for k, v in state.items() if k.startswith("w2v.")}
    out.mkdir(parents=True, exist_ok=True)
    path = write_ctc(out / "checkpoint.pt", cfg.model, encoder, (state["proj.weight"], state["proj.bias"]),
                     dictionary.symbols, cfg.data.normalize, num_updates=step_of(where),
                     final_dropout=cfg.ctc.final_dropout, source=cfg.ctc.init_from or str(where))
    ctc_card(out, cfg, "fairseq", where)
    return path


def ctc_card(out: Path, cfg: FinetuneConfig, fmt: str, where: Path, name: str | None = None) -> Path:
    """The export's README.md, with the WER/CER the run's evaluations measured on this checkpoint."""
    evals = eval_reports(run_dir_of(where), where)
    return write_model_card(out, cfg, kind="ctc", fmt=fmt, source=str(where), step=step_of(where), evals=evals,
                            name=name)


def export_safetensors(checkpoint: str | Path, out: Path, dict_path: str | None = None) -> Path:
    """`out/model.safetensors` (`w2v.*`, `proj.*`), `out/config.json` (the vocabulary in
    `ctc.symbols`), `out/README.md`."""
    from pretrain.interop.native import write_native

    cfg, model, _, where = load_ctc(checkpoint, dict_path=dict_path)
    step = step_of(where)
    write_native(out, cfg.to_dict(), model.state_dict(), kind="ctc", step=step, source=str(where))
    write_model_card(out, cfg, kind="ctc", fmt="safetensors", source=str(where), step=step,
                     evals=eval_reports(run_dir_of(where), where))
    return out


def export_hf(checkpoint: str | Path, out: Path, dict_path: str | None = None) -> Path:
    cfg, model, dictionary, where = load_ctc(checkpoint, dict_path=dict_path)
    check_format(cfg.model.arch, "hf")
    _, prefix = HF_CLASSES[cfg.model.arch]
    state = model.state_dict()
    encoder = {k[len("w2v."):]: v for k, v in state.items() if k.startswith("w2v.")}
    weights = to_hf(encoder, prefix)
    weights["lm_head.weight"], weights["lm_head.bias"] = state["proj.weight"], state["proj.bias"]
    out.mkdir(parents=True, exist_ok=True)
    write_json = lambda name, obj: atomic_write_text(out / name, json.dumps(obj, indent=2) + "\n")  # noqa: E731
    write_json("config.json", hf_ctc_config(cfg, len(dictionary)))
    pre = preprocessor_config(cfg.data.normalize, cfg.model.extractor_mode == "layer_norm")
    write_json("preprocessor_config.json", dict(pre, processor_class="Wav2Vec2Processor"))
    write_json("vocab.json", hf_vocab(dictionary))
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    write_json("special_tokens_map.json", specials)
    write_json("tokenizer_config.json", dict(
        specials, tokenizer_class="Wav2Vec2CTCTokenizer", word_delimiter_token="|", do_lower_case=False,
        processor_class="Wav2Vec2Processor",
    ))
    save_safetensors(weights, out / "model.safetensors")
    ctc_card(out, cfg, "hf", where)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m finetune.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a fine-tuned run directory (its best checkpoint), checkpoint file or export")
    p.add_argument("--format", choices=["hf", "fairseq2", "fairseq", "safetensors"], default="hf")
    p.add_argument("--dict", dest="dict_path", default=None,
                   help="when the input is a fairseq CTC checkpoint: its dict.ltr.txt (default: the one beside it)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--name", default=None, help="fairseq2 asset name (default: the output directory's name)")
    args = p.parse_args(argv)
    try:
        if args.format == "fairseq":
            path = export_fairseq(args.checkpoint, args.out, args.dict_path)
            print(f"wrote a fairseq Wav2VecCtc checkpoint to {path} and its {path.parent / 'dict.ltr.txt'}; load it with "
                  f"fairseq.checkpoint_utils.load_model_ensemble_and_task([{str(path)!r}])")
        elif args.format == "safetensors":
            path = export_safetensors(args.checkpoint, args.out, args.dict_path)
            print(f"wrote {path / 'model.safetensors'} and its config.json; use it here with "
                  f"`python -m finetune.transcribe {path} AUDIO...`")
        elif args.format == "hf":
            path = export_hf(args.checkpoint, args.out, args.dict_path)
            print(f"wrote a transformers CTC model to {path}")
        else:
            from pretrain.interop.fairseq2 import export_fairseq2

            cfg, model, dictionary, where = load_ctc(args.checkpoint, dict_path=args.dict_path)
            check_format(cfg.model.arch, "fairseq2")
            card = export_fairseq2(model.state_dict(), cfg.model, args.out, args.name or args.out.name,
                                   vocab_size=len(dictionary), final_dropout=cfg.ctc.final_dropout)
            ctc_card(args.out, cfg, "fairseq2", where, card.stem)
            print(f"wrote a fairseq2 wav2vec2_asr checkpoint to {args.out}; load it with "
                  f"FAIRSEQ2_USER_ASSET_DIR={args.out} and the asset name {card.stem}")
    except UnsupportedFormat as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, RuntimeError, KeyError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
