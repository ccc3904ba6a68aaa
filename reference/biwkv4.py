"""Pure-PyTorch references for the Bi-WKV4 operator (Vision-RWKV Eq. 5).

Per batch b and channel c, with tokens t = 0..T-1::

    l(t, i) = k_i - (|t - i| - 1) * w     for i != t
    l(t, t) = u + k_t
    y_t     = sum_i softmax_i(l(t, .)) * v_i

Shapes: ``w, u: (C,)``, ``k, v: (B, T, C)`` -> ``y: (B, T, C)``.

Two implementations:

* :func:`biwkv4_naive` -- the O(T^2) softmax form, computed literally (the ground truth).
* :func:`biwkv4_scan` -- the O(T) form with two exclusive decayed scans (left and right),
  kept in log space as (offset, mantissa) pairs, vectorised over B, C and over chunks of T.
  It is differentiable by plain autograd and is the CPU execution path of the models.

Both compute in float64 internally (``biwkv4_naive`` in float32 for 16/32-bit inputs) and
return the input dtype.
"""
from __future__ import annotations

import math

import torch

__all__ = ["biwkv4_naive", "biwkv4_scan"]

# Largest |w| * L allowed inside one chunk of the scan. Inside a chunk the prefix sums are
# plain cumulative sums of exp(k_j + j*w - max); this bounds how far below the chunk's
# maximum a query's own terms can sit (|w|*L plus the spread of k), which float64 holds
# without underflow for any spread of k up to several hundred.
_W_BUDGET = 48.0
_MAX_CHUNK = 64


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


def _chunk_len(wmax: float, T: int) -> int:
    """Largest power of two L <= _MAX_CHUNK with wmax * L <= _W_BUDGET (at least 1)."""
    L = 1
    while L * 2 <= _MAX_CHUNK and wmax * L * 2 <= _W_BUDGET and L < T:
        L *= 2
    return L


def _incl_scan_seq(a: torch.Tensor, s: torch.Tensor, w: torch.Tensor):
    """Inclusive scan, one step per position. Used only when |w| is so large that chunks
    would have length 1 (the sequence is then short whenever |w|*T is moderate)."""
    T = a.shape[1]
    l, r = a[:, 0], s[:, 0]
    ls, rs = [l], [r]
    for t in range(1, T):
        lp = l - w
        l_new = torch.logaddexp(lp, a[:, t])
        r = r + (s[:, t] - r) * torch.sigmoid(a[:, t] - lp)
        l = l_new
        ls.append(l)
        rs.append(r)
    return torch.stack(ls, 1), torch.stack(rs, 1)


def _incl_scan(a: torch.Tensor, s: torch.Tensor, w: torch.Tensor):
    """Inclusive decayed scan in log space.

    For a, s: (Bq, T, C) (float64, a finite) and w: (C,), returns (l, r), each (Bq, T, C), with
        sum_{i<=t} e^{a_i - (t-i) w} * (s_i, 1) = e^{l_t} * (r_t, 1),
    i.e. l is the log of the weight sum and r the weighted mean of s. Chunks of length L use
    cumulative sums of e^{a_j + j w - max_j}; the chunk totals are scanned by the same function
    with decay L*w (recursively) and carried into the next chunk.
    """
    Bq, T, C = a.shape
    if T == 1:
        return a, s
    wmax = float(w.detach().abs().max()) if w.numel() else 0.0
    L = _chunk_len(wmax, T)
    if L == 1:
        return _incl_scan_seq(a, s, w)
    N = -(-T // L)
    pad = N * L - T
    if pad:  # padded tail: weight exactly zero, only affects discarded positions
        a = torch.cat([a, a.new_full((Bq, pad, C), -math.inf)], 1)
        s = torch.cat([s, s.new_zeros((Bq, pad, C))], 1)
    a = a.view(Bq, N, L, C)
    s = s.view(Bq, N, L, C)
    jw = torch.arange(L, device=a.device, dtype=a.dtype).view(L, 1) * w      # (L, C)
    aj = a + jw                                         # (Bq, N, L, C)
    m = aj.amax(dim=2, keepdim=True).detach()           # finite: each chunk has a real element
    e = torch.exp(aj - m)
    cum_d = torch.cumsum(e, dim=2).clamp_min(1e-300)
    cum_n = torch.cumsum(e * s, dim=2)
    l = torch.log(cum_d) + (m - jw)                     # local inclusive sums
    r = cum_n / cum_d
    if N > 1:
        # carry into chunk n: inclusive sum at the end of chunk n-1 = exclusive chunk scan
        lc, rc = _incl_scan(l[:, :, -1], r[:, :, -1], w * L)          # (Bq, N, C)
        lc = torch.cat([lc.new_full((Bq, 1, C), -math.inf), lc[:, :-1]], 1)
        rc = torch.cat([rc.new_zeros((Bq, 1, C)), rc[:, :-1]], 1)
        l2 = lc.unsqueeze(2) - (jw + w)                 # decayed by j+1 steps
        l_new = torch.logaddexp(l, l2)
        r = r + (rc.unsqueeze(2) - r) * torch.sigmoid(l2 - l)
        l = l_new
    return l.reshape(Bq, N * L, C)[:, :T], r.reshape(Bq, N * L, C)[:, :T]


def _excl_left(a: torch.Tensor, s: torch.Tensor, w: torch.Tensor):
    """Exclusive left scan: the inclusive one shifted by one position (empty at t = 0)."""
    l, r = _incl_scan(a, s, w)
    Bq, T, C = a.shape
    l = torch.cat([l.new_full((Bq, 1, C), -math.inf), l[:, :-1]], 1)
    r = torch.cat([r.new_zeros((Bq, 1, C)), r[:, :-1]], 1)
    return l, r


def biwkv4_scan(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """O(T) Bi-WKV4: y_t = (A_t + C_t + e^{u+k_t} v_t) / (B_t + D_t + e^{u+k_t}) with A, B the
    exclusive left scans and C, D the exclusive right scans (never obtained by subtraction),
    all in log space. Vectorised over B, C and chunks of T; differentiable by autograd.
    Computes in float64, returns the input dtype. Stable for w of either sign (|w|*T up to
    well over 1e3) and |k| up to a few hundred."""
    _check(w, u, k, v)
    B, T, C = k.shape
    dt = torch.float64
    wf, uf, kf, vf = (x.to(dt) for x in (w, u, k, v))
    # both directions in one batched call: the right scan is the left scan of the reversed tokens
    l2, r2 = _excl_left(torch.cat([kf, kf.flip(1)]), torch.cat([vf, vf.flip(1)]), wf)
    lA, rA = l2[:B], r2[:B]
    lC, rC = l2[B:].flip(1), r2[B:].flip(1)
    ld = uf + kf
    M = torch.maximum(torch.maximum(lA, lC), ld).detach()
    eA = torch.exp(lA - M)
    eC = torch.exp(lC - M)
    ed = torch.exp(ld - M)
    y = (eA * rA + eC * rC + ed * vf) / (eA + eC + ed)
    return y.to(k.dtype)
