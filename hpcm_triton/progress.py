"""Progress on long work: a tqdm bar when the stream is a terminal, plain lines otherwise
(cluster logs, CI). Torch-free.

:class:`StepProgress` is the one switch between the two; :func:`progress` wraps an iterable in it,
and the trainer's log drives it step by step.
"""
from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, TextIO, TypeVar

T = TypeVar("T")


class StepProgress:
    """Progress through ``total`` steps on ``file`` (default stderr): a tqdm bar on a terminal;
    otherwise nothing but the lines given to :meth:`line` and :meth:`write`."""

    def __init__(self, total: int, desc: str, initial: int = 0, file: TextIO | None = None):
        self.file = file or sys.stderr
        self.bar = None
        if self.file.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, file=self.file, dynamic_ncols=True)

    @property
    def interactive(self) -> bool:
        return self.bar is not None

    def update_to(self, n: int, **postfix) -> None:
        """Move the bar to step ``n``, showing ``postfix`` beside it (no-op without a bar)."""
        if self.bar is not None:
            self.bar.n = n
            if postfix:
                self.bar.set_postfix(refresh=False, **postfix)
            self.bar.refresh()

    def line(self, text: str) -> None:
        """A periodic status line, shown only where there is no bar (the bar shows it)."""
        if self.bar is None:
            print(text, file=self.file, flush=True)

    def write(self, text: str) -> None:
        """A message shown in either case, above the bar when there is one."""
        if self.bar is not None:
            self.bar.write(text, file=self.file)
        else:
            print(text, file=self.file, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def progress(items: Iterable[T], desc: str, enabled: bool = True) -> Iterator[T]:
    """Iterate ``items``, showing progress on stderr: a bar on a terminal, else one line per item
    and a closing line with the total time. ``enabled=False`` shows nothing."""
    items = list(items)
    if not enabled:
        yield from items
        return
    bar = StepProgress(len(items), desc)
    t0 = time.perf_counter()
    try:
        for i, item in enumerate(items):
            label = item[0] if isinstance(item, tuple) else item
            bar.line(f"{desc}: {i + 1}/{len(items)} {label} (started at {time.perf_counter() - t0:.1f} s)")
            yield item
            bar.update_to(i + 1)
    finally:
        bar.close()
    bar.line(f"{desc}: done, {len(items)} in {time.perf_counter() - t0:.1f} s")
