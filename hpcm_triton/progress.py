"""Progress on long work: a tqdm bar on a terminal, plain periodic lines otherwise (cluster
logs, CI), always on stderr. Torch-free."""
from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], desc: str, enabled: bool = True) -> Iterator[T]:
    """Iterate ``items``, showing progress: a tqdm bar when stderr is a terminal, else one line
    per item (and a closing line with the total time). ``enabled=False`` shows nothing."""
    items = list(items)
    if not enabled:
        yield from items
        return
    if sys.stderr.isatty():
        from tqdm import tqdm

        yield from tqdm(items, desc=desc, file=sys.stderr, dynamic_ncols=True)
        return
    t0 = time.perf_counter()
    for i, item in enumerate(items):
        label = item[0] if isinstance(item, tuple) else item
        print(f"{desc}: {i + 1}/{len(items)} {label} (started at {time.perf_counter() - t0:.1f} s)",
              file=sys.stderr, flush=True)
        yield item
    print(f"{desc}: done, {len(items)} in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
