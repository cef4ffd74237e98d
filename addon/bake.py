"""Bakes that free a face from the backend: animation -> shape keys, expression components -> a rig."""
from __future__ import annotations

import json
import time
from typing import Callable, Mapping

import bpy
import numpy as np

from . import faces, playback, state, units
from .codes import PARTS
from .session import SessionError


def fcurves_of(id_data) -> list:
    """The F-curves of an ID's action (Blender 4.2 `action.fcurves`; 4.4+ layered actions: the channelbag
    of the ID's action slot)."""
    ad = id_data.animation_data
    if ad is None or ad.action is None:
        return []
    action = ad.action
    try:
        from bpy_extras import anim_utils

        slot = getattr(ad, "action_slot", None)
        if slot is not None and hasattr(anim_utils, "action_get_channelbag_for_slot"):
            bag = anim_utils.action_get_channelbag_for_slot(action, slot)
            return list(bag.fcurves) if bag is not None else []
    except ImportError:
        pass
    return list(getattr(action, "fcurves", []))


def keyframe_frames(ob) -> list[int]:
    frames = set()
    for _part, _idx, fc in playback._animated_paths(ob):
        frames.update(int(round(k.co[0])) for k in fc.keyframe_points)
    return sorted(frames)


def decode_frames(ob, frames: list[int], stacked: Mapping[str, np.ndarray], *, timeout: float | None = None,
                  progress: Callable[[float], None] | None = None) -> dict[int, np.ndarray]:
    """Vertices (mm) of the face at many frames: one stream request, waiting for every frame."""
    s = state.get()
    s.require_ready()
    neutral = bool(ob.imface.neutral)
    keys = {}
    for i, f in enumerate(frames):
        keys[f] = s.client.cache_key({p: stacked[p][i] for p in PARTS}, neutral=neutral)
    got: dict[int, np.ndarray] = {}
    timeout = max(s.request_timeout, 2.0 * len(frames)) if timeout is None else timeout
    deadline = time.monotonic() + timeout
    with s.lock:
        s.client.stream(ob.imface.face_id, frames, stacked, neutral=neutral, focus=frames[0] if frames else None)
        while True:
            for f in frames:
                if f not in got:
                    v = s.client.cache.get(keys[f], touch=False)
                    if v is not None:
                        got[f] = np.array(v, dtype=np.float32)
            if progress is not None and frames:
                progress(len(got) / len(frames))
            if len(got) == len(frames):
                return got
            if time.monotonic() > deadline:
                raise SessionError(f"the backend decoded {len(got)} of {len(frames)} frames in {timeout:g} s")
            if s.client.state == "gone":
                raise SessionError(f"the backend is gone: {s.reason}")
            s._pump()
            s._poll(0.02)


def _set_linear(id_data) -> None:
    for fc in fcurves_of(id_data):
        for k in fc.keyframe_points:
            k.interpolation = "LINEAR"


def _copy_object(context, ob, name: str):
    me = ob.data.copy()
    me.name = name
    for k in list(me.keys()):
        if k.startswith("imface"):
            del me[k]
    new = bpy.data.objects.new(name, me)
    new.matrix_world = ob.matrix_world.copy()
    for coll in ob.users_collection:
        coll.objects.link(new)
    if not new.users_collection:
        context.scene.collection.objects.link(new)
    return new


def bake_shape_keys(context, ob, *, per_keyframe: bool = False, hide_source: bool = True,
                    progress: Callable[[float], None] | None = None):
    """A copy of the face (same topology, UVs, materials) whose shape keys reproduce the animation:
    one key per frame of the scene range (or per keyframe), each keyed 0 -> 1 -> 0 with linear
    interpolation, so every baked frame shows exactly its decoded mesh; no backend needed afterwards.
    The coefficients each key was decoded from are stored in the copy's "imface_bake" property."""
    scene = context.scene
    frames = keyframe_frames(ob) if per_keyframe else list(range(scene.frame_start, scene.frame_end + 1))
    if not frames:
        frames = [scene.frame_current]
    got = playback.codes_at_frames(ob, frames)
    if got is None:   # not animated: the current codes at every frame
        codes = faces.face_codes(ob)
        got = frames, {p: np.repeat(codes[p][None], len(frames), 0) for p in PARTS}
    frames, stacked = got
    verts = decode_frames(ob, frames, stacked, progress=progress)
    out = _copy_object(context, ob, f"{ob.name}_baked")
    basis = out.shape_key_add(name="Basis", from_mix=False)
    buf = np.empty((len(out.data.vertices), 3), dtype=np.float32)
    basis.points.foreach_set("co", units.model_to_blender(verts[frames[0]], out=buf).ravel())
    driving = {}
    paths = playback._animated_paths(ob)
    static = faces.coefficients(ob)
    for i, f in enumerate(frames):
        kb = out.shape_key_add(name=f"frame_{f:04d}", from_mix=False)
        kb.points.foreach_set("co", units.model_to_blender(verts[f], out=buf).ravel())
        kb.slider_min, kb.slider_max = 0.0, 1.0
        prev_f = frames[i - 1] if i > 0 else None
        next_f = frames[i + 1] if i + 1 < len(frames) else None
        for fr, val in ((prev_f, 0.0), (f, 1.0), (next_f, 0.0)):
            if fr is not None:
                kb.value = val
                kb.keyframe_insert("value", frame=fr)
        c = {p: static[p].copy() for p in PARTS}
        for part, idx, fc in paths:
            if idx < len(c[part]):
                c[part][idx] = fc.evaluate(f)
        driving[kb.name] = {"frame": f, **{p: [round(float(x), 6) for x in c[p]] for p in PARTS}}
    _set_linear(out.data.shape_keys)
    out["imface_bake"] = json.dumps({"source": ob.name, "mode": "keyframe" if per_keyframe else "frame",
                                     "keys": driving})
    if hide_source:
        ob.hide_render = True
        ob.hide_set(True)
    return out


