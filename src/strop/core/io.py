"""Atomic writes: a reader never sees a half-written file or checkpoint folder. Outputs that exist are
replaced only when asked (`check_fresh_output`), never the input itself; `exclusive` serialises the
processes that update one thing in place (read, change, write) so no update is lost."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from strop.core.errors import StropError


def cache_root() -> Path:
    """Where strop caches tokenized data and converted models: $STROP_CACHE or ~/.cache/strop."""
    return Path(os.environ.get("STROP_CACHE") or Path.home() / ".cache" / "strop")


def unreadable_file(path: Path) -> str | None:
    """Why `path` cannot be read as a file, in a user's words ("not found", "a folder, not a file", "a
    symbolic link loop", ...); None when it can."""
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        return "a broken symbolic link (its target does not exist)" if p.is_symlink() else "not found"
    except OSError as e:
        return "a symbolic link loop" if e.errno == errno.ELOOP else (e.strerror or str(e))
    if stat.S_ISDIR(st.st_mode):
        return "a folder, not a file"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file (a device, pipe or socket)"
    if not os.access(p, os.R_OK):
        return "not readable (permission denied)"
    return None


def check_output(path: str | Path, option: str, folder: bool) -> Path:
    """Before any work: `path` can be written as a file (or, `folder`, a folder): no part of it is a
    file, no name in it is too long, and the nearest folder of it that exists takes new files (probed
    with a file, since permission bits do not stop root). Returns that folder. Errors name `option`
    (`--out`, `output_dir`) and the path as the user gave it."""
    p = Path(path).expanduser()
    existing = p if folder else p.parent
    try:
        long = [part for part in p.parts if len(part.encode()) > 255]
        if long:
            raise StropError(f"{option}: {path}: the name {long[0][:40]}... is too long (255 bytes at most)")
        if folder and p.exists() and not p.is_dir():
            raise StropError(f"{option}: {path} is a file; give a folder")
        if not folder and p.is_dir():
            raise StropError(f"{option}: {path} is a folder; give a file name")
        while not existing.exists() and not existing.is_symlink():
            existing = existing.parent
        if not existing.is_dir():
            raise StropError(f"{option}: {path}: {existing} is a file, not a folder")
        fd, probe = tempfile.mkstemp(prefix=".strop-write-test-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise StropError(f"{option}: cannot write in {existing} ({e.strerror})") from None
    return existing


def check_fresh_output(
    path: str | Path, option: str, folder: bool, force: bool, inputs: Iterable[str | Path | None] = ()
) -> Path:
    """`check_output`, and an output that exists (a file, or a folder that is not empty) is refused
    unless `force`. An input is refused even with `force`: the output file is one of `inputs` (the same
    file by any path, link or symbolic link), or the output folder holds one. Errors name `option` and
    the path; returns what `check_output` returns."""
    existing = check_output(path, option, folder)
    p = Path(path).expanduser()
    for given in inputs:
        if given is None:
            continue
        source = Path(given).expanduser()
        if not folder and _same_file(p, source):
            raise StropError(f"{option}: {path} is the input file; choose another path")
        if folder and p.is_dir() and _inside(source, p):
            raise StropError(f"{option}: {path} holds the input {given}; choose another folder")
    taken = p.is_dir() and any(p.iterdir()) if folder else p.exists() or p.is_symlink()
    if taken and not force:
        what = "exists and is not empty" if folder else "exists"
        raise StropError(f"{option}: {path} {what}; pass --force to replace it")
    return existing


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet): the same path is still the same file
        return a.resolve() == b.resolve()


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


@contextmanager
def exclusive(lock: Path, what: str, timeout: float, notice_after: float = 1.0) -> Iterator[None]:
    """Hold an exclusive `flock` on the file `lock` while the block runs; another process holding it is
    waited for (a line on stderr after `notice_after` s), and past `timeout` s the wait ends in a
    StropError naming `what`. The lock file is removed on release and re-checked after every acquire,
    so a waiter never holds a lock file that is no longer the one at `lock`. A process that dies
    releases its lock (the kernel drops it), so a crash never leaves `what` locked."""
    import fcntl

    start, told = time.monotonic(), False
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    waited = time.monotonic() - start
                    if waited >= timeout:
                        raise StropError(
                            f"{what}: another process has been changing it for {timeout:.0f} s; try again "
                            "once it has finished"
                        ) from None
                    if not told and waited >= notice_after:
                        logging.getLogger("strop").warning("waiting for another process changing %s...", what)
                        told = True
                    time.sleep(0.05)
            try:
                current = os.stat(lock).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:  # its holder removed it on release: take the next one
                current = False
            if current:
                try:
                    yield
                finally:
                    lock.unlink(missing_ok=True)  # while still held: the next one starts from a new file
                return
        finally:
            os.close(fd)  # releases the lock


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` via a temporary file, fsync and rename."""
    path = Path(path)
    if path.is_dir():
        raise StropError(f"{path}: is a folder; give a file name to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:  # name the file the user asked for, not our temporary one
        raise OSError(e.errno, e.strerror, str(path)) from None
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_json(path: Path, obj: object) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_dir(final: Path, fill: Callable[[Path], None]) -> Path:
    """Create directory `final` atomically: `fill(tmp)` writes into a temporary sibling, every file
    is fsynced, then the folder is renamed into place. An existing `final` is replaced only after the
    new one is complete, so a crash leaves either the old or the new folder, never a partial one."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        fill(tmp)
        for p in tmp.rglob("*"):
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        fsync_dir(tmp)
        _put_in_place(tmp, final)
        fsync_dir(final.parent)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.filename and ".tmp-" in str(e.filename):  # name the folder the user asked for
            raise OSError(e.errno, e.strerror, str(final)) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _put_in_place(tmp: Path, final: Path, attempts: int = 5) -> None:
    """Rename `tmp` to `final`, moving an existing `final` aside first. Two processes may write the same
    folder at once (tune workers tokenizing into one shared cache): when the other one's folder lands
    between our two renames, ours goes in place on the next attempt (the last writer's folder stays)."""
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    for attempt in range(attempts):
        try:
            if final.exists():
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
            return
        except OSError as e:
            raced = e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT) and tmp.exists()
            if not raced or attempt == attempts - 1:
                raise


def append_jsonl(path: Path, obj: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(obj) + "\n")
