"""Durable writes: every file and folder tinyskip publishes goes through here.

Content is written under a temporary name beside its destination, fsynced, and renamed
into place; the folder is fsynced after the rename. After a crash or a power loss a
reader finds the old content or the new one, whole: never a torn or empty file, never
a folder with some files missing.

One permission policy for everything published: files 0o644, folders 0o755, whatever
the umask or the writing library picked (mkstemp, mkdtemp and safetensors create
owner-only files, which would make a checkpoint unreadable to the rest of a team).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

FILE_MODE = 0o644
DIR_MODE = 0o755


def _fsync(path: Path | str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(path: Path) -> None:
    """``mkdir -p`` that gives every folder it creates the folder mode."""
    created = [p for p in (path, *path.parents) if not p.exists()]
    path.mkdir(parents=True, exist_ok=True)
    for folder in created:
        os.chmod(folder, DIR_MODE)


def publish_file(tmp: Path, final: Path) -> None:
    """Rename a written temporary file to ``final`` (same folder), durably."""
    os.chmod(tmp, FILE_MODE)
    _fsync(tmp)
    os.replace(tmp, final)
    _fsync(final.parent)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        publish_file(Path(tmp), path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)      # a failed write leaves nothing behind
        raise


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1))


def append_text(path: Path, text: str) -> None:
    """Append to a log file and fsync it (a crash mid-append can still tear the last
    line: readers of such logs drop a last line that does not parse)."""
    created = not path.exists()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
        os.write(fd, text.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:
        _fsync(path.parent)


def temp_dir(parent: Path, prefix: str) -> Path:
    """An empty hidden folder in ``parent`` (same filesystem) to fill, then publish."""
    make_dirs(parent)
    return Path(tempfile.mkdtemp(dir=parent, prefix=prefix))


def publish_dir(tmp: Path, final: Path, backup: Optional[Path] = None) -> None:
    """Rename a filled temporary folder to ``final`` (same parent), durably: every file
    and folder in it gets the permission policy and is fsynced before the rename, the
    parent after it.

    With ``backup``, an existing ``final`` is first renamed to ``backup`` (which must not
    exist); the caller deletes it once this returns, when the new folder is durable.
    Without, a non-empty ``final`` makes the rename fail with OSError.
    """
    for folder, _, files in os.walk(tmp, topdown=False):
        for name in files:
            os.chmod(os.path.join(folder, name), FILE_MODE)
            _fsync(os.path.join(folder, name))
        os.chmod(folder, DIR_MODE)
        _fsync(folder)
    if backup is not None and final.exists():
        os.replace(final, backup)
    os.replace(tmp, final)
    _fsync(final.parent)
