"""The study: each variant's cost (parameters, MACs, time, memory, the largest image that fits)
and, on request, its rate–distortion at equal training, set beside the phase design's expected
effects (docs/architecture.md §5) with a verdict computed from the numbers. docs/study.md
describes what is measured and how.

Submodules: ``args`` (the command line, argparse only), ``variants`` and ``claims`` (torch-free),
``search`` (the bisection), ``flops``, ``memory``, ``measure`` and ``breakdown`` (the
measurements, run in worker processes by ``worker``), ``rd`` (training and evaluation),
``report`` (markdown, JSON, plots) and ``run`` (the whole study). Importing this package
imports no torch.

``hpcm-triton study`` → :func:`hpcm_triton.study.run.run_study`.
"""
import importlib

_LAZY = {"run_study": ".run"}
__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
