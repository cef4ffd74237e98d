"""Fitting codes to scans (eq. 21) and to partial depth views, with a small trained model."""
from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch
from model_fixture import loaded_model, one_thread, tiny_model, trained_codes  # noqa: F401  (fixtures)
from scipy.spatial import cKDTree

from backend.codes import mean_codes
from backend.evaluate import reconstruction_metrics
from backend.fitting import extract_face_mesh, fit, FitInputError, FitSchedule, FitStage, target_from_point_cloud, target_from_scan
from depth_view import simulate_depth_view
from backend.geometry.metrics import sample_surface
from backend.scans.folder import load_scan, load_scan_folder

KEY = "id01/smile"  # a non-neutral training scan
RES = 112


def _scan(tiny_model, key: str = KEY):
    folder = load_scan_folder(tiny_model.scans)
    return load_scan(next(e for e in folder.entries if e.key == key))


@pytest.fixture(scope="module")
def scan_target(tiny_model):
    scan = _scan(tiny_model)
    return scan, target_from_scan(scan, n_near=20_000, n_uniform=5_000, n_surface=10_000)


def _chamfer(model, codes, target, neutral=False) -> float:
    mesh = extract_face_mesh(model, codes, RES, neutral=neutral, normalized_from_scan=target.normalized_from_scan)
    return reconstruction_metrics(mesh, target, n_points=60_000)["chamfer_mm"]


def test_fit_of_a_training_scan_reaches_its_trained_codes(loaded_model, scan_target):
    model, ck = loaded_model
    scan, target = scan_target
    trained, neutral = trained_codes(model, ck, KEY)
    steps = []
    result = fit(model, target, progress=lambda s, n, losses: steps.append((s, n, losses["total"])))
    rep = result.report
    schedule = FitSchedule.fast()
    assert not rep.cancelled and rep.steps == schedule.total_steps == len(rep.losses) == len(steps)
    assert rep.evaluations == schedule.evaluations() and rep.seconds > 0
    # The point of the schedule: far fewer SDF queries than 1,500 plain steps.
    assert rep.evaluations * 3 <= FitSchedule.plain().evaluations()
    assert {"sdf", "embedding", "total", "lr"} <= set(rep.losses[0])
    assert {"eikonal", "normal"} <= set(rep.losses[-1])  # second stage: full objective
    json.dumps(rep.to_json())

    c_trained = _chamfer(model, trained, target, neutral)
    c_fit = _chamfer(model, result.codes, target)
    c_mean = _chamfer(model, mean_codes(model), target)
    assert c_fit <= 1.10 * c_trained, (c_fit, c_trained, c_mean)
    assert c_fit < c_mean


def test_results_come_back_in_the_scans_own_frame(loaded_model, tiny_model):
    """A scan in another pose (rotated, moved) gets its mesh back in that pose."""
    model, ck = loaded_model
    scan = _scan(tiny_model)
    a = np.radians(25.0)
    rot = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
    shift = np.array([30.0, -500.0, 1200.0])
    scan.vertices = scan.vertices @ rot.T + shift
    scan.landmarks = scan.landmarks @ rot.T + shift
    target = target_from_scan(scan, n_near=2000, n_uniform=500, n_surface=1000)
    trained, neutral = trained_codes(model, ck, KEY)
    v, f = extract_face_mesh(model, trained, 96, neutral=neutral, normalized_from_scan=target.normalized_from_scan)
    d, _ = cKDTree(scan.vertices).query(v[np.linalg.norm(v - scan.landmarks[2], axis=1) < 60])
    assert np.median(d) < 2.0  # mm: on the moved scan, not at the origin


def test_partial_depth_view(loaded_model, tiny_model):
    model, ck = loaded_model
    scan = _scan(tiny_model)
    nose = scan.landmarks[2]
    camera = nose + np.array([120.0, 40.0, 450.0])  # an oblique single view
    points, tri = simulate_depth_view(scan.vertices, scan.faces, camera, look_at=nose - [0, 0, 40.0],
                                      width=110, height=110, noise=0.3)
    assert len(points) > 1000
    target = target_from_point_cloud(points, scan.landmarks, camera=camera, noise_mm=0.3)
    assert target.free_points is not None and len(target.free_points) > 0
    result = fit(model, target)

    # Completeness over the visible part of the noise-free scan: distance to the fitted surface.
    gt, _ = sample_surface((scan.vertices, scan.faces[np.unique(tri)]), 20_000, seed=1)

    def completeness(codes, neutral=False) -> float:
        v, f = extract_face_mesh(model, codes, RES, neutral=neutral, normalized_from_scan=target.normalized_from_scan)
        pred, _ = sample_surface((v, f), 200_000, seed=2)
        return float(cKDTree(pred).query(gt)[0].mean())

    trained, neutral = trained_codes(model, ck, KEY)
    c_fit, c_mean = completeness(result.codes), completeness(mean_codes(model))
    c_trained = completeness(trained, neutral)
    assert c_fit < 0.8 * c_mean, (c_fit, c_mean, c_trained)
    assert c_fit < 1.3 * c_trained, (c_fit, c_mean, c_trained)


def test_progress_can_cancel_and_event_cancels(loaded_model, scan_target):
    model, _ = loaded_model
    _, target = scan_target
    small = FitSchedule("small", [FitStage(steps=20, points=128, surface=64, detail=False, gradient_terms=False)])
    r = fit(model, target, small, progress=lambda s, n, losses: s < 3)
    assert r.report.cancelled and r.report.steps == 3 and len(r.report.losses) == 3
    ev = threading.Event()
    ev.set()
    r = fit(model, target, small, cancel=ev)
    assert r.report.cancelled and r.report.steps == 0
    assert torch.equal(r.codes.identity, mean_codes(model).identity)  # nothing moved
    # Cancelling from another thread while it runs (the way a UI's cancel button would).
    ev2 = threading.Event()
    r = fit(model, target, small, cancel=ev2, progress=lambda s, n, losses: ev2.set() if s == 5 else None)
    assert r.report.cancelled and r.report.steps == 5


def test_fit_leaves_the_model_as_it_was(loaded_model, scan_target):
    model, _ = loaded_model
    _, target = scan_target
    before = {n: (p.requires_grad, p.detach().clone()) for n, p in model.named_parameters()}
    fit(model, target, FitSchedule("one", [FitStage(steps=2, points=64, surface=32)]))
    for n, p in model.named_parameters():
        assert p.requires_grad == before[n][0] and torch.equal(p, before[n][1]), n


def test_bad_point_clouds_are_refused(tiny_model):
    scan = _scan(tiny_model)
    lm = scan.landmarks
    with pytest.raises(FitInputError, match="empty"):
        target_from_point_cloud(np.zeros((0, 3)), lm)
    pts = scan.vertices[:500].copy()
    pts[7] = np.nan
    with pytest.raises(FitInputError, match="NaN"):
        target_from_point_cloud(pts, lm)
    with pytest.raises(FitInputError, match="metres"):
        target_from_point_cloud(scan.vertices / 1000.0, lm / 1000.0)
    # Declared units are honoured: the same cloud in metres with units_to_mm=1000 is fine.
    t = target_from_point_cloud(scan.vertices[::5] / 1000.0, lm / 1000.0, units_to_mm=1000.0)
    back = np.linalg.inv(t.normalized_from_scan)
    p = t.surface_points[:3].double().numpy()
    assert np.abs(p @ back[:3, :3].T + back[:3, 3]).max() < 1.0  # back in metres
