"""Warm decoder state per (client, face) and the decoded-frame cache, both bounded.

`DecoderSessions`: the animation decode warm-starts from the previous decode, so one decoder per
(client session, face[, stream]) keeps each timeline's state apart: two clients (or two faces)
interleaving never disturb each other. At most `max_decoders` are kept (least recently used dropped;
a dropped one simply starts cold next time, which is always correct). A decoder holds ~13 floats per
template vertex and stage (~3.5 MB at 20k vertices).

`FrameCache`: decoded vertices keyed by (model fingerprint, codes, settings) (`protocol.codes_key`),
an LRU bounded in bytes. Thread-safe (the decode thread fills it, the request loop reads it).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Callable, Hashable

import numpy as np

from addon.link.client import FrameCache as ClientFrameCache


class FrameCache(ClientFrameCache):
    """The client's byte-bounded LRU, made thread-safe (the decode thread fills it, the request loop
    reads it); stored arrays are read-only, since replies in flight share them."""

    def __init__(self, max_bytes: int = 256 * 2**20) -> None:
        super().__init__(max_bytes)
        self._lock = threading.Lock()

    def get(self, key: str, *, touch: bool = True) -> np.ndarray | None:
        with self._lock:
            return super().get(key, touch=touch)

    def put(self, key: str, arr: np.ndarray) -> None:
        arr = np.ascontiguousarray(arr)
        arr.flags.writeable = False
        with self._lock:
            super().put(key, arr)

    def clear(self) -> None:
        with self._lock:
            super().clear()


class DecoderSessions:
    """LRU of decoders keyed by (session, face, lane). Used from the decode thread only."""

    def __init__(self, factory: Callable[[], Any], max_decoders: int = 32) -> None:
        self.factory = factory
        self.max_decoders = int(max_decoders)
        self._decoders: OrderedDict[Hashable, Any] = OrderedDict()
        self.created = 0

    def __len__(self) -> int:
        return len(self._decoders)

    def get(self, key: Hashable) -> Any:
        dec = self._decoders.get(key)
        if dec is None:
            dec = self.factory()
            self.created += 1
            self._decoders[key] = dec
            while len(self._decoders) > self.max_decoders:
                self._decoders.popitem(last=False)
        else:
            self._decoders.move_to_end(key)
        return dec

    def clear(self) -> None:
        self._decoders.clear()
