"""Preview images during training: a few training faces (meshes from the trainer), rendered to one PNG
with the project's numpy rasteriser (`training.data.preview.render_grid`)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from training.data.preview import render_grid


def render_preview(meshes: list[tuple[np.ndarray, np.ndarray] | None], labels: list[str], title: str,
                   path: str | Path, cell: int = 192) -> Path:
    """One PNG row of front views, one per mesh (None: no surface yet), labelled, written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    render_grid([meshes], [title], labels, tmp, cell=(cell, int(cell * 1.25)))
    os.replace(tmp, path)
    return path
