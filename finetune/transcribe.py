"""`python -m finetune.transcribe RUN_OR_CKPT AUDIO...`: one `path<TAB>transcript` line per file.

Any format soundfile reads (FLAC, WAV, OGG, ...), any sample rate or channel count: audio is
down-mixed and resampled to 16 kHz as data prep does. A file that cannot be transcribed (unreadable,
non-finite or out-of-range samples, shorter than one output frame) is reported in one line on
stderr and the others are still transcribed; the exit status is 1 if any failed. A clip shorter
than 0.5 s is transcribed with a warning.
"""

from __future__ import annotations

import argparse
import sys

import torch

from data_prep.audio import SAMPLE_RATE, AudioError, read_audio

from .decoder import add_decoder_args, build_decoder
from .inference import emissions, load_ctc, samples_for_frames

MIN_SECONDS = 0.5
"""Shorter clips get a warning: the model was trained on utterances of seconds (LibriSpeech: 1 to
35 s), and a fraction of a second is at most a word, with next to no context to recognise it."""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m finetune.transcribe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a fine-tuned run directory (its best checkpoint) or checkpoint file, "
                                      "its `--format safetensors` export, or a fairseq CTC checkpoint (.pt)")
    p.add_argument("--dict", dest="dict_path", default=None,
                   help="a fairseq CTC checkpoint's dict.ltr.txt (default: the one beside it)")
    p.add_argument("audio", nargs="+", help="audio files")
    add_decoder_args(p)
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        cfg, model, dictionary, _ = load_ctc(args.checkpoint, device, args.dict_path)
        decode, _, _ = build_decoder(dictionary, args)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    one_frame = samples_for_frames(cfg.model, 1)  # the conv stack's receptive field
    useful = max(one_frame, round(MIN_SECONDS * SAMPLE_RATE))
    failed = 0
    for path in args.audio:
        try:
            wave = read_audio(path)
            if len(wave) < one_frame:
                raise AudioError(
                    "too_short", f"{len(wave)} samples ({1000 * len(wave) / SAMPLE_RATE:.1f} ms at 16 kHz); the model "
                    f"needs at least {one_frame} ({1000 * one_frame / SAMPLE_RATE:.1f} ms) for one output frame",
                )
            if len(wave) < useful:
                frames = (len(wave) - one_frame) // (samples_for_frames(cfg.model, 2) - one_frame) + 1
                print(f"warning: {path}: only {len(wave) / SAMPLE_RATE:.2f} s of audio ({frames} output "
                      f"frame{'s' if frames > 1 else ''}); transcripts of clips shorter than {MIN_SECONDS} s "
                      f"({useful} samples) are unreliable", file=sys.stderr)
            text = decode(emissions(model, wave, cfg.data.normalize))
        except (AudioError, RuntimeError) as err:
            reason = f"{err.reason}: {err.detail}" if isinstance(err, AudioError) else str(err)
            print(f"error: {path}: cannot transcribe ({reason})", file=sys.stderr)
            failed += 1
            continue
        print(f"{path}\t{text}", flush=True)
    if failed:
        print(f"{failed} of {len(args.audio)} files could not be transcribed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
