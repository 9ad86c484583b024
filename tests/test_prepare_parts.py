"""Preparation split into job-array parts, then merged, writes exactly what one run writes."""

from __future__ import annotations

import filecmp

from data_prep.librispeech import PrepOptions, prepare, prepare_part


def _outputs(d):
    return sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file() and ".cache" not in p.parts)


def test_parts_then_merge_equal_one_run(toy_corpus, tmp_path):
    ft = toy_corpus / "librispeech_finetuning"
    one = tmp_path / "one"
    prepare(PrepOptions(root=toy_corpus, out=one, workers=1, finetuning_root=ft, num_shards=2))
    split = tmp_path / "split"
    scanned = 0
    for i in range(3):
        part = prepare_part(PrepOptions(root=toy_corpus, out=split, workers=1, finetuning_root=ft), i, 3)
        scanned += part.usable
        assert not (split / "train.tsv").exists()  # parts write no manifests
    assert len(list((split / ".cache").glob("*.part*.json"))) > 0
    merged = prepare(PrepOptions(root=toy_corpus, out=split, workers=1, finetuning_root=ft, num_shards=2))
    assert scanned == merged.usable
    assert _outputs(one) == _outputs(split)
    for rel in _outputs(one):
        if rel.endswith("summary.json"):
            continue
        assert filecmp.cmp(one / rel, split / rel, shallow=False), rel
    assert not list((split / ".cache").glob("*.part*.json"))  # merged into the split caches
