"""The registered operator torch.ops.hpcm.biwkv4 (kernels_triton/custom_op.py): its schema,
torch.library.opcheck, residual shapes that do not depend on w, the flop formula under
FlopCounterMode, torch.compile(fullgraph=True) of SpatialMix and of a TINY Phase 3 forward
and backward against eager, and the public function's errors."""
from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import kernels_cpu
import kernels_triton
from kernels_cpu import biwkv4_cpu
from kernels_triton import biwkv4
from kernels_triton.custom_op import (BWD_FLOPS_PER_ELEMENT, FWD_FLOPS_PER_ELEMENT,
                                      biwkv4_backward_op, biwkv4_op, residual_specs)
from reference import biwkv4_scan

pytestmark = pytest.mark.usefixtures("one_thread")
needs_c = pytest.mark.skipif(not kernels_cpu.available(),
                             reason=f"C kernels unavailable: {kernels_cpu.unavailable_reason()}")
TRITON_HERE = torch.cuda.is_available() or kernels_triton.ops._kernels().INTERPRET
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def inputs(B, T, C, dtype=torch.float32, seed=0, w_scale=6.0, grad=False, device="cpu"):
    """HPCM-like: w = (uniform in ±w_scale) / T, u ~ N(0, 1), k uniform in ±8, v ~ N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.rand(C, generator=g, dtype=torch.float64) * 2 - 1) * w_scale / T
    u = torch.randn(C, generator=g, dtype=torch.float64)
    k = (torch.rand(B, T, C, generator=g, dtype=torch.float64) * 2 - 1) * 8
    v = torch.randn(B, T, C, generator=g, dtype=torch.float64)
    return [x.to(device=device, dtype=dtype).requires_grad_(grad) for x in (w, u, k, v)]


def grads(fn, ins, seed=1):
    xs = [x.detach().clone().requires_grad_() for x in ins]
    y = fn(*xs)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(y.dtype)
    return (y, *torch.autograd.grad(y, xs, gy))


def same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


# ----------------------------------------------------------------------------- schema, opcheck
def test_schema():
    assert str(torch.ops.hpcm.biwkv4.default._schema) == (
        "hpcm::biwkv4(Tensor w, Tensor u, Tensor k, Tensor v, str backend, bool need_grad) "
        "-> (Tensor, Tensor[])")
    assert str(torch.ops.hpcm.biwkv4_backward.default._schema) == (
        "hpcm::biwkv4_backward(Tensor w, Tensor u, Tensor k, Tensor v, Tensor y, Tensor[] residuals, "
        "Tensor gy, str backend) -> (Tensor, Tensor, Tensor, Tensor)")


# T = 1; C = 1, 7, 20, 37 (no power of two, partial blocks of 16 channels); T = 33 and 70 (a
# ragged last chunk, more than one chunk of 64); B up to 3
OPCHECK_SHAPES = [(1, 1, 3), (2, 1, 1), (2, 33, 7), (3, 70, 20), (1, 17, 37)]


@pytest.mark.parametrize("backend", ["cpu", "torch", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape", OPCHECK_SHAPES, ids=lambda s: "B{}T{}C{}".format(*s))
def test_opcheck_cpu(shape, dtype, backend):
    if backend == "cpu" and not kernels_cpu.available():
        pytest.skip("C kernels unavailable")
    ins = inputs(*shape, dtype=dtype, seed=sum(shape), grad=True)
    torch.library.opcheck(biwkv4_op, (*ins, backend, True))
    torch.library.opcheck(biwkv4_op, (*(x.detach() for x in ins), backend, False))


@needs_c
@pytest.mark.parametrize("dtypes", [(torch.float64, torch.float32), (torch.bfloat16, torch.bfloat16)],
                         ids=["w64-k32", "bf16"])
def test_opcheck_cpu_mixed_and_16bit(dtypes):
    """Compute dtype other than k's: y in the compute dtype is a residual of its own."""
    w, u, k, v = inputs(2, 40, 9, seed=3, grad=True)
    ins = [w.detach().to(dtypes[0]), u.detach().to(dtypes[0]), k.detach().to(dtypes[1]), v.detach().to(dtypes[1])]
    ins = [x.requires_grad_() for x in ins]
    torch.library.opcheck(biwkv4_op, (*ins, "cpu", True))


@needs_c
def test_opcheck_backward_op():
    ins = inputs(2, 45, 19, torch.float64, seed=4)
    y, res = biwkv4_op(*ins, "cpu", True)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=y.dtype)
    torch.library.opcheck(biwkv4_backward_op, (*ins, y, res, gy, "cpu"))


