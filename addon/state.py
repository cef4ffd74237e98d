"""The one Session of this Blender process, configured from the preferences."""
from __future__ import annotations

import bpy

from .session import Session

_SESSION: Session | None = None


def get() -> Session:
    global _SESSION
    if _SESSION is None:
        from .preferences import user_dir

        _SESSION = Session(cache_dir=user_dir("cache"))
        configure(_SESSION)
    return _SESSION


def peek() -> Session | None:
    return _SESSION


def configure(session: Session) -> None:
    try:
        from .preferences import prefs

        p = prefs()
    except RuntimeError:
        return
    session.request_timeout = float(p.request_timeout)
    session.cache_bytes = int(p.cache_mb) * 2**20


def allow_remote() -> bool:
    return bool(getattr(bpy.app, "online_access", False))


def shutdown() -> None:
    global _SESSION
    if _SESSION is not None:
        keep = False
        try:
            from .preferences import prefs

            keep = bool(prefs().keep_backend)
        except RuntimeError:
            pass
        _SESSION.shutdown(stop_backend=False if keep else None)
    _SESSION = None
