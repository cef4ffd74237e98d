"""Where the topology-consistent decode tears (report only): the animation decode's template faces that
stretch, and the template vertices with no pre-image, when the expression code moves along its
principal components.

For each of the leading expression components (those that carry `--variance` of the training codes,
at most `--components`), the mean codes are decoded with that component at ±`--sigmas` standard
deviations (the Blender panel's sliders reach ±3). Printed per probe: faces whose longest edge grows
more than 3x / 5x against the mean codes' decode, the longest edge (mm), and unconverged vertices
(residual above the decoder's flag tolerance). Each probe is decoded warm from the previous one, as the
decoder runs in the product, but with a jump, not along a timeline. A mouth that opens in the training
data but is closed in the template shows here: the lip-contact band of the template hangs across the
opening.

    .venv/bin/python benchmarks/decode_tears.py --model runs/default/train/model.safetensors [--render DIR]

The worst probe is then reached again along a timeline (`--timeline` steps from the mean codes, each
decode warm from the last) and by a cold decode, and the two meshes are compared.
`--render DIR` writes flat-shaded front views (matplotlib) of the mouth region for the worst probe.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backend.animation_decode import TopologyDecoder, extract_template_mesh  # noqa: E402
from backend.codes import mean_codes  # noqa: E402
from backend.editing import code_pca  # noqa: E402
from backend.model import FaceCodes  # noqa: E402
from backend.model.io import load_model  # noqa: E402
from backend.scans.frame import MM_PER_UNIT  # noqa: E402


def longest_edges(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    t = vertices[faces]
    return np.linalg.norm(t - np.roll(t, 1, axis=1), axis=2).max(1)


def render(vertices: np.ndarray, faces: np.ndarray, centre: np.ndarray, path: Path, half_mm: float = 30.0) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import PolyCollection

    tri = vertices[faces] * MM_PER_UNIT
    n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    n /= np.linalg.norm(n, axis=1, keepdims=True) + 1e-12
    light = np.array([0.3, 0.3, 1.0]) / np.linalg.norm([0.3, 0.3, 1.0])
    shade = np.clip(n @ light, 0.0, 1.0)
    order = np.argsort(tri[:, :, 2].mean(1))  # painter's order, far to near
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.add_collection(PolyCollection(tri[order][:, :, :2], facecolors=plt.cm.gray(0.15 + 0.8 * shade[order]),
                                     edgecolors="none"))
    ax.set_aspect("equal")
    ax.set_xlim(centre[0] - half_mm, centre[0] + half_mm)
    ax.set_ylim(centre[1] - half_mm, centre[1] + half_mm)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--sigmas", type=float, default=3.0)
    ap.add_argument("--variance", type=float, default=0.9, help="share of the code variance the probed components carry")
    ap.add_argument("--components", type=int, default=6, help="at most this many components")
    ap.add_argument("--resolution", type=int, default=160, help="template marching-cubes resolution")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--timeline", type=int, default=8,
                    help="steps from the mean codes to the worst probe, to compare with a cold decode (0: skip)")
    ap.add_argument("--render", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    model, _ = load_model(args.model)
    model.eval()
    t0 = time.perf_counter()
    dec = TopologyDecoder(model, extract_template_mesh(model, args.resolution))
    faces = dec.faces
    mean = mean_codes(model)
    base = dec.decode(mean)
    e0 = np.maximum(longest_edges(base.vertices, faces), 1e-12)
    pca = code_pca(model, "expression")
    share = np.cumsum(pca.explained.numpy())
    k = int(min(args.components, len(share), np.searchsorted(share, args.variance) + 1))
    print(f"template: {len(base.vertices)} vertices, {len(faces)} faces ({time.perf_counter() - t0:.1f} s with the "
          f"mean decode); mean codes: {base.n_unconverged} unconverged, longest edge "
          f"{e0.max() * MM_PER_UNIT:.2f} mm; {k} components ({share[k - 1]:.0%} of the expression variance)")
    print("| probe | faces > 3x | faces > 5x | longest edge mm | unconverged vertices | decode s |")
    print("|---|---:|---:|---:|---:|---:|")
    worst: tuple[int, str, np.ndarray, np.ndarray, FaceCodes] | None = None
    for i in range(k):
        for s in (args.sigmas, -args.sigmas):
            coef = [0.0] * i + [s]
            t = time.perf_counter()
            codes = FaceCodes(mean.identity, pca.code(coef), mean.detail)
            d = dec.decode(codes)
            ratio = longest_edges(d.vertices, faces) / e0
            name = f"component {i + 1} {s:+g} sd"
            print(f"| {name} | {(ratio > 3).sum()} | {(ratio > 5).sum()} | "
                  f"{longest_edges(d.vertices, faces).max() * MM_PER_UNIT:.1f} | {d.n_unconverged} | "
                  f"{time.perf_counter() - t:.2f} |")
            score = int((ratio > 3).sum()) + d.n_unconverged
            if worst is None or score > worst[0]:
                worst = (score, name, d.vertices, ratio, codes)
    if worst is not None and worst[0] > 0 and args.timeline > 0:
        # The same codes reached the way a timeline reaches them: from the mean codes in small steps,
        # each decode warm from the last; and cold, by a fresh decoder.
        runs = {}
        for how in ("timeline", "cold"):
            d2 = TopologyDecoder(model, dec.template)
            if how == "timeline":
                d2.decode(mean)
                for t in np.linspace(0.0, 1.0, args.timeline + 1)[1:]:
                    step = FaceCodes(mean.identity, torch.lerp(mean.expression, worst[4].expression, float(t)),
                                     mean.detail)
                    out = d2.decode(step)
            else:
                out = d2.decode(worst[4])
            runs[how] = out
            ratio = longest_edges(out.vertices, faces) / e0
            print(f"{worst[1]}, {how}{f' ({args.timeline} steps)' if how == 'timeline' else ''}: faces > 5x "
                  f"{(ratio > 5).sum()}, unconverged {out.n_unconverged}")
        gap = np.linalg.norm(runs["timeline"].vertices - runs["cold"].vertices, axis=1) * MM_PER_UNIT
        print(f"timeline vs cold: {(gap > 0.1).sum()} vertices more than 0.1 mm apart, max {gap.max():.1f} mm")
    if args.render is not None and worst is not None and worst[0] > 0:
        args.render.mkdir(parents=True, exist_ok=True)
        centre = (base.vertices[faces][worst[3] > 3].mean((0, 1)) if (worst[3] > 3).any()
                  else base.vertices.mean(0)) * MM_PER_UNIT
        render(base.vertices, faces, centre, args.render / "mean_codes.png")
        render(worst[2], faces, centre, args.render / "worst_probe.png")
        print(f"renders of the mean codes and of {worst[1]}: {args.render}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
