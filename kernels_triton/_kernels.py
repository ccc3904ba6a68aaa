"""@triton.jit kernels of Bi-WKV4 (see kernels_triton/biwkv4.py for the math).

Layout: k, v, y, logd, gy, gk, gv are contiguous (B, T, C); w, u are (C,). Summary and carry
buffers are contiguous (NV, B, NT, C) with NV state values per (b, chunk, c).
Every program owns (one batch row b, BLOCK_C channels, one chunk of CHUNK tokens) and walks
its tokens one at a time, coalesced over C. The "sequential" strategy is the chunk kernel
with a single chunk (NT = 1, CHUNK = T, no carries).

Log-space state of an exclusive decayed sum  S = sum_i e^{a_i - dist_i * w} * (x_i, 1):
(o, pn, pd) with S = e^o * (pn, pd), o the exact maximum logit, so pd >= 1 unless empty
(empty: o = NEG, pn = pd = 0). The derivative sums dn, dd carry sum_i dist_i * (...).
All arithmetic is in the accumulator dtype ACC (fp32, or fp64 for fp64 inputs); inputs are
converted on load (bf16/fp16 are never used in arithmetic directly). Offsets are int64.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

NEG = tl.constexpr(-1e30)

# Autotune configs. Keys are static sizes only (C; pointer dtypes are part of triton's key);
# never T or B. Under the interpreter a single config (several configs need a GPU driver);
# HPCM_BIWKV4_AUTOTUNE=0 also selects the single config (quick GPU test runs: fewer compiles).
SINGLE_CONFIG = INTERPRET or os.environ.get("HPCM_BIWKV4_AUTOTUNE", "1") == "0"
if SINGLE_CONFIG:
    CONFIGS = [triton.Config({"BLOCK_C": 64}, num_warps=2)]
else:
    CONFIGS = [
        triton.Config({"BLOCK_C": 32}, num_warps=1),
        triton.Config({"BLOCK_C": 64}, num_warps=2),
        triton.Config({"BLOCK_C": 128}, num_warps=4),
    ]
AUTOTUNE_KEY = ["C"]
# the local-pass kernels also key on the strategy (HAS_CARRY: chunked vs sequential)
AUTOTUNE_KEY_LOCAL = ["C", "HAS_CARRY"]


# ----------------------------------------------------------------------------- helpers
@triton.jit
def _push(o, pn, pd, a, x, w):
    """Decay the state one step and add the element e^a * (x, 1)."""
    od = o - w
    on = tl.maximum(od, a)
    s1 = tl.exp(od - on)
    s2 = tl.exp(a - on)
    return on, pn * s1 + x * s2, pd * s1 + s2


@triton.jit
def _push_d(o, pn, pd, dn, dd, a, x, w):
    """_push that also carries the distance-weighted sums (old terms get distance + 1)."""
    od = o - w
    on = tl.maximum(od, a)
    s1 = tl.exp(od - on)
    s2 = tl.exp(a - on)
    return on, pn * s1 + x * s2, pd * s1 + s2, (dn + pn) * s1, (dd + pd) * s1


@triton.jit
def _push_q(o, g1, g2, a, x1, x2, w):
    """_push for two signed numerators and no denominator (backward q/r scans)."""
    od = o - w
    on = tl.maximum(od, a)
    s1 = tl.exp(od - on)
    s2 = tl.exp(a - on)
    return on, g1 * s1 + x1 * s2, g2 * s1 + x2 * s2


@triton.jit
def _merge3(o1, a1, b1, o2, a2, b2):
    o = tl.maximum(o1, o2)
    s1 = tl.exp(o1 - o)
    s2 = tl.exp(o2 - o)
    return o, a1 * s1 + a2 * s2, b1 * s1 + b2 * s2


@triton.jit
def _merge5(o1, a1, b1, c1, d1, o2, a2, b2, c2, d2):
    o = tl.maximum(o1, o2)
    s1 = tl.exp(o1 - o)
    s2 = tl.exp(o2 - o)
    return o, a1 * s1 + a2 * s2, b1 * s1 + b2 * s2, c1 * s1 + c2 * s2, d1 * s1 + d2 * s2


@triton.jit
def _lr(o, pn, pd):
    """(o, pn, pd) -> (log of the weight sum, weighted mean); empty -> (NEG, 0)."""
    pd1 = tl.maximum(pd, 1.0)
    return o + tl.log(pd1), pn / pd1


# State planes: a state of n values for (b, chunk, c) lives at ptr + i * st + so, i < n.
@triton.jit
def _empty3(like):
    """An empty (o, pn, pd) state shaped and typed like ``like``."""
    z = tl.zeros_like(like)
    return z + NEG, z, z


@triton.jit
def _empty5(like):
    z = tl.zeros_like(like)
    return z + NEG, z, z, z, z


@triton.jit
def _load3(ptr, so, st, mask):
    return (tl.load(ptr + so, mask=mask, other=NEG), tl.load(ptr + st + so, mask=mask, other=0.0),
            tl.load(ptr + 2 * st + so, mask=mask, other=0.0))


@triton.jit
def _load5(ptr, so, st, mask):
    o, pn, pd = _load3(ptr, so, st, mask)
    return (o, pn, pd, tl.load(ptr + 3 * st + so, mask=mask, other=0.0),
            tl.load(ptr + 4 * st + so, mask=mask, other=0.0))


@triton.jit
def _store3(ptr, so, st, mask, o, pn, pd):
    tl.store(ptr + so, o, mask=mask)
    tl.store(ptr + st + so, pn, mask=mask)
    tl.store(ptr + 2 * st + so, pd, mask=mask)


@triton.jit
def _store5(ptr, so, st, mask, o, pn, pd, dn, dd):
    _store3(ptr, so, st, mask, o, pn, pd)
    tl.store(ptr + 3 * st + so, dn, mask=mask)
    tl.store(ptr + 4 * st + so, dd, mask=mask)


@triton.jit
def _chunk_program(B, T, C, NT, CHUNK, BLOCK_C: tl.constexpr):
    """Where program (b, channel block, chunk) works: its channels and their mask, its number of
    tokens, the int64 offset of its first token in (B, T, C), its offset ``so`` into the
    (·, B, NT, C) state planes and the plane stride ``st`` (up to 15 * st is added)."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(2)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    start = pid_n * CHUNK
    base = (pid_b * T + start) * C
    so = (pid_b * NT + pid_n) * C + cols
    return cols, cols < C, tl.minimum(CHUNK, T - start), base, so, (B * NT * C).to(tl.int64)


