"""`imface serve` and `imface keygen` (registered on the `imface` parser by `add_server_commands`).

    imface serve [--model MODEL] [--bind 127.0.0.1] [--port 0] [--pub-port 0] [--connection-file FILE]
                 [--roots DIR ...] [--keys DIR] [--home DIR] [--workers 1] [--threads N] ...
    imface keygen [--keys DIR] [--client NAME] [--rotate]

Also runnable without the `imface` entry point: `python -m backend.server serve ...`.
"""
from __future__ import annotations

import argparse
import json
import logging
import logging.handlers
import sys
from pathlib import Path


def _setup_logging(log_file: Path, level: str) -> None:
    log_file.parent.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger("imface")
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    fh = logging.handlers.RotatingFileHandler(log_file, maxBytes=20 * 2**20, backupCount=3, encoding="utf-8")
    fh.setFormatter(fmt)
    con = logging.StreamHandler(sys.stderr)
    con.setFormatter(fmt)
    root.addHandler(fh)
    root.addHandler(con)
    root.propagate = False


def cmd_serve(args: argparse.Namespace) -> int:
    from .security import BindRefused, default_home
    from .server import Server, ServerConfig, install_signal_handlers

    home = Path(args.home) if args.home else default_home()
    log_file = Path(args.log_file) if args.log_file else home / "logs" / "server.log"
    _setup_logging(log_file, args.log_level)
    log = logging.getLogger("imface.server")
    cfg = ServerConfig(model=args.model, bind=args.bind, router_port=args.port, pub_port=args.pub_port,
                       connection_file=Path(args.connection_file) if args.connection_file else None,
                       roots=list(args.roots or []), keys=Path(args.keys) if args.keys else None, home=home,
                       device=args.device, threads=args.threads, workers=args.workers,
                       worker_threads=args.worker_threads, nice=args.nice,
                       template_resolution=args.template_resolution, cache_bytes=int(args.cache_mb * 2**20),
                       max_decoders=args.max_decoders, max_upload=int(args.max_upload_mb * 2**20), log_file=log_file,
                       parent_pid=args.parent_pid)
    server = Server(cfg)
    install_signal_handlers(server)
    try:
        server.start()
    except BindRefused as exc:
        log.error("%s", exc)
        return 2
    except Exception as exc:  # a model that does not load, a port in use, ...
        from zmq import ZMQError

        known = (OSError, ValueError, ZMQError)
        try:
            from .model_service import MODEL_ERRORS
            known = known + MODEL_ERRORS
        except Exception:
            pass
        if isinstance(exc, known):
            log.error("cannot start: %s", " ".join(str(exc).split()))
            if getattr(server, "ctx", None) is not None:
                server.shutdown()
            return 2
        raise
    server.serve_forever()
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    from .security import default_home, keygen

    keys = Path(args.keys) if args.keys else (Path(args.home) if args.home else default_home()) / "keys"
    try:
        out = keygen(keys, client=args.client, rotate=args.rotate)
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=1))
    if args.client:
        print(f"give {out['client_secret_file']} and the server public key to that machine; restart the server "
              "(or it picks the allowlist up at its next start)", file=sys.stderr)
    return 0


def add_server_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the backend server (ZeroMQ, CURVE) for the Blender extension")
    p.add_argument("--model", help="model.safetensors to load at start (none: start empty; clients can load "
                                   "one or train the default model)")
    p.add_argument("--bind", default="127.0.0.1", help="address to listen on (non-loopback needs keys made by "
                                                       "`imface keygen`)")
    p.add_argument("--port", type=int, default=0, help="ROUTER (request) port; 0: any free port")
    p.add_argument("--pub-port", type=int, default=0, help="PUB (event) port; 0: any free port")
    p.add_argument("--connection-file", help="where to write the connection file (default ~/.imface/connection.json)")
    p.add_argument("--roots", nargs="+", action="extend", help="folders clients may name paths in (models, scans, "
                                                               "training output); the model's folder and "
                                                               "~/.imface/runs are always included")
    p.add_argument("--keys", help="CURVE keys folder (default ~/.imface/keys)")
    p.add_argument("--home", help="data folder: keys, logs, runs, upload spool (default ~/.imface or $IMFACE_HOME)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, default=None, help="torch threads for interactive decodes")
    p.add_argument("--workers", type=int, default=1, help="worker processes for fit/extract jobs (kept warm)")
    p.add_argument("--worker-threads", type=int, default=1, help="torch threads per worker and training process")
    p.add_argument("--nice", type=int, default=10, help="priority drop of worker and training processes")
    p.add_argument("--template-resolution", type=int, default=160, help="template mesh grid (~20k vertices at 160)")
    p.add_argument("--cache-mb", type=float, default=256, help="decoded-frame cache size")
    p.add_argument("--max-decoders", type=int, default=32, help="warm decoders kept (per client and face)")
    p.add_argument("--max-upload-mb", type=float, default=1024, help="total size of uploads held at once")
    p.add_argument("--log-file", help="log file (default ~/.imface/logs/server.log)")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--parent-pid", type=int, default=None,
                   help="stop when this process ends (the Blender that launched the backend), unless training")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("keygen", help="create (or rotate) the CURVE keys; --client adds an allowed client")
    p.add_argument("--keys", help="keys folder (default ~/.imface/keys)")
    p.add_argument("--home", help="data folder (default ~/.imface)")
    p.add_argument("--client", help="also create an allowed client keypair with this name (a remote machine)")
    p.add_argument("--rotate", action="store_true", help="new server and client keys; old clients are refused")
    p.set_defaults(func=cmd_keygen)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backend.server")
    add_server_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)
