"""Subcommands of `imface` that use a trained model (fit, extract, decode, evaluate).

    imface fit MODEL SCAN_FOLDER_OR_MESH_OR_CLOUD --out DIR [--landmarks FILE] [--camera X,Y,Z]
    imface extract MODEL CODES.json --out mesh.ply [--resolution 256] [--template-coords coords.npy]
    imface decode MODEL CODES.json --out mesh.ply          (template topology: fixed vertex order)
    imface evaluate MODEL SCAN_FOLDER --out table.md       (+ table.csv)

Bad input (a file that is not an ImFace++ model, codes of the wrong size, an empty or NaN point
cloud, a scan in other units than declared, ...) ends with exit code 2 and one line on stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from backend.geometry.metrics import EVAL_SETTINGS, REGIONS


class CommandError(Exception):
    """A problem with the user's input, reported as one line with exit code 2."""


def _errors() -> tuple[type[BaseException], ...]:
    from backend.codes import CodesError
    from backend.fitting import FitInputError
    from backend.model.io import CheckpointError
    from backend.scans.folder import ManifestError, ScanError
    from backend.scans.inputs import InputError

    # ValueError covers the rest of the input checks (every error class above but CheckpointError is one);
    # IMFACE_DEBUG=1 shows the traceback instead.
    return (CommandError, CodesError, FitInputError, InputError, CheckpointError, ManifestError, ScanError,
            FileNotFoundError, IsADirectoryError, NotADirectoryError, ValueError)