@pytest.mark.skipif(not TRITON_HERE, reason="needs a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_opcheck_triton(dtype):
    """The Triton kernels through the op (the interpreter without a GPU): tiny shapes."""
    ins = inputs(1, 5, 3, dtype=dtype, seed=6, grad=True, device=DEV)
    torch.library.opcheck(biwkv4_op, (*ins, "triton", True))
    y = biwkv4(*ins, backend="triton").detach().cpu()
    ref = [x.detach().cpu().double() for x in ins]
    assert rel(y, biwkv4_scan(*ref)) < (1e-12 if dtype == torch.float64 else 1e-6)


# ----------------------------------------------------------------------------- residuals
@needs_c
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["fp32", "fp64", "bf16"])
@pytest.mark.parametrize("w_scale", [6.0, 3000.0], ids=["hpcm-w", "large-w"])
def test_cpu_residuals_depend_on_shapes_only(dtype, w_scale):
    """The residuals have the shapes of residual_specs (what the fake implementation returns)
    whatever w is; where |w| shortens the chunks below what the stored units hold (|w| up to
    20: chunks of 1 token in float32, 8 in float64), the backward recomputes them, and the
    gradients are bitwise those of the C kernels' autograd Function."""
    B, T, C = 2, 150, 21
    ins = inputs(B, T, C, dtype=dtype, seed=7, w_scale=w_scale)
    y, res = biwkv4_op(*ins, "cpu", True)
    assert torch.isfinite(y).all()
    specs = residual_specs(*ins, "cpu")
    assert [(tuple(r.shape), r.dtype) for r in res] == [(tuple(s), d) for s, d in specs]
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    assert specs[1] == ((B, 3, C), cdt)               # units: ceil(150 / 64) chunks
    assert len(specs) == (3 if dtype == torch.bfloat16 else 2)
    assert bool((res[1] == 0).all()) == (w_scale > 100)   # zeros: the backward recomputes them
    with FakeTensorMode() as mode:
        fy, fres = biwkv4_op(*(mode.from_tensor(x) for x in ins), "cpu", True)
    assert [(r.shape, r.dtype) for r in fres] == [(r.shape, r.dtype) for r in res]
    assert (fy.shape, fy.dtype) == (y.shape, y.dtype)
    for a, b in zip(grads(biwkv4, ins), grads(biwkv4_cpu, ins)):
        assert same_bits(a, b)


@needs_c
def test_same_results_as_the_autograd_functions():
    """backend "cpu" and "torch" through the op: bitwise the y and gradients of the C kernels'
    and the PyTorch scan's own autograd Functions."""
    ins = inputs(3, 77, 33, seed=8)
    for backend, fn in (("cpu", biwkv4_cpu), ("torch", biwkv4_scan), ("auto", biwkv4_cpu)):
        for a, b in zip(grads(lambda *x: biwkv4(*x, backend=backend), ins), grads(fn, ins)):
            assert same_bits(a, b), backend


def test_no_grad_stores_nothing():
    ins = inputs(1, 20, 4, seed=9)
    y, res = biwkv4_op(*ins, "auto", False)
    assert res == []
    ins = [x.requires_grad_() for x in ins]
    y, res = biwkv4_op(*ins, "auto", False)
    with pytest.raises(RuntimeError, match="need_grad=False"):
        y.sum().backward()


# ----------------------------------------------------------------------------- flops
def test_flop_counter_counts_spatial_mix():
    from hpcm_triton.rwkv.mix import SpatialMix

    assert (FWD_FLOPS_PER_ELEMENT, BWD_FLOPS_PER_ELEMENT) == (17, 39)
    torch.manual_seed(0)
    B, C, H, W = 2, 24, 6, 5
    m = SpatialMix(C)
    x = torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(1), requires_grad=True)
    with FlopCounterMode(display=False) as fc:
        y = m(x)
    counts = fc.get_flop_counts()["Global"]
    assert counts[torch.ops.hpcm.biwkv4] == 17 * B * H * W * C
    assert torch.ops.hpcm.biwkv4_backward not in counts
    with FlopCounterMode(display=False) as fc:
        y.sum().backward()
    counts = fc.get_flop_counts()["Global"]
    assert counts[torch.ops.hpcm.biwkv4_backward] == 39 * B * H * W * C
    assert torch.ops.hpcm.biwkv4 not in counts


