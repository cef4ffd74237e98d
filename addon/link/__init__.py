"""The wire link between the Blender extension and the ImFace++ backend (bpy-free, torch-free).

- `protocol`: message framing, encode/decode with every receive-side check, error shape, replay guard,
  connection file and CURVE key helpers. The server imports it as `addon.link.protocol`.
- `client`: `Client` (blocking, for scripts and tests) and `AsyncClient` (non-blocking `pump()` for
  Blender timers).

Only numpy, pyzmq, msgpack and the standard library are imported here, so this package loads inside
Blender's Python (from the extension's bundled wheels) and inside the backend alike. Imports within
`addon/` are relative because Blender loads the extension as `bl_ext.<repo>.imface`.
"""
from __future__ import annotations

from . import protocol  # noqa: F401  (re-exported for `from addon.link import protocol`)

__all__ = ["protocol"]
