"""@triton.jit kernels of Bi-WKV4 (see kernels_triton/ops.py for the math and the dispatch).

Layout: k, v, y, logd, gy, gk, gv are contiguous (B, T, C); w, u are (C,). Carry, summary and
scratch buffers are float64 planes (NV, B, N, C) with NV state values per (b, slot, c).

Tiles. A program owns one batch row b, BLOCK_C channels and one chunk of CHUNK tokens (the
"sequential" strategy is one chunk of T tokens) and walks the chunk in tiles of BT tokens.
A tile is a [BT, BLOCK_C] register block (coalesced over C); its exclusive left and right sums
are computed in registers with ``tl.cumsum`` in an anchored form: for rows s <= r < e of a
sub-pass, element r enters as e^{x_r + (r - s) w - m} (left; m the column max) or
e^{x_r - (r - s) w - m} (right), so no exponent in a cumsum is more than |w| * (e - s) away
from the row it belongs to. The exclusive sums need the token one row before / after, so the
shifted rows are loaded as separate (cache-hit) loads, and the carry enters the scan as the
element of the first (left) / last (right) row.

Sub-passes. A tile is scanned in sub-passes of LT rows, LT = BT unless |w| * BT exceeds
BUDGET for some channel of the block (then LT = BUDGET / max|w|, down to one row per
sub-pass): the anchored form is exact up to fp32 rounding only while |w| * LT is moderate.
HPCM's w = decay / T keeps LT = BT; the fallback keeps any w of either sign exact.

Carries. The state entering a tile (left: everything before it, right: everything after it)
is held in float64 as (o, mantissas): S = e^o * (mantissas), and is advanced once per
sub-pass by the sub-pass total (_cat3/_cat5, exact decay by n * w in float64). Rounding in
the carry therefore does not grow with T; in-tile work is fp32 (fp64 for fp64 inputs).

State values. Forward: (o, pn, pd) of e^{k}(v, 1). Backward: F = (o, pn, pd, dn, dd), the
same with distance-weighted sums dn, dd (for gw), and Q = (og, g1, g2) of e^{-logd}(gy, gy*y)
(for the off-diagonal gk, gv). A state is "seen from" a query position: left states from the
first token after the summed tokens, right states from the first token before them (so the
nearest token enters with its plain exponent k, as in SPEC §1).
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

NEG = tl.constexpr(-1e30)
# largest |w| * LT inside one anchored sub-pass (see module docstring): a term more than
# ~87 (fp32) / ~708 (fp64) below its column's maximum underflows, and such a term is
# negligible for every query of the sub-pass while 2 * |w| * LT stays well below that
BUDGET32 = tl.constexpr(24.0)
BUDGET64 = tl.constexpr(256.0)
CARRY_BUDGET = tl.constexpr(256.0)   # the same for the float64 chunk-carry cumsums
# smallest BT of any config: scratch slots per chunk are counted in units of BT_MIN tokens
BT_MIN = 16

# Autotune configs. Keys are static sizes only (C, the constexpr flags; pointer dtypes are part
# of triton's key), never T or B. Under the interpreter a single config (several configs need a
# GPU driver); HPCM_BIWKV4_AUTOTUNE=0 also selects the single config (quick GPU test runs).
SINGLE_CONFIG = INTERPRET or os.environ.get("HPCM_BIWKV4_AUTOTUNE", "1") == "0"


def _cfg(bt, bc, warps, stages=1, **kw):
    return triton.Config({"BT": bt, "BLOCK_C": bc, **kw}, num_warps=warps, num_stages=stages)


# FIXED_*: the config used under shape_only_selection (and the single config); the first entry
# of each list. The interpreter uses narrower channel blocks (numpy cost grows with the block).
if INTERPRET:   # numpy cost is per op, not per element: wide blocks, few programs
    FWD_CONFIGS = [_cfg(64, 64, 4)]
    BWD_CONFIGS = [_cfg(64, 64, 4)]
    FWD_SUM_CONFIGS = [_cfg(64, 64, 4)]
    BWD_SUM_CONFIGS = [_cfg(64, 64, 4)]
    CARRY_CONFIGS = [triton.Config({"NB": 16, "BLOCK_C": 64}, num_warps=4)]
else:
    # first entry = the fixed config (shape_only_selection, HPCM_BIWKV4_AUTOTUNE=0). The tiles
    # are register blocks; every config below compiles without a stack frame (no spills) for
    # fp32/bf16/fp16/fp64 on sm_80 and sm_90 (python -m kernels_triton.aot, 2026-11-30). That
    # takes 4 elements per thread per tensor at 8 warps (fwd, bwd summary) and 1-2 (bwd).
    # Measured and dropped for a stack frame (BTxBLOCK_C/warps, bytes): fwd 32x32/4 (8-152),
    # 64x32/8 (8-160), 32x64/8 (8-152), 16x64/4 (8-152); bwd 16x32/8 (8-16), 32x16/8 (8-16),
    # 16x16/2 (8-472); bwd summary 32x32/4 (8-24, sm_80), 64x32/8 (8, fp64 sm_80), 64x64/8 and
    # 32x64/4 (464-584, fp64); fwd summary 64x32/8 (24, fp64 sm_90). Tried, spill, not added:
    # fwd 16x32/4, 32x16/4; bwd 16x32/4, 32x16/4, 32x32/8; bwd summary 16x32/4, 32x16/4,
    # 32x64/8 (1 stage instead of 2 changed nothing for bwd and bwd summary).
    FWD_CONFIGS = [_cfg(32, 32, 8, 2), _cfg(16, 64, 8, 2), _cfg(64, 16, 8, 2)]
    BWD_CONFIGS = [_cfg(16, 16, 4, 2), _cfg(16, 16, 8, 2)]
    FWD_SUM_CONFIGS = [_cfg(32, 32, 4, 2), _cfg(64, 64, 8, 2), _cfg(32, 64, 4, 2)]
    BWD_SUM_CONFIGS = [_cfg(32, 32, 8, 2), _cfg(16, 64, 8, 2), _cfg(64, 16, 8, 2)]
    CARRY_CONFIGS = [triton.Config({"NB": 16, "BLOCK_C": 16}, num_warps=4),
                     triton.Config({"NB": 8, "BLOCK_C": 32}, num_warps=4),
                     triton.Config({"NB": 32, "BLOCK_C": 16}, num_warps=8)]
if SINGLE_CONFIG:
    FWD_CONFIGS, BWD_CONFIGS = FWD_CONFIGS[:1], BWD_CONFIGS[:1]
    FWD_SUM_CONFIGS, BWD_SUM_CONFIGS = FWD_SUM_CONFIGS[:1], BWD_SUM_CONFIGS[:1]
    CARRY_CONFIGS = CARRY_CONFIGS[:1]
for _c in FWD_CONFIGS + BWD_CONFIGS + FWD_SUM_CONFIGS + BWD_SUM_CONFIGS:
    assert _c.kwargs["BT"] >= BT_MIN

# Device helpers. Under the interpreter every call of a @triton.jit helper re-patches
# triton.language (milliseconds per call), so there the helpers are plain Python functions
# running on the interpreter's patched tl; compiled, they are ordinary @triton.jit functions.
helper = (lambda f: f) if INTERPRET else triton.jit

KEY = ["C"]
KEY_LOCAL = ["C", "HAS_CARRY", "STORE_LD", "STORE_YA"]
KEY_BWD = ["C", "HAS_CARRY"]


# ----------------------------------------------------------------------------- state algebra
@helper
def _cat3(o1, a1, b1, n2, o2, a2, b2, w):
    """Segment 1 followed by segment 2 of n2 tokens (each state seen from its own end, the
    result from the end of segment 2): e^{-n2 w} S1 + S2, in log space."""
    od = o1 - n2 * w
    o = tl.maximum(od, o2)
    s1 = tl.exp(od - o)
    s2 = tl.exp(o2 - o)
    return o, a1 * s1 + a2 * s2, b1 * s1 + b2 * s2


@helper
def _cat5(o1, a1, b1, c1, d1, n2, o2, a2, b2, c2, d2, w):
    """_cat3 for (o, pn, pd, dn, dd): segment 1's terms move n2 tokens further away."""
    od = o1 - n2 * w
    o = tl.maximum(od, o2)
    s1 = tl.exp(od - o)
    s2 = tl.exp(o2 - o)
    return (o, a1 * s1 + a2 * s2, b1 * s1 + b2 * s2, (c1 + n2 * a1) * s1 + c2 * s2,
            (d1 + n2 * b1) * s1 + d2 * s2)