# ----------------------------------------------------------------------------- forward
@triton.autotune(configs=CONFIGS, key=AUTOTUNE_KEY)
@triton.jit(do_not_specialize=["T", "NT", "CHUNK"])
def biwkv4_fwd_summary_kernel(k_ptr, v_ptr, w_ptr, s_ptr, B, T, C, NT, CHUNK,
                              BLOCK_C: tl.constexpr):
    """Per-chunk left and right totals (o, pn, pd) of e^{k} * (v, 1): left as seen from the
    chunk end, right as seen from just before the chunk start."""
    ACC = s_ptr.dtype.element_ty
    cols, mask, n_loc, base, so, st = _chunk_program(B, T, C, NT, CHUNK, BLOCK_C)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(ACC)
    o, pn, pd = _empty3(w)
    for i in range(0, n_loc):
        off = base + i * C + cols
        k = tl.load(k_ptr + off, mask=mask, other=0.0).to(ACC)
        v = tl.load(v_ptr + off, mask=mask, other=0.0).to(ACC)
        o, pn, pd = _push(o, pn, pd, k, v, w)
    _store3(s_ptr, so, st, mask, o, pn, pd)
    o, pn, pd = _empty3(w)
    for i in range(0, n_loc):
        off = base + (n_loc - 1 - i) * C + cols
        k = tl.load(k_ptr + off, mask=mask, other=0.0).to(ACC)
        v = tl.load(v_ptr + off, mask=mask, other=0.0).to(ACC)
        o, pn, pd = _push(o, pn, pd, k, v, w)
    _store3(s_ptr + 3 * st, so, st, mask, o, pn, pd)


