"""Blender-side checks with a real backend (launched by the add-on from the preferences).

ARGS: python (backend interpreter), model (model.safetensors), scan (a .ply of the model's scan folder),
      steps (list of step names to run; default all), out (folder for images and the .blend).
RESULT gets one entry per step; the pytest side asserts on them.
"""
import os
import signal
import subprocess
import time

import numpy as np

units = addon_module("units")
faces = addon_module("faces")
state = addon_module("state")
playback = addon_module("playback")
panel = addon_module("panel")
meshlib = addon_module("mesh")
client_mod = addon_module("link.client")

R = RESULT
OUT = ARGS["out"]
os.makedirs(OUT, exist_ok=True)
STEPS = ARGS.get("steps") or ["connect", "slider", "undo", "keyframes", "playback", "render", "bake", "rig", "blend",
                              "fit", "transfer", "main_job", "restart", "train"]
scene = bpy.context.scene
T0 = time.perf_counter()


def timed(name):
    R.setdefault("seconds", {})[name] = round(time.perf_counter() - T0, 2)


def verts_mm(ob):
    """The face's mesh positions back in model-frame millimetres."""
    return units.blender_to_model(meshlib.read_positions(ob.data))


def world_mm(ob):
    """Evaluated (shape keys applied) positions, in the model frame (mm), object space."""
    return units.blender_to_model(meshlib.read_evaluated_positions(ob))


_REF = {}


def reference_decode(codes, neutral=False):
    """The backend's decode of these codes through a separate blocking client (its own face id)."""
    if "client" not in _REF:
        _REF["client"] = client_mod.Client(state.get().connection_file, name="test-reference", timeout=30.0)
        _REF["client"].connect(timeout=60)
    body = _REF["client"].decode("test-reference", codes, neutral=neutral, timeout=60)
    return np.asarray(body["vertices"], dtype=np.float64)


def settle(ob, timeout=60.0):
    ok = playback.pump_until(lambda: faces.runtime(ob).get("wanted") == faces.shown_key(ob), timeout)
    assert ok, f"the face did not update in {timeout} s: {faces.runtime(ob).get('warning')} / {panel.status_lines()}"


