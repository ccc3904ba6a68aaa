"""@triton.jit kernels of Bi-WKV4. The design (units, anchoring, tiles, traffic, pipelining) is
in docs/kernels.md; the operator and its gradient in docs/biwkv4.md; the host-side dispatch in
kernels_triton/ops.py.

Layout: k, v, y, z, gy, gk, gv are contiguous (B, T, C); w, u are (C,). A tile is BT rows by
BLOCK_C channels, [BT, BLOCK_C]; its dots run per block of DB rows ([BT / DB, DB, BLOCK_C]).
Summary and carry buffers are planes (NV, B, NU, C), one row per unit of S tokens.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

NEG = tl.constexpr(-1e30)       # "minus infinity" that stays finite under subtraction
LN2 = tl.constexpr(0.6931471805599453)
NSEG_MAX = tl.constexpr(32)     # rows of the carry kernel's scratch (its largest NSEG)

# Largest |w| * (rows of a unit) for which one anchor per unit is exact (docs/kernels.md,
# "Units and anchors"); the host picks the unit length S from it.
BUDGET = {"fp32": 24.0, "fp64": 256.0}
# Per accumulation dtype: the forward's tile rows BT (also the granularity of the stored
# residual K_t), the rows DB of its dot blocks, and the same two for the backward (whose
# tiles hold five inputs, so they are shorter).
TILES = {"fp32": (64, 16, 32, 16), "fp64": (16, 16, 16, 16)}

# HPCM_BIWKV4_AUTOTUNE=0 (and the interpreter, which cannot time configs) keeps one config.
SINGLE_CONFIG = INTERPRET or os.environ.get("HPCM_BIWKV4_AUTOTUNE", "1") == "0"


def _cfg(bc, warps, stages, **kw):
    return triton.Config({"BLOCK_C": bc, "STAGES": stages, **kw}, num_warps=warps,
                         num_stages=stages)


# The first config of each list is the fixed one (shape_only_selection, fixed_configs, the
# single config). Registers, spills and async copies of every config: python -m
# kernels_triton.aot (bench/RESULTS.md).
if INTERPRET:   # numpy's cost is per operation: few wide programs
    SUM_CONFIGS = [_cfg(32, 4, 1)]
    FWD_CONFIGS = [_cfg(32, 4, 1)]
    BWD_CONFIGS = [_cfg(32, 4, 1)]
    CARRY_CONFIGS = [triton.Config({"BLOCK_C": 32, "NSEG": 8}, num_warps=4)]
else:
    # Tile kernels: BLOCK_C 16 (the smallest dot width) keeps the output kernels within 255
    # registers without spills; the summary kernels fit 128. Only configs that compile
    # without spills for every dtype, unit length and target of the AOT report are listed:
    # the backward with 3 stages or 4 warps and the carry with 32 channels did spill.
    SUM_CONFIGS = [_cfg(16, 4, 3), _cfg(32, 8, 3), _cfg(16, 8, 2)]
    FWD_CONFIGS = [_cfg(16, 4, 2), _cfg(16, 8, 2)]
    BWD_CONFIGS = [_cfg(16, 8, 2)]
    CARRY_CONFIGS = [triton.Config({"BLOCK_C": 16, "NSEG": 32}, num_warps=8),
                     triton.Config({"BLOCK_C": 16, "NSEG": 16}, num_warps=4)]
if SINGLE_CONFIG:
    SUM_CONFIGS, FWD_CONFIGS = SUM_CONFIGS[:1], FWD_CONFIGS[:1]
    BWD_CONFIGS, CARRY_CONFIGS = BWD_CONFIGS[:1], CARRY_CONFIGS[:1]
assert all(c.kwargs["NSEG"] <= NSEG_MAX.value for c in CARRY_CONFIGS)

# Autotune keys: C, a capped power-of-two bucket of T (TB), and the structural constexprs.
KEY_TILE = ["C", "TB", "S", "DB"]
KEY_CARRY = ["C", "TB", "S", "BWD"]

# Under the interpreter every call of a @triton.jit helper re-patches triton.language
# (milliseconds per call), so there the helpers are plain Python functions on the patched tl.
helper = (lambda f: f) if INTERPRET else triton.jit


# ----------------------------------------------------------------------------- tiles, units
@helper
def _setup(w_ptr, C, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    pid_b = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(ACC)
    return pid_b, cols, cmask, w


@helper
def _tile(pid_b, t0, T, C, cols, cmask, BT: tl.constexpr):
    """Tokens [BT, 1], validity and element offsets [BT, BLOCK_C] of the tile that starts at
    token t0."""
    t = t0 + tl.arange(0, BT)[:, None]
    valid = (t < T) & cmask[None, :]
    off = (pid_b * T + t) * C + cols[None, :]
    return t, valid, off


@helper
def _tile_i(pid_b, i, TPP, T, C, cols, cmask, BT: tl.constexpr):
    """Tile i of this program's TPP tiles: its index j, first token t0 and _tile's values."""
    j = tl.program_id(2) * TPP + i
    t0 = j * BT
    t, valid, off = _tile(pid_b, t0, T, C, cols, cmask, BT)
    return j, t0, t, valid, off


@helper
def _load_kv(k_ptr, v_ptr, off, valid, ACC: tl.constexpr):
    """The tile's keys (NEG where not valid, so they drop out of maxima and exponentials) and
    values (0 there), in ACC."""
    k = tl.where(valid, tl.load(k_ptr + off, mask=valid, other=0.0).to(ACC), NEG)
    return k, tl.load(v_ptr + off, mask=valid, other=0.0).to(ACC)


@helper
def _anchored(x, t, t0, W, BT: tl.constexpr, S: tl.constexpr, ACC: tl.constexpr):
    """Each row's unit anchor m (the unit's max of x), its offset r in the unit, and the
    anchored terms e^{x - m + r w} (left sums) and e^{x - m - r w} (right sums)."""
    m = _unit_max(x, BT, S)
    ro = ((t - t0) % S).to(ACC)
    return m, ro, tl.exp(x - m + ro * W), tl.exp(x - m - ro * W)


@helper
def _unit_rows(pid_b, t0, NU, C, cols, cmask, BT: tl.constexpr, S: tl.constexpr):
    """Validity and offsets [BT / S, BLOCK_C] of the summary rows of the tile's units."""
    unit = t0 // S + tl.arange(0, BT // S)[:, None]
    return (unit < NU) & cmask[None, :], (pid_b * NU + unit) * C + cols[None, :]


