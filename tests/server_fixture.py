"""Helpers for tests that run the backend server as a real subprocess (`python -m backend.server serve`)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import zmq

REPO = Path(__file__).resolve().parents[1]


@dataclass
class ServerProc:
    proc: subprocess.Popen
    home: Path
    connection_file: Path
    keys: Path
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL if it does not stop in time; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def kill9(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-6000:]
        except OSError:
            return ""


def start_server(home: Path, *, model: str | Path | None = None, bind: str = "127.0.0.1", roots: list[Path] = (),
                 keys: Path | None = None, connection_file: Path | None = None, extra: list[str] = (),
                 wait: bool = True, timeout: float = 120.0) -> ServerProc:
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    keys = Path(keys) if keys is not None else home / "keys"
    conn = Path(connection_file) if connection_file is not None else home / "connection.json"
    log = home / "server-stdout.log"
    cmd = [sys.executable, "-m", "backend.server", "serve", "--home", str(home), "--bind", bind, "--keys", str(keys),
           "--connection-file", str(conn), "--log-file", str(home / "server.log"), *map(str, extra)]
    if model is not None:
        cmd += ["--model", str(model)]
    if roots:
        cmd += ["--roots", *map(str, roots)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, cwd=str(REPO), env=env, stdout=out, stderr=subprocess.STDOUT)
    sp = ServerProc(proc, home, conn, keys, log)
    if wait:
        deadline = time.monotonic() + timeout
        while not _written_by(conn, proc.pid):
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited ({proc.returncode}):\n{sp.output()}")
            if time.monotonic() > deadline:
                sp.stop()
                raise RuntimeError(f"the server did not start within {timeout} s:\n{sp.output()}")
            time.sleep(0.1)
    return sp


def _written_by(conn: Path, pid: int) -> bool:
    """The connection file exists and names this process (an old one left by a kill -9 does not count)."""
    import json

    try:
        return json.loads(conn.read_text()).get("pid") == pid
    except (OSError, ValueError):
        return False


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def curve_socket(ctx: zmq.Context, kind: int, endpoint: str, server_public: str | bytes | None,
                 keypair: tuple[bytes, bytes] | None) -> zmq.Socket:
    """A socket connected to `endpoint`: CURVE with `keypair` (None: no CURVE at all)."""
    s = ctx.socket(kind)
    s.linger = 0
    if keypair is not None:
        s.curve_serverkey = server_public.encode() if isinstance(server_public, str) else server_public
        s.curve_publickey, s.curve_secretkey = keypair
    if kind == zmq.SUB:
        s.setsockopt(zmq.SUBSCRIBE, b"")
    s.connect(endpoint)
    return s


def other_local_address() -> str | None:
    """An IPv4 address of this machine other than loopback (None when there is none)."""
    try:
        out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=5).stdout.split()
    except (OSError, subprocess.SubprocessError):
        out = []
    for a in out:
        if "." in a and not a.startswith("127."):
            return a
    return None
