"""The single-file model format: a zip of ``meta.json`` plus ``.npy`` arrays
(``allow_pickle=False``) and ``SHA256``, a checksum over every other member.

Loading never executes code. It refuses a truncated file (not a readable zip),
an altered one (checksum mismatch) and one from an unknown format version.
Writes are atomic: a temporary file in the same folder, fsync, rename.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

FORMAT = "pyad-model/1"


def write(path: str | os.PathLike, meta: dict, arrays: dict[str, np.ndarray]) -> None:
    path = Path(path)
    members: list[tuple[str, bytes]] = [("meta.json", json.dumps({"format": FORMAT, **meta}, indent=1).encode())]
    for name, a in arrays.items():
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
        members.append((f"{name}.npy", buf.getvalue()))
    digest = _digest(members)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for name, data in members:
            z.writestr(name, data)
        z.writestr("SHA256", digest)
    atomic_write(path, buf.getvalue())


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new
    one, never a part: a temporary file in the same folder, fsync, rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent if str(path.parent) else ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with _suppress():
            os.unlink(tmp)
        raise


def read(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"path: no model file at {path}")
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            if "meta.json" not in names or "SHA256" not in names:
                raise ValueError(f"path: {path} is not a pyad model file")
            members = [(n, z.read(n)) for n in names if n != "SHA256"]
            stored = z.read("SHA256").decode()
    except (zipfile.BadZipFile, EOFError, OSError) as exc:
        raise ValueError(f"path: {path} is truncated, corrupt or not a pyad model file ({exc})") from None
    if _digest(members) != stored:
        raise ValueError(f"path: {path} is corrupt or was altered (checksum mismatch)")
    meta = json.loads(dict(members)["meta.json"])
    if meta.get("format") != FORMAT:
        raise ValueError(f"path: {path} has format {meta.get('format')!r}; this pyad reads {FORMAT!r}")
    arrays = {n[:-4]: np.load(io.BytesIO(data), allow_pickle=False) for n, data in members if n.endswith(".npy")}
    return meta, arrays


def _digest(members: list[tuple[str, bytes]]) -> str:
    h = hashlib.sha256()
    for name, data in members:
        h.update(name.encode() + b"\0" + len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return True
