"""register()/unregister() of the Blender layer (imported lazily by the package's __init__)."""
from __future__ import annotations

import atexit

import bpy

from . import operators, panel, playback, preferences, props, state

_CLASSES = (*preferences.classes, *props.classes, *operators.classes, *panel.classes)


def _at_exit() -> None:
    # Blender quitting does not unregister add-ons: stop a backend this Blender launched (unless it is
    # training) when Python shuts down.
    state.shutdown()


def register() -> None:
    for cls in _CLASSES:
        bpy.utils.register_class(cls)
    props.register_props()
    playback.register_handlers()
    atexit.register(_at_exit)


def unregister() -> None:
    atexit.unregister(_at_exit)
    playback.unregister_handlers()
    state.shutdown()
    props.unregister_props()
    for cls in reversed(_CLASSES):
        bpy.utils.unregister_class(cls)
