"""ImFace Faces: the Blender extension (bpy only; it never imports torch).

Blender loads this folder as `bl_ext.<repo>.imface`. Nothing here imports bpy at the top level: the
Blender layer (preferences, properties, operators, panel, handlers) is imported by `register()`, so the
bpy-free parts (`link/`, `units`, `codes`, `session`) can be imported and tested without Blender.
"""
from __future__ import annotations


def register() -> None:
    from . import registration

    registration.register()


def unregister() -> None:
    from . import registration

    registration.unregister()
