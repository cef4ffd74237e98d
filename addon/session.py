"""The connection to the backend as the add-on sees it (bpy-free: numpy, subprocess, the link client).

One `Session` per Blender process: it launches a local backend (the configured Python and model; its
output goes to a log file) or attaches to one through a connection file, wraps the non-blocking
`AsyncClient`, and says in one line where things stand (`status()`): connecting, ready, busy with job X,
gone (with the reason). Nothing here ever blocks unless a function says "wait" (renders, bakes, tests).
"""
from __future__ import annotations

import ipaddress
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from .codes import PCACache, ModelPCA, pca_from_reply

# States shown in the panel.
DISCONNECTED, CONNECTING, READY, BUSY, GONE = "disconnected", "connecting", "ready", "busy", "gone"


class SessionError(RuntimeError):
    pass


def is_loopback(host: str) -> bool:
    if host in ("localhost", "", "*"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _pid_alive(pid: int | None) -> bool:
    if not pid or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


class Session:
    """Backend connection, launched process, model PCA and template topology for the add-on."""

    def __init__(self, cache_dir: str | Path | None = None, *, client_factory: Callable | None = None) -> None:
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.pca_cache = PCACache(self.cache_dir / "pca" if self.cache_dir else None)
        self.client = None
        self.process: subprocess.Popen | None = None
        self.launched_pid: int | None = None
        self.launch_command: tuple[list[str], str | None] | None = None
        self.log_path: Path | None = None
        self.connection_file: Path | None = None
        self._launch_deadline = 0.0
        self._mode = "none"
        self._reason = "not connected"
        self._error = ""
        self.lock = threading.RLock()   # pump() from a timer vs a render-thread wait
        self._client_factory = client_factory
        self.messages: deque[str] = deque(maxlen=50)   # log lines for the panel
        self.cache_bytes = 1024 * 2**20
        self.timeout = 5.0
        self.request_timeout = 30.0

    # -------------------------------------------------------------------- connecting

    def _make_client(self, source):
        if self._client_factory is not None:
            return self._client_factory(source)
        from .link.client import AsyncClient

        return AsyncClient(source, name="imface-blender", timeout=self.timeout, cache_bytes=self.cache_bytes)

    def attach(self, connection_file: str | Path, *, allow_remote: bool) -> None:
        """Connect through a connection file. A non-loopback host needs `allow_remote` (Blender's
        "Allow Online Access"). Never blocks: the handshake completes in `pump()`."""
        from .link import protocol as P

        self.close_client()
        path = Path(connection_file)
        self.connection_file = path
        try:
            info = P.read_connection_file(path)
        except FileNotFoundError:
            raise SessionError(f"no connection file at {path} (is the backend running?)") from None
        except (OSError, ValueError) as e:
            raise SessionError(f"cannot read the connection file {path}: {e}") from None
        if not is_loopback(info.host) and not allow_remote:
            raise SessionError(f"the backend at {info.host} is not on this machine, and Blender's "
                               f"\"Allow Online Access\" is off (Preferences > System > Network)")
        self._mode = "attach"
        self._error = ""
        self.client = self._make_client(path)
        self.client.start()
        self.note(f"attaching to {info.router_endpoint} (pid {info.pid})")

    def launch(self, python: str, model: str, connection_file: str | Path, *, extra_args: str = "",
               device: str = "", threads: int = 0, start_timeout: float = 120.0, allow_remote: bool = False,
               cwd: str | None = None) -> None:
        """Start `python -m backend.server --model M --connection-file F` and connect once its connection
        file appears. If a backend we (or a previous Blender) launched is still running with that
        connection file (e.g. it is training), attach to it instead of starting a second one."""
        self.close_client()
        connection_file = Path(connection_file)
        self.connection_file = connection_file
        existing = self._running_backend(connection_file)
        if existing is not None:
            self.note(f"a backend (pid {existing}) is already running: attaching")
            self.attach(connection_file, allow_remote=allow_remote)
            return
        if not python or not Path(python).exists():
            raise SessionError(f"the backend Python {python!r} does not exist (set it in the preferences)")
        if not model or not Path(model).is_file():
            raise SessionError(f"the model {model!r} does not exist (set it in the preferences)")
        connection_file.parent.mkdir(parents=True, exist_ok=True)
        try:
            connection_file.unlink()
        except FileNotFoundError:
            pass
        home = connection_file.parent
        cmd = [python, "-m", "backend.server", "serve", "--model", str(model), "--connection-file",
               str(connection_file), "--home", str(home), "--keys", str(home / "keys"),
               "--parent-pid", str(os.getpid())]
        if device:
            cmd += ["--device", device]
        if threads:
            cmd += ["--threads", str(int(threads))]
        cmd += shlex.split(extra_args)
        self.log_path = home / "backend.log"
        log = open(self.log_path, "ab", buffering=0)
        log.write(f"\n--- {time.ctime()}: {' '.join(shlex.quote(c) for c in cmd)}\n".encode())
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", str(threads or 1))
        kwargs: dict[str, Any] = {}
        if sys.platform == "win32":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP
        else:
            kwargs["start_new_session"] = True   # survives Blender when it must (training)
        if cwd is None:
            cwd = guess_project_dir(python)
        self.launch_command = (cmd, cwd)
        try:
            self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            cwd=cwd, env=env, **kwargs)
        except OSError as e:
            raise SessionError(f"cannot start the backend: {e}") from None
        finally:
            log.close()
        self.launched_pid = self.process.pid
        self._launch_deadline = time.monotonic() + start_timeout
        self._mode = "launch"
        self._error = ""
        self._allow_remote = allow_remote
        self.note(f"started the backend (pid {self.process.pid}); log: {self.log_path}")

    def _running_backend(self, connection_file: Path) -> int | None:
        try:
            info = json.loads(connection_file.read_text())
        except (OSError, ValueError):
            return None
        pid = info.get("pid")
        return pid if isinstance(pid, int) and _pid_alive(pid) else None

    def _log_tail(self, n: int = 6) -> str:
        if self.log_path is None:
            return ""
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        text = " | ".join(ln.strip() for ln in lines[-n:])
        return text if len(text) <= 400 else "..." + text[-400:]

    def note(self, line: str) -> None:
        self.messages.append(f"{time.strftime('%H:%M:%S')} {line}")

    def close_client(self) -> None:
        if self.client is not None:
            try:
                self.client.close()
            except Exception:  # noqa: BLE001 - closing must not raise
                pass
        self.client = None

    def shutdown(self, *, stop_backend: bool | None = None) -> None:
        """Blender quits or the add-on is disabled: close the link; stop a backend we launched unless it
        is training (then it keeps running and the next Blender attaches to it)."""
        training = self.training_jobs()
        with self.lock:
            if stop_backend is None:
                stop_backend = self.process is not None
            if stop_backend and self.process is not None and not training:
                try:
                    if self.client is not None and self.client.state == "ready":
                        self.client.submit("shutdown", {})
                        self.client.pump()
                except Exception:  # noqa: BLE001
                    pass
                self.close_client()
                try:
                    self.process.wait(timeout=3.0)
                except subprocess.TimeoutExpired:
                    self.process.terminate()
                    try:
                        self.process.wait(timeout=3.0)
                    except subprocess.TimeoutExpired:
                        self.process.kill()
                self.process = None
            else:
                self.close_client()
            self._mode = "none"

    # -------------------------------------------------------------------- pumping and status

    def pump(self, *, blocking_lock: bool = True) -> int:
        """Handle what arrived (never waits on the network). With blocking_lock=False (a timer), skip
        this round when another thread is waiting on the link."""
        if not self.lock.acquire(blocking=blocking_lock):
            return 0
        try:
            return self._pump()
        finally:
            self.lock.release()

    def _pump(self) -> int:
        if self._mode == "launch" and self.client is None:
            proc = self.process
            if proc is not None and proc.poll() is not None:
                self._error = (f"the backend exited with code {proc.returncode} before it was ready: "
                               f"{self._log_tail() or 'no output'}")
                self._mode = "none"
                self.process = None
                return 0
            if self.connection_file is not None and self.connection_file.is_file():
                try:
                    self.attach(self.connection_file, allow_remote=getattr(self, "_allow_remote", False))
                    self._mode = "launch"
                except SessionError:
                    pass  # half-written: next round
            elif time.monotonic() > self._launch_deadline:
                self._error = f"the backend did not start in time: {self._log_tail() or 'no output'}"
                self._mode = "none"
                return 0
            if self.client is None:
                return 0
        if self.client is None:
            return 0
        n = self.client.pump()
        if self.client.state == "ready":
            self._error = ""
        elif self.process is not None and self.process.poll() is not None and self.client.state != "ready":
            rc = self.process.returncode
            how = f"was killed (signal {-rc})" if rc < 0 else f"exited with code {rc}"
            self._error = (f"the backend (pid {self.process.pid}) {how}; waiting for a backend at "
                           f"{self.connection_file} (Connect to start a new one)")
        return n

    @property
    def state(self) -> str:
        if self.client is None:
            if self._mode == "launch":
                return CONNECTING
            return GONE if self._error else DISCONNECTED
        st = self.client.state
        if st == "ready":
            return BUSY if self.busy_jobs() else READY
        if st == "connecting":
            return CONNECTING
        if st == "closed":
            return DISCONNECTED
        return GONE

    @property
    def reason(self) -> str:
        if self.client is None:
            if self._mode == "launch":
                return "starting the backend" + (f" (pid {self.launched_pid})" if self.launched_pid else "")
            return self._error or "not connected"
        if self.client.state != "ready" and self._error:
            return self._error
        return self.client.reason

    def status(self) -> str:
        """One line for the panel and the status bar."""
        st = self.state
        if st == BUSY:
            jobs = self.busy_jobs()
            j = jobs[0]
            pct = f" {100 * float(j.get('progress') or 0):.0f}%" if j.get("progress") is not None else ""
            return f"busy with {j.get('kind', 'job')} {str(j.get('job', ''))[:8]}{pct}"
        if st == GONE:
            return f"gone: {self.reason}"
        if st == CONNECTING:
            return f"connecting: {self.reason}"
        if st == READY:
            return "ready"
        return self.reason

    @property
    def ready(self) -> bool:
        return self.client is not None and self.client.state == "ready"

    @property
    def server(self) -> dict:
        return (self.client.server or {}) if self.client is not None else {}

    @property
    def model_info(self) -> dict:
        m = self.server.get("model")
        return m if isinstance(m, dict) else {}

    @property
    def fingerprint(self) -> str:
        m = self.model_info
        return str(m.get("fingerprint") or m.get("id") or "")

    @property
    def code_sizes(self) -> dict[str, int]:
        m = self.model_info
        sizes = m.get("code_sizes") or m.get("sizes") or {}
        if not sizes:
            sizes = {p: m.get(f"{p}_dim") for p in ("identity", "expression", "detail") if m.get(f"{p}_dim")}
        return {k: int(v) for k, v in sizes.items()}

    def busy_jobs(self) -> list[dict]:
        if self.client is None:
            return []
        return [j for j in self.client.jobs.values() if j.get("state") in ("queued", "running")]

    def training_jobs(self) -> list[dict]:
        return [j for j in self.busy_jobs() if j.get("kind") == "train"]

    # -------------------------------------------------------------------- requests

    def require_ready(self) -> None:
        if not self.ready:
            raise SessionError(f"the backend is not ready ({self.status()})")

    def wait(self, pending, timeout: float | None = None):
        """Pump until a Pending is done (blocking: renders, bakes, operators that need the answer)."""
        timeout = self.request_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        with self.lock:
            while not pending.done():
                self._pump()
                if pending.done():
                    break
                now = time.monotonic()
                if now >= deadline:
                    raise SessionError(f"no answer to {pending.type} within {timeout:g} s ({self.status()})")
                if self.client is not None and self.client.state == "gone" and pending.state == "queued":
                    raise SessionError(f"the backend is gone: {self.reason}")
                self._poll(min(deadline - now, 0.02))
        return pending.value()

    def _poll(self, seconds: float) -> None:
        """Sleep until a message arrives on the client's sockets (or `seconds`)."""
        if self.client is None:
            time.sleep(max(0.0, seconds))
        else:
            self.client.wait_readable(seconds)

    def request(self, type: str, body: Mapping[str, Any] | None = None, *, timeout: float | None = None) -> dict:
        self.require_ready()
        with self.lock:
            p = self.client.submit(type, body or {}, timeout=timeout or self.request_timeout)
        return self.wait(p, timeout)

    def submit(self, type: str, body: Mapping[str, Any] | None = None):
        self.require_ready()
        with self.lock:
            return self.client.submit(type, body or {})

    def pca(self, fingerprint: str | None = None, *, fetch: bool = True) -> ModelPCA | None:
        """Principal components of the backend model's codes (cached per fingerprint)."""
        fp = fingerprint or self.fingerprint
        cached = self.pca_cache.get(fp) if fp else None
        if cached is not None or not fetch:
            return cached
        if not self.ready or (fingerprint and fingerprint != self.fingerprint):
            return None
        body = {part: self.request("codes", {"kind": "pca", "part": part}) for part in ("identity", "expression", "detail")}
        pca = pca_from_reply(fp, body)
        self.pca_cache.put(pca)
        return pca

    def topology(self, fingerprint: str) -> dict | None:
        """{"faces", "uvs"} of the template of `fingerprint` (memory, then disk, then the client)."""
        topo = _TOPOLOGY.get(fingerprint)
        if topo is not None:
            return topo
        if self.cache_dir is not None:
            path = self.cache_dir / "topology" / f"{_safe(fingerprint)}.npz"
            if path.is_file():
                try:
                    with np.load(path) as z:
                        topo = {k: z[k] for k in z.files}
                    _TOPOLOGY[fingerprint] = topo
                    return topo
                except (OSError, ValueError):
                    pass
        if self.client is not None and self.fingerprint == fingerprint and self.client.topology:
            return self.remember_topology(fingerprint, self.client.topology)
        return None

    def remember_topology(self, fingerprint: str, topo: Mapping[str, Any]) -> dict:
        t = {"faces": np.asarray(topo["faces"], dtype=np.int32).reshape(-1, 3)}
        if topo.get("uvs") is not None:
            t["uvs"] = np.asarray(topo["uvs"], dtype=np.float32).reshape(-1, 2)
        _TOPOLOGY[fingerprint] = t
        if self.cache_dir is not None:
            path = self.cache_dir / "topology" / f"{_safe(fingerprint)}.npz"
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.stem + ".tmp.npz")
            np.savez(tmp, **t)
            tmp.replace(path)
        return t


_TOPOLOGY: dict[str, dict] = {}


def guess_project_dir(python: str) -> str | None:
    """The checkout a `<checkout>/.venv/bin/python` belongs to (the backend's working directory), if it
    looks like one (has backend/server); else None (the backend must then be installed in that Python)."""
    p = Path(python).absolute()
    for parent in list(p.parents)[:4]:
        if (parent / "backend" / "server").is_dir():
            return str(parent)
    return None


def _safe(fingerprint: str) -> str:
    import hashlib

    return hashlib.sha256(fingerprint.encode()).hexdigest()[:32]


def stop_process(pid: int) -> None:
    """Used by tests and the panel's "stop backend": SIGTERM a backend by pid."""
    try:
        os.kill(pid, signal.SIGTERM)
    except OSError:
        pass
