"""The main job's product half: a trained model -> backend -> Blender -> animation, bake, renders.

Starts the backend server on the model (`imface serve`, CURVE keys and a connection file under
OUT/backend), then Blender (bpy as a module, in its own process, with a throw-away user folder):
installs the extension from the zip that `scripts/build_extension.py` builds, attaches to the
backend, creates a face, keyframes a short expression animation, plays it through, bakes it to shape
keys and renders frames and a contact sheet into OUT (`addon.headless.main_job`). Then the backend is
stopped with SIGTERM (the clean shutdown path).

    python scripts/blender_main_job.py --model runs/default/train/model.safetensors --out runs/default/blender
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODULE = "bl_ext.user_default.imface"
MARK = "@@IMFACE_MAIN_JOB@@"

# Runs inside the Blender process: only bpy and the installed extension, never torch.
BLENDER_SIDE = r"""
import importlib, json, sys
import bpy, addon_utils
args = json.loads(sys.argv[1])
bpy.ops.extensions.package_install_files(filepath=args["zip"], repo="user_default", enable_on_install=True)
if args["module"] not in bpy.context.preferences.addons:
    raise SystemExit("the extension did not enable after install")
bpy.ops.imface.connect(mode="ATTACH", connection_file=args["connection_file"], wait=True)
headless = importlib.import_module(args["module"] + ".headless")
try:
    result = headless.main_job(args["out"], length=args["length"])
finally:
    addon_utils.disable(args["module"], default_set=True)
result["torch_loaded"] = "torch" in sys.modules
print(args["mark"] + json.dumps(result, default=str), flush=True)
"""


def build_zip(out: Path) -> Path:
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "build_extension.py"), "--host-only",
                           "--out", str(out)], capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"building the extension failed:\n{proc.stdout}\n{proc.stderr}")
    return Path(json.loads(proc.stdout.strip().splitlines()[-1])["zips"][0])


def start_backend(model: Path, home: Path, timeout_s: float = 300.0) -> tuple[subprocess.Popen, Path]:
    conn = home / "connection.json"
    conn.unlink(missing_ok=True)
    log = open(home / "serve.out", "w")
    proc = subprocess.Popen([sys.executable, "-m", "backend.cli", "serve", "--model", str(model),
                             "--home", str(home), "--connection-file", str(conn)],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    t0 = time.monotonic()
    while not conn.is_file():
        if proc.poll() is not None:
            raise SystemExit(f"the backend exited with {proc.returncode}; see {home / 'serve.out'}")
        if time.monotonic() - t0 > timeout_s:
            proc.terminate()
            raise SystemExit(f"the backend wrote no connection file in {timeout_s:.0f} s")
        time.sleep(0.2)
    return proc, conn


def run_blender(zip_path: Path, conn: Path, out: Path, length: int) -> dict:
    args = {"zip": str(zip_path), "connection_file": str(conn), "out": str(out), "length": length,
            "module": MODULE, "mark": MARK}
    with tempfile.TemporaryDirectory(prefix="imface_blender_user_") as user:
        env = dict(os.environ, BLENDER_USER_RESOURCES=user)
        proc = subprocess.run([sys.executable, "-c", BLENDER_SIDE, json.dumps(args)], env=env,
                              capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"the Blender part failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len(MARK):])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="model.safetensors")
    ap.add_argument("--out", default="runs/default/blender")
    ap.add_argument("--length", type=int, default=24, help="frames of the expression animation")
    a = ap.parse_args(argv)
    out = Path(a.out).resolve()
    home = out / "backend"
    home.mkdir(parents=True, exist_ok=True)
    print("[main] building the extension", flush=True)
    zip_path = build_zip(out / "extension")
    print(f"[main] starting the backend on {a.model}", flush=True)
    server, conn = start_backend(Path(a.model).resolve(), home)
    try:
        print("[main] Blender: install the extension, create a face, animate, bake, render", flush=True)
        result = run_blender(zip_path, conn, out, a.length)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    (out / "result.json").write_text(json.dumps(result, indent=2, default=str))
    print(f"[main] contact sheet: {out / 'contact_sheet.png'}; frames and scene.blend in {out}")
    print(f"[main] mouth-region change across the rendered frames: {result.get('mouth_diff_vs_first')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
