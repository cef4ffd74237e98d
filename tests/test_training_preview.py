"""Training previews: meshes of a few faces rendered to one PNG row."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from backend.geometry.extraction import extract_mesh_dense
from training.preview import render_preview


def _sphere(p: torch.Tensor) -> torch.Tensor:
    return p.norm(dim=-1) - 0.5


def test_render_preview_writes_a_png(tmp_path):
    mesh = extract_mesh_dense(_sphere, resolution=20)
    out = render_preview([mesh, None], ["a", "b"], "step 1", tmp_path / "preview.png", cell=64)
    img = np.asarray(Image.open(out))
    assert img.shape[1] >= 128
    assert img.std() > 5  # something was drawn
    assert not list(tmp_path.glob(".*tmp*"))  # written atomically
