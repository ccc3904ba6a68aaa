"""rANS coding of integer symbols with compressai's coder, made safe for untrusted streams.

compressai's ``RansDecoder`` does no bounds checking: a truncated or foreign stream makes it
read past the end of its buffer (garbage at best, a segfault at worst) and it reports no
error. Two measures keep ``decompress`` honest:

* decoding runs in a forked worker process, so a crash or a hang of the C++ decoder becomes
  a :class:`BitstreamError` in the caller instead of killing it;
* after the last symbol, the decoded symbols are encoded again with the same tables and must
  reproduce the input bytes exactly. rANS is deterministic, so a valid stream always passes
  and a corrupted, truncated or other-model stream fails.
"""
from __future__ import annotations

import gc
import importlib
import multiprocessing as mp
import warnings
from dataclasses import dataclass, field

import numpy as np


def compressai_ext(name: str):
    """compressai's C++ extension ``name`` ("ans" or "_CXX"), imported on first use.

    Importing compressai pulls in its whole package, which scripts a few functions and makes
    torch print a deprecation warning that is not ours to act on.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*is deprecated", category=FutureWarning)
        return importlib.import_module(f"compressai.{name}")


class BitstreamError(ValueError):
    """A stream could not be decoded: truncated, corrupted, or written by another model."""


@dataclass
class CdfTables:
    """Quantized CDFs in the Python-list form compressai's coder takes."""

    cdfs: list
    lengths: list
    offsets: list

    @classmethod
    def from_tensors(cls, cdf, cdf_length, offset) -> "CdfTables":
        return cls(cdf.cpu().int().tolist(), cdf_length.cpu().int().reshape(-1).tolist(),
                   offset.cpu().int().reshape(-1).tolist())


def encode(chunks: list[tuple[np.ndarray, np.ndarray, CdfTables]]) -> bytes:
    """One rANS stream from (symbols, indexes, tables) chunks, in order."""
    enc = compressai_ext("ans").BufferedRansEncoder()
    for symbols, indexes, tables in chunks:
        enc.encode_with_indexes(
            np.asarray(symbols).reshape(-1).astype(np.int32).tolist(),
            np.asarray(indexes).reshape(-1).astype(np.int32).tolist(),
            tables.cdfs, tables.lengths, tables.offsets,
        )
    return enc.flush()


def _open_decoders(streams, tail: bytes = b"") -> list:
    decoders = []
    for s in streams:
        d = compressai_ext("ans").RansDecoder()
        d.set_stream(bytes(s) + tail)
        decoders.append(d)
    return decoders


def _decode(decoder, tables: CdfTables, indexes: np.ndarray) -> np.ndarray:
    out = decoder.decode_stream(indexes.tolist(), tables.cdfs, tables.lengths, tables.offsets)
    return np.asarray(out, dtype=np.int32)


def _worker(conn, streams, tables):
    # The forked child shares the parent's heap, CUDA tensors included; collecting cycles here
    # could run their destructors against a CUDA context the child does not own.
    gc.disable()
    decoders = _open_decoders(streams)
    while True:
        msg = conn.recv()
        if msg is None:
            return
        stream_id, table_id, indexes = msg
        conn.send(_decode(decoders[stream_id], tables[table_id], indexes))


@dataclass
class DecodeSession:
    """Decodes several streams step by step, isolated in a worker process.

    ``tables`` maps a name to its :class:`CdfTables`. Use as a context manager; call
    :meth:`verify` once every symbol has been decoded.
    """

    streams: list[bytes]
    tables: dict
    label: str = "stream"
    _log: list = field(default_factory=list)

    def __post_init__(self):
        for i, s in enumerate(self.streams):
            if not isinstance(s, (bytes, bytearray)):
                raise BitstreamError(f"{self.label} {i} is {type(s).__name__}, expected bytes")
            if len(s) < 8 or len(s) % 4:
                # compressai's rANS flushes a 64-bit state and whole 32-bit words.
                raise BitstreamError(f"{self.label} {i} has {len(s)} bytes: truncated or not an rANS stream")
        self._log = [[] for _ in self.streams]
        self._proc = None
        if "fork" in mp.get_all_start_methods():
            ctx = mp.get_context("fork")
            self._conn, child = ctx.Pipe()
            self._proc = ctx.Process(target=_worker, args=(child, [bytes(s) for s in self.streams], self.tables),
                                     daemon=True)
            self._proc.start()
            child.close()
        else:  # no fork (Windows): decode in-process; the re-encode check still catches corruption
            # zero tail: a truncated stream reads zeros instead of foreign memory
            self._decoders = _open_decoders(self.streams, tail=bytes(1 << 16))

    def decode(self, stream_id: int, table_id: str, indexes: np.ndarray) -> np.ndarray:
        indexes = np.ascontiguousarray(indexes, dtype=np.int32).reshape(-1)
        if self._proc is None:
            out = _decode(self._decoders[stream_id], self.tables[table_id], indexes)
        else:
            self._conn.send((stream_id, table_id, indexes))
            timeout = 60.0 + 1e-5 * indexes.size
            if not self._conn.poll(timeout):
                self.close()
                raise BitstreamError(f"{self.label} {stream_id}: decoder did not answer within {timeout:.0f} s")
            try:
                out = self._conn.recv()
            except EOFError:
                code = self._proc.exitcode
                self.close()
                raise BitstreamError(f"{self.label} {stream_id}: the rANS decoder crashed (exit code {code}); "
                                     "the stream is corrupted or truncated") from None
        self._log[stream_id].append((out, indexes, table_id))
        return out

    def verify(self) -> None:
        """Re-encode what was decoded; a valid stream reproduces its own bytes."""
        for i, (s, log) in enumerate(zip(self.streams, self._log)):
            again = encode([(sym, idx, self.tables[t]) for sym, idx, t in log])
            if again != bytes(s):
                raise BitstreamError(f"{self.label} {i} is corrupted, truncated, or was written by another model "
                                     f"or configuration ({len(s)} bytes do not decode to a consistent stream)")

    def close(self) -> None:
        if self._proc is not None:
            try:
                self._conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            self._proc.join(timeout=1)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join()
            self._conn.close()
            self._proc = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
