"""The sidebar panel (3D viewport > N > ImFace) and its text, kept in plain functions for tests."""
from __future__ import annotations

import bpy

from . import faces, state
from .codes import PARTS


def status_lines(context=None) -> list[str]:
    """What the connection box says (tests read this: there is no UI in module mode)."""
    s = state.peek()
    if s is None:
        return ["not connected"]
    lines = [f"Backend: {s.status()}"]
    if s.ready:
        srv = s.server
        m = s.model_info
        lines.append(f"Server {srv.get('version', '?')} on {srv.get('device', '?')}")
        if m:
            lines.append(f"Model {m.get('name', '?')} ({str(m.get('id', ''))[:12]}), "
                         f"{m.get('n_vertices', '?')} vertices")
    for j in s.busy_jobs():
        pct = float(j.get("progress") or 0.0) * 100
        lines.append(f"Job {str(j.get('job', ''))[:8]} {j.get('state')} {pct:.0f}% {j.get('message', '')}")
    return lines


def face_lines(ob) -> list[str]:
    if not faces.is_face(ob):
        return []
    lines = []
    w = faces.model_warning(ob)
    if w:
        lines.append(w)
    rt = faces.runtime(ob)
    if rt.get("warning"):
        lines.append(rt["warning"])
    return lines


class _SidebarPanel:
    """Where every ImFace panel lives: the 3D viewport's sidebar, tab "ImFace"."""
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "ImFace"


class _SubPanel(_SidebarPanel):
    bl_parent_id = "IMFACE_PT_main"


class IMFACE_PT_main(_SidebarPanel, bpy.types.Panel):
    bl_label = "ImFace"

    def draw(self, context):
        layout = self.layout
        s = state.peek()
        box = layout.box()
        st = s.state if s else "disconnected"
        icon = {"ready": "CHECKMARK", "busy": "SORTTIME", "gone": "ERROR", "connecting": "TIME"}.get(st, "UNLINKED")
        lines = status_lines(context)
        box.label(text=lines[0], icon=icon)
        for ln in lines[1:]:
            box.label(text=ln)
        row = box.row()
        row.operator("imface.connect", text="Reconnect" if s and s.client else "Connect")
        row.operator("imface.disconnect", text="", icon="CANCEL")
        if s:
            for j in s.busy_jobs():
                r = box.row()
                r.progress(factor=float(j.get("progress") or 0.0), type="BAR",
                           text=f"{j.get('kind', 'job')} {str(j.get('message', ''))[:40]}")
                r.operator("imface.cancel_job", text="", icon="X").job = str(j.get("job"))


class IMFACE_PT_face(_SubPanel, bpy.types.Panel):
    bl_label = "Face"

    def draw(self, context):
        layout = self.layout
        sc = context.scene.imface
        row = layout.row(align=True)
        row.prop(sc, "create_mode", text="")
        if sc.create_mode == "RANDOM":
            row.prop(sc, "seed")
        row.operator("imface.create_face", text="Create", icon="ADD")
        ob = context.active_object
        if not faces.is_face(ob):
            layout.label(text="Select a face object")
            return
        for ln in face_lines(ob):
            layout.label(text=ln, icon="INFO")
        f = ob.imface
        layout.prop(f, "neutral")
        s = state.peek()
        pca = s.pca(f.model, fetch=False) if s else None
        for part in PARTS:
            col = layout.column(align=True)
            n = pca.n_components(part) if pca else 0
            col.label(text=f"{part.capitalize()} ({n} components)")
            for k in range(n):
                ex = float(pca.parts[part].explained[k]) * 100
                col.prop(f, part, index=k, text=f"{part[:3].capitalize()} {k + 1} ({ex:.0f}%)", slider=True)
        row = layout.row()
        row.operator("imface.reset", text="Reset")
        row.operator("imface.apply_sliders", text="Apply to Base")
        layout.operator("imface.transfer", text="Transfer Expression to Selected").part = "EXPRESSION"
        layout.operator("imface.transfer", text="Transfer Detail to Selected").part = "DETAIL"
        layout.operator("imface.export_codes")


class IMFACE_PT_animation(_SubPanel, bpy.types.Panel):
    bl_label = "Animation"

    def draw(self, context):
        layout = self.layout
        sc = context.scene.imface
        layout.prop(sc, "live")
        layout.prop(sc, "stream")
        layout.prop(sc, "exact_render")
        layout.prop(sc, "bake_mode")
        layout.operator("imface.bake_shape_keys")
        row = layout.row()
        row.prop(sc, "rig_components")
        row.prop(sc, "rig_step")
        layout.operator("imface.bake_rig")
        ob = context.active_object
        if ob is not None and "imface_rig_error_mm" in ob:
            layout.label(text=f"Rig error: mean {ob['imface_rig_error_mm']:.3f} mm, "
                              f"max {ob['imface_rig_error_max_mm']:.3f} mm")


class IMFACE_PT_scan(_SubPanel, bpy.types.Panel):
    bl_label = "Scan Fitting"
    bl_options = {"DEFAULT_CLOSED"}

    def draw(self, context):
        layout = self.layout
        sc = context.scene.imface
        layout.prop(sc, "scan_path")
        layout.prop(sc, "landmarks_path")
        row = layout.row()
        row.prop(sc, "fit_neutral")
        row.prop(sc, "fit_seed")
        layout.operator("imface.fit_scan").filepath = sc.scan_path


class IMFACE_PT_training(_SubPanel, bpy.types.Panel):
    bl_label = "Training"
    bl_options = {"DEFAULT_CLOSED"}

    def draw(self, context):
        layout = self.layout
        sc = context.scene.imface
        layout.prop(sc, "train_scans")
        layout.prop(sc, "train_preset")
        layout.prop(sc, "train_out")
        layout.operator("imface.train")
        s = state.peek()
        if s is None:
            return
        from . import training

        for j in s.training_jobs():
            m = j.get("metrics") or {}
            loss = m.get("loss", m.get("total"))
            layout.label(text=f"step {m.get('step', '?')}  loss {loss:.4f}" if isinstance(loss, (int, float))
                         else f"{j.get('message', '')}")
        img = bpy.data.images.get(training.IMAGE_NAME)
        if img is not None:
            img.preview_ensure()
            layout.template_icon(icon_value=img.preview.icon_id, scale=6.0)
        row = layout.row()
        row.label(text="Models")
        row.operator("imface.refresh_models", text="", icon="FILE_REFRESH")
        for m in training.models():
            r = layout.row()
            r.label(text=f"{m.get('name', '?')} ({str(m.get('id', ''))[:8]})", icon="CHECKMARK" if m.get("loaded") else "NONE")
            if not m.get("loaded"):
                r.operator("imface.load_model", text="Load").model_id = str(m.get("id", ""))


classes = (IMFACE_PT_main, IMFACE_PT_face, IMFACE_PT_animation, IMFACE_PT_scan, IMFACE_PT_training)
