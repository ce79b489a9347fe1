"""The one way this package writes files: into a temporary name beside the target, then renamed over it,
so a reader (or a resumed run) sees the old file or the new one, never half of one."""
import contextlib
import os
import shutil
import tempfile
from typing import Iterator

from unlearn_engine.checks import fail


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it: set and restore
    os.umask(mask)
    return mask


def check_writable(path: str, what: str = "output folder") -> None:
    """ValueError naming `what` unless `path` is (or can be created as) a folder this process can write in:
    checked by creating and removing a probe file, so read-only file systems are caught even for root."""
    if os.path.exists(path) and not os.path.isdir(path):
        fail(f"{what} {path} exists and is not a folder")
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        fail(f"{what} {path} cannot be created: {probe} is a file")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-probe-", dir=probe)
        os.close(fd)
        os.remove(tmp)
    except OSError as err:
        fail(f"{what} {path} is not writable: cannot create files in {probe} ({err.strerror})")


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yields a temporary file name in path's folder; on success it is synced and renamed to path."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    suffix = os.path.splitext(path)[1]  # writers such as PIL pick the format from the extension
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=folder)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a saved file gets the user's umask like open() gives
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_text(path: str, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


@contextlib.contextmanager
def atomic_dir(path: str) -> Iterator[str]:
    """Yields a temporary folder beside path; on success it replaces path (an old folder is removed only
    after the new one is in place)."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # some writers (safetensors) create 0600 files: everything in the folder gets the user's umask
    mask = _umask()
    for root, dirs, files in os.walk(tmp):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)
    if os.path.exists(path):
        old = tempfile.mkdtemp(prefix=".old-", dir=parent)
        os.replace(path, os.path.join(old, "previous"))
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
