"""Streaming reads of untrusted tar archives: one pass, bounded memory, unsafe members reported instead of used."""
from __future__ import annotations

import posixpath
import tarfile
from dataclasses import dataclass
from typing import Callable, Iterator

# A single member larger than this is reported, not read: an archive must not be able to exhaust a worker's memory.
MAX_MEMBER_BYTES = 512 * 2**20


@dataclass
class TarMember:
    name: str  # normalised path inside the archive ("./a/b.jpg" -> "a/b.jpg")
    data: bytes | None  # None when `problem` is set
    problem: str | None = None
    size: int = 0


def normalise_member_name(name: str) -> str | None:
    """The member's path inside the archive, or None when it would escape the archive's folder."""
    if name.startswith("/") or "\\" in name:
        return None
    norm = posixpath.normpath(name)
    if norm == ".." or norm.startswith("../") or "/../" in f"/{norm}/":
        return None
    return norm  # normpath already dropped "./" and collapsed "a/./b"


def iter_tar(path: str, read_limit: Callable[[str], int | None] | None = None) -> Iterator[TarMember]:
    """Members of a tar (plain or compressed) in archive order, read in one streaming pass.

    `read_limit(name)` may cap how many bytes of a member are read (SA-1B annotations carry large masks of which
    only a small header block is needed). A truncated or corrupt archive ends with one member whose `problem` says
    so; everything before it is still delivered.
    """
    count = 0
    try:
        with tarfile.open(path, mode="r|*") as archive:
            for info in archive:
                if info.isdir():
                    continue
                count += 1
                name = normalise_member_name(info.name)
                if name is None:
                    yield TarMember(info.name, None, f"unsafe member name {info.name!r} escapes the archive")
                    continue
                if not info.isfile():
                    kind = "symlink" if info.issym() else "hard link" if info.islnk() else "special file"
                    yield TarMember(name, None, f"member {info.name!r} is a {kind}, not a regular file")
                    continue
                if info.size > MAX_MEMBER_BYTES:
                    yield TarMember(name, None, f"member {info.name!r} is {info.size} bytes (> {MAX_MEMBER_BYTES})")
                    continue
                limit = read_limit(name) if read_limit else None
                handle = archive.extractfile(info)
                data = handle.read(limit) if limit else handle.read()
                yield TarMember(name, data, None, info.size)
    except (tarfile.TarError, EOFError, OSError, ValueError) as err:
        yield TarMember(f"#archive-error-{count}", None, f"corrupt or truncated archive after {count} members: "
                        f"{type(err).__name__}: {err}")


def split_member_name(name: str) -> tuple[str, str]:
    """("dir/sa_1.jpg") -> ("dir/sa_1", "jpg"): webdataset's grouping, at the first dot of the base name."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower() if dot else ""
