"""Bi-WKV4 (docs/biwkv4.md §1) as Triton kernels with exact autograd, plus the dispatch to the
C kernels (kernels_cpu) and the PyTorch reference.

Backends: "triton" (CUDA tensors, or CPU tensors when TRITON_INTERPRET=1 was set before the
kernel module kernels_triton._kernels was imported; it is imported lazily at the first Triton
call), "cpu" (the compiled C kernels of :mod:`kernels_cpu`, CPU tensors), "torch" (the
pure-PyTorch scan :func:`reference.biwkv4_scan`), "auto" (triton on CUDA tensors; on CPU
tensors "cpu" when its kernels build on this machine, else "torch" with one warning).
:func:`resolve_backend` tells which one "auto" picks.

The Triton path is three kernels forward (unit summaries, carries, output) and three backward
of the same structure; docs/kernels.md describes them, their traffic and their tile sizes.
:func:`triton_forward` and :func:`triton_backward` are the two entry points an operator
registration builds on; :class:`BiWKV4Function` is the autograd Function built on them.
"""
from __future__ import annotations

import contextlib
import contextvars
import os

import torch

from reference.biwkv4 import biwkv4_scan as biwkv4_reference

__all__ = ["biwkv4", "BiWKV4Function", "biwkv4_reference", "poison_outputs",
           "shape_only_selection", "resolve_backend", "triton_forward", "triton_backward",
           "triton_residual_specs", "traffic"]

_BACKENDS = ("auto", "cpu", "torch", "triton")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Test and selection switches: context variables, so a setting made in one thread (or task)
# never leaks into another.
_POISON_VAR = contextvars.ContextVar("biwkv4_poison",
                                     default=os.environ.get("HPCM_TRITON_NAN_POISON", "0") == "1")
_SHAPE_ONLY_VAR = contextvars.ContextVar("biwkv4_shape_only", default=False)
_FIXED_VAR = contextvars.ContextVar("biwkv4_fixed_configs", default=False)
_OVERRIDE_VAR = contextvars.ContextVar("biwkv4_tile_override", default=None)
_STATE = {"_POISON": _POISON_VAR, "_SHAPE_ONLY": _SHAPE_ONLY_VAR, "_FIXED": _FIXED_VAR}


def __getattr__(name):
    """``_SHAPE_ONLY``, ``_POISON``, ``_FIXED``: the current thread's settings (read-only)."""
    if name in _STATE:
        return _STATE[name].get()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@contextlib.contextmanager
def _setting(var: contextvars.ContextVar, value):
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)


def poison_outputs(enabled: bool = True):
    """Test hook: kernel outputs and scratch are allocated NaN-filled instead of empty, so an
    element a kernel fails to write shows up as NaN. Also enabled by HPCM_TRITON_NAN_POISON=1."""
    return _setting(_POISON_VAR, enabled)


def shape_only_selection(enabled: bool = True):
    """Kernel choice without timing: every kernel is launched with its fixed config (the first
    of its list), bypassing ``triton.autotune``. Everything that can change the arithmetic
    (tile and unit sizes, channel blocks, tiles per program, reduction trees) then depends
    only on B, T, C, the dtype and max|w| (which picks the unit length; an encoder and its
    decoder share w).

    The coding path (compress/decompress) runs under this so an encoder and a later decoder run
    the same reductions whatever their caches hold. Bitwise equal results additionally need the
    same kind of device (compiled code differs per architecture), the same torch and triton
    versions (code generation, libdevice) and the same version of this library (its configs)."""
    return _setting(_SHAPE_ONLY_VAR, enabled)


def fixed_configs(enabled: bool = True):
    """Launch every kernel with its fixed config (the one shape_only_selection uses): for
    tests and for comparing against autotuned runs."""
    return _setting(_FIXED_VAR, enabled)


_OVERRIDE_KEYS = ("BT", "DBF", "BTB", "DBB", "S", "TPP", "BLOCK_C", "NSEG")