@triton.autotune(configs=CONFIGS, key=AUTOTUNE_KEY)
@triton.jit(do_not_specialize=["T", "NT", "CHUNK"])
def biwkv4_fwd_carry_kernel(w_ptr, s_ptr, c_ptr, B, T, C, NT, CHUNK,
                            BLOCK_C: tl.constexpr):
    """Scan over chunk summaries: exclusive left carry at each chunk start, exclusive right
    carry at each chunk end (both in log space)."""
    pid_b = tl.program_id(0)
    pid_c = tl.program_id(1)
    ACC = s_ptr.dtype.element_ty
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = cols < C
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(ACC)
    st = (B * NT * C).to(tl.int64)  # state-plane stride; up to 15 * st is added
    for d in range(0, 2):  # d = 0: left carries, chunks in order; d = 1: right carries, reversed
        o, pn, pd = _empty3(w)
        for i in range(0, NT):
            n = i + d * (NT - 1 - 2 * i)
            so = (pid_b.to(tl.int64) * NT + n) * C + cols
            _store3(c_ptr + d * 3 * st, so, st, mask, o, pn, pd)
            ln = tl.minimum(CHUNK, T - n * CHUNK).to(ACC)
            o2, pn2, pd2 = _load3(s_ptr + d * 3 * st, so, st, mask)
            o, pn, pd = _merge3(o - ln * w, pn, pd, o2, pn2, pd2)


@triton.autotune(configs=CONFIGS, key=AUTOTUNE_KEY_LOCAL)
@triton.jit(do_not_specialize=["T", "NT", "CHUNK"])
def biwkv4_fwd_kernel(k_ptr, v_ptr, w_ptr, u_ptr, y_ptr, logd_ptr, c_ptr,
                      B, T, C, NT, CHUNK, HAS_CARRY: tl.constexpr, BLOCK_C: tl.constexpr):
    """Local pass over one chunk: left-to-right exclusive sums (parked in y/logd), then
    right-to-left, combining with the diagonal term into y (ACC) and logd = log(denominator)."""
    ACC = y_ptr.dtype.element_ty
    cols, mask, n_loc, base, so, st = _chunk_program(B, T, C, NT, CHUNK, BLOCK_C)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(ACC)
    u = tl.load(u_ptr + cols, mask=mask, other=0.0).to(ACC)
    if HAS_CARRY:
        o, pn, pd = _load3(c_ptr, so, st, mask)
    else:
        o, pn, pd = _empty3(w)
    for i in range(0, n_loc):
        off = base + i * C + cols
        k = tl.load(k_ptr + off, mask=mask, other=0.0).to(ACC)
        v = tl.load(v_ptr + off, mask=mask, other=0.0).to(ACC)
        la, ra = _lr(o, pn, pd)
        tl.store(logd_ptr + off, la, mask=mask)
        tl.store(y_ptr + off, ra, mask=mask)
        o, pn, pd = _push(o, pn, pd, k, v, w)
    # the right-to-left pass reads what the left-to-right pass parked in y / logd
    tl.debug_barrier()
    if HAS_CARRY:
        o, pn, pd = _load3(c_ptr + 3 * st, so, st, mask)
    else:
        o, pn, pd = _empty3(w)
    for i in range(0, n_loc):
        off = base + (n_loc - 1 - i) * C + cols
        k = tl.load(k_ptr + off, mask=mask, other=0.0).to(ACC)
        v = tl.load(v_ptr + off, mask=mask, other=0.0).to(ACC)
        la = tl.load(logd_ptr + off, mask=mask, other=NEG)
        ra = tl.load(y_ptr + off, mask=mask, other=0.0)
        lc, rc = _lr(o, pn, pd)
        ld = u + k
        m = tl.maximum(tl.maximum(la, lc), ld)
        ea = tl.exp(la - m)
        ec = tl.exp(lc - m)
        ed = tl.exp(ld - m)
        den = ea + ec + ed
        y = (ea * ra + ec * rc + ed * v) / den
        tl.store(y_ptr + off, y, mask=mask)
        tl.store(logd_ptr + off, m + tl.log(den), mask=mask)
        o, pn, pd = _push(o, pn, pd, k, v, w)


