"""A worker process for fit and extract jobs: `python -m backend.server.worker` (started by the server).

It runs at a lower priority (`--nice`) with its own torch thread budget (`--threads`), so interactive
decodes in the server process are not starved. It talks to the server over its stdin/stdout with
length-prefixed msgpack frames (`pipe.py`); everything it prints goes to stderr (the server's log).

    server -> worker   {"op": "run", "job", "kind": "fit"|"extract", "model": {path, fingerprint},
                        "template": {vertices, faces, template_sdf, resolution} | None, "params": {...}}
                       {"op": "cancel", "job"}          {"op": "exit"}
    worker -> server   {"event": "ready", "pid"}
                       {"event": "progress", "job", "progress", "message", "metrics"}
                       {"event": "done", "job", "result"}   {"event": "cancelled", "job"}
                       {"event": "failed", "job", "error": {code, message, details}}
"""
from __future__ import annotations

import argparse
import os
import queue
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from . import pipe


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m backend.server.worker")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--nice", type=int, default=10)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--roots", nargs="*", default=[])
    args = ap.parse_args(argv)

    # The protocol keeps the real stdout; anything printed by libraries goes to stderr.
    proto_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    proto_in = sys.stdin.buffer
    if args.nice and hasattr(os, "nice"):
        try:
            os.nice(args.nice)
        except OSError:
            pass
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(max(1, args.threads))
    from addon.link import protocol as P

    from . import model_service as ms
    from .paths import PathRoots
    from backend.scans.mesh_io import ScanReadError, read_geometry

    roots = PathRoots.from_strings(args.roots) if args.roots else PathRoots(())
    write_lock = threading.Lock()

    def send(obj: dict[str, Any]) -> None:
        with write_lock:
            pipe.write_frame(proto_out, obj)

    tasks: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
    current: dict[str, Any] = {"job": None, "cancel": threading.Event()}

    def reader() -> None:
        while True:
            try:
                msg = pipe.read_frame(proto_in)
            except Exception:
                msg = None
            if msg is None or msg.get("op") == "exit":
                current["cancel"].set()
                tasks.put(None)
                return
            if msg.get("op") == "cancel":
                if msg.get("job") == current["job"]:
                    current["cancel"].set()
            elif msg.get("op") == "run":
                tasks.put(msg)

    threading.Thread(target=reader, daemon=True).start()
    models: dict[str, Any] = {}
    send({"event": "ready", "pid": os.getpid()})

    def get_model(spec: dict[str, Any], template: dict[str, Any] | None) -> Any:
        fp = spec["fingerprint"]
        lm = models.get(fp)
        if lm is None:
            models.clear()  # one model at a time in a worker
            lm = ms.load(spec["path"], device=args.device, template_resolution=None)
            models[fp] = lm
        if template is not None and lm.template_resolution != template["resolution"]:
            lm.template = ms.TemplateMesh(template["vertices"], template["faces"], template["template_sdf"],
                                          template["resolution"])
            lm.template_resolution = template["resolution"]
        return lm

    while True:
        msg = tasks.get()
        if msg is None:
            return 0
        job = msg["job"]
        cancel = threading.Event()
        current["job"], current["cancel"] = job, cancel
        last = [0.0]

        def progress(frac: float, message: str, metrics: dict[str, Any] | None = None, force: bool = False) -> None:
            now = time.monotonic()
            if force or now - last[0] >= 0.2:
                last[0] = now
                send({"event": "progress", "job": job, "progress": float(frac), "message": message,
                      "metrics": metrics or {}})

        try:
            progress(0.0, "loading the model", force=True)
            lm = get_model(msg["model"], msg.get("template"))
            params = msg["params"]
            if cancel.is_set():
                raise ms.Cancelled()
            if msg["kind"] == "extract":
                progress(0.1, f"extracting the surface ({params['resolution']}^3 grid)", force=True)
                result = ms.extract(lm, params["codes"], params["resolution"], params["neutral"])
                if cancel.is_set():
                    raise ms.Cancelled()
            elif msg["kind"] == "fit":
                path = Path(params["path"])
                fh = roots.open_file(path) if roots.roots else open(path, "rb")
                with fh:
                    vertices, faces = read_geometry(fh, params["suffix"], name=params["name"])
                lmk = params.get("landmarks")
                idx = params.get("landmark_indices")
                if idx is not None:
                    import numpy as np

                    idx = np.asarray(idx, dtype=np.int64).reshape(-1)
                    if idx.min() < 0 or idx.max() >= len(vertices):
                        raise P.ProtocolError(P.E_BAD_FIELD, f"landmark vertex index out of range (the scan has "
                                              f"{len(vertices)} vertices)", {"field": "options.landmark_indices"})
                    lmk = vertices[idx]
                opts = params["options"]

                def on_step(step: int, total: int, losses: dict[str, float]) -> None:
                    progress(0.8 * step / max(1, total), f"fit step {step}/{total}",
                             {"loss": float(losses.get("total", float("nan")))})

                result = ms.run_fit(lm, vertices, faces, lmk, name=params["name"], progress=on_step,
                                    cancel=cancel.is_set, **opts)
            else:
                raise P.ProtocolError(P.E_BAD_FIELD, f"unknown job kind {msg['kind']!r}")
            send({"event": "done", "job": job, "result": result})
        except ms.Cancelled:
            send({"event": "cancelled", "job": job})
        except P.ProtocolError as exc:
            send({"event": "failed", "job": job, "error": exc.to_body()})
        except (ScanReadError, *ms.MODEL_ERRORS) as exc:
            code = P.E_NOT_FOUND if isinstance(exc, ms.CheckpointError) else P.E_BAD_SCAN
            send({"event": "failed", "job": job, "error": P.error_body(code, " ".join(str(exc).split()))})
        except Exception as exc:  # a bug: say what failed, keep the worker alive
            traceback.print_exc()
            send({"event": "failed", "job": job,
                  "error": P.error_body(P.E_INTERNAL, f"{type(exc).__name__}: {exc}")})
        finally:
            current["job"] = None


if __name__ == "__main__":
    sys.exit(main())
