"""Scan import and fitting: file -> five landmarks -> upload -> fit job (progress, cancel) -> face object.

Landmarks come from, in order: a landmarks JSON file (the `imface fit --landmarks` format), the scan
folder's manifest.json (an entry whose path is this file, or the folder-wide vertex indices), or five
empties the user placed on the imported scan, named "LM.<landmark name>".
The scan is imported with Blender's own importer with its axis conversion switched off, then converted
by `units.scan_points_to_blender` (the one conversion), so the scan, the landmarks and the fitted face
share one frame. The fitted face's mesh data is in the model frame; its object matrix carries
scan_from_model, so it lands on the scan.
"""
from __future__ import annotations

import json
from pathlib import Path

import bpy
import numpy as np

from . import faces, state, units
from .session import SessionError

LANDMARKS = ("right_eye_outer_corner", "left_eye_outer_corner", "nose_tip", "right_mouth_corner",
             "left_mouth_corner")
UNITS_TO_MM = {"mm": 1.0, "cm": 10.0, "m": 1000.0}

# job id -> what to do when it finishes
_FITS: dict[str, dict] = {}


# ------------------------------------------------------------------------------------------ landmarks


def _as_landmarks(obj) -> tuple[np.ndarray | None, list[int] | None]:
    """A landmark mapping ({name: [x, y, z]} or {name: index}) -> (coords (5, 3), None) or (None, indices)."""
    if isinstance(obj, dict):
        for key in ("landmarks_mm", "landmarks", "landmark_vertex_indices"):
            if key in obj and isinstance(obj[key], dict):
                return _as_landmarks(obj[key])
        if all(n in obj for n in LANDMARKS):
            vals = [obj[n] for n in LANDMARKS]
            if all(isinstance(v, int) for v in vals):
                return None, [int(v) for v in vals]
            return np.asarray(vals, dtype=np.float64).reshape(5, 3), None
    raise ValueError(f"the landmarks must name {', '.join(LANDMARKS)}")


def landmarks_from_manifest(scan: Path) -> tuple[np.ndarray | None, list[int] | None, str] | None:
    """(coords, indices, units) from a manifest.json in the scan's folder or up to two levels above."""
    for folder in (scan.parent, scan.parent.parent, scan.parent.parent.parent):
        mf = folder / "manifest.json"
        if not mf.is_file():
            continue
        try:
            m = json.loads(mf.read_text())
        except ValueError:
            continue
        units_name = str(m.get("units", "mm"))
        for entry in m.get("scans", []):
            p = Path(entry.get("path", ""))
            p = p if p.is_absolute() else folder / p
            if p.resolve() == scan.resolve():
                for key in ("landmarks_mm", "landmark_vertex_indices"):
                    if isinstance(entry.get(key), dict):
                        c, i = _as_landmarks(entry[key])
                        return c, i, units_name
                if isinstance(m.get("landmark_vertex_indices"), dict):
                    c, i = _as_landmarks(m["landmark_vertex_indices"])
                    return c, i, units_name
    return None


def landmarks_from_empties(units_to_mm: float) -> np.ndarray | None:
    """Five empties named "LM.<name>" placed on the imported scan -> (5, 3) in the scan's units."""
    pts = []
    for n in LANDMARKS:
        ob = bpy.data.objects.get(f"LM.{n}")
        if ob is None:
            return None
        pts.append(np.array(ob.matrix_world.translation))
    return units.blender_to_model(np.array(pts)) / units_to_mm


# ------------------------------------------------------------------------------------------ import


def import_scan_file(context, path: Path, units_to_mm: float):
    """Import a mesh file for display (OBJ/PLY/STL; None for other types), converted by units.py."""
    suffix = path.suffix.lower()
    before = set(bpy.data.objects)
    kw = dict(filepath=str(path), forward_axis="Y", up_axis="Z", global_scale=1.0)
    if suffix == ".obj":
        bpy.ops.wm.obj_import(**kw)
    elif suffix == ".ply":
        bpy.ops.wm.ply_import(**kw)
    elif suffix == ".stl":
        bpy.ops.wm.stl_import(**kw)
    else:
        return None
    new = [o for o in bpy.data.objects if o not in before and o.type == "MESH"]
    if not new:
        return None
    ob = new[0]
    ob.matrix_world.identity()
    me = ob.data
    co = np.empty(len(me.vertices) * 3, dtype=np.float32)
    me.attributes["position"].data.foreach_get("vector", co)
    me.attributes["position"].data.foreach_set(
        "vector", units.scan_points_to_blender(co.reshape(-1, 3), units_to_mm).ravel())
    me.update()
    ob.name = f"scan_{path.stem}"
    return ob


# ------------------------------------------------------------------------------------------ fitting


