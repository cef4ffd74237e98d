"""Chunked uploads of scans into a private spool folder, bounded in size, number and age.

`upload.begin {name, size, sha256?}` reserves `size` bytes of the total budget (refused with too_large
above `max_total` or `max_one`), `upload.chunk {upload, offset, data}` appends in order (offset must be
the bytes received so far; chunks of at most `chunk_bytes`), `upload.end` checks size and hash. A
finished upload is a file `spool/<id>` (mode 0600) that a `fit` of the same client session can name;
it is deleted when it expires (`idle_s` without use) or the server stops. At most `per_client`
unfinished uploads per client session.
"""
from __future__ import annotations

import hashlib
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from addon.link import protocol as P

_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass
class Upload:
    id: str
    session: str
    name: str
    size: int
    path: Path
    sha256: str | None
    received: int = 0
    done: bool = False
    touched: float = field(default_factory=time.monotonic)
    hasher: "hashlib._Hash" = field(default_factory=hashlib.sha256)

    @property
    def suffix(self) -> str:
        return Path(self.name).suffix.lower()


class UploadStore:
    def __init__(self, spool: Path, *, max_total: int = P.UPLOAD_TOTAL_BYTES, chunk_bytes: int = P.UPLOAD_CHUNK_BYTES,
                 per_client: int = 2, idle_s: float = 600.0, max_uploads: int = 64) -> None:
        self.spool = Path(spool)
        self.spool.mkdir(parents=True, exist_ok=True)
        if os.name == "posix":
            os.chmod(self.spool, 0o700)
        self.max_total = int(max_total)
        self.chunk_bytes = int(chunk_bytes)
        self.per_client = per_client
        self.idle_s = idle_s
        self.max_uploads = max_uploads
        self.uploads: dict[str, Upload] = {}

    def reserved(self) -> int:
        return sum(u.size for u in self.uploads.values())

    def begin(self, session: str, name: str, size: int, sha256: str | None) -> Upload:
        self.expire()
        if size < 0:
            raise P.ProtocolError(P.E_BAD_FIELD, "size must be >= 0", {"field": "size"})
        if size > self.max_total - self.reserved():
            raise P.ProtocolError(P.E_TOO_LARGE, f"an upload of {size} bytes does not fit the server's upload budget "
                                  f"({self.max_total - self.reserved()} of {self.max_total} bytes free)",
                                  {"size": size, "limit": self.max_total})
        open_ones = [u for u in self.uploads.values() if u.session == session and not u.done]
        if len(open_ones) >= self.per_client or len(self.uploads) >= self.max_uploads:
            raise P.ProtocolError(P.E_BUSY, f"at most {self.per_client} uploads in progress per client",
                                  {"limit": self.per_client})
        if sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise P.ProtocolError(P.E_BAD_FIELD, "sha256 must be 64 lowercase hex characters", {"field": "sha256"})
        uid = P.new_id()
        clean = _SAFE_NAME.sub("_", Path(name).name)[-128:] or "upload"
        path = self.spool / uid
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o600)
        os.close(fd)
        up = Upload(uid, session, clean, size, path, sha256)
        self.uploads[uid] = up
        return up

    def _get(self, session: str, uid: str) -> Upload:
        up = self.uploads.get(uid)
        if up is None or up.session != session:
            raise P.ProtocolError(P.E_NOT_FOUND, f"no upload {uid[:40]} for this client", {"upload": uid[:40]})
        return up

    def chunk(self, session: str, uid: str, offset: int, data: np.ndarray) -> Upload:
        up = self._get(session, uid)
        if up.done:
            raise P.ProtocolError(P.E_BAD_FIELD, "the upload is already finished", {"field": "upload"})
        if data.dtype != np.uint8 or data.ndim != 1:
            raise P.ProtocolError(P.E_BAD_ARRAY, "data must be a flat uint8 array", {"field": "data"})
        if data.nbytes > self.chunk_bytes:
            raise P.ProtocolError(P.E_TOO_LARGE, f"chunk of {data.nbytes} bytes (limit {self.chunk_bytes})",
                                  {"limit": self.chunk_bytes})
        if offset != up.received:
            raise P.ProtocolError(P.E_BAD_FIELD, f"offset {offset}, expected {up.received} (chunks go in order)",
                                  {"field": "offset", "expected": up.received})
        if up.received + data.nbytes > up.size:
            raise P.ProtocolError(P.E_TOO_LARGE, f"more bytes than the {up.size} announced", {"size": up.size})
        with open(up.path, "ab") as fh:
            fh.write(memoryview(data))
        up.hasher.update(memoryview(data))
        up.received += data.nbytes
        up.touched = time.monotonic()
        return up

    def end(self, session: str, uid: str) -> Upload:
        up = self._get(session, uid)
        if up.received != up.size:
            raise P.ProtocolError(P.E_BAD_FIELD, f"received {up.received} of {up.size} bytes", {"field": "size"})
        digest = up.hasher.hexdigest()
        if up.sha256 is not None and digest != up.sha256:
            self.remove(uid)
            raise P.ProtocolError(P.E_BAD_FIELD, "the data does not match the announced sha256", {"field": "sha256"})
        up.sha256 = digest
        up.done = True
        up.touched = time.monotonic()
        return up

    def finished(self, session: str, uid: str) -> Upload:
        up = self._get(session, uid)
        if not up.done:
            raise P.ProtocolError(P.E_BAD_FIELD, "the upload is not finished (upload.end)", {"field": "upload"})
        up.touched = time.monotonic()
        return up

    def remove(self, uid: str) -> None:
        up = self.uploads.pop(uid, None)
        if up is not None:
            try:
                up.path.unlink()
            except OSError:
                pass

    def expire(self) -> None:
        now = time.monotonic()
        for uid, up in list(self.uploads.items()):
            if now - up.touched > self.idle_s:
                self.remove(uid)

    def close(self) -> None:
        for uid in list(self.uploads):
            self.remove(uid)
