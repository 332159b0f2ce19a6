"""The atomic writer behind model files and result files: it replaces only regular
files, writes through symlinks, honours the umask (an existing file keeps its mode)
and turns write failures into errors that name the path, leaving no temporary file."""

import errno
import os
import re
import socket
import stat

import numpy as np
import pytest

from pyad import modelfile
from pyad.modelfile import atomic_write


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_round_trip(tmp_path):
    path = tmp_path / "m.pyad"
    modelfile.write(path, {"a": 1}, {"x": np.arange(5, dtype=np.float32)})
    meta, arrays = modelfile.read(path)
    assert meta["a"] == 1 and arrays["x"].tolist() == [0, 1, 2, 3, 4]
    assert _leftovers(tmp_path) == []


# -- what is at the target -------------------------------------------------------------


def _fifo(p):
    os.mkfifo(p)
    return "a FIFO (named pipe)"


def _folder(p):
    p.mkdir()
    return "a directory"


def _socket(p):
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(p))
    s.close()
    return "a socket"


def _char_device(p):
    try:  # a node like /dev/null (1, 3), made in tmp_path: never touch the real /dev
        os.mknod(p, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except (PermissionError, OSError) as exc:
        pytest.skip(f"cannot make a device node here: {exc}")
    return "a character device"


@pytest.mark.parametrize("make", [_fifo, _folder, _socket, _char_device], ids=["fifo", "directory", "socket", "device"])
def test_refuses_a_target_that_is_not_a_regular_file(tmp_path, make):
    path = tmp_path / "x"
    kind = make(path)
    before = os.lstat(path)
    with pytest.raises(ValueError, match="^" + re.escape(f"path: {path} is {kind}, not a regular file")):
        atomic_write(path, b"data")
    after = os.lstat(path)
    assert stat.S_IFMT(after.st_mode) == stat.S_IFMT(before.st_mode) and after.st_ino == before.st_ino
    assert _leftovers(tmp_path) == []


def test_refuses_a_symlink_to_a_fifo(tmp_path):
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "link").symlink_to("pipe")
    with pytest.raises(ValueError, match=rf"path: {tmp_path / 'link'} \(-> {tmp_path / 'pipe'}\) is a FIFO"):
        atomic_write(tmp_path / "link", b"data")
    assert (tmp_path / "link").is_symlink() and stat.S_ISFIFO(os.stat(tmp_path / "pipe").st_mode)


def test_model_save_refuses_a_fifo(tmp_path):
    os.mkfifo(tmp_path / "m.pyad")
    with pytest.raises(ValueError, match="is a FIFO"):
        modelfile.write(tmp_path / "m.pyad", {}, {"x": np.zeros(2)})
    assert stat.S_ISFIFO(os.lstat(tmp_path / "m.pyad").st_mode)


@pytest.mark.parametrize("relative", [True, False])
def test_writes_through_a_symlink(tmp_path, monkeypatch, relative):
    (tmp_path / "links").mkdir()
    (tmp_path / "files").mkdir()
    target = tmp_path / "files" / "m.pyad"
    target.write_bytes(b"old")
    link = tmp_path / "links" / "m.pyad"
    link.symlink_to(os.path.relpath(target, link.parent) if relative else target)
    renames = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (renames.append((a, b)), real_replace(a, b)))
    atomic_write(link, b"new")
    assert link.is_symlink() and target.read_bytes() == b"new" and link.read_bytes() == b"new"
    [(tmp, dest)] = renames
    assert os.path.dirname(tmp) == str(target.parent) and str(dest) == str(target)  # same folder: a rename
    assert _leftovers(tmp_path / "links") == _leftovers(tmp_path / "files") == []


def test_writes_through_a_dangling_symlink(tmp_path):
    link = tmp_path / "m.pyad"
    link.symlink_to("made-later.pyad")
    atomic_write(link, b"new")
    assert link.is_symlink() and (tmp_path / "made-later.pyad").read_bytes() == b"new"


def test_relative_path_in_the_working_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    atomic_write("r.txt", b"x")
    assert (tmp_path / "r.txt").read_bytes() == b"x" and _leftovers(tmp_path) == []


# -- permissions -----------------------------------------------------------------------


@pytest.fixture
def umask():
    """Set the process umask for one test, restored afterwards."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda m: os.umask(m)
    os.umask(old)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600), (0o027, 0o640)], ids=oct)
def test_new_files_honour_the_umask(tmp_path, umask, mask, mode):
    umask(mask)
    atomic_write(tmp_path / "new.csv", b"a,b\n")
    with open(tmp_path / "plain.csv", "wb") as f:  # what any other file gets
        f.write(b"a,b\n")
    assert stat.S_IMODE(os.stat(tmp_path / "new.csv").st_mode) == mode
    assert stat.S_IMODE(os.stat(tmp_path / "plain.csv").st_mode) == mode


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o664, 0o755], ids=oct)
def test_an_existing_file_keeps_its_mode(tmp_path, umask, mode):
    umask(0o022)
    path = tmp_path / "m.pyad"
    path.write_bytes(b"old")
    os.chmod(path, mode)
    atomic_write(path, b"new")
    assert path.read_bytes() == b"new" and stat.S_IMODE(os.stat(path).st_mode) == mode


# -- write failures --------------------------------------------------------------------


def test_full_file_system_names_the_path_and_leaves_nothing(tmp_path, monkeypatch):
    path = tmp_path / "m.pyad"
    path.write_bytes(b"old")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(ValueError, match=rf"^path: cannot write {path}: No space left on device$"):
        atomic_write(path, b"new")
    assert path.read_bytes() == b"old" and _leftovers(tmp_path) == []


def test_read_only_file_system_names_the_path(tmp_path, monkeypatch):
    real_open = os.open

    def read_only(p, flags, *args, **kw):
        if flags & os.O_CREAT:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), p)
        return real_open(p, flags, *args, **kw)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(ValueError, match=rf"^path: cannot write {tmp_path / 'x.pyad'}: Read-only file system$"):
        atomic_write(tmp_path / "x.pyad", b"new")
    assert _leftovers(tmp_path) == []


def test_missing_folder_names_the_path(tmp_path):
    path = tmp_path / "nowhere" / "x.pyad"
    with pytest.raises(ValueError, match=rf"^path: cannot write {path}: No such file or directory$"):
        atomic_write(path, b"new")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
def test_unwritable_folder_names_the_path(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    os.chmod(folder, 0o555)
    try:
        with pytest.raises(ValueError, match=rf"^path: cannot write {folder / 'x.pyad'}: Permission denied$"):
            atomic_write(folder / "x.pyad", b"new")
    finally:
        os.chmod(folder, 0o755)


def test_interrupted_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "m.pyad"
    path.write_bytes(b"old")

    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, b"new")
    assert path.read_bytes() == b"old" and _leftovers(tmp_path) == []
