"""Topology-consistent decode (`TopologyDecoder`): codes -> a ~20k-vertex mesh in the template's order.

Measured on an animation-like sequence of codes (expression interpolation of one person, then an
identity change), after the template mesh was extracted once:
* cold: a fresh decoder (autograd Jacobians at every vertex, iterations from the template position);
* warm: each frame starts from the previous frame's solution and inverse Jacobians, moved by the
  secant predictor; frames that only change the expression reuse the identity inversion. The same
  frames without the predictor are timed too (the ratio).
Against the straightforward ways, both measured here (nothing extrapolated):
* marching cubes + nearest-neighbour re-ordering: extract the face (narrow-band marching cubes),
  warp its vertices to template space, give each template vertex its nearest marching-cubes vertex;
* per-vertex Newton: the same equations solved one vertex at a time (autograd Jacobian of the 3-vector
  warp per vertex, `torch.autograd.functional.jacobian`), timed on a subset of vertices.

    python benchmarks/bench_decode.py                                # trains a small model first
    python benchmarks/bench_decode.py --model runs/imface-cpu/model.safetensors --threads 2
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend.animation_decode import extract_template_mesh, TopologyDecoder  # noqa: E402
from backend.correspondence import to_template  # noqa: E402
from backend.codes import training_face_codes  # noqa: E402
from backend.editing import interpolate, sample_codes  # noqa: E402
from backend.fitting import extract_face_mesh  # noqa: E402
from backend.model.io import load_model  # noqa: E402


def ms(seconds: float) -> str:
    return f"{1e3 * seconds:8.1f} ms"


def play(decoder: TopologyDecoder, frames: list) -> tuple[list[float], list]:
    """Decode the frames in order (each warm-starting from the last): seconds per frame, the meshes."""
    seconds, decoded = [], []
    for codes in frames:
        t = time.perf_counter()
        decoded.append(decoder.decode(codes))
        seconds.append(time.perf_counter() - t)
    return seconds, decoded


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="trained model.safetensors (default: train a small one first)")
    ap.add_argument("--vertices", type=int, default=20_000, help="aimed template size")
    ap.add_argument("--frames", type=int, default=24, help="frames per part of the sequence")
    ap.add_argument("--newton-vertices", type=int, default=200, help="vertices for the per-vertex Newton baseline")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from tests.model_fixture import model_for_benchmark

    args.model, _, tmp = model_for_benchmark(args.model, args.threads, "decode")
    model, ck = load_model(args.model)

    # Template mesh of about --vertices vertices (vertex count grows with the square of the grid).
    t0 = time.perf_counter()
    probe = extract_template_mesh(model, 96)
    res = int(round(96 * np.sqrt(args.vertices / max(1, len(probe.vertices)))))
    template = extract_template_mesh(model, res)
    print(f"model {args.model}; threads {args.threads}; template mesh {res}³: {len(template.vertices):,} vertices, "
          f"{len(template.faces):,} triangles ({time.perf_counter() - t0:.1f} s for both extractions, once)")

    # A sequence: person A's expressions morph (A1 -> A2), then the identity changes to person B.
    scans = ck.dataset.get("scans", [])
    by_id: dict[int, list[int]] = {}
    for i, s in enumerate(scans):
        by_id.setdefault(s["identity_index"], []).append(i)
    ids = sorted(by_id)
    if len(ids) >= 2 and len(by_id[ids[0]]) >= 2:
        a1 = training_face_codes(model, by_id[ids[0]][-1], ids[0])
        a2 = training_face_codes(model, by_id[ids[0]][-2], ids[0])
        b = training_face_codes(model, by_id[ids[1]][-1], ids[1])
    else:
        a1, a2, b = (sample_codes(model, 1, seed=s) for s in range(3))
    expr_frames = [interpolate(a1, a2, {"expression": t, "detail": t}) for t in np.linspace(0, 1, args.frames)]
    id_frames = [interpolate(a2, b, t) for t in np.linspace(0, 1, args.frames)]

    # The straightforward warm start, for the ratio: each frame starts from the previous solution.
    plain = TopologyDecoder(model, template, secant_predictor=False)
    plain.decode(a1)
    plain_e, _ = play(plain, expr_frames[1:])
    plain_i, _ = play(plain, id_frames[1:])

    dec = TopologyDecoder(model, template)
    colds = []
    for _ in range(3):
        dec.reset()
        t = time.perf_counter()
        cold = dec.decode(a1)
        colds.append(time.perf_counter() - t)
    dec.reset()
    dec.decode(a1)
    warm_e, decoded_e = play(dec, expr_frames[1:])
    warm_i, decoded_i = play(dec, id_frames[1:])
    worst = max(float(d.residual.max()) for d in decoded_e + decoded_i)
    unconverged = sum(d.n_unconverged for d in decoded_e + decoded_i)
    d = decoded_i[-1]
    check = dec.check_residuals(d, id_frames[-1]).max()
    print(f"\n{len(template.vertices):,}-vertex decode (median of runs):")
    print(f"  cold (fresh decoder)                         {ms(statistics.median(colds))}")
    print(f"  warm, expression frames ({len(warm_e)})                {ms(statistics.median(warm_e))}"
          f"   (p90 {ms(float(np.percentile(warm_e, 90))).strip()})")
    print(f"  warm, identity frames ({len(warm_i)})                  {ms(statistics.median(warm_i))}"
          f"   (p90 {ms(float(np.percentile(warm_i, 90))).strip()})")
    print(f"  without the secant predictor (start at the previous solution): expression frames "
          f"{ms(statistics.median(plain_e)).strip()}, identity frames {ms(statistics.median(plain_i)).strip()} "
          f"(x{statistics.median(plain_e) / statistics.median(warm_e):.2f}, "
          f"x{statistics.median(plain_i) / statistics.median(warm_i):.2f} the time with it)")
    print(f"  inversion residual: max {worst:.2e} model units over all frames, {unconverged} vertex-frames "
          f"not converged; recomputed I(E(x)) residual of the last frame {check:.2e}")
    print(f"  cold stats: {({k: float(f'{v:.4g}') for k, v in cold.stats.items()})}")

    # Baseline 1: marching cubes + nearest-neighbour re-ordering (one frame).
    codes = id_frames[-1]
    t = time.perf_counter()
    v_mc, f_mc = extract_face_mesh(model, codes, res)
    t_mc = time.perf_counter() - t
    v_mc = v_mc / 100.0
    t = time.perf_counter()
    warped = to_template(model, v_mc, codes)
    from scipy.spatial import cKDTree

    _, nn = cKDTree(warped).query(template.vertices, workers=-1)
    reordered = v_mc[nn]
    t_nn = time.perf_counter() - t
    gap = np.linalg.norm(reordered - d.vertices, axis=1) * 100.0
    print(f"\nmarching cubes + nearest-neighbour re-ordering ({res}³, same frame):")
    print(f"  extraction {ms(t_mc).strip()} + warp and nearest neighbours {ms(t_nn).strip()} = "
          f"{ms(t_mc + t_nn).strip()}"
          f"  ({(t_mc + t_nn) / statistics.median(warm_i):.0f}x a warm identity frame)")
    print(f"  its vertices vs the decode: median {np.median(gap):.3f} mm, p99 {np.percentile(gap, 99):.3f} mm "
          f"(snapped to the grid's vertices; several template vertices share one: "
          f"{len(nn) - len(np.unique(nn)):,} duplicates)")

    # Baseline 2: per-vertex Newton (same equations, one vertex at a time).
    rng = np.random.default_rng(0)
    sub = rng.choice(len(template.vertices), size=min(args.newton_vertices, len(template.vertices)), replace=False)
    fld = model.field(codes, frozen=True)

    def chain(p: torch.Tensor) -> torch.Tensor:
        return fld.to_template(p.reshape(1, 3))[0]

    t = time.perf_counter()
    sol = []
    for i in sub:
        target = torch.from_numpy(template.vertices[i]).float()
        x = target.clone()
        for _ in range(20):
            r = chain(x).detach() - target
            if float(r.norm()) < dec.tolerance:
                break
            jac = torch.autograd.functional.jacobian(chain, x)
            x = x - torch.linalg.solve(jac, r)
        sol.append(x.numpy())
    t_newton = time.perf_counter() - t
    per_vertex = t_newton / len(sub)
    base = dec._exp.x.cpu().numpy()[sub]  # the batched solution (before the normal offset)
    print(f"\nper-vertex Newton on {len(sub)} vertices (one at a time): {t_newton:.2f} s = {1e3 * per_vertex:.2f} ms "
          f"per vertex; max difference to the batched solution {np.abs(np.array(sol) - base).max():.2e} units")
    print(f"  (the batched warm decode: {1e6 * statistics.median(warm_i) / len(template.vertices):.2f} µs per vertex)")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
