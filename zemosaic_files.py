"""Atomic file writes, the project's bottom layer: every output file is written through here.

A file is written into a hidden temporary file next to its destination, flushed to disk, then
renamed over the destination in one step: a reader (or a crash) sees the old file or the new one,
never half of one, and nothing is left behind on failure. The temporary name starts with a dot
and ends in ``.tmp``, so a folder scan for frames never picks it up.

This module imports nothing of the project (docs/architecture.md, "Layers").
"""

from __future__ import annotations

import contextlib
import os
import uuid
from typing import BinaryIO, Callable

__all__ = ["write_atomic", "write_text_atomic"]


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Run ``write(fileobj)`` into a hidden temp file next to ``path``, fsync it, then rename it over
    ``path``: the file is whole or absent, never half-written, and nothing is left on failure."""
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}.{uuid.uuid4().hex}.tmp")
    try:
        # Opened inside the try: an exception raised between the file's creation and the with
        # block (SIGTERM arrives as one, at any point) must remove it too.
        # O_EXCL: never clobber anything; mode "wb" (not "xb") because astropy only
        # accepts the usual mode strings on a file object.
        fh = open(tmp, "wb", opener=lambda name, flags: os.open(name, flags | os.O_EXCL, 0o666))
        with fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically (:func:`write_atomic`)."""
    payload = text.encode("utf-8")
    write_atomic(path, lambda fh: fh.write(payload))
