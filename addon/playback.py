"""Scrubbing, playback and renders: the frame handler, the timer's work, streaming ahead.

- `frame_change_post` (persistent) reads each face's coefficients from the *evaluated* object of the
  depsgraph it is given (during renders that is the render's depsgraph: the original object's
  properties are not animated there) and shows the matching mesh if the client's frame cache has it;
  otherwise it asks for it (one decode in flight per face, latest wins) and returns at once. It never
  blocks, except during a render with "Exact Renders" on.
- `tick()` is the code the timer runs (every 10 ms while the add-on is enabled in a UI session;
  `bpy.app.timers` never fire in module mode, so tests and scripts call it themselves): pump the link,
  apply frames that arrived, keep streams going.
- Streaming: for every animated face the add-on asks the backend to decode the frames from the playhead
  to `stream_ahead` frames later (wrapping to the start of the scene range), so the first playback
  fills the cache and the next one runs from memory.
- Renders (decision): "Exact Renders" (default on) sets `scene.render.use_lock_interface` and, while a
  render runs (render_init .. render_complete/cancel), the frame handler WAITS for each frame's own
  decoded mesh (also for motion-blur subframes, whose coefficients the depsgraph evaluates at the
  subframe). Locking the interface makes it safe for the handler, which runs on the render thread in a
  UI session, to write the meshes. The alternative for render farms is "Bake to Shape Keys", after
  which no backend is needed.
"""
from __future__ import annotations

import time

import bpy
import numpy as np
from bpy.app.handlers import persistent

from . import faces, state
from .codes import PARTS
from .session import SessionError

TIMER_INTERVAL = 0.01
_RENDERING = {"active": False}
_STATS = {"shown_own": 0, "stale": 0, "frames": 0}


def stats() -> dict:
    return dict(_STATS)


def reset_stats() -> None:
    for k in _STATS:
        _STATS[k] = 0


def is_rendering() -> bool:
    return _RENDERING["active"]


# ------------------------------------------------------------------------------------------ edits


def on_face_edited(ob) -> None:
    """Slider edit: ask for the new mesh (coalesced per face, latest wins), never wait."""
    if ob is None or not faces.is_face(ob) or is_rendering():
        return
    scene = bpy.context.scene
    if scene is not None and not scene.imface.live:
        return
    try:
        faces.update_face(ob)
    except SessionError as e:
        faces.runtime(ob)["warning"] = str(e)


# ------------------------------------------------------------------------------------------ frames


def update_scene(scene, depsgraph=None, *, wait: bool = False) -> dict:
    """Show each face's mesh for the scene's current (sub)frame. Returns {"own": n, "stale": n}."""
    own = stale = 0
    s = state.get()
    for ob in faces.scene_faces(scene):
        try:
            r = faces.update_face(ob, depsgraph, wait=wait)
        except SessionError as e:
            faces.runtime(ob)["warning"] = str(e)
            r = "offline"
        if r in ("shown", "applied"):
            own += 1
        else:
            stale += 1
            _focus_stream(ob, scene)
    if not wait and scene.imface.stream and s.ready:
        for ob in faces.scene_faces(scene):
            ensure_stream(ob, scene)
    return {"own": own, "stale": stale}


@persistent
def on_frame_change(scene, depsgraph=None):
    if not faces.scene_faces(scene) or not scene.imface.live:
        return
    wait = is_rendering() and scene.imface.exact_render
    try:
        r = update_scene(scene, depsgraph, wait=wait)
    except SessionError as e:
        if wait:
            print(f"ImFace: frame {scene.frame_current}: {e}")
        return
    if not wait:
        _STATS["frames"] += 1
        if r["stale"]:
            _STATS["stale"] += 1
        else:
            _STATS["shown_own"] += 1


# ------------------------------------------------------------------------------------------ renders


@persistent
def on_render_init(scene, *args):
    _RENDERING["active"] = True
    if scene.imface.exact_render and faces.scene_faces(scene):
        scene.render.use_lock_interface = True


