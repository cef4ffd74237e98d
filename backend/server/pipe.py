"""The server <-> worker-process channel: length-prefixed msgpack frames over the child's stdin/stdout.

Only between the server and the worker processes it starts itself (never a network socket, never
pickle): arrays travel as a msgpack extension (dtype string, shape, raw bytes).
"""
from __future__ import annotations

import struct
from typing import Any, BinaryIO

import msgpack
import numpy as np

_ND = 1
MAX_FRAME = 1 << 31


def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        arr = np.ascontiguousarray(obj)
        return msgpack.ExtType(_ND, msgpack.packb([arr.dtype.str, list(arr.shape), arr.tobytes()],
                                                  use_bin_type=True))
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (tuple, set)):
        return list(obj)
    raise TypeError(f"cannot send {type(obj).__name__} to a worker")


def _ext(code: int, data: bytes) -> Any:
    if code != _ND:
        return msgpack.ExtType(code, data)
    dt, shape, raw = msgpack.unpackb(data, raw=False)
    return np.frombuffer(raw, dtype=np.dtype(dt)).reshape(shape).copy()


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, default=_default, use_bin_type=True)


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, ext_hook=_ext, raw=False, strict_map_key=False,
                           max_bin_len=MAX_FRAME, max_str_len=MAX_FRAME)


def write_frame(fh: BinaryIO, obj: Any) -> None:
    data = pack(obj)
    fh.write(struct.pack("<Q", len(data)))
    fh.write(data)
    fh.flush()


def read_frame(fh: BinaryIO) -> Any | None:
    """The next object, or None at end of file."""
    head = _read_exact(fh, 8)
    if head is None:
        return None
    n = struct.unpack("<Q", head)[0]
    if n > MAX_FRAME:
        raise ValueError(f"worker frame of {n} bytes")
    data = _read_exact(fh, n)
    if data is None:
        return None
    return unpack(data)


def _read_exact(fh: BinaryIO, n: int) -> bytes | None:
    chunks = []
    got = 0
    while got < n:
        b = fh.read(n - got)
        if not b:
            return None
        chunks.append(b)
        got += len(b)
    return b"".join(chunks)
