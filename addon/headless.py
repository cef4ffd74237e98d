"""The Blender half of the product's main job, headless (bpy as a module or `blender -b`).

`main_job(out_dir)` needs a connected backend (`bpy.ops.imface.connect(...)`): it creates a face,
keyframes a short expression animation on the first expression components, plays it through (frame
handler + the timer's work, waiting for every frame's own mesh), bakes it to shape keys, renders a few
frames with Workbench and writes a contact sheet PNG. It returns what it wrote and the mouth-region
difference between the contact sheet's frames (a number a test can check: the expression changes).

Timers never fire in module mode, so the playback loop calls `playback.tick()` itself.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import bpy
import numpy as np

from . import faces, playback, state, units
from .session import SessionError

# Model-frame points (mm) bounding the mouth region of the template face (nose tip at z = 40 mm).
MOUTH_BOX_MM = np.array([[x, y, z] for x in (-32.0, 32.0) for y in (-55.0, -22.0) for z in (0.0, 35.0)])


def setup_render(scene, *, resolution=(320, 320), distance_m: float = 0.36):
    """Workbench, a camera in front of the face (faces look along -Y in Blender), studio light."""
    cam = bpy.data.objects.get("ImFace Camera")
    if cam is None:
        cam = bpy.data.objects.new("ImFace Camera", bpy.data.cameras.new("ImFace Camera"))
        scene.collection.objects.link(cam)
    cam.location = (0.0, -distance_m, 0.0)
    cam.rotation_euler = (np.pi / 2, 0.0, 0.0)
    cam.data.lens = 50
    scene.camera = cam
    scene.render.engine = "BLENDER_WORKBENCH"
    scene.render.resolution_x, scene.render.resolution_y = resolution
    scene.render.resolution_percentage = 100
    scene.render.image_settings.file_format = "PNG"
    scene.render.film_transparent = False
    shading = scene.display.shading
    shading.light = "STUDIO"
    shading.color_type = "SINGLE"
    shading.single_color = (0.8, 0.65, 0.55)
    shading.show_cavity = True
    return cam


def mouth_box_px(scene, ob) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) pixel box (top-left origin) of the mouth region of `ob` in the camera image."""
    from bpy_extras.object_utils import world_to_camera_view
    from mathutils import Vector

    pts = units.model_to_blender(MOUTH_BOX_MM).astype(np.float64)
    res_x, res_y = scene.render.resolution_x, scene.render.resolution_y
    xs, ys = [], []
    for p in pts:
        co = world_to_camera_view(scene, scene.camera, ob.matrix_world @ Vector(p))
        xs.append(co.x * res_x)
        ys.append((1.0 - co.y) * res_y)
    x0, x1 = int(max(0, min(xs))), int(min(res_x, max(xs)))
    y0, y1 = int(max(0, min(ys))), int(min(res_y, max(ys)))
    return x0, y0, x1, y1


def _load_rgb(path: str) -> np.ndarray:
    img = bpy.data.images.load(path, check_existing=False)
    try:
        w, h = img.size
        px = np.empty(w * h * 4, dtype=np.float32)
        img.pixels.foreach_get(px)
    finally:
        bpy.data.images.remove(img)
    return px.reshape(h, w, 4)[::-1, :, :3]   # Blender stores rows bottom-up


def write_png(path: str, rgb: np.ndarray) -> None:
    h, w = rgb.shape[:2]
    img = bpy.data.images.new("imface_sheet", w, h, alpha=False)
    try:
        rgba = np.ones((h, w, 4), dtype=np.float32)
        rgba[..., :3] = rgb[::-1]
        img.pixels.foreach_set(rgba.ravel())
        img.filepath_raw = path
        img.file_format = "PNG"
        img.save()
    finally:
        bpy.data.images.remove(img)


