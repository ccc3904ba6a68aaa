"""Tests for hpcm_triton.rwkv (docs/architecture.md §5 building blocks). Small sizes; CPU; whole file ~tens of s."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from hpcm_triton.rwkv import (
    ChannelMix,
    ConcatRWKVContextCell,
    OmniShift,
    RWKVContextCell,
    RWKVFusionBlock,
    RWKVFusionNet,
    RWKVSpatialPrior,
    SpatialMix,
)

RESOLUTIONS = [(1, 1), (3, 5), (8, 8), (16, 16)]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ----------------------------------------------------------------------------- helpers
def eq5(w, u, k, v):
    """docs/biwkv4.md §1 (Eq. 5) by brute force, independent of the project's operator: (B,T,C) → (B,T,C)."""
    B, T, C = k.shape
    idx = torch.arange(T)
    dist = (idx[:, None] - idx[None, :]).abs().to(k.dtype)  # (t, i)
    logits = k[:, None, :, :] - (dist - 1)[None, :, :, None] * w  # (B, t, i, C)
    eye = torch.eye(T, dtype=torch.bool)[None, :, :, None]
    logits = torch.where(eye, (u + k)[:, :, None, :].expand_as(logits), logits)
    p = torch.softmax(logits, dim=2)
    return (p * v[:, None, :, :]).sum(2)


def tokens(x):
    return x.flatten(2).transpose(1, 2)


