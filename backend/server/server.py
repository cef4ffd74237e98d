"""The backend server: one request loop over ZeroMQ (ROUTER for requests, PUB for broadcasts).

Threads and processes:
* the **request loop** (main thread) owns every socket: it decodes and checks each message
  (`addon.link.protocol`), answers cheap requests itself (hello, ping, info, codes, job status, cached
  decodes, uploads), hands decodes and streams to the decode thread, jobs to the job manager, and
  sends what comes back; it never waits on model work, so pings, cancels and cached frames are
  answered while anything runs;
* the **decode thread** (`engine.DecodeEngine`): warm-started decodes and streams, and model loads;
* **worker processes** (`jobs.WorkerHandle`, niced, own thread budget): fit and extract jobs;
* a **training child process** per training job (`jobs.TrainRunner`).

Hostile input never stops the loop: every message is decoded under `protocol.Limits`, every handler
error becomes an `error` reply with one of the protocol's codes, and nothing is allocated from a
size a client declares before that size is checked.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import zmq

from addon.link import protocol as P

from . import security
from .decoders import FrameCache
from .engine import DecodeEngine, DecodeTask, Mailbox, StreamJob
from .jobs import Job, JobManager, TrainPlan
from .paths import PathRoots
from backend.scans.mesh_io import CLOUD_SUFFIXES, MESH_SUFFIXES, obj_material_libraries
from .uploads import UploadStore

log = logging.getLogger("imface.server")

VERSION = "0.1.0"
MAX_FACE_CHARS = 128
MAX_STREAM_FRAMES = 10_000
MAX_STREAMS_PER_CLIENT = 16
MAX_SAMPLES = 1_000
TRAIN_PRESETS = ("tiny", "cpu", "quality", "paper")
FIT_OPTIONS = {"units", "neutral", "partial", "camera", "view_direction", "schedule", "steps", "resolution",
               "seed", "noise_mm", "registered", "landmark_indices", "pose"}


@dataclass
class ServerConfig:
    model: str | None = None
    bind: str = "127.0.0.1"
    router_port: int = 0
    pub_port: int = 0
    connection_file: Path | None = None
    roots: list[str] = field(default_factory=list)
    keys: Path | None = None
    home: Path | None = None
    device: str = "auto"
    threads: int | None = None          # torch threads of the decode thread (None: min(4, cores // 2))
    workers: int = 1                    # fit/extract worker processes (kept warm)
    worker_threads: int = 1             # torch threads per worker / training child
    nice: int = 10                      # priority drop of workers and training children
    template_resolution: int = 160
    cache_bytes: int = 256 * 2**20
    max_decoders: int = 32
    max_upload: int = P.UPLOAD_TOTAL_BYTES
    log_file: Path | None = None
    limits: P.Limits = P.DEFAULT_LIMITS
    heartbeat_s: float = P.HEARTBEAT_INTERVAL_S
    parent_pid: int | None = None       # stop when this process is gone (the Blender that launched us),
                                        # unless a training job runs: the next Blender attaches to it


class Server:
    def __init__(self, config: ServerConfig) -> None:
        self.cfg = config
        self.session = P.new_session_id()
        self.home = Path(config.home or security.default_home())
        self.keys_dir = Path(config.keys or self.home / "keys")
        self.connection_file = Path(config.connection_file or self.home / "connection.json")
        self.host = config.bind
        self.ms: Any = None                       # model_service, imported on first use (torch)
        self.model: Any = None                    # LoadedModel
        self.known_models: dict[str, str] = {}    # path -> fingerprint
        self._discovered_at = 0.0
        self.guard = P.ReplayGuard(config.limits.replay_window_s, config.limits.max_clock_skew_s,
                                   config.limits.replay_max_ids)
        self.cache = FrameCache(config.cache_bytes)
        self.topology_sent: OrderedDict[tuple[str, str], None] = OrderedDict()
        self.clients: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._stop = False
        self._hb_seq = 0
        self._status: str | None = None
        self._log_budget = [0.0, 0]
        self.stats = {"requests": 0, "errors": 0, "dropped": 0}
        self.ctx: zmq.Context | None = None
        self.auth: Any = None
        self.router: zmq.Socket | None = None
        self.pub: zmq.Socket | None = None
        self.roots = PathRoots(())
        self.handlers: dict[str, Callable[[bytes, P.Message], None]] = {
            "hello": self.h_hello, "ping": self.h_ping, "info": self.h_info, "models.list": self.h_models_list,
            "models.load": self.h_models_load, "codes": self.h_codes, "decode": self.h_decode,
            "extract": self.h_extract, "stream": self.h_stream, "stream.focus": self.h_stream_focus,
            "fit": self.h_fit, "upload.begin": self.h_upload_begin, "upload.chunk": self.h_upload_chunk,
            "upload.end": self.h_upload_end, "train": self.h_train, "job.status": self.h_job_status,
            "job.cancel": self.h_job_cancel, "shutdown": self.h_shutdown,
        }

    # ================================================================== start / stop
    def start(self) -> None:
        cfg = self.cfg
        host = cfg.bind.strip()
        self.host = host
        files = security.prepare_keys(self.keys_dir, host)   # BindRefused for a keyless non-loopback bind
        roots = list(cfg.roots)
        if cfg.model:
            roots.append(str(Path(cfg.model).resolve().parent))
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "runs").mkdir(exist_ok=True)
        roots.append(str(self.home / "runs"))
        self.roots = PathRoots.from_strings(roots)
        if cfg.model:
            self.model = self._load_model(cfg.model)
        self.ctx = zmq.Context()
        self.auth = P.start_authenticator(self.ctx, files.allowed_dir)
        server_public, server_secret = P.load_keypair(files.server_secret)
        assert server_secret is not None
        self.router = self._socket(zmq.ROUTER, server_public, server_secret)
        self.router.router_mandatory = 1   # sends to a vanished client fail (EHOSTUNREACH) instead of vanishing
        self.pub = self._socket(zmq.PUB, server_public, server_secret)
        addr = f"[{host}]" if ":" in host else host
        router_port = self._bind(self.router, addr, cfg.router_port)
        pub_port = self._bind(self.pub, addr, cfg.pub_port)
        self.mailbox = Mailbox(self.ctx, self.session[:12])
        self.engine = DecodeEngine(self.mailbox, self.cache, max_decoders=cfg.max_decoders, service=self.ms)
        if self.model is not None:
            self.engine.set_model(self.model)
        self.engine.start()
        self.spool = self.home / f"spool-{self.session[:12]}"
        self.uploads = UploadStore(self.spool, max_total=cfg.max_upload)
        self.jobs = JobManager(self.mailbox, self._emit_job, workers=cfg.workers if self.model is not None else 0,
                               worker_threads=cfg.worker_threads, nice=cfg.nice, device=cfg.device,
                               roots=self.roots.describe() + [str(self.spool)])
        self.jobs.on_trained = self._on_trained
        self.jobs.start_workers()
        self._n_workers_wanted = cfg.workers
        client_public, client_secret = P.load_keypair(files.client_secret)
        info = P.ConnectionInfo(host=host, router_port=router_port, pub_port=pub_port,
                                server_public_key=server_public.decode(),
                                client_public_key=(client_public or b"").decode(),
                                client_secret_key=(client_secret or b"").decode(), pid=os.getpid())
        P.write_connection_file(self.connection_file, info)
        self._install_log_handler()
        self._publish_status("starting")
        log.info("serving on %s (router %d, pub %d), session %s, model %s, roots %s; connection file %s",
                 host, router_port, pub_port, self.session, self.model.info()["name"] if self.model else None,
                 self.roots.describe(), self.connection_file)

    def _socket(self, kind: int, public: bytes, secret: bytes) -> zmq.Socket:
        assert self.ctx is not None
        s = self.ctx.socket(kind)
        P.apply_socket_limits(s, self.cfg.limits)
        P.curve_server(s, public, secret)
        s.sndhwm = 1000
        s.rcvhwm = 1000
        return s

    @staticmethod
    def _bind(sock: zmq.Socket, addr: str, port: int) -> int:
        if port:
            sock.bind(f"tcp://{addr}:{port}")
            return port
        return sock.bind_to_random_port(f"tcp://{addr}")

    def _service(self) -> Any:
        if self.ms is None:
            from . import model_service

            self.ms = model_service
            model_service.set_threads(self.cfg.threads or max(1, min(4, (os.cpu_count() or 2) // 2)))
            if getattr(self, "engine", None) is not None:
                self.engine.service = model_service
        return self.ms

    def _load_model(self, path: str | Path) -> Any:
        ms = self._service()
        lm = ms.load(path, device=self.cfg.device, template_resolution=self.cfg.template_resolution)
        self.known_models[str(lm.path)] = lm.fingerprint
        log.info("model %s loaded (%s, template %d vertices, %.1f s)", lm.path, lm.fingerprint[:12],
                 len(lm.template.vertices), lm.seconds)
        return lm

    def request_stop(self, *_: Any) -> None:
        self._stop = True

    def serve_forever(self) -> None:
        assert self.router is not None
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.mailbox.pull, zmq.POLLIN)
        next_hb = time.monotonic()
        last_expire = time.monotonic()
        self._publish_status("idle")
        try:
            while not self._stop:
                now = time.monotonic()
                if now >= next_hb:
                    self._heartbeat()
                    next_hb = now + self.cfg.heartbeat_s
                    if self._orphaned():
                        log.info("the launching process (pid %s) is gone and no training runs: stopping",
                                 self.cfg.parent_pid)
                        break
                timeout_ms = max(0, int((next_hb - time.monotonic()) * 1000))
                try:
                    ready = dict(poller.poll(timeout_ms))
                except zmq.ZMQError as exc:
                    if exc.errno == zmq.EINTR:
                        continue
                    raise
                if self.mailbox.pull in ready:
                    self.mailbox.drain_wakeups()
                self._drain_mailbox()
                if self.router in ready:
                    for _ in range(256):  # bounded per turn: heartbeats and results are never starved
                        try:
                            frames = self.router.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._on_message(frames)
                        if self._stop:
                            break
                self.jobs.tick()
                self._update_status()
                if now - last_expire > 30:
                    last_expire = now
                    self.uploads.expire()
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        if getattr(self, "_closed", False):
            return
        self._closed = True
        log.info("shutting down")
        try:
            self._publish_status("stopping")
            self.engine.stop()
            self.jobs.shutdown()
            self._drain_mailbox()            # job events produced while stopping
            self.engine.join(5)
            self.uploads.close()
            try:
                os.rmdir(self.spool)
            except OSError:
                pass
        finally:
            self._remove_log_handler()
            try:
                if self.connection_file.exists():
                    self.connection_file.unlink()
            except OSError:
                pass
            for s in (self.router, self.pub):
                if s is not None:
                    s.close(1000)  # up to 1 s to deliver the last replies and events (shutdown, cancelled jobs)
            self.mailbox.close()
            if self.auth is not None:
                self.auth.stop()
            if self.ctx is not None:
                self.ctx.term()
            log.info("stopped")

    # ================================================================== sending
    def _send(self, route: bytes, type: str, body: dict[str, Any], parent: str | None) -> bool:
        assert self.router is not None
        try:
            frames = P.encode(type, body, session=self.session, parent=parent)
            self.router.send_multipart([route, *frames], flags=zmq.NOBLOCK, copy=False)
            return True
        except zmq.ZMQError as exc:
            self.stats["dropped"] += 1
            if exc.errno == zmq.EHOSTUNREACH:
                log.debug("client %s is gone: dropping its work", route.hex())
                self.engine.cancel_route(route)
            else:
                log.warning("reply %s to %s dropped (%s)", type, route.hex(), exc)
            return False

    def _send_error(self, route: bytes, err: P.ProtocolError, parent: str | None) -> None:
        self.stats["errors"] += 1
        self._send(route, "error", err.to_body(), parent)

    def _publish(self, topic: bytes, type: str, body: dict[str, Any]) -> None:
        assert self.pub is not None
        try:
            self.pub.send_multipart([topic, *P.encode(type, body, session=self.session)], flags=zmq.NOBLOCK,
                                    copy=False)
        except zmq.ZMQError:
            pass  # a subscriber that cannot keep up loses broadcasts, never blocks the loop

    def _orphaned(self) -> bool:
        pid = self.cfg.parent_pid
        if pid is None or self.jobs.training is not None:
            return False
        try:
            os.kill(pid, 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            return True
        except PermissionError:  # it exists, under another user
            return False
        return False

    def _heartbeat(self) -> None:
        self._hb_seq += 1
        self._publish(P.TOPIC_HEARTBEAT, "heartbeat", {"seq": self._hb_seq, "busy": self._busy(),
                                                       "jobs": len(self.jobs.active()),
                                                       "interval_s": self.cfg.heartbeat_s})

    def _busy(self) -> bool:
        return self.engine.busy or self.jobs.busy

    def _publish_status(self, state: str) -> None:
        self._status = state
        jobs = len(self.jobs.active()) if hasattr(self, "jobs") else 0
        if self.pub is not None:
            self._publish(P.TOPIC_STATUS, "status", {"state": state, "jobs": jobs})

    def _update_status(self) -> None:
        state = "busy" if self._busy() else "idle"
        if state != self._status:
            self._publish_status(state)

    # ================================================================== receiving
    def _on_message(self, frames: list[Any]) -> None:
        self.stats["requests"] += 1
        route = frames[0].bytes if hasattr(frames[0], "bytes") else bytes(frames[0])
        body_frames = frames[1:]
        try:
            msg = P.decode(body_frames, limits=self.cfg.limits)
        except P.ProtocolError as err:
            hdr = P.peek_header(body_frames, limits=self.cfg.limits)
            self._send_error(route, err, hdr.get("id") if hdr else None)
            return
        except Exception as exc:  # decode is total; this is a bug there: answer, do not die
            log.exception("decode failed unexpectedly")
            self._send_error(route, P.ProtocolError(P.E_BAD_MESSAGE, f"undecodable message ({type(exc).__name__})"),
                             None)
            return
        try:
            self.guard.check(msg)
            handler = self.handlers.get(msg.type)
            if handler is None:
                raise P.ProtocolError(P.E_UNKNOWN_TYPE, f"unknown request type {msg.type!r}",
                                      {"type": msg.type, "known": sorted(self.handlers)})
            handler(route, msg)
        except P.ProtocolError as err:
            self._send_error(route, err, msg.id)
        except Exception as exc:
            log.exception("request %s failed", msg.type)
            self._send_error(route, P.ProtocolError(P.E_INTERNAL, f"{msg.type} failed: {type(exc).__name__}: {exc}"),
                             msg.id)

    def _reply(self, route: bytes, msg: P.Message, body: dict[str, Any]) -> None:
        self._send(route, P.reply_type(msg.type), body, msg.id)

    def _need_model(self) -> Any:
        if self.model is None:
            raise P.ProtocolError(P.E_NO_MODEL, "no model is loaded: models.load one, or train (the default "
                                  "data with scans: \"default\")")
        return self.model

    # ================================================================== handlers: session, info
    def h_hello(self, route: bytes, msg: P.Message) -> None:
        b = msg.body
        P.check_keys(b, {"protocol", "client"}, {"protocol"})
        proto = P.get_field(b, "protocol", int)
        if proto != P.PROTOCOL_VERSION:
            raise P.ProtocolError(P.E_VERSION, f"protocol {proto} is not supported (this server speaks "
                                  f"{P.PROTOCOL_VERSION})", {"supported": [P.PROTOCOL_VERSION], "got": proto})
        client = P.get_field(b, "client", str, "")[:128]
        self.clients[msg.session] = {"client": client, "route": route, "since": time.time()}
        self.clients.move_to_end(msg.session)
        while len(self.clients) > 4096:
            self.clients.popitem(last=False)
        for key in [k for k in self.topology_sent if k[0] == msg.session]:
            del self.topology_sent[key]
        lim = self.cfg.limits
        self._reply(route, msg, {
            "protocol": P.PROTOCOL_VERSION, "session": self.session, "version": VERSION, "device": self._device(),
            "model": self.model.info() if self.model is not None else None, "heartbeat_s": self.cfg.heartbeat_s,
            "limits": {"max_message_bytes": lim.max_message_bytes, "upload_chunk_bytes": self.uploads.chunk_bytes,
                       "upload_total_bytes": self.uploads.max_total, "max_array_elements": lim.max_array_elements}})

    def _device(self) -> str:
        if self.model is not None:
            return self.ms.describe_device(self.model.device)
        return self.cfg.device

    def h_ping(self, route: bytes, msg: P.Message) -> None:
        P.check_keys(msg.body, {"data"})
        self._reply(route, msg, {"time": time.time(), "data": msg.body.get("data")})

    def h_info(self, route: bytes, msg: P.Message) -> None:
        P.check_keys(msg.body, set())
        body: dict[str, Any] = {
            "version": VERSION, "device": self._device(), "session": self.session,
            "model": self.model.info() if self.model is not None else None, "busy": self._busy(),
            "jobs": [j.id for j in self.jobs.active()], "roots": self.roots.describe(),
            "cache": {"frames": len(self.cache), "bytes": self.cache.nbytes, "max_bytes": self.cache.max_bytes},
            "workers": [{"pid": w.pid, "job": w.job.id if w.job else None} for w in self.jobs.workers],
        }
        if self.model is None:
            body["offers"] = {"train_default": {"type": "train", "body": {"scans": "default", "preset": "cpu",
                                                                          "out": str(self.home / "runs" / "default")}}}
        self._reply(route, msg, body)

    # ================================================================== models
    def _discover(self) -> None:
        """model.safetensors files under the roots (bounded walk: depth 4, 2,000 folders), every 10 s."""
        now = time.monotonic()
        if now - self._discovered_at < 10:
            return
        self._discovered_at = now
        visited = 0
        for root in self.roots.roots:
            base_depth = len(root.parts)
            for dirpath, dirnames, filenames in os.walk(root):
                visited += 1
                if visited > 2000:
                    return
                dirnames[:] = [d for d in sorted(dirnames) if not d.startswith(".")]
                if len(Path(dirpath).parts) - base_depth >= 4:
                    dirnames[:] = []
                if "model.safetensors" in filenames:
                    p = str(Path(os.path.realpath(Path(dirpath) / "model.safetensors")))
                    if p not in self.known_models and self.roots.contains(Path(p)):
                        try:
                            self.known_models[p] = self._service().fingerprint(p)
                        except Exception:
                            pass  # not a model of ours

    def h_models_list(self, route: bytes, msg: P.Message) -> None:
        P.check_keys(msg.body, set())
        self._discover()
        cur = self.model.fingerprint if self.model is not None else None
        models = [{"id": fp, "name": Path(p).parent.name if Path(p).name == "model.safetensors" else Path(p).stem,
                   "path": p, "loaded": fp == cur} for p, fp in self.known_models.items()]
        self._reply(route, msg, {"models": models})

    def h_models_load(self, route: bytes, msg: P.Message) -> None:
        b = msg.body
        P.check_keys(b, {"path", "id"})
        if ("path" in b) == ("id" in b):
            raise P.ProtocolError(P.E_BAD_FIELD, "give exactly one of path or id", {"field": "path"})
        if "path" in b:
            path = self.roots.resolve(P.get_field(b, "path", str), kind="file")
            try:
                fp = self._service().fingerprint(path)
            except self._service().CheckpointError as exc:
                raise P.ProtocolError(P.E_BAD_FIELD, " ".join(str(exc).split()), {"field": "path"}) from None
        else:
            want = P.get_field(b, "id", str)
            self._discover()
            match = [p for p, fp in self.known_models.items() if fp == want]
            if not match:
                raise P.ProtocolError(P.E_NOT_FOUND, f"no model with id {want[:64]} (models.list shows them)",
                                      {"id": want[:64]})
            path, fp = Path(match[0]), want
            self.roots.resolve(str(path), kind="file")  # still under the roots
        self.known_models[str(path)] = fp
        if self.model is not None and self.model.fingerprint == fp:
            self._reply(route, msg, {"model": self.model.info()})
            return
        self._start_load(path, (route, msg))

    def _start_load(self, path: Path, context: Any) -> None:
        engine = self.engine

        def load() -> Any:
            lm = self._load_model(path)
            engine.set_model(lm)  # on the decode thread: no decode runs meanwhile
            return lm

        self._service()
        engine.submit_call("load", load, context)

    def _on_loaded(self, context: Any, lm: Any, error: BaseException | None) -> None:
        route, msg = context if context is not None else (None, None)
        if error is not None:
            log.error("loading a model failed: %s", error)
            if route is not None:
                code = P.E_BAD_FIELD if isinstance(error, self.ms.MODEL_ERRORS) else P.E_INTERNAL
                self._send_error(route, P.ProtocolError(code, f"cannot load the model: {error}"), msg.id)
            return
        self.model = lm
        self.topology_sent.clear()
        if self._n_workers_wanted and self.jobs.n_workers == 0:
            self.jobs.n_workers = self._n_workers_wanted
            self.jobs.start_workers()
        self._publish(P.TOPIC_LOG, "log", {"level": "INFO", "logger": "imface.server",
                                           "message": f"model {lm.name} ({lm.fingerprint[:12]}) loaded"})
        if route is not None:
            self._reply(route, msg, {"model": lm.info()})

    def _on_trained(self, path: Path) -> None:
        try:
            self.known_models[str(path)] = self._service().fingerprint(path)
        except Exception:
            return
        if self.model is None:  # started without a model (e.g. to train the default one): use it
            self._start_load(path, None)

    # ================================================================== codes
    def h_codes(self, route: bytes, msg: P.Message) -> None:
        b = msg.body
        kind = P.get_field(b, "kind", str)
        lm = self._need_model()
        ms = self.ms
        if kind == "mean":
            P.check_keys(b, {"kind"})
            self._reply(route, msg, {"kind": kind, "codes": ms.codes_mean(lm)})
        elif kind == "scans":
            P.check_keys(b, {"kind"})
            scans = [{"index": i, "name": str(s.get("key", i)), "identity_index": int(s.get("identity_index", 0)),
                      "neutral": bool(s.get("neutral", False))} for i, s in enumerate(lm.scans)]
            self._reply(route, msg, {"kind": kind, "scans": scans})
        elif kind == "scan":
            P.check_keys(b, {"kind", "index"}, {"index"})
            i = P.get_field(b, "index", int)
            if not 0 <= i < len(lm.scans):
                raise P.ProtocolError(P.E_NOT_FOUND, f"no training scan {i} (the model has {len(lm.scans)})",
                                      {"field": "index"})
            codes, ident = ms.codes_scan(lm, i)
            self._reply(route, msg, {"kind": kind, "index": i, "codes": codes, "identity_index": ident})
        elif kind == "pca":
            P.check_keys(b, {"kind", "part", "n_components"}, {"part"})
            part = P.get_field(b, "part", str)
            if part not in P.CODE_PARTS:
                raise P.ProtocolError(P.E_BAD_FIELD, f"part must be one of {list(P.CODE_PARTS)}", {"field": "part"})
            n = P.get_field(b, "n_components", int, None)
            if n is not None and n < 1:
                raise P.ProtocolError(P.E_BAD_FIELD, "n_components must be >= 1", {"field": "n_components"})
            self._reply(route, msg, {"kind": kind, "part": part, **ms.codes_pca(lm, part, n)})
        elif kind == "sample":
            P.check_keys(b, {"kind", "n", "seed", "scale"})
            n = P.get_field(b, "n", int, 1)
            seed = P.get_field(b, "seed", int, 0)
            scale = P.get_field(b, "scale", float, 1.0)
            if not 1 <= n <= MAX_SAMPLES:
                raise P.ProtocolError(P.E_BAD_FIELD, f"n must be 1..{MAX_SAMPLES}", {"field": "n"})
            if not 0.0 <= scale <= 10.0:
                raise P.ProtocolError(P.E_BAD_FIELD, "scale must be in [0, 10]", {"field": "scale"})
            if not 0 <= seed < 2**63:
                raise P.ProtocolError(P.E_BAD_FIELD, "seed must be in [0, 2^63)", {"field": "seed"})
            self._reply(route, msg, {"kind": kind, "codes": ms.codes_sample(lm, n, seed, scale)})
        else:
            raise P.ProtocolError(P.E_BAD_FIELD, "kind must be mean, scans, scan, pca or sample", {"field": "kind"})

    # ================================================================== decode, stream
    @staticmethod
    def _face(b: dict[str, Any]) -> str:
        face = P.get_field(b, "face", str)
        if not 1 <= len(face) <= MAX_FACE_CHARS:
            raise P.ProtocolError(P.E_BAD_FIELD, f"face must be 1-{MAX_FACE_CHARS} characters", {"field": "face"})
        return face

    def _topology(self, session: str, lm: Any, force: bool) -> dict[str, Any]:
        key = (session, lm.fingerprint)
        if not force and key in self.topology_sent:
            return {}
        self.topology_sent[key] = None
        while len(self.topology_sent) > 4096:
            self.topology_sent.popitem(last=False)
        return {"faces": lm.template.faces.astype(np.int32), "uvs": lm.uvs}

    def h_decode(self, route: bytes, msg: P.Message) -> None:
        b = msg.body
        P.check_keys(b, {"face", "codes", "neutral", "with_topology"}, {"face", "codes"})
        face = self._face(b)
        neutral = P.get_field(b, "neutral", bool, False)
        with_topology = P.get_field(b, "with_topology", bool, False)
        lm = self._need_model()
        codes = P.check_codes(b["codes"], sizes=lm.sizes, rows=1)
        key = P.codes_key(codes, model=lm.fingerprint, neutral=neutral, template=lm.template_resolution)
        hit = self.cache.get(key)
        if hit is not None:
            self._reply(route, msg, {"face": face, "model": lm.fingerprint, "vertices": hit, "unconverged": 0,
                                     "cached": True, "decode_s": 0.0,
                                     **self._topology(msg.session, lm, with_topology)})
            return
        task = DecodeTask(route, msg.id, msg.session, face, {k: np.array(v) for k, v in codes.items()}, neutral,
                          with_topology, lm, key)
        if not self.engine.submit_decode(task):
            raise P.ProtocolError(P.E_BUSY, "too many decodes are waiting; try again", {"limit": self.engine.max_pending})

    def _on_decoded(self, t: DecodeTask, verts: np.ndarray, unconverged: int, cached: bool) -> None:
        lm = t.model
        self._send(t.route, "decode_reply", {"face": t.face, "model": lm.fingerprint, "vertices": verts,
                                             "unconverged": int(unconverged), "cached": bool(cached),
                                             "decode_s": float(t.seconds),
                                             "server_s": time.perf_counter() - t.received,
                                             **self._topology(t.session, lm, t.with_topology)}, t.request_id)

    def h_stream(self, route: bytes, msg: P.Message) -> None:
        b = msg.body
        P.check_keys(b, {"face", "frames", "codes", "neutral", "focus"}, {"face", "frames", "codes"})
        face = self._face(b)
        frames = P.get_field(b, "frames", list)
        if not 1 <= len(frames) <= MAX_STREAM_FRAMES:
            raise P.ProtocolError(P.E_TOO_LARGE if frames else P.E_BAD_FIELD,
                                  f"frames must hold 1-{MAX_STREAM_FRAMES} frame numbers", {"field": "frames"})
        if not all(isinstance(f, int) and not isinstance(f, bool) and abs(f) < 2**31 for f in frames):
            raise P.ProtocolError(P.E_BAD_FIELD, "frames must be integers", {"field": "frames"})
        if len(set(frames)) != len(frames):
            raise P.ProtocolError(P.E_BAD_FIELD, "frames must not repeat", {"field": "frames"})
        neutral = P.get_field(b, "neutral", bool, False)
        focus = P.get_field(b, "focus", int, None)
        lm = self._need_model()
        codes = P.check_codes(b["codes"], sizes=lm.sizes, rows=len(frames))
        others = [s for s in self.engine.streams_of(msg.session) if s.face != face]
        if len(others) >= MAX_STREAMS_PER_CLIENT:
            raise P.ProtocolError(P.E_BUSY, f"at most {MAX_STREAMS_PER_CLIENT} streams per client at a time",
                                  {"limit": MAX_STREAMS_PER_CLIENT})
        order = sorted(range(len(frames)), key=lambda i: frames[i])
        for old in self.engine.streams_of(msg.session, face):
            if self.engine.cancel_stream(old.id, superseded=True) is not None:
                self._send(old.route, "stream_reply", {"stream": old.id, "done": False, "superseded": True,
                                                       "sent": int(old.seq)}, old.id)
        s = StreamJob(msg.id, route, msg.session, face, [frames[i] for i in order], order,
                      {k: np.array(v) for k, v in codes.items()}, neutral, lm)
        if focus is not None:
            s.cursor = s.index_of(focus)
        self.engine.submit_stream(s)

    def h_stream_focus(self, route: bytes, msg: P.Message) -> None:
        b = msg.body
        P.check_keys(b, {"stream", "frame"}, {"stream", "frame"})
        sid = P.get_field(b, "stream", str)
        frame = P.get_field(b, "frame", int)
        if not self.engine.focus(sid, frame):
            raise P.ProtocolError(P.E_NOT_FOUND, "no running stream with that id (finished or superseded)",
                                  {"stream": sid[:64]})
        self._reply(route, msg, {"stream": sid, "frame": frame})

    def _on_frame(self, s: StreamJob, index: int, seq: int, verts: np.ndarray, cached: bool) -> None:
        if s.cancelled:
            return
        ok = self._send(s.route, "stream_frame", {"stream": s.id, "face": s.face, "frame": int(s.frames[index]),
                                                  "seq": int(seq), "vertices": verts, "cached": bool(cached)}, s.id)
        if not ok and not s.cancelled:
            self.engine.requeue_frame(s, index)

    # ================================================================== jobs
    def _new_job(self, kind: str, route: bytes, msg: P.Message, params: dict[str, Any]) -> Job:
        job = Job(P.new_id(), kind, route, msg.session, msg.id, params)
        self.jobs.submit(job)
        return job

    def _model_spec(self, lm: Any, with_template: bool) -> dict[str, Any]:
        spec: dict[str, Any] = {"model": {"path": str(lm.path), "fingerprint": lm.fingerprint}, "template": None}
        if with_template and lm.template is not None:
            t = lm.template
            spec["template"] = {"vertices": t.vertices, "faces": t.faces, "template_sdf": t.template_sdf,
                                "resolution": lm.template_resolution}
        return spec

    def h_extract(self, route: bytes, msg: P.Message) -> None:
        b = msg.body
        P.check_keys(b, {"codes", "resolution", "neutral", "face"}, {"codes"})
        lm = self._need_model()
        codes = P.check_codes(b["codes"], sizes=lm.sizes, rows=1)
        res = P.get_field(b, "resolution", int, 256)
        if not 16 <= res <= 512:
            raise P.ProtocolError(P.E_BAD_FIELD, "resolution must be 16..512", {"field": "resolution"})
        neutral = P.get_field(b, "neutral", bool, False)
        job = self._new_job("extract", route, msg, {"worker": {**self._model_spec(lm, False), "params": {
            "codes": {k: np.array(v) for k, v in codes.items()}, "resolution": res, "neutral": neutral}}})
        self._reply(route, msg, {"job": job.id})

    def h_fit(self, route: bytes, msg: P.Message) -> None:
        b = msg.body
        P.check_keys(b, {"path", "upload", "landmarks", "face", "options"})
        lm = self._need_model()
        if ("path" in b) == ("upload" in b):
            raise P.ProtocolError(P.E_BAD_FIELD, "give exactly one of path or upload", {"field": "path"})
        if "path" in b:
            path = self.roots.resolve(P.get_field(b, "path", str), kind="file")
            name, suffix = path.name, path.suffix.lower()
        else:
            up = self.uploads.finished(msg.session, P.get_field(b, "upload", str))
            path, name, suffix = up.path, up.name, up.suffix
        if suffix not in MESH_SUFFIXES | CLOUD_SUFFIXES:
            raise P.ProtocolError(P.E_BAD_SCAN, f"unsupported scan type '{suffix}' (meshes "
                                  f"{', '.join(sorted(MESH_SUFFIXES))}; point clouds {', '.join(sorted(CLOUD_SUFFIXES))})",
                                  {"field": "path"})
        opts = P.get_field(b, "options", dict, {})
        P.check_keys(opts, FIT_OPTIONS, where="options")
        options = self._fit_options(opts)
        indices = options.pop("landmark_indices", None)
        landmarks = None
        if "landmarks" in b:
            a = b["landmarks"]
            if not isinstance(a, np.ndarray):
                raise P.ProtocolError(P.E_BAD_FIELD, "landmarks must be an array (5, 3)", {"field": "landmarks"})
            if a.dtype.kind != "f" or a.shape != (5, 3) or not np.isfinite(a).all():
                raise P.ProtocolError(P.E_BAD_ARRAY, "landmarks must be five finite float [x, y, z] rows (5, 3), in "
                                      "the scan's units", {"field": "landmarks", "shape": list(a.shape)})
            landmarks = np.array(a, dtype=np.float64)
        if landmarks is None and indices is None:
            raise P.ProtocolError(P.E_BAD_FIELD, "a fit needs the five landmarks: landmarks (5, 3) or "
                                  "options.landmark_indices", {"field": "landmarks"})
        face = P.get_field(b, "face", str, "")[:MAX_FACE_CHARS]
        job = self._new_job("fit", route, msg, {"face": face, "worker": {
            **self._model_spec(lm, options.get("registered", True)),
            "params": {"path": str(path), "suffix": suffix, "name": Path(name).stem or "scan", "landmarks": landmarks,
                       "landmark_indices": indices, "options": options}}})
        self._reply(route, msg, {"job": job.id})

    @staticmethod
    def _fit_options(o: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if "units" in o:
            out["units"] = P.get_field(o, "units", str, where="options")
            if out["units"] not in ("mm", "cm", "m"):
                raise P.ProtocolError(P.E_BAD_FIELD, "options.units must be mm, cm or m", {"field": "options.units"})
        for k in ("neutral", "partial", "registered", "pose"):
            if k in o:
                out[k] = P.get_field(o, k, bool, where="options")
        if "schedule" in o:
            out["schedule"] = P.get_field(o, "schedule", str, where="options")
            if out["schedule"] not in ("fast", "plain"):
                raise P.ProtocolError(P.E_BAD_FIELD, "options.schedule must be fast or plain",
                                      {"field": "options.schedule"})
        for k, lo, hi in (("steps", 1, 5000), ("resolution", 16, 512), ("seed", 0, 2**31 - 1)):
            if k in o:
                out[k] = P.get_field(o, k, int, where="options")
                if not lo <= out[k] <= hi:
                    raise P.ProtocolError(P.E_BAD_FIELD, f"options.{k} must be {lo}..{hi}", {"field": f"options.{k}"})
        if "noise_mm" in o:
            out["noise_mm"] = P.get_field(o, "noise_mm", float, where="options")
            if not 0.0 <= out["noise_mm"] <= 50.0:
                raise P.ProtocolError(P.E_BAD_FIELD, "options.noise_mm must be 0..50", {"field": "options.noise_mm"})
        for k in ("camera", "view_direction"):
            if k in o:
                v = o[k]
                arr = np.asarray(v, dtype=np.float64) if isinstance(v, (list, np.ndarray)) else None
                if arr is None or arr.shape != (3,) or not np.isfinite(arr).all():
                    raise P.ProtocolError(P.E_BAD_FIELD, f"options.{k} must be three finite numbers",
                                          {"field": f"options.{k}"})
                out[k] = arr
        if "landmark_indices" in o:
            v = o["landmark_indices"]
            if (not isinstance(v, list) or len(v) != 5
                    or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 2**31 for i in v)):
                raise P.ProtocolError(P.E_BAD_FIELD, "options.landmark_indices must be five vertex indices",
                                      {"field": "options.landmark_indices"})
            out["landmark_indices"] = list(v)
        return out

    def h_train(self, route: bytes, msg: P.Message) -> None:
        b = msg.body
        P.check_keys(b, {"scans", "preset", "out", "resume", "steps", "checkpoint_every"}, {"preset", "out"})
        preset = P.get_field(b, "preset", str)
        if preset not in TRAIN_PRESETS:
            raise P.ProtocolError(P.E_BAD_FIELD, f"preset must be one of {list(TRAIN_PRESETS)}", {"field": "preset"})
        scans = P.get_field(b, "scans", str, "default")
        resume = P.get_field(b, "resume", bool, True)
        steps = P.get_field(b, "steps", int, None)
        every = P.get_field(b, "checkpoint_every", int, None)
        for k, v in (("steps", steps), ("checkpoint_every", every)):
            if v is not None and not 1 <= v <= 10_000_000:
                raise P.ProtocolError(P.E_BAD_FIELD, f"{k} must be >= 1", {"field": k})
        out = self.roots.resolve(P.get_field(b, "out", str), must_exist=False, field="out")
        if out.exists() and not out.is_dir():
            raise P.ProtocolError(P.E_BAD_FIELD, "out must be a folder", {"field": "out"})
        ms = self._service()
        py = sys.executable
        steps_argv: list[tuple[str, list[str]]] = []
        check = None
        if scans == "default":
            scan_dir = out / "scans"
            if not (scan_dir / "manifest.json").is_file():
                steps_argv.append(("make-default", [py, "-m", ms.CLI_MODULE, "make-default", "--out", str(scan_dir)]))
            samples = out / "samples"
            steps_argv.append(("preprocess", [py, "-m", ms.CLI_MODULE, "preprocess", str(scan_dir), "--out",
                                              str(samples), "--workers", str(self.cfg.worker_threads)]))
        else:
            src = self.roots.resolve(scans, kind="dir", field="scans")
            if (src / "index.json").is_file():
                samples = src  # already preprocessed
            elif (src / "manifest.json").is_file():
                check = lambda: self._check_scan_folder(src)  # noqa: E731  (reads every OBJ: off the loop)
                samples = out / "samples"
                steps_argv.append(("preprocess", [py, "-m", ms.CLI_MODULE, "preprocess", str(src), "--out",
                                                  str(samples), "--workers", str(self.cfg.worker_threads)]))
            else:
                raise P.ProtocolError(P.E_BAD_FIELD, "scans must be a scan folder (manifest.json), a preprocessed "
                                      "folder (index.json) or \"default\"", {"field": "scans"})
        run_dir = out / "train"
        last = run_dir / "checkpoints" / "last.safetensors"
        for j in self.jobs.active():
            if j.kind == "train" and j.params["plan"].run_dir == run_dir:
                raise P.ProtocolError(P.E_BUSY, f"a training job ({j.id}) already uses {run_dir}", {"job": j.id})
        do_resume = resume and last.is_file()  # (decided again when the job starts: it may wait in the queue)
        argv = [py, "-m", ms.TRAIN_MODULE, "--preset", preset, "--data", str(samples), "--out", str(run_dir),
                "--no-progress", "--threads", str(self.cfg.worker_threads)]
        if steps is not None:
            argv += ["--steps", str(steps)]
        if every is not None:
            argv += ["--set", f"schedule.checkpoint_every={every}"]
        steps_argv.append(("train", argv))
        out.mkdir(parents=True, exist_ok=True)
        plan = TrainPlan(run_dir=run_dir, steps=steps_argv, total_steps=steps or _preset_steps(preset),
                         resume_from=ms.scan_step(last) if do_resume else None,
                         model_path=run_dir / "model.safetensors", log_path=out / "train-server.log",
                         check=check, resume=resume, checkpoint_step=ms.scan_step)
        job = self._new_job("train", route, msg, {"plan": plan, "threads": self.cfg.worker_threads})
        self._reply(route, msg, {"job": job.id, "run": str(run_dir), "resume_from_step": plan.resume_from})

    def _check_scan_folder(self, root: Path) -> None:
        """Every file a training folder names stays under the roots (before any loader sees it).
        Runs on the training job's thread (it reads every OBJ of the folder for its `mtllib` lines)."""
        try:
            paths = self.ms.check_scan_folder(root)
        except self.ms.MODEL_ERRORS as exc:
            raise P.ProtocolError(P.E_BAD_SCAN, " ".join(str(exc).split()), {"field": "scans"}) from None
        for p in paths:
            real = Path(os.path.realpath(p))
            if not self.roots.contains(real):
                raise P.ProtocolError(P.E_FORBIDDEN_PATH, f"the scan folder names {p.name}, outside the allowed roots",
                                      {"field": "scans"})
            if real.suffix.lower() == ".obj" and real.is_file():
                with open(real, "rb") as fh:
                    for lib in obj_material_libraries(fh):
                        target = Path(os.path.realpath(real.parent / lib))
                        if not self.roots.contains(target):
                            raise P.ProtocolError(P.E_FORBIDDEN_PATH, f"{real.name} names a material library "
                                                  "outside the allowed roots", {"field": "scans"})

    def _emit_job(self, job: Job) -> None:
        owner_body = job.body(with_result=True)
        self._send(job.route, "job", owner_body, job.request_id)
        self._publish(P.TOPIC_JOB, "job", job.body(with_result=False))

    def h_job_status(self, route: bytes, msg: P.Message) -> None:
        b = msg.body
        P.check_keys(b, {"job"}, {"job"})
        job = self.jobs.get(P.get_field(b, "job", str))
        if job is None:
            raise P.ProtocolError(P.E_NOT_FOUND, "no such job (finished jobs are kept for a while)",
                                  {"job": str(b.get("job"))[:64]})
        self._reply(route, msg, job.body(with_result=job.session == msg.session))

    def h_job_cancel(self, route: bytes, msg: P.Message) -> None:
        b = msg.body
        P.check_keys(b, {"job"}, {"job"})
        jid = P.get_field(b, "job", str)
        stream = self.engine.cancel_stream(jid)
        if stream is not None:  # a stream id cancels that stream
            self._send(stream.route, "stream_reply", {"stream": stream.id, "done": False, "cancelled": True,
                                                      "sent": int(stream.seq)}, stream.id)
            self._reply(route, msg, {"job": jid, "state": "cancelled"})
            return
        job = self.jobs.get(jid)
        if job is None:
            raise P.ProtocolError(P.E_NOT_FOUND, "no such job", {"job": jid[:64]})
        self.jobs.cancel(job)
        self._reply(route, msg, {"job": jid, "state": job.state})

    def h_shutdown(self, route: bytes, msg: P.Message) -> None:
        P.check_keys(msg.body, set())
        self._reply(route, msg, {"ok": True})
        log.info("shutdown requested by a client")
        self._stop = True

    # ================================================================== uploads
    def h_upload_begin(self, route: bytes, msg: P.Message) -> None:
        b = msg.body
        P.check_keys(b, {"name", "size", "sha256"}, {"name", "size"})
        up = self.uploads.begin(msg.session, P.get_field(b, "name", str), P.get_field(b, "size", int),
                                P.get_field(b, "sha256", str, None))
        self._reply(route, msg, {"upload": up.id, "chunk_bytes": self.uploads.chunk_bytes})

    def h_upload_chunk(self, route: bytes, msg: P.Message) -> None:
        b = msg.body
        P.check_keys(b, {"upload", "offset", "data"}, {"upload", "offset", "data"})
        data = b["data"]
        if not isinstance(data, np.ndarray):
            raise P.ProtocolError(P.E_BAD_FIELD, "data must be a uint8 array", {"field": "data"})
        up = self.uploads.chunk(msg.session, P.get_field(b, "upload", str), P.get_field(b, "offset", int), data)
        self._reply(route, msg, {"upload": up.id, "received": up.received})

    def h_upload_end(self, route: bytes, msg: P.Message) -> None:
        b = msg.body
        P.check_keys(b, {"upload"}, {"upload"})
        up = self.uploads.end(msg.session, P.get_field(b, "upload", str))
        self._reply(route, msg, {"upload": up.id, "size": up.size, "sha256": up.sha256})

    # ================================================================== mailbox
    def _drain_mailbox(self) -> None:
        for _ in range(10_000):
            ev = self.mailbox.get_nowait()
            if ev is None:
                return
            try:
                self._on_event(ev)
            except Exception:
                log.exception("handling %s failed", ev[0])

    def _on_event(self, ev: tuple[Any, ...]) -> None:
        kind = ev[0]
        if kind == "decoded":
            self._on_decoded(ev[1], ev[2], ev[3], ev[4])
        elif kind == "decode_error":
            t = ev[1]
            self._send_error(t.route, ev[2], t.request_id)
        elif kind == "frame":
            self._on_frame(ev[1], ev[2], ev[3], ev[4], ev[5])
        elif kind == "stream_done":
            s = ev[1]
            self._send(s.route, "stream_reply", {"stream": s.id, "done": True, "sent": int(s.seq)}, s.id)
        elif kind == "stream_error":
            s = ev[1]
            self._send_error(s.route, ev[2], s.id)
        elif kind == "call":
            _, tag, context, result, error = ev
            if tag == "load":
                self._on_loaded(context, result, error)
        elif kind == "worker":
            self.jobs.on_worker(ev[1], ev[2])
        elif kind == "worker_exit":
            self.jobs.on_worker_exit(ev[1], ev[2])
        elif kind == "train":
            self.jobs.on_train(ev[1], ev[2])
        elif kind == "train_exit":
            self.jobs.on_train_exit(ev[1])
        elif kind == "train_log":
            job, phase, line = ev[1], ev[2], ev[3]
            self._publish_log("INFO", f"imface.train.{phase}", f"[{job.id[:8]}] {line}")
        elif kind == "log":
            self._publish_log(ev[1], ev[2], ev[3])

    def _publish_log(self, level: str, logger: str, message: str) -> None:
        now = time.monotonic()
        if now - self._log_budget[0] >= 1.0:
            self._log_budget = [now, 0]
        self._log_budget[1] += 1
        if self._log_budget[1] <= 50:  # at most 50 log lines a second on PUB
            self._publish(P.TOPIC_LOG, "log", {"level": level, "logger": logger, "message": message[:2000]})

    # ================================================================== logging to PUB
    def _install_log_handler(self) -> None:
        mailbox = self.mailbox

        class PubHandler(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                if record.name.startswith("imface.worker"):
                    return  # worker chatter stays in the log file
                try:
                    mailbox.post(("log", record.levelname, record.name, record.getMessage()))
                except Exception:
                    pass

        self._pub_handler = PubHandler(logging.INFO)
        logging.getLogger("imface").addHandler(self._pub_handler)

    def _remove_log_handler(self) -> None:
        h = getattr(self, "_pub_handler", None)
        if h is not None:
            logging.getLogger("imface").removeHandler(h)


def _preset_steps(preset: str) -> int | None:
    return {"tiny": 6, "cpu": 1600}.get(preset)


def install_signal_handlers(server: Server) -> None:
    def handler(signum: int, frame: Any) -> None:
        log.info("%s received: stopping", signal.Signals(signum).name)
        server.request_stop()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, handler)
