"""Operators: connection, faces, sliders, bakes, scan fitting, transfer, training.

Every operator reports problems with `self.report` (no tracebacks for the user); the ones that change
Blender data carry the UNDO option. Long actions (fit, training) run as backend jobs and show their
progress in the panel and the status bar, with a cancel button.
"""
from __future__ import annotations

from pathlib import Path

import bpy
from bpy.props import BoolProperty, EnumProperty, FloatProperty, IntProperty, StringProperty

from . import bake, faces, playback, state
from .codes import PARTS, CodesError, codes_to_json
from .session import SessionError


def _err(op, e: Exception) -> set:
    op.report({"ERROR"}, str(e))
    return {"CANCELLED"}


def _face_poll(context) -> bool:
    return faces.is_face(context.active_object)


# ------------------------------------------------------------------------------------------ connection


class IMFACE_OT_connect(bpy.types.Operator):
    """Launch a local backend or attach to a running one (see the add-on preferences)"""
    bl_idname = "imface.connect"
    bl_label = "Connect"
    bl_options = {"REGISTER"}

    mode: EnumProperty(name="Mode", default="PREFS",
                       items=[("PREFS", "From Preferences", ""), ("LAUNCH", "Launch", ""), ("ATTACH", "Attach", "")])
    connection_file: StringProperty(name="Connection File", default="", subtype="FILE_PATH")
    wait: BoolProperty(name="Wait", default=False, options={"SKIP_SAVE"},
                       description="Block until the backend is ready (scripts)")

    def execute(self, context):
        from .preferences import connection_file_path, prefs, resolved_path

        p = prefs()
        s = state.get()
        state.configure(s)
        mode = p.mode if self.mode == "PREFS" else self.mode
        cf = resolved_path(self.connection_file) if self.connection_file else connection_file_path()
        try:
            if mode == "LAUNCH":
                s.launch(resolved_path(p.python), resolved_path(p.model_path), cf, extra_args=p.extra_args,
                         device=p.device, threads=p.threads, start_timeout=p.start_timeout,
                         allow_remote=state.allow_remote(), cwd=resolved_path(p.workdir) or None)
            else:
                s.attach(cf, allow_remote=state.allow_remote())
        except SessionError as e:
            return _err(self, e)
        if self.wait:
            timeout = p.start_timeout if mode == "LAUNCH" else max(5.0, p.request_timeout)
            if not playback.pump_until(lambda: s.ready or (s.state == "gone" and s.client is None), timeout, context):
                return _err(self, SessionError(f"the backend is not ready after {timeout:g} s: {s.status()}"))
            if not s.ready:
                return _err(self, SessionError(s.status()))
            try:
                s.pca()
            except SessionError as e:
                return _err(self, e)
        self.report({"INFO"}, f"ImFace backend: {s.status()}")
        return {"FINISHED"}


class IMFACE_OT_disconnect(bpy.types.Operator):
    """Close the connection (and stop a backend this Blender launched, unless it is training)"""
    bl_idname = "imface.disconnect"
    bl_label = "Disconnect"

    stop_backend: BoolProperty(name="Stop Backend", default=True)

    def execute(self, context):
        s = state.get()
        s.shutdown(stop_backend=self.stop_backend)
        self.report({"INFO"}, "disconnected")
        return {"FINISHED"}


# ------------------------------------------------------------------------------------------ faces


def _codes_request(kind: str, **extra) -> dict:
    s = state.get()
    body = s.request("codes", {"kind": kind, **extra})
    return faces.codes_from_reply(body)


class IMFACE_OT_create_face(bpy.types.Operator):
    """Add a face from the model's mean codes or a random sample"""
    bl_idname = "imface.create_face"
    bl_label = "Create Face"
    bl_options = {"REGISTER", "UNDO"}

    mode: EnumProperty(name="From", default="SCENE",
                       items=[("SCENE", "Panel Setting", ""), ("MEAN", "Mean", ""), ("RANDOM", "Random", "")])
    seed: IntProperty(name="Seed", default=-1, min=-1, description="-1: the panel's seed")
    name: StringProperty(name="Name", default="ImFace")

    def execute(self, context):
        sc = context.scene.imface
        mode = sc.create_mode if self.mode == "SCENE" else self.mode
        seed = sc.seed if self.seed < 0 else self.seed
        try:
            codes = _codes_request("mean") if mode == "MEAN" else _codes_request("sample", n=1, seed=int(seed))
            ob = faces.create_face(context, codes, name=self.name,
                                   source="mean" if mode == "MEAN" else f"sample seed {seed}")
        except (SessionError, CodesError, KeyError) as e:
            return _err(self, e)
        for o in context.view_layer.objects:
            o.select_set(False)
        ob.select_set(True)
        context.view_layer.objects.active = ob
        if mode == "RANDOM":
            sc.seed = seed + 1
        if context.scene.imface.exact_render:
            context.scene.render.use_lock_interface = True
        self.report({"INFO"}, f"created {ob.name} ({len(ob.data.vertices)} vertices)")
        return {"FINISHED"}