@helper
def _unit_max(x, BT: tl.constexpr, S: tl.constexpr):
    """The max of x over each row's unit of S rows: [1, BLOCK_C] if the tile is one unit,
    else [BT, BLOCK_C]."""
    if S == BT:
        r = tl.max(x, axis=0)[None, :]
    else:
        bc: tl.constexpr = x.shape[1]
        m = tl.max(tl.reshape(x, (BT // S, S, bc)), axis=1)
        r = tl.reshape(tl.broadcast_to(m[:, None, :], (BT // S, S, bc)), (BT, bc))
    return r


@helper
def _unit_sum(x, BT: tl.constexpr, S: tl.constexpr):
    """[BT // S, BLOCK_C]: x summed over each unit of S rows."""
    bc: tl.constexpr = x.shape[1]
    return tl.sum(tl.reshape(x, (BT // S, S, bc)), axis=1)


@helper
def _tdot(m, x, DB: tl.constexpr, PREC: tl.constexpr):
    """m @ x per dot block: x [BT, BLOCK_C] as [BT / DB, DB, BLOCK_C], m [BT / DB, DB, DB] a
    0/1 or small-integer matrix (exact in tf32). PREC (docs/kernels.md, "In-unit sums as
    dots"): "tf32" splits x into x_hi (its top 11 significant bits, exact in tf32) and
    x - x_hi and multiplies both by tf32 dots, so the products are exact to ~2^-22 (what
    input_precision="tf32x3" gives, without its third product m_lo x_hi, which is 0 here,
    and without splitting m in registers); "ieee" is an exact dot; "fma" multiplies on the
    FMA units as a broadcast sum, without dot fragments (the float64 backward, whose DMMA
    fragments spill on sm_80 and sm_90)."""
    bt: tl.constexpr = x.shape[0]
    bc: tl.constexpr = x.shape[1]
    if bt == DB and PREC != "fma":      # one block: a 2-D dot
        x3 = x
        m = tl.reshape(m, (DB, DB))
    else:
        x3 = tl.reshape(x, (bt // DB, DB, bc))
    if PREC == "fma":
        r = tl.sum(m[:, :, :, None] * x3[:, None, :, :], axis=2)
    elif PREC == "ieee":
        r = tl.dot(m, x3, input_precision="ieee")
    else:
        hi = (x3.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
        r = tl.dot(m, x3 - hi, tl.dot(m, hi, input_precision="tf32"), input_precision="tf32")
    return tl.reshape(r, (bt, bc))


@helper
def _cross(x, xd, DB: tl.constexpr, SPU: tl.constexpr, LEFT: tl.constexpr):
    """For each row of x [BT, BLOCK_C]: the sums over the earlier (LEFT) or later dot blocks
    b' of its unit (SPU blocks per unit), P0 = sum x_b' and P1 = sum ((|b - b'| - 1) DB x_b'
    + xd_b') over the columns of those blocks (xd: x weighted by each row's distance from its
    block's last (LEFT) or first row). [BT, BLOCK_C] each."""
    bt: tl.constexpr = x.shape[0]
    bc: tl.constexpr = x.shape[1]
    nb: tl.constexpr = bt // DB
    cs = tl.sum(tl.reshape(x, (nb, DB, bc)), axis=1)
    csd = tl.sum(tl.reshape(xd, (nb, DB, bc)), axis=1)
    b = tl.arange(0, nb)[:, None]
    bb = tl.arange(0, nb)[None, :]
    m = (b // SPU) == (bb // SPU)
    if LEFT:
        m = m & (bb < b)
        gap = b - bb - 1
    else:
        m = m & (bb > b)
        gap = bb - b - 1
    m = m[:, :, None]
    p0 = tl.sum(tl.where(m, cs[None, :, :], 0.0), axis=1)
    p1 = tl.sum(tl.where(m, (gap * DB)[:, :, None].to(x.dtype) * cs[None, :, :] + csd[None, :, :],
                         0.0), axis=1)
    p0 = tl.reshape(tl.broadcast_to(p0[:, None, :], (nb, DB, bc)), (bt, bc))
    p1 = tl.reshape(tl.broadcast_to(p1[:, None, :], (nb, DB, bc)), (bt, bc))
    return p0, p1


@helper
def _tri(NSUB: tl.constexpr, DB: tl.constexpr, LEFT: tl.constexpr, DIST: tl.constexpr,
         ACC: tl.constexpr):
    """[NSUB, DB, DB]: the strictly lower (LEFT) or upper triangular 0/1 matrix of a dot
    block, or with DIST the same holding the distance |r - j| - 1."""
    r = tl.arange(0, DB)[:, None]
    j = tl.arange(0, DB)[None, :]
    if LEFT:
        d = r - 1 - j
    else:
        d = j - r - 1
    if DIST:
        m = tl.where(d >= 0, d, 0).to(ACC)
    else:
        m = tl.where(d >= 0, 1.0, 0.0).to(ACC)
    return tl.broadcast_to(m[None, :, :], (NSUB, DB, DB))


@helper
def _frexp(x):
    """For x >= 0 with binary exponent e: (e ln 2, 2^-e); x 2^-e is in [1, 2) for normal x
    (exact scaling, no MUFU)."""
    if x.dtype == tl.float64:
        e = ((x.to(tl.int64, bitcast=True) >> 52) & 2047) - 1023
        p = ((1023 - e) << 52).to(tl.float64, bitcast=True)
    else:
        e = ((x.to(tl.int32, bitcast=True) >> 23) & 255) - 127
        p = ((127 - e) << 23).to(tl.float32, bitcast=True)
    return e.to(x.dtype) * LN2, p


@helper
def _cap(ACC: tl.constexpr):
    """Largest exponent the backward's row factors take (e^cap stays finite)."""
    if ACC == tl.float64:
        c = 700.0
    else:
        c = 80.0
    return c


# ----------------------------------------------------------------------------- state algebra
@helper
def _comb(E1a, E2a, pa, a1, a2, a3, a4, E1b, E2b, pb, b1, b2, b3, b4, w, SG: tl.constexpr):
    """Sum of two anchored states. A state is e^{E1 - E2} times mantissas (a1, a2) with
    distance moments (a3, a4) about its anchor position p, seen along the scan direction
    (SG = +1: left sums, -1: right sums); the larger anchor is kept (docs/kernels.md)."""
    dp = (pa - pb).to(w.dtype)
    d = (E1a - E1b) - (E2a - E2b) + SG * dp * w
    keep = d >= 0
    f = tl.exp(-tl.abs(d))
    fa = tl.where(keep, 1.0, f)
    fb = tl.where(keep, f, 1.0)
    # moments about the kept anchor: the other state's masses move by the anchor distance
    sa = tl.where(keep, 0.0, -SG * dp)
    sb = tl.where(keep, SG * dp, 0.0)
    return (tl.where(keep, E1a, E1b), tl.where(keep, E2a, E2b), tl.where(keep, pa, pb),
            a1 * fa + b1 * fb, a2 * fa + b2 * fb,
            (a3 + sa * a1) * fa + (b3 + sb * b1) * fb, (a4 + sa * a2) * fa + (b4 + sb * b2) * fb)


@helper
def _to_unit(E1a, E2a, pa, a1, a2, a3, a4, E1c, E2c, pc, w, SG: tl.constexpr):
    """A state as the carry of the unit anchored at (E1c, E2c, pc): its exponent relative to
    that anchor seen from the unit's first row, and its moments about that row."""
    n = SG * (pc - pa) - 1          # distance of the anchor position from the unit's row 0
    d = (E1a - E1c) - (E2a - E2c) - n.to(w.dtype) * w
    nf = n.to(w.dtype)
    return d, a3 + nf * a1, a4 + nf * a2


# ----------------------------------------------------------------------------- forward
@triton.autotune(configs=SUM_CONFIGS, key=KEY_TILE)
@triton.jit(do_not_specialize=["T", "NT", "NU", "TPP", "TB"])
def biwkv4_fwd_sum_kernel(k_ptr, v_ptr, w_ptr, s_ptr, B, T, C, NT, NU, TPP, TB,
                          S: tl.constexpr, BT: tl.constexpr, DB: tl.constexpr,
                          ACC: tl.constexpr, BLOCK_C: tl.constexpr, STAGES: tl.constexpr):
    """Unit summaries of TPP tiles: planes (K_u, nL, dL, nR, dR) of (5, B, NU, C), the left and
    right sums of e^{k}(v, 1) anchored at the unit's max key K_u and first row."""
    pid_b, cols, cmask, w = _setup(w_ptr, C, BLOCK_C, ACC)
    W = w[None, :]
    st = B * NU * C
    for i in tl.range(0, TPP, num_stages=STAGES):
        j, t0, t, valid, off = _tile_i(pid_b, i, TPP, T, C, cols, cmask, BT)
        k, v = _load_kv(k_ptr, v_ptr, off, valid, ACC)
        ku, ro, xl, xr = _anchored(k, t, t0, W, BT, S, ACC)
        ok, so = _unit_rows(pid_b, t0, NU, C, cols, cmask, BT, S)
        tl.store(s_ptr + so, _unit_sum(tl.where(ro == 0, ku, 0.0), BT, S), mask=ok)
        tl.store(s_ptr + st + so, _unit_sum(xl * v, BT, S), mask=ok)
        tl.store(s_ptr + 2 * st + so, _unit_sum(xl, BT, S), mask=ok)
        tl.store(s_ptr + 3 * st + so, _unit_sum(xr * v, BT, S), mask=ok)
        tl.store(s_ptr + 4 * st + so, _unit_sum(xr, BT, S), mask=ok)


@helper
def _unit_state(s_ptr, a_ptr, b_ptr, c_ptr, kt_ptr, pid_b, unit, NU, NT, T, C, cols, ok, st,
                S: tl.constexpr, BT: tl.constexpr, BWD: tl.constexpr, ACC: tl.constexpr):
    """The summary of each unit in ``unit`` ([NSEG, 1]) as (E1, E2, p, left 4, right 4);
    empty where not ok. Units of one row (S == 1) are read from the inputs themselves: k, v
    (forward; a_ptr, b_ptr) or z, gy, y (backward; a_ptr, b_ptr, c_ptr)."""
    so = (pid_b * NU + unit) * C + cols[None, :]
    z = tl.zeros(so.shape, ACC)
    if S == 1:
        if BWD:
            e1 = tl.where(ok, -tl.load(a_ptr + so, mask=ok, other=0.0).to(ACC), NEG)
            g = tl.load(b_ptr + so, mask=ok, other=0.0).to(ACC)
            gyy = g * tl.load(c_ptr + so, mask=ok, other=0.0).to(ACC)
            l1, l2, r1, r2 = g, gyy, g, gyy
        else:
            e1 = tl.where(ok, tl.load(a_ptr + so, mask=ok, other=0.0).to(ACC), NEG)
            v = tl.load(b_ptr + so, mask=ok, other=0.0).to(ACC)
            one = tl.where(ok, 1.0, 0.0).to(ACC)
            l1, l2, r1, r2 = v, one, v, one
        l3, l4, r3, r4 = z, z, z, z
    else:
        e1 = tl.load(s_ptr + so, mask=ok, other=NEG)
        l1 = tl.load(s_ptr + st + so, mask=ok, other=0.0)
        l2 = tl.load(s_ptr + 2 * st + so, mask=ok, other=0.0)
        if BWD:
            l3 = tl.load(s_ptr + 3 * st + so, mask=ok, other=0.0)
            l4 = tl.load(s_ptr + 4 * st + so, mask=ok, other=0.0)
            r1 = tl.load(s_ptr + 5 * st + so, mask=ok, other=0.0)
            r2 = tl.load(s_ptr + 6 * st + so, mask=ok, other=0.0)
            r3 = tl.load(s_ptr + 7 * st + so, mask=ok, other=0.0)
            r4 = tl.load(s_ptr + 8 * st + so, mask=ok, other=0.0)
        else:
            r1 = tl.load(s_ptr + 3 * st + so, mask=ok, other=0.0)
            r2 = tl.load(s_ptr + 4 * st + so, mask=ok, other=0.0)
            l3, l4, r3, r4 = z, z, z, z
    if BWD:
        e2 = tl.load(kt_ptr + (pid_b * NT + unit * S // BT) * C + cols[None, :], mask=ok,
                     other=0.0).to(ACC)
    else:
        e2 = z
    p = (unit * S + tl.zeros(so.shape, tl.int32)).to(tl.int32)
    return e1, e2, p, l1, l2, l3, l4, r1, r2, r3, r4


@helper
def _scr_store(ptr, o, m, sst, e1, e2, p, a1, a2, a3, a4, Q0: tl.constexpr, BWD: tl.constexpr):
    """Store a state to scratch planes Q0.. (the forward's states have no E2, no moments)."""
    tl.store(ptr + Q0 * sst + o, e1, mask=m)
    tl.store(ptr + (Q0 + 1) * sst + o, p.to(e1.dtype), mask=m)
    tl.store(ptr + (Q0 + 2) * sst + o, a1, mask=m)
    tl.store(ptr + (Q0 + 3) * sst + o, a2, mask=m)
    if BWD:
        tl.store(ptr + (Q0 + 4) * sst + o, e2, mask=m)
        tl.store(ptr + (Q0 + 5) * sst + o, a3, mask=m)
        tl.store(ptr + (Q0 + 6) * sst + o, a4, mask=m)


@helper
def _scr_load(ptr, o, m, sst, Q0: tl.constexpr, BWD: tl.constexpr, ACC: tl.constexpr):
    e1 = tl.load(ptr + Q0 * sst + o, mask=m, other=NEG)
    p = tl.load(ptr + (Q0 + 1) * sst + o, mask=m, other=0.0).to(tl.int32)
    a1 = tl.load(ptr + (Q0 + 2) * sst + o, mask=m, other=0.0)
    a2 = tl.load(ptr + (Q0 + 3) * sst + o, mask=m, other=0.0)
    if BWD:
        e2 = tl.load(ptr + (Q0 + 4) * sst + o, mask=m, other=0.0)
        a3 = tl.load(ptr + (Q0 + 5) * sst + o, mask=m, other=0.0)
        a4 = tl.load(ptr + (Q0 + 6) * sst + o, mask=m, other=0.0)
    else:
        e2 = tl.zeros_like(a1)
        a3 = e2
        a4 = e2
    return e1, e2, p, a1, a2, a3, a4


@helper
def _store_carry(out_ptr, o, ok, st, d, g1, g2, m1, m2, RIGHT: tl.constexpr,
                 BWD: tl.constexpr):
    """Store one direction's carry of the units at offsets o: backward (d, g1, g2, m1, m2) in
    planes 0-4 (left) or 5-9 (right); forward (d + ln mass, mean) in planes 0-1 or 2-3."""
    if BWD:
        q: tl.constexpr = 5 if RIGHT else 0
        tl.store(out_ptr + q * st + o, d, mask=ok)
        tl.store(out_ptr + (q + 1) * st + o, g1, mask=ok)
        tl.store(out_ptr + (q + 2) * st + o, g2, mask=ok)
        tl.store(out_ptr + (q + 3) * st + o, m1, mask=ok)
        tl.store(out_ptr + (q + 4) * st + o, m2, mask=ok)
    else:
        q: tl.constexpr = 2 if RIGHT else 0
        has = g2 > 0
        tl.store(out_ptr + q * st + o, tl.where(has, d + tl.log(tl.where(has, g2, 1.0)), NEG),
                 mask=ok)
        tl.store(out_ptr + (q + 1) * st + o, tl.where(has, g1 / tl.where(has, g2, 1.0), 0.0),
                 mask=ok)


@triton.autotune(configs=CARRY_CONFIGS, key=KEY_CARRY)
@triton.jit(do_not_specialize=["T", "NT", "NU", "TB"])
def biwkv4_carry_kernel(s_ptr, a_ptr, b_ptr, c_ptr, kt_ptr, w_ptr, out_ptr, scr_ptr,
                        B, T, C, NT, NU, TB, S: tl.constexpr, BT: tl.constexpr,
                        BWD: tl.constexpr, ACC: tl.constexpr, NSEG: tl.constexpr,
                        BLOCK_C: tl.constexpr):
    """Carries of every unit: for the left sums everything before the unit, for the right sums
    everything after it, each in the unit's own frame (backward: K_t from kt (B, NT, C), one
    row per BT tokens). The NU units of a (b, channel block)
    form NSEG segments of SL consecutive units; phase 1 folds each segment (all segments at
    once), phase 2 scans the NSEG segment totals (through the scratch rows), phase 3 walks the
    segments again and writes each unit's carry. Forward output planes (4, B, NU, C):
    (dL + ln mass, mean, dR + ln mass, mean); backward (10, B, NU, C): (dL, g1, g2, m1, m2)
    and the same for the right."""
    pid_b, cols, cmask, w = _setup(w_ptr, C, BLOCK_C, ACC)
    SL = tl.cdiv(NU, NSEG)
    seg = tl.arange(0, NSEG)[:, None]
    st = B * NU * C
    e0 = tl.zeros([NSEG, BLOCK_C], ACC) + NEG
    z0 = tl.zeros([NSEG, BLOCK_C], ACC)
    p0 = tl.zeros([NSEG, BLOCK_C], tl.int32)
    # phase 1: segment totals, both directions
    L1, L2, Lp, La, Lb, Lc, Ld = e0, z0, p0, z0, z0, z0, z0
    R1, R2, Rp, Ra, Rb, Rc, Rd = e0, z0, p0, z0, z0, z0, z0
    for i in tl.range(0, SL):
        unit = seg * SL + i
        ok = (unit < NU) & cmask[None, :]
        e1, e2, p, l1, l2, l3, l4, r1, r2, r3, r4 = _unit_state(
            s_ptr, a_ptr, b_ptr, c_ptr, kt_ptr, pid_b, unit, NU, NT, T, C, cols, ok, st,
            S, BT, BWD, ACC)
        L1, L2, Lp, La, Lb, Lc, Ld = _comb(L1, L2, Lp, La, Lb, Lc, Ld,
                                           e1, e2, p, l1, l2, l3, l4, w, 1)
        R1, R2, Rp, Ra, Rb, Rc, Rd = _comb(R1, R2, Rp, Ra, Rb, Rc, Rd,
                                           e1, e2, p, r1, r2, r3, r4, w, -1)
    # phase 2: exclusive scans over the used segments through scratch rows: the totals are
    # written, then each is replaced by the carry into its segment
    nseg = tl.cdiv(NU, SL)
    sm = cmask[None, :] & (seg < nseg)
    _scr_store(scr_ptr, (pid_b * NSEG_MAX + seg) * C + cols[None, :], sm, B * NSEG_MAX * C,
               L1, L2, Lp, La, Lb, Lc, Ld, 0, BWD)
    _scr_store(scr_ptr, (pid_b * NSEG_MAX + seg) * C + cols[None, :], sm, B * NSEG_MAX * C,
               R1, R2, Rp, Ra, Rb, Rc, Rd, 7, BWD)
    tl.debug_barrier()
    e = tl.zeros([BLOCK_C], ACC) + NEG
    zz = tl.zeros([BLOCK_C], ACC)
    pz = tl.zeros([BLOCK_C], tl.int32)
    c1, c2, cp, ca, cb, cc, cd = e, zz, pz, zz, zz, zz, zz
    d1, d2, dp, da, db, dc, dd = e, zz, pz, zz, zz, zz, zz
    for s in tl.range(0, nseg):
        ol = (pid_b * NSEG_MAX + s) * C + cols
        orr = (pid_b * NSEG_MAX + nseg - 1 - s) * C + cols
        t1, t2, tp, ta, tb, tc, td = _scr_load(scr_ptr, ol, cmask, B * NSEG_MAX * C, 0, BWD, ACC)
        u1, u2, up, ua, ub, uc, ud = _scr_load(scr_ptr, orr, cmask, B * NSEG_MAX * C, 7, BWD, ACC)
        tl.debug_barrier()
        _scr_store(scr_ptr, ol, cmask, B * NSEG_MAX * C, c1, c2, cp, ca, cb, cc, cd, 0, BWD)
        _scr_store(scr_ptr, orr, cmask, B * NSEG_MAX * C, d1, d2, dp, da, db, dc, dd, 7, BWD)
        c1, c2, cp, ca, cb, cc, cd = _comb(c1, c2, cp, ca, cb, cc, cd,
                                           t1, t2, tp, ta, tb, tc, td, w, 1)
        d1, d2, dp, da, db, dc, dd = _comb(d1, d2, dp, da, db, dc, dd,
                                           u1, u2, up, ua, ub, uc, ud, w, -1)
    tl.debug_barrier()
    so = (pid_b * NSEG_MAX + seg) * C + cols[None, :]
    L1, L2, Lp, La, Lb, Lc, Ld = _scr_load(scr_ptr, so, sm, B * NSEG_MAX * C, 0, BWD, ACC)
    R1, R2, Rp, Ra, Rb, Rc, Rd = _scr_load(scr_ptr, so, sm, B * NSEG_MAX * C, 7, BWD, ACC)
    # phase 3: each unit's carries; left walks its segment forwards, right backwards
    for i in tl.range(0, SL):
        for RIGHT in tl.static_range(2):
            if RIGHT:
                unit = seg * SL + (SL - 1 - i)
            else:
                unit = seg * SL + i
            ok = (unit < NU) & cmask[None, :]
            e1, e2, p, l1, l2, l3, l4, r1, r2, r3, r4 = _unit_state(
                s_ptr, a_ptr, b_ptr, c_ptr, kt_ptr, pid_b, unit, NU, NT, T, C, cols, ok, st,
                S, BT, BWD, ACC)
            uo = (pid_b * NU + unit) * C + cols[None, :]
            if RIGHT:
                d, m3, m4 = _to_unit(R1, R2, Rp, Ra, Rb, Rc, Rd, e1, e2, p, w, -1)
                _store_carry(out_ptr, uo, ok, st, d, Ra, Rb, m3, m4, True, BWD)
                R1, R2, Rp, Ra, Rb, Rc, Rd = _comb(R1, R2, Rp, Ra, Rb, Rc, Rd,
                                                   e1, e2, p, r1, r2, r3, r4, w, -1)
            else:
                d, m3, m4 = _to_unit(L1, L2, Lp, La, Lb, Lc, Ld, e1, e2, p, w, 1)
                _store_carry(out_ptr, uo, ok, st, d, La, Lb, m3, m4, False, BWD)
                L1, L2, Lp, La, Lb, Lc, Ld = _comb(L1, L2, Lp, La, Lb, Lc, Ld,
                                                   e1, e2, p, l1, l2, l3, l4, w, 1)


@helper
def _sums(a1, a2, DB: tl.constexpr, S: tl.constexpr, LEFT: tl.constexpr, ACC: tl.constexpr,
          PREC: tl.constexpr):
    """In-unit exclusive left (LEFT) or right sums of a1 and a2 [BT, BLOCK_C]: dots of the
    triangular matrix per block, plus the earlier / later blocks of the unit."""
    tri = _tri(a1.shape[0] // DB, DB, LEFT, False, ACC)
    s1 = _tdot(tri, a1, DB, PREC)
    s2 = _tdot(tri, a2, DB, PREC)
    if S > DB:
        p1, _ = _cross(a1, a1, DB, S // DB, LEFT)
        p2, _ = _cross(a2, a2, DB, S // DB, LEFT)
        s1 = s1 + p1
        s2 = s2 + p2
    return s1, s2


@helper
def _carry(c_ptr, pid_b, t, j, NU, C, cols, cmask, valid, st, q,
           S: tl.constexpr, BT: tl.constexpr, FILL: tl.constexpr):
    """Carry plane q of each row's unit: [1, BLOCK_C] when the tile is one unit (tile j),
    else [BT, BLOCK_C]."""
    if S == BT:
        # a program's last tiles may lie past T: they read the last unit's carry (unused)
        o = (pid_b * NU + tl.minimum(j, NU - 1)) * C + cols[None, :]
        m = cmask[None, :]
    else:
        o = (pid_b * NU + t // S) * C + cols[None, :]
        m = valid
    return tl.load(c_ptr + q * st + o, mask=m, other=FILL)


@triton.autotune(configs=FWD_CONFIGS, key=KEY_TILE)
@triton.jit(do_not_specialize=["T", "NT", "NU", "TPP", "TB"])
def biwkv4_fwd_kernel(k_ptr, v_ptr, w_ptr, u_ptr, c_ptr, y_ptr, z_ptr, ya_ptr, kt_ptr,
                      B, T, C, NT, NU, TPP, TB, S: tl.constexpr, BT: tl.constexpr,
                      DB: tl.constexpr, STORE_Z: tl.constexpr, STORE_YA: tl.constexpr,
                      ACC: tl.constexpr, PREC: tl.constexpr, BLOCK_C: tl.constexpr,
                      STAGES: tl.constexpr):
    """y of TPP tiles, each touched once: in-unit left and right sums as dots of the
    triangular 0/1 matrices with the anchored terms e^{k - K_u +- r w}(v, 1), the unit's
    carries added elementwise, then Eq. 5. STORE_Z: z = log-denominator - K_t and K_t, the
    tile max of k, (B, NT, C) (for the backward); STORE_YA: y in float32/64 as well."""
    pid_b, cols, cmask, w = _setup(w_ptr, C, BLOCK_C, ACC)
    u = tl.load(u_ptr + cols, mask=cmask, other=0.0).to(ACC)[None, :]
    W = w[None, :]
    st = B * NU * C
    for i in tl.range(0, TPP, num_stages=STAGES):
        j, t0, t, valid, off = _tile_i(pid_b, i, TPP, T, C, cols, cmask, BT)
        k, v = _load_kv(k_ptr, v_ptr, off, valid, ACC)
        cdl = _carry(c_ptr, pid_b, t, j, NU, C, cols, cmask, valid, st, 0, S, BT, NEG)
        cyl = _carry(c_ptr, pid_b, t, j, NU, C, cols, cmask, valid, st, 1, S, BT, 0.0)
        cdr = _carry(c_ptr, pid_b, t, j, NU, C, cols, cmask, valid, st, 2, S, BT, NEG)
        cyr = _carry(c_ptr, pid_b, t, j, NU, C, cols, cmask, valid, st, 3, S, BT, 0.0)
        if S == 1:      # units of one row: only carries and the diagonal
            ku = k
            one = tl.zeros_like(k) + 1.0
            el, nl, dl = cdl, cyl, one
            er, nr, dr = cdr, cyr, one
        else:
            ku, ro, xl, xr = _anchored(k, t, t0, W, BT, S, ACC)
            nl, dl = _sums(xl * v, xl, DB, S, True, ACC, PREC)
            nr, dr = _sums(xr * v, xr, DB, S, False, ACC, PREC)
            # left total e^{K_u - (r - 1) w + aL} (nl, dl) with the carry, likewise right
            al = tl.maximum(cdl - W, 0.0)
            fl = tl.exp(cdl - W - al)
            sl = tl.exp(-al)
            nl = sl * nl + fl * cyl
            dl = sl * dl + fl
            el = al - (ro - 1.0) * W
            ar = tl.maximum(cdr - W, 0.0)
            fr = tl.exp(cdr - W - ar)
            sr = tl.exp(-ar)
            nr = sr * nr + fr * cyr
            dr = sr * dr + fr
            er = ar + (ro + 1.0) * W
        # Eq. 5 from the three parts (left, right, diagonal), each part's mantissas scaled by
        # a power of two into [1, 2) so that no factor overflows
        ed = u + k - ku
        xl, pl = _frexp(dl)
        xr, pr = _frexp(dr)
        el = tl.where(dl > 0, el + xl, NEG)
        er = tl.where(dr > 0, er + xr, NEG)
        m = tl.maximum(tl.maximum(el, er), ed)
        gl = tl.exp(el - m)
        gr = tl.exp(er - m)
        gd = tl.exp(ed - m)
        den = gl * (dl * pl) + gr * (dr * pr) + gd
        y = (gl * (nl * pl) + gr * (nr * pr) + gd * v) / den
        tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=valid)
        if STORE_YA:
            tl.store(ya_ptr + off, y, mask=valid)
        if STORE_Z:
            kt = tl.max(k, axis=0)
            tl.store(z_ptr + off, m + tl.log(den) + (ku - kt[None, :]), mask=valid)
            tl.store(kt_ptr + (pid_b * NT + j) * C + cols, kt, mask=cmask & (j < NT))


# ----------------------------------------------------------------------------- backward
@triton.autotune(configs=SUM_CONFIGS, key=KEY_TILE)
@triton.jit(do_not_specialize=["T", "NT", "NU", "TPP", "TB"])
def biwkv4_bwd_sum_kernel(z_ptr, gy_ptr, y_ptr, w_ptr, s_ptr, B, T, C, NT, NU, TPP, TB,
                          S: tl.constexpr, BT: tl.constexpr, DB: tl.constexpr,
                          ACC: tl.constexpr, BLOCK_C: tl.constexpr, STAGES: tl.constexpr):
    """Unit summaries of the backward scans of q = gy e^{-logD} and q y, anchored at the
    unit's max Q_u of -z: planes (Q_u, left g1, g2, m1, m2, right g1, g2, m1, m2) of
    (9, B, NU, C), m the distance moments about the unit's first row."""
    pid_b, cols, cmask, w = _setup(w_ptr, C, BLOCK_C, ACC)
    W = w[None, :]
    st = B * NU * C
    for i in tl.range(0, TPP, num_stages=STAGES):
        j, t0, t, valid, off = _tile_i(pid_b, i, TPP, T, C, cols, cmask, BT)
        a = tl.where(valid, -tl.load(z_ptr + off, mask=valid, other=0.0).to(ACC), NEG)
        gy = tl.load(gy_ptr + off, mask=valid, other=0.0).to(ACC)
        y = tl.load(y_ptr + off, mask=valid, other=0.0).to(ACC)
        qu, ro, al, ar = _anchored(a, t, t0, W, BT, S, ACC)
        al = al * gy
        ar = ar * gy
        ok, so = _unit_rows(pid_b, t0, NU, C, cols, cmask, BT, S)
        tl.store(s_ptr + so, _unit_sum(tl.where(ro == 0, qu, 0.0), BT, S), mask=ok)
        vals = (al, al * y, -ro * al, -ro * (al * y), ar, ar * y, ro * ar, ro * (ar * y))
        for q in tl.static_range(8):
            tl.store(s_ptr + (q + 1) * st + so, _unit_sum(vals[q], BT, S), mask=ok)


@helper
def _bwd_dir(a1, a2, rb, DB: tl.constexpr, S: tl.constexpr, LEFT: tl.constexpr,
             ACC: tl.constexpr, PREC: tl.constexpr):
    """In-unit exclusive sums (left or right) of a1, a2 and their distance-weighted sums;
    rb: each row's index in its dot block."""
    s1, s2 = _sums(a1, a2, DB, S, LEFT, ACC, PREC)
    dst = _tri(a1.shape[0] // DB, DB, LEFT, True, ACC)
    m1 = _tdot(dst, a1, DB, PREC)
    m2 = _tdot(dst, a2, DB, PREC)
    if S > DB:
        if LEFT:
            far = (DB - 1.0) - rb          # distance of each row from its block's last row
            near = rb                      # rows between a row and its block's first row
        else:
            far = rb
            near = (DB - 1.0) - rb
        p0, p1 = _cross(a1, far * a1, DB, S // DB, LEFT)
        q0, q1 = _cross(a2, far * a2, DB, S // DB, LEFT)
        m1 = m1 + near * p0 + p1
        m2 = m2 + near * q0 + q1
    return s1, s2, m1, m2


@helper
def _carries5(c_ptr, pid_b, t, j, NU, C, cols, cmask, valid, st, q0: tl.constexpr,
              S: tl.constexpr, BT: tl.constexpr):
    """One direction's backward carry: exponent, g1, g2, m1, m2 (planes q0 .. q0 + 4)."""
    return (_carry(c_ptr, pid_b, t, j, NU, C, cols, cmask, valid, st, q0, S, BT, NEG),
            _carry(c_ptr, pid_b, t, j, NU, C, cols, cmask, valid, st, q0 + 1, S, BT, 0.0),
            _carry(c_ptr, pid_b, t, j, NU, C, cols, cmask, valid, st, q0 + 2, S, BT, 0.0),
            _carry(c_ptr, pid_b, t, j, NU, C, cols, cmask, valid, st, q0 + 3, S, BT, 0.0),
            _carry(c_ptr, pid_b, t, j, NU, C, cols, cmask, valid, st, q0 + 4, S, BT, 0.0))


@helper
def _bwd_total(s1, s2, m1, m2, cd, c1, c2, c3, c4, ro, W, LEFT: tl.constexpr):
    """In-unit sums plus the unit's carry (exponent cd relative to the unit's anchor, seen
    from its row 0): mantissas and the exponent offset a of e^{+-(r -+ 1) w + a}."""
    a = tl.maximum(cd - W, 0.0)
    f = tl.exp(cd - W - a)
    s = tl.exp(-a)
    if LEFT:
        sh = ro
    else:
        sh = -ro
    return (s * s1 + f * c1, s * s2 + f * c2, s * m1 + f * (c3 + sh * c1),
            s * m2 + f * (c4 + sh * c2), a)


@triton.autotune(configs=BWD_CONFIGS, key=KEY_TILE)
@triton.jit(do_not_specialize=["T", "NT", "NU", "TPP", "TB"])
def biwkv4_bwd_kernel(k_ptr, v_ptr, y_ptr, z_ptr, gy_ptr, kt_ptr, w_ptr, u_ptr, c_ptr, gk_ptr,
                      gv_ptr, gwp_ptr, gup_ptr, B, T, C, NT, NTK, NU, TPP, TB, S: tl.constexpr,
                      BT: tl.constexpr, KG: tl.constexpr, DB: tl.constexpr, ACC: tl.constexpr,
                      PREC: tl.constexpr, BLOCK_C: tl.constexpr, STAGES: tl.constexpr):
    """gk, gv of TPP tiles, each touched once, and this program's partial sums of gw, gu
    (written to (B, programs along T, C); summed on the host in a fixed order). z is relative
    to K_t, read from kt (B, NTK, C), one row per KG tokens."""
    pid_b, cols, cmask, w = _setup(w_ptr, C, BLOCK_C, ACC)
    u = tl.load(u_ptr + cols, mask=cmask, other=0.0).to(ACC)[None, :]
    W = w[None, :]
    st = B * NU * C
    gw_acc = tl.zeros([BLOCK_C], ACC)
    gu_acc = tl.zeros([BLOCK_C], ACC)
    for i in tl.range(0, TPP, num_stages=STAGES):
        j, t0, t, valid, off = _tile_i(pid_b, i, TPP, T, C, cols, cmask, BT)
        k, v = _load_kv(k_ptr, v_ptr, off, valid, ACC)
        y = tl.load(y_ptr + off, mask=valid, other=0.0).to(ACC)
        zz = tl.load(z_ptr + off, mask=valid, other=0.0).to(ACC)
        gy = tl.load(gy_ptr + off, mask=valid, other=0.0).to(ACC)
        a = tl.where(valid, -zz, NEG)
        kt = tl.load(kt_ptr + (pid_b * NTK + tl.minimum(t0 // KG, NTK - 1)) * C + cols,
                     mask=cmask, other=0.0)[None, :]
        base = k - kt
        ld, l1, l2, l3, l4 = _carries5(c_ptr, pid_b, t, j, NU, C, cols, cmask, valid, st, 0, S, BT)
        if S == 1:      # units of one row: the carries are the whole off-diagonal sums
            rd, r1, r2, r3, r4 = _carries5(c_ptr, pid_b, t, j, NU, C, cols, cmask, valid, st, 5,
                                           S, BT)
            fl = tl.exp(tl.minimum(base + a + ld, _cap(ACC)))
            fr = tl.exp(tl.minimum(base + a + rd, _cap(ACC)))
            gv = fl * l1 + fr * r1
            gk = fl * (v * l1 - l2) + fr * (v * r1 - r2)
            gwe = fl * (v * l3 - l4) + fr * (v * r3 - r4)
        else:
            # left, then right: each direction's sums go into gk, gv, gw before the next
            qu, ro, x, xr = _anchored(a, t, t0, W, BT, S, ACC)
            rb = ((t - t0) % DB).to(ACC)
            x = x * gy
            s1, s2, m1, m2 = _bwd_dir(x, x * y, rb, DB, S, True, ACC, PREC)
            G1, G2, M1, M2, al = _bwd_total(s1, s2, m1, m2, ld, l1, l2, l3, l4, ro, W, True)
            # e^{k} times the left sums of q: row factor, capped (docs/kernels.md)
            f = tl.exp(tl.minimum(base + qu - (ro - 1.0) * W + al, _cap(ACC)))
            gv = f * G1
            gk = f * (v * G1 - G2)
            gwe = f * (v * M1 - M2)
            x = xr * gy
            rd, r1, r2, r3, r4 = _carries5(c_ptr, pid_b, t, j, NU, C, cols, cmask, valid, st, 5,
                                           S, BT)
            s1, s2, m1, m2 = _bwd_dir(x, x * y, rb, DB, S, False, ACC, PREC)
            G1, G2, M1, M2, ar = _bwd_total(s1, s2, m1, m2, rd, r1, r2, r3, r4, ro, W, False)
            f = tl.exp(tl.minimum(base + qu + (ro + 1.0) * W + ar, _cap(ACC)))
            gv += f * G1
            gk += f * (v * G1 - G2)
            gwe += f * (v * M1 - M2)
        # the diagonal
        p = tl.exp(tl.minimum(u + base - zz, 0.0))
        gvd = gy * p
        gkd = gvd * (v - y)
        gv += gvd
        gk += gkd
        tl.store(gk_ptr + off, gk.to(gk_ptr.dtype.element_ty), mask=valid)
        tl.store(gv_ptr + off, gv.to(gv_ptr.dtype.element_ty), mask=valid)
        gw_acc -= tl.sum(tl.where(valid, gwe, 0.0), axis=0)
        gu_acc += tl.sum(tl.where(valid, gkd, 0.0), axis=0)
    po = (pid_b * tl.num_programs(2) + tl.program_id(2)) * C + cols
    tl.store(gwp_ptr + po, gw_acc, mask=cmask)
    tl.store(gup_ptr + po, gu_acc, mask=cmask)


KERNELS = {
    "fwd_sum": biwkv4_fwd_sum_kernel,
    "carry": biwkv4_carry_kernel,
    "fwd": biwkv4_fwd_kernel,
    "bwd_sum": biwkv4_bwd_sum_kernel,
    "bwd": biwkv4_bwd_kernel,
}
CONFIGS = {"fwd_sum": SUM_CONFIGS, "carry": CARRY_CONFIGS, "fwd": FWD_CONFIGS,
           "bwd_sum": SUM_CONFIGS, "bwd": BWD_CONFIGS}