s = None
ob = None
try:
    # ------------------------------------------------------------------ connect (launch a local backend)
    prefs = bpy.context.preferences.addons[MODULE].preferences
    prefs.mode = "LAUNCH"
    prefs.python = ARGS["python"]
    prefs.model_path = ARGS["model"]
    prefs.threads = 1
    prefs.extra_args = "--template-resolution {} --workers 1".format(ARGS.get("template_resolution", 100))
    if ARGS.get("roots"):
        prefs.extra_args += " --roots " + " ".join(ARGS["roots"])
    prefs.start_timeout = 300
    prefs.request_timeout = 120
    prefs.stream_ahead = 30
    t = time.perf_counter()
    ret = bpy.ops.imface.connect(wait=True)
    s = state.get()
    R["connect"] = {"ret": sorted(ret), "seconds": time.perf_counter() - t, "status": panel.status_lines(),
                    "fingerprint": s.fingerprint, "sizes": s.code_sizes,
                    "pca_k": {p: s.pca().n_components(p) for p in ("identity", "expression", "detail")},
                    "log": s.log_path and str(s.log_path)}
    timed("connect")

    # ------------------------------------------------------------------ create a face, edit a slider
    ret = bpy.ops.imface.create_face(mode="MEAN", name="Face")
    ob = bpy.data.objects["Face"]
    R["create"] = {"ret": sorted(ret), "n_vertices": len(ob.data.vertices), "n_polygons": len(ob.data.polygons),
                   "uv_layers": len(ob.data.uv_layers), "base": faces.base_codes(ob)["source"]}
    base_json = ob.imface.base_codes
    mean_mm = verts_mm(ob)
    R["create"]["mean_vs_reference_mm"] = float(np.abs(
        mean_mm - reference_decode({p: faces.base_codes(ob)[p] for p in ("identity", "expression", "detail")})).max())
    if "slider" in STEPS:
        ob.imface.expression[0] = 1.5          # the slider edit (update callback: async request)
        ob.imface.identity[0] = -0.7
        settle(ob)
        codes = faces.face_codes(ob)
        ref = reference_decode(codes)
        got = verts_mm(ob)
        R["slider"] = {"max_err_mm": float(np.abs(got - ref).max()),
                       "moved_mm": float(np.abs(got - mean_mm).max()),
                       "codes": {p: codes[p].tolist() for p in codes},
                       "coeffs": {"identity": [-0.7], "expression": [1.5]},
                       "base": {p: faces.base_codes(ob)[p].tolist() for p in ("identity", "expression", "detail")}}
        timed("slider")

    # ------------------------------------------------------------------ undo / redo bring back the matching mesh
    if "undo" in STEPS:
        bpy.ops.ed.undo_push(message="before")
        codes_before = faces.face_codes(ob)
        verts_before = verts_mm(ob)
        ob.imface.expression[0] = -1.5
        settle(ob)
        bpy.ops.ed.undo_push(message="edit")
        codes_after = faces.face_codes(ob)
        verts_after = verts_mm(ob)
        bpy.ops.ed.undo()
        ob = bpy.data.objects["Face"]          # undo reloads the data: fetch it again
        settle(ob)
        undo_err = float(np.abs(verts_mm(ob) - verts_before).max())
        undo_codes = bool(np.allclose(faces.face_codes(ob)["expression"], codes_before["expression"]))
        bpy.ops.ed.redo()
        ob = bpy.data.objects["Face"]
        scene = bpy.context.scene              # (so is the scene)
        settle(ob)
        R["undo"] = {"undo_err_mm": undo_err, "undo_codes": undo_codes,
                     "redo_err_mm": float(np.abs(verts_mm(ob) - verts_after).max()),
                     "redo_codes": bool(np.allclose(faces.face_codes(ob)["expression"], codes_after["expression"])),
                     "edit_moved_mm": float(np.abs(verts_after - verts_before).max())}
        ob.imface.expression[0] = 1.5
        settle(ob)
        timed("undo")

    # ------------------------------------------------------------------ keyframes: in-between = decode
    if "keyframes" in STEPS:
        ob.imface.identity[0] = 0.0
        ob.imface.expression[0] = -2.0
        ob.keyframe_insert("imface.expression", index=0, frame=1)
        ob.imface.expression[0] = 2.0
        ob.keyframe_insert("imface.expression", index=0, frame=21)
        ob.imface.expression[1] = 0.0
        ob.keyframe_insert("imface.expression", index=1, frame=1)
        ob.imface.expression[1] = 1.0
        ob.keyframe_insert("imface.expression", index=1, frame=21)
        scene.frame_start, scene.frame_end = 1, 21
        kf = {}
        for f in (1, 21, 7):
            scene.frame_set(f)
            settle(ob)
            kf[f] = verts_mm(ob)
        dg = bpy.context.evaluated_depsgraph_get()
        c7 = faces.coefficients(ob, dg)
        codes7 = faces.face_codes(ob, dg)
        ref7 = reference_decode(codes7)
        w = None
        blend = 0.5 * (kf[1] + kf[21])
        # the straight blend with the same weight the coefficients got at frame 7
        a = (c7["expression"][0] + 2.0) / 4.0
        blend = (1 - a) * kf[1] + a * kf[21]
        R["keyframes"] = {"coeff7": c7["expression"][:2].tolist(), "max_err_mm": float(np.abs(kf[7] - ref7).max()),
                          "blend_diff_mm": float(np.abs(kf[7] - blend).max()),
                          "blend_weight": float(a), "end_diff_mm": float(np.abs(kf[1] - kf[21]).max())}
        timed("keyframes")

    # ------------------------------------------------------------------ playback: first pass, after streaming
    if "playback" in STEPS:
        fps = scene.render.fps
        passes = []
        for _ in range(3):
            playback.reset_stats()
            t = time.perf_counter()
            for f in range(scene.frame_start, scene.frame_end + 1):
                scene.frame_set(f)
                # what the timer would do between frames, for one frame's time
                end = time.perf_counter() + 1.0 / fps
                while time.perf_counter() < end:
                    playback.tick()
                    s._poll(0.002)
            st = playback.stats()
            passes.append({**st, "seconds": time.perf_counter() - t})
            # let the stream finish before the next pass (as a second playback would)
            playback.pump_until(lambda: all(
                faces.runtime(o).get("stream") is None or faces.runtime(o)["stream"].state != "running"
                for o in faces.scene_faces(scene)), 120)
        R["playback"] = {"passes": passes, "cache": len(s.client.cache)}
        timed("playback")

    # ------------------------------------------------------------------ render (Workbench)
    if "render" in STEPS:
        cam_data = bpy.data.cameras.new("cam")
        cam = bpy.data.objects.new("cam", cam_data)
        scene.collection.objects.link(cam)
        cam.location = (0.0, -0.45, 0.0)     # in front of the face (it looks along -Y)
        cam.rotation_euler = (np.pi / 2, 0.0, 0.0)
        cam_data.lens = 50
        scene.camera = cam
        light = bpy.data.objects.new("sun", bpy.data.lights.new("sun", "SUN"))
        scene.collection.objects.link(light)
        scene.render.engine = "BLENDER_WORKBENCH"
        scene.render.resolution_x, scene.render.resolution_y = 200, 200
        scene.render.resolution_percentage = 100
        scene.render.image_settings.file_format = "PNG"
        scene.display.shading.light = "STUDIO"
        scene.display.shading.color_type = "SINGLE"
        scene.frame_start, scene.frame_end = 1, 21
        scene.frame_step = 10
        scene.render.filepath = os.path.join(OUT, "anim_")
        s.client.cache.clear()                 # the render must wait for its own decodes
        for o in faces.scene_faces(scene):
            o.data[faces.SHOWN] = ""
        t = time.perf_counter()
        bpy.ops.render.render(animation=True)
        R["render"] = {"seconds": time.perf_counter() - t, "lock_interface": scene.render.use_lock_interface,
                       "files": sorted(f for f in os.listdir(OUT) if f.startswith("anim_"))}
        scene.frame_step = 1
        # frame 11 rendered from a directly decoded mesh (live updates off, mesh set by hand)
        scene.imface.live = False
        scene.frame_set(11)
        dg = bpy.context.evaluated_depsgraph_get()
        direct = reference_decode(faces.face_codes(ob, dg))
        meshlib.write_positions(ob.data, units.model_to_blender(direct))
        scene.render.filepath = os.path.join(OUT, "direct_0011.png")
        bpy.ops.render.render(write_still=True)
        scene.imface.live = True
        timed("render")

    # ------------------------------------------------------------------ bake to shape keys
    if "bake" in STEPS:
        scene.frame_start, scene.frame_end = 1, 21
        ret = bpy.ops.imface.bake_shape_keys(mode="FRAME", hide_source=True)
        baked = bpy.data.objects[ob.name + "_baked"]
        errs = []
        for f in (1, 4, 11, 21):
            scene.frame_set(f)
            dg = bpy.context.evaluated_depsgraph_get()
            ref = reference_decode(faces.face_codes(ob, dg))
            errs.append(float(np.abs(world_mm(baked) - ref).max()))
        # hand-off without the backend: Blender's own exporters on the baked copy
        for o in bpy.data.objects:
            o.select_set(False)
        baked.select_set(True)
        bpy.context.view_layer.objects.active = baked
        exports = {}
        for name, fn in (("abc", lambda p: bpy.ops.wm.alembic_export(filepath=p, selected=True, start=1, end=21)),
                         ("fbx", lambda p: bpy.ops.export_scene.fbx(filepath=p, use_selection=True,
                                                                    bake_anim=True))):
            path = os.path.join(OUT, "baked." + name)
            try:
                fn(path)
                exports[name] = os.path.getsize(path)
            except Exception as e:  # noqa: BLE001
                exports[name] = f"{type(e).__name__}: {e}"
        R["bake"] = {"ret": sorted(ret), "keys": len(baked.data.shape_keys.key_blocks), "max_err_mm": max(errs),
                     "source_hidden": ob.hide_render, "exports": exports}
        ob.hide_render = False
        ob.hide_set(False)
        timed("bake")

    # ------------------------------------------------------------------ rig
    if "rig" in STEPS:
        bpy.context.view_layer.objects.active = ob
        ret = bpy.ops.imface.bake_rig(components=0, step=1.0)
        rig = bpy.data.objects[ob.name + "_rig"]
        import json as _json

        rep = _json.loads(rig["imface_rig"])
        # the driven rig at a slider value reproduces the keyed component exactly at coefficient = step
        scene.imface.live = False
        ob.animation_data_clear()
        for k in range(len(ob.imface.expression)):
            ob.imface.expression[k] = 0.0
        ob.imface.expression[0] = 1.0
        bpy.context.view_layer.update()
        codes = faces.face_codes(ob)
        rig_err = float(np.abs(world_mm(rig) - reference_decode(codes)).max())
        ob.imface.expression[0] = 0.0
        scene.imface.live = True
        R["rig"] = {"ret": sorted(ret), "report": rep, "keys": len(rig.data.shape_keys.key_blocks),
                    "drivers": len(rig.data.shape_keys.animation_data.drivers), "at_step_err_mm": rig_err}
        timed("rig")

    # ------------------------------------------------------------------ .blend save and reopen
    if "blend" in STEPS:
        ob.imface.expression[2] = 0.8
        settle(ob)
        before = verts_mm(ob)
        path = os.path.join(OUT, "face.blend")
        bpy.ops.wm.save_as_mainfile(filepath=path)
        bpy.ops.wm.open_mainfile(filepath=path)
        scene = bpy.context.scene
        ob = bpy.data.objects["Face"]
        # forget everything the session knows about decoded frames, and scramble the mesh: the face must
        # come back from its stored codes alone
        s.client.cache.clear()
        meshlib.write_positions(ob.data, np.zeros((len(ob.data.vertices), 3), np.float32))
        ob.data[faces.SHOWN] = ""
        playback.on_load_post()
        settle(ob)
        R["blend"] = {"max_err_mm": float(np.abs(verts_mm(ob) - before).max()),
                      "base_same": ob.imface.base_codes == base_json}
        timed("blend")

    # ------------------------------------------------------------------ scan import + fit
    if "fit" in STEPS and ARGS.get("scan"):
        scene.imface.fit_seed = 0
        t = time.perf_counter()
        ret = bpy.ops.imface.fit_scan(filepath=ARGS["scan"], wait=True, seed=0)
        fitted = [o for o in bpy.data.objects if o.name.endswith("_fit")][0]
        scan_ob = [o for o in bpy.data.objects if o.name.startswith("scan_")][0]
        from mathutils.kdtree import KDTree

        sv = np.array([scan_ob.matrix_world @ v.co for v in scan_ob.data.vertices])
        kd = KDTree(len(sv))
        for i, p in enumerate(sv):
            kd.insert(p, i)
        kd.balance()
        mw = fitted.matrix_world
        fv = [mw @ v.co for v in fitted.data.vertices]
        d = np.array([kd.find(p)[2] for p in fv])
        base = faces.base_codes(fitted)
        fv_mm = units.blender_to_model(np.array(fv, dtype=np.float64))   # the scan's frame, mm
        R["fit_vertices_scan_mm"] = fv_mm[:: max(1, len(fv_mm) // 3000)].tolist()
        R["fit"] = {"ret": sorted(ret), "seconds": time.perf_counter() - t,
                    "codes": {p: base[p].tolist() for p in ("identity", "expression", "detail")},
                    "neutral": bool(fitted.imface.neutral),
                    "to_scan_median_mm": float(np.median(d) * 1000), "to_scan_p90_mm": float(np.percentile(d, 90) * 1000),
                    "scan_extent_m": (sv.max(0) - sv.min(0)).tolist()}
        timed("fit")

    # ------------------------------------------------------------------ expression transfer
    if "transfer" in STEPS:
        src = ob
        bpy.ops.imface.create_face(mode="RANDOM", seed=5, name="Other")
        other = bpy.data.objects["Other"]
        src.imface.expression[3] = 1.2
        for o in bpy.data.objects:
            o.select_set(False)
        other.select_set(True)
        src.select_set(True)
        bpy.context.view_layer.objects.active = src
        ret = bpy.ops.imface.transfer(part="EXPRESSION")
        settle(other)
        e_src = faces.face_codes(src)["expression"]
        e_dst = faces.face_codes(other)["expression"]
        R["transfer"] = {"ret": sorted(ret), "expression_equal": bool(np.allclose(e_src, e_dst, atol=1e-6)),
                         "identity_kept": bool(np.allclose(faces.face_codes(other)["identity"],
                                                           faces.base_codes(other)["identity"]))}
        timed("transfer")

    # ------------------------------------------------------------------ the main job's Blender half
    if "main_job" in STEPS:
        headless = addon_module("headless")
        for o in list(bpy.data.objects):
            bpy.data.objects.remove(o)
        scene.imface.live = True
        R["main_job"] = headless.main_job(os.path.join(OUT, "main_job"), length=12, resolution=(240, 240))
        ob = bpy.data.objects["ImFace"]
        ob.hide_set(False)
        ob.hide_render = False
        timed("main_job")

    # ------------------------------------------------------------------ kill the backend, restart it
    if "restart" in STEPS:
        pid = s.launched_pid
        cmd, cwd = s.launch_command
        os.kill(pid, signal.SIGKILL)
        t = time.perf_counter()
        playback.pump_until(lambda: s.state == "gone", 30)
        gone_after = time.perf_counter() - t
        lines_gone = panel.status_lines()
        # editing while the backend is away neither raises nor blocks
        t = time.perf_counter()
        ob.imface.expression[4] = 0.5
        playback.tick()
        edit_s = time.perf_counter() - t
        # a restarted backend (same connection file and keys) is picked up by itself
        log = open(os.path.join(OUT, "restarted_backend.log"), "wb")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=cwd)
        R["restarted_pid"] = proc.pid
        ok = playback.pump_until(lambda: s.ready, 300)
        back_after = time.perf_counter() - t
        settle(ob, 120)
        ref = reference_decode(faces.face_codes(ob))
        R["restart"] = {"gone_after_s": gone_after, "status_gone": lines_gone, "edit_while_gone_s": edit_s,
                        "ready_again": ok, "back_after_s": back_after, "status_back": panel.status_lines(),
                        "max_err_mm": float(np.abs(verts_mm(ob) - ref).max())}
        timed("restart")
    # ------------------------------------------------------------------ training job from the panel
    if "train" in STEPS and ARGS.get("samples"):
        training = addon_module("training")
        scene.imface.train_scans = ARGS["samples"]
        scene.imface.train_preset = "cpu"
        scene.imface.train_out = os.path.join(OUT, "train_run")
        t = time.perf_counter()
        ret = bpy.ops.imface.train(steps=12)
        saw_busy = []
        done = playback.pump_until(lambda: (saw_busy.append(s.state == "busy") or True) and any(
            j.get("kind") == "train" and j.get("state") in ("done", "failed", "cancelled")
            for j in s.client.jobs.values()), 600)
        job = [j for j in s.client.jobs.values() if j.get("kind") == "train"][-1]
        img = bpy.data.images.get(training.IMAGE_NAME)
        models = training.refresh_models()
        R["train"] = {"ret": sorted(ret), "done": done, "state": job.get("state"), "message": job.get("message"),
                      "error": job.get("error"), "seconds": time.perf_counter() - t, "busy_seen": any(saw_busy),
                      "history": training.history()[-5:], "image": list(img.size) if img else None,
                      "models": [(m.get("name"), m.get("loaded")) for m in models],
                      "result": job.get("result")}
        new = [m for m in models if not m.get("loaded")]
        if new:
            ret = bpy.ops.imface.load_model(model_id=str(new[0]["id"]))
            R["train"]["load"] = sorted(ret)
            R["train"]["fingerprint_changed"] = s.fingerprint != R["connect"]["fingerprint"]
            R["train"]["face_warning"] = faces.model_warning(bpy.data.objects["ImFace"])
        timed("train")
finally:
    if "client" in _REF:
        _REF["client"].close()
    proc = globals().get("proc")
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