# ----------------------------------------------------------------------------- backward
# State per direction: F = (o, pn, pd, dn, dd) of e^{k}(v, 1) with distance sums (for gw),
# Q = (og, g1, g2) of e^{-logd}(gy, gy*y) (for the off-diagonal gk, gv). 8 values.
@triton.autotune(configs=CONFIGS, key=AUTOTUNE_KEY)
@triton.jit(do_not_specialize=["T", "NT", "CHUNK"])
def biwkv4_bwd_summary_kernel(k_ptr, v_ptr, w_ptr, y_ptr, logd_ptr, gy_ptr, s_ptr,
                              B, T, C, NT, CHUNK, BLOCK_C: tl.constexpr):
    ACC = s_ptr.dtype.element_ty
    cols, mask, n_loc, base, so, st = _chunk_program(B, T, C, NT, CHUNK, BLOCK_C)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(ACC)
    for d in range(0, 2):
        o, pn, pd, dn, dd = _empty5(w)
        og, g1, g2 = _empty3(w)
        for i in range(0, n_loc):
            j = i + d * (n_loc - 1 - 2 * i)      # d = 0: forward, d = 1: backward
            off = base + j * C + cols
            k = tl.load(k_ptr + off, mask=mask, other=0.0).to(ACC)
            v = tl.load(v_ptr + off, mask=mask, other=0.0).to(ACC)
            y = tl.load(y_ptr + off, mask=mask, other=0.0).to(ACC)
            ld = tl.load(logd_ptr + off, mask=mask, other=0.0).to(ACC)
            gy = tl.load(gy_ptr + off, mask=mask, other=0.0).to(ACC)
            o, pn, pd, dn, dd = _push_d(o, pn, pd, dn, dd, k, v, w)
            og, g1, g2 = _push_q(og, g1, g2, -ld, gy, gy * y, w)
        sd_ptr = s_ptr + d * 8 * st
        _store5(sd_ptr, so, st, mask, o, pn, pd, dn, dd)
        _store3(sd_ptr + 5 * st, so, st, mask, og, g1, g2)


@triton.autotune(configs=CONFIGS, key=AUTOTUNE_KEY)
@triton.jit(do_not_specialize=["T", "NT", "CHUNK"])
def biwkv4_bwd_carry_kernel(w_ptr, s_ptr, c_ptr, B, T, C, NT, CHUNK,
                            BLOCK_C: tl.constexpr):
    pid_b = tl.program_id(0)
    pid_c = tl.program_id(1)
    ACC = s_ptr.dtype.element_ty
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = cols < C
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(ACC)
    st = (B * NT * C).to(tl.int64)  # state-plane stride; up to 15 * st is added
    for d in range(0, 2):
        sd_ptr = s_ptr + d * 8 * st
        cd_ptr = c_ptr + d * 8 * st
        o, pn, pd, dn, dd = _empty5(w)
        og, g1, g2 = _empty3(w)
        for i in range(0, NT):
            n = i + d * (NT - 1 - 2 * i)
            so = (pid_b.to(tl.int64) * NT + n) * C + cols
            _store5(cd_ptr, so, st, mask, o, pn, pd, dn, dd)
            _store3(cd_ptr + 5 * st, so, st, mask, og, g1, g2)
            ln = tl.minimum(CHUNK, T - n * CHUNK).to(ACC)
            # decay the carry across this chunk (distances grow by ln), then add its total
            o2, pn2, pd2, dn2, dd2 = _load5(sd_ptr, so, st, mask)
            o, pn, pd, dn, dd = _merge5(o - ln * w, pn, pd, dn + ln * pn, dd + ln * pd, o2, pn2, pd2, dn2, dd2)
            og2, g12, g22 = _load3(sd_ptr + 5 * st, so, st, mask)
            og, g1, g2 = _merge3(og - ln * w, g1, g2, og2, g12, g22)


