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
decode warm from the last) and by a cold decode, and the two meshes are compared; then along two other
timelines (twice the steps; from the zero expression code), to show whether decodes depend on the path.
`--render DIR` writes front views of the mouth region (the training previews' renderer) for the mean codes and the
worst probe, and of the template (template space) with the faces torn in any probe in red.
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
from training.data.preview import SKIN, render_mesh  # noqa: E402


def longest_edges(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    t = vertices[faces]
    return np.linalg.norm(t - np.roll(t, 1, axis=1), axis=2).max(1)


def render(vertices: np.ndarray, faces: np.ndarray, centre: np.ndarray, path: Path, half_mm: float = 30.0,
           marked: np.ndarray | None = None) -> None:
    """A front view of the square of side 2 * half_mm around `centre` (model units), with the previews' renderer;
    the `marked` faces in red."""
    from PIL import Image

    h = half_mm / MM_PER_UNIT
    bounds = (centre[0] - h, centre[0] + h, centre[1] - h, centre[1] + h)
    colours = None
    if marked is not None:
        colours = np.tile(np.asarray(SKIN, dtype=np.float32), (len(faces), 1))
        colours[marked] = (0.9, 0.15, 0.1)
    image = render_mesh(vertices, faces, size=(400, 400), bounds=bounds, face_colors=colours)
    Image.fromarray(image).save(path)


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
    worst_score, worst_name, worst_codes, worst_mesh, worst_ratio = 0, "", mean, base, np.ones(len(faces))
    torn_anywhere = np.zeros(len(faces), dtype=bool)
    for i in range(k):
        for s in (args.sigmas, -args.sigmas):
            t = time.perf_counter()
            codes = FaceCodes(mean.identity, pca.code([0.0] * i + [s]), mean.detail)
            d = dec.decode(codes)
            edges = longest_edges(d.vertices, faces)
            ratio = edges / e0
            name = f"component {i + 1} {s:+g} sd"
            print(f"| {name} | {(ratio > 3).sum()} | {(ratio > 5).sum()} | {edges.max() * MM_PER_UNIT:.1f} | "
                  f"{d.n_unconverged} | {time.perf_counter() - t:.2f} |")
            score = int((ratio > 3).sum()) + d.n_unconverged
            torn_anywhere |= ratio > 3
            if score > worst_score:
                worst_score, worst_name, worst_codes, worst_mesh, worst_ratio = score, name, codes, d, ratio
    if worst_score == 0:
        return 0
    if args.timeline > 0:
        def along(start: torch.Tensor, steps: int):
            """The worst probe reached the way a timeline reaches it: from `start` in small steps, each
            decode warm from the last."""
            decoder = TopologyDecoder(model, dec.template)
            decoder.decode(FaceCodes(mean.identity, start, mean.detail))
            for t in np.linspace(0.0, 1.0, steps + 1)[1:]:
                out = decoder.decode(FaceCodes(mean.identity, torch.lerp(start, worst_codes.expression, float(t)),
                                               mean.detail))
            return out

        def apart(a: np.ndarray, b: np.ndarray) -> str:
            gap = np.linalg.norm(a - b, axis=1) * MM_PER_UNIT
            return f"{(gap > 0.1).sum()} vertices more than 0.1 mm apart, max {gap.max():.1f} mm"

        timeline = along(mean.expression, args.timeline)
        cold = TopologyDecoder(model, dec.template).decode(worst_codes)
        for how, out in ((f"timeline ({args.timeline} steps)", timeline), ("cold", cold)):
            print(f"{worst_name}, {how}: faces > 5x {(longest_edges(out.vertices, faces) / e0 > 5).sum()}, "
                  f"unconverged {out.n_unconverged}")
        print(f"timeline vs cold: {apart(timeline.vertices, cold.vertices)}")
        # Where the warp folds, the pre-image a vertex lands on depends on the path: other timelines to
        # the same codes (finer steps; from the zero expression code) show whether a rule for cold
        # decodes alone could make decodes agree.
        finer = along(mean.expression, 2 * args.timeline)
        print(f"timeline vs {2 * args.timeline} steps: {apart(timeline.vertices, finer.vertices)}")
        zero = along(torch.zeros_like(mean.expression), args.timeline)
        print(f"timeline vs {args.timeline} steps from the zero expression code: "
              f"{apart(timeline.vertices, zero.vertices)}")
    if args.render is not None:
        args.render.mkdir(parents=True, exist_ok=True)
        torn = worst_ratio > 3
        centre = base.vertices[faces][torn].mean((0, 1)) if torn.any() else base.vertices.mean(0)
        render(base.vertices, faces, centre, args.render / "mean_codes.png")
        render(worst_mesh.vertices, faces, centre, args.render / "worst_probe.png")
        # Where the template tears, in template space: where a cut (or a finer template) would have to go.
        t_centre = dec.template.vertices[faces][torn_anywhere].mean((0, 1))
        render(dec.template.vertices, faces, t_centre, args.render / "torn_in_template.png", half_mm=40.0,
               marked=torn_anywhere)
        print(f"renders of the mean codes, of {worst_name}, and of the template with the faces torn in any probe "
              f"(red): {args.render}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