@persistent
def on_render_pre(scene, *args):
    # A still render (F12) has no frame change: make the current frame exact here.
    if faces.scene_faces(scene) and scene.imface.exact_render:
        depsgraph = args[0] if args and isinstance(args[0], bpy.types.Depsgraph) else None
        try:
            update_scene(scene, depsgraph, wait=True)
        except SessionError as e:
            print(f"ImFace: render of frame {scene.frame_current}: {e}")


@persistent
def on_render_done(scene, *args):
    _RENDERING["active"] = False


# ------------------------------------------------------------------------------------------ streaming


def _animated_paths(ob) -> list:
    """(part, index, fcurve) for the face's animated coefficients."""
    ad = ob.animation_data
    if ad is None or ad.action is None:
        return []
    action = ad.action
    fcurves = None
    try:
        from bpy_extras import anim_utils

        slot = getattr(ad, "action_slot", None)
        if slot is not None and hasattr(anim_utils, "action_get_channelbag_for_slot"):
            bag = anim_utils.action_get_channelbag_for_slot(action, slot)
            fcurves = bag.fcurves if bag is not None else []
    except ImportError:
        pass
    if fcurves is None:
        fcurves = getattr(action, "fcurves", [])
    out = []
    for fc in fcurves:
        for part in PARTS:
            if fc.data_path == f"imface.{part}":
                out.append((part, fc.array_index, fc))
    return out


def codes_at_frames(ob, frames) -> tuple[list, dict[str, np.ndarray]] | None:
    """Stacked codes of the face at integer frames, from its F-curves (no frame_set needed)."""
    paths = _animated_paths(ob)
    if not paths:
        return None
    static = faces.coefficients(ob)
    rows = {p: [] for p in PARTS}
    frames = list(frames)
    for fr in frames:
        c = {p: static[p].copy() for p in PARTS}
        for part, idx, fc in paths:
            if idx < len(c[part]):
                c[part][idx] = fc.evaluate(fr)
        codes = faces.face_codes(ob, coeffs=c)
        for p in PARTS:
            rows[p].append(codes[p])
    return frames, {p: np.stack(rows[p]).astype(np.float32) for p in PARTS}


def _stream_frames(scene, start: int, ahead: int) -> list[int]:
    lo, hi = scene.frame_start, scene.frame_end
    frames, f = [], start
    for _ in range(min(ahead, hi - lo + 1)):
        if f > hi or f < lo:
            f = lo
        frames.append(f)
        f += 1
    return frames


