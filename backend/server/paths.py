"""Paths a client names (models, scans, training folders) are accepted only under configured roots.

A path is resolved with every symlink followed (`os.path.realpath`) and accepted when the result lies
under one of the roots (themselves resolved once at start-up). Opening a file re-checks where the open
descriptor really points (`/proc/self/fd/N` on Linux), so a symlink swapped in between the check and the
open cannot lead outside the roots either.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from addon.link import protocol as P

MAX_PATH_CHARS = 4096


@dataclass(frozen=True)
class PathRoots:
    roots: tuple[Path, ...]

    @classmethod
    def from_strings(cls, roots: list[str | os.PathLike[str]]) -> "PathRoots":
        resolved = []
        for r in roots:
            p = Path(os.path.realpath(os.path.expanduser(os.fspath(r))))
            if not p.is_dir():
                raise ValueError(f"root {r} is not a folder")
            if p not in resolved:
                resolved.append(p)
        return cls(tuple(resolved))

    def describe(self) -> list[str]:
        return [str(r) for r in self.roots]

    def contains(self, resolved: Path) -> bool:
        return any(resolved == r or r in resolved.parents for r in self.roots)

    def resolve(self, path: object, *, kind: str = "file", must_exist: bool = True,
                field: str = "path") -> Path:
        """The real path of `path` under a root, or ProtocolError forbidden_path / not_found / bad_field.

        kind: "file", "dir" or "any". A relative path is taken relative to the first root. With
        must_exist=False (an output folder) the nearest existing ancestor is resolved instead and the
        rest appended, so symlinks on the way are still followed."""
        if not isinstance(path, str) or not path or len(path) > MAX_PATH_CHARS or "\x00" in path:
            raise P.ProtocolError(P.E_BAD_FIELD, f"{field} must be a non-empty path string "
                                  f"(at most {MAX_PATH_CHARS} characters)", {"field": field})
        if not self.roots:
            raise P.ProtocolError(P.E_FORBIDDEN_PATH, "this server accepts no paths (no --roots)",
                                  {"field": field})
        raw = Path(os.path.expanduser(path)) if path.startswith("~") else Path(path)
        if not raw.is_absolute():
            raw = self.roots[0] / raw
        real = Path(os.path.realpath(raw))
        if not must_exist and not real.exists():
            # realpath already resolved the existing part; refuse ".." tricks in the missing tail.
            if ".." in raw.parts:
                raise P.ProtocolError(P.E_FORBIDDEN_PATH, f"{field}: '..' is not allowed in a new path",
                                      {"field": field})
        if not self.contains(real):
            raise P.ProtocolError(P.E_FORBIDDEN_PATH, f"{field} is outside the allowed roots "
                                  f"(symlinks are followed)", {"field": field, "roots": self.describe()})
        if must_exist:
            if not real.exists():
                raise P.ProtocolError(P.E_NOT_FOUND, f"{field}: {path} does not exist", {"field": field})
            if kind == "file" and not real.is_file():
                raise P.ProtocolError(P.E_BAD_FIELD, f"{field}: {path} is not a file", {"field": field})
            if kind == "dir" and not real.is_dir():
                raise P.ProtocolError(P.E_BAD_FIELD, f"{field}: {path} is not a folder", {"field": field})
        return real

    def open_file(self, path: Path) -> BinaryIO:
        """Open an already resolved file for reading and check again where the descriptor points."""
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            raise P.ProtocolError(P.E_FORBIDDEN_PATH if getattr(exc, "errno", 0) == 40 else P.E_NOT_FOUND,
                                  f"cannot open {path.name}: {exc.strerror}") from None
        fh = os.fdopen(fd, "rb")
        proc = Path(f"/proc/self/fd/{fd}")
        if proc.exists():
            real = Path(os.path.realpath(proc))
            if not self.contains(real):
                fh.close()
                raise P.ProtocolError(P.E_FORBIDDEN_PATH, "the file moved outside the allowed roots")
        return fh
