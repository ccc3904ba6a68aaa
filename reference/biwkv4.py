"""Pure-PyTorch references for the Bi-WKV4 operator (Vision-RWKV Eq. 5).

Per batch b and channel c, with tokens t = 0..T-1::

    l(t, i) = k_i - (|t - i| - 1) * w     for i != t
    l(t, t) = u + k_t
    y_t     = sum_i softmax_i(l(t, .)) * v_i

Shapes: ``w, u: (C,)``, ``k, v: (B, T, C)`` -> ``y: (B, T, C)``.

Two implementations:

* :func:`biwkv4_naive` -- the O(T^2) softmax form, computed literally (the ground truth).
* :func:`biwkv4_scan` -- the O(T) form with two exclusive decayed scans (left and right, each
  its own scan), chunked, with an analytic backward (an autograd Function). The models run it
  on CPU where the C kernels of ``kernels_cpu`` cannot be built (``backend="torch"``):
  float32 compute (float64 for float64 inputs) with the
  cross-chunk carries in float64, so its accuracy does not degrade with T; bitwise identical
  results for any number of threads.

``biwkv4_naive`` computes in float64 for float64 input, else float32; both return the input
dtype (``biwkv4_scan``: k's dtype).
"""
from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

__all__ = ["biwkv4_naive", "biwkv4_scan"]