def randomize(module, scale=0.3):
    """Non-trivial values for every parameter (fresh modules have α = (1,0,0,0), γ = 1, ...)."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * scale)
    return module


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def block_params(C, h):
    return (2 * h + 5) * C * C + 78 * C + 8


def cell_params(C, h):
    return (2 * h + 6) * C * C + 116 * C + 12


# ----------------------------------------------------------------------------- OmniShift
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_omnishift_reparam_equals_train(dtype, tol):
    m = randomize(OmniShift(8)).to(dtype)
    x = torch.randn(2, 8, 7, 9, dtype=dtype)
    m.train()
    y_train = m(x)
    m.eval()
    with torch.no_grad():
        y_eval = m(x)
    torch.testing.assert_close(y_eval, y_train.detach(), rtol=tol, atol=tol)
    # the eval path really is the fused 5×5 (not the training branches)
    ref = F.conv2d(x, m.reparam_weight().detach(), padding=2, groups=8)
    torch.testing.assert_close(y_eval, ref, rtol=0, atol=0)
    # and back in train mode nothing changed
    m.train()
    torch.testing.assert_close(m(x).detach(), y_train.detach(), rtol=0, atol=0)


def test_omnishift_fresh_is_identity_and_deterministic():
    m = OmniShift(6)
    x = torch.randn(1, 6, 4, 5)
    torch.testing.assert_close(m(x), x, rtol=0, atol=0)
    assert m.alpha.tolist() == [1.0, 0.0, 0.0, 0.0]


def test_omnishift_state_dict_and_round_trip():
    m = randomize(OmniShift(8)).eval()
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        y = m(x)  # populates the reparam cache
    sd = m.state_dict()
    assert set(sd) == {"alpha", "conv1x1.weight", "conv3x3.weight", "conv5x5.weight"}
    torch.manual_seed(123)
    fresh = OmniShift(8).eval()
    with torch.no_grad():
        y_fresh_before = fresh(x)  # fills fresh's cache with its own weights
    assert not torch.allclose(y_fresh_before, y)
    fresh.load_state_dict(sd)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), y, rtol=0, atol=0)


def test_omnishift_cache_follows_optimizer_steps():
    m = randomize(OmniShift(4))
    x = torch.randn(1, 4, 5, 5)
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    for _ in range(2):
        m.eval()
        with torch.no_grad():
            m(x)  # cache the current weights
        m.train()
        m(x).square().sum().backward()
        opt.step()
        opt.zero_grad()
        # eval without a train()/eval() switch must still see the new weights
        m.training = False
        for sub in m.children():
            sub.training = False
        with torch.no_grad():
            y_eval = m(x)
        torch.testing.assert_close(y_eval, m.forward_train(x).detach(), rtol=1e-5, atol=1e-5)


def test_omnishift_data_edits_need_mode_switch_or_invalidate():
    # edits through .data bypass the version counter; eval() (and invalidate_reparam) drop the cache
    m = randomize(OmniShift(4)).eval()
    x = torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        m(x)
        m.alpha.data.mul_(2.0)
        m.eval()
        torch.testing.assert_close(m(x), m.forward_train(x), rtol=1e-5, atol=1e-5)
        m.conv3x3.weight.data.mul_(-1.0)
        m.invalidate_reparam()
        torch.testing.assert_close(m(x), m.forward_train(x), rtol=1e-5, atol=1e-5)


def test_omnishift_eval_mode_parameter_grads():
    m = randomize(OmniShift(4)).double()
    x = torch.randn(2, 4, 6, 3, dtype=torch.float64)
    g = {}
    for mode in (True, False):
        m.train(mode)
        m.zero_grad()
        m(x).sin().sum().backward()
        g[mode] = [p.grad.clone() for p in m.parameters()]
    for a, b in zip(g[True], g[False]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- SpatialMix
def _spatial_mix_by_hand(m, x, kv=None, naive=eq5, divide_by_T=True):
    H, W = x.shape[-2:]
    T = H * W
    s = tokens(m.omni_shift(x))
    s_kv = s if kv is None else tokens(m.omni_shift_kv(kv))
    r = s @ m.receptance.weight.T
    k = s_kv @ m.key.weight.T
    v = s_kv @ m.value.weight.T
    div = T if divide_by_T else 1
    y = naive(m.decay / div, m.boost / div, k, v)
    out = (torch.sigmoid(r) * y) @ m.output.weight.T
    return out.transpose(1, 2).reshape(x.shape)


@pytest.mark.parametrize("H,W", [(1, 1), (3, 5), (4, 1)])
def test_spatial_mix_matches_naive_operator(H, W):
    from reference import biwkv4_naive  # the project's pure-torch Eq. 5

    m = SpatialMix(6).double()
    with torch.no_grad():  # |decay| ~ T so that decay vs decay/T differ visibly
        m.decay.copy_(torch.randn(6, dtype=torch.float64) * 2 * H * W)
        m.boost.copy_(torch.randn(6, dtype=torch.float64) * 2)
        m.omni_shift.alpha.copy_(torch.tensor([0.5, 0.3, -0.2, 0.4]))
    x = torch.randn(2, 6, H, W, dtype=torch.float64)
    out = m(x)
    assert out.shape == x.shape
    want = _spatial_mix_by_hand(m, x, naive=biwkv4_naive)
    torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-10)
    # the project's naive operator agrees with the brute-force Eq. 5 of this file
    torch.testing.assert_close(want, _spatial_mix_by_hand(m, x), rtol=1e-9, atol=1e-10)
    if H * W > 2:  # the test can tell decay/T from decay, and raster from column order
        assert not torch.allclose(out, _spatial_mix_by_hand(m, x, divide_by_T=False), atol=1e-4)
        xt = x.transpose(2, 3).contiguous()
        col = _spatial_mix_by_hand(m, xt).transpose(2, 3)
        if H > 1 and W > 1:
            assert not torch.allclose(out, col, atol=1e-4)


def test_spatial_mix_cross_uses_kv_stream():
    m = SpatialMix(5, cross=True).double()
    randomize(m.omni_shift_kv)
    x = torch.randn(2, 5, 3, 4, dtype=torch.float64)
    kv = torch.randn(2, 5, 3, 4, dtype=torch.float64)
    torch.testing.assert_close(m(x, kv), _spatial_mix_by_hand(m, x, kv), rtol=1e-9, atol=1e-10)
    with pytest.raises(ValueError):
        SpatialMix(5)(x, kv)


def test_spatial_mix_tokens_api_matches_map_api():
    m = SpatialMix(4)
    x = torch.randn(3, 4, 5, 2)
    y_tok = m.forward_tokens(tokens(x), 5, 2)
    torch.testing.assert_close(tokens(m(x)), y_tok)


# ----------------------------------------------------------------------------- ChannelMix
def test_channel_mix_formula():
    m = ChannelMix(6, hidden_rate=3).double()
    randomize(m.omni_shift)
    assert m.key.weight.shape == (18, 6) and m.value.weight.shape == (6, 18)
    x = torch.randn(2, 6, 4, 3, dtype=torch.float64)
    s = m.omni_shift(x)
    want = torch.empty_like(x)
    # per position, in plain matrix-vector form
    for b in range(2):
        for i in range(4):
            for j in range(3):
                z = s[b, :, i, j]
                hid = torch.clamp(m.key.weight @ z, min=0) ** 2
                want[b, :, i, j] = torch.sigmoid(m.receptance.weight @ z) * (m.value.weight @ hid)
    torch.testing.assert_close(m(x), want, rtol=1e-10, atol=1e-12)
    assert n_params(m) == 6 * 6 + 2 * 6 * 18 + 35 * 6 + 4


# ----------------------------------------------------------------------------- blocks
def test_fusion_block_formula():
    blk = RWKVFusionBlock(5, hidden_rate=2).double()
    randomize(blk, 0.4)
    x = torch.randn(2, 5, 3, 4, dtype=torch.float64)
    t = tokens(x)
    ln = lambda z, m: F.layer_norm(z, (5,), m.weight, m.bias, m.eps)  # noqa: E731
    a = tokens(blk.spatial_mix(ln(t, blk.ln1).transpose(1, 2).reshape(x.shape)))
    t = t + blk.gamma1 * a
    c = tokens(blk.channel_mix(ln(t, blk.ln2).transpose(1, 2).reshape(x.shape)))
    t = t + blk.gamma2 * c
    torch.testing.assert_close(blk(x), t.transpose(1, 2).reshape(x.shape), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("H,W", RESOLUTIONS)
def test_fusion_net_shapes(H, W, dtype):
    net = RWKVFusionNet(16, num_blocks=2, hidden_rate=2).to(dtype)
    for B in (1, 3):
        x = torch.randn(B, 16, H, W, dtype=dtype)
        y = net(x)
        assert y.shape == x.shape and y.dtype == dtype
        assert torch.isfinite(y).all()


def test_fusion_eval_matches_train():
    net = RWKVFusionNet(12, num_blocks=2, hidden_rate=2)
    for blk in net.blocks:
        randomize(blk.spatial_mix.omni_shift)
        randomize(blk.channel_mix.omni_shift)
    x = torch.randn(2, 12, 6, 7)
    y_train = net.train()(x).detach()
    with torch.no_grad():
        y_eval = net.eval()(x)
    torch.testing.assert_close(y_eval, y_train, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("C,h,nb", [(16, 4, 1), (20, 2, 3), (24, 3, 2)])
def test_param_count_formulas_small(C, h, nb):
    assert n_params(RWKVFusionBlock(C, h)) == block_params(C, h)
    assert n_params(RWKVFusionNet(C, nb, h)) == nb * block_params(C, h) + C * C + C
    assert n_params(RWKVContextCell(C, h)) == cell_params(C, h)
    M = C // 2
    prior = RWKVSpatialPrior(M, num_blocks=nb, hidden_rate=h)
    assert n_params(prior) == (nb + 1) * block_params(3 * M, h) + 6 * M * M + 2 * M


def test_param_counts_hpcm_sizes():
    # Built on the meta device: counts only, no memory.
    with torch.device("meta"):
        net = RWKVFusionNet(640, num_blocks=1, hidden_rate=4)
        cells = {r: RWKVContextCell(640, hidden_rate=r) for r in (2, 3, 4)}
        prior = RWKVSpatialPrior(320)
        prior_s3 = RWKVSpatialPrior(320, num_blocks=3, num_post_blocks=2)
    assert n_params(net) == 5_784_968
    assert {r: n_params(c) for r, c in cells.items()} == {2: 4_170_252, 3: 4_989_452, 4: 5_808_652}
    assert n_params(prior) == 36_782_104
    assert n_params(prior_s3) == 60_893_480


def test_gradients_reach_decay_boost_gamma():
    net = RWKVFusionNet(8, num_blocks=1, hidden_rate=2)
    x = torch.randn(2, 8, 4, 4)
    net(x).square().mean().backward()
    blk = net.blocks[0]
    for p in (blk.spatial_mix.decay, blk.spatial_mix.boost, blk.gamma1, blk.gamma2,
              blk.spatial_mix.omni_shift.alpha, blk.channel_mix.omni_shift.alpha):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- context cell
@pytest.mark.parametrize("H,W", [(1, 1), (3, 5), (8, 8), (7, 16)])
def test_context_cell_contract(H, W):
    cell = RWKVContextCell(16, hidden_rate=3)
    x_t = torch.randn(2, 16, H, W)
    h_prev = torch.randn(2, 16, H, W)
    h_t = cell(x_t, h_prev)
    assert h_t.shape == x_t.shape and torch.isfinite(h_t).all()
    # depends on both streams
    assert not torch.allclose(cell(x_t, h_prev + torch.randn_like(h_prev)), h_t, atol=1e-5)
    assert not torch.allclose(cell(x_t + torch.randn_like(x_t), h_prev), h_t, atol=1e-5)


def test_context_cell_gamma_zero_is_conv_out():
    cell = RWKVContextCell(8, hidden_rate=2)
    with torch.no_grad():
        cell.gamma1.zero_()
        cell.gamma2.zero_()
    x_t, h_prev = torch.randn(2, 2, 8, 3, 3).unbind(0)
    torch.testing.assert_close(cell(x_t, h_prev), cell.conv_out(x_t))
    with pytest.raises(ValueError):
        cell(x_t, h_prev[..., :2])


def test_context_cell_float64_and_hidden_rate():
    cell = RWKVContextCell(10, hidden_rate=2).double()
    assert cell.channel_mix.key.out_features == 20
    y = cell(*torch.randn(2, 1, 10, 4, 4, dtype=torch.float64).unbind(0))
    assert y.dtype == torch.float64 and y.shape == (1, 10, 4, 4)


# ----------------------------------------------------------------------------- spatial prior
@pytest.mark.parametrize("H,W", [(1, 1), (4, 6)])
def test_spatial_prior_contract(H, W):
    M = 8
    prior = RWKVSpatialPrior(M, num_blocks=2, hidden_rate=2)
    x = torch.randn(2, 3 * M, H, W)
    q = torch.ones(1, 3 * M, 1, 1)
    out = prior(x, q)
    assert out.shape == (2, 2 * M, H, W) and torch.isfinite(out).all()
    out2 = prior(x, q * 1.5 + 0.1 * torch.randn_like(q))
    assert not torch.allclose(out, out2, atol=1e-5)
    assert len(prior.branch_1) == 2 and len(prior.branch_2) == 2


def test_spatial_prior_formula():
    M = 4
    prior = RWKVSpatialPrior(M, num_blocks=1, num_post_blocks=1, hidden_rate=2).double()
    x = torch.randn(1, 12, 3, 3, dtype=torch.float64)
    q = torch.rand(1, 12, 1, 1, dtype=torch.float64) + 0.5
    b1, b2, conv = prior.branch_1[0], prior.branch_2[0], prior.branch_2[1]
    torch.testing.assert_close(prior(x, q), conv(b2(b1(x) * q)), rtol=0, atol=0)


# ----------------------------------------------------------------------------- checkpointing
def _grads(module, inputs):
    module.zero_grad()
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = module(*inputs)
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    return [p.grad.clone() for p in module.parameters()] + [t.grad for t in inputs]


@pytest.mark.parametrize("kind", ["block", "net", "cell", "prior"])
def test_checkpoint_same_gradients(kind):
    if kind == "block":
        m, inputs = RWKVFusionBlock(12, 2), [torch.randn(2, 12, 5, 6)]
    elif kind == "net":
        m, inputs = RWKVFusionNet(12, 2, 2), [torch.randn(2, 12, 5, 6)]
    elif kind == "cell":
        m, inputs = RWKVContextCell(12, 2), list(torch.randn(2, 2, 12, 5, 6).unbind(0))
    else:
        m, inputs = RWKVSpatialPrior(4, hidden_rate=2), [torch.randn(2, 12, 5, 6),
                                                          torch.rand(1, 12, 1, 1) + 0.5]
    m.train()
    mc = copy.deepcopy(m)
    mc.use_checkpoint = True
    assert mc.use_checkpoint and not m.use_checkpoint
    g_plain = _grads(m, inputs)
    g_ckpt = _grads(mc, inputs)
    assert len(g_plain) == len(g_ckpt)
    for a, b in zip(g_plain, g_ckpt):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # the flag is honoured: with checkpointing the block internals are not saved
    assert _saved_fewer(m, mc, inputs)


def _saved_fewer(m, mc, inputs):
    def count(module):
        n = 0

        def pack(t):
            nonlocal n
            n += 1
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            module(*[t.detach().requires_grad_(True) for t in inputs])
        return n

    return count(mc) < count(m)


# ----------------------------------------------------------------------------- the fork's cell design
def concat_cell_params(C, h):
    return 2 * C * C + C + block_params(C, h) + C * C + C


@pytest.mark.parametrize("H,W", [(1, 1), (3, 5), (8, 8)])
def test_concat_cell_contract(H, W):
    cell = ConcatRWKVContextCell(16, hidden_rate=3)
    x_t, h_prev = torch.randn(2, 2, 16, H, W).unbind(0)
    h_t = cell(x_t, h_prev)
    assert h_t.shape == x_t.shape and torch.isfinite(h_t).all()
    assert not torch.allclose(cell(x_t, h_prev + torch.randn_like(h_prev)), h_t, atol=1e-5)
    assert not torch.allclose(cell(x_t + torch.randn_like(x_t), h_prev), h_t, atol=1e-5)
    with pytest.raises(ValueError):
        cell(x_t, h_prev[:1])


def test_concat_cell_formula():
    cell = randomize(ConcatRWKVContextCell(6, hidden_rate=2).double(), 0.3)
    x_t, h_prev = torch.randn(2, 2, 6, 3, 4, dtype=torch.float64).unbind(0)
    want = cell.conv_out(cell.block(cell.conv_in(torch.cat((x_t, h_prev), dim=1))))
    torch.testing.assert_close(cell(x_t, h_prev), want, rtol=0, atol=0)
    assert cell.block.channel_mix.key.out_features == 12


@pytest.mark.parametrize("C,h", [(16, 4), (20, 2), (24, 3)])
def test_concat_cell_param_count(C, h):
    assert n_params(ConcatRWKVContextCell(C, h)) == concat_cell_params(C, h) == (2 * h + 8) * C * C + 80 * C + 8


def test_both_cell_designs_at_hpcm_sizes():
    with torch.device("meta"):
        fork = {r: n_params(ConcatRWKVContextCell(640, hidden_rate=r)) for r in (2, 3, 4)}
        own = {r: n_params(RWKVContextCell(640, hidden_rate=r)) for r in (2, 3, 4)}
    assert fork == {2: 4_966_408, 3: 5_785_608, 4: 6_604_808}
    assert own == {2: 4_170_252, 3: 4_989_452, 4: 5_808_652}


def test_concat_cell_checkpoint_same_gradients():
    m = ConcatRWKVContextCell(12, 2).train()
    inputs = list(torch.randn(2, 2, 12, 5, 6).unbind(0))
    mc = copy.deepcopy(m)
    mc.use_checkpoint = True
    assert mc.use_checkpoint and mc.block.use_checkpoint and not m.use_checkpoint
    for a, b in zip(_grads(m, inputs), _grads(mc, inputs)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert _saved_fewer(m, mc, inputs)
