"""rANS coding of integer symbols with compressai's coder, made safe for untrusted streams.

compressai's ``RansDecoder`` does no bounds checking: a truncated or foreign stream makes it
read past the end of its buffer (garbage at best, a segfault at worst) and it reports no
error; its bypass coder (for symbols outside a table) never terminates on values whose raw
form does not fit in 28 bits. These measures keep ``decompress`` honest and bounded in time:

* decoding runs in a forked worker process that dies with its parent (``PR_SET_PDEATHSIG``)
  and ignores SIGINT (the parent handles interrupts), so a crash or a hang of the C++ decoder
  becomes a :class:`BitstreamError` after a timeout instead of killing or blocking the caller;
* every decoded symbol is checked against what the tables and the bypass range can encode
  (:data:`BYPASS_LIMIT`); anything else is corruption, reported before it reaches an encoder;
* each chunk's CDF indexes are checked against the check the encoder recorded (when the
  stream carries them, see :class:`CodedStream`) before the chunk is decoded: a decoder whose
  entropy parameters differ from the encoder's (other float rounding) repairs the few indexes
  that flipped by a bounded search (:mod:`.checks`), and stops with a
  :class:`ParameterMismatchError` at a step the search cannot resolve;
* after the last symbol, the decoded symbols are encoded again, in the worker under the same
  timeout, and must reproduce the input bytes exactly. rANS is deterministic, so a valid
  stream always passes and a corrupted, truncated or other-model stream fails.
"""
from __future__ import annotations

import gc
import importlib
import multiprocessing as mp
import os
import signal
import sys
import warnings
from dataclasses import dataclass, field

import numpy as np

from . import checks

# compressai's bypass coder writes |value| in 4-bit groups and loops forever once the raw value
# (2·|v| − 1 below the table, 2·(v − max) above it) needs 8 groups or more: the encoder can only
# code values v = symbol − offset with −2²⁷ ≤ v < max_value + 2²⁷ (measured: one past either
# end never terminates).
BYPASS_LIMIT = 1 << 27

# Seconds a worker may take for one request, plus a per-symbol allowance (about 100× what a
# valid stream needs on a slow CPU). Tests lower it.
TIMEOUT_S = 60.0
TIMEOUT_PER_SYMBOL_S = 1e-5


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


class ParameterMismatchError(BitstreamError):
    """The decoder's entropy parameters differ from the ones the encoder recorded: other float
    rounding (another CPU, GPU, library version) or an altered stream."""


class CodedStream(bytes):
    """The bytes of one rANS stream, with a check of each chunk's CDF indexes in coding order
    (``index_checks``; empty when unknown) of the kind ``check_kind`` (:mod:`.checks`:
    ``WSUM62``, searched on a mismatch, or version-2 files' ``CRC16``, only compared).
    Compares and hashes as plain bytes."""

    index_checks: tuple = ()
    check_kind: str = checks.WSUM62

    @classmethod
    def of(cls, data, index_checks=(), kind: str = checks.WSUM62) -> "CodedStream":
        if kind not in (checks.WSUM62, checks.CRC16):
            raise ValueError(f"unknown index check kind {kind!r}")
        s = cls(data)
        s.index_checks = tuple(int(c) for c in index_checks)
        s.check_kind = kind
        return s

    @property
    def index_crcs(self) -> tuple:
        """The older name of :attr:`index_checks`."""
        return self.index_checks


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

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(max_value, offset) per table as int64 arrays (cached)."""
        cached = self.__dict__.get("_arrays")
        if cached is None:
            cached = (np.asarray(self.lengths, dtype=np.int64) - 2, np.asarray(self.offsets, dtype=np.int64))
            self.__dict__["_arrays"] = cached
        return cached


def range_error(symbols: np.ndarray, indexes: np.ndarray, tables: CdfTables) -> str | None:
    """Why (symbols, indexes) cannot be rANS-coded with ``tables``, or None if they can."""
    idx = np.asarray(indexes).reshape(-1).astype(np.int64)
    sym = np.asarray(symbols).reshape(-1).astype(np.int64)
    if idx.shape != sym.shape:
        return f"{sym.size} symbols for {idx.size} indexes"
    if not idx.size:
        return None
    max_value, offset = tables.arrays()
    if idx.min() < 0 or idx.max() >= len(max_value):
        return f"CDF index out of range [0, {len(max_value)})"
    v = sym - offset[idx]
    bad = (v < -BYPASS_LIMIT) | (v >= max_value[idx] + BYPASS_LIMIT)
    if bad.any():
        i = int(np.argmax(bad))
        return f"symbol {int(sym[i])} at position {i} is outside the coder's range (table {int(idx[i])})"
    return None


def encode(chunks: list[tuple[np.ndarray, np.ndarray, CdfTables]]) -> CodedStream:
    """One rANS stream from (symbols, indexes, tables) chunks, in order.

    Raises ValueError for symbols the coder cannot represent (it would never terminate).
    """
    enc = compressai_ext("ans").BufferedRansEncoder()
    step_checks = []
    for step, (symbols, indexes, tables) in enumerate(chunks):
        err = range_error(symbols, indexes, tables)
        if err:
            raise ValueError(f"cannot entropy-code this latent: {err}; a latent this far out comes from "
                             "weights (or inputs) far outside a trained model's range: check the checkpoint")
        enc.encode_with_indexes(
            np.asarray(symbols).reshape(-1).astype(np.int32).tolist(),
            np.asarray(indexes).reshape(-1).astype(np.int32).tolist(),
            tables.cdfs, tables.lengths, tables.offsets,
        )
        step_checks.append(checks.index_check(indexes, step))
    return CodedStream.of(enc.flush(), step_checks)


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


def _reencodes(streams, logs, tables) -> list[bool]:
    """Whether each stream's decoded (symbols, indexes, table) log encodes back to its bytes."""
    return [encode([(sym, idx, tables[t]) for sym, idx, t in log]) == bytes(s) for s, log in zip(streams, logs)]


