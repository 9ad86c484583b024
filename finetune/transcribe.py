"""`python -m finetune.transcribe RUN_OR_CKPT AUDIO...`: one `path<TAB>transcript` line per file.

Any format soundfile reads (FLAC, WAV, OGG, ...), any sample rate or channel count: audio is
down-mixed and resampled to 16 kHz as data prep does. A file that cannot be read is reported on
stderr and the others are still transcribed (exit status 1 if any failed).
"""

from __future__ import annotations

import argparse
import sys

import torch

from data_prep.audio import AudioError, read_audio

from .decoder import add_decoder_args, build_decoder
from .inference import emissions, load_ctc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m finetune.transcribe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a fine-tuned run directory (its best checkpoint) or checkpoint file")
    p.add_argument("audio", nargs="+", help="audio files")
    add_decoder_args(p)
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        cfg, model, dictionary, _ = load_ctc(args.checkpoint, device)
        decode, _, _ = build_decoder(dictionary, args)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    failed = 0
    for path in args.audio:
        try:
            wave = read_audio(path)
        except AudioError as err:
            print(f"error: {path}: cannot transcribe ({err})", file=sys.stderr)
            failed += 1
            continue
        if len(wave) < 400:  # shorter than the conv stack's receptive field (25 ms)
            print(f"error: {path}: too short to transcribe ({len(wave)} samples at 16 kHz)", file=sys.stderr)
            failed += 1
            continue
        print(f"{path}\t{decode(emissions(model, wave, cfg.data.normalize))}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