# ------------------------------------------------------------------------------------------ rig


def _decode_wait(face_id: str, codes, neutral: bool):
    s = state.get()
    with s.lock:
        p = s.client.decode(face_id, codes, neutral=neutral)
    return np.asarray(s.wait(p)["vertices"], dtype=np.float32)


def training_expressions(max_n: int = 64) -> list[np.ndarray]:
    """The expression codes of the model's training scans (codes request, kind "scan")."""
    s = state.get()
    n = int(s.model_info.get("n_scans") or 0)
    out = []
    for i in range(min(n, max_n)):
        body = s.request("codes", {"kind": "scan", "index": i})
        out.append(faces.codes_from_reply(body)["expression"])
    return out


def bake_rig(context, ob, *, n_components: int | None = None, step: float = 1.0):
    """A copy of the face with one shape key per expression component (decoded at coefficient `step`)
    whose values are driven by the face's expression sliders (value = slider / step), so the copy
    animates in real time without the backend, plus the linear rig's error against the neural decode
    over the training expressions, in mm."""
    s = state.get()
    s.require_ready()
    pca = s.pca(ob.imface.model)
    if pca is None:
        raise SessionError("the model's components are not available")
    k_max = pca.n_components("expression")
    k = min(n_components or k_max, k_max)
    coeffs = faces.coefficients(ob)
    coeffs0 = dict(coeffs)
    coeffs0["expression"] = np.zeros_like(coeffs["expression"])
    codes0 = faces.face_codes(ob, coeffs=coeffs0)
    neutral = False
    rig_face = f"{ob.imface.face_id}-rig"
    basis_mm = _decode_wait(rig_face, codes0, neutral)
    comp = pca.parts["expression"]
    keys_mm = []
    for i in range(k):
        c = dict(codes0)
        c["expression"] = (codes0["expression"].astype(np.float64) + step * comp.scaled[i]).astype(np.float32)
        keys_mm.append(_decode_wait(rig_face, c, neutral))
    rig = _copy_object(context, ob, f"{ob.name}_rig")
    buf = np.empty((len(rig.data.vertices), 3), dtype=np.float32)
    rig.shape_key_add(name="Basis", from_mix=False).points.foreach_set(
        "co", units.model_to_blender(basis_mm, out=buf).ravel())
    for i in range(k):
        kb = rig.shape_key_add(name=f"expression_{i + 1}", from_mix=False)
        kb.points.foreach_set("co", units.model_to_blender(keys_mm[i], out=buf).ravel())
        kb.slider_min, kb.slider_max = -10.0, 10.0
        fc = kb.driver_add("value")
        drv = fc.driver
        drv.type = "SCRIPTED"
        var = drv.variables.new()
        var.name = "c"
        var.type = "SINGLE_PROP"
        var.targets[0].id_type = "OBJECT"
        var.targets[0].id = ob
        var.targets[0].data_path = f"imface.expression[{i}]"
        drv.expression = f"c / {step!r}"
    # error of the linear rig over the training expressions
    errs_mean, errs_max = [], []
    exps = training_expressions()
    deltas = np.stack([km.astype(np.float64) - basis_mm for km in keys_mm]) if k else np.zeros((0,) + basis_mm.shape)
    for e in exps:
        c = dict(codes0)
        c["expression"] = np.asarray(e, dtype=np.float32)
        neural = _decode_wait(rig_face, c, neutral).astype(np.float64)
        d = np.asarray(e, dtype=np.float64) - codes0["expression"].astype(np.float64)
        coef = (comp.components[:k].astype(np.float64) @ d) / comp.std[:k].astype(np.float64)
        linear = basis_mm + np.tensordot(coef / step, deltas, axes=1)
        dist = np.linalg.norm(neural - linear, axis=1)
        errs_mean.append(float(dist.mean()))
        errs_max.append(float(dist.max()))
    report = {"n_keys": k, "n_expressions": len(exps), "step": step,
              "mean_mm": float(np.mean(errs_mean)) if errs_mean else float("nan"),
              "max_mm": float(np.max(errs_max)) if errs_max else float("nan"),
              "per_expression_mean_mm": errs_mean}
    rig["imface_rig"] = json.dumps({"source": ob.name, **report})
    return rig, report