def tile_config(**meta):
    """Test/benchmark hook: launch every kernel with its fixed config and these sizes: BT / BTB
    (forward / backward tile rows), DBF / DBB (rows of their dot blocks), S (largest unit
    length; the host's choice from w can only get smaller), TPP (tiles per program), BLOCK_C,
    NSEG."""
    bad = set(meta) - set(_OVERRIDE_KEYS)
    if bad:
        raise ValueError(f"unknown tile_config keys {sorted(bad)}; known: {_OVERRIDE_KEYS}")
    for key in ("BT", "DBF", "BTB", "DBB", "S"):
        x = meta.get(key)
        if x is not None and (x < 1 or x & (x - 1)):
            raise ValueError(f"{key} must be a power of two, got {x}")
    return _setting(_OVERRIDE_VAR, dict(meta))


def _alloc(shape, dtype, device):
    if _POISON_VAR.get():
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _kernels():
    from . import _kernels
    return _kernels


# ----------------------------------------------------------------------------- validation
def _validate(w, u, k, v):
    names = {"w": w, "u": u, "k": k, "v": v}
    for n, x in names.items():
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{n} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{n} must be a floating tensor (float16/bfloat16/float32/float64), "
                             f"got dtype {x.dtype}")
    if k.dim() != 3:
        raise ValueError(f"k must have shape (B, T, C), got {tuple(k.shape)} (ndim {k.dim()})")
    B, T, C = k.shape
    if B < 1 or T < 1 or C < 1:
        raise ValueError(f"k must have shape (B, T, C) with B, T, C >= 1, got {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v must have shape (B, T, C) = {tuple(k.shape)} like k, got {tuple(v.shape)}")
    if w.shape != (C,):
        raise ValueError(f"w must have shape (C,) = ({C},), got {tuple(w.shape)}")
    if u.shape != (C,):
        raise ValueError(f"u must have shape (C,) = ({C},), got {tuple(u.shape)}")
    if v.dtype != k.dtype:
        raise ValueError(f"v must have the dtype of k ({k.dtype}), got {v.dtype}")
    devs = {x.device for x in names.values()}
    if len(devs) != 1:
        raise ValueError("w, u, k, v must be on the same device, got "
                         + ", ".join(f"{n}: {x.device}" for n, x in names.items()))


# ----------------------------------------------------------------------------- sizes
def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _acc_name(dtype):
    return "fp64" if dtype == torch.float64 else "fp32"


def _tl_acc(dtype):
    import triton.language as tl
    return tl.float64 if dtype == torch.float64 else tl.float32


def _override():
    return _OVERRIDE_VAR.get() or {}


def tile_sizes(dtype) -> tuple[int, int, int, int]:
    """(BT, DB, BTB, DBB) for inputs of ``dtype``: the forward's tile rows (also the
    granularity of the residual K_t) and dot-block rows, and the backward's (BTB divides BT)."""
    bt, dbf, btb, dbb = _kernels().TILES[_acc_name(dtype)]
    o = _override()
    bt = o.get("BT", bt)
    btb = min(o.get("BTB", btb), bt)
    return bt, min(o.get("DBF", dbf), bt), btb, min(o.get("DBB", dbb), btb)


def unit_rows(wmax: float, T: int, BT: int, DB: int, dtype) -> tuple[int, int]:
    """(S, DB): the unit length S (tokens per anchored unit, a power of two dividing BT) and
    the dot-block rows for max|w| = ``wmax``: the longest S <= BT with wmax * min(S, T) within
    the anchoring budget, S >= 16 (a dot block) or else S = 1 (units of one token, no dots)."""
    budget = _kernels().BUDGET[_acc_name(dtype)]
    s = min(BT, _override().get("S", BT))
    while s >= 16 and not wmax * min(s, T) <= budget:   # NaN w: one-token units
        s //= 2
    if s < 16:
        return 1, DB
    return s, min(DB, s)


def backward_tile_rows(S: int, BT: int) -> int:
    """Rows of the backward's tiles for units of S tokens and the configured BT: a unit
    shorter than the tile (large |w|) gets tiles of one unit (two units per tile spilled the
    backward's registers on sm_90)."""
    return S if 16 <= S < BT else BT