def _check(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if k.dim() != 3:
        raise ValueError(f"k must have shape (B, T, C), got {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    C = k.shape[-1]
    if w.shape != (C,):
        raise ValueError(f"w must have shape (C,) = ({C},), got {tuple(w.shape)}")
    if u.shape != (C,):
        raise ValueError(f"u must have shape (C,) = ({C},), got {tuple(u.shape)}")


def biwkv4_naive(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """O(T^2) softmax form of Bi-WKV4 (Eq. 5). Computes in float64 for float64 input, else
    float32; returns the input dtype. Memory is bounded by processing query blocks."""
    _check(w, u, k, v)
    B, T, C = k.shape
    cdt = torch.float64 if k.dtype == torch.float64 else torch.float32
    wf, uf, kf, vf = (x.to(cdt) for x in (w, u, k, v))
    idx = torch.arange(T, device=k.device)
    # query block size: keep B * blk * T * C around 2^24 elements
    blk = max(1, min(T, (1 << 24) // max(1, B * T * C)))
    outs = []
    for q0 in range(0, T, blk):
        q = idx[q0:q0 + blk]
        dist = (q[:, None] - idx[None, :]).abs().to(cdt)                       # (q, T)
        logits = kf[:, None, :, :] - (dist - 1.0)[None, :, :, None] * wf      # (B, q, T, C)
        diag = (q[:, None] == idx[None, :])[None, :, :, None]
        logits = torch.where(diag, (uf + kf)[:, None, :, :].expand_as(logits), logits)
        p = torch.softmax(logits, dim=2)
        outs.append((p * vf[:, None, :, :]).sum(dim=2))
    return torch.cat(outs, dim=1).to(k.dtype)


# ----------------------------------------------------------------------------------------------
# The O(T) chunked scan (the CPU path of the models)
# ----------------------------------------------------------------------------------------------
#
# Tokens are split into chunks of L (a power of two, L * max|w| <= _BUDGET). Inside chunk n
# every exponential is anchored at the chunk's own maximum m_n = max_j k_j + max(u, 0), so the
# local terms X_j = e^{k_j - m_n} * (v_j, 1) lie in (0, 1]. The decayed sums are plain
# recurrences S_{j+1} = X_j + e^{-w} S_j (one elementwise addcmul per position, vectorised
# over batch, chunks and channels), seeded with the carries from the other chunks. The carries
# are scanned across chunks in float64, each in its own anchor (a running max of the chunk
# anchors minus the decay, cummax), so they neither overflow nor underflow whatever w*T and k
# are, and their rounding does not grow with T. The right-hand sums are their own scans (never
# a total minus a prefix). The backward runs the same machinery on q = gy/D and r = gy*y/D
# (docs/biwkv4.md §3) with a second, distance-weighted recurrence for gw; gw and gu are reduced
# with a fixed pairwise tree. Every op is elementwise, a cummax/amax or a fixed-order tree, so
# results do not depend on the number of threads.

_LMAX = 64          # longest chunk
_BUDGET = 16.0      # largest L * |w| inside one chunk (bounds e^{L|w|} by e^16)
_RESCALE = {torch.float32: 40.0, torch.float64: 500.0}   # largest carry excess kept in m_n units


def _chunk_len(wmax: float, T: int) -> int:
    """Largest power of two L <= min(_LMAX, sqrt(T)) with L * wmax <= _BUDGET (at least 1).
    About sqrt(T): the per-position steps (L of them) and the carry steps (T / L) are Python-level
    loops of small ops, so short sequences get short chunks."""
    L = 1
    while 2 * L <= _LMAX and 4 * L * L <= T and 2 * L * wmax <= _BUDGET:
        L *= 2
    return L


def _tree_sum0(x: torch.Tensor) -> torch.Tensor:
    """Sum over dim 0 by a fixed pairwise tree of elementwise adds (deterministic for any
    thread count); switches to float64 once the rows are few."""
    while x.shape[0] > 1:
        if x.dtype != torch.float64 and x.shape[0] <= 256:
            x = x.double()
        n = x.shape[0]
        h = n // 2
        y = x[:h] + x[h:2 * h]
        if n % 2:
            y[0] += x[2 * h]
        x = y
    return x[0].double() if x.dtype != torch.float64 else x[0]


def _chunk_totals(Y: torch.Tensor, dec: torch.Tensor, dist: bool):
    """Y: (L, B, N, S, C) (position-major chunks). Returns (tot, totd), each (B, N, 2, S, C) or
    totd None: tot[:, :, 0] = sum_j dec^(L-1-j) Y_j (the chunk as seen from its last position),
    tot[:, :, 1] = sum_j dec^j Y_j (as seen from its first); totd the same weighted by the
    exponent (L-1-j, resp. j). Horner's rule, one small elementwise op per position."""
    L = Y.shape[0]
    aL = Y[0].clone()
    aR = Y[L - 1].clone()
    if dist:   # dL, dR hold (distance-weighted sum) / dec
        dL = torch.zeros_like(aL)
        dR = torch.zeros_like(aR)
    for j in range(1, L):
        if dist:
            torch.addcmul(aL, dL, dec, out=dL)
            torch.addcmul(aR, dR, dec, out=dR)
        torch.addcmul(Y[j], aL, dec, out=aL)
        torch.addcmul(Y[L - 1 - j], aR, dec, out=aR)
    tot = torch.stack([aL, aR], 2)
    if not dist:
        return tot, None
    totd = torch.stack([dL, dR], 2).mul_(dec)
    return tot, totd


def _carries(tot, totd, anc, w, L):
    """Cross-chunk scan in float64.

    tot, totd: (B, N, 2, S, C) from :func:`_chunk_totals`, in units e^{anc} (anc: (B, N, C),
    float64). For each chunk n and side (0: the tokens left of the chunk, 1: right of it)
    returns the carry P_n = sum_{i < nL} e^{-(nL-1-i) w} Y_i (left), Q_n = sum_{i >= (n+1)L}
    e^{-(i-(n+1)L) w} Y_i (right) as (Mc, P): P (B, N, 2, S, C) in units e^{Mc}, Mc (B, N, 2, C);
    and, when totd is given, Pd: the same sums weighted by the exponent's distance (else None).
    Each carry has its own anchor Mc_n = max over the chunks n' on its side of anc_n' minus the
    decay between them (a cummax), so every step multiplies by factors <= 1: no overflow or
    underflow for any w * T, and the rounding grows with the number of chunks only linearly in
    float64."""
    B, N, _, S, C = tot.shape
    Lw = w * L                                                       # (C,)
    # position-major, and the right side is the left side of the reversed chunk order
    A2 = torch.stack([anc.transpose(0, 1), anc.flip(1).transpose(0, 1)], 2)   # (N, B, 2, C)
    nLw = torch.arange(N, dtype=torch.float64).view(N, 1, 1, 1) * Lw
    cm = torch.cummax(A2 + nLw, 0).values
    Mc = torch.empty_like(A2)
    Mc[0] = A2[0]
    Mc[1:] = cm[:-1] - nLw[:-1]                                      # max_{n'<n} anc_n' - (n-1-n') Lw
    lev = 1 if totd is None else 2
    PP = torch.zeros(N, B, lev + (lev - 1), 2, S, C, dtype=torch.float64)
    if N > 1:
        a = torch.exp(Mc[:-1] - Lw - Mc[1:]).view(N - 1, B, 1, 2, 1, C)     # <= 1
        b = torch.exp(A2[:-1] - Mc[1:]).view(N - 1, B, 1, 2, 1, C)          # <= 1
        parts = [tot] if totd is None else [tot, totd]
        T2 = torch.stack([torch.stack([t[:, :, 0].transpose(0, 1), t[:, :, 1].flip(1).transpose(0, 1)], 2)
                          for t in parts], 2)                        # (N, B, lev, 2, S, C)
        c = (T2[:-1] * b).unbind(0)
        a = a.unbind(0)
        if totd is None:
            Pn = PP[:, :, 0].unbind(0)
            for n in range(N - 1):
                torch.addcmul(c[n][:, 0], a[n][:, 0], Pn[n], out=Pn[n + 1])
        else:   # levels (P, Pd, tmp): Pd_{n+1} = a (Pd_n + L P_n) + c, P_{n+1} = a P_n + c
            P0, P1, P2 = PP[:, :, 0].unbind(0), PP[:, :, 1].unbind(0), PP[:, :, 2].unbind(0)
            Pe, Pf = PP[:, :, 0::2].unbind(0), PP[:, :, 0:2].unbind(0)
            for n in range(N - 1):
                torch.add(P1[n], P0[n], alpha=L, out=P2[n])
                torch.addcmul(c[n], a[n], Pe[n], out=Pf[n + 1])

    def back(x):   # (N, B, 2, ...) -> (B, N, 2, ...), right side back in chunk order
        x = x.transpose(0, 1)
        return torch.stack([x[:, :, 0], x[:, :, 1].flip(1)], 2)

    return back(Mc), back(PP[:, :, 0]), (None if totd is None else back(PP[:, :, 1]))


def _to_units(P, Mc, U):
    """P * e^{Mc - U} without overflowing on the way (the product itself is bounded)."""
    h = ((Mc - U.unsqueeze(2)) * 0.5).clamp(max=700.0).exp_().unsqueeze(3)
    return P * h * h


class _one_thread:
    """Run the per-position loops on one intra-op thread, then restore the count. They are
    hundreds of small ops, each just above ATen's grain size: split across threads each one pays
    a fork/join, which on a loaded machine (an OpenMP thread waiting for a busy core) costs far
    more than the op. The results do not depend on it (every op is elementwise)."""

    def __enter__(self):
        self.n = torch.get_num_threads()
        if self.n > 1:
            torch.set_num_threads(1)

    def __exit__(self, *exc):
        if self.n > 1:
            torch.set_num_threads(self.n)
        return False


def _pad_chunks(x: torch.Tensor, N: int, L: int, fill: float) -> torch.Tensor:
    B, T, C = x.shape
    if N * L == T:
        return x.reshape(B, N, L, C)
    out = x.new_full((B, N * L, C), fill)
    out[:, :T] = x
    return out.view(B, N, L, C)


def _scan_forward(w, u, k, v):
    """w, u: (C,), k, v: (B, T, C), all in the compute dtype. Returns y (B, T, C) and what the
    backward needs. Chunked buffers are position-major, (L, B, N, ..., C), so that the
    per-position steps work on contiguous blocks."""
    B, T, C = k.shape
    cdt = k.dtype
    wmax = float(w.abs().max()) if C else 0.0
    L = _chunk_len(wmax, T)
    N = -(-T // L)
    k4 = _pad_chunks(k, N, L, -math.inf)                             # (B, N, L, C)
    v4 = _pad_chunks(v, N, L, 0.0)
    dec = torch.exp(-w)
    eu = torch.exp(u)
    m = k4.amax(2) + u.clamp(min=0)                                  # (B, N, C) chunk anchors
    X = torch.empty(L, B, N, 2, C, dtype=cdt)                        # e^{k-m} * (v, 1)
    X1 = X[..., 1, :]
    torch.sub(k4.permute(2, 0, 1, 3), m, out=X1)
    X1.exp_()
    torch.mul(X1, v4.permute(2, 0, 1, 3), out=X[..., 0, :])
    with _one_thread():
        tot, _ = _chunk_totals(X, dec, dist=False)
        anc = m.double()
        Mc, P, _ = _carries(tot.double(), None, anc, w.double(), L)
        excess = float((Mc - anc.unsqueeze(2)).max())
        rescale = excess > _RESCALE[cdt]
        if rescale:   # a carry dwarfs the chunk: work in units of the largest of the three
            U = torch.maximum(anc, Mc.amax(2))
            s = torch.exp(anc - U).to(cdt).view(B, N, 1, C)
            Xl = X * s
        else:
            U = anc
            s = None
            Xl = X
        seeds = _to_units(P, Mc, U).to(cdt)                              # (B, N, 2, 2, C)
        S = torch.empty(L, B, N, 2, C, dtype=cdt)
        S[0] = seeds[:, :, 0]
        for j in range(1, L):
            torch.addcmul(Xl[j - 1], S[j - 1], dec, out=S[j])
        # right-hand sums from the other end, finishing each position while it is in cache:
        # S_j += R_j + e^u X_j, then y_j = num / den
        R = seeds[:, :, 1].contiguous()
        ybuf = torch.empty(B, N * L, C, dtype=cdt)
        y4 = ybuf.view(B, N, L, C).permute(2, 0, 1, 3)
        for j in range(L - 1, -1, -1):
            if j < L - 1:
                torch.addcmul(Xl[j + 1], R, dec, out=R)
            Sj = S[j]
            Sj += R
            Sj.addcmul_(Xl[j], eu)
            torch.div(Sj[..., 0, :], Sj[..., 1, :], out=y4[j])
    den = S[..., 1, :]
    y = ybuf if N * L == T else ybuf[:, :T].contiguous()
    return y, (X, den, ybuf, m, U if rescale else None, s, L, N)


def _scan_backward(w, u, gy, saved):
    X, den, ybuf, m, U, s, L, N = saved
    _, B, _, _, C = X.shape
    T = gy.shape[1]
    cdt = X.dtype
    dec = torch.exp(-w)
    eu = torch.exp(u)
    g4 = _pad_chunks(gy.to(cdt), N, L, 0.0).permute(2, 0, 1, 3)     # (L, B, N, C)
    y4 = ybuf.view(B, N, L, C).permute(2, 0, 1, 3)
    Z = torch.empty(L, B, N, 2, C, dtype=cdt)                        # (q, r) in units e^{-U}
    torch.div(g4, den, out=Z[..., 0, :])
    torch.mul(Z[..., 0, :], y4, out=Z[..., 1, :])
    if N * L != T:   # padded tail (gy = 0 there; den may round to anything)
        Z[T - (N - 1) * L:, :, N - 1] = 0
    # e^{-U} anchors the backward carries (den is at most polynomially large in U units)
    anc = -(m.double() if U is None else U)
    with _one_thread():
        tot, totd = _chunk_totals(Z, dec, dist=True)
        Mc, P, Pd = _carries(tot.double(), totd.double(), anc, w.double(), L)
        if s is not None:   # the local products use X in units e^{m}: bring z to e^{-m}
            Z.mul_(s)
        mloc = -m.double()
        seeds = _to_units(P, Mc, mloc).to(cdt)                           # (B, N, 2, 2, C)
        dseeds = _to_units(Pd, Mc, mloc)
        if L > 1:   # the distance buffers hold (distance-weighted sum) / dec
            dseeds = dseeds * torch.exp(w.double())
        dseeds = dseeds.to(cdt)
        # left: E_j = sum_{i<j} dec^(j-1-i) z_i (+ carry), stored; the distance-weighted
        # D_j = sum_{i<j} (j-1-i) dec^(j-2-i) z_i (+ carry) is only ever dotted with X_j (for gw), so
        # it stays a per-position state and its dot product is accumulated per (chunk, slot)
        X0, X1 = X[..., 0, :], X[..., 1, :]
        accw = torch.zeros(B, N, 2, C, dtype=cdt)
        accu = torch.zeros(B, N, 2, C, dtype=cdt)
        E = torch.empty(L, B, N, 2, C, dtype=cdt)
        E[0] = seeds[:, :, 0]
        DL = dseeds[:, :, 0].contiguous()
        for j in range(L):
            accw.addcmul_(X[j], DL)
            if j < L - 1:
                torch.addcmul(E[j], DL, dec, out=DL)
                torch.addcmul(Z[j], E[j], dec, out=E[j + 1])
        # right: the same from the other end, added in as it goes; each position is then final and
        # its gradients are formed while it is in cache
        ER = seeds[:, :, 1].contiguous()
        DR = dseeds[:, :, 1].contiguous()
        gkbuf = torch.empty(B, N * L, C, dtype=cdt)
        gvbuf = torch.empty(B, N * L, C, dtype=cdt)
        gk4 = gkbuf.view(B, N, L, C).permute(2, 0, 1, 3)
        gv4 = gvbuf.view(B, N, L, C).permute(2, 0, 1, 3)
        for j in range(L - 1, -1, -1):
            if j < L - 1:
                torch.addcmul(ER, DR, dec, out=DR)
                torch.addcmul(Z[j + 1], ER, dec, out=ER)
            Ej, Zj, X1j = E[j], Z[j], X1[j]
            accw.addcmul_(X[j], DR)
            accu.addcmul_(X[j], Zj)
            Ej += ER
            Ej.addcmul_(Zj, eu)                                          # (q-scan, r-scan) incl. diag
            F0, F1 = Ej[..., 0, :], Ej[..., 1, :]
            torch.mul(X1j, F0, out=gv4[j])
            g = torch.mul(X0[j], F0, out=gk4[j])
            g.addcmul_(X1j, F1, value=-1)
    accw = accw[:, :, 0] - accw[:, :, 1]        # (B, N, C): v-slot minus 1-slot, per chunk
    accu = accu[:, :, 0] - accu[:, :, 1]
    gw = _tree_sum0(accw.view(-1, C))
    gw = -gw * dec.double() if L > 1 else -gw
    gu = _tree_sum0(accu.view(-1, C)) * eu.double()
    if N * L != T:
        gkbuf, gvbuf = gkbuf[:, :T], gvbuf[:, :T]
    return gw, gu, gkbuf, gvbuf


class _BiWKV4Scan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, u, k, v):
        cdt = torch.float64 if torch.float64 in (w.dtype, u.dtype, k.dtype, v.dtype) else torch.float32
        wc, uc, kc, vc = (x.detach().to(cdt) for x in (w, u, k, v))
        y, saved = _scan_forward(wc, uc, kc, vc)
        X, den, ybuf, m, U, s, L, N = saved
        ctx.meta = (L, N, w.dtype, u.dtype, k.dtype, v.dtype)
        if any(ctx.needs_input_grad):
            ctx.save_for_backward(wc, uc, X, den, ybuf, m, U, s)
        return y.to(k.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        wc, uc, X, den, ybuf, m, U, s = ctx.saved_tensors
        L, N, wdt, udt, kdt, vdt = ctx.meta
        gw, gu, gk, gv = _scan_backward(wc, uc, gy, (X, den, ybuf, m, U, s, L, N))
        return gw.to(wdt), gu.to(udt), gk.to(kdt), gv.to(vdt)


def biwkv4_scan(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """O(T) Bi-WKV4 (Eq. 5), the CPU path of the models: y_t = (A_t + C_t + e^{u+k_t} v_t) /
    (B_t + D_t + e^{u+k_t}) with A, B the exclusive left sums and C, D the exclusive right sums
    (each its own scan, never obtained by subtraction). Computes in float32 (float64 when an
    input is float64; float16/bfloat16 in float32), returns k's dtype. Analytic backward
    (autograd Function; not twice differentiable). Stable for w of either sign and any |w|*T,
    |k| up to ~60 in float32; bitwise deterministic, also across thread counts."""
    _check(w, u, k, v)
    if k.shape[1] == 0 or k.shape[0] == 0 or k.shape[2] == 0:
        return torch.empty_like(k)
    return _BiWKV4Scan.apply(w, u, k, v)
