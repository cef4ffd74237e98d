"""Template-topology meshes: built once per face, then only vertex positions change (bulk writes)."""
from __future__ import annotations

import bpy
import numpy as np


def build_mesh(name: str, vertices_bl: np.ndarray, faces: np.ndarray, uvs: np.ndarray | None) -> bpy.types.Mesh:
    """A mesh with the template's triangles and per-vertex UVs (as a loop UV layer).

    vertices_bl: (V, 3) Blender metres; faces: (F, 3) vertex indices; uvs: (V, 2) or None."""
    v = np.ascontiguousarray(vertices_bl, dtype=np.float32).reshape(-1, 3)
    f = np.ascontiguousarray(faces, dtype=np.int32).reshape(-1, 3)
    if f.size and (f.min() < 0 or f.max() >= len(v)):
        raise ValueError("triangle indices out of range")
    me = bpy.data.meshes.new(name)
    me.vertices.add(len(v))
    me.attributes["position"].data.foreach_set("vector", v.ravel())
    me.loops.add(f.size)
    me.loops.foreach_set("vertex_index", f.ravel())
    me.polygons.add(len(f))
    me.polygons.foreach_set("loop_start", np.arange(0, f.size, 3, dtype=np.int32))
    if uvs is not None:
        uv = np.ascontiguousarray(uvs, dtype=np.float32).reshape(-1, 2)
        if len(uv) != len(v):
            raise ValueError(f"{len(uv)} UVs for {len(v)} vertices")
        layer = me.uv_layers.new(name="UVMap")
        layer.data.foreach_set("uv", uv[f.ravel()].ravel())
    me.update()
    me.polygons.foreach_set("use_smooth", np.ones(len(f), dtype=bool))
    me.update()
    return me


def template_uvs(vertices_mm: np.ndarray) -> np.ndarray:
    """Fallback UV layout when the backend sends none: a front projection of the template face, the
    same for every identity and expression because it is computed once from the template vertices."""
    v = np.asarray(vertices_mm, dtype=np.float64)
    lo = v[:, :2].min(0)
    span = max(float((v[:, :2].max(0) - lo).max()), 1e-9)
    return ((v[:, :2] - lo) / span).astype(np.float32)


def write_positions(mesh: bpy.types.Mesh, vertices_bl: np.ndarray) -> None:
    """One bulk write of float32 positions (no conversion inside Blender), then a redraw tag."""
    v = vertices_bl if (vertices_bl.dtype == np.float32 and vertices_bl.flags.c_contiguous) else \
        np.ascontiguousarray(vertices_bl, dtype=np.float32)
    mesh.attributes["position"].data.foreach_set("vector", v.reshape(-1))
    mesh.update()


def read_positions(mesh: bpy.types.Mesh) -> np.ndarray:
    out = np.empty(len(mesh.vertices) * 3, dtype=np.float32)
    mesh.attributes["position"].data.foreach_get("vector", out)
    return out.reshape(-1, 3)


def read_evaluated_positions(obj: bpy.types.Object, depsgraph=None) -> np.ndarray:
    """Vertex positions after shape keys/modifiers (what a render sees), Blender metres, object space."""
    depsgraph = depsgraph or bpy.context.evaluated_depsgraph_get()
    ev = obj.evaluated_get(depsgraph)
    me = ev.to_mesh()
    try:
        out = np.empty(len(me.vertices) * 3, dtype=np.float32)
        me.vertices.foreach_get("co", out)
    finally:
        ev.to_mesh_clear()
    return out.reshape(-1, 3)