def dot_precision(dtype, backward: bool) -> str:
    """PREC of the in-unit sums (docs/kernels.md, "In-unit sums as dots"): float32 state uses
    split TF32 dots forward and exact float32 dots backward; float64 uses exact float64 dots
    forward and FMA products backward (its DMMA fragments spill there)."""
    if dtype == torch.float64:
        return "fma" if backward else "ieee"
    return "ieee" if backward else "tf32"


def _max_abs(w) -> float:
    """max|w| on the host (one device synchronisation for CUDA tensors)."""
    return float(w.detach().abs().max())


def _tiles_per_program(NT: int) -> int:
    o = _override()
    if "TPP" in o:
        return max(1, int(o["TPP"]))
    return max(1, min(8, NT // 16))


def _t_bucket(T: int) -> int:
    """Autotune key bucket of T: the next power of two, capped at 65536."""
    return min(1 << max(0, (T - 1).bit_length()), 1 << 16)


def _launch(name, grid, *args, **kw):
    """Launch kernel ``name``: through triton.autotune normally; under shape_only_selection,
    fixed_configs or tile_config with the fixed first config of its list."""
    kk = _kernels()
    kern = kk.KERNELS[name]
    o = _override()
    if _SHAPE_ONLY_VAR.get() or _FIXED_VAR.get() or o:
        cfg = kk.CONFIGS[name][0]
        meta = dict(cfg.kwargs)
        meta.update({key: val for key, val in o.items() if key in meta})
        kern.fn[lambda _m: grid(meta)](*args, **kw, **meta, num_warps=cfg.num_warps,
                                        num_stages=cfg.num_stages)
    else:
        kern[grid](*args, **kw)


def _cdiv(a, b):
    return -(-a // b)


def _check_T(T):
    if T >= 1 << 24:
        raise ValueError(f"T = {T} tokens: the Triton kernels need T < 2**24 (positions are "
                         "exact integers in float32)")


# ----------------------------------------------------------------------------- entry points
def triton_residual_specs(B: int, T: int, C: int, dtype: torch.dtype) -> list:
    """Shapes and dtypes of the residuals :func:`triton_forward` returns when ``need_grad``:
    y as the backward reads it (float32, float64 for float64 inputs), z = log-denominator
    minus K_t (same), and K_t, the max of k over each tile of BT tokens, (B, ceil(T / BT), C).
    They depend on (B, T, C, dtype) only, never on the values of the inputs."""
    acc = _acc(dtype)
    bt = tile_sizes(dtype)[0]
    return [((B, T, C), acc), ((B, T, C), acc), ((B, _cdiv(T, bt), C), acc)]


def triton_forward(w, u, k, v, need_grad: bool, share_y: bool = False):
    """y (B, T, C) in k's dtype and the residuals (:func:`triton_residual_specs`; an empty
    tuple unless ``need_grad``). w, u: (C,), k, v: (B, T, C), contiguous, validated, on one
    device (CUDA, or CPU under the interpreter).

    The unit length is chosen from max|w| on the host: one device synchronisation per call.
    Residuals never alias y or the inputs; ``share_y=True`` (float32/float64 inputs) makes the
    first residual y itself instead of a copy, saving the copy's store."""
    B, T, C = k.shape
    _check_T(T)
    kk = _kernels()
    acc = _acc(k.dtype)
    ACC = _tl_acc(k.dtype)
    dev = k.device
    BT, DB, _, _ = tile_sizes(k.dtype)
    S, DB = unit_rows(_max_abs(w), T, BT, DB, k.dtype)
    NT, NU = _cdiv(T, BT), _cdiv(T, S)
    TPP = _tiles_per_program(NT)
    NP = _cdiv(NT, TPP)
    TB = _t_bucket(T)
    y = _alloc((B, T, C), k.dtype, dev)
    kt = _alloc((B, NT, C), acc, dev) if need_grad else _alloc((1,), acc, dev)
    # the unit summaries: unit key (K_u) and the left / right mantissas
    s = _alloc((5, B, NU, C), acc, dev) if S > 1 else k
    if S > 1:
        _launch("fwd_sum", lambda m: (B, _cdiv(C, m["BLOCK_C"]), NP),
                k, v, w, s, B, T, C, NT, NU, TPP, TB, S=S, BT=BT, DB=DB, ACC=ACC)
    c = _alloc((4, B, NU, C), acc, dev)
    scr = _alloc((14, B, kk.NSEG_MAX.value, C), acc, dev)
    _launch("carry", lambda m: (B, _cdiv(C, m["BLOCK_C"])),
            s, k, v, k, kt, w, c, scr, B, T, C, NT, NU, TB, S=S, BT=BT, BWD=False, ACC=ACC)
    store_ya = need_grad and not (share_y and k.dtype == acc)
    ya = _alloc((B, T, C), acc, dev) if store_ya else y
    z = _alloc((B, T, C), acc, dev) if need_grad else y
    _launch("fwd", lambda m: (B, _cdiv(C, m["BLOCK_C"]), NP),
            k, v, w, u, c, y, z, ya, kt, B, T, C, NT, NU, TPP, TB, S=S, BT=BT, DB=DB,
            STORE_Z=need_grad, STORE_YA=store_ya, ACC=ACC,
            PREC=dot_precision(k.dtype, backward=False))
    if not need_grad:
        return y, ()
    return y, (ya, z, kt)


def triton_backward(w, u, k, v, residuals: tuple, gy):
    """(gw, gu, gk, gv) in the dtypes of w, u, k, v from the residuals of
    :func:`triton_forward` and gy (B, T, C), contiguous. gw and gu are reduced without
    atomics: per-program partial sums, then a sum in a fixed order. One device
    synchronisation (the unit length, from max|w|)."""
    ya, z, kt = residuals
    B, T, C = k.shape
    _check_T(T)
    kk = _kernels()
    acc = _acc(k.dtype)
    ACC = _tl_acc(k.dtype)
    dev = k.device
    KG, _, BT, DB = tile_sizes(k.dtype)
    want = [(tuple(s), d) for s, d in triton_residual_specs(B, T, C, k.dtype)]
    if [(tuple(r.shape), r.dtype) for r in residuals] != want:
        raise ValueError(f"residuals do not match triton_residual_specs: got "
                         f"{[(tuple(r.shape), r.dtype) for r in residuals]}, want {want}")
    S, DB = unit_rows(_max_abs(w), T, BT, DB, k.dtype)
    BT = backward_tile_rows(S, BT)
    NT, NU, NTK = _cdiv(T, BT), _cdiv(T, S), _cdiv(T, KG)
    TPP = _tiles_per_program(NT)
    NP = _cdiv(NT, TPP)
    TB = _t_bucket(T)
    s = _alloc((9, B, NU, C), acc, dev) if S > 1 else z
    if S > 1:
        _launch("bwd_sum", lambda m: (B, _cdiv(C, m["BLOCK_C"]), NP),
                z, gy, ya, w, s, B, T, C, NT, NU, TPP, TB, S=S, BT=BT, DB=DB, ACC=ACC)
    c = _alloc((10, B, NU, C), acc, dev)
    scr = _alloc((14, B, kk.NSEG_MAX.value, C), acc, dev)
    _launch("carry", lambda m: (B, _cdiv(C, m["BLOCK_C"])),
            s, z, gy, ya, kt, w, c, scr, B, T, C, NTK, NU, TB, S=S, BT=KG, BWD=True, ACC=ACC)
    gk = _alloc((B, T, C), k.dtype, dev)
    gv = _alloc((B, T, C), v.dtype, dev)
    gwp = _alloc((B, NP, C), acc, dev)
    gup = _alloc((B, NP, C), acc, dev)
    _launch("bwd", lambda m: (B, _cdiv(C, m["BLOCK_C"]), NP),
            k, v, ya, z, gy, kt, w, u, c, gk, gv, gwp, gup, B, T, C, NT, NTK, NU, TPP, TB,
            S=S, BT=BT, KG=KG, DB=DB, ACC=ACC, PREC=dot_precision(k.dtype, backward=True))
    # fixed-order (deterministic) sums of the per-program partials
    gw = gwp.sum(dim=(0, 1)).to(w.dtype)
    gu = gup.sum(dim=(0, 1)).to(u.dtype)
    return gw, gu, gk, gv


# ----------------------------------------------------------------------------- traffic model
def traffic(B: int, T: int, C: int, dtype: torch.dtype, S: int | None = None,
            Sb: int | None = None, backward: bool = False, share_y: bool = True,
            nseg: int | None = None) -> dict:
    """Bytes per (b, t, c) element and launches of one call, counted from the kernels' loads
    and stores with the tile sizes they run with: ``S`` / ``Sb`` are the forward's / the
    backward's unit lengths (default: their tiles, what HPCM's w gives; 1 for one-token
    units). "bytes" counts inputs, outputs, residuals, unit summaries and carries (each
    value once, as DRAM sees them); "scratch" the carry kernel's segment rows, written and read
    back by the same program. ``backward``: the forward storing what the backward needs
    (``share_y``: y itself as its residual, as BiWKV4Function does), plus the backward."""
    e = torch.empty((), dtype=dtype).element_size()
    a = 8 if dtype == torch.float64 else 4
    BT, _, BTB, _ = tile_sizes(dtype)
    S = BT if S is None else S
    Sb = BTB if Sb is None else Sb
    nseg = nseg or _kernels().CARRY_CONFIGS[0].kwargs["NSEG"]

    def segs(s):
        nu = _cdiv(T, s)
        return _cdiv(nu, _cdiv(nu, nseg))

    pu, pub = _cdiv(T, S) / T, _cdiv(T, Sb) / T        # unit rows per token
    pt, ptb = _cdiv(T, BT) / T, _cdiv(T, BTB) / T      # tiles per token
    # forward. Summaries (K_u, nL, dL, nR, dR) per unit; the carry kernel reads them in phase 1
    # and each direction's three again in phase 3 and writes (dL, yL, dR, yR); one-token units
    # read k, v instead
    if S > 1:
        fwd = (2 * e + 5 * a * pu) + (5 + 6 + 4) * a * pu + (2 * e + e + 4 * a * pu)
    else:
        fwd = (2 * e + 2 * 2 * e + 4 * a) + (2 * e + e + 4 * a)
    out = {"fwd_bytes_per_elem": fwd, "fwd_scratch_per_elem": 4 * 8 * segs(S) * a / T,
           "fwd_launches": 3 if S > 1 else 2}
    if backward:
        fwd_g = fwd + a + (0 if (share_y and e == a) else a) + a * pt   # z, y copy, K_t
        # summaries (Q_u, 4 left, 4 right) of z, gy, y; the carry kernel reads them with K_t
        # (phase 1) and each direction's six again (phase 3) and writes 10 planes; the output
        # kernel reads k, v, gy, y, z, K_t and the carries, writes gk, gv
        rd = 2 * a + e
        if Sb > 1:
            bwd = (rd + 9 * a * pub) + (10 + 12 + 10) * a * pub \
                + (3 * e + 2 * a + a * ptb + 10 * a * pub + 2 * e)
        else:
            bwd = (rd + a) * 3 + 10 * a + (3 * e + 2 * a + a * ptb + 10 * a + 2 * e)
        out.update(fwdbwd_bytes_per_elem=fwd_g + bwd,
                   fwdbwd_scratch_per_elem=out["fwd_scratch_per_elem"] + 4 * 14 * segs(Sb) * a / T,
                   fwdbwd_launches=out["fwd_launches"] + (3 if Sb > 1 else 2))
    return out


# ----------------------------------------------------------------------------- autograd
class BiWKV4Function(torch.autograd.Function):
    """Autograd Function of the Triton Bi-WKV4 on :func:`triton_forward` and
    :func:`triton_backward` (inputs already validated and contiguous)."""

    @staticmethod
    def forward(ctx, w, u, k, v, need_grad=True):
        # need_grad: the caller's grad mode and requires_grad (inside forward grad mode is off
        # and needs_input_grad ignores torch.no_grad); False stores no residuals
        need = bool(need_grad) and any(ctx.needs_input_grad[:4])
        y, res = triton_forward(w, u, k, v, need, share_y=True)
        if need:
            ctx.save_for_backward(w, u, k, v, *res)
            # the backward may run in another thread (autograd's device threads): it runs
            # under the switches the forward saw
            ctx.switches = (_SHAPE_ONLY_VAR.get(), _FIXED_VAR.get(), _OVERRIDE_VAR.get())
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        w, u, k, v, *res = ctx.saved_tensors
        shape_only, fixed, override = ctx.switches
        with _setting(_SHAPE_ONLY_VAR, shape_only), _setting(_FIXED_VAR, fixed), \
                _setting(_OVERRIDE_VAR, override):
            gw, gu, gk, gv = triton_backward(w, u, k, v, tuple(res), gy.contiguous())
        return gw, gu, gk, gv, None


_WARNED_FALLBACK = False


def resolve_backend(device, backend: str = "auto") -> str:
    """The backend ``biwkv4(..., backend=backend)`` runs on tensors of ``device``: "auto" is
    "triton" on CUDA, else "cpu" when the C kernels are available, else "torch" (warning once
    with the reason). The models' bitstreams record it: the backends round differently."""
    global _WARNED_FALLBACK
    if backend != "auto":
        return backend
    if torch.device(device).type == "cuda":
        return "triton"
    import kernels_cpu

    if kernels_cpu.available():
        return "cpu"
    if not _WARNED_FALLBACK:
        _WARNED_FALLBACK = True
        import warnings

        warnings.warn("Bi-WKV4: the compiled CPU kernels are unavailable, using the slower "
                      f"pure-PyTorch scan ({kernels_cpu.unavailable_reason()})", RuntimeWarning,
                      stacklevel=3)
    return "torch"


def biwkv4(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
           backend: str = "auto") -> torch.Tensor:
    """Bi-WKV4 (Vision-RWKV Eq. 5, docs/biwkv4.md §1): ``y_t = sum_i softmax_i(l(t, .)) v_i``
    with ``l(t, i) = k_i - (|t-i| - 1) w`` for i != t and ``l(t, t) = u + k_t``.

    Args:
        w, u: (C,) decay and bonus (any sign; LALIC passes decay/T and boost/T).
        k, v: (B, T, C), B, T, C >= 1, contiguous or strided.
        backend: "auto" | "triton" | "cpu" | "torch" (see :func:`resolve_backend`).
    Returns:
        y: (B, T, C) in k's dtype. float16/bfloat16/float32 accumulate in float32, float64 in
        float64. Differentiable in w, u, k, v (exact gradients; gw, gu reduced
        deterministically).
    Raises:
        ValueError: wrong shapes/ndim/dtypes/devices, unknown backend.
        RuntimeError: backend="triton" on CPU tensors without TRITON_INTERPRET=1.
        kernels_cpu.CPUKernelUnavailable: backend="cpu" where the C kernels do not build.

    Runs ``torch.ops.hpcm.biwkv4`` (see the module docstring), so ``torch.compile`` traces a
    call without a graph break.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    _validate(w, u, k, v)
    # "auto" on CPU tensors (C kernels or the PyTorch scan) is resolved inside the op, whose
    # kernels run outside what torch.compile traces; "auto" on CUDA tensors is "triton"
    triton = backend == "triton" or (backend == "auto" and k.is_cuda)
    if triton and not k.is_cuda and not _kernels().INTERPRET:  # fixed when the kernels were imported
        raise RuntimeError(
            "biwkv4(backend='triton') got CPU tensors, but Triton kernels need a CUDA device. "
            "Set TRITON_INTERPRET=1 before importing kernels_triton to run them through "
            "Triton's interpreter, or use backend='torch'.")
    if backend in ("cpu", "torch") and k.is_cuda:
        raise ValueError(f"biwkv4(backend={backend!r}) takes CPU tensors, got {k.device}")
    need_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (w, u, k, v))
    # registered by kernels_triton.custom_op, which the package imports after this module
    return torch.ops.hpcm.biwkv4(w, u, k, v, backend, need_grad)[0]
