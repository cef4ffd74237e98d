"""Face objects: creation, their codes at any time, and putting the matching decoded mesh in place."""
from __future__ import annotations

import uuid
from typing import Any, Mapping

import bpy
import numpy as np

from . import mesh as meshlib
from . import state, units
from .codes import N_COEFFS, PARTS, CodesError, codes_from_json, codes_to_json
from .session import SessionError

SHOWN = "imface_shown"   # mesh ID property: cache key of the codes the positions show

# Runtime (not saved) per face id: last requested key, its Pending, a warning for the panel.
_RUNTIME: dict[str, dict[str, Any]] = {}
_BASE_MEMO: dict[str, dict] = {}


def is_face(ob) -> bool:
    return ob is not None and ob.type == "MESH" and getattr(ob, "imface", None) is not None and ob.imface.is_face


def scene_faces(scene) -> list:
    return [ob for ob in scene.objects if is_face(ob)]


def runtime(ob) -> dict:
    return _RUNTIME.setdefault(ob.imface.face_id or ob.name, {})


def base_codes(ob) -> dict:
    text = ob.imface.base_codes
    hit = _BASE_MEMO.get(text)
    if hit is None:
        hit = codes_from_json(text)
        if len(_BASE_MEMO) > 256:
            _BASE_MEMO.clear()
        _BASE_MEMO[text] = hit
    return hit


def coefficients(ob, depsgraph=None) -> dict[str, np.ndarray]:
    """The sliders' values: from the evaluated object when a depsgraph is given (animated values in
    frame handlers, including the render's own depsgraph), else from the object itself."""
    src = ob.evaluated_get(depsgraph) if depsgraph is not None else ob
    f = src.imface
    return {part: np.array(getattr(f, part)[:], dtype=np.float64) for part in PARTS}


