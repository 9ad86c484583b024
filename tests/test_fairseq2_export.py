"""fairseq2 export: key names and shapes of the base architecture (always), and loading and running
the exported checkpoints with fairseq2 itself (opt-in: FAIRSEQ2_PYTHON names a Python with
fairseq2 0.8.1, which needs its own torch 2.9.1, e.g. `python -m venv fs2 && fs2/bin/pip install fairseq2==0.8.1`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from pretrain.interop.fairseq2 import to_fairseq2
from pretrain.models.wav2vec2 import Wav2Vec2Model
from pretrain.presets import get_preset


def test_base_keys_match_fairseq2():
    cfg = get_preset("wav2vec2_base").model
    with torch.device("meta"):
        model = Wav2Vec2Model(cfg)
    out = to_fairseq2(model.state_dict(), cfg, num_updates=7)
    assert len(out) == 219
    assert sum(v.numel() for v in out.values()) - 1 == 95_044_608  # num_updates is a counter, not a parameter
    shapes = {k: tuple(v.shape) for k, v in out.items()}
    assert shapes["encoder_frontend.pos_encoder.conv.weight_g"] == (1, 1, 128)
    assert shapes["encoder_frontend.pos_encoder.conv.weight_v"] == (768, 48, 128)
    assert shapes["quantizer.entries"] == (1, 640, 128)
    assert shapes["final_proj.weight"] == (256, 768) and shapes["final_target_proj.weight"] == (256, 256)
    assert shapes["encoder.layers.11.self_attn.q_proj.weight"] == (768, 768)
    assert "encoder_frontend.feature_extractor.layers.0.group_norm.weight" in out
    assert "encoder_frontend.layer_norm.weight" in out and "encoder.layer_norm.weight" not in out
    assert out["quantizer.num_updates"].dtype == torch.int64 and int(out["quantizer.num_updates"]) == 7


def test_pre_ln_layer_norm_extractor_names():
    cfg = get_preset("wav2vec2_large_lv60k").model
    with torch.device("meta"):
        model = Wav2Vec2Model(cfg)
    out = to_fairseq2(model.state_dict(), cfg)
    assert "encoder.layer_norm.weight" in out and "encoder_frontend.layer_norm.weight" not in out
    assert "encoder_frontend.feature_extractor.layers.6.layer_norm.weight" in out
    assert "encoder_frontend.feature_extractor.layers.6.conv.bias" in out


def test_data2vec_is_refused():
    cfg = get_preset("data2vec_tiny").model
    with pytest.raises(ValueError, match="no data2vec"):
        to_fairseq2({}, cfg)


FS2_SCRIPT = textwrap.dedent("""
    import json, sys, numpy as np, torch
    from fairseq2.models.hub import load_model
    from fairseq2.nn import BatchLayout
    names, wave_path = sys.argv[1:3]
    wave = torch.from_numpy(np.load(wave_path))[None]
    out = {}
    for name in names.split(","):
        model = load_model(name, device=torch.device("cpu"), dtype=torch.float32).eval()
        if name.endswith("asr"):
            with torch.no_grad():
                logits, _ = model(wave, BatchLayout(wave.shape, seq_lens=[wave.shape[1]]))
            out[name] = logits[0].tolist()
        else:
            out[name] = sum(p.numel() for p in model.parameters())
    print(json.dumps(out))
""")


@pytest.mark.skipif(not os.environ.get("FAIRSEQ2_PYTHON"), reason="opt-in: set FAIRSEQ2_PYTHON to a Python with fairseq2 0.8.1")
def test_fairseq2_loads_and_matches(tmp_path, prepared):
    from conftest import finetune_cmd, pretrain_cmd, run_ok

    from finetune.inference import emissions, load_ctc

    pre, ctc = tmp_path / "pre", tmp_path / "ctc"
    run_ok(pretrain_cmd("wav2vec2_tiny", prepared, pre, "--max-steps", "4"))
    run_ok(finetune_cmd(pre, prepared, ctc, "--max-steps", "4", "--set", "ctc.freeze_finetune_updates=0",
                        "--set", "train.valid_interval=1000"))
    cards = tmp_path / "cards"
    cards.mkdir()
    for stage, run, name in (("pretrain", pre, "tiny_ssl"), ("finetune", ctc, "tiny_asr")):
        run_ok([sys.executable, "-m", f"{stage}.export", str(run), "--format", "fairseq2",
                "--out", str(tmp_path / name), "--name", name])
        (cards / f"{name}.yaml").write_text((tmp_path / name / f"{name}.yaml").read_text())
    rng = np.random.default_rng(0)
    wave = (rng.standard_normal(24_000) * 0.1).astype(np.float32)
    np.save(tmp_path / "wave.npy", wave)
    script = tmp_path / "fs2_run.py"
    script.write_text(FS2_SCRIPT)
    env = dict(os.environ, FAIRSEQ2_USER_ASSET_DIR=str(cards))
    proc = subprocess.run([os.environ["FAIRSEQ2_PYTHON"], str(script), "tiny_ssl,tiny_asr", str(tmp_path / "wave.npy")],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    cfg, model, _, _ = load_ctc(ctc)
    ours = emissions(model, wave, cfg.data.normalize)
    theirs = torch.tensor(result["tiny_asr"])
    assert theirs.shape == ours.shape
    assert float((theirs - ours).abs().max()) < 1e-4
    from pretrain.extract import load_encoder

    _, pretrained = load_encoder(pre, torch.device("cpu"))
    assert result["tiny_ssl"] == sum(p.numel() for p in pretrained.parameters())
