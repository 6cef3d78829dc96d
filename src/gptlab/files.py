"""Writing to disk without ever losing a user's data: atomic files and folders, folder locks, crash recovery.

Every file gptlab writes goes through :func:`atomic_file` and every folder through :func:`atomic_dir`: the content is
built under a temporary name beside the target (``.<name>.tmp-<pid>``), fsynced, then renamed into place. A folder
that replaces an existing one is swapped in with one atomic ``renameat2(RENAME_EXCHANGE)`` on Linux, so at every
instant either the old or the new folder is in place; where the exchange is unsupported the old folder is first
renamed to ``.<name>.old-<pid>`` and :func:`recover` puts it back if the process died before the new one arrived.
Leftovers of a killed process (``.tmp-``, ``.old-``, ``.trash-`` siblings) are removed by :func:`remove_leftovers`,
which callers run while holding the folder's lock (:func:`folder_lock`), so nothing a live process is writing is
ever touched. Permissions follow the user's umask.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from .errors import GptlabError

RUN_MARKER = ".gptlab-run"  # what marks a folder as a gptlab run (see check_run_folder)
DATASET_FORMATS = ("gptlab-tokens", "gptlab-images")
_LEFTOVER = re.compile(r"\..+\.(tmp|old|trash)-\d+")  # sibling() names and atomic_file's mkstemp names


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: Path) -> None:
    """Give a file that a library created with narrower permissions (safetensors writes 0600) the mode a plain
    ``open()`` would have given it under the user's umask."""
    os.chmod(path, 0o666 & ~_umask())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file under ``root`` (before a rename commits the folder)."""
    for f in root.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fsync_dir(root)


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A binary file that replaces ``path`` when the block succeeds: written beside it under a temporary name,
    fsynced and renamed over it; on any error the temporary file is deleted. Readers see the old file or the whole
    new one, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-{os.getpid()}-")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        honour_umask(Path(tmp))  # mkstemp makes 0600
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_file(path) as f:
        f.write(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def sibling(final: Path, tag: str) -> Path:
    """``.<name>.<tag>-<pid>`` beside ``final``: where its temporary, old or trashed copy lives."""
    return final.parent / f".{final.name}.{tag}-{os.getpid()}"


def replace_dir(new: Path, final: Path) -> None:
    """Put folder ``new`` at ``final``, replacing the folder there (if any) so that one of the two is always in
    place; the old folder is deleted afterwards."""
    if not final.exists():
        os.replace(new, final)
        fsync_dir(final.parent)
    elif _exchange(new, final):  # `new` now holds the old folder
        fsync_dir(final.parent)  # the swap is durable before the old copy goes
        shutil.rmtree(new, ignore_errors=True)
    else:
        old = sibling(final, "old")
        os.replace(final, old)
        os.replace(new, final)
        fsync_dir(final.parent)
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(final: Path, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; on success every file in it is fsynced and it takes the place of
    ``final`` (replacing an existing one if ``replace``; else ``final`` must be new, and a second writer of it is
    refused: :func:`new_output`); on failure it is removed and ``final`` is untouched."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.nullcontext() if replace else new_output(final):
        tmp = sibling(final, "tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            yield tmp
            fsync_tree(tmp)
            replace_dir(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def remove_dir(path: Path) -> None:
    """Delete a folder gptlab made so that no half-deleted copy is ever visible under its name: rename it to a
    trash sibling first (atomic), then delete that."""
    trash = sibling(path, "trash")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def recover(final: Path) -> None:
    """If a process died between moving ``final`` aside and moving its replacement in, put the old one back."""
    if final.exists():
        return
    olds = sorted(final.parent.glob(f".{final.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if olds:
        os.replace(olds[-1], final)


def remove_leftovers(parent: Path, name: str | None = None) -> list[Path]:
    """Delete what killed gptlab processes left in ``parent`` (temporary, old or trashed copies of ``name``, or
    of anything when ``name`` is None). Call it only while holding the lock that guards ``parent`` (or ``name``)."""
    removed: list[Path] = []
    if not parent.is_dir():
        return removed
    leftover = re.compile(rf"\.{re.escape(name)}\.(tmp|old|trash)-\d+") if name else _LEFTOVER
    for p in parent.iterdir():
        if leftover.match(p.name):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _string_leaves(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _string_leaves(v)
    elif isinstance(value, list):
        for v in value:
            yield from _string_leaves(v)


def dataset_files(folder: Path) -> set[str] | None:
    """The names a gptlab dataset in ``folder`` owns (``meta.json`` and every file its ``files`` lists), or None
    when ``folder`` holds no gptlab dataset."""
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(meta, dict) or meta.get("format") not in DATASET_FORMATS:
        return None
    return {"meta.json", *(Path(f).name for f in _string_leaves(meta.get("files")))}


def entries(folder: Path) -> list[str]:
    """What a folder holds, less gptlab's lock and the leftovers of killed gptlab processes."""
    return sorted(p.name for p in folder.iterdir() if p.name != ".lock" and not _LEFTOVER.match(p.name))


def is_run(folder: Path) -> bool:
    """A folder a gptlab run wrote: it holds the run marker, or (runs from before the marker) a gptlab checkpoint."""
    if (folder / RUN_MARKER).is_file():
        return True
    return any((c / "state.json").is_file() for c in (folder / "checkpoints").glob("step-*"))