@triton.autotune(configs=CONFIGS, key=AUTOTUNE_KEY_LOCAL)
@triton.jit(do_not_specialize=["T", "NT", "CHUNK"])
def biwkv4_bwd_kernel(k_ptr, v_ptr, w_ptr, u_ptr, y_ptr, logd_ptr, gy_ptr, gk_ptr, gv_ptr,
                      gwp_ptr, gup_ptr, c_ptr, B, T, C, NT, CHUNK,
                      HAS_CARRY: tl.constexpr, BLOCK_C: tl.constexpr):
    """Local backward pass over one chunk. Left-to-right: left parts of gk, gv (parked in
    gk/gv), diagonal terms, gu and the left part of gw. Right-to-left: right parts, final
    gk, gv, right part of gw. gw, gu partials go to (B, NT, C) buffers (summed by torch)."""
    ACC = gk_ptr.dtype.element_ty
    cols, mask, n_loc, base, so, st = _chunk_program(B, T, C, NT, CHUNK, BLOCK_C)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(ACC)
    u = tl.load(u_ptr + cols, mask=mask, other=0.0).to(ACC)
    gw_acc = tl.zeros([BLOCK_C], ACC)
    gu_acc = tl.zeros([BLOCK_C], ACC)
    for d in range(0, 2):
        cd_ptr = c_ptr + d * 8 * st
        if HAS_CARRY:
            o, pn, pd, dn, dd = _load5(cd_ptr, so, st, mask)
            og, g1, g2 = _load3(cd_ptr + 5 * st, so, st, mask)
        else:
            o, pn, pd, dn, dd = _empty5(w)
            og, g1, g2 = _empty3(w)
        for i in range(0, n_loc):
            j = i + d * (n_loc - 1 - 2 * i)
            off = base + j * C + cols
            k = tl.load(k_ptr + off, mask=mask, other=0.0).to(ACC)
            v = tl.load(v_ptr + off, mask=mask, other=0.0).to(ACC)
            y = tl.load(y_ptr + off, mask=mask, other=0.0).to(ACC)
            ld = tl.load(logd_ptr + off, mask=mask, other=0.0).to(ACC)
            gy = tl.load(gy_ptr + off, mask=mask, other=0.0).to(ACC)
            # gw: -gy_t * sum_{i on this side} dist * p(t,i) * (v_i - y_t)
            gw_acc -= gy * tl.exp(o - ld) * (dn - y * dd)
            # off-diagonal gk, gv of element t from queries on this side
            c = tl.exp(k + og)
            gk = c * (v * g1 - g2)
            gv = c * g1
            if d == 0:
                p = tl.exp(u + k - ld)
                gvd = gy * p
                gkd = gvd * (v - y)
                gu_acc += gkd
                gk += gkd
                gv += gvd
            else:
                gk += tl.load(gk_ptr + off, mask=mask, other=0.0)
                gv += tl.load(gv_ptr + off, mask=mask, other=0.0)
            tl.store(gk_ptr + off, gk, mask=mask)
            tl.store(gv_ptr + off, gv, mask=mask)
            o, pn, pd, dn, dd = _push_d(o, pn, pd, dn, dd, k, v, w)
            og, g1, g2 = _push_q(og, g1, g2, -ld, gy, gy * y, w)
        # the right-to-left pass reads the partial gk / gv of the left-to-right pass
        tl.debug_barrier()
    tl.store(gwp_ptr + so, gw_acc, mask=mask)
    tl.store(gup_ptr + so, gu_acc, mask=mask)


KERNELS = {
    "fwd_summary": biwkv4_fwd_summary_kernel,
    "fwd_carry": biwkv4_fwd_carry_kernel,
    "fwd": biwkv4_fwd_kernel,
    "bwd_summary": biwkv4_bwd_summary_kernel,
    "bwd_carry": biwkv4_bwd_carry_kernel,
    "bwd": biwkv4_bwd_kernel,
}
