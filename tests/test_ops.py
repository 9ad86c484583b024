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


def test_channels_last_convolution_equals_conv1d():
    from pretrain.models.conv_matmul import conv1d_channels_last

    torch.manual_seed(0)
    # im2col path (C * k <= 64) and strided-run path, k < s, k = s, k > s, k not a multiple of s
    for t, c, co, k, s in [(400, 1, 8, 10, 5), (101, 3, 5, 3, 2), (101, 40, 5, 3, 2), (100, 70, 6, 2, 2),
                           (90, 33, 4, 2, 3), (60, 30, 4, 7, 3), (30, 40, 2, 1, 1)]:
        x = torch.randn(2, c, t, dtype=torch.float64, requires_grad=True)
        w = torch.randn(co, c, k, dtype=torch.float64, requires_grad=True)
        b = torch.randn(co, dtype=torch.float64, requires_grad=True)
        y, ref = conv1d_channels_last(x.transpose(1, 2), w, b, s).transpose(1, 2), F.conv1d(x, w, b, stride=s)
        assert torch.allclose(y, ref, atol=1e-12)
        g = torch.randn_like(ref)
        for a, r in zip(torch.autograd.grad(y, [x, w, b], g), torch.autograd.grad(ref, [x, w, b], g)):
            assert torch.allclose(a, r, atol=1e-12)


def test_grouped_convolution_equals_conv1d():
    from pretrain.models.conv_matmul import grouped_conv1d

    torch.manual_seed(0)
    # even and odd kernels, one channel per group, one group, a kernel longer than the input
    for b, c, t, k, g in [(2, 24, 37, 8, 4), (3, 16, 20, 3, 16), (2, 12, 9, 5, 1), (1, 8, 5, 12, 2)]:
        x = torch.randn(b, t, c, dtype=torch.float64).transpose(1, 2).requires_grad_()  # a channels-last view
        w = torch.randn(c, c // g, k, dtype=torch.float64, requires_grad=True)
        bias = torch.randn(c, dtype=torch.float64, requires_grad=True)
        y, ref = grouped_conv1d(x, w, bias, k // 2, g), F.conv1d(x, w, bias, padding=k // 2, groups=g)
        assert torch.allclose(y, ref, atol=1e-12)
        grad = torch.randn_like(ref)
        for a, r in zip(torch.autograd.grad(y, [x, w, bias], grad), torch.autograd.grad(ref, [x, w, bias], grad)):
            assert torch.allclose(a, r, atol=1e-10)


def test_time_norm_equals_group_norm():
    from pretrain.models.feature_extractor import _TimeNorm

    torch.manual_seed(0)
    x = (torch.randn(2, 3000, 16, dtype=torch.float64) + 3).requires_grad_()  # an offset, chunked sums
    w, b = torch.randn(16, dtype=torch.float64, requires_grad=True), torch.randn(16, dtype=torch.float64, requires_grad=True)
    y, ref = _TimeNorm.apply(x, w, b, 1e-5), F.group_norm(x.transpose(1, 2), 16, w, b, 1e-5).transpose(1, 2)
    assert torch.allclose(y, ref, atol=1e-12)
    g = torch.randn_like(y)
    for a, r in zip(torch.autograd.grad(y, [x, w, b], g), torch.autograd.grad(ref, [x, w, b], g)):
        assert torch.allclose(a, r, atol=1e-10)


def test_packed_self_attention_equals_attention():
    from pretrain.models.ops import self_attention

    qkv = torch.randn(2, 7, 3 * 3 * 4, dtype=torch.float64)
    mask = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    mask[1, ..., 5:] = False
    g = torch.randn(2, 7, 12, dtype=torch.float64)
    x1, x2 = qkv.clone().requires_grad_(), qkv.clone().requires_grad_()
    torch.manual_seed(3)
    y1 = self_attention(x1, 3, mask, 0.25, True)
    q, k, v = x2.view(2, 7, 3, 3, 4).permute(2, 0, 3, 1, 4)
    torch.manual_seed(3)
    y2 = attention(q, k, v, mask, 0.25, True).transpose(1, 2).reshape(2, 7, 12)
    assert torch.equal(y1, y2)
    y1.backward(g)
    y2.backward(g)
    assert torch.allclose(x1.grad, x2.grad, atol=1e-12)
