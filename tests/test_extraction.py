"""Narrow-band marching cubes: same mesh as the dense grid, far fewer SDF queries."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import trimesh
from model_fixture import loaded_model, one_thread, tiny_model, trained_codes  # noqa: F401  (fixtures)

from backend.geometry.extraction import extract_mesh, extract_mesh_dense
from backend.scans.frame import to_scan_frame


def sphere(radius: float = 0.5, center: tuple[float, float, float] = (0.0, 0.0, 0.0)):
    c = torch.tensor(center)
    return lambda p: (p - c).norm(dim=1) - radius


def bumpy(p: torch.Tensor) -> torch.Tensor:
    # Height-field-like face stand-in: z = 0.1 + bumps; negative behind, cut by the unit sphere.
    # Gradient norm <= sqrt(1 + 0.75² + 0.6²) / 1.6 < 1, so it is 1-Lipschitz.
    return (p[:, 2] - 0.15 * torch.sin(5 * p[:, 0]) * torch.cos(4 * p[:, 1]) - 0.1) / 1.6


def union_of_spheres(p: torch.Tensor) -> torch.Tensor:
    parts = [sphere(0.35, (-0.3, 0.0, 0.0)), sphere(0.3, (0.35, 0.1, 0.0)), sphere(0.12, (0.0, 0.55, 0.3)),
             sphere(0.04, (0.0, -0.6, -0.2))]  # the last one is smaller than a coarse cell
    return torch.stack([f(p) for f in parts]).min(0).values


def assert_same_mesh(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> None:
    (va, fa), (vb, fb) = a, b
    assert va.shape == vb.shape and fa.shape == fb.shape
    assert np.array_equal(fa, fb)
    assert np.abs(va - vb).max(initial=0.0) < 1e-6


def test_sphere_radius_and_orientation() -> None:
    res = 96
    v, f = extract_mesh(sphere(0.5), resolution=res)
    r = np.linalg.norm(v, axis=1)
    assert abs(r.mean() - 0.5) < 1.0 / res
    assert np.abs(r - 0.5).max() < 2.0 / res
    mesh = trimesh.Trimesh(v, f, process=False)
    # Outward normals (negative inside): positive enclosed volume, close to 4/3 π r³.
    assert mesh.volume == pytest.approx(4 / 3 * math.pi * 0.5 ** 3, rel=0.02)


@pytest.mark.parametrize("name,fn,res,coarse", [
    ("sphere", sphere(0.5), 128, 16),
    ("bumpy", bumpy, 97, 8),                  # reaches the sphere: closed off there; odd resolution
    ("union", union_of_spheres, 100, 16),     # strides that do not divide the grid
    ("offcentre", sphere(0.3, (0.55, -0.4, 0.2)), 64, 4),
])
def test_narrow_band_equals_dense(name, fn, res, coarse) -> None:
    va, fa, sa = extract_mesh(fn, resolution=res, coarse=coarse, band=1.0, return_stats=True)
    vb, fb, sb = extract_mesh_dense(fn, resolution=res, return_stats=True)
    assert len(fa) > 100
    assert_same_mesh((va, fa), (vb, fb))
    assert sa.sign_violations == 0
    assert sa.queries * 3 < sb.queries, (sa.queries, sb.queries)
    assert sa.kept_cells < sa.dense_points / 10


def test_query_savings_grow_with_resolution() -> None:
    _, _, s64 = extract_mesh(sphere(0.5), resolution=64, return_stats=True)
    _, _, s128 = extract_mesh(sphere(0.5), resolution=128, return_stats=True)
    # Surface ~ n², grid ~ n³: the share of queried points about halves per doubling.
    share64 = s64.queries / s64.dense_points
    share128 = s128.queries / s128.dense_points
    assert share128 < 0.65 * share64
    assert s128.queries < 0.06 * s128.dense_points


def test_chunk_size_does_not_change_the_result() -> None:
    sizes: list[int] = []

    def fn(p: torch.Tensor) -> torch.Tensor:
        sizes.append(len(p))
        return union_of_spheres(p)

    big = extract_mesh(fn, resolution=64)
    sizes.clear()
    small = extract_mesh(fn, resolution=64, chunk=1000)
    assert max(sizes) <= 1000
    assert_same_mesh(big, small)
    assert_same_mesh(extract_mesh_dense(union_of_spheres, resolution=64, chunk=4099), big)


def test_no_autograd_and_inference_mode_switch() -> None:
    seen = []

    def fn(p: torch.Tensor) -> torch.Tensor:
        seen.append((torch.is_inference_mode_enabled(), torch.is_grad_enabled(), p.dtype, p.shape[1]))
        return sphere(0.5)(p)

    extract_mesh(fn, resolution=32)
    assert all(s == (True, False, torch.float32, 3) for s in seen)
    seen.clear()
    extract_mesh(fn, resolution=32, inference_mode=False)  # no_grad: a function may enable grad locally
    assert all(s == (False, False, torch.float32, 3) for s in seen)

    def needs_grad(p: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x = p.detach().requires_grad_(True)
            y = x.norm(dim=1) - 0.5
            g, = torch.autograd.grad(y.sum(), x)
        return y.detach() + 0 * g[:, 0]

    with pytest.raises(RuntimeError, match="inference_mode=False"):
        extract_mesh(needs_grad, resolution=16)
    v, _ = extract_mesh(needs_grad, resolution=16, inference_mode=False)
    assert len(v)


def test_outside_sphere_handling() -> None:
    # A plane through the origin: with outside_positive the half-ball below it is closed by the
    # sphere (never queried outside it); without, the plane crosses the whole cube.
    def plane(p: torch.Tensor) -> torch.Tensor:
        assert (p.norm(dim=1) <= 1.0 + 1e-6).all() or not plane.check
        return p[:, 2]

    plane.check = True
    v, f, s = extract_mesh(plane, resolution=48, return_stats=True)
    assert np.linalg.norm(v, axis=1).max() < 1.0 + 2.0 / 47
    assert trimesh.Trimesh(v, f, process=False).is_watertight
    assert_same_mesh((v, f), extract_mesh_dense(plane, resolution=48))
    plane.check = False
    v2, f2 = extract_mesh(plane, resolution=48, outside_positive=False)
    assert_same_mesh((v2, f2), extract_mesh_dense(plane, resolution=48, outside_positive=False))
    assert np.abs(v2[:, 2]).max() < 1e-6 and np.abs(v2[:, :2]).max() == pytest.approx(1.0)


def test_level_and_radius() -> None:
    v, _ = extract_mesh(sphere(0.2), resolution=64, level=0.1, radius=0.5)
    assert abs(np.linalg.norm(v, axis=1).mean() - 0.3) < 1.0 / 64
    assert np.abs(v).max() <= 0.5


def test_empty_and_full() -> None:
    v, f = extract_mesh(lambda p: p[:, 0] * 0 + 1.0, resolution=32)
    assert v.shape == (0, 3) and f.shape == (0, 3)
    v, f = extract_mesh(sphere(5.0), resolution=32, outside_positive=False)  # all inside
    assert v.shape == (0, 3)


def test_wrong_certificates_are_corrected_by_following_the_surface() -> None:
    # 4x a distance: certificates that assume slope 1 are too optimistic near the surface, so some
    # signs come out wrong; the surface-following step still gives the dense grid's mesh.
    def steep(p: torch.Tensor) -> torch.Tensor:
        return 4.0 * (p.norm(dim=1) - 0.5)

    v, f, s = extract_mesh(steep, resolution=64, band=1.0, return_stats=True)
    assert s.sign_violations > 0 and s.closure_queries > 0
    assert_same_mesh((v, f), extract_mesh_dense(steep, resolution=64))
    # With a band matching the slope no certificate is wrong and nothing needs following.
    v4, f4, s4 = extract_mesh(steep, resolution=64, band=4.0, return_stats=True)
    assert s4.sign_violations == 0 and s4.closure_queries == 0
    assert_same_mesh((v4, f4), (v, f))


def test_narrow_band_equals_dense_on_a_trained_model(loaded_model) -> None:
    # A short-trained ImFace++ (DetailNet included, so the SDF takes a gradient inside) is far from
    # 1-Lipschitz away from the face: the case the surface-following step exists for.
    model, ck = loaded_model
    codes, neutral = trained_codes(model, ck, ck.dataset["scans"][1]["key"])
    with torch.no_grad():
        fld = model.field(codes.detach(), neutral=neutral, frozen=True)

        def face(p: torch.Tensor) -> torch.Tensor:
            return fld.sdf(p, with_detail=True)

        va, fa, sa = extract_mesh(face, resolution=80, inference_mode=False, return_stats=True)
        vb, fb, sb = extract_mesh_dense(face, resolution=80, inference_mode=False, return_stats=True)
    assert len(fa) > 5000
    print(f"trained model 80³: {sa.queries} vs {sb.queries} queries, {sa.sign_violations} wrong certificates, "
          f"{sa.closure_queries} queries following missed surface")
    assert_same_mesh((va, fa), (vb, fb))
    assert sa.queries * 3 < sb.queries, (sa.queries, sb.queries)


def test_to_scan_frame_inverts_normalization() -> None:
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    q *= np.sign(np.linalg.det(q))
    normalized_from_scan = np.eye(4)
    normalized_from_scan[:3, :3] = q / 100.0  # mm -> units of 10 cm
    normalized_from_scan[:3, 3] = [0.1, -0.2, 0.3]
    scan_mm = rng.normal(size=(50, 3)) * 40
    model = scan_mm @ normalized_from_scan[:3, :3].T + normalized_from_scan[:3, 3]
    back = to_scan_frame(model, normalized_from_scan=normalized_from_scan)
    np.testing.assert_allclose(back, scan_mm, atol=1e-9)
    np.testing.assert_allclose(to_scan_frame(model, np.linalg.inv(normalized_from_scan)), scan_mm, atol=1e-9)
    with pytest.raises(ValueError):
        to_scan_frame(model)
