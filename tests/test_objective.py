"""Loss terms against hand computations."""

import math

import torch

from pretrain.models.quantizer import gumbel_temperature
from pretrain.models.wav2vec2 import GradMultiply, Wav2Vec2Model, contrastive_logits
from pretrain.objectives.wav2vec2_loss import contrastive_accuracy, contrastive_loss, diversity_loss, wav2vec2_loss
from pretrain.presets import get_preset


def test_contrastive_logits_and_identical_negatives():
    preds = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    targets = torch.tensor([[[2.0, 0.0], [0.0, 3.0], [2.0, 0.0]]])  # rows 0 and 2 are identical
    negatives = torch.tensor([[[1, 2], [0, 2], [0, 1]]])
    logits = contrastive_logits(preds, targets, negatives, temperature=0.5)
    c = 1 / math.sqrt(2)
    expected = torch.tensor([[[1.0, 0.0, float("-inf")], [1.0, 0.0, 0.0], [c, float("-inf"), c]]]) / 0.5
    assert torch.equal(torch.isinf(logits), torch.isinf(expected))
    assert torch.allclose(logits[torch.isfinite(logits)], expected[torch.isfinite(expected)])


def test_loss_terms():
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, float("-inf")]]])
    ce = -math.log(math.exp(2) / (math.exp(2) + 2)) - math.log(1 / (1 + math.e))
    assert math.isclose(float(contrastive_loss(logits)), ce, rel_tol=1e-6)
    assert contrastive_accuracy(logits) == (1, 2)
    assert float(diversity_loss(torch.tensor(640.0), 640)) == 0.0
    assert math.isclose(float(diversity_loss(torch.tensor(320.0), 640)), 0.5)


def test_total_loss_includes_feature_penalty():
    cfg = get_preset("wav2vec2_tiny").model
    cfg.feature_pen_weight = 10.0
    model = Wav2Vec2Model(cfg).eval()
    wav = torch.randn(2, 16000)
    mask = torch.zeros(2, 49, dtype=torch.bool)
    mask[:, 5:25] = True
    negs = torch.randint(0, 19, (2, 20, 10))
    negs = negs + (negs >= torch.arange(20)[None, :, None])
    out = model(wav, mask_indices=mask, negatives=negs)
    feats = model.feature_extractor(wav)
    assert torch.allclose(out.features_pen, feats.pow(2).mean())
    rec = wav2vec2_loss(out, 0.1, 10.0)
    s = 40
    expected = contrastive_loss(out.logits) + 0.1 * diversity_loss(out.quantizer.prob_perplexity, 32) * s + 10 * out.features_pen * s
    assert rec.sample_size == s and torch.allclose(rec.loss, expected)


def test_grad_multiply_and_temperature():
    x = torch.ones(3, requires_grad=True)
    GradMultiply.apply(x, 0.1).sum().backward()
    assert torch.allclose(x.grad, torch.full((3,), 0.1))
    assert gumbel_temperature(0, 2.0, 0.5, 0.999995) == 2.0
    assert math.isclose(gumbel_temperature(100_000, 2.0, 0.5, 0.999995), 2 * 0.999995**100_000)
    assert gumbel_temperature(10**7, 2.0, 0.5, 0.999995) == 0.5