@helper
def _empty(like):
    z = tl.zeros_like(like)
    return z + NEG, z


@helper
def _ld(ptr, so, st, i, mask):
    return tl.load(ptr + i * st + so, mask=mask, other=0.0)


@helper
def _ldo(ptr, so, st, i, mask):
    return tl.load(ptr + i * st + so, mask=mask, other=NEG)


# ----------------------------------------------------------------------------- tile helpers
@helper
def _lane_budget(w, cmask, BT: tl.constexpr, ACC: tl.constexpr):
    """Rows per sub-pass (LT) for this channel block."""
    wmax = tl.max(tl.where(cmask, tl.abs(w.to(tl.float32)), 0.0), axis=0)
    if ACC == tl.float64:
        budget = wmax * 0 + BUDGET64
    else:
        budget = wmax * 0 + BUDGET32
    lt = tl.minimum(budget / tl.maximum(wmax, 1e-30), BT * 1.0).to(tl.int32)   # no overflow
    return tl.where(wmax * BT <= budget, BT, tl.maximum(lt, 1))


@helper
def _tot(x, m1, m2, act, rs, w):
    """Sum over the active rows of e^{x + rs * w} * (m1, m2): (max exponent m, sums). For the
    caller: right totals pass -w (seen from the row before the first), left totals +w (seen
    from the last row; subtract (e - 1 - s) w from m)."""
    a = tl.where(act, x + rs * w, NEG)
    m = tl.max(a, axis=0)
    e = tl.where(act, tl.exp(a - m[None, :]), 0.0)
    return m, tl.sum(e * m1, axis=0), tl.sum(e * m2, axis=0)


@helper
def _tot_d(x, m1, m2, act, rs, w):
    """_tot with the rs-weighted sums too (for distance sums)."""
    a = tl.where(act, x + rs * w, NEG)
    m = tl.max(a, axis=0)
    e = tl.where(act, tl.exp(a - m[None, :]), 0.0)
    return (m, tl.sum(e * m1, axis=0), tl.sum(e * m2, axis=0), tl.sum(e * m1 * rs, axis=0),
            tl.sum(e * m2 * rs, axis=0))


@helper
def _split(o, ACC: tl.constexpr):
    """A float64 carry exponent as the in-tile exponent (o rounded to ACC) and the factor
    e^{o - that} its mantissas take (so the rounding of o is not shared by a whole tile)."""
    oa = o.to(ACC)
    d = tl.minimum(tl.maximum(o - oa.to(tl.float64), -1.0), 1.0)   # |d| <= ulp; empty: 0
    return oa, tl.exp(d).to(ACC)


@helper
def _safe_log(x):
    return tl.where(x > 0, tl.log(tl.where(x > 0, x, 1.0)), NEG)


@helper
def _rows(start, i, L, r, cmask, C, BT: tl.constexpr):
    """Tile i of a chunk starting at token ``start`` (chunk length L): first token t0, valid row
    count n, [BT, BLOCK_C] validity and int64 offsets relative to the (b, t0) row."""
    t0 = start + i * BT
    n = tl.minimum(BT, L - i * BT)
    valid = (r < n) & cmask[None, :]
    return t0, n, valid


# ----------------------------------------------------------------------------- forward
@helper
def _fwd_total(k_ptr, v_ptr, off, valid, n, rf, w, w64, LT, o, pn, pd, ACC: tl.constexpr,
               LEFT: tl.constexpr):
    """Advance a carry over the whole tile: the left carry (LEFT, seen from the tile's first
    row; sub-passes left to right) or the right carry (seen from its last row; right to left)."""
    k = tl.load(k_ptr + off, mask=valid, other=0.0).to(ACC)
    v = tl.load(v_ptr + off, mask=valid, other=0.0).to(ACC)
    nsp = tl.cdiv(n, LT)
    for sp in range(0, nsp):
        if LEFT:
            s = sp * LT
        else:
            s = (nsp - 1 - sp) * LT
        e = tl.minimum(s + LT, n)
        act = valid & (rf >= s) & (rf < e)
        if LEFT:
            m, sn, sd = _tot(k, v, 1.0, act, rf - s, w)
            d = (e - s).to(tl.float64)
            mo = m.to(tl.float64) - (d - 1) * w64
        else:
            m, sn, sd = _tot(k, v, 1.0, act, rf - s, -w)
            d = (e - s).to(tl.float64)
            mo = m.to(tl.float64)
        o, pn, pd = _cat3(o, pn, pd, d, mo, sn.to(tl.float64), sd.to(tl.float64), w64)
    return o, pn, pd