# ----------------------------------------------------------------------------- torch.compile
@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def capture_backend(graphs):
    """aot_eager that keeps the forward and backward graphs AOTAutograd traced."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def keep(kind):
        def compiler(gm, example_inputs):
            graphs[kind].append(gm)
            return make_boxed_func(gm.forward)
        return compiler

    return aot_autograd(fw_compiler=keep("fw"), bw_compiler=keep("bw"))


class CountCalls(TorchDispatchMode):
    """Counts the calls of one operator while it is active."""

    def __init__(self, op):
        super().__init__()
        self.op, self.n = op, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += func is self.op
        return func(*args, **(kwargs or {}))


def op_calls(graphs, op):
    return sum(n.target is op for gm in graphs for n in gm.graph.nodes)


def test_compile_spatial_mix_inductor(fresh_dynamo):
    """SpatialMix (C = 40: partial channel blocks; T = 96: a ragged second chunk; decay of both
    signs) compiled by inductor with fullgraph=True, forward and backward. Tolerances: y and
    every gradient within 1e-5 relative (L2) of eager (inductor may reorder the surrounding
    float32 matmuls; the op itself is opaque)."""
    from hpcm_triton.rwkv.mix import SpatialMix

    torch.manual_seed(0)
    m = SpatialMix(40)
    with torch.no_grad():
        m.decay.uniform_(-2.0, 8.0)
        m.boost.normal_()
    x = torch.randn(2, 40, 8, 12, generator=torch.Generator().manual_seed(1))
    cm = torch.compile(m, fullgraph=True)
    params = list(m.parameters())
    out = {}
    for name, fn in (("eager", m), ("compiled", cm)):
        xs = x.clone().requires_grad_()
        y = fn(xs)
        gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
        out[name] = (y.detach(), *torch.autograd.grad(y, [xs, *params], gy))
    names = ["y", "x"] + [n for n, _ in m.named_parameters()]
    for name, a, b in zip(names, out["compiled"], out["eager"]):
        assert rel(a, b) < 1e-5, name


def test_compile_phase3_tiny_forward_backward(fresh_dynamo):
    """A TINY Phase 3 (training mode: noise, straight-through rounding) compiled with
    fullgraph=True through AOTAutograd: one forward graph with the op, one backward graph with
    its backward op, no graph break. Same noise (same seed, same draw order): x_hat, the
    likelihoods and every parameter gradient within 1e-6 relative (L2) of eager."""
    from hpcm_triton import get_model
    from hpcm_triton.models.config import TINY

    torch.manual_seed(0)
    m = get_model("phase3", **TINY).train()
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    params = [p for p in m.parameters()]

    def step(model):
        torch.manual_seed(5)
        out = model(x)
        loss = out["x_hat"].square().mean() + sum(l.log2().mean() for l in out["likelihoods"].values())
        return [out["x_hat"], *out["likelihoods"].values()], torch.autograd.grad(loss, params)

    with CountCalls(torch.ops.hpcm.biwkv4.default) as calls:   # the calls eager makes
        outs_e, grads_e = step(m)
    graphs = {"fw": [], "bw": []}
    cm = torch.compile(m, fullgraph=True, backend=capture_backend(graphs))
    outs_c, grads_c = step(cm)
    assert len(graphs["fw"]) == 1 and len(graphs["bw"]) == 1
    # every call eager makes but one: the context cell of the last s3 step, whose output the
    # schedule discards (HPCM._schedule), is dead code in the graph
    n_ops = op_calls(graphs["fw"], torch.ops.hpcm.biwkv4.default)
    assert n_ops == calls.n - 1 > 0
    assert op_calls(graphs["bw"], torch.ops.hpcm.biwkv4_backward.default) == n_ops
    for a, b in zip(outs_c, outs_e):
        assert rel(a, b) < 1e-6
    for (name, _), a, b in zip(m.named_parameters(), grads_c, grads_e):
        assert rel(a, b) < 1e-6, name


def test_compiled_input_check_refuses_nan(fresh_dynamo):
    """Compiled, HPCM's check that x is finite is an assertion inside the graph (a graph cannot
    branch on values): a RuntimeError where eager raises a ValueError."""
    from hpcm_triton import get_model
    from hpcm_triton.models.config import TINY

    m = get_model("phase3", **TINY)
    check = torch.compile(m._check_input, fullgraph=True, backend="eager")
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    check(x)
    x[0, 1, 5, 7] = float("nan")
    with pytest.raises(RuntimeError, match="x contains NaN or inf"):
        check(x)
    with pytest.raises(ValueError, match="x contains NaN or inf"):
        m._check_input(x)


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("bad,match", [
    (dict(w=torch.rand(4)), "w must have shape"),
    (dict(u=torch.rand(5, 1)), "u must have shape"),
    (dict(k=torch.randn(7, 5)), "k must have shape"),
    (dict(v=torch.randn(2, 7, 4)), "v must have shape"),
    (dict(v=torch.randn(2, 7, 5, dtype=torch.float64)), "v must have the dtype of k"),
    (dict(k=torch.randint(0, 3, (2, 7, 5))), "k must be a floating tensor"),
    (dict(backend="c"), "backend must be one of"),
])
def test_bad_input_is_one_value_error(bad, match):
    args = dict(w=torch.rand(5), u=torch.rand(5), k=torch.randn(2, 7, 5), v=torch.randn(2, 7, 5))
    args.update(bad)
    with pytest.raises(ValueError, match=match) as e:
        biwkv4(**args)
    assert e.value.__cause__ is None and e.value.__context__ is None
    with pytest.raises(ValueError, match="backend must be one of"):
        biwkv4_op(*inputs(1, 3, 2), "c", False)