def some(names: list[str]) -> str:
    """The first three of ``names`` and how many more: for an error line that says what is in the way."""
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def check_run_folder(out: Path) -> None:
    """A run may write only into a new folder, an empty one, a gptlab run, or a gptlab dataset holding nothing but
    its own files (people train into their data folder); anything else is refused before a byte is written."""
    if out.exists() and not out.is_dir():
        raise GptlabError(f"{out} is a file, not a folder; choose another --out-dir")
    if not out.is_dir():
        return
    # Listed before asking whether it is a run: under torchrun rank 0 may be starting this run while another rank
    # checks, and it writes the marker before anything else, so a listing without the marker holds none of its files.
    names = entries(out)
    if is_run(out):
        return
    others = [e for e in names if e not in (dataset_files(out) or set())]
    if others:
        shown = some(others)
        raise GptlabError(
            f"--out-dir {out} holds files gptlab did not write ({shown}); a run goes into a new or empty folder or "
            f"an earlier gptlab run: choose another --out-dir (nothing was written)"
        )


@contextlib.contextmanager
def folder_lock(lock_file: Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock (``flock``) on ``lock_file`` for the block, or fail at once with one clear error that
    names the process holding it. The lock dies with its process, so a crash never leaves a folder locked; the
    file is removed on release (while still held; a waiter that locked the removed file sees that and retries)."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise GptlabError(
                f"{what} is in use by another gptlab process (pid {holder}); wait for it to finish, "
                f"or choose another folder"
            ) from None
        try:
            same = os.stat(lock_file).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed this file as we locked it: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock_file)
        os.close(fd)  # releases the lock


def mark_run(folder: Path) -> bool:
    """Mark ``folder`` as a gptlab run (what :func:`is_run` recognises); whether this call wrote the marker."""
    if (folder / RUN_MARKER).is_file():
        return False
    atomic_write_text(folder / RUN_MARKER, json.dumps({"format": "gptlab-run", "version": 1}) + "\n")
    return True


@contextlib.contextmanager
def run_folder(out: Path, what: str = "run folder") -> Iterator[Path]:
    """Create (if needed) and lock a run folder for the block, after :func:`check_run_folder`; mark it as a gptlab
    run and remove the leftovers of killed runs inside it. If the block fails before writing anything, the folder is
    left as it was found: a folder this call created is removed, a marker it added (to a dataset folder) too."""
    out = Path(out)
    check_run_folder(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    marked = False
    try:
        with folder_lock(out / ".lock", f"{what} {out}"):
            check_run_folder(out)  # again under the lock: another process may have written since
            remove_leftovers(out)
            remove_leftovers(out / "checkpoints")
            marked = mark_run(out)
            yield out
    except BaseException:
        untouched = out.is_dir() and set(entries(out)) - {RUN_MARKER} <= (dataset_files(out) or set())
        if created and untouched and set(entries(out)) <= {RUN_MARKER}:
            shutil.rmtree(out, ignore_errors=True)
        elif marked and untouched:
            (out / RUN_MARKER).unlink(missing_ok=True)
        raise


def refuse_existing(path: str | Path, what: str = "") -> None:
    """An output that must be new: one error if something is at ``path``. Commands call it before their work, so
    nothing is computed for an output they will not write; :func:`new_output` calls it again under the lock."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        raise GptlabError(
            f"{what + ' ' if what else ''}{path} already exists; choose a new name (nothing was overwritten)"
        )


@contextlib.contextmanager
def new_output(final: Path, what: str = "output") -> Iterator[Path]:
    """Guard the writing of a new file or folder ``final``: hold ``.NAME.lock`` beside it (a second writer of the
    same output is refused at once), remove what killed writers of it left, and refuse if it exists."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    with folder_lock(final.parent / f".{final.name}.lock", f"{what} {final}"):
        remove_leftovers(final.parent, final.name)
        refuse_existing(final)
        yield final


def read_input(path: str | Path, what: str = "the file", limit: int | None = None) -> bytes:
    """The bytes of a user's input file: a regular file only (a device such as /dev/zero, a FIFO or a folder is
    refused at once: the open does not block and nothing is read), and at most ``limit`` bytes when given."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise GptlabError(f"cannot read {what} {path}: {e.strerror or e}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise GptlabError(f"{what} {path} is not a regular file; pass a file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read() if limit is None else f.read(limit + 1)
    except OSError as e:
        raise GptlabError(f"cannot read {what} {path}: {e.strerror or e}") from None
    finally:
        os.close(fd)
    if limit is not None and len(data) > limit:
        raise GptlabError(f"{what} {path} is over {limit / 2**20:g} MiB; pass a smaller file")
    return data


def describe_os_error(e: OSError) -> str:
    """One line for an operating-system error: what failed, on which path, and what to do."""
    where = e.filename or "a file"
    if e.errno == errno.ENOSPC or e.errno == errno.EDQUOT:
        return (
            f"no space left on the device while writing {where}; free some space and run the command again "
            f"(nothing complete was lost; a training run continues with --resume)"
        )
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {where} ({e.strerror}); choose a folder you can write to"
    if e.errno == errno.ENOENT:
        return f"{where} does not exist; check the path"
    if e.errno == errno.EISDIR:
        return f"{where} is a folder; pass a file"
    if e.errno == errno.ENOTDIR:
        return f"{where}: a part of the path is a file, not a folder; check the path"
    return f"{where}: {e.strerror or e}; check the path and the disk"