class IMFACE_OT_reset(bpy.types.Operator):
    """Set the sliders of the active face back to 0 (its base codes)"""
    bl_idname = "imface.reset"
    bl_label = "Reset Sliders"
    bl_options = {"REGISTER", "UNDO"}

    part: EnumProperty(name="Part", default="ALL",
                       items=[("ALL", "All", ""), *[(p.upper(), p.capitalize(), "") for p in PARTS]])

    @classmethod
    def poll(cls, context):
        return _face_poll(context)

    def execute(self, context):
        parts = PARTS if self.part == "ALL" else (self.part.lower(),)
        faces.reset_sliders(context.active_object, parts)
        return {"FINISHED"}


class IMFACE_OT_apply_sliders(bpy.types.Operator):
    """Fold the current slider values into the face's base codes and zero the sliders"""
    bl_idname = "imface.apply_sliders"
    bl_label = "Apply Sliders to Base"
    bl_options = {"REGISTER", "UNDO"}

    @classmethod
    def poll(cls, context):
        return _face_poll(context)

    def execute(self, context):
        ob = context.active_object
        try:
            faces.set_base(ob, faces.face_codes(ob))
        except (SessionError, CodesError) as e:
            return _err(self, e)
        return {"FINISHED"}


class IMFACE_OT_update(bpy.types.Operator):
    """Decode the active scene's faces now and wait for their meshes"""
    bl_idname = "imface.update"
    bl_label = "Update Faces"

    def execute(self, context):
        try:
            playback.update_scene(context.scene, context.evaluated_depsgraph_get(), wait=True)
        except SessionError as e:
            return _err(self, e)
        return {"FINISHED"}


class IMFACE_OT_transfer(bpy.types.Operator):
    """Give the selected faces the active face's expression or detail (their base codes; sliders too)"""
    bl_idname = "imface.transfer"
    bl_label = "Transfer"
    bl_options = {"REGISTER", "UNDO"}

    part: EnumProperty(name="Part", default="EXPRESSION",
                       items=[("EXPRESSION", "Expression", ""), ("DETAIL", "Detail", "")])

    @classmethod
    def poll(cls, context):
        return _face_poll(context) and any(faces.is_face(o) and o != context.active_object
                                           for o in context.selected_objects)

    def execute(self, context):
        src = context.active_object
        part = self.part.lower()
        try:
            src_codes = faces.face_codes(src)
            n = 0
            for ob in context.selected_objects:
                if ob == src or not faces.is_face(ob):
                    continue
                base = dict(faces.base_codes(ob))
                base[part] = src_codes[part]
                faces.set_base(ob, base, keep_sliders=True)
                setattr(ob.imface, part, (0.0,) * len(getattr(ob.imface, part)))
                n += 1
        except (SessionError, CodesError) as e:
            return _err(self, e)
        self.report({"INFO"}, f"{part} of {src.name} transferred to {n} face(s)")
        return {"FINISHED"}


class IMFACE_OT_export_codes(bpy.types.Operator):
    """Write the active face's current codes as an imface-codes/1 JSON file (for `imface decode`)"""
    bl_idname = "imface.export_codes"
    bl_label = "Export Codes"

    filepath: StringProperty(subtype="FILE_PATH")

    @classmethod
    def poll(cls, context):
        return _face_poll(context)

    def invoke(self, context, event):
        self.filepath = f"{context.active_object.name}.codes.json"
        context.window_manager.fileselect_add(self)
        return {"RUNNING_MODAL"}

    def execute(self, context):
        ob = context.active_object
        try:
            codes = faces.face_codes(ob)
            base = faces.base_codes(ob)
            Path(bpy.path.abspath(self.filepath)).write_text(codes_to_json(
                codes, model=ob.imface.model, neutral=ob.imface.neutral,
                normalized_from_scan=base["normalized_from_scan"], source=ob.name))
        except (SessionError, CodesError, OSError) as e:
            return _err(self, e)
        return {"FINISHED"}