def face_codes(ob, depsgraph=None, *, coeffs: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
    """codes = base + sum_k c_k std_k component_k (needs the components unless every slider is 0)."""
    base = base_codes(ob)
    c = coefficients(ob, depsgraph) if coeffs is None else coeffs
    if not any(np.any(np.asarray(v) != 0) for v in c.values()):
        return {p: base[p] for p in PARTS}
    pca = state.get().pca(ob.imface.model, fetch=False)
    if pca is None:
        raise SessionError("the model's components are not loaded yet (connect to a backend with this model)")
    return pca.compose(base, c)


def model_warning(ob) -> str:
    s = state.get()
    if not s.ready:
        return ""
    fp = s.fingerprint
    if ob.imface.model and fp and ob.imface.model != fp:
        return (f"made with model {ob.imface.model[:12]}, the backend has {fp[:12]}: the face may differ "
                f"(load the matching model)")
    return ""


# ------------------------------------------------------------------------------------------ applying


def cache_key(codes, neutral: bool) -> str | None:
    s = state.get()
    if s.client is None:
        return None
    return s.client.cache_key(codes, neutral=neutral)


def apply_vertices(ob, vertices_mm: np.ndarray, key: str) -> None:
    me = ob.data
    if len(vertices_mm) != len(me.vertices):
        raise SessionError(f"the backend sent {len(vertices_mm)} vertices, the face mesh has {len(me.vertices)} "
                           f"(a different model template)")
    buf = runtime(ob).get("buffer")
    if buf is None or buf.shape != (len(vertices_mm), 3):
        buf = runtime(ob)["buffer"] = np.empty((len(vertices_mm), 3), dtype=np.float32)
    units.model_to_blender(vertices_mm, out=buf)
    meshlib.write_positions(me, buf)
    me[SHOWN] = key
    runtime(ob).pop("warning", None)


def shown_key(ob) -> str:
    return str(ob.data.get(SHOWN, ""))


def update_face(ob, depsgraph=None, *, wait: bool = False, timeout: float | None = None) -> str:
    """Bring the mesh to the face's current codes. Returns "shown" (already), "applied" (from the cache
    or, with wait=True, from the backend), "pending" (asked; a later pump applies it), "offline"."""
    s = state.get()
    rt = runtime(ob)
    try:
        codes = face_codes(ob, depsgraph)
    except (SessionError, CodesError) as e:
        rt["warning"] = str(e)
        return "offline"
    neutral = bool(ob.imface.neutral)
    key = cache_key(codes, neutral)
    if key is None:
        rt["warning"] = "no backend connected"
        return "offline"
    rt["wanted"] = key
    if shown_key(ob) == key:
        return "shown"
    hit = s.client.cache.get(key)
    if hit is not None:
        apply_vertices(ob, hit, key)
        return "applied"
    if not s.ready and not wait:
        rt["warning"] = f"backend {s.status()}"
        return "offline"
    pending = rt.get("pending")
    if not wait and _stream_covers(rt, key, s):
        return "pending"      # the running stream brings it (the frame handler moved its focus here)
    if pending is None or rt.get("pending_key") != key or (pending.done() and not pending.ok):
        with s.lock:
            pending = s.client.decode(ob.imface.face_id, codes, neutral=neutral)
        rt["pending"], rt["pending_key"] = pending, key
    if pending.done() and pending.ok:
        apply_vertices(ob, pending.result["vertices"], key)
        return "applied"
    if not wait:
        return "pending"
    body = s.wait(pending, timeout)
    apply_vertices(ob, body["vertices"], key)
    rt.pop("warning", None)
    return "applied"


def _stream_covers(rt: dict, key: str, s) -> bool:
    handle = rt.get("stream")
    return (handle is not None and handle.state == "running" and s.ready
            and key in handle.keys.values())


def apply_ready(ob) -> bool:
    """Timer side: if the mesh is not showing what the face wants and the cache now has it, apply it."""
    s = state.get()
    rt = runtime(ob)
    key = rt.get("wanted")
    if not key or s.client is None or shown_key(ob) == key:
        return False
    hit = s.client.cache.get(key, touch=False)
    if hit is None:
        p = rt.get("pending")
        if p is not None and p.done() and not p.ok and rt.get("pending_key") == key:
            rt["warning"] = f"decode failed: {p.error}"
        if s.ready and (p is None or rt.get("pending_key") != key or (p.done() and not p.ok)) \
                and not _stream_covers(rt, key, s):
            # nothing in flight for what the face wants (e.g. the backend was away): ask again
            update_face(ob)
        return False
    apply_vertices(ob, hit, key)
    rt.pop("warning", None)
    return True


# ------------------------------------------------------------------------------------------ creating


def _first_row(a) -> np.ndarray:
    arr = np.asarray(a, dtype=np.float32)
    return arr.reshape(-1, arr.shape[-1])[0] if arr.ndim > 1 else arr.reshape(-1)


def codes_from_reply(body: Mapping[str, Any]) -> dict[str, np.ndarray]:
    src = body.get("codes", body)
    if isinstance(src, list):
        src = src[0]
    return {p: _first_row(src[p]) for p in PARTS}


def new_face_id() -> str:
    return uuid.uuid4().hex


def create_face(context, codes: Mapping[str, Any], *, name: str = "ImFace", neutral: bool = False,
                source: str = "", normalized_from_scan=None, matrix_mm=None, timeout: float | None = None):
    """A new face object showing `codes` (decoded now, blocking): template topology, UVs, base codes
    stored on the object, sliders at 0. `matrix_mm` (4x4 on model millimetres) places it, e.g. on the
    scan it was fitted to."""
    s = state.get()
    s.require_ready()
    fp = s.fingerprint
    s.pca(fp)                             # the sliders need the components: fetched once per model
    codes = {p: np.ascontiguousarray(codes[p], dtype=np.float32).reshape(-1) for p in PARTS}
    topo = s.topology(fp)
    with s.lock:
        face_id = new_face_id()
        p = s.client.decode(face_id, codes, neutral=neutral, with_topology=topo is None)
    body = s.wait(p, timeout)
    if topo is None:
        if "faces" not in body and not s.client.topology:
            raise SessionError("the backend sent no template topology")
        topo = s.remember_topology(fp, body if "faces" in body else s.client.topology)
    verts_mm = np.asarray(body["vertices"], dtype=np.float32)
    uvs = topo.get("uvs")
    if uvs is None:
        uvs = meshlib.template_uvs(verts_mm)
    verts_bl = units.model_to_blender(verts_mm)
    me = meshlib.build_mesh(name, verts_bl, topo["faces"], uvs)
    ob = bpy.data.objects.new(name, me)
    context.scene.collection.objects.link(ob) if context.collection is None else context.collection.objects.link(ob)
    f = ob.imface
    f.is_face = True
    f.face_id = face_id
    f.model = fp
    f.base_codes = codes_to_json(codes, model=fp, neutral=neutral, normalized_from_scan=normalized_from_scan,
                                 source=source)
    f.n_vertices = len(verts_mm)
    f["neutral"] = bool(neutral)    # raw write: no update callback before the mesh exists
    if matrix_mm is not None:
        from mathutils import Matrix

        ob.matrix_world = Matrix(units.matrix_to_blender(matrix_mm).tolist())
    me[SHOWN] = s.client.cache_key(codes, neutral=neutral)
    return ob


def set_base(ob, codes: Mapping[str, Any], *, keep_sliders: bool = False, neutral: bool | None = None,
             source: str | None = None) -> None:
    """Replace the face's base codes (expression/detail transfer, "apply sliders to base")."""
    old = base_codes(ob)
    ob.imface.base_codes = codes_to_json(
        {p: codes[p] for p in PARTS}, model=ob.imface.model or old["model"],
        neutral=ob.imface.neutral if neutral is None else neutral,
        normalized_from_scan=old["normalized_from_scan"], source=old["source"] if source is None else source)
    if neutral is not None:
        ob.imface["neutral"] = bool(neutral)
    if not keep_sliders:
        reset_sliders(ob)


def reset_sliders(ob, parts=PARTS) -> None:
    for part in parts:
        setattr(ob.imface, part, (0.0,) * N_COEFFS[part])


def duplicate_guard(scene) -> None:
    """Objects duplicated with Shift+D share a face id (one decoder state on the backend): give copies
    their own id so warm starts stay per face."""
    seen = set()
    for ob in scene_faces(scene):
        if ob.imface.face_id in seen or not ob.imface.face_id:
            ob.imface.face_id = new_face_id()
        seen.add(ob.imface.face_id)
