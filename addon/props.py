"""Properties stored in the .blend: the face on each Object, the scene's playback settings.

Everything a face needs lives on its object (`Object.imface`): the exact base codes (JSON text in the
`imface-codes/1` format), the model fingerprint they belong to, the neutral flag, and the keyframable
coefficients (sliders) along the model's principal components. A .blend saved and reopened therefore
gives the same face on any backend that has the same model.
"""
from __future__ import annotations

import bpy
from bpy.props import (BoolProperty, EnumProperty, FloatProperty, FloatVectorProperty, IntProperty,
                       PointerProperty, StringProperty)

from .codes import N_COEFFS, SLIDER_RANGE

STORAGE_VERSION = 1


def _on_coeff_edit(self, context):
    # A slider edit (or an F-curve written by the animation system during frame_set; then the frame
    # handler does the work and this call is cheap): ask for the new mesh, latest wins, never block.
    from . import playback

    playback.on_face_edited(self.id_data)


def _on_expression_edit(self, context):
    # A face fitted as neutral is still animatable: moving an expression slider switches the expression
    # warp on (its base expression code is the fit's), so the sliders act from there.
    if self.neutral and any(abs(x) > 0 for x in self.expression):
        self["neutral"] = False
    _on_coeff_edit(self, context)


def _coeffs(part: str, n: int):
    return FloatVectorProperty(
        name=part.capitalize(), size=n, default=(0.0,) * n, soft_min=-SLIDER_RANGE, soft_max=SLIDER_RANGE,
        min=-10.0, max=10.0, step=5, precision=3, subtype="NONE", options={"ANIMATABLE"},
        description=f"{part.capitalize()} coefficients along the model's principal components, in standard "
                    f"deviations of the training codes (keyframable)",
        update=_on_expression_edit if part == "expression" else _on_coeff_edit)


class ImFaceFace(bpy.types.PropertyGroup):
    is_face: BoolProperty(name="Is ImFace Face", default=False, options=set())
    version: IntProperty(name="Storage Version", default=STORAGE_VERSION, options=set())
    face_id: StringProperty(name="Face Id", default="", options=set(),
                            description="Key of this face's decoder state on the backend")
    base_codes: StringProperty(name="Base Codes", default="", options=set(),
                               description="Exact identity/expression/detail codes (imface-codes/1 JSON)")
    model: StringProperty(name="Model Fingerprint", default="", options=set(),
                          description="Content hash of the model the codes belong to")
    n_vertices: IntProperty(name="Template Vertices", default=0, options=set())
    neutral: BoolProperty(name="Neutral", default=False, options=set(), update=_on_coeff_edit,
                          description="Evaluate with the expression warp switched off (as training does for "
                                      "neutral scans); off, the expression sliders work")
    identity: _coeffs("identity", N_COEFFS["identity"])
    expression: _coeffs("expression", N_COEFFS["expression"])
    detail: _coeffs("detail", N_COEFFS["detail"])
    # Which codes the mesh currently shows (digest of the composed codes); "" = unknown/stale.
    shown: StringProperty(name="Shown Codes", default="", options=set())


class ImFaceScene(bpy.types.PropertyGroup):
    live: BoolProperty(name="Live Update", default=True,
                       description="Update face meshes when sliders or the frame change")
    stream: BoolProperty(name="Stream Ahead", default=True,
                         description="Ask the backend to decode the keyframed range ahead of the playhead")
    exact_render: BoolProperty(
        name="Exact Renders", default=True,
        description="While rendering, wait for each frame's (and subframe's) own decoded mesh; the "
                    "interface is locked during renders so the frame handler may change the meshes")
    create_mode: EnumProperty(name="New Face", default="MEAN",
                              items=[("MEAN", "Mean", "The mean of the training codes"),
                                     ("RANDOM", "Random", "A sample from the training code distribution")])
    seed: IntProperty(name="Seed", default=0, min=0)
    bake_mode: EnumProperty(name="Bake", default="FRAME",
                            items=[("FRAME", "Every Frame", "One shape key per frame"),
                                   ("KEYFRAME", "Keyframes", "One shape key per keyframe")])
    rig_components: IntProperty(name="Rig Components", default=0, min=0, max=N_COEFFS["expression"],
                                description="Expression components baked into the rig (0: all sliders)")
    rig_step: FloatProperty(name="Rig Step", default=1.0, min=0.05, max=3.0,
                            description="Coefficient used to sample each component's shape key")
    scan_path: StringProperty(name="Scan", subtype="FILE_PATH", default="")
    landmarks_path: StringProperty(name="Landmarks", subtype="FILE_PATH", default="",
                                   description="JSON with the five landmarks (empty: from the scan folder "
                                               "manifest, or the empties placed on the imported scan)")
    fit_neutral: BoolProperty(name="Fit as Neutral", default=False)
    fit_seed: IntProperty(name="Fit Seed", default=0, min=0)
    train_scans: StringProperty(name="Scan Folder", subtype="DIR_PATH", default="")
    train_preset: EnumProperty(name="Preset", default="cpu",
                               items=[("cpu", "CPU", "Small, trains on a CPU"),
                                      ("paper", "Paper", "The paper's sizes (GPU)")])
    train_out: StringProperty(name="Output", subtype="DIR_PATH", default="")


classes = (ImFaceFace, ImFaceScene)


def register_props() -> None:
    bpy.types.Object.imface = PointerProperty(type=ImFaceFace)
    bpy.types.Scene.imface = PointerProperty(type=ImFaceScene)


def unregister_props() -> None:
    for owner in (bpy.types.Object, bpy.types.Scene):
        if hasattr(owner, "imface"):
            del owner.imface
