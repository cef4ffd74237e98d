"""The add-on's preferences (one AddonPreferences) and the user folder for caches and keys."""
from __future__ import annotations

import os
from pathlib import Path

import bpy
from bpy.props import BoolProperty, EnumProperty, FloatProperty, IntProperty, StringProperty

PACKAGE = __package__  # "bl_ext.<repo>.imface" when installed as an extension


def prefs() -> "ImFacePreferences":
    addon = bpy.context.preferences.addons.get(PACKAGE)
    if addon is None:  # during unregister
        raise RuntimeError("the ImFace extension is not enabled")
    return addon.preferences


def user_dir(*parts: str) -> Path:
    """A folder under the extension's user directory (never the add-on's own folder)."""
    base = Path(bpy.utils.extension_path_user(PACKAGE, path="", create=True))
    p = base.joinpath(*parts)
    p.mkdir(parents=True, exist_ok=True)
    return p


def default_connection_file() -> str:
    return str(user_dir("backend") / "connection.json")


class ImFacePreferences(bpy.types.AddonPreferences):
    bl_idname = PACKAGE

    mode: EnumProperty(
        name="Backend", default="LAUNCH",
        items=[("LAUNCH", "Launch a local backend", "Start the backend with the Python and model below"),
               ("ATTACH", "Attach to a running backend", "Use the connection file a backend wrote")])
    python: StringProperty(
        name="Backend Python", subtype="FILE_PATH", default="",
        description="The Python interpreter that has the ImFace backend installed (e.g. the project's "
                    ".venv/bin/python)")
    model_path: StringProperty(name="Model", subtype="FILE_PATH", default="",
                               description="model.safetensors the launched backend loads")
    connection_file: StringProperty(
        name="Connection File", subtype="FILE_PATH", default="",
        description="The backend's connection file (JSON with address, ports and CURVE keys). Empty: the "
                    "one in this extension's user folder, which a launched backend writes")
    workdir: StringProperty(
        name="Backend Folder", subtype="DIR_PATH", default="",
        description="Working directory of a launched backend (empty: the checkout the Python's .venv is in)")
    extra_args: StringProperty(name="Extra Arguments", default="",
                               description="More command-line arguments for a launched backend")
    device: StringProperty(name="Device", default="", description="e.g. cpu or cuda (empty: backend default)")
    threads: IntProperty(name="Threads", default=1, min=0, max=256,
                         description="Torch threads of a launched backend (0: backend default)")
    start_timeout: FloatProperty(name="Start Timeout", default=120.0, min=1.0, max=3600.0, unit="TIME_ABSOLUTE",
                                 description="Seconds to wait for a launched backend to answer")
    request_timeout: FloatProperty(name="Request Timeout", default=30.0, min=0.5, max=3600.0,
                                   unit="TIME_ABSOLUTE",
                                   description="Seconds a blocking request (render, bake) waits for its answer")
    stream_ahead: IntProperty(name="Stream Ahead", default=48, min=0, max=10000,
                              description="Frames after the playhead the backend decodes ahead of playback")
    cache_mb: IntProperty(name="Frame Cache (MB)", default=1024, min=16, max=65536,
                          description="Decoded frames kept in memory, all faces together")
    keep_backend: BoolProperty(
        name="Keep Backend Running", default=False,
        description="Leave a launched backend running when Blender quits (it always stays while training)")

    def draw(self, context):
        layout = self.layout
        layout.prop(self, "mode", expand=True)
        col = layout.column()
        if self.mode == "LAUNCH":
            col.prop(self, "python")
            col.prop(self, "model_path")
            col.prop(self, "workdir")
            row = col.row()
            row.prop(self, "device")
            row.prop(self, "threads")
            col.prop(self, "extra_args")
            col.prop(self, "keep_backend")
        col.prop(self, "connection_file")
        row = col.row()
        row.prop(self, "start_timeout")
        row.prop(self, "request_timeout")
        row = col.row()
        row.prop(self, "stream_ahead")
        row.prop(self, "cache_mb")
        col.label(text=f"Caches and keys: {bpy.utils.extension_path_user(PACKAGE, path='', create=False)}")


def connection_file_path() -> str:
    p = prefs().connection_file
    return bpy.path.abspath(p) if p else default_connection_file()


def resolved_path(p: str) -> str:
    return os.path.normpath(bpy.path.abspath(p)) if p else ""


classes = (ImFacePreferences,)
