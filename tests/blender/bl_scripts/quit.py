"""Launch a backend from the preferences, then let Blender quit without disabling the add-on."""
state = addon_module("state")
prefs = bpy.context.preferences.addons[MODULE].preferences
prefs.mode, prefs.python, prefs.model_path = "LAUNCH", ARGS["python"], ARGS["model"]
prefs.threads, prefs.start_timeout = 1, 300
prefs.extra_args = "--template-resolution 64 --workers 0"
bpy.ops.imface.connect(wait=True)
RESULT["pid"] = state.get().launched_pid
RESULT["ready"] = state.get().ready
