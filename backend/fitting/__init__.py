"""Fitting a trained ImFace++ model to new data, in data-flow order: a target from the input
(`targets`), a schedule (`schedules`), the optimisation (`loop`), meshes back in the scan's frame
(`meshes`). The public names are re-exported here."""
from .loop import FitReport, FitResult, ProgressCallback, fit, fit_loss, frozen_networks
from .meshes import extract_face_mesh, reference_mesh_mm, scan_frame_mm
from .schedules import FitSchedule, FitStage
from .targets import (FitInputError, FitTarget, check_landmark_units, estimate_normals, target_from_input,
                      target_from_point_cloud, target_from_scan)

__all__ = [
    "FitInputError", "FitReport", "FitResult", "FitSchedule", "FitStage", "FitTarget", "ProgressCallback",
    "check_landmark_units", "estimate_normals", "extract_face_mesh", "fit", "fit_loss", "frozen_networks",
    "reference_mesh_mm", "scan_frame_mm", "target_from_input", "target_from_point_cloud", "target_from_scan",
]
