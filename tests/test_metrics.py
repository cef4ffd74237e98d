"""Reconstruction metrics against analytic values (NPHM thesis §5.3, ImFace++ §4.3)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import trimesh

from backend.geometry.extraction import extract_mesh
from backend.geometry.metrics import (BallRegion, chamfer_l1, compare_meshes, correspondence_error, fscore,
                                      normal_consistency, point_cloud_metrics, sample_surface)

N = 200_000


def ico(radius: float) -> trimesh.Trimesh:
    return trimesh.creation.icosphere(subdivisions=5, radius=radius)


def uv(radius: float) -> trimesh.Trimesh:
    return trimesh.creation.uv_sphere(radius=radius, count=[128, 128])


def square(size: float = 100.0, n: int = 40, tilt_deg: float = 0.0, bump: float = 0.0) -> trimesh.Trimesh:
    """A size x size grid in z = 0 (rotated about x by tilt_deg); `bump` lifts vertices with x > 30."""
    xs = np.linspace(-size / 2, size / 2, n)
    x, y = np.meshgrid(xs, xs, indexing="ij")
    v = np.c_[x.ravel(), y.ravel(), np.where(x.ravel() > 30, bump, 0.0)]
    idx = np.arange(n * n).reshape(n, n)
    a, b, c, d = idx[:-1, :-1].ravel(), idx[1:, :-1].ravel(), idx[1:, 1:].ravel(), idx[:-1, 1:].ravel()
    f = np.r_[np.c_[a, b, c], np.c_[a, c, d]]
    t = math.radians(tilt_deg)
    rot = np.array([[1, 0, 0], [0, math.cos(t), -math.sin(t)], [0, math.sin(t), math.cos(t)]])
    return trimesh.Trimesh(v @ rot.T, f, process=False)


def test_hand_made_point_sets() -> None:
    pred = np.array([[0.0, 0, 0], [10.0, 0, 0]])
    gt = np.array([[0.0, 0, 0]])
    m = point_cloud_metrics(pred, gt, threshold=1.0)
    assert m["accuracy"] == pytest.approx(5.0) and m["completeness"] == pytest.approx(0.0)
    assert m["chamfer_l1"] == pytest.approx(2.5)
    assert m["precision"] == pytest.approx(0.5) and m["recall"] == pytest.approx(1.0)
    assert m["fscore"] == pytest.approx(2 * 0.5 / 1.5)
    # Euclidean by default; p=1 is the thesis' Manhattan norm.
    assert chamfer_l1(np.array([[1.0, 1.0, 0.0]]), gt) == pytest.approx(math.sqrt(2))
    assert chamfer_l1(np.array([[1.0, 1.0, 0.0]]), gt, p=1) == pytest.approx(2.0)
    assert fscore(np.array([[5.0, 0, 0]]), gt) == 0.0
    with pytest.raises(ValueError):
        point_cloud_metrics(np.zeros((0, 3)), gt)


def sampling_floor(area: float, n: int) -> float:
    """Mean distance from a point to the nearest of n independent uniform samples of an area:
    1 / (2 sqrt(density)) for a Poisson process."""
    return 0.5 / math.sqrt(n / area)


@pytest.mark.parametrize("r2,expect_f,n", [(50.5, 1.0, N), (53.0, 0.0, N // 4)])
def test_concentric_spheres(r2: float, expect_f: float, n: int) -> None:
    # Same tessellation and seed: the samples of one sphere are the radial images of the other's, so
    # Chamfer-L1 is exactly the radius difference (up to the facets' sagitta, ~0.006 mm here).
    m = compare_meshes(ico(50.0), ico(r2), n_points=n, threshold_mm=1.0)
    assert m["chamfer_l1"] == pytest.approx(r2 - 50.0, abs=0.01)
    assert m["accuracy"] == pytest.approx(m["completeness"], abs=0.01)
    assert m["fscore"] == expect_f
    assert m["normal_consistency"] > 0.999
    # Independent samplings (other tessellation): within the sampling floor above the difference.
    m = compare_meshes(ico(50.0), uv(r2), n_points=n, threshold_mm=1.0)
    floor = sampling_floor(4 * math.pi * 50.0 ** 2, n)
    assert r2 - 50.0 - 0.02 <= m["chamfer_l1"] <= r2 - 50.0 + floor
    assert m["fscore"] == pytest.approx(expect_f, abs=0.01)


def test_identical_meshes() -> None:
    m = compare_meshes(ico(50.0), ico(50.0), n_points=N)
    assert m["chamfer_l1"] == 0.0 and m["fscore"] == 1.0
    assert m["normal_consistency"] == pytest.approx(1.0)
    # Same surface, independent samples: only the sampling floor remains.
    m = compare_meshes(ico(50.0), uv(50.0), n_points=N)
    assert m["chamfer_l1"] == pytest.approx(sampling_floor(4 * math.pi * 50.0 ** 2, N), rel=0.2)
    assert m["fscore"] > 0.999
    assert m["normal_consistency"] == pytest.approx(1.0, abs=2e-3)


@pytest.mark.parametrize("angle", [10.0, 30.0, 60.0])
def test_plane_vs_tilted_plane_normal_consistency(angle: float) -> None:
    pa, na = sample_surface(square(), 20_000, seed=1)
    pb, nb = sample_surface(square(tilt_deg=angle), 20_000, seed=2)
    assert normal_consistency(pa, na, pb, nb) == pytest.approx(math.cos(math.radians(angle)), abs=1e-9)


def test_region_restricts_the_comparison() -> None:
    flat, bumped = square(n=41), square(n=41, bump=5.0)  # differ only where x > 30
    whole = compare_meshes(flat, bumped, n_points=50_000)
    face = compare_meshes(flat, bumped, n_points=50_000, region=BallRegion((0.0, 0.0, 0.0), 25.0))
    assert whole["chamfer_l1"] > 0.5 and whole["fscore"] < 0.95
    assert face["chamfer_l1"] < 0.2 and face["fscore"] == 1.0
    pts, _ = sample_surface(flat, 50_000, region=BallRegion((0.0, 0.0, 0.0), 25.0))
    assert np.linalg.norm(pts, axis=1).max() <= 25.0
    # The same with per-vertex masks.
    keep = flat.vertices[:, 0] < 25.0
    masked = compare_meshes(flat, bumped, n_points=50_000, mask_a=keep, mask_b=keep)
    assert masked["chamfer_l1"] < 0.2 and masked["fscore"] == 1.0


def test_correspondence_error() -> None:
    gt = np.random.default_rng(0).normal(size=(100, 3))
    offset = np.zeros_like(gt)
    offset[:, 1] = 2.0
    offset[:10, 1] = 12.0
    assert correspondence_error(gt + offset, gt) == pytest.approx(3.0)
    mask = np.arange(100) >= 10
    assert correspondence_error(gt + offset, gt, mask=mask) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        correspondence_error(gt[:5], gt)


def test_extracted_sphere_in_mm() -> None:
    # Model units (1 unit = 100 mm): a sphere of 0.5 units extracted at 96³ against a 50 mm sphere.
    v, f = extract_mesh(lambda p: p.norm(dim=1) - 0.5, resolution=96)
    m = compare_meshes((v * 100.0, f), ico(50.0), n_points=N)
    assert m["chamfer_l1"] < 0.3 and m["fscore"] > 0.99 and m["normal_consistency"] > 0.99
