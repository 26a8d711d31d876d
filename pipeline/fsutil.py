"""Crash-safe file writing: temp name, fsync, rename. Nothing half-written ever looks complete."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:  # a full disk: no temp file left behind
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode())


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def replace_dir(staging: Path, final: Path) -> None:
    """Swap a fully written `staging` folder in for `final` (a directory rename is atomic)."""
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    fsync_dir(final.parent)
    if old.exists():
        shutil.rmtree(old)


def human_bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def free_bytes(path: Path) -> int | None:
    """Free space of the filesystem holding `path` (its nearest existing parent), None if unknown."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def no_space(exc: BaseException, where: Path, needed: int | None = None) -> str | None:
    """For a write into `where` that failed: the user's message if its filesystem is full (or over quota),
    else None."""
    return space_message(where, needed) if disk_full(exc, where, needed) else None


def disk_full(exc: BaseException, where: Path, needed: int | None = None) -> bool:
    """Whether a write of about `needed` bytes into `where` failed for want of space. Some writers (torch.save)
    drop the errno: then a filesystem with less free space than the write needs counts as full (ask before
    removing what the failed write left)."""
    code = getattr(exc, "errno", None)
    if code is not None:
        return code in (errno.ENOSPC, errno.EDQUOT)
    free = free_bytes(where)
    return "No space left" in str(exc) or free is not None and needed is not None and free < needed


def space_message(where: Path, needed: int | None = None) -> str:
    free = free_bytes(where)
    need = f"needs about {human_bytes(needed)}, " if needed else ""
    have = f"{human_bytes(free)} free" if free is not None else "free space unknown"
    return f"no space left on the device of {where} ({need}{have})"
