"""Data preparation and loading throughput, FLAC manifest vs packed shards, measured in one run.

    python benchmarks/data_loading.py [--utterances 400] [--repeats 5] [--out benchmarks/results/data_loading.json]

Scan rate: files checked (fully decoded) per second per core, one worker process.
Loader throughput: audio-seconds of training batches delivered per second per core, in the
training process (no workers), with the wav2vec 2.0 BASE pretraining batching (max_tokens 1.4M,
crop to the shortest item, max 250k samples). Each number is the median of `--repeats` epochs.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from data_prep.librispeech import PrepOptions, prepare  # noqa: E402
from data_prep.loader import AudioLoader, LoaderConfig  # noqa: E402
from data_prep.sources import open_source  # noqa: E402
from data_prep.toy import make_toy_corpus  # noqa: E402


def loader_rate(source, cfg: LoaderConfig, repeats: int) -> float:
    loader = AudioLoader(source, cfg, seed=1)
    rates = []
    for _ in range(repeats):
        start, samples = time.perf_counter(), 0
        for batch in loader:
            samples += batch.num_samples
        rates.append(samples / 16_000 / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--utterances", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "data_loading.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_toy_corpus(tmp / "corpus", args.utterances, seed=0)
        num_files = len(list((tmp / "corpus" / "LibriSpeech").rglob("*.flac")))
        start = time.perf_counter()
        prepare(PrepOptions(root=tmp / "corpus", out=tmp / "m", workers=1))
        prep_seconds = time.perf_counter() - start
        # Packing re-uses the scan cache, so this run only writes the shard.
        prepare(PrepOptions(root=tmp / "corpus", out=tmp / "m", workers=1, num_shards=1, pack=True))
        cfg = LoaderConfig(max_tokens=1_400_000, min_sample_size=32_000, max_sample_size=250_000)
        flac = loader_rate(open_source(tmp / "m", "train", packed=False), cfg, args.repeats)
        packed = loader_rate(open_source(tmp / "m", "train", packed=True), cfg, args.repeats)
    result = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "files": num_files,
        "scan_files_per_second_per_core": round(num_files / prep_seconds, 1),
        "loader_audio_seconds_per_second_per_core": {"flac": round(flac, 1), "packed": round(packed, 1)},
        "packed_over_flac": round(packed / flac, 2),
        "target_packed_over_flac": 10.0,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
