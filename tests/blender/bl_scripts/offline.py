"""Blender-side checks that need no backend: registration, units, mesh, properties, keyframes, .blend."""
import os
import numpy as np

units = addon_module("units")
codes_mod = addon_module("codes")
meshlib = addon_module("mesh")
faces = addon_module("faces")
panel = addon_module("panel")
playback = addon_module("playback")

R = RESULT
R["operators"] = sorted(n for n in dir(bpy.ops.imface) if not n.startswith("_"))
R["handlers"] = sorted({h.__name__ for name in ("frame_change_post", "render_pre", "render_init", "load_post",
                                                "undo_post") for h in getattr(bpy.app.handlers, name)
                        if "imface" in h.__module__})
R["user_path"] = bpy.utils.extension_path_user(MODULE, path="", create=True)
R["addon_dir"] = os.path.dirname(MOD.__file__)

# units: model mm (+y up, looking +z) -> Blender m (Z up, looking -Y)
pts = np.array([[10.0, 0, 0], [0, 10.0, 0], [0, 0, 10.0]])
bl = units.model_to_blender(pts)
R["units_axes"] = bl.tolist()
R["units_roundtrip_err"] = float(np.abs(units.blender_to_model(bl) - pts).max())

# a face object built from synthetic data (no backend): template mesh + UVs + stored codes
rng = np.random.default_rng(0)
V = 2000
verts_mm = rng.normal(size=(V, 3)).astype(np.float32) * 50
tri = np.stack([np.arange(V - 2), np.arange(1, V - 1), np.arange(2, V)], 1)
uvs = meshlib.template_uvs(verts_mm)
me = meshlib.build_mesh("synthetic", units.model_to_blender(verts_mm), tri, uvs)
ob = bpy.data.objects.new("synthetic", me)
bpy.context.scene.collection.objects.link(ob)
codes = {p: rng.normal(size=40).astype(np.float32) for p in ("identity", "expression", "detail")}
ob.imface.is_face = True
ob.imface.face_id = "f" * 32
ob.imface.base_codes = codes_mod.codes_to_json(codes, model="fp-test")
ob.imface.model = "fp-test"
back = meshlib.read_positions(me)
R["mesh_counts"] = [len(me.vertices), len(me.polygons), len(me.uv_layers)]
R["mesh_write_err_m"] = float(np.abs(back - units.model_to_blender(verts_mm)).max())
R["codes_roundtrip_exact"] = all(np.array_equal(faces.base_codes(ob)[p], codes[p]) for p in codes)
R["is_face"] = faces.is_face(ob)

# keyframes on the coefficient vector: evaluated values interpolate after frame_set
scene = bpy.context.scene
scene.imface.live = False   # no backend here: keep the handler quiet
ob.imface.expression[0] = 0.0
ob.keyframe_insert('imface.expression', index=0, frame=1)
ob.imface.expression[0] = 2.0
ob.keyframe_insert('imface.expression', index=0, frame=11)
scene.frame_set(6)
dg = bpy.context.evaluated_depsgraph_get()
R["coeff_at_6"] = float(faces.coefficients(ob, dg)["expression"][0])
paths = playback._animated_paths(ob)
R["animated_paths"] = [(p, i) for p, i, _ in paths]

# status text without a backend
R["status_lines"] = panel.status_lines()

# .blend save and reopen keeps the face's data
path = os.path.join(ARGS["tmp"], "offline.blend")
bpy.ops.wm.save_as_mainfile(filepath=path)
bpy.ops.wm.open_mainfile(filepath=path)
ob2 = bpy.data.objects["synthetic"]
R["reopen_codes_exact"] = all(np.array_equal(faces.base_codes(ob2)[p], codes[p]) for p in codes)
R["reopen_model"] = ob2.imface.model
R["reopen_uv_layers"] = len(ob2.data.uv_layers)
R["reopen_fcurves"] = len(playback._animated_paths(ob2))
