"""Runs inside the Blender process (bpy module): install the built zip, enable, run a test script."""
import json
import os
import sys
import time
import traceback

MARK = "@@IMFACE_RESULT@@"
ARGS = json.loads(os.environ["IMFACE_TEST_ARGS"])
RESULT = {"error": None}
MODULE = "bl_ext.user_default.imface"

t0 = time.perf_counter()
try:
    import bpy
    import addon_utils

    RESULT["blender_version"] = bpy.app.version_string
    RESULT["import_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    ret = bpy.ops.extensions.package_install_files(filepath=ARGS["zip"], repo="user_default",
                                                   enable_on_install=True)
    RESULT["install"] = sorted(ret)
    RESULT["install_s"] = time.perf_counter() - t1
    RESULT["enabled"] = MODULE in bpy.context.preferences.addons
    if not RESULT["enabled"]:
        raise RuntimeError(f"{MODULE} is not enabled after install ({ret})")
    MOD = sys.modules[MODULE]
    # Use the wheels the extension bundles (unpacked by Blender into the user folder) rather than the
    # venv's own pyzmq/msgpack, so the test exercises what a user gets. (Test-only: the add-on itself
    # never touches sys.path.)
    local = os.path.join(os.environ["BLENDER_USER_RESOURCES"], "extensions", ".local", "lib",
                         f"python{sys.version_info[0]}.{sys.version_info[1]}", "site-packages")
    RESULT["wheels_dir"] = sorted(os.listdir(local)) if os.path.isdir(local) else None
    if os.path.isdir(local) and "zmq" not in sys.modules:
        sys.path.insert(0, local)
    RESULT["module_file"] = MOD.__file__
    import zmq
    import msgpack
    RESULT["zmq_file"] = zmq.__file__
    RESULT["zmq_version"] = zmq.__version__
    RESULT["msgpack_version"] = ".".join(map(str, msgpack.version))
    import importlib

    g = {"__name__": "__imface_test__", "bpy": bpy, "MOD": MOD, "ARGS": ARGS, "RESULT": RESULT,
         "MODULE": MODULE, "addon_module": lambda name: importlib.import_module(f"{MODULE}.{name}")}
    with open(ARGS["script"]) as f:
        code = compile(f.read(), ARGS["script"], "exec")
    exec(code, g)
except BaseException:  # noqa: BLE001 - reported to pytest
    RESULT["error"] = traceback.format_exc()
finally:
    try:
        import bpy
        import addon_utils

        if MODULE in bpy.context.preferences.addons and not ARGS.get("quit_without_disable"):
            addon_utils.disable(MODULE, default_set=True)
        RESULT["handlers_left"] = [h.__name__ for hs in (bpy.app.handlers.frame_change_post,
                                                         bpy.app.handlers.render_pre,
                                                         bpy.app.handlers.load_post)
                                   for h in hs if "imface" in getattr(h, "__module__", "")]
    except BaseException:  # noqa: BLE001
        RESULT["error"] = (RESULT["error"] or "") + "\ncleanup: " + traceback.format_exc()
    RESULT["torch_loaded"] = "torch" in sys.modules
    RESULT["total_s"] = time.perf_counter() - t0
    print(MARK + json.dumps(RESULT, default=str), flush=True)
