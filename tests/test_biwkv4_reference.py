"""Tests of the pure-PyTorch Bi-WKV4 references (reference.biwkv4_naive / biwkv4_scan)."""
import pytest
import torch

from reference import biwkv4_naive, biwkv4_scan


def make_inputs(B, T, C, w_scale, k_scale=60.0, u_scale=3.0, dtype=torch.float64, seed=0):
    """w with both signs (|w| * T up to w_scale, the extremes always present), k in
    [-k_scale, k_scale], standard normal v."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.rand(C, generator=g, dtype=torch.float64) * 2 - 1) * w_scale / T
    w[0] = w_scale / T
    if C > 1:
        w[1] = -w_scale / T
    u = torch.randn(C, generator=g, dtype=torch.float64) * u_scale
    k = (torch.rand(B, T, C, generator=g, dtype=torch.float64) * 2 - 1) * k_scale
    v = torch.randn(B, T, C, generator=g, dtype=torch.float64)
    return [x.to(dtype) for x in (w, u, k, v)]


def max_rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


SHAPES = [(1, 1, 3), (2, 2, 3), (2, 15, 5), (1, 33, 4), (2, 257, 3), (1, 1000, 2)]


@pytest.mark.parametrize("B,T,C", SHAPES)
@pytest.mark.parametrize("w_scale", [0.0, 1.0, 30.0, 1000.0])
def test_scan_matches_naive_fp64(B, T, C, w_scale):
    w, u, k, v = make_inputs(B, T, C, w_scale, seed=B * 1000 + T + int(w_scale))
    y_n = biwkv4_naive(w, u, k, v)
    y_s = biwkv4_scan(w, u, k, v)
    assert torch.isfinite(y_s).all()
    assert max_rel(y_s, y_n) < 1e-10


@pytest.mark.parametrize("B,T,C,w_scale", [(2, 9, 3, 100.0), (1, 33, 2, 1000.0), (2, 70, 2, 1.0)])
def test_scan_gradients_match_naive_fp64(B, T, C, w_scale):
    ins = [x.requires_grad_() for x in make_inputs(B, T, C, w_scale, seed=7)]
    gy = torch.randn(B, T, C, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    g_n = torch.autograd.grad(biwkv4_naive(*ins), ins, gy)
    g_s = torch.autograd.grad(biwkv4_scan(*ins), ins, gy)
    for name, a, b in zip("wukv", g_s, g_n):
        assert torch.isfinite(a).all(), name
        assert max_rel(a, b) < 1e-10, name


@pytest.mark.parametrize("B,T,C,w_scale", [(2, 7, 2, 30.0), (1, 20, 2, 1000.0), (1, 70, 1, 2.0)])
def test_scan_gradcheck(B, T, C, w_scale):
    ins = [x.requires_grad_() for x in make_inputs(B, T, C, w_scale, k_scale=5.0, seed=3)]
    assert torch.autograd.gradcheck(biwkv4_scan, ins)


def test_analytic_cases():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(2, 6, 3, generator=g, dtype=torch.float64)
    z = torch.zeros(3, dtype=torch.float64)
    k0 = torch.zeros_like(v)
    # w = u = 0, k = 0: uniform softmax, y_t = mean_i v_i
    for f in (biwkv4_naive, biwkv4_scan):
        y = f(z, z, k0, v)
        torch.testing.assert_close(y, v.mean(1, keepdim=True).expand_as(v), rtol=1e-12, atol=1e-12)
        # T = 1: y = v
        torch.testing.assert_close(f(z, z, k0[:, :1], v[:, :1]), v[:, :1], rtol=0, atol=0)
    # hand-computed T = 2: logits of token 0: (u + k0, k1), of token 1: (k0, u + k1)
    w = torch.tensor([0.3], dtype=torch.float64)
    u = torch.tensor([0.7], dtype=torch.float64)
    k = torch.tensor([[[0.2], [-0.5]]], dtype=torch.float64)
    vv = torch.tensor([[[1.5], [-2.0]]], dtype=torch.float64)
    p0 = torch.softmax(torch.tensor([0.7 + 0.2, -0.5], dtype=torch.float64), 0)
    p1 = torch.softmax(torch.tensor([0.2, 0.7 - 0.5], dtype=torch.float64), 0)
    want = torch.tensor([[[p0[0] * 1.5 - p0[1] * 2.0], [p1[0] * 1.5 - p1[1] * 2.0]]],
                        dtype=torch.float64)
    for f in (biwkv4_naive, biwkv4_scan):
        torch.testing.assert_close(f(w, u, k, vv), want, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes_and_extremes_finite(dtype):
    w, u, k, v = make_inputs(2, 257, 4, 1000.0, seed=11)
    ins = [x.to(dtype).requires_grad_() for x in (w, u, k, v)]
    y = biwkv4_scan(*ins)
    assert y.dtype == dtype
    assert torch.isfinite(y).all()
    grads = torch.autograd.grad(y.float().square().sum(), ins)
    assert all(torch.isfinite(g).all() for g in grads)
    y_ref = biwkv4_naive(*[x.detach().double() for x in ins])
    tol = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    assert max_rel(y.double(), y_ref) < tol


def test_bad_shapes_raise():
    w, u, k, v = make_inputs(1, 4, 3, 1.0)
    with pytest.raises(ValueError, match="w must have shape"):
        biwkv4_scan(w[:2], u, k, v)
    with pytest.raises(ValueError, match="v must have"):
        biwkv4_naive(w, u, k, v[:, :2])
    with pytest.raises(ValueError, match="k must have shape"):
        biwkv4_scan(w, u, k[0], v[0])


def test_scan_long_sequence_fp32():
    """The models' CPU path: C = 640, T = 2160 (4K image, scale s1) in fp32."""
    g = torch.Generator().manual_seed(5)
    T, C = 2160, 640
    w = torch.randn(C, generator=g) * 5 / T
    u = torch.randn(C, generator=g) / T
    k = torch.randn(1, T, C, generator=g)
    v = torch.randn(1, T, C, generator=g)
    y = biwkv4_scan(w, u, k, v)
    assert y.shape == (1, T, C) and y.dtype == torch.float32 and torch.isfinite(y).all()
    # spot-check 8 query rows against the direct softmax
    t = torch.tensor([0, 1, 500, 1079, 1080, 2000, 2158, 2159])
    idx = torch.arange(T)
    d = (t[:, None] - idx[None]).abs().double()
    logits = k.double()[0][None] - (d - 1)[..., None] * w.double()
    logits[torch.arange(len(t)), t] = (u.double() + k.double()[0, t])
    want = (torch.softmax(logits, 1) * v.double()[0][None]).sum(1)
    assert max_rel(y[0, t].double(), want) < 5e-6   # float32 compute