@helper
def _fwd_tile(k_ptr, v_ptr, off, C, valid, n, rf, w, w64, u, LT, lo, lpn, lpd, ro, rpn, rpd,
              ACC: tl.constexpr):
    """y and log-denominator of one tile given the left carry (seen from row 0) and the right
    carry (seen from row n - 1); returns them and the left carry for the next tile."""
    k = tl.load(k_ptr + off, mask=valid, other=0.0).to(ACC)
    v = tl.load(v_ptr + off, mask=valid, other=0.0).to(ACC)
    vl = valid & (rf >= 1)
    kl = tl.load(k_ptr + off - C, mask=vl, other=0.0).to(ACC)
    vvl = tl.load(v_ptr + off - C, mask=vl, other=0.0).to(ACC)
    vr = valid & (rf + 1 < n)
    kr = tl.load(k_ptr + off + C, mask=vr, other=0.0).to(ACC)
    vvr = tl.load(v_ptr + off + C, mask=vr, other=0.0).to(ACC)
    # the per-row log-sums are formed in float64 (from fp32 pieces): they are differenced
    # against u + k below, and an fp32 log-sum of magnitude ~20 is only good to ~1e-6
    LA, RA = _empty(k)
    LC, RC = _empty(k)
    LA = LA.to(tl.float64)
    LC = LC.to(tl.float64)
    rf64 = rf.to(tl.float64)
    nsp = tl.cdiv(n, LT)
    # left: row r of sub-pass [s, e) holds token r - 1, row s holds the carry
    for sp in range(0, nsp):
        s = sp * LT
        e = tl.minimum(s + LT, n)
        act = valid & (rf >= s) & (rf < e)
        first = rf == s
        oa, fa = _split(lo, ACC)
        x = tl.where(act & first, oa[None, :], tl.where(act, kl, NEG))
        mn = tl.where(first, lpn.to(ACC)[None, :] * fa[None, :], vvl)
        md = tl.where(first, lpd.to(ACC)[None, :] * fa[None, :], 1.0)
        rs = rf - s
        a = x + rs * w
        m = tl.max(a, axis=0)
        ex = tl.exp(a - m[None, :])
        pn = tl.cumsum(ex * mn, axis=0)
        pd = tl.cumsum(ex * md, axis=0)
        LA = tl.where(act, m.to(tl.float64)[None, :] - (rf64 - s) * w64[None, :]
                      + _safe_log(pd).to(tl.float64), LA)
        RA = tl.where(act, pn / tl.where(pd > 0, pd, 1.0), RA)
        m2, sn, sd = _tot(k, v, 1.0, act, rs, w)
        d = (e - s).to(tl.float64)
        lo, lpn, lpd = _cat3(lo, lpn, lpd, d, m2.to(tl.float64) - (d - 1) * w64,
                             sn.to(tl.float64), sd.to(tl.float64), w64)
    # right: row r of sub-pass [s, e) holds token r + 1, row e - 1 holds the carry
    for sp in range(0, nsp):
        s = (nsp - 1 - sp) * LT
        e = tl.minimum(s + LT, n)
        act = valid & (rf >= s) & (rf < e)
        last = rf == e - 1
        oa, fa = _split(ro, ACC)
        x = tl.where(act & last, oa[None, :], tl.where(act, kr, NEG))
        mn = tl.where(last, rpn.to(ACC)[None, :] * fa[None, :], vvr)
        md = tl.where(last, rpd.to(ACC)[None, :] * fa[None, :], 1.0)
        rs = rf - s
        b = x - rs * w
        m = tl.max(b, axis=0)
        ex = tl.exp(b - m[None, :])
        pn = tl.cumsum(ex * mn, axis=0, reverse=True)
        pd = tl.cumsum(ex * md, axis=0, reverse=True)
        LC = tl.where(act, m.to(tl.float64)[None, :] + (rf64 - s) * w64[None, :]
                      + _safe_log(pd).to(tl.float64), LC)
        RC = tl.where(act, pn / tl.where(pd > 0, pd, 1.0), RC)
        m2, sn, sd = _tot(k, v, 1.0, act, rs, -w)
        ro, rpn, rpd = _cat3(ro, rpn, rpd, (e - s).to(tl.float64), m2.to(tl.float64),
                             sn.to(tl.float64), sd.to(tl.float64), w64)
    ld = u.to(tl.float64)[None, :] + k.to(tl.float64)
    M = tl.maximum(tl.maximum(LA, LC), ld)
    ea = tl.exp((LA - M).to(ACC))
    ec = tl.exp((LC - M).to(ACC))
    ed = tl.exp((ld - M).to(ACC))
    den = ea + ec + ed
    y = (ea * RA + ec * RC + ed * v) / den
    # stored for the backward: lam = log-denominator - (u + k) = -log p(t, t) >= 0, small where
    # the diagonal matters (an fp32 log-denominator itself would lose ~1e-6 absolute at |k| ~ 20)
    return y, (M - ld).to(ACC) + tl.log(den), lo, lpn, lpd


