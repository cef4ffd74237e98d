"""Keys, the bind rule and the connection file.

Choice: CURVE on every socket, loopback included, with a `zmq.auth` allowlist. On a shared machine
any local user can connect to a loopback port, and the backend reads files and runs training, so
loopback is not a boundary; CurveZMQ authenticates both ends and encrypts, and the allowlist means a
client without an allowed key never completes the handshake (it gets nothing: no replies, no events).

Keys live in a folder (default `~/.imface/keys`, 0700; secrets 0600) and survive restarts unless
rotated (`imface keygen --rotate`), so a client holding them reconnects after a restart.

Bind rule: on loopback, missing keys are created on the spot (the local client gets them from the
connection file). A non-loopback address is refused unless the keys folder already holds the server
keypair and an allowlist with at least one client key, made beforehand with `imface keygen`: the server
never invents credentials for a network-facing socket.
"""
from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path

from addon.link import protocol as P


class BindRefused(Exception):
    """A bind address the security rules do not allow (exit code 2)."""


def default_home() -> Path:
    return Path(os.environ.get("IMFACE_HOME") or Path.home() / ".imface")


def is_loopback(host: str) -> bool:
    h = host.strip("[]")
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        try:  # a host name: loopback only if every address it has is
            infos = socket.getaddrinfo(h, None)
        except OSError:
            return False
        return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)


def prepare_keys(keys_dir: Path, host: str) -> P.KeyFiles:
    """The key files for a server bound to `host` (see the bind rule above)."""
    P.require_curve()
    if is_loopback(host):
        return P.ensure_keys(keys_dir)
    files = P.KeyFiles(keys_dir=keys_dir, server_public=keys_dir / "server.key",
                       server_secret=keys_dir / "server.key_secret", client_public=keys_dir / "client.key",
                       client_secret=keys_dir / "client.key_secret", allowed_dir=keys_dir / "allowed")
    allowed = sorted(files.allowed_dir.glob("*.key")) if files.allowed_dir.is_dir() else []
    if not (files.server_public.is_file() and files.server_secret.is_file() and allowed):
        raise BindRefused(f"refusing to bind the non-loopback address {host} without CURVE keys: {keys_dir} has no "
                          "server keypair and allowlist. Create them first with `imface keygen --keys "
                          f"{keys_dir}` (and `--client NAME` for each remote machine), then start the server again.")
    if os.name == "posix" and (files.server_secret.stat().st_mode & 0o077):
        raise BindRefused(f"{files.server_secret} is readable by other users; chmod 600 it or rotate the keys")
    return files


def keygen(keys_dir: Path, *, client: str | None = None, rotate: bool = False) -> dict[str, str]:
    """Create (or rotate) the server and default client keypairs; with `client`, one more allowed client."""
    files = P.ensure_keys(keys_dir, rotate=rotate)
    out = {"keys": str(files.keys_dir), "server_public_key": P.load_keypair(files.server_public)[0].decode(),
           "allowed": str(files.allowed_dir)}
    if client:
        public, secret = P.add_client_key(keys_dir, client)
        out.update(client=client, client_public_key=public.decode(),
                   client_secret_file=str(keys_dir / f"{client}.key_secret"))
    return out
