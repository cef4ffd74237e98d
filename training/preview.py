"""Preview images during training: marching cubes on a few training faces, rendered to one PNG.

The renderer is isolated in `render_preview`: it uses the project's numpy rasteriser
(`training.data.preview.render_grid`) when that module is present, else a small matplotlib fallback.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch


@torch.no_grad()
def sample_grid_sdf(sdf_fn: Callable[[torch.Tensor], torch.Tensor], resolution: int, chunk: int,
                    device: torch.device | str = "cpu") -> np.ndarray:
    """SDF on a resolution³ grid over [-1, 1]³, queried in chunks and only inside the unit sphere.

    `sdf_fn` maps (1, n, 3) points to (1, n) values. Outside the sphere (where the model was never
    trained) the volume is set to a positive value so no stray surface appears there.
    """
    lin = torch.linspace(-1.0, 1.0, resolution)
    grid = torch.stack(torch.meshgrid(lin, lin, lin, indexing="ij"), dim=-1).reshape(-1, 3)
    inside = grid.norm(dim=-1) <= 1.0
    values = torch.full((grid.shape[0],), 1.0)
    pts = grid[inside]
    out = []
    for start in range(0, pts.shape[0], chunk):
        p = pts[start:start + chunk].to(device).unsqueeze(0)
        out.append(sdf_fn(p).reshape(-1).float().cpu())
    if out:
        values[inside] = torch.cat(out)
    return values.reshape(resolution, resolution, resolution).numpy()


def marching_cubes(volume: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Zero level set of a grid over [-1, 1]³ as (vertices in model units, faces), or None if empty."""
    from skimage.measure import marching_cubes as mc

    if not (volume.min() < 0.0 < volume.max()):
        return None
    res = volume.shape[0]
    spacing = 2.0 / (res - 1)
    verts, faces, _, _ = mc(volume, level=0.0, spacing=(spacing, spacing, spacing))
    return (verts - 1.0).astype(np.float32), faces.astype(np.int64)


def render_preview(meshes: list[tuple[np.ndarray, np.ndarray] | None], labels: list[str], title: str,
                   path: str | Path, cell: int = 192) -> Path:
    """One PNG row of front views, one per mesh (None: no surface yet), labelled.

    The only place that knows about renderers: the project's numpy rasteriser
    (`training.data.preview.render_grid`) when present, else a matplotlib fallback.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        from training.data.preview import render_grid
    except ImportError:
        render_grid = None
    if render_grid is not None:
        tmp = path.with_name(f".{path.stem}.tmp.png")
        render_grid([meshes], [title], labels, tmp, cell=(cell, int(cell * 1.25)))
        os.replace(tmp, path)
        return path
    tiles = [_render_matplotlib(*m, cell) if m is not None else np.full((cell, cell, 3), 40, np.uint8)
             for m in meshes]
    save_png(tile_row(tiles), path)
    return path


def _render_matplotlib(vertices: np.ndarray, faces: np.ndarray, size: int) -> np.ndarray:
    """Fallback: orthographic view along -z, Lambert shading, painter's algorithm."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.collections import PolyCollection
    from matplotlib.figure import Figure

    tri = vertices[faces]                                    # (F, 3, 3)
    n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    n /= np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)
    light = np.array([0.3, 0.4, 1.0]) / np.linalg.norm([0.3, 0.4, 1.0])
    shade = np.clip(np.abs(n @ light), 0.0, 1.0) * 0.8 + 0.15
    order = np.argsort(tri[:, :, 2].mean(axis=1))            # far to near
    fig = Figure(figsize=(size / 100.0, size / 100.0), dpi=100)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_facecolor((0.16, 0.16, 0.16))
    colors = np.stack([shade * 0.95, shade * 0.85, shade * 0.78], axis=1)[order]
    ax.add_collection(PolyCollection(tri[order][:, :, :2], facecolors=colors, edgecolors="none"))
    ax.set_xlim(-1, 1)
    ax.set_ylim(-1, 1)
    ax.set_aspect("equal")
    ax.axis("off")
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def save_png(image: np.ndarray, path: str | Path) -> None:
    """Write an RGB uint8 array atomically (temporary file, then rename)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(image).save(tmp, format="PNG")
    os.replace(tmp, path)


def tile_row(tiles: list[np.ndarray], gap: int = 4) -> np.ndarray:
    h = max(t.shape[0] for t in tiles)
    parts = []
    for i, t in enumerate(tiles):
        if i:
            parts.append(np.full((h, gap, 3), 255, dtype=np.uint8))
        parts.append(t)
    return np.concatenate(parts, axis=1)
