"""`python -m data_prep merge`: one pretraining directory from LibriSpeech plus unlabelled sources."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import metric_rows, pretrain_cmd

from data_prep.librilight import LibriLightOptions, prepare_librilight
from data_prep.manifest import read_lines, read_manifest
from data_prep.merge import MergeOptions, merge
from data_prep.sources import open_source


@pytest.fixture(scope="module")
def librilight_prepared(toy_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("librilight")
    prepare_librilight(LibriLightOptions(toy_corpus / "librilight", out, workers=2, valid_percent=0.2, seed=0))
    return out


def full_paths(m) -> list[str]:
    return [os.path.normpath(m.full_path(i)) for i in range(len(m))]


def test_merge_keeps_every_utterance_once_and_balances_shards(prepared, librilight_prepared, tmp_path):
    out = tmp_path / "merged"
    summary = merge(MergeOptions([prepared, librilight_prepared], out, num_shards=3, pack=True, workers=2))
    train = read_manifest(out / "train.tsv")
    parts = [read_manifest(s / "train.tsv") for s in (prepared, librilight_prepared)]
    assert full_paths(train) == full_paths(parts[0]) + full_paths(parts[1])
    assert np.array_equal(train.sizes, np.concatenate([p.sizes for p in parts]))
    assert all(os.path.isfile(p) for p in full_paths(train))
    assert summary["splits"]["train"]["labelled"] is False and not (out / "train.wrd").exists()
    valid = read_manifest(out / "valid.tsv")
    assert len(valid) == sum(len(read_manifest(s / "valid.tsv")) for s in (prepared, librilight_prepared))
    # shards over the union: near-equal audio, every utterance in exactly one
    shards = [read_manifest(out / "shards" / f"train.{k}.tsv") for k in range(3)]
    totals = [int(s.sizes.sum()) for s in shards]
    assert max(totals) - min(totals) <= int(train.sizes.max())
    assert sorted(p for s in shards for p in full_paths(s)) == sorted(full_paths(train))
    source = open_source(out, "train")
    assert type(source).__name__ == "PackedSource" and len(source) == len(train)
    # each source's report, under its name
    report = (out / "report.tsv").read_text().splitlines()
    assert report[0] == "split\tpath\tproblem\tdetail"


def test_labelled_sources_merge_their_labels_and_duplicates_are_kept_once(prepared, tmp_path):
    out = tmp_path / "merged"
    proc = subprocess.run([sys.executable, "-m", "data_prep", "merge", str(prepared), str(prepared), "--out", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "more than once" in proc.stderr
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("train.tsv", "train.wrd", "train.ltr"):
        (copy / name).write_bytes((prepared / name).read_bytes())
    summary = merge(MergeOptions([prepared, copy], out))
    n = len(read_manifest(prepared / "train.tsv"))
    assert summary["duplicates"] == n and summary["splits"]["train"]["labelled"]
    assert read_lines(out / "train.wrd") == read_lines(prepared / "train.wrd")
    assert read_lines(out / "train.ltr") == read_lines(prepared / "train.ltr")
    assert (out / "dict.ltr.txt").read_text().split()[::2] == (prepared / "dict.ltr.txt").read_text().split()[::2]


@pytest.mark.slow
def test_pretraining_runs_on_a_merged_directory(prepared, librilight_prepared, tmp_path):
    out = tmp_path / "merged"
    merge(MergeOptions([prepared, librilight_prepared], out, num_shards=2, pack=True, workers=2))
    run = tmp_path / "run"
    proc = subprocess.run(pretrain_cmd("wav2vec2_tiny", out, run, "--max-steps", "4", "--set", "train.log_interval=1",
                                       "--set", "train.valid_interval=4"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = metric_rows(run)
    assert len(rows) == 4 and all(np.isfinite(r["loss"]) for r in rows)
    assert metric_rows(run, "valid")
    assert json.loads((out / "summary.json").read_text())["packed"] is True