# ------------------------------------------------------------------------------------------ bakes


class IMFACE_OT_bake_shape_keys(bpy.types.Operator):
    """Bake the active face's animation into a copy with one shape key per frame (or keyframe), keyed so
    that it plays back without the backend (renders, Alembic/FBX export)"""
    bl_idname = "imface.bake_shape_keys"
    bl_label = "Bake to Shape Keys"
    bl_options = {"REGISTER", "UNDO"}

    mode: EnumProperty(name="Keys", default="SCENE",
                       items=[("SCENE", "Panel Setting", ""), ("FRAME", "Every Frame", ""),
                              ("KEYFRAME", "Keyframes", "")])
    hide_source: BoolProperty(name="Hide Source Face", default=True)

    @classmethod
    def poll(cls, context):
        return _face_poll(context)

    def execute(self, context):
        mode = context.scene.imface.bake_mode if self.mode == "SCENE" else self.mode
        wm = context.window_manager
        try:
            wm.progress_begin(0, 100)
            out = bake.bake_shape_keys(context, context.active_object, per_keyframe=(mode == "KEYFRAME"),
                                       hide_source=self.hide_source,
                                       progress=lambda f: wm.progress_update(int(100 * f)))
        except (SessionError, CodesError) as e:
            return _err(self, e)
        finally:
            wm.progress_end()
        self.report({"INFO"}, f"baked {len(out.data.shape_keys.key_blocks) - 1} shape keys into {out.name}")
        return {"FINISHED"}


class IMFACE_OT_bake_rig(bpy.types.Operator):
    """Bake the expression components as shape keys driven by the face's sliders (plays without the
    backend), and report how far the linear rig is from the neural decode over the training expressions"""
    bl_idname = "imface.bake_rig"
    bl_label = "Bake Rig"
    bl_options = {"REGISTER", "UNDO"}

    components: IntProperty(name="Components", default=-1, min=-1,
                            description="-1: the panel's setting")
    step: FloatProperty(name="Step", default=-1.0, description="-1: the panel's setting")

    @classmethod
    def poll(cls, context):
        return _face_poll(context)

    def execute(self, context):
        sc = context.scene.imface
        k = sc.rig_components if self.components < 0 else self.components
        step = sc.rig_step if self.step <= 0 else self.step
        try:
            rig, report = bake.bake_rig(context, context.active_object, n_components=k or None, step=step)
        except (SessionError, CodesError) as e:
            return _err(self, e)
        rig["imface_rig_error_mm"] = report["mean_mm"]
        rig["imface_rig_error_max_mm"] = report["max_mm"]
        self.report({"INFO"}, f"rig {rig.name}: {report['n_keys']} shape keys; linear rig vs neural decode over "
                              f"{report['n_expressions']} training expressions: mean {report['mean_mm']:.3f} mm, "
                              f"max {report['max_mm']:.3f} mm")
        return {"FINISHED"}


# ------------------------------------------------------------------------------------------ jobs


class IMFACE_OT_fit_scan(bpy.types.Operator):
    """Import a scan, fit the model to it as a backend job (progress in the panel, cancellable) and
    add the fitted face, placed on the scan"""
    bl_idname = "imface.fit_scan"
    bl_label = "Import Scan and Fit"
    bl_options = {"REGISTER", "UNDO"}

    filepath: StringProperty(subtype="FILE_PATH")
    landmarks: StringProperty(name="Landmarks", default="", description="JSON file (empty: manifest or empties)")
    import_scan: BoolProperty(name="Import the Scan", default=True)
    wait: BoolProperty(name="Wait", default=False, options={"SKIP_SAVE"}, description="Block until done (scripts)")
    seed: IntProperty(name="Seed", default=-1, min=-1)
    steps: IntProperty(name="Steps", default=0, min=0, description="0: the backend's default schedule")

    def invoke(self, context, event):
        context.window_manager.fileselect_add(self)
        return {"RUNNING_MODAL"}

    def execute(self, context):
        from . import scans

        sc = context.scene.imface
        path = bpy.path.abspath(self.filepath or sc.scan_path)
        lmk_path = bpy.path.abspath(self.landmarks or sc.landmarks_path)
        try:
            job = scans.start_fit(context, path, lmk_path or None, import_scan=self.import_scan,
                                  neutral=sc.fit_neutral, seed=sc.fit_seed if self.seed < 0 else self.seed,
                                  steps=self.steps or None)
            if self.wait:
                ob = scans.wait_fit(context, job)
                self.report({"INFO"}, f"fitted {ob.name}")
        except (SessionError, CodesError, OSError, ValueError) as e:
            return _err(self, e)
        return {"FINISHED"}


