"""Durable writes: a file or folder is either absent or whole, also after a power loss.

The protocol, written once: write under a temp name in the destination folder, fsync the file, rename it into
place, fsync the folder (the rename itself lives in the folder's metadata). Temp names start with '.' and carry
`.tmp-`, so `sweep_temp` can remove what a dead attempt left behind.
"""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

TMP_TAG = ".tmp-"


def temp_name(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}{TMP_TAG}{uuid.uuid4().hex[:8]}")


def fsync_dir(folder: str | Path) -> None:
    """Persist a folder's entries (a rename or a new file). A no-op where the OS cannot open folders."""
    try:
        fd = os.open(str(folder), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: str | Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def fsync_tree(root: str | Path) -> None:
    """fsync every file and folder below `root` (deepest first), then `root` itself."""
    root = Path(root)
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            fsync_file(Path(folder) / name)
        fsync_dir(folder)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temp name in the same folder, fsync, rename, fsync the folder: readers see the whole file or
    nothing, before and after a power loss."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def publish(tmp: str | Path, final: str | Path) -> None:
    """Move a finished temp file or folder into place durably: its contents, the rename, the parent folder."""
    tmp, final = Path(tmp), Path(final)
    if tmp.is_dir():
        fsync_tree(tmp)
    else:
        fsync_file(tmp)
    os.replace(tmp, final)
    fsync_dir(final.parent)


def sweep_temp(folder: str | Path, stem: str = "") -> list[Path]:
    """Remove the temp files and folders a dead attempt left in `folder` (those of `stem` only, if given)."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        if entry.name.startswith("." + stem) and TMP_TAG in entry.name:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def publish_replacing(tmp: str | Path, final: str | Path) -> None:
    """`publish` a finished folder over an existing one: the old folder is first moved aside under a temp name
    (which `sweep_temp` removes if a crash interrupts), and deleted once the new one is in place."""
    tmp, final = Path(tmp), Path(final)
    old = None
    if final.exists():
        old = temp_name(final)
        os.replace(final, old)
    publish(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