def _guard(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Run a command; the user's mistakes become `error: ...` (one line) and exit code 2."""

    def run(args: argparse.Namespace) -> int:
        try:
            if getattr(args, "threads", None):
                import torch

                torch.set_num_threads(int(args.threads))
            return fn(args)
        except _errors() as exc:
            if os.environ.get("IMFACE_DEBUG"):
                raise
            msg = " ".join(str(exc).split())
            print(f"error: {msg}", file=sys.stderr)
            return 2

    return run


def _say(args: argparse.Namespace, msg: str) -> None:
    if not getattr(args, "quiet", False):
        print(msg, file=sys.stderr)


# ------------------------------------------------------------------------------------------ helpers


def _load_model(path: str) -> tuple[Any, Any, str]:
    from backend.model.io import load_model, model_fingerprint

    p = Path(path)
    if p.is_dir():
        raise CommandError(f"{p} is a folder; give the model file (e.g. {p / 'model.safetensors'})")
    model, ck = load_model(p)
    return model, ck, model_fingerprint(p)


def _load_codes(path: str, model: Any, fingerprint: str, args: argparse.Namespace):
    from backend.codes import load_codes

    entry = load_codes(path, model)
    if entry.model and fingerprint and entry.model != fingerprint:
        _say(args, f"warning: {path} was written for another model ({entry.model[:12]}...); "
                   "the sizes fit, the face may not")
    return entry


def _write_mesh(path: Path, vertices: np.ndarray, faces: np.ndarray) -> Path:
    import trimesh

    path.parent.mkdir(parents=True, exist_ok=True)
    trimesh.Trimesh(np.asarray(vertices, dtype=np.float64), np.asarray(faces, dtype=np.int64),
                    process=False).export(path)
    return path


def _vector(text: str | None, what: str) -> np.ndarray | None:
    if text is None:
        return None
    try:
        v = np.array([float(t) for t in text.replace(",", " ").split()], dtype=np.float64)
    except ValueError:
        raise CommandError(f"{what} must be three numbers like 0,0,500 (got {text!r})") from None
    if v.shape != (3,) or not np.isfinite(v).all():
        raise CommandError(f"{what} must be three finite numbers like 0,0,500 (got {text!r})")
    return v


def _progress_bar(args: argparse.Namespace, total: int, desc: str):
    """tqdm bar (stderr) and a fit progress callback that advances it."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="step", disable=getattr(args, "quiet", False), leave=False,
               dynamic_ncols=True)

    def cb(step: int, n: int, losses: dict[str, float]) -> None:
        bar.update(step - bar.n)
        if step % 10 == 0 or step == n:
            bar.set_postfix(loss=f"{losses['total']:.3g}")

    return bar, cb


def _schedule(args: argparse.Namespace):
    from backend.fitting import FitSchedule

    if args.schedule == "plain":
        return FitSchedule.plain(steps=args.steps or 1500)
    s = FitSchedule.fast()
    return FitSchedule.scaled(s, args.steps / s.total_steps) if args.steps else s


def _fit_outputs(args: argparse.Namespace, model: Any, fingerprint: str, name: str, result: Any) -> dict[str, Any]:
    """Write codes JSON, mesh, fit report (and the registered mesh) for one fit."""
    from backend.codes import FaceCodesFile, save_codes
    from backend.evaluate import measure_fit

    out = Path(args.out)
    target = result.target
    # The transform stored with the codes maps the scan's own units to the model frame.
    nfs = target.normalized_from_scan
    safe = name.replace("/", "__")
    codes_path = save_codes(out / f"{safe}.codes.json",
                            FaceCodesFile(result.codes, model=fingerprint, neutral=result.neutral,
                                          normalized_from_scan=nfs, source=name))
    written = {"codes": str(codes_path)}
    report = result.report
    if not args.no_mesh:
        v, f = measure_fit(model, result, args.resolution, n_points=args.metric_points,  # metrics: the face
                           watertight=args.watertight)
        written["mesh"] = str(_write_mesh(out / f"{safe}.ply", v, f))
    if args.registered:
        from backend.animation_decode import TopologyDecoder

        dec = getattr(args, "_decoder", None)
        if dec is None:  # one template for every scan of the run: their registered meshes share it
            dec = args._decoder = TopologyDecoder(model, resolution=args.template_resolution)
        d = dec.decode(result.codes, neutral=result.neutral)
        written["registered"] = str(_write_mesh(out / f"{safe}.registered.ply", d.to_frame(nfs), d.faces))
        report.metrics["registered_unconverged_vertices"] = d.n_unconverged
        report.metrics["registered_max_residual"] = float(d.residual.max(initial=0.0))
    rep = report.to_json()
    rep["written"] = written
    (out / f"{safe}.report.json").write_text(json.dumps(rep, indent=1))
    return rep


# ------------------------------------------------------------------------------------------ commands


def _cmd_fit(args: argparse.Namespace) -> int:
    from backend.fitting import target_from_input, target_from_scan
    from backend.fitting.pose import fit_posed
    from backend.scans.folder import ScanError, load_scan, load_scan_folder
    from backend.scans.inputs import read_fit_input

    model, _, fingerprint = _load_model(args.model)
    src = Path(args.input)
    if not src.exists():
        raise CommandError(f"{src} does not exist")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    schedule = _schedule(args)
    jobs: list[tuple[str, Callable[[], Any], bool]] = []  # name, target maker, neutral

    if src.is_dir():
        folder = load_scan_folder(src)
        entries = [e for e in folder.entries if not args.scan or e.key in args.scan]
        if args.scan:
            missing = sorted(set(args.scan) - {e.key for e in entries})
            if missing:
                raise CommandError(f"no scan {', '.join(missing)} in {src}")
        for key, reason in folder.invalid:
            _say(args, f"skipped {key}: {reason}")
        for e in entries:
            jobs.append((e.key, lambda e=e: target_from_scan(load_scan(e, folder.units), seed=args.seed),
                         args.neutral or (args.neutral_labels and e.neutral)))
        if not jobs:
            raise CommandError(f"{src}: no scan to fit")
    else:
        inp = read_fit_input(src, args.units, args.landmarks)
        partial = args.partial or args.camera is not None or args.view_dir is not None
        camera, view = _vector(args.camera, "--camera"), _vector(args.view_dir, "--view-dir")

        def make() -> Any:
            return target_from_input(inp, partial=partial, camera=camera, view_direction=view,
                                     noise_mm=args.noise_mm, seed=args.seed)

        jobs.append((inp.name, make, args.neutral))

    failures = 0
    for name, make, neutral in jobs:
        try:
            target = make()
        except ScanError as exc:
            if len(jobs) == 1:
                raise
            _say(args, f"skipped {name}: {exc.reason}")
            failures += 1
            continue
        for w in target.warnings:
            _say(args, f"warning {name}: {w}")
        bar, cb = _progress_bar(args, schedule.total_steps, f"fit {name}")
        try:
            result = fit_posed(model, target, schedule, seed=args.seed, progress=cb, neutral=neutral,
                               pose=not args.no_pose)
        finally:
            bar.close()
        rep = _fit_outputs(args, model, fingerprint, name, result)
        m = rep["metrics"]
        line = f"{name}: {result.report.steps} steps, {result.report.evaluations:,} SDF queries, " \
               f"{result.report.seconds:.1f} s"
        if "chamfer_mm" in m:
            line += f"; Chamfer-L1 {m['chamfer_mm']:.3f} mm, F-score@1mm {m['fscore_1mm']:.1f} %"
        print(line + f" -> {rep['written'].get('mesh', rep['written']['codes'])}")
    return 0 if failures < len(jobs) else 1


def _frame(args: argparse.Namespace, entry: Any) -> np.ndarray | None:
    if args.frame == "model":
        return None
    if args.frame == "scan" and entry.normalized_from_scan is None:
        raise CommandError(f"{args.codes} has no scan transform (only fitted codes do); use --frame model")
    return entry.normalized_from_scan


def _cmd_extract(args: argparse.Namespace) -> int:
    from backend.fitting import extract_face_mesh
    from backend.scans.frame import MM_PER_UNIT, to_scan_frame

    model, _, fingerprint = _load_model(args.model)
    entry = _load_codes(args.codes, model, fingerprint, args)
    _say(args, f"extracting the surface ({args.resolution}³ grid, narrow band) ...")
    t0 = time.perf_counter()
    frame = _frame(args, entry)
    v_model, f = extract_face_mesh(model, entry.codes, args.resolution, neutral=entry.neutral,
                                   with_detail=not args.no_detail, watertight=args.watertight)  # model frame, mm
    if len(f) == 0:
        raise CommandError("the codes give no surface (is this a trained model?)" if args.watertight else
                           "no part of the surface lies on the face region the model was trained on (is this a "
                           "trained model? --watertight writes the whole surface)")
    v = v_model if frame is None else to_scan_frame(v_model / MM_PER_UNIT, normalized_from_scan=frame)
    out = _write_mesh(Path(args.out), v, f)
    print(f"{len(v):,} vertices, {len(f):,} triangles ({args.resolution}³, {time.perf_counter() - t0:.1f} s) -> {out}")
    if args.template_coords:
        from backend.correspondence import to_template

        # Row i: where vertex i lands in the shared template space (model units), e.g. to transfer
        # UVs or masks painted once on the template to any extracted face.
        tpl = to_template(model, v_model / MM_PER_UNIT, entry.codes, neutral=entry.neutral).astype(np.float32)
        path = Path(args.template_coords)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as fh:
            np.save(fh, tpl, allow_pickle=False)
        print(f"template-space coordinates ({len(tpl):,} x 3, model units) -> {path}")
    return 0


def _cmd_decode(args: argparse.Namespace) -> int:
    from backend.animation_decode import TemplateMesh, TopologyDecoder

    model, _, fingerprint = _load_model(args.model)
    entry = _load_codes(args.codes, model, fingerprint, args)
    template = TemplateMesh.load(model, args.template) if args.template else None
    if template is None:
        _say(args, f"extracting the template mesh ({args.resolution}³ grid) ...")
    t0 = time.perf_counter()
    dec = TopologyDecoder(model, template, resolution=args.resolution)
    t1 = time.perf_counter()
    d = dec.decode(entry.codes, neutral=entry.neutral)
    out = _write_mesh(Path(args.out), d.to_frame(_frame(args, entry)), d.faces)
    if args.save_template:
        dec.template.save(args.save_template)
    print(f"{len(d.vertices):,} vertices in template order (template {t1 - t0:.1f} s, decode "
          f"{1e3 * d.stats['seconds']:.0f} ms); inversion residual max {d.residual.max(initial=0):.2e} "
          f"(model units), {d.n_unconverged} vertices not converged -> {out}")
    if d.n_unconverged:
        _say(args, f"warning: {d.n_unconverged} vertices did not converge (residual > "
                   f"{dec.flag_tolerance:g}); they are written where the iterations stopped")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from backend.evaluate import evaluate_folder

    model, ck, _ = _load_model(args.model)
    if not Path(args.scans).is_dir():
        raise CommandError(f"{args.scans} is not a scan folder")
    state: dict[str, Any] = {}

    def on_scan(key: str, i: int, n: int) -> None:
        if state.get("bar") is not None:
            state["bar"].close()
        bar, cb = _progress_bar(args, _schedule(args).total_steps, f"[{i + 1}/{n}] {key}")
        state["bar"], state["cb"] = bar, cb

    def on_step(step: int, n: int, losses: dict[str, float]) -> None:
        state["cb"](step, n, losses)

    try:
        table = evaluate_folder(model, args.scans, schedule=_schedule(args), resolution=args.resolution,
                                region_radius_mm=args.region_mm, n_points=args.metric_points,
                                keys=args.scan or None, seed=args.seed, progress=on_scan, fit_progress=on_step,
                                neutral_labels=not args.ignore_neutral_labels, region=args.region,
                                pose=not args.no_pose,
                                training_identities=(ck.dataset or {}).get("identities"))
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    finally:
        if state.get("bar") is not None:
            state["bar"].close()
    md, cp = table.write(args.out, args.csv)
    m = table.mean()
    print(table.to_markdown())
    print(f"mean Chamfer-L1 {m['chamfer_mm']:.3f} mm (exact {m['chamfer_exact_mm']:.3f} mm) over "
          f"{len(table.rows)} scans -> {md}, {cp}")
    return 0


# ------------------------------------------------------------------------------------------ parsers


def add_model_commands(sub: argparse._SubParsersAction) -> None:
    """Register the model subcommands on the `imface` parser."""

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
        p.add_argument("--quiet", action="store_true", help="no progress bars or warnings")

    def fitting(p: argparse.ArgumentParser) -> None:
        p.add_argument("--schedule", choices=("fast", "plain"), default="fast",
                       help="fast: coarse to fine (default); plain: 1,500 constant-lr steps (reference)")
        p.add_argument("--steps", type=int, default=None, help="total steps (fast: scales its stages)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--metric-points", type=int, default=EVAL_SETTINGS.n_points, help="points per mesh for the metrics")
        p.add_argument("--no-pose", action="store_true",
                       help="keep the landmark placement as it is (default: refine it with the model first: "
                            "hand-clicked landmarks are often a few mm off)")

    p = sub.add_parser("fit", help="fit the model to a scan folder, a mesh or a partial point cloud")
    p.add_argument("model", help="trained model (model.safetensors)")
    p.add_argument("input", help="scan folder (manifest.json), a mesh (PLY/OBJ/STL/OFF) or a point cloud "
                                 "(PLY without faces, XYZ, NPY)")
    p.add_argument("--out", required=True, help="output folder: <name>.codes.json, <name>.ply, <name>.report.json")
    p.add_argument("--landmarks", help="JSON with the five landmarks (coordinates or vertex indices) of a "
                                       "single mesh or point cloud")
    p.add_argument("--units", choices=("mm", "cm", "m"), default="mm", help="units of a single mesh/cloud")
    p.add_argument("--scan", action="append", help="only this scan of a folder (repeatable)")
    p.add_argument("--partial", action="store_true", help="treat a mesh as a partial view (its vertices)")
    p.add_argument("--camera", help="camera position X,Y,Z of a depth view (the input's frame and units)")
    p.add_argument("--view-dir", help="viewing direction X,Y,Z of an orthographic depth view")
    p.add_argument("--noise-mm", type=float, default=0.5, help="expected depth noise of a point cloud")
    p.add_argument("--neutral", action="store_true", help="fit a neutral face (expression warp off)")
    p.add_argument("--neutral-labels", action="store_true",
                   help="scan folder: fit the scans marked neutral with the expression warp off")
    p.add_argument("--resolution", type=int, default=EVAL_SETTINGS.resolution,
                   help="marching-cubes grid of the output mesh (and of its metrics)")
    p.add_argument("--no-mesh", action="store_true", help="write the codes only")
    p.add_argument("--registered", action="store_true", help="also write <name>.registered.ply in the "
                                                             "template topology (see `decode`)")
    p.add_argument("--watertight", action="store_true",
                   help="write the closed marching-cubes shell (the face plus the cap on the sampling sphere) "
                        "instead of the face alone")
    p.add_argument("--template-resolution", type=int, default=160, help="template mesh grid for --registered")
    fitting(p)
    common(p)
    p.set_defaults(func=_guard(_cmd_fit))

    def frame(p: argparse.ArgumentParser) -> None:
        p.add_argument("--frame", choices=("auto", "scan", "model"), default="auto",
                       help="auto: the fitted scan's frame when the codes carry it, else the model frame (mm)")

    p = sub.add_parser("extract", help="codes -> mesh by marching cubes")
    p.add_argument("model")
    p.add_argument("codes", help="codes JSON (from `fit` or the editing API)")
    p.add_argument("--out", required=True, help="mesh file (.ply, .obj, .stl)")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--no-detail", action="store_true", help="the base surface (no DetailNet)")
    p.add_argument("--watertight", action="store_true",
                   help="the closed marching-cubes shell (the face plus the cap on the sampling sphere) "
                        "instead of the face alone")
    p.add_argument("--template-coords", metavar="PATH.npy",
                   help="also write each vertex's template-space coordinates (V x 3 float32, model units)")
    frame(p)
    common(p)
    p.set_defaults(func=_guard(_cmd_extract))

    p = sub.add_parser("decode", help="codes -> mesh in the template topology (fixed vertex order)")
    p.add_argument("model")
    p.add_argument("codes")
    p.add_argument("--out", required=True)
    p.add_argument("--resolution", type=int, default=160, help="grid of the template mesh (~20k vertices at 160)")
    p.add_argument("--template", help="use this template mesh (e.g. from --save-template) instead of extracting one")
    p.add_argument("--save-template", help="write the template mesh here (to reuse with --template)")
    frame(p)
    common(p)
    p.set_defaults(func=_guard(_cmd_decode))

    p = sub.add_parser("evaluate", help="fit every scan of a folder; Chamfer, F-score, N.C., EDE/TDE table")
    p.add_argument("model")
    p.add_argument("scans", help="scan folder (manifest.json)")
    p.add_argument("--out", required=True, help="Markdown table (the CSV goes next to it)")
    p.add_argument("--csv", help="CSV path (default: --out with .csv)")
    # defaults: the pinned evaluation settings (backend.evaluate.EVAL_SETTINGS)
    p.add_argument("--resolution", type=int, default=EVAL_SETTINGS.resolution)
    p.add_argument("--region", choices=REGIONS, default=EVAL_SETTINGS.region,
                   help="where surfaces are compared: a ball around the nose tip (--region-mm; the paper's, "
                        "default) or the whole 100 mm sampling sphere")
    p.add_argument("--region-mm", type=float, default=EVAL_SETTINGS.region_radius_mm, help="radius of --region ball")
    p.add_argument("--scan", action="append", help="only this scan (repeatable)")
    p.add_argument("--ignore-neutral-labels", action="store_true",
                   help="fit neutral scans with an expression code whatever the neutral policy says")
    fitting(p)
    common(p)
    p.set_defaults(func=_guard(_cmd_evaluate))