@helper
def _program(B, T, C, NT, CHUNK, BT: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(2)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    start = pid_n * CHUNK
    L = tl.minimum(CHUNK, T - start)
    so = (pid_b * NT + pid_n) * C + cols          # offset into (., B, NT, C) planes
    st = (B * NT * C).to(tl.int64)
    r = tl.arange(0, BT)[:, None]
    return pid_b, pid_n, cols, cmask, start, L, so, st, r


@triton.autotune(configs=FWD_SUM_CONFIGS, key=KEY)
@triton.jit(do_not_specialize=["T", "NT", "CHUNK"])
def biwkv4_fwd_summary_kernel(k_ptr, v_ptr, w_ptr, s_ptr, B, T, C, NT, CHUNK,
                              ACC: tl.constexpr, BT: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per chunk: left total (seen from the token after the chunk) and right total (seen from
    the token before it) of e^{k}(v, 1), float64, in one pass over the chunk."""
    pid_b, pid_n, cols, cmask, start, L, so, st, r = _program(B, T, C, NT, CHUNK, BT, BLOCK_C)
    rf = r.to(ACC)
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(ACC)
    w64 = w.to(tl.float64)
    LT = _lane_budget(w, cmask, BT, ACC)
    lo, lpn = _empty(w64)
    lpd = lpn
    ro, rpn = _empty(w64)
    rpd = rpn
    for i in range(0, tl.cdiv(L, BT)):
        t0, n, valid = _rows(start, i, L, r, cmask, C, BT)
        off = (pid_b * T + t0 + r) * C + cols[None, :]
        lo, lpn, lpd = _fwd_total(k_ptr, v_ptr, off, valid, n, rf, w, w64, LT, lo, lpn, lpd, ACC,
                                   True)
        # this tile is farther than everything summed so far (t0 - start tokens) from start - 1
        eo, epn = _empty(w64)
        to, tpn, tpd = _fwd_total(k_ptr, v_ptr, off, valid, n, rf, w, w64, LT, eo, epn, epn, ACC,
                                   False)
        ro, rpn, rpd = _cat3(to, tpn, tpd, (t0 - start).to(tl.float64), ro, rpn, rpd, w64)
    tl.store(s_ptr + so, lo, mask=cmask)
    tl.store(s_ptr + st + so, lpn, mask=cmask)
    tl.store(s_ptr + 2 * st + so, lpd, mask=cmask)
    tl.store(s_ptr + 3 * st + so, ro, mask=cmask)
    tl.store(s_ptr + 4 * st + so, rpn, mask=cmask)
    tl.store(s_ptr + 5 * st + so, rpd, mask=cmask)


@helper
def _carry_setup(w_ptr, cols, cmask, CHUNK, NB: tl.constexpr):
    """Channel weights and the rows per cumsum sub-pass of the carry kernels (LTc chunks span
    at most CARRY_BUDGET / max|w| tokens, so float64 exponents stay in range)."""
    w64 = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float64)
    wmax = tl.max(tl.where(cmask, tl.abs(w64), 0.0), axis=0) * CHUNK
    lt = tl.minimum((wmax * 0 + CARRY_BUDGET) / tl.maximum(wmax, 1e-300), NB * 1.0).to(tl.int32)
    return w64, tl.where(wmax * NB <= CARRY_BUDGET, NB, tl.maximum(lt, 1))


@helper
def _carry_rows(d, j, blk, NT, T, CHUNK):
    """Rows of a carry block: d = 0 left carries in chunk order, d = 1 right carries in
    reversed order. Returns the chunk whose carry the row is, the chunk whose total enters at
    the row (its element), that chunk's length, and the row's position X in tokens (left: the
    chunk's start; right: the distance of the chunk's end from T), so that an element at row q
    reaches row r decayed by (X_r - X_q) w."""
    row = blk + j
    n_out = tl.where(d == 0, row, NT - 1 - row)
    n_in = tl.where(d == 0, row - 1, NT - row)
    ln = tl.maximum(tl.minimum(CHUNK, T - n_in * CHUNK), 0)
    X = tl.where(d == 0, n_out * CHUNK, T - tl.minimum((n_out + 1) * CHUNK, T))
    return row, n_out, n_in, ln.to(tl.float64), X.to(tl.float64)


@helper
def _norm(o, scale):
    """Move a positive scale of the mantissas into the exponent (scale 0: empty state). The
    carry cumsums anchor a whole sub-pass at its maximum, so a row's own terms may sit far
    below o; the fp32 tiles must not see such an inflated exponent (it would become their
    anchor and flush every real term of the tile to zero)."""
    nz = scale > 0
    sc = tl.where(nz, scale, 1.0)
    return tl.where(nz, o + tl.log(sc), NEG), 1.0 / sc, nz


@helper
def _pick(x, sel):
    """The row of a [NB, BLOCK_C] block where sel is true, as a [BLOCK_C] vector."""
    return tl.sum(tl.where(sel, x, 0.0), axis=0)


@triton.autotune(configs=CARRY_CONFIGS, key=KEY)
@triton.jit(do_not_specialize=["T", "NT", "CHUNK"])
def biwkv4_fwd_carry_kernel(w_ptr, s_ptr, c_ptr, B, T, C, NT, CHUNK,
                            NB: tl.constexpr, BLOCK_C: tl.constexpr):
    """Exclusive carries of all chunks from their float64 summaries, combined in parallel: NB
    chunks at a time, an anchored float64 cumsum over the chunk totals (sub-passes of LTc
    chunks when |w| * CHUNK is large), a running carry linking the blocks. Left carries in
    chunk order, right carries over the reversed chunk order."""
    pid_b = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    w64, LTc = _carry_setup(w_ptr, cols, cmask, CHUNK, NB)
    st = (B * NT * C).to(tl.int64)
    j = tl.arange(0, NB)[:, None]
    for d in range(0, 2):
        po, pa = _empty(w64)          # state of the row before the current sub-pass
        pb = pa
        for blk in range(0, NT, NB):
            row, n_out, n_in, ln, X = _carry_rows(d, j, blk, NT, T, CHUNK)
            has = (row >= 1) & (row < NT) & cmask[None, :]
            so_in = (pid_b * NT + n_in) * C + cols[None, :]
            sd = s_ptr + 3 * d * st
            eo = _ldo(sd, so_in, st, 0, has)
            ea = _ld(sd, so_in, st, 1, has)
            eb = _ld(sd, so_in, st, 2, has)
            nrow = tl.minimum(NB, NT - blk)
            Oo, Oa = _empty(eo)
            Ob = Oa
            for sp in range(0, tl.cdiv(nrow, LTc)):
                s0 = sp * LTc
                e0 = tl.minimum(s0 + LTc, nrow)
                act = (j >= s0) & (j < e0) & cmask[None, :]
                first = j == s0
                # the sub-pass's first row: the previous row's carry, then its own element
                fo, fa, fb = _cat3(po, pa, pb, _pick(ln, first), _pick(eo, first),
                                   _pick(ea, first), _pick(eb, first), w64)
                rel = X - _pick(X + tl.zeros_like(eo), first)[None, :]
                x = tl.where(act & first, fo[None, :], tl.where(act, eo, NEG))
                ma = tl.where(first, fa[None, :], ea)
                mb = tl.where(first, fb[None, :], eb)
                A = x + rel * w64[None, :]
                m = tl.max(A, axis=0)
                ex = tl.exp(A - m[None, :])
                cpa = tl.cumsum(ex * ma, axis=0)
                cpb = tl.cumsum(ex * mb, axis=0)
                no, inv, nz = _norm(m[None, :] - rel * w64[None, :], cpb)
                Oo = tl.where(act, no, Oo)
                Oa = tl.where(act, cpa * inv, Oa)
                Ob = tl.where(act, tl.where(nz, 1.0, 0.0), Ob)
                lastr = j == e0 - 1
                po = _pick(Oo, lastr)
                pa = _pick(Oa, lastr)
                pb = _pick(Ob, lastr)
            ok = (row < NT) & cmask[None, :]
            so_out = (pid_b * NT + n_out) * C + cols[None, :]
            cp = c_ptr + 3 * d * st
            tl.store(cp + so_out, Oo, mask=ok)
            tl.store(cp + st + so_out, Oa, mask=ok)
            tl.store(cp + 2 * st + so_out, Ob, mask=ok)


@triton.autotune(configs=FWD_CONFIGS, key=KEY_LOCAL)
@triton.jit(do_not_specialize=["T", "NT", "CHUNK", "SPC"])
def biwkv4_fwd_kernel(k_ptr, v_ptr, w_ptr, u_ptr, y_ptr, logd_ptr, ya_ptr, c_ptr, sc_ptr,
                      B, T, C, NT, CHUNK, SPC, HAS_CARRY: tl.constexpr, STORE_LD: tl.constexpr,
                      STORE_YA: tl.constexpr, ACC: tl.constexpr, BT: tl.constexpr,
                      BLOCK_C: tl.constexpr):
    """Local pass over one chunk. Pass 1 walks the tiles right to left and parks the right
    carry of every tile but the first in float64 scratch (SPC slots per chunk); pass 2 walks
    them left to right, computes y (stored in y's dtype) and, if STORE_LD, what the backward
    needs: lam = log-denominator - u - k, and (STORE_YA, 16-bit inputs) y in float32."""
    pid_b, pid_n, cols, cmask, start, L, so, st, r = _program(B, T, C, NT, CHUNK, BT, BLOCK_C)
    rf = r.to(ACC)
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(ACC)
    u = tl.load(u_ptr + cols, mask=cmask, other=0.0).to(ACC)
    w64 = w.to(tl.float64)
    LT = _lane_budget(w, cmask, BT, ACC)
    if HAS_CARRY:
        lo = _ldo(c_ptr, so, st, 0, cmask)
        lpn = _ld(c_ptr, so, st, 1, cmask)
        lpd = _ld(c_ptr, so, st, 2, cmask)
        ro = _ldo(c_ptr, so, st, 3, cmask)
        rpn = _ld(c_ptr, so, st, 4, cmask)
        rpd = _ld(c_ptr, so, st, 5, cmask)
    else:
        lo, lpn = _empty(w64)
        lpd = lpn
        ro, rpn = _empty(w64)
        rpd = rpn
    ntile = tl.cdiv(L, BT)
    sst = (B * NT * SPC * C).to(tl.int64)
    slot0 = (pid_b * NT + pid_n) * SPC
    for ii in range(0, ntile - 1):
        i = ntile - 1 - ii
        sso = (slot0 + i) * C + cols
        tl.store(sc_ptr + sso, ro, mask=cmask)
        tl.store(sc_ptr + sst + sso, rpn, mask=cmask)
        tl.store(sc_ptr + 2 * sst + sso, rpd, mask=cmask)
        t0, n, valid = _rows(start, i, L, r, cmask, C, BT)
        off = (pid_b * T + t0 + r) * C + cols[None, :]
        ro, rpn, rpd = _fwd_total(k_ptr, v_ptr, off, valid, n, rf, w, w64, LT, ro, rpn, rpd, ACC,
                                   False)
    # pass 2 reads what pass 1 parked in scratch
    tl.debug_barrier()
    for i in range(0, ntile):
        sso = (slot0 + i) * C + cols
        pm = cmask & (i > 0)
        ro = tl.where(i > 0, _ldo(sc_ptr, sso, sst, 0, pm), ro)
        rpn = tl.where(i > 0, _ld(sc_ptr, sso, sst, 1, pm), rpn)
        rpd = tl.where(i > 0, _ld(sc_ptr, sso, sst, 2, pm), rpd)
        t0, n, valid = _rows(start, i, L, r, cmask, C, BT)
        off = (pid_b * T + t0 + r) * C + cols[None, :]
        y, ld, lo, lpn, lpd = _fwd_tile(k_ptr, v_ptr, off, C, valid, n, rf, w, w64, u, LT,
                                        lo, lpn, lpd, ro, rpn, rpd, ACC)
        tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=valid)
        if STORE_LD:
            tl.store(logd_ptr + off, ld, mask=valid)
        if STORE_YA:
            tl.store(ya_ptr + off, y, mask=valid)


# ----------------------------------------------------------------------------- backward
@helper
def _bwd_load(k_ptr, v_ptr, y_ptr, ld_ptr, gy_ptr, off, mask, u, ACC: tl.constexpr):
    """Rows of k, v, y, gy and the log-denominator ld = lam + u + k (the forward stores
    lam = ld - u - k = -log p(t, t), which keeps the diagonal probability precise)."""
    k = tl.load(k_ptr + off, mask=mask, other=0.0).to(ACC)
    v = tl.load(v_ptr + off, mask=mask, other=0.0).to(ACC)
    y = tl.load(y_ptr + off, mask=mask, other=0.0).to(ACC)
    lam = tl.load(ld_ptr + off, mask=mask, other=0.0).to(ACC)
    gy = tl.load(gy_ptr + off, mask=mask, other=0.0).to(ACC)
    return k, v, y, lam + u[None, :] + k, gy, lam


@helper
def _bwd_totals(k, v, y, ld, gy, act, rs, w, w64, s, e, LEFT: tl.constexpr):
    """Sub-pass totals (F5, Q3) in float64: left ones seen from the row after e - 1, right ones
    seen from the row before s."""
    d = (e - s).to(tl.float64)
    if LEFT:
        m, sn, sd, qn, qd = _tot_d(k, v, 1.0, act, rs, w)
        mq, g1, g2 = _tot(-ld, gy, gy * y, act, rs, w)
        sh = (d - 1) * w64
        o = m.to(tl.float64) - sh
        dn = (d - 1) * sn.to(tl.float64) - qn.to(tl.float64)
        dd = (d - 1) * sd.to(tl.float64) - qd.to(tl.float64)
        og = mq.to(tl.float64) - sh
    else:
        m, sn, sd, qn, qd = _tot_d(k, v, 1.0, act, rs, -w)
        mq, g1, g2 = _tot(-ld, gy, gy * y, act, rs, -w)
        o = m.to(tl.float64)
        dn = qn.to(tl.float64)
        dd = qd.to(tl.float64)
        og = mq.to(tl.float64)
    return (o, sn.to(tl.float64), sd.to(tl.float64), dn, dd, og, g1.to(tl.float64),
            g2.to(tl.float64))


@helper
def _bwd_total(k_ptr, v_ptr, y_ptr, ld_ptr, gy_ptr, off, valid, n, rf, w, w64, u, LT,
               o, pn, pd, dn, dd, og, g1, g2, ACC: tl.constexpr, LEFT: tl.constexpr):
    """Advance the backward state (F5, Q3) over the whole tile: the left one (LEFT, seen from
    the tile's first row; sub-passes left to right) or the right one (right to left)."""
    k, v, y, ld, gy, lam = _bwd_load(k_ptr, v_ptr, y_ptr, ld_ptr, gy_ptr, off, valid, u, ACC)
    nsp = tl.cdiv(n, LT)
    for sp in range(0, nsp):
        if LEFT:
            s = sp * LT
        else:
            s = (nsp - 1 - sp) * LT
        e = tl.minimum(s + LT, n)
        act = valid & (rf >= s) & (rf < e)
        to, tpn, tpd, tdn, tdd, tog, tg1, tg2 = _bwd_totals(k, v, y, ld, gy, act, rf - s, w, w64,
                                                           s, e, LEFT)
        d = (e - s).to(tl.float64)
        o, pn, pd, dn, dd = _cat5(o, pn, pd, dn, dd, d, to, tpn, tpd, tdn, tdd, w64)
        og, g1, g2 = _cat3(og, g1, g2, d, tog, tg1, tg2, w64)
    return o, pn, pd, dn, dd, og, g1, g2


@helper
def _bwd_scan(x, mn, xq, q1, q2, k, v, y, ld, gy, act, rs, w, crow, cpd, dnc, ddc, REV: tl.constexpr):
    """One sub-pass of the backward in one direction. x/mn: F elements (exponent, v or carry
    mantissa; the denominator mantissa is 1 except on the carry row ``crow``, where it is the
    carry's cpd); xq/q1/q2: Q elements. Returns gw, off-diagonal gk, gv of the active rows."""
    md = tl.where(crow, cpd, 1.0)
    if REV:
        a = x - rs * w
    else:
        a = x + rs * w
    m = tl.max(a, axis=0)
    ex = tl.exp(a - m[None, :])
    en = ex * mn
    ed = ex * md
    # distance sums of the carry: its row's weight times its own dn, dd
    e0 = tl.sum(tl.where(crow & act, ex, 0.0), axis=0)
    if REV:
        pn = tl.cumsum(en, axis=0, reverse=True)
        pd = tl.cumsum(ed, axis=0, reverse=True)
        qn = tl.cumsum(en * rs, axis=0, reverse=True)
        qd = tl.cumsum(ed * rs, axis=0, reverse=True)
        DN = qn - rs * pn + (e0 * dnc)[None, :]
        DD = qd - rs * pd + (e0 * ddc)[None, :]
        lsum = m[None, :] + rs * w + _safe_log(pd)
    else:
        pn = tl.cumsum(en, axis=0)
        pd = tl.cumsum(ed, axis=0)
        qn = tl.cumsum(en * rs, axis=0)
        qd = tl.cumsum(ed * rs, axis=0)
        DN = rs * pn - qn + (e0 * dnc)[None, :]
        DD = rs * pd - qd + (e0 * ddc)[None, :]
        lsum = m[None, :] - rs * w + _safe_log(pd)
    ok = act & (pd > 0)
    pds = tl.where(ok, pd, 1.0)
    gw = tl.where(ok, -gy * tl.exp(tl.minimum(lsum - ld, 0.0)) * (DN - y * DD) / pds, 0.0)
    if REV:
        aq = xq - rs * w
    else:
        aq = xq + rs * w
    mq = tl.max(aq, axis=0)
    eq = tl.exp(aq - mq[None, :])
    if REV:
        s1 = tl.cumsum(eq * q1, axis=0, reverse=True)
        s2 = tl.cumsum(eq * q2, axis=0, reverse=True)
        fac = tl.exp(tl.where(act, k + mq[None, :] + rs * w, NEG))
    else:
        s1 = tl.cumsum(eq * q1, axis=0)
        s2 = tl.cumsum(eq * q2, axis=0)
        fac = tl.exp(tl.where(act, k + mq[None, :] - rs * w, NEG))
    return gw, fac * (v * s1 - s2), fac * s1


@helper
def _bwd_pass(k, v, y, ld, gy, kx, vx, yx, ldx, gyx, valid, n, rf, w, LT,
              o, pn, pd, dn, dd, og, g1, g2, GW, GK, GV, w64, ACC: tl.constexpr,
              LEFT: tl.constexpr):
    """One direction of :func:`_bwd_tile`: LEFT, sub-passes left to right, row r holding the
    token before it (kx... loaded one row up) and the carry on each sub-pass's first row; else
    right to left, the token after it, the carry on the last row. Adds the off-diagonal gw,
    gk, gv of the active rows into GW, GK, GV; returns them and the advanced carry."""
    nsp = tl.cdiv(n, LT)
    for sp in range(0, nsp):
        if LEFT:
            s = sp * LT
        else:
            s = (nsp - 1 - sp) * LT
        e = tl.minimum(s + LT, n)
        act = valid & (rf >= s) & (rf < e)
        if LEFT:
            crow = rf == s
        else:
            crow = rf == e - 1
        rs = rf - s
        cc = act & crow
        oa, fa = _split(o, ACC)
        x = tl.where(cc, oa[None, :], tl.where(act, kx, NEG))
        mn = tl.where(crow, pn.to(ACC)[None, :] * fa[None, :], vx)
        oq, fq = _split(og, ACC)
        xq = tl.where(cc, oq[None, :], tl.where(act, -ldx, NEG))
        q1 = tl.where(crow, g1.to(ACC)[None, :] * fq[None, :], gyx)
        q2 = tl.where(crow, g2.to(ACC)[None, :] * fq[None, :], gyx * yx)
        gw, gk, gv = _bwd_scan(x, mn, xq, q1, q2, k, v, y, ld, gy, act, rs, w,
                               crow, pd.to(ACC)[None, :] * fa[None, :], dn.to(ACC) * fa,
                               dd.to(ACC) * fa, not LEFT)
        GW = tl.where(act, GW + gw, GW)
        GK = tl.where(act, GK + gk, GK)
        GV = tl.where(act, GV + gv, GV)
        to, tpn, tpd, tdn, tdd, tog, tg1, tg2 = _bwd_totals(k, v, y, ld, gy, act, rs, w, w64,
                                                           s, e, LEFT)
        d = (e - s).to(tl.float64)
        o, pn, pd, dn, dd = _cat5(o, pn, pd, dn, dd, d, to, tpn, tpd, tdn, tdd, w64)
        og, g1, g2 = _cat3(og, g1, g2, d, tog, tg1, tg2, w64)
    return GW, GK, GV, o, pn, pd, dn, dd, og, g1, g2


@helper
def _bwd_tile(k_ptr, v_ptr, y_ptr, ld_ptr, gy_ptr, off, C, valid, n, rf, w, w64, u, LT,
              lo, lpn, lpd, ldn, ldd, log_, lg1, lg2,
              ro, rpn, rpd, rdn, rdd, rog, rg1, rg2, ACC: tl.constexpr):
    k, v, y, ld, gy, lam = _bwd_load(k_ptr, v_ptr, y_ptr, ld_ptr, gy_ptr, off, valid, u, ACC)
    vl = valid & (rf >= 1)
    kl, vvl, yl, ldl, gyl, _l = _bwd_load(k_ptr, v_ptr, y_ptr, ld_ptr, gy_ptr, off - C, vl, u, ACC)
    vr = valid & (rf + 1 < n)
    kr, vvr, yr, ldr, gyr, _r = _bwd_load(k_ptr, v_ptr, y_ptr, ld_ptr, gy_ptr, off + C, vr, u, ACC)
    z = tl.zeros_like(k)
    GW, GK, GV, lo, lpn, lpd, ldn, ldd, log_, lg1, lg2 = _bwd_pass(
        k, v, y, ld, gy, kl, vvl, yl, ldl, gyl, valid, n, rf, w, LT,
        lo, lpn, lpd, ldn, ldd, log_, lg1, lg2, z, z, z, w64, ACC, True)
    GW, GK, GV, ro, rpn, rpd, rdn, rdd, rog, rg1, rg2 = _bwd_pass(
        k, v, y, ld, gy, kr, vvr, yr, ldr, gyr, valid, n, rf, w, LT,
        ro, rpn, rpd, rdn, rdd, rog, rg1, rg2, GW, GK, GV, w64, ACC, False)
    # diagonal terms
    p = tl.exp(-tl.maximum(lam, 0.0))
    gvd = gy * p
    gkd = gvd * (v - y)
    GK = GK + gkd
    GV = GV + gvd
    # gw, gu are sums over all of B * T: float64 from the tile sums on, so their rounding does
    # not grow with T
    gw_t = tl.sum(tl.where(valid, GW, 0.0).to(tl.float64), axis=0)
    gu_t = tl.sum(tl.where(valid, gkd, 0.0).to(tl.float64), axis=0)
    return GK, GV, gw_t, gu_t, lo, lpn, lpd, ldn, ldd, log_, lg1, lg2


@triton.autotune(configs=BWD_SUM_CONFIGS, key=KEY)
@triton.jit(do_not_specialize=["T", "NT", "CHUNK"])
def biwkv4_bwd_summary_kernel(k_ptr, v_ptr, w_ptr, u_ptr, y_ptr, logd_ptr, gy_ptr, s_ptr,
                              B, T, C, NT, CHUNK, ACC: tl.constexpr, BT: tl.constexpr,
                              BLOCK_C: tl.constexpr):
    """Per chunk: left and right totals of F (5 values) and Q (3 values), float64."""
    pid_b, pid_n, cols, cmask, start, L, so, st, r = _program(B, T, C, NT, CHUNK, BT, BLOCK_C)
    rf = r.to(ACC)
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(ACC)
    u = tl.load(u_ptr + cols, mask=cmask, other=0.0).to(ACC)
    w64 = w.to(tl.float64)
    LT = _lane_budget(w, cmask, BT, ACC)
    lo, z = _empty(w64)
    lpn, lpd, ldn, ldd, lg1, lg2 = z, z, z, z, z, z
    log_ = lo
    ro, rpn, rpd, rdn, rdd, rog, rg1, rg2 = lo, z, z, z, z, lo, z, z
    for i in range(0, tl.cdiv(L, BT)):
        t0, n, valid = _rows(start, i, L, r, cmask, C, BT)
        off = (pid_b * T + t0 + r) * C + cols[None, :]
        lo, lpn, lpd, ldn, ldd, log_, lg1, lg2 = _bwd_total(
            k_ptr, v_ptr, y_ptr, logd_ptr, gy_ptr, off, valid, n, rf, w, w64, u, LT,
            lo, lpn, lpd, ldn, ldd, log_, lg1, lg2, ACC, True)
        to, tpn, tpd, tdn, tdd, tog, tg1, tg2 = _bwd_total(
            k_ptr, v_ptr, y_ptr, logd_ptr, gy_ptr, off, valid, n, rf, w, w64, u, LT,
            lo * 0 + NEG, z, z, z, z, lo * 0 + NEG, z, z, ACC, False)
        d = (t0 - start).to(tl.float64)
        ro, rpn, rpd, rdn, rdd = _cat5(to, tpn, tpd, tdn, tdd, d, ro, rpn, rpd, rdn, rdd, w64)
        rog, rg1, rg2 = _cat3(tog, tg1, tg2, d, rog, rg1, rg2, w64)
    vals_l = (lo, lpn, lpd, ldn, ldd, log_, lg1, lg2)
    vals_r = (ro, rpn, rpd, rdn, rdd, rog, rg1, rg2)
    for i in tl.static_range(8):
        tl.store(s_ptr + i * st + so, vals_l[i], mask=cmask)
        tl.store(s_ptr + (8 + i) * st + so, vals_r[i], mask=cmask)


@triton.autotune(configs=CARRY_CONFIGS, key=KEY)
@triton.jit(do_not_specialize=["T", "NT", "CHUNK"])
def biwkv4_bwd_carry_kernel(w_ptr, s_ptr, c_ptr, B, T, C, NT, CHUNK,
                            NB: tl.constexpr, BLOCK_C: tl.constexpr):
    """biwkv4_fwd_carry_kernel for the 8 backward state values per direction (F with its
    distance sums, Q)."""
    pid_b = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    w64, LTc = _carry_setup(w_ptr, cols, cmask, CHUNK, NB)
    st = (B * NT * C).to(tl.int64)
    j = tl.arange(0, NB)[:, None]
    for d in range(0, 2):
        p0, z = _empty(w64)
        p1, p2, p3, p4, p5, p6, p7 = z, z, z, z, p0, z, z
        for blk in range(0, NT, NB):
            row, n_out, n_in, ln, X = _carry_rows(d, j, blk, NT, T, CHUNK)
            has = (row >= 1) & (row < NT) & cmask[None, :]
            so_in = (pid_b * NT + n_in) * C + cols[None, :]
            sd = s_ptr + 8 * d * st
            e0 = _ldo(sd, so_in, st, 0, has)
            e1 = _ld(sd, so_in, st, 1, has)
            e2 = _ld(sd, so_in, st, 2, has)
            e3 = _ld(sd, so_in, st, 3, has)
            e4 = _ld(sd, so_in, st, 4, has)
            e5 = _ldo(sd, so_in, st, 5, has)
            e6 = _ld(sd, so_in, st, 6, has)
            e7 = _ld(sd, so_in, st, 7, has)
            nrow = tl.minimum(NB, NT - blk)
            O0, z2 = _empty(e0)
            O1, O2, O3, O4, O5, O6, O7 = z2, z2, z2, z2, O0, z2, z2
            for sp in range(0, tl.cdiv(nrow, LTc)):
                s0 = sp * LTc
                e_ = tl.minimum(s0 + LTc, nrow)
                act = (j >= s0) & (j < e_) & cmask[None, :]
                first = j == s0
                lnf = _pick(ln, first)
                f0, f1, f2, f3, f4 = _cat5(p0, p1, p2, p3, p4, lnf, _pick(e0, first),
                                           _pick(e1, first), _pick(e2, first), _pick(e3, first),
                                           _pick(e4, first), w64)
                f5, f6, f7 = _cat3(p5, p6, p7, lnf, _pick(e5, first), _pick(e6, first),
                                   _pick(e7, first), w64)
                rel = X - _pick(X + tl.zeros_like(e0), first)[None, :]
                W = w64[None, :]
                x = tl.where(act & first, f0[None, :], tl.where(act, e0, NEG))
                m1 = tl.where(first, f1[None, :], e1)
                m2 = tl.where(first, f2[None, :], e2)
                m3 = tl.where(first, f3[None, :], e3)
                m4 = tl.where(first, f4[None, :], e4)
                A = x + rel * W
                m = tl.max(A, axis=0)
                ex = tl.exp(A - m[None, :])
                c1 = tl.cumsum(ex * m1, axis=0)
                c2 = tl.cumsum(ex * m2, axis=0)
                # distance sums: each element's own plus (X_r - X_q) times its mass
                c3 = rel * c1 - tl.cumsum(ex * m1 * rel, axis=0) + tl.cumsum(ex * m3, axis=0)
                c4 = rel * c2 - tl.cumsum(ex * m2 * rel, axis=0) + tl.cumsum(ex * m4, axis=0)
                no, inv, nz = _norm(m[None, :] - rel * W, c2)
                O0 = tl.where(act, no, O0)
                O1 = tl.where(act, c1 * inv, O1)
                O2 = tl.where(act, tl.where(nz, 1.0, 0.0), O2)
                O3 = tl.where(act, c3 * inv, O3)
                O4 = tl.where(act, c4 * inv, O4)
                xq = tl.where(act & first, f5[None, :], tl.where(act, e5, NEG))
                q1 = tl.where(first, f6[None, :], e6)
                q2 = tl.where(first, f7[None, :], e7)
                Aq = xq + rel * W
                mq = tl.max(Aq, axis=0)
                eq = tl.exp(Aq - mq[None, :])
                cq1 = tl.cumsum(eq * q1, axis=0)
                cq2 = tl.cumsum(eq * q2, axis=0)
                no, inv, nz = _norm(mq[None, :] - rel * W, tl.maximum(tl.abs(cq1), tl.abs(cq2)))
                O5 = tl.where(act, no, O5)
                O6 = tl.where(act, cq1 * inv, O6)
                O7 = tl.where(act, cq2 * inv, O7)
                lastr = j == e_ - 1
                p0 = _pick(O0, lastr)
                p1 = _pick(O1, lastr)
                p2 = _pick(O2, lastr)
                p3 = _pick(O3, lastr)
                p4 = _pick(O4, lastr)
                p5 = _pick(O5, lastr)
                p6 = _pick(O6, lastr)
                p7 = _pick(O7, lastr)
            ok = (row < NT) & cmask[None, :]
            so_out = (pid_b * NT + n_out) * C + cols[None, :]
            cp = c_ptr + 8 * d * st
            vals = (O0, O1, O2, O3, O4, O5, O6, O7)
            for i in tl.static_range(8):
                tl.store(cp + i * st + so_out, vals[i], mask=ok)


@triton.autotune(configs=BWD_CONFIGS, key=KEY_BWD)
@triton.jit(do_not_specialize=["T", "NT", "CHUNK", "SPC"])
def biwkv4_bwd_kernel(k_ptr, v_ptr, w_ptr, u_ptr, y_ptr, logd_ptr, gy_ptr, gk_ptr, gv_ptr,
                      gwp_ptr, gup_ptr, c_ptr, sc_ptr, B, T, C, NT, CHUNK, SPC,
                      HAS_CARRY: tl.constexpr, ACC: tl.constexpr, BT: tl.constexpr,
                      BLOCK_C: tl.constexpr):
    """Local backward pass over one chunk (pass 1: right carries of the tiles into scratch;
    pass 2: tiles left to right). gk, gv are stored in their dtype; gw, gu partials per
    (b, chunk, c) go to (B, NT, C) buffers that torch sums (deterministic, no atomics)."""
    pid_b, pid_n, cols, cmask, start, L, so, st, r = _program(B, T, C, NT, CHUNK, BT, BLOCK_C)
    rf = r.to(ACC)
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(ACC)
    u = tl.load(u_ptr + cols, mask=cmask, other=0.0).to(ACC)
    w64 = w.to(tl.float64)
    LT = _lane_budget(w, cmask, BT, ACC)
    if HAS_CARRY:
        lo = _ldo(c_ptr, so, st, 0, cmask)
        lpn = _ld(c_ptr, so, st, 1, cmask)
        lpd = _ld(c_ptr, so, st, 2, cmask)
        ldn = _ld(c_ptr, so, st, 3, cmask)
        ldd = _ld(c_ptr, so, st, 4, cmask)
        log_ = _ldo(c_ptr, so, st, 5, cmask)
        lg1 = _ld(c_ptr, so, st, 6, cmask)
        lg2 = _ld(c_ptr, so, st, 7, cmask)
        ro = _ldo(c_ptr, so, st, 8, cmask)
        rpn = _ld(c_ptr, so, st, 9, cmask)
        rpd = _ld(c_ptr, so, st, 10, cmask)
        rdn = _ld(c_ptr, so, st, 11, cmask)
        rdd = _ld(c_ptr, so, st, 12, cmask)
        rog = _ldo(c_ptr, so, st, 13, cmask)
        rg1 = _ld(c_ptr, so, st, 14, cmask)
        rg2 = _ld(c_ptr, so, st, 15, cmask)
    else:
        lo, z = _empty(w64)
        lpn, lpd, ldn, ldd, log_, lg1, lg2 = z, z, z, z, lo, z, z
        ro, rpn, rpd, rdn, rdd, rog, rg1, rg2 = lo, z, z, z, z, lo, z, z
    ntile = tl.cdiv(L, BT)
    sst = (B * NT * SPC * C).to(tl.int64)
    slot0 = (pid_b * NT + pid_n) * SPC
    for ii in range(0, ntile - 1):
        i = ntile - 1 - ii
        sso = (slot0 + i) * C + cols
        vals = (ro, rpn, rpd, rdn, rdd, rog, rg1, rg2)
        for q in tl.static_range(8):
            tl.store(sc_ptr + q * sst + sso, vals[q], mask=cmask)
        t0, n, valid = _rows(start, i, L, r, cmask, C, BT)
        off = (pid_b * T + t0 + r) * C + cols[None, :]
        ro, rpn, rpd, rdn, rdd, rog, rg1, rg2 = _bwd_total(
            k_ptr, v_ptr, y_ptr, logd_ptr, gy_ptr, off, valid, n, rf, w, w64, u, LT,
            ro, rpn, rpd, rdn, rdd, rog, rg1, rg2, ACC, False)
    tl.debug_barrier()
    gw_acc = tl.zeros([BLOCK_C], tl.float64)
    gu_acc = tl.zeros([BLOCK_C], tl.float64)
    for i in range(0, ntile):
        sso = (slot0 + i) * C + cols
        pm = cmask & (i > 0)
        ro = tl.where(i > 0, _ldo(sc_ptr, sso, sst, 0, pm), ro)
        rpn = tl.where(i > 0, _ld(sc_ptr, sso, sst, 1, pm), rpn)
        rpd = tl.where(i > 0, _ld(sc_ptr, sso, sst, 2, pm), rpd)
        rdn = tl.where(i > 0, _ld(sc_ptr, sso, sst, 3, pm), rdn)
        rdd = tl.where(i > 0, _ld(sc_ptr, sso, sst, 4, pm), rdd)
        rog = tl.where(i > 0, _ldo(sc_ptr, sso, sst, 5, pm), rog)
        rg1 = tl.where(i > 0, _ld(sc_ptr, sso, sst, 6, pm), rg1)
        rg2 = tl.where(i > 0, _ld(sc_ptr, sso, sst, 7, pm), rg2)
        t0, n, valid = _rows(start, i, L, r, cmask, C, BT)
        off = (pid_b * T + t0 + r) * C + cols[None, :]
        gk, gv, gw_t, gu_t, lo, lpn, lpd, ldn, ldd, log_, lg1, lg2 = _bwd_tile(
            k_ptr, v_ptr, y_ptr, logd_ptr, gy_ptr, off, C, valid, n, rf, w, w64, u, LT,
            lo, lpn, lpd, ldn, ldd, log_, lg1, lg2, ro, rpn, rpd, rdn, rdd, rog, rg1, rg2, ACC)
        tl.store(gk_ptr + off, gk.to(gk_ptr.dtype.element_ty), mask=valid)
        tl.store(gv_ptr + off, gv.to(gv_ptr.dtype.element_ty), mask=valid)
        gw_acc += gw_t
        gu_acc += gu_t
    tl.store(gwp_ptr + so, gw_acc, mask=cmask)
    tl.store(gup_ptr + so, gu_acc, mask=cmask)


KERNELS = {
    "fwd_summary": biwkv4_fwd_summary_kernel,
    "fwd_carry": biwkv4_fwd_carry_kernel,
    "fwd": biwkv4_fwd_kernel,
    "bwd_summary": biwkv4_bwd_summary_kernel,
    "bwd_carry": biwkv4_bwd_carry_kernel,
    "bwd": biwkv4_bwd_kernel,
}
CONFIGS = {
    "fwd_summary": FWD_SUM_CONFIGS, "fwd_carry": CARRY_CONFIGS, "fwd": FWD_CONFIGS,
    "bwd_summary": BWD_SUM_CONFIGS, "bwd_carry": CARRY_CONFIGS, "bwd": BWD_CONFIGS,
}
