"""Bi-WKV4 as Triton kernels with exact autograd, plus dispatch to the PyTorch reference.

Operator (Vision-RWKV Eq. 5), per batch b and channel c, tokens t = 0..T-1::

    l(t, i) = k_i - (|t - i| - 1) * w     (i != t)
    l(t, t) = u + k_t
    y_t     = sum_i softmax_i(l(t, .)) * v_i

computed exactly in O(T) with two exclusive decayed scans in log space
(y_t = (A_t + C_t + e^{u+k_t} v_t) / (B_t + D_t + e^{u+k_t})), never by subtraction.

Backends: "triton" (CUDA tensors, or CPU tensors when TRITON_INTERPRET=1 was set before the
kernel module kernels_triton._kernels was imported; it is imported lazily at the first Triton
call), "cpu" (the compiled C kernels of :mod:`kernels_cpu`, CPU tensors), "torch" (the
pure-PyTorch scan :func:`reference.biwkv4_scan`), "auto" (triton on CUDA tensors; on CPU
tensors "cpu" when its kernels build on this machine, else "torch" with one warning).
:func:`resolve_backend` tells which one "auto" picks.

:func:`biwkv4` validates its inputs and runs the registered operator ``torch.ops.hpcm.biwkv4``
(kernels_triton/custom_op.py: schema, fake implementation, autograd, flop formula), so that
``torch.compile`` traces it as one node; with an explicit Triton ``strategy`` or ``chunk`` it
runs :class:`BiWKV4Function`, whose backward reuses the forward's plan. The op reaches the
Triton kernels through :func:`triton_forward`, :func:`triton_backward` and
:func:`triton_residual_specs`.

Kernels (kernels_triton/_kernels.py): tiles of BT tokens x BLOCK_C channels, in-register
anchored cumsum scans, float64 carries between tiles and chunks (fp32 error independent of T),
sub-passes when |w| * BT is large. Each kernel is a ``triton.autotune`` over BT, BLOCK_C,
warps and stages keyed on C, the pointer dtypes and its constexpr flags, never on T or B; one
config under the interpreter. ``python -m kernels_triton.autotune`` sweeps strategies and chunk
lengths and writes the JSON read by :func:`choose_strategy`.

Strategies of the Triton backend:
* "sequential": one program per (b, BLOCK_C channels) walks all T tokens tile by tile, one
  launch (pass 1 right to left parks tile carries in float64 scratch, pass 2 writes y).
* "chunked": T is cut into chunks of CHUNK tokens; per-chunk float64 totals (one launch),
  their carries combined in parallel (one launch), then the local pass per chunk. Fills a GPU
  when B * C / BLOCK_C is small and T long (4K images: B = 1, T ~ 35k, C = 640).
Heuristic (``strategy=None``): an entry of the autotune JSON for this device/C/dtype nearest
in (B, T) wins (not under :func:`shape_only_selection`); otherwise tokens per program
~ B * ceil(C / 32) * T / (8 * SMs), a power of two >= 64, "sequential" once that reaches T:
non-decreasing in B and T (no cliff).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path

import torch

from reference.biwkv4 import biwkv4_scan as biwkv4_reference

__all__ = ["biwkv4", "BiWKV4Function", "biwkv4_reference", "poison_outputs", "choose_strategy",
           "shape_only_selection", "resolve_backend"]

_BACKENDS = ("auto", "cpu", "torch", "triton")
_STRATEGIES = (None, "sequential", "chunked")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

_POISON = os.environ.get("HPCM_TRITON_NAN_POISON", "0") == "1"

DEFAULT_TUNE_PATH = Path(os.environ.get(
    "HPCM_BIWKV4_TUNE", str(Path.home() / ".cache" / "hpcm_triton" / "biwkv4_autotune.json")))


@contextlib.contextmanager
def _module_setting(name: str, value):
    """Set the module global ``name`` to ``value`` for the block, then restore it (the one
    mechanism behind this module's test/selection hooks)."""
    g = globals()
    old, g[name] = g[name], value
    try:
        yield
    finally:
        g[name] = old


def poison_outputs(enabled: bool = True):
    """Test hook: kernel outputs and scratch are allocated NaN-filled instead of empty, so an
    element a kernel fails to write shows up as NaN. Also enabled by HPCM_TRITON_NAN_POISON=1."""
    return _module_setting("_POISON", enabled)


_SHAPE_ONLY = False


def shape_only_selection(enabled: bool = True):
    """Kernel choice from the shapes (and dtype) alone: strategy and chunk by the heuristic
    (the autotune JSON is not read) and every kernel launched with its fixed config (the first
    of its list: BT, BLOCK_C, warps, stages), bypassing ``triton.autotune`` and its timing.
    Everything that can change the arithmetic (tile and chunk boundaries, the sub-pass budget
    per channel block, reduction trees) then depends only on B, T, C and the dtype.

    The coding path (compress/decompress) runs under this so an encoder and a later decoder run
    the same reductions whatever their caches hold. Bitwise equal results additionally need the
    same kind of device (GPU model / SM count: the heuristic reads the SM count; compiled code
    differs per architecture), the same torch and triton versions (code generation, libdevice)
    and the same version of this library (its configs and heuristic)."""
    return _module_setting("_SHAPE_ONLY", enabled)


def _alloc(shape, dtype, device):
    if _POISON:
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


# ----------------------------------------------------------------------------- strategy
_TUNE_CACHE: dict = {}


def _load_tune(path: Path):
    key = str(path)
    if key not in _TUNE_CACHE:
        try:
            _TUNE_CACHE[key] = json.loads(path.read_text())
        except (OSError, ValueError):
            _TUNE_CACHE[key] = None
    return _TUNE_CACHE[key]


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


# heuristic: aim for PROGRAMS_PER_SM programs of HEUR_BLOCK_C channels; chunks are powers of
# two of at least MIN_CHUNK tokens; T <= MIN_CHUNK is always one chunk
PROGRAMS_PER_SM = 8
HEUR_BLOCK_C = 32
MIN_CHUNK = 64


def choose_strategy(B: int, T: int, C: int, dtype: torch.dtype, device: torch.device,
                    tune_path: Path | None = None, n_sm: int | None = None):
    """Return (strategy, chunk) for a shape; see the module docstring. ``n_sm`` overrides
    the device's SM count (1 for the interpreter). Under :func:`shape_only_selection` the
    autotune JSON is not read."""
    if not _SHAPE_ONLY:
        data = _load_tune(Path(tune_path) if tune_path else DEFAULT_TUNE_PATH)
        if data:
            name = device_name(device)
            best, best_d = None, math.inf
            for e in data.get("entries", []):
                if e.get("device") != name or e.get("C") != C or e.get("dtype") != str(dtype):
                    continue
                d = abs(math.log(e["T"] / T)) + abs(math.log(e["B"] / B))
                if d < best_d:
                    best, best_d = e, d
            if best is not None and best_d < 1.0:
                return best["strategy"], int(best.get("chunk") or T)
    n_sm = n_sm or _num_sms(device)
    # tokens per program that give PROGRAMS_PER_SM * n_sm programs: non-decreasing in B and T
    per_prog = (B * -(-C // HEUR_BLOCK_C) * T) // (PROGRAMS_PER_SM * n_sm)
    chunk = MIN_CHUNK
    while chunk * 2 <= per_prog:
        chunk *= 2
    if chunk >= T:
        return "sequential", T
    return "chunked", chunk


# ----------------------------------------------------------------------------- launchers
def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_acc(dtype):
    import triton.language as tl
    return tl.float64 if dtype == torch.float64 else tl.float32


def _launch(name, grid, *args, **kw):
    """Launch kernel ``name``: through triton.autotune normally; under shape_only_selection
    (or ``_FIXED``) with the fixed first config of its list, no timing involved."""
    kk = _kernels()
    kern = kk.KERNELS[name]
    if _SHAPE_ONLY or _FIXED or _OVERRIDE:
        cfg = kk.CONFIGS[name][0]
        meta = dict(cfg.kwargs)
        meta.update({key: val for key, val in _OVERRIDE.items() if key in meta})
        kern.fn[lambda _m: grid(meta)](*args, **kw, **meta, num_warps=cfg.num_warps,
                                        num_stages=cfg.num_stages)
    else:
        kern[grid](*args, **kw)


_FIXED = False
_OVERRIDE: dict = {}


def tile_config(**meta):
    """Test/benchmark hook: launch every kernel with its fixed config, with the given
    meta-parameters (BT, BLOCK_C, NB) replacing the config's where the kernel has them."""
    if "BT" in meta and meta["BT"] < _kernels().BT_MIN:
        raise ValueError(f"BT must be >= {_kernels().BT_MIN}")
    return _module_setting("_OVERRIDE", dict(meta))


def fixed_configs(enabled: bool = True):
    """Launch every kernel with its fixed config (the one shape_only_selection uses) while
    keeping the strategy/JSON logic: for tests and for comparing against autotuned runs."""
    return _module_setting("_FIXED", enabled)


def _plan(T, strategy, chunk):
    if strategy == "sequential":
        return T, 1
    chunk = max(1, min(int(chunk), T))
    return chunk, -(-T // chunk)


def _scratch_slots(chunk):
    return -(-chunk // _kernels().BT_MIN)


def _slot_scratch(planes, B, NT, SPC, C, dev):
    """float64 states per scratch slot when a chunk spans several slots; else a placeholder."""
    if SPC > 1:
        return _alloc((planes, B, NT * SPC, C), torch.float64, dev)
    return _alloc((1,), torch.float64, dev)


def _forward(w, u, k, v, strategy, chunk, need_ld):
    """y (in k's dtype) and, if need_ld, the float32/64 log-denominator."""
    B, T, C = k.shape
    acc = _acc_dtype(k.dtype)
    ACC = _tl_acc(k.dtype)
    dev = k.device
    chunk, NT = _plan(T, strategy, chunk)
    y = _alloc((B, T, C), k.dtype, dev)
    logd = _alloc((B, T, C), acc, dev) if need_ld else _alloc((1,), acc, dev)
    SPC = _scratch_slots(chunk)
    sc = _slot_scratch(3, B, NT, SPC, C, dev)
    if NT > 1:
        s, c = _alloc((6, B, NT, C), torch.float64, dev), _alloc((6, B, NT, C), torch.float64, dev)
        _launch("fwd_summary", lambda m: (B, triton_cdiv(C, m["BLOCK_C"]), NT),
                k, v, w, s, B, T, C, NT, chunk, ACC=ACC)
        _launch("fwd_carry", lambda m: (B, triton_cdiv(C, m["BLOCK_C"])),
                w, s, c, B, T, C, NT, chunk)
    else:
        c = sc  # unused placeholder
    # 16-bit inputs: the backward reads y in float32 (a rounded y costs the gradients accuracy)
    store_ya = need_ld and k.dtype in (torch.float16, torch.bfloat16)
    ya = _alloc((B, T, C), acc, dev) if store_ya else y
    _launch("fwd", lambda m: (B, triton_cdiv(C, m["BLOCK_C"]), NT),
            k, v, w, u, y, logd, ya, c, sc, B, T, C, NT, chunk, SPC, HAS_CARRY=NT > 1,
            STORE_LD=need_ld, STORE_YA=store_ya, ACC=ACC)
    return y, ya, (logd if need_ld else None), chunk, NT


def _backward(w, u, k, v, y, logd, gy, chunk, NT):
    B, T, C = k.shape
    ACC = _tl_acc(k.dtype)
    dev = k.device
    gk = _alloc((B, T, C), k.dtype, dev)
    gv = _alloc((B, T, C), v.dtype, dev)
    gwp = _alloc((B, NT, C), torch.float64, dev)   # float64 partial sums of gw, gu
    gup = _alloc((B, NT, C), torch.float64, dev)
    SPC = _scratch_slots(chunk)
    sc = _slot_scratch(8, B, NT, SPC, C, dev)
    if NT > 1:
        s, c = _alloc((16, B, NT, C), torch.float64, dev), _alloc((16, B, NT, C), torch.float64, dev)
        _launch("bwd_summary", lambda m: (B, triton_cdiv(C, m["BLOCK_C"]), NT),
                k, v, w, u, y, logd, gy, s, B, T, C, NT, chunk, ACC=ACC)
        _launch("bwd_carry", lambda m: (B, triton_cdiv(C, m["BLOCK_C"])),
                w, s, c, B, T, C, NT, chunk)
    else:
        c = sc
    _launch("bwd", lambda m: (B, triton_cdiv(C, m["BLOCK_C"]), NT),
            k, v, w, u, y, logd, gy, gk, gv, gwp, gup, c, sc, B, T, C, NT, chunk, SPC,
            HAS_CARRY=NT > 1, ACC=ACC)
    # deterministic reductions over batch and chunks (no atomics)
    return gwp.sum(dim=(0, 1)), gup.sum(dim=(0, 1)), gk, gv


def triton_residual_specs(B, T, C, dtype) -> list:
    """[(shape, dtype)] of the residuals :func:`triton_forward` returns with ``need_grad``, from
    the sizes and k's dtype alone: y as the backward reads it (float32 for 16-bit inputs) and
    the log-denominator, both (B, T, C) in the accumulation dtype."""
    acc = _acc_dtype(dtype)
    return [((B, T, C), acc), ((B, T, C), acc)]


def triton_forward(w, u, k, v, need_grad: bool):
    """y and, with ``need_grad``, the residuals of :func:`triton_residual_specs` (contiguous
    inputs; the plan from :func:`choose_strategy`). For float32/float64 the first residual is
    y itself (the registered op copies a residual that shares memory with its output)."""
    B, T, C = k.shape
    strategy, chunk = choose_strategy(B, T, C, k.dtype, k.device)
    y, ya, logd, _, _ = _forward(w, u, k, v, strategy, chunk, need_grad)
    return y, ((ya, logd) if need_grad else ())


def triton_backward(w, u, k, v, residuals, gy):
    """(gw, gu, gk, gv) from the forward's inputs and residuals (the backward's plan is its
    own: the log-denominator is absolute, so it need not match the forward's chunks)."""
    ya, logd = residuals
    B, T, C = k.shape
    chunk, NT = _plan(T, *choose_strategy(B, T, C, k.dtype, k.device))
    gw, gu, gk, gv = _backward(w, u, k, v, ya, logd, gy.contiguous(), chunk, NT)
    return gw.to(w.dtype), gu.to(u.dtype), gk, gv


def triton_cdiv(a, b):
    return -(-a // b)


def traffic(B: int, T: int, C: int, dtype: torch.dtype, strategy: str, chunk: int,
            backward: bool = False, bt: int = 64) -> dict:
    """DRAM bytes per (b, t, c) element and kernel launches of one call, counted from the
    kernels' loads and stores (shifted-row loads hit cache and are not counted; float64
    carries, summaries and scratch are). Pass 1 of the local kernels re-reads every tile of a
    chunk but the first, so chunks of one tile (chunk <= BT) skip it. ``backward``: the
    forward with what the backward needs stored, plus the backward."""
    e = torch.empty((), dtype=dtype).element_size()
    a = 8 if dtype == torch.float64 else 4
    ey = 4 if e == 2 else e                       # y as the backward reads it
    chunk, NT = _plan(T, strategy, chunk)
    tpc = -(-chunk // bt)                         # tiles per chunk
    again = (tpc - 1) / tpc                       # fraction re-read by pass 1
    n = B * T * C
    per_chunk = B * C * NT / n                    # chunk planes per element
    scratch = 2 * 8 * (tpc - 1) * per_chunk       # per state value: write + read
    fwd = (2 * e) * (1 + again) + e + 3 * scratch
    launches = 1
    if NT > 1:
        fwd += 2 * e + 6 * 8 * 3 * per_chunk      # summary pass; summaries, carries
        launches += 2
    out = {"fwd_bytes_per_elem": fwd, "fwd_launches": launches}
    if backward:
        fwd_g = fwd + a + (ey if e == 2 else 0)   # lam (and float32 y for 16-bit)
        rd = 3 * e + ey + a                       # k, v, gy, y, lam
        bwd = rd * (1 + again) + 2 * e + 8 * scratch + 2 * 8 * per_chunk
        bl = 1
        if NT > 1:
            bwd += rd + 16 * 8 * 3 * per_chunk
            bl += 2
        out.update(fwdbwd_bytes_per_elem=fwd_g + bwd, fwdbwd_launches=launches + bl + 2)
    return out


class BiWKV4Function(torch.autograd.Function):
    """Autograd Function of the Triton Bi-WKV4 (inputs already validated and contiguous)."""

    @staticmethod
    def forward(ctx, w, u, k, v, strategy, chunk, need_grad=True):
        # need_grad: the caller's grad mode and requires_grad (inside forward grad mode is off
        # and needs_input_grad ignores torch.no_grad); False skips the log-denominator
        need = bool(need_grad) and any(ctx.needs_input_grad[:4])
        y, ya, logd, chunk, NT = _forward(w, u, k, v, strategy, chunk, need)
        if need:
            ctx.save_for_backward(w, u, k, v, ya, logd)
        ctx.chunk, ctx.NT = chunk, NT
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        w, u, k, v, y, logd = ctx.saved_tensors
        gy = gy.contiguous()
        gw, gu, gk, gv = _backward(w, u, k, v, y, logd, gy, ctx.chunk, ctx.NT)
        return gw.to(w.dtype), gu.to(u.dtype), gk, gv, None, None, None


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
           backend: str = "auto", strategy: str | None = None, chunk: int | None = None
           ) -> torch.Tensor:
    """Bi-WKV4 (Vision-RWKV Eq. 5): ``y_t = sum_i softmax_i(l(t, .)) v_i`` with
    ``l(t, i) = k_i - (|t-i| - 1) w`` for i != t and ``l(t, t) = u + k_t``.

    Args:
        w, u: (C,) decay and bonus (any sign; LALIC passes decay/T and boost/T).
        k, v: (B, T, C), B, T, C >= 1, contiguous or strided.
        backend: "auto" | "triton" | "cpu" | "torch" (see :func:`resolve_backend`).
        strategy: None (heuristic / autotune JSON) | "sequential" | "chunked" (Triton only).
        chunk: tokens per chunk for the chunked strategy (default: heuristic).
    Returns:
        y: (B, T, C) in k's dtype. float16/bfloat16/float32 accumulate in float32, float64 in
        float64. Differentiable in w, u, k, v (exact gradients; gw, gu reduced
        deterministically).
    Raises:
        ValueError: wrong shapes/ndim/dtypes/devices, unknown backend or strategy.
        RuntimeError: backend="triton" on CPU tensors without TRITON_INTERPRET=1.
        kernels_cpu.CPUKernelUnavailable: backend="cpu" where the C kernels do not build.

    Runs ``torch.ops.hpcm.biwkv4`` (see the module docstring), so ``torch.compile`` traces a
    call without a graph break.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if strategy not in _STRATEGIES:
        raise ValueError(f"strategy must be one of {_STRATEGIES}, got {strategy!r}")
    if chunk is not None and (not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
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
    if not triton or (strategy is None and chunk is None):
        # registered by kernels_triton.custom_op, which the package imports after this module
        return torch.ops.hpcm.biwkv4(w, u, k, v, backend, need_grad)[0]
    # an explicit Triton plan: the autograd Function, whose backward reuses the forward's plan
    B, T, C = k.shape
    if strategy is None:
        strategy, ch = choose_strategy(B, T, C, k.dtype, k.device)
        chunk = chunk or ch
    elif strategy == "chunked" and chunk is None:
        chunk = choose_strategy(B, T, C, k.dtype, k.device)[1]
        if chunk >= T:
            chunk = max(1, 1 << max(0, (T - 1).bit_length() - 2))  # about 4 chunks
    return BiWKV4Function.apply(w.contiguous(), u.contiguous(), k.contiguous(),
                                v.contiguous(), strategy, chunk, need_grad)