def ensure_stream(ob, scene, *, ahead: int | None = None, force: bool = False):
    """Keep a stream running for the frames ahead of the playhead (cheap when one already covers them)."""
    s = state.get()
    rt = faces.runtime(ob)
    if ahead is None:
        try:
            from .preferences import prefs

            ahead = prefs().stream_ahead
        except RuntimeError:
            ahead = 48
    if ahead <= 0:
        return None
    handle = rt.get("stream")
    frame = scene.frame_current
    if handle is not None and not force and handle.state in ("running", "done"):
        # still valid while its window covers the playhead and the animation did not change
        if frame in handle.keys and rt.get("stream_sig") == _anim_signature(ob):
            if handle.state == "running":
                return handle
            if frame not in handle.frames[-max(1, ahead // 2):]:
                return handle
    frames = _stream_frames(scene, frame, ahead)
    try:
        got = codes_at_frames(ob, frames)
    except SessionError:
        return None
    if got is None:
        return None
    frames, stacked = got
    with s.lock:
        handle = s.client.stream(ob.imface.face_id, frames, stacked, neutral=bool(ob.imface.neutral), focus=frame)
    rt["stream"] = handle
    rt["stream_sig"] = _anim_signature(ob)
    return handle


def _anim_signature(ob):
    """Changes when keyframes, sliders, base codes or the neutral flag change."""
    parts = [ob.imface.base_codes, bool(ob.imface.neutral)]
    for part in PARTS:
        parts.append(tuple(getattr(ob.imface, part)))
    for part, idx, fc in _animated_paths(ob):
        parts.append((part, idx, tuple((tuple(k.co), k.interpolation, tuple(k.handle_left), tuple(k.handle_right))
                                       for k in fc.keyframe_points)))
    return hash(tuple(parts))


def _focus_stream(ob, scene) -> None:
    rt = faces.runtime(ob)
    handle = rt.get("stream")
    s = state.get()
    if handle is not None and handle.state == "running" and s.client is not None:
        with s.lock:
            s.client.focus(handle, scene.frame_current)


# ------------------------------------------------------------------------------------------ timer


def tick(context=None) -> int:
    """One round of the timer: pump the link, apply what arrived, fetch the model's components once.
    Returns the number of faces whose mesh changed."""
    s = state.peek()
    if s is None:
        return 0
    s.pump(blocking_lock=False)
    if s.ready and s.fingerprint and s.pca(fetch=False) is None:
        try:
            s.pca()
        except SessionError:
            pass
    ctx = context or bpy.context
    scene = ctx.scene
    if scene is None:
        return 0
    if s.ready:
        from . import scans

        if scans._FITS:
            try:
                scans.finish_fits(ctx)
            except (SessionError, KeyError, ValueError) as e:
                s.note(f"fit: {e}")
        from . import training

        if training.record():
            training.update_image()
    changed = 0
    for ob in faces.scene_faces(scene):
        rt = faces.runtime(ob)
        if "wanted" not in rt:
            # a face we have not looked at yet (file just loaded, undo): work out what it needs
            try:
                faces.update_face(ob)
            except SessionError:
                pass
        try:
            changed += faces.apply_ready(ob)
        except SessionError as e:
            rt["warning"] = str(e)
    return changed


def _timer():
    try:
        tick()
    except Exception as e:  # noqa: BLE001 - a timer that raises is unregistered by Blender
        print(f"ImFace timer: {e}")
    return TIMER_INTERVAL


def pump_until(predicate, timeout: float = 30.0, context=None) -> bool:
    """Scripts/tests: run tick() until predicate() or timeout (what the timer does in a UI session)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        tick(context)
        if predicate():
            return True
        s = state.peek()
        if s is not None and s.client is not None:
            s._poll(0.005)
        else:
            time.sleep(0.005)
    return predicate()


@persistent
def on_load_post(*args):
    # the faces of the loaded file: forget runtime state, re-decode what is shown (level-triggered)
    faces._RUNTIME.clear()
    scene = bpy.context.scene
    if scene is None:
        return
    faces.duplicate_guard(scene)
    s = state.peek()
    if s is not None and s.ready:
        try:
            update_scene(scene)
        except SessionError:
            pass


@persistent
def on_undo_redo(*args):
    scene = bpy.context.scene
    if scene is None:
        return
    for ob in faces.scene_faces(scene):
        faces.runtime(ob).pop("wanted", None)
    try:
        update_scene(scene)
    except SessionError:
        pass


_HANDLERS = (
    ("frame_change_post", on_frame_change),
    ("render_init", on_render_init),
    ("render_pre", on_render_pre),
    ("render_complete", on_render_done),
    ("render_cancel", on_render_done),
    ("load_post", on_load_post),
    ("undo_post", on_undo_redo),
    ("redo_post", on_undo_redo),
)


def register_handlers() -> None:
    for name, fn in _HANDLERS:
        lst = getattr(bpy.app.handlers, name)
        if fn not in lst:
            lst.append(fn)
    if not bpy.app.timers.is_registered(_timer):
        bpy.app.timers.register(_timer, first_interval=TIMER_INTERVAL, persistent=True)


def unregister_handlers() -> None:
    for name, fn in _HANDLERS:
        lst = getattr(bpy.app.handlers, name)
        while fn in lst:
            lst.remove(fn)
    if bpy.app.timers.is_registered(_timer):
        bpy.app.timers.unregister(_timer)
    _RENDERING["active"] = False