class IMFACE_OT_cancel_job(bpy.types.Operator):
    """Cancel a running backend job"""
    bl_idname = "imface.cancel_job"
    bl_label = "Cancel Job"

    job: StringProperty()

    def execute(self, context):
        s = state.get()
        try:
            s.request("job.cancel", {"job": self.job})
        except SessionError as e:
            return _err(self, e)
        except Exception as e:  # noqa: BLE001 - ProtocolError from the link
            return _err(self, e)
        return {"FINISHED"}


class IMFACE_OT_train(bpy.types.Operator):
    """Train a model on a scan folder (or the default data) as a backend job; it keeps running if Blender
    quits, and the next Blender attaches to it"""
    bl_idname = "imface.train"
    bl_label = "Start Training"

    steps: IntProperty(name="Steps", default=0, min=0, description="0: the preset's schedule")

    def execute(self, context):
        import time as _time

        sc = context.scene.imface
        s = state.get()
        scans = bpy.path.abspath(sc.train_scans) if sc.train_scans else "default"
        if sc.train_out:
            out = bpy.path.abspath(sc.train_out)
        elif s.connection_file is not None and s.launch_command is not None:
            out = str(s.connection_file.parent / "runs" / _time.strftime("train-%Y%m%d-%H%M%S"))
        else:
            self.report({"ERROR"}, "choose an output folder (one the backend may write: its --roots or runs)")
            return {"CANCELLED"}
        body = {"scans": scans, "preset": sc.train_preset, "out": out}
        if self.steps:
            body["steps"] = int(self.steps)
        try:
            reply = s.request("train", body)
        except Exception as e:  # noqa: BLE001
            return _err(self, e)
        self.report({"INFO"}, f"training job {reply.get('job')} -> {out}")
        return {"FINISHED"}


class IMFACE_OT_load_model(bpy.types.Operator):
    """Load another model into the backend (e.g. one just trained)"""
    bl_idname = "imface.load_model"
    bl_label = "Load Model"

    path: StringProperty(name="Model", subtype="FILE_PATH")
    model_id: StringProperty(name="Id", default="")

    def execute(self, context):
        s = state.get()
        body = {"id": self.model_id} if self.model_id else {"path": bpy.path.abspath(self.path)}
        try:
            reply = s.request("models.load", body, timeout=max(120.0, s.request_timeout))
            # a new model: fresh hello info (fingerprint, sizes)
            s.client.server = {**(s.client.server or {}), "model": reply.get("model", s.model_info)}
            s.pca()
        except Exception as e:  # noqa: BLE001
            return _err(self, e)
        self.report({"INFO"}, f"model {s.fingerprint[:12]} loaded")
        return {"FINISHED"}


class IMFACE_OT_refresh_models(bpy.types.Operator):
    """List the models the backend can load (its roots: trained runs, the current model)"""
    bl_idname = "imface.refresh_models"
    bl_label = "Refresh Models"

    def execute(self, context):
        from . import training

        try:
            found = training.refresh_models()
        except Exception as e:  # noqa: BLE001
            return _err(self, e)
        self.report({"INFO"}, f"{len(found)} model(s)")
        return {"FINISHED"}


classes = (IMFACE_OT_refresh_models, IMFACE_OT_connect, IMFACE_OT_disconnect, IMFACE_OT_create_face, IMFACE_OT_reset, IMFACE_OT_apply_sliders,
           IMFACE_OT_update, IMFACE_OT_transfer, IMFACE_OT_export_codes, IMFACE_OT_bake_shape_keys,
           IMFACE_OT_bake_rig, IMFACE_OT_fit_scan, IMFACE_OT_cancel_job, IMFACE_OT_train, IMFACE_OT_load_model)


