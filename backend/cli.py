"""`imface`: the product's one command line. Each subcommand is one step of the data flow
(scan folder → samples → model → meshes); `main` chains them on the embedded default data.

This module is the top floor: the one module of `backend/` allowed to import `training/` (the
make-default, preprocess, preview, train and main subcommands; imports inside the commands, so
importing this module loads no training code). Nothing else in `backend/` imports it, and
tests/test_import_direction.py holds both rules."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _cmd_make_default(args: argparse.Namespace) -> int:
    from training.data.synthetic_faces import generate_scan_folder

    path = generate_scan_folder(Path(args.out), n_identities=args.identities, seed=args.seed)
    print(f"default scans written to {path}")
    return 0


def _preprocess_config(args: argparse.Namespace):
    from backend.scans.samples import PreprocessConfig

    cfg = PreprocessConfig()
    if args.samples is not None:
        cfg.n_near = args.samples // 2
        cfg.n_uniform = args.samples - cfg.n_near
    if args.max_triangles is not None:
        cfg.max_triangles = args.max_triangles
    return cfg


def _cmd_preprocess(args: argparse.Namespace) -> int:
    from backend.scans.folder import ManifestError
    from training.data.preprocess import preprocess_folder

    try:
        report = preprocess_folder(args.scans, args.out, _preprocess_config(args), workers=args.workers)
    except ManifestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0 if report.processed or report.cached else 1


def _cmd_preview(args: argparse.Namespace) -> int:
    from training.data.preview import preview_scan_folder

    preview_scan_folder(Path(args.scans), Path(args.out))
    print(f"preview written to {args.out}")
    return 0


def _cmd_main(args: argparse.Namespace) -> int:
    """The main job on the embedded default: make scans, preprocess them, train the cpu preset, and
    write previews of the scans and of the trained model's faces."""
    from training.config import preset
    from training.data.preprocess import preprocess_folder
    from training.data.preview import preview_scan_folder
    from training.data.synthetic_faces import generate_scan_folder
    from training.train import train

    out = Path(args.out)
    scans = generate_scan_folder(out / "scans", n_identities=args.identities, seed=args.seed)
    print(f"[1/4] default scans: {scans}")
    report = preprocess_folder(scans, out / "samples", _preprocess_config(args), workers=args.workers)
    print(f"[2/4] {report.summary()}")
    if not report.processed and not report.cached:
        return 1
    preview = preview_scan_folder(scans, out / "preview.png")
    print(f"[3/4] preview of the scans: {preview}")
    if args.steps == 0:
        return 0
    cfg = preset("cpu")
    cfg.data.processed = str(out / "samples")
    cfg.output = str(out / "train")
    if args.steps is not None:
        cfg.schedule.steps = args.steps
    # Running the main job again continues (or just reports) the same run instead of starting over.
    resume = (out / "train" / "checkpoints" / "last.safetensors").is_file()
    result = train(cfg.validate(), resume=resume)
    previews = sorted((out / "train" / "previews").glob("*.png"))
    print(f"[4/4] trained the cpu preset for {result.step} steps ({result.reason}, {result.seconds:.0f} s): "
          f"model {result.model_path}, loss curve {out / 'train' / 'loss_curve.png'}, "
          f"latest preview {previews[-1] if previews else 'none'}")
    return 0 if not result.interrupted else 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imface", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def add_preprocess_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--workers", type=int, default=None, help="parallel processes (default: all cores)")
        p.add_argument("--samples", type=int, default=None, help="SDF samples per scan (default 250000)")
        p.add_argument("--max-triangles", type=int, default=None, help="refuse bigger scans (default 2,000,000)")

    p = sub.add_parser("make-default", help="write the procedural default scan folder")
    p.add_argument("--out", required=True)
    p.add_argument("--identities", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_make_default)

    p = sub.add_parser("preprocess", help="scan folder -> SDF training samples")
    p.add_argument("scans", help="scan folder with manifest.json (docs/scan-folder.md)")
    p.add_argument("--out", required=True)
    add_preprocess_options(p)
    p.set_defaults(func=_cmd_preprocess)

    p = sub.add_parser("preview", help="PNG grid of a scan folder (identities x expressions)")
    p.add_argument("scans")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_cmd_preview)

    # Listed for --help only: main() hands `imface train ...` to training's own parser before parsing.
    p = sub.add_parser("train", help="train the model (all options: imface train --help)", add_help=False)
    p.add_argument("train_args", nargs=argparse.REMAINDER)

    p = sub.add_parser("main", help="the main job on the embedded default data")
    p.add_argument("--out", default="runs/default")
    p.add_argument("--identities", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the cpu preset's; 0: no training)")
    add_preprocess_options(p)
    p.set_defaults(func=_cmd_main)

    from backend.model_commands import add_model_commands

    add_model_commands(sub)  # fit, extract, decode, evaluate: the commands that use a trained model
    from training.data.raw_scans import add_raw_scans_command

    add_raw_scans_command(sub)  # make-raw: a scan folder as a raw scanner would deliver it (robustness tests)
    from backend.server.cli import add_server_commands

    add_server_commands(sub)  # serve, keygen: the backend process the Blender extension talks to
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:  # training has its own parser (python -m training.train); pass everything on
        from training.train import main as train_main

        return train_main(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
