"""Numerical parity with transformers' independent port of fairseq (random weights, fp32, no dropout)."""

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import Wav2Vec2Config, Wav2Vec2ForPreTraining  # noqa: E402

from pretrain.interop.hf import hf_config, to_hf  # noqa: E402
from pretrain.models.wav2vec2 import Wav2Vec2Model  # noqa: E402
from pretrain.objectives.masking import compute_mask_indices, sample_negatives  # noqa: E402
from pretrain.objectives.wav2vec2_loss import contrastive_loss, diversity_loss, wav2vec2_loss  # noqa: E402
from pretrain.presets import get_preset  # noqa: E402

RTOL = 1e-5


def _close(a, b, rtol=RTOL):
    a, b = a.detach().double(), b.detach().double()
    err = (a - b).abs().max() / b.abs().max().clamp_min(1e-12)
    assert err <= rtol, f"relative error {err:.2e}"


def _models(variant: str):
    cfg = get_preset("wav2vec2_tiny").model
    cfg.dropout = cfg.attention_dropout = cfg.dropout_input = cfg.dropout_features = 0.0
    cfg.encoder_layerdrop = 0.0
    cfg.conv_feature_layers = [(96, 10, 5)] + [(96, 3, 2)] * 4 + [(96, 2, 2)] * 2
    if variant == "lv60k":
        cfg.layer_norm_first, cfg.extractor_mode, cfg.conv_bias = True, "layer_norm", True
    torch.manual_seed(0)
    ours = Wav2Vec2Model(cfg)
    with torch.no_grad():  # make the norms' affine parameters matter
        for name, p in ours.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    hf = Wav2Vec2ForPreTraining(Wav2Vec2Config(**hf_config(cfg, normalize=False)))
    missing, unexpected = hf.load_state_dict(to_hf(ours.state_dict(), "wav2vec2."), strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return cfg, ours.eval(), hf.eval()


def _inputs(cfg, ours, batch=2, samples=24_000, seed=0):
    rng = np.random.default_rng(seed)
    wav = torch.from_numpy(rng.standard_normal((batch, samples)).astype(np.float32)) * 0.1
    frames = int(ours.feature_extractor.output_lengths(torch.tensor(samples)))
    mask = compute_mask_indices((batch, frames), None, cfg.mask_prob, cfg.mask_length, rng, min_masks=2)
    negs = sample_negatives(batch, int(mask[0].sum()), cfg.num_negatives, rng)
    # transformers wants, per frame, flat indices into the (B*T) frames
    hf_negs = np.zeros((batch, frames, cfg.num_negatives), dtype=np.int64)
    for b in range(batch):
        pos = np.nonzero(mask[b])[0]
        hf_negs[b, pos] = b * frames + pos[negs[b]]
    return wav, torch.from_numpy(mask), torch.from_numpy(negs), torch.from_numpy(hf_negs)


@pytest.mark.parametrize("variant", ["base", "lv60k"])
def test_encoder_targets_logits_and_loss_match_transformers(variant):
    cfg, ours, hf = _models(variant)
    wav, mask, negs, hf_negs = _inputs(cfg, ours)
    with torch.no_grad():
        out = ours(wav, mask_indices=mask, negatives=negs)
        ref = hf(wav, mask_time_indices=mask, sampled_negative_indices=hf_negs, output_hidden_states=True)
        hf_enc = hf.wav2vec2(wav, mask_time_indices=mask).last_hidden_state
    _close(out.encoder_out, hf_enc)
    b, m = negs.shape[:2]
    _close(out.targets, ref.projected_quantized_states[mask].view(b, m, -1))
    _close(out.predictions, ref.projected_states[mask].view(b, m, -1))
    # logits through transformers' own code path, at the masked frames
    q = ref.projected_quantized_states
    hf_neg_vecs = q.reshape(-1, q.shape[-1])[hf_negs.view(-1)].view(*q.shape[:2], -1, q.shape[-1]).permute(2, 0, 1, 3)
    hf_logits = Wav2Vec2ForPreTraining.compute_contrastive_logits(q[None], hf_neg_vecs, ref.projected_states, 0.1)
    hf_logits[1:][(q == hf_neg_vecs).all(-1)] = float("-inf")
    hf_logits = hf_logits.permute(1, 2, 0)[mask].view(b, m, -1)
    finite = torch.isfinite(hf_logits)
    assert torch.equal(finite, torch.isfinite(out.logits))
    _close(out.logits[finite], hf_logits[finite])
    _close(contrastive_loss(out.logits), ref.contrastive_loss)
    # In eval mode transformers measures diversity with the hard codes (our code perplexity).
    _close(diversity_loss(out.quantizer.code_perplexity, out.quantizer.num_vars) * b * m, ref.diversity_loss, 1e-4)
    record = wav2vec2_loss(out, cfg.diversity_weight, feature_pen_weight=0.0)
    hf_total = ref.contrastive_loss + cfg.diversity_weight * diversity_loss(out.quantizer.prob_perplexity, out.quantizer.num_vars) * b * m
    _close(record.loss, hf_total)


def test_training_mode_quantizer_matches_transformers():
    """Same Gumbel noise (same RNG state, same op): identical codes, vectors and soft perplexity."""
    cfg, ours, hf = _models("base")
    ours.train(), hf.train()
    x = torch.randn(2, 40, cfg.conv_feature_layers[-1][0])
    mask = torch.ones(2, 40, dtype=torch.bool)
    torch.manual_seed(123)
    q = ours.quantizer(x)
    torch.manual_seed(123)
    hf.quantizer.temperature = ours.quantizer.temperature
    ref, ref_ppl = hf.quantizer(x, mask_time_indices=mask)
    _close(q.x, ref)
    # fairseq adds 1e-7 inside the log, transformers does not: agreement to ~V * 1e-7.
    _close(q.prob_perplexity, ref_ppl, 1e-4)


def test_padded_batch_matches_transformers():
    cfg, ours, hf = _models("base")
    wav = torch.randn(2, 20_000) * 0.1
    padding = torch.zeros(2, 20_000, dtype=torch.bool)
    padding[1, 13_000:] = True
    wav[1, 13_000:] = 0
    with torch.no_grad():
        out = ours(wav, padding_mask=padding)
        ref = hf.wav2vec2(wav, attention_mask=(~padding).long()).last_hidden_state
    valid = ~out.padding_mask
    assert int(valid[1].sum()) == int(hf._get_feat_extract_output_lengths(torch.tensor(13_000)))
    _close(out.encoder_out[valid], ref[valid])


def test_base_preset_has_the_reference_parameter_count():
    model = Wav2Vec2Model(get_preset("wav2vec2_base").model)
    assert sum(p.numel() for p in model.parameters()) == 95_044_608
    hf_keys = to_hf(model.state_dict(), "wav2vec2.")
    assert len(hf_keys) == 218


@pytest.mark.parametrize("mode", ["default", "layer_norm"])
def test_cpu_matmul_convolutions_equal_the_standard_path(mode):
    from pretrain.models.feature_extractor import FeatureExtractor

    layers = [(32, 10, 5), (32, 3, 2), (32, 3, 2), (32, 2, 2)]
    fe = FeatureExtractor(layers, mode, bias=mode == "layer_norm").double()
    wav = torch.randn(3, 4000, dtype=torch.float64, requires_grad=True)
    fast = fe(wav)
    fe.matmul_on_cpu = False
    slow = fe(wav)
    assert fast.shape == slow.shape and torch.allclose(fast, slow, atol=1e-12)
    g = torch.randn_like(fast)
    ga = torch.autograd.grad(fast, list(fe.parameters()), g)
    gb = torch.autograd.grad(slow, list(fe.parameters()), g)
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(ga, gb))
