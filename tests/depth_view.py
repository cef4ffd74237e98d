"""A depth camera simulated by ray casting: partial views of a mesh for the point-cloud fitting tests."""
from __future__ import annotations

import numpy as np


def simulate_depth_view(vertices: np.ndarray, faces: np.ndarray, camera: np.ndarray,
                        look_at: np.ndarray | None = None, up: tuple[float, float, float] = (0.0, 1.0, 0.0),
                        fov_degrees: float = 35.0, width: int = 160, height: int = 160, noise: float = 0.0,
                        seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Back-project one depth image of a mesh: a pinhole camera at `camera` looking at `look_at`
    (default: the mesh centre), one ray per pixel cast with trimesh (Embree when installed), the first
    hit per pixel, Gaussian noise of std `noise` (mesh units) along the ray. Returns (points (N, 3),
    index of the triangle each point lies on)."""
    import trimesh

    mesh = trimesh.Trimesh(np.asarray(vertices, dtype=np.float64), np.asarray(faces, dtype=np.int64),
                           process=False)
    cam = np.asarray(camera, dtype=np.float64).reshape(3)
    at = mesh.vertices.mean(0) if look_at is None else np.asarray(look_at, dtype=np.float64).reshape(3)
    fwd = at - cam
    fwd /= np.linalg.norm(fwd)
    right = np.cross(fwd, np.asarray(up, dtype=np.float64))
    right /= np.linalg.norm(right)
    true_up = np.cross(right, fwd)
    half = np.tan(np.radians(fov_degrees) / 2)
    u = np.linspace(-half, half, width)
    v = np.linspace(half, -half, height) * height / width
    uu, vv = np.meshgrid(u, v)
    dirs = fwd + uu.reshape(-1, 1) * right + vv.reshape(-1, 1) * true_up
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    origins = np.broadcast_to(cam, dirs.shape).copy()
    locations, ray_index, tri_index = mesh.ray.intersects_location(origins, dirs, multiple_hits=False)
    if noise > 0:
        rng = np.random.default_rng(seed)
        locations = locations + rng.normal(0.0, noise, len(locations))[:, None] * dirs[ray_index]
    return np.asarray(locations), np.asarray(tri_index)
