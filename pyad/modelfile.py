"""The single-file model format: a zip of ``meta.json`` plus ``.npy`` arrays
(``allow_pickle=False``) and ``SHA256``, a checksum over every other member.

Loading never executes code. It refuses a truncated file (not a readable zip),
an altered one (checksum mismatch) and one from an unknown format version.
Writes are atomic (a temporary file in the same folder, fsync, rename), replace
only regular files and write through symlinks; see ``atomic_write``.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import secrets
import stat
import zipfile
from pathlib import Path

import numpy as np

FORMAT = "pyad-model/2"  # 2: nested state (``write_tree``), registry names, network weights


def write(path: str | os.PathLike, meta: dict, arrays: dict[str, np.ndarray]) -> None:
    path = Path(path)
    members: list[tuple[str, bytes]] = [("meta.json", json.dumps({"format": FORMAT, **meta}, indent=1).encode())]
    for name, a in arrays.items():
        buf = io.BytesIO()
        np.save(buf, np.asarray(a, order="C"), allow_pickle=False)  # (ascontiguousarray makes 0-d 1-d)
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
    one, never a part: a temporary file in the target's folder, fsync, rename
    (POSIX ``rename`` replaces the target atomically).

    - Only a regular file (or nothing) may be at the target: a directory, device,
      FIFO or socket is refused with ``ValueError``, never replaced.
    - A symlink is written through: the file it points to is replaced (the
      temporary file goes in that file's folder) and the link stays a link.
    - A new file gets the permissions any other new file gets (0666 less the
      umask, as ``open`` gives); an existing file keeps its permission bits.
    - A failure to write (read-only or full file system, no permission, no such
      folder) raises ``ValueError("path: cannot write <path>: <reason>")``; the
      temporary file is removed whatever happens.
    """
    target, mode = _target(Path(path))
    try:
        # 0666 & ~umask for a new file, applied by the kernel as for any open(2);
        # 0600 until fchmod below for an existing file, so its data never shows wider
        fd, tmp = _create_temp(target, 0o666 if mode is None else 0o600)
    except OSError as exc:
        raise ValueError(f"path: cannot write {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            if mode is not None and hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException as exc:
        with _suppress():
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise ValueError(f"path: cannot write {path}: {exc.strerror or exc}") from None
        raise


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"))


def _target(path: Path) -> tuple[Path, int | None]:
    """The file a write to ``path`` lands in (symlinks resolved) and its permission
    bits, None when it does not exist yet. Refuses anything but a regular file."""
    target = Path(os.path.realpath(path))
    try:
        st = os.stat(target)
    except FileNotFoundError:
        return target, None
    except OSError as exc:
        raise ValueError(f"path: cannot write {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = next((k for test, k in _KINDS if test(st.st_mode)), "not a file")
        via = f" (-> {target})" if os.path.islink(path) else ""
        raise ValueError(f"path: {path}{via} is {kind}, not a regular file; pyad replaces only regular files")
    return target, stat.S_IMODE(st.st_mode) & 0o777


def _create_temp(target: Path, mode: int) -> tuple[int, str]:
    """A new file ``.<name>.<random>`` beside ``target``, opened for writing.
    ``O_EXCL``: never an existing file or a planted symlink (as ``mkstemp``, whose
    fixed 0600 mode is what this avoids)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = str(target.parent / f".{target.name}.{secrets.token_hex(4)}")
        try:
            return os.open(tmp, flags, mode), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, f"no free temporary name beside {target}")


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
    if meta.get("format") == "pyad-model/1":
        raise ValueError(f"path: {path} was written by pyad {meta.get('pyad_version', '0.1')} (format pyad-model/1), "
                         f"which this pyad no longer reads: fit the model again (pyad fit ...) to write {FORMAT}")
    if meta.get("format") != FORMAT:
        raise ValueError(f"path: {path} has format {meta.get('format')!r}; this pyad reads {FORMAT!r} "
                         "(a newer pyad may have written it)")
    arrays = {n[:-4]: np.load(io.BytesIO(data), allow_pickle=False) for n, data in members if n.endswith(".npy")}
    return meta, arrays


def write_tree(path: str | os.PathLike, meta: dict, state) -> None:
    """Write ``meta`` (JSON) and a nested ``state`` of JSON values, arrays and torch
    tensors (network weights, optimiser states; see ``pyad._tree``)."""
    from . import _tree

    skeleton, arrays = _tree.pack(state)
    write(path, {**meta, "state": skeleton}, arrays)


def read_tree(path: str | os.PathLike) -> tuple[dict, object]:
    """(meta, state) written by ``write_tree``; tensors come back as torch tensors."""
    from . import _tree

    meta, arrays = read(path)
    if "state" not in meta:
        raise ValueError(f"path: {path} holds no state")
    try:
        state = _tree.unpack(meta.pop("state"), arrays)
    except (KeyError, TypeError) as exc:
        raise ValueError(f"path: {path} is not a valid pyad model file (missing array {exc})") from None
    return meta, state


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
