"""Peak tensor memory of a piece of code, on CUDA and on CPU.

* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (exact, tensors
  only, the caching allocator's reserve not counted).
* CPU: PyTorch's CPU allocator has no peak counter, but under ``torch.profiler`` with
  ``profile_memory=True`` it reports every allocation and free; summed in time order they give
  the allocated bytes at each moment and their maximum (:data:`CPU_METHOD`). This is an
  allocator-level measure, not a sample of the process size: short peaks are not missed. What
  PyTorch's allocator does not hand out is not counted: the rANS coder's numpy arrays, the CPU
  Bi-WKV4 kernels' per-thread scratch (docs/biwkv4.md; a few hundred KiB a thread), Python
  objects. The profiler slows the measured call, so memory and time are measured in separate runs.

A peak is reported as ``start + above_start``: ``start`` is the tensor memory live when the code
began (CUDA: ``memory_allocated``; CPU, where the allocator cannot be asked: the bytes of the
tensors the caller names, e.g. the weights, gradients, optimiser state and input), ``above_start``
the measured rise. On CPU the profiler does not report the freeing of memory allocated before it
started, so what the previous call left (outputs, gradients) is dropped before a measurement.
"""
from __future__ import annotations

import os

import torch

CUDA_METHOD = "CUDA max_memory_allocated (tensors; the caching allocator's reserve not counted)"
CPU_METHOD = ("CPU allocator events (torch.profiler, profile_memory=True): every allocation and free of "
              "PyTorch's CPU allocator summed in time order; numpy arrays (rANS coder) and the C kernels' scratch "
              "are not counted")


def method(device) -> str:
    return CUDA_METHOD if torch.device(device).type == "cuda" else CPU_METHOD


def tensor_bytes(*objs) -> int:
    """Bytes of the distinct tensor storages in ``objs``: tensors, modules (parameters, their
    gradients and buffers), optimisers (their state), and lists or dicts of these."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            s = t.untyped_storage()
            key = (s.data_ptr(), t.device)
            if key not in seen and s.nbytes():
                seen.add(key)
                total += s.nbytes()

    def walk(o):
        if isinstance(o, torch.Tensor):
            add(o)
            if o.grad is not None:
                add(o.grad)
        elif isinstance(o, torch.nn.Module):
            for t in (*o.parameters(), *o.buffers()):
                walk(t)
        elif isinstance(o, torch.optim.Optimizer):
            for st in o.state.values():
                walk(st)
        elif isinstance(o, dict):
            for v in o.values():
                walk(v)
        elif isinstance(o, (list, tuple)):
            for v in o:
                walk(v)

    for o in objs:
        walk(o)
    return total


class PeakMemory:
    """``with PeakMemory(device, live=(model, optimiser, x)) as m: ...`` → ``m.start``,
    ``m.above_start``, ``m.peak`` in bytes. ``live`` is used on CPU only (see the module docstring)."""

    def __init__(self, device, live=()):
        self.device = torch.device(device)
        self.live = live
        self.start = self.above_start = self.peak = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            from torch.profiler import ProfilerActivity, profile

            os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # the profiler's start/stop lines on stderr: off
            self.start = tensor_bytes(*self.live)
            self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._prof.__enter__()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
            self.above_start = self.peak - self.start
            return False
        self._prof.__exit__(*exc)
        if exc[0] is None:
            self.above_start = cpu_peak_rise(self._prof)
            self.peak = self.start + self.above_start
        del self._prof
        return False


def cpu_peak_rise(prof) -> int:
    """The highest point of the running sum of the CPU allocator's events in ``prof`` (bytes)."""
    events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    level = peak = 0
    for _, n in sorted(events, key=lambda e: e[0]):
        level += n
        peak = max(peak, level)
    return peak
