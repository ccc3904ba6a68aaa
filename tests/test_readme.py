"""The README's Python snippets run as pasted, each in a fresh process, at TINY widths.

Each ```python block of README.md runs on its own (no state carried from one block to the
next) in a temporary folder, after a prelude that only makes it small: every variant is built
at the TINY widths (``hpcm_triton.models.TINY``) instead of the official ones, and the
official checkpoint files the snippets name are written there at those widths.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"

# Defines no name the snippet could lean on (it must import what it uses itself).
PRELUDE = '''
def _tiny():
    import torch
    from hpcm_triton.models import TINY, zoo

    init = zoo._Variant.__init__
    zoo._Variant.__init__ = lambda self, **kw: init(self, **{**TINY, **kw})
    for name in ("hpcm_base_0.0067.pth.tar",):
        torch.manual_seed(0)
        torch.save({"state_dict": zoo.HPCM_Base().state_dict()}, name)


_tiny()
del _tiny
'''


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line number, code) of every ```python block."""
    out = []
    for m in re.finditer(r"^```python\n(.*?)^```", text, flags=re.S | re.M):
        out.append((text.count("\n", 0, m.start()) + 1, m.group(1)))
    return out


BLOCKS = python_blocks(README.read_text())


def test_the_readme_has_python_snippets():
    assert len(BLOCKS) >= 3
    # the extraction itself: two blocks, one line number each
    assert [n for n, _ in python_blocks("a\n```python\nx = 1\n```\nb\n```python\ny = 2\n```\n")] == [2, 6]


@pytest.mark.parametrize("line, code", BLOCKS, ids=[f"README.md:{n}" for n, _ in BLOCKS])
def test_snippet_runs_as_pasted(line, code, tmp_path):
    r = subprocess.run([sys.executable, "-c", PRELUDE + code], cwd=tmp_path, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, f"README.md:{line} failed:\n{r.stderr[-3000:]}"
