"""CPU kernels: phase convolutions, cheap dropout and attention equal the reference operators."""

import torch
import torch.nn.functional as F

from pretrain.models.conv_matmul import conv1d_phases
from pretrain.models.ops import _keep_mask, attention, dropout


def test_phase_convolution_equals_conv1d():
    torch.manual_seed(0)
    for t, c, co, k, s in [(101, 3, 5, 3, 2), (100, 4, 6, 10, 5), (57, 2, 3, 2, 2), (41, 2, 3, 2, 3), (30, 2, 2, 1, 1)]:
        x = torch.randn(2, c, t, dtype=torch.float64, requires_grad=True)
        w = torch.randn(co, c, k, dtype=torch.float64, requires_grad=True)
        b = torch.randn(co, dtype=torch.float64, requires_grad=True)
        y, ref = conv1d_phases(x, w, b, s), F.conv1d(x, w, b, stride=s)
        assert torch.allclose(y, ref, atol=1e-12)
        g = torch.randn_like(ref)
        for a, r in zip(torch.autograd.grad(y, [x, w, b], g), torch.autograd.grad(ref, [x, w, b], g)):
            assert torch.allclose(a, r, atol=1e-12)


def test_dropout_rate_scale_and_gradient():
    torch.manual_seed(0)
    x = torch.ones(1000, 1000, requires_grad=True)
    y = dropout(x, 0.1, True)
    kept = y != 0
    assert abs(1 - kept.float().mean().item() - 0.1) < 0.002
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / 0.9))
    y.sum().backward()
    assert torch.equal(x.grad != 0, kept)
    assert dropout(x, 0.1, False) is x and dropout(x, 0.0, True) is x
    torch.manual_seed(5)
    a = dropout(x, 0.3, True)
    torch.manual_seed(5)
    assert torch.equal(a, dropout(x, 0.3, True))  # reproducible from the torch seed


def test_attention_dropout_is_the_math_formula_with_that_mask():
    q, k, v = (torch.randn(2, 3, 7, 4, dtype=torch.float64) for _ in range(3))
    mask = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    mask[1, ..., 5:] = False
    torch.manual_seed(3)
    out = attention(q, k, v, mask, 0.25, training=True)
    torch.manual_seed(3)
    keep = _keep_mask(torch.Size([6, 7, 16]), 0.25).view(2, 3, 7, 16)[..., :7]  # keys padded to 16
    w = (q @ k.transpose(-1, -2) / 2.0).masked_fill(~mask, float("-inf")).softmax(-1)
    assert torch.allclose(out, (w * keep / 0.75) @ v, atol=1e-12)
    # gradients flow as through the plain formula (same mask)
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    torch.manual_seed(3)
    attention(qg, kg, vg, mask, 0.25, training=True).sum().backward()
    q2, k2, v2 = (x.clone().requires_grad_() for x in (q, k, v))
    w2 = (q2 @ k2.transpose(-1, -2) / 2.0).masked_fill(~mask, float("-inf")).softmax(-1)
    ((w2 * keep / 0.75) @ v2).sum().backward()
    for a, r in ((qg, q2), (kg, k2), (vg, v2)):
        assert torch.allclose(a.grad, r.grad, atol=1e-10)
    assert torch.allclose(attention(q, k, v, mask, 0.25, training=False),
                          F.scaled_dot_product_attention(q, k, v, attn_mask=mask), atol=1e-12)