def die_with_parent(parent_pid: int) -> None:
    """In a forked child: get SIGKILL when the parent dies (Linux), and exit now if it already has."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:
        os._exit(1)


def _worker(conn, parent_pid, streams, tables):
    # Interrupts are the parent's to handle: it ends the whole command (and us with it).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    die_with_parent(parent_pid)
    # The forked child shares the parent's heap, CUDA tensors included; collecting cycles here
    # could run their destructors against a CUDA context the child does not own.
    gc.disable()
    decoders = _open_decoders(streams)
    logs = [[] for _ in streams]
    while True:
        msg = conn.recv()
        if msg is None:
            return
        if msg == "verify":
            conn.send(_reencodes(streams, logs, tables))
            continue
        stream_id, table_id, indexes = msg
        out = _decode(decoders[stream_id], tables[table_id], indexes)
        if range_error(out, indexes, tables[table_id]) is None:
            logs[stream_id].append((out, indexes, table_id))
        conn.send(out)


@dataclass
class DecodeSession:
    """Decodes several streams step by step, isolated in a worker process.

    ``tables`` maps a name to its :class:`CdfTables`. Streams that are :class:`CodedStream`
    objects with ``index_checks`` have each decode call's indexes checked against them, and
    flipped indexes repaired where the call says how to find candidates (:meth:`decode`);
    ``flips[i]`` lists, per coding step of stream i, how many were repaired. Use as a context
    manager; call :meth:`verify` once every symbol has been decoded.
    """

    streams: list[bytes]
    tables: dict
    label: str = "stream"
    timeout: float | None = None  # default: TIMEOUT_S at call time
    _log: list = field(default_factory=list)

    def __post_init__(self):
        for i, s in enumerate(self.streams):
            if not isinstance(s, (bytes, bytearray)):
                raise BitstreamError(f"{self.label} {i} is {type(s).__name__}, expected bytes")
            if len(s) < 8 or len(s) % 4:
                # compressai's rANS flushes a 64-bit state and whole 32-bit words.
                raise BitstreamError(f"{self.label} {i} has {len(s)} bytes: truncated or not an rANS stream")
        self._expected = [tuple(getattr(s, "index_checks", ())) for s in self.streams]
        self._kinds = [getattr(s, "check_kind", checks.WSUM62) for s in self.streams]
        self._calls = [0] * len(self.streams)
        self.flips = [[] for _ in self.streams]
        self._symbols = 0
        self._log = [[] for _ in self.streams]
        self._proc = None
        if "fork" in mp.get_all_start_methods():
            ctx = mp.get_context("fork")
            self._conn, child = ctx.Pipe()
            self._proc = ctx.Process(target=_worker, args=(child, os.getpid(), [bytes(s) for s in self.streams],
                                                           self.tables), daemon=True)
            self._proc.start()
            child.close()
        else:  # no fork (Windows): decode in-process; the range and re-encode checks still catch corruption
            # zero tail: a truncated stream reads zeros instead of foreign memory
            self._decoders = _open_decoders(self.streams, tail=bytes(1 << 16))

    def _limit(self, n_symbols: int) -> float:
        base = TIMEOUT_S if self.timeout is None else self.timeout
        return base + TIMEOUT_PER_SYMBOL_S * n_symbols

    def _ask(self, msg, stream_id, n_symbols: int):
        self._conn.send(msg)
        timeout = self._limit(n_symbols)
        if not self._conn.poll(timeout):
            self.close()
            raise BitstreamError(f"{self.label} {stream_id}: the decoder did not answer within {timeout:.0f} s; "
                                 "the stream is corrupted")
        try:
            return self._conn.recv()
        except EOFError:
            code = self._proc.exitcode
            self.close()
            raise BitstreamError(f"{self.label} {stream_id}: the rANS decoder crashed (exit code {code}); "
                                 "the stream is corrupted or truncated") from None

    def _checked(self, stream_id: int, indexes: np.ndarray, candidates) -> np.ndarray:
        """``indexes`` if they pass the stream's check of this step, else the repaired ones."""
        k = self._calls[stream_id]
        expected = self._expected[stream_id]
        if k >= len(expected):
            raise BitstreamError(f"{self.label} {stream_id}: the file records {len(expected)} coding steps, "
                                 f"the model asks for step {k + 1}")
        where = f"{self.label} {stream_id}: the entropy parameters at coding step {k + 1} of {len(expected)}"
        if self._kinds[stream_id] == checks.CRC16:
            if checks.index_crc(indexes) & 0xFFFF != expected[k]:
                raise ParameterMismatchError(f"{where} differ from the encoder's (CDF index checksum mismatch)")
            return indexes
        if checks.index_check(indexes, k) == expected[k]:
            self.flips[stream_id].append(0)
            return indexes
        if candidates is None:
            raise ParameterMismatchError(f"{where} differ from the encoder's (CDF index check mismatch)")
        positions, alternatives = candidates(checks.CANDIDATES)
        sel = checks.search_flips(indexes, k, expected[k], positions, alternatives)
        if sel is None:
            raise ParameterMismatchError(
                f"{where} differ from the encoder's, and no set of up to {checks.MAX_FLIPS} flipped CDF indexes "
                f"among the {checks.CANDIDATES} positions nearest a scale-table boundary reproduces the "
                "encoder's check (search budget exhausted)")
        fixed = indexes.copy()
        fixed[positions[sel]] = alternatives[sel]
        self.flips[stream_id].append(len(sel))
        return fixed

    def decode(self, stream_id: int, table_id: str, indexes: np.ndarray, candidates=None) -> np.ndarray:
        """Decode the next chunk of stream ``stream_id`` with ``indexes`` into ``table_id``'s tables.

        ``candidates(k)``, if given, returns ``(positions, alternatives)``: the k positions whose
        index is likeliest to differ from the encoder's and the index each would have then
        (:func:`.checks.flip_candidates`); it is called only when the indexes miss the check.
        """
        indexes = np.ascontiguousarray(indexes, dtype=np.int32).reshape(-1)
        k = self._calls[stream_id]
        if self._expected[stream_id]:
            indexes = self._checked(stream_id, indexes, candidates)
        self._calls[stream_id] = k + 1
        tables = self.tables[table_id]
        if self._proc is None:
            out = _decode(self._decoders[stream_id], tables, indexes)
        else:
            out = self._ask((stream_id, table_id, indexes), stream_id, indexes.size)
        err = range_error(out, indexes, tables)
        if err:
            self.close()
            raise BitstreamError(f"{self.label} {stream_id} is corrupted: it decodes to a {err}")
        self._symbols += indexes.size
        if self._proc is None:
            self._log[stream_id].append((out, indexes, table_id))
        return out

    def verify(self) -> None:
        """Re-encode what was decoded (in the worker, under its timeout); a valid stream
        reproduces its own bytes."""
        for i, (k, expected) in enumerate(zip(self._calls, self._expected)):
            if expected and k != len(expected):
                raise BitstreamError(f"{self.label} {i}: the file records {len(expected)} coding steps, "
                                     f"the model decoded {k}")
        if self._proc is None:
            ok = _reencodes(self.streams, self._log, self.tables)
        else:
            ok = self._ask("verify", "streams", self._symbols)
        for i, good in enumerate(ok):
            if not good:
                raise BitstreamError(f"{self.label} {i} is corrupted, truncated, or was written by another model "
                                     f"or configuration ({len(self.streams[i])} bytes do not decode to a consistent "
                                     "stream)")

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