def _upload(path: Path) -> str:
    s = state.get()
    data = path.read_bytes()
    began = s.request("upload.begin", {"name": path.name, "size": len(data)})
    uid = began["upload"]
    step = int(began.get("chunk_bytes", 8 * 2**20))
    for off in range(0, len(data), step):
        s.request("upload.chunk", {"upload": uid, "offset": off,
                                   "data": np.frombuffer(data[off:off + step], dtype=np.uint8)},
                  timeout=max(60.0, s.request_timeout))
    s.request("upload.end", {"upload": uid})
    return uid


def start_fit(context, path: str, landmarks_path: str | None, *, import_scan: bool = True, neutral: bool = False,
              seed: int = 0, steps: int | None = None, units_name: str | None = None) -> str:
    """Upload the scan, start the fit job; returns the job id (the face appears when the job is done:
    `finish_fits` from the timer, or `wait_fit`)."""
    s = state.get()
    s.require_ready()
    scan = Path(path)
    if not scan.is_file():
        raise SessionError(f"no scan file at {scan}")
    coords = indices = None
    from_manifest = landmarks_from_manifest(scan)
    if landmarks_path:
        coords, indices = _as_landmarks(json.loads(Path(landmarks_path).read_text()))
    elif from_manifest is not None:
        coords, indices, mf_units = from_manifest
        units_name = units_name or mf_units
    units_name = units_name or "mm"
    units_to_mm = UNITS_TO_MM[units_name]
    scan_ob = None
    if import_scan:
        scan_ob = import_scan_file(context, scan, units_to_mm)
    if coords is None and indices is None:
        coords = landmarks_from_empties(units_to_mm)
        if coords is None:
            raise SessionError("no landmarks: give a landmarks file, a scan folder manifest, or place five empties "
                               "named LM.<landmark> on the scan")
    upload = _upload(scan)
    options = {"units": units_name, "neutral": bool(neutral), "seed": int(seed), "registered": True}
    if steps:
        options["steps"] = int(steps)
    body = {"upload": upload, "options": options}
    if indices is not None:
        options["landmark_indices"] = [int(i) for i in indices]
    else:
        body["landmarks"] = np.asarray(coords, dtype=np.float64).reshape(5, 3)
    reply = s.request("fit", body)
    job = reply["job"]
    _FITS[job] = {"scan": scan_ob.name if scan_ob is not None else "", "path": str(scan), "units_to_mm": units_to_mm,
                  "name": f"{scan.stem}_fit", "seed": seed}
    s.note(f"fit job {job[:8]} started for {scan.name}")
    return job


def job_entry(job: str) -> dict:
    s = state.get()
    return dict(s.client.jobs.get(job, {})) if s.client is not None else {}


def finish_fit(context, job: str, result: dict):
    info = _FITS.pop(job, {})
    codes = faces.codes_from_reply(result)
    nfs = np.asarray(result["normalized_from_scan"], dtype=np.float64).reshape(4, 4)
    matrix = units.scan_from_model_mm(nfs, info.get("units_to_mm", 1.0))
    ob = faces.create_face(context, codes, name=info.get("name", "fit"), neutral=bool(result.get("neutral", False)),
                           source=info.get("path", ""), normalized_from_scan=nfs, matrix_mm=matrix)
    fitted = result.get("fitted")
    if isinstance(fitted, dict) and "vertices" in fitted and "faces" in fitted:
        from . import mesh as meshlib

        me = meshlib.build_mesh(f"{ob.name}_surface", units.model_to_blender(np.asarray(fitted["vertices"])),
                                np.asarray(fitted["faces"]), None)
        surf = bpy.data.objects.new(f"{ob.name}_surface", me)
        surf.matrix_world = ob.matrix_world.copy()
        context.scene.collection.objects.link(surf)
        surf.hide_set(True)
        surf.hide_render = True
    return ob


def finish_fits(context) -> list:
    """Timer side: turn finished fit jobs into faces."""
    out = []
    for job in list(_FITS):
        e = job_entry(job)
        st = e.get("state")
        if st == "done" and e.get("result") is not None:
            out.append(finish_fit(context, job, e["result"]))
        elif st in ("failed", "cancelled"):
            _FITS.pop(job, None)
            state.get().note(f"fit {job[:8]} {st}: {e.get('error', {}).get('message', '')}")
    return out


def wait_fit(context, job: str, timeout: float = 600.0):
    from . import playback

    s = state.get()
    ok = playback.pump_until(lambda: job_entry(job).get("state") in ("done", "failed", "cancelled"), timeout, context)
    e = job_entry(job)
    if not ok:
        raise SessionError(f"the fit did not finish in {timeout:g} s ({e.get('message', '')})")
    if e.get("state") != "done":
        _FITS.pop(job, None)
        raise SessionError(f"the fit {e.get('state')}: {(e.get('error') or {}).get('message', e.get('message', ''))}")
    result = e.get("result")
    if result is None:
        result = s.request("job.status", {"job": job}).get("result")
    if result is None:
        raise SessionError("the fit finished without a result")
    return finish_fit(context, job, result)