def contact_sheet(paths: list[str], columns: int = 4, pad: int = 4) -> np.ndarray:
    tiles = [_load_rgb(p) for p in paths]
    h, w = tiles[0].shape[:2]
    rows = (len(tiles) + columns - 1) // columns
    sheet = np.ones((rows * (h + pad) + pad, columns * (w + pad) + pad, 3), dtype=np.float32)
    for i, t in enumerate(tiles):
        r, c = divmod(i, columns)
        sheet[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = t
    return sheet


def keyframe_expressions(ob, scene, *, length: int = 24, amplitude: float = 2.0) -> list[int]:
    """Neutral -> component 1 -> component 2 (with 1 reversed) -> neutral, over `length` frames."""
    s = state.get()
    pca = s.pca(ob.imface.model)
    k = pca.n_components("expression") if pca else 0
    if k == 0:
        raise SessionError("the model has no expression components")
    f = ob.imface
    keys = [1, 1 + length // 3, 1 + 2 * length // 3, length]
    poses = [{}, {0: amplitude}, {0: -amplitude / 2, min(1, k - 1): amplitude}, {}]
    for frame, pose in zip(keys, poses):
        for i in range(min(k, len(f.expression))):
            f.expression[i] = pose.get(i, 0.0)
            ob.keyframe_insert("imface.expression", index=i, frame=frame)
    scene.frame_start, scene.frame_end = 1, length
    return keys


def play(scene, *, fps: float | None = None, wait: bool = True) -> dict:
    """Play the scene range once: frame_set + the timer's work between frames; with wait=True each frame
    waits for its own mesh (headless: nobody is watching, exactness matters)."""
    fps = fps or scene.render.fps / scene.render.fps_base
    shown = stale = 0
    t0 = time.perf_counter()
    for fr in range(scene.frame_start, scene.frame_end + 1):
        scene.frame_set(fr)
        if wait:
            playback.update_scene(scene, bpy.context.evaluated_depsgraph_get(), wait=True)
        end = time.perf_counter() + 1.0 / fps
        while time.perf_counter() < end:
            playback.tick()
            time.sleep(0.001)
        if all(faces.runtime(o).get("wanted") == faces.shown_key(o) for o in faces.scene_faces(scene)):
            shown += 1
        else:
            stale += 1
    return {"frames": shown + stale, "own_mesh": shown, "stale": stale, "seconds": time.perf_counter() - t0}


def main_job(out_dir: str | os.PathLike, *, length: int = 24, render_frames: tuple[int, ...] | None = None,
             resolution=(320, 320), columns: int = 4) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ctx = bpy.context
    scene = ctx.scene
    s = state.get()
    s.require_ready()
    bpy.ops.imface.create_face(mode="MEAN", name="ImFace")
    ob = bpy.data.objects["ImFace"]
    keys = keyframe_expressions(ob, scene, length=length)
    played = play(scene)
    bpy.context.view_layer.objects.active = ob
    bpy.ops.imface.bake_shape_keys(mode="FRAME", hide_source=True)
    baked = bpy.data.objects[f"{ob.name}_baked"]
    setup_render(scene, resolution=resolution)
    frames = list(render_frames or sorted(set(keys) | {1 + length // 6, 1 + length // 2, 1 + 5 * length // 6}))
    paths = []
    for fr in frames:
        scene.frame_set(fr)
        scene.render.filepath = str(out / f"frame_{fr:04d}.png")
        bpy.ops.render.render(write_still=True)
        paths.append(scene.render.filepath)
    sheet = contact_sheet(paths, columns=columns)
    sheet_path = str(out / "contact_sheet.png")
    write_png(sheet_path, sheet)
    x0, y0, x1, y1 = mouth_box_px(scene, baked)
    crops = [_load_rgb(p)[y0:y1, x0:x1] for p in paths]
    diffs = [float(np.abs(crops[i] - crops[0]).mean()) for i in range(len(crops))]
    blend = str(out / "scene.blend")
    bpy.ops.wm.save_as_mainfile(filepath=blend, copy=True)
    return {"frames": frames, "renders": paths, "contact_sheet": sheet_path, "blend": blend, "played": played,
            "baked": baked.name, "keys": len(baked.data.shape_keys.key_blocks) - 1, "mouth_box": [x0, y0, x1, y1],
            "mouth_diff_vs_first": diffs}
