"""The spool: where received instances live until every destination has them.

Names are generated here (a random 128-bit hex id), never taken from peer text
(catalogue B.5). Layout under the spool root::

    tmp/<id>.part          being received; removed by the start-up sweep after a crash
    store/<xx>/<id>.dcm    committed; <xx> is the minute of its creation modulo 256
                           (two hex digits): files received together share a directory,
                           so one directory fsync covers a group commit and the janitor
                           removes them with few directory fsyncs

The durable order of DESIGN §3.1 is: fsync the file, rename it into ``store/``, fsync
the directory; only then may the database commit and the C-STORE success follow.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

from router import failpoints
from router.settings import SpoolSettings

_NAME = re.compile(r"^[0-9a-f]{2}/[0-9a-f]{32}\.dcm$")
_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


class SpoolFull(OSError):
    """The spool is past its high-water mark: answer 0xA700 and write nothing."""


@dataclass
class TempFile:
    """A file being received. ``spool_name`` is where ``commit`` will put it."""

    path: Path
    fd: int
    spool_name: str


class Spool:
    def __init__(self, root: Path, settings: SpoolSettings | None = None) -> None:
        self.root = root
        self.settings = settings or SpoolSettings()
        self.tmp_dir = root / "tmp"
        self.store_dir = root / "store"

    def create_layout(self) -> None:
        """Create the directories (0700) once; every store/<xx> exists before any rename."""
        for directory in (self.root, self.tmp_dir, self.store_dir):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        for i in range(256):
            (self.store_dir / f"{i:02x}").mkdir(mode=0o700, exist_ok=True)
        for directory in (self.store_dir, self.root):
            fsync_directory(directory)

    # -- receiving ------------------------------------------------------------------------
    def check_room(self) -> None:
        """Raise ``SpoolFull`` when a new instance must be refused (catalogue RX-13)."""
        usage = shutil.disk_usage(self.root)
        if usage.free < self.settings.min_free_bytes:
            raise SpoolFull(f"spool free space {usage.free} bytes is below the minimum")
        if self.settings.max_bytes and usage.used > self.settings.max_bytes:
            raise SpoolFull("spool is past its maximum size")

    def create_temp(self) -> TempFile:
        ident = uuid.uuid4().hex
        path = self.tmp_dir / f"{ident}.part"
        fd = os.open(path, _TEMP_FLAGS, 0o600)
        return TempFile(path, fd, f"{_bucket()}/{ident}.dcm")

    def commit(self, temp: TempFile) -> Path:
        """fsync the file and rename it into the store (the directory fsync is separate,
        so that one fsync can cover a whole group commit)."""
        try:
            if self.settings.fsync:
                os.fsync(temp.fd)
            failpoints.hit("listener.after_file_fsync")
        finally:
            os.close(temp.fd)
            temp.fd = -1
        final = self.store_dir / temp.spool_name
        os.rename(temp.path, final)
        failpoints.hit("listener.after_rename")
        return final

    def sync_directories(self, spool_names: Iterable[str], pool: Executor | None = None) -> None:
        """fsync each store directory that received a rename (DESIGN §3.1); with
        ``pool``, several at once (the file system folds concurrent fsyncs into one
        journal commit)."""
        if not self.settings.fsync:
            return
        directories = [self.store_dir / sub for sub in sorted({n[:2] for n in spool_names})]
        if pool is not None and len(directories) > 1:
            list(pool.map(fsync_directory, directories))
        else:
            for directory in directories:
                fsync_directory(directory)

    def discard(self, temp: TempFile) -> None:
        if temp.fd >= 0:
            os.close(temp.fd)
            temp.fd = -1
        temp.path.unlink(missing_ok=True)
        (self.store_dir / temp.spool_name).unlink(missing_ok=True)

    # -- committed files ---------------------------------------------------------------
    def path_for(self, spool_name: str) -> Path:
        if not _NAME.match(spool_name):
            raise ValueError(f"not a spool name: {spool_name!r}")
        return self.store_dir / spool_name

    def remove(self, spool_name: str) -> None:
        self.path_for(spool_name).unlink(missing_ok=True)

    def stored_names(self) -> Iterator[str]:
        for sub in sorted(self.store_dir.iterdir()):
            if sub.is_dir():
                for entry in sorted(sub.iterdir()):
                    name = f"{sub.name}/{entry.name}"
                    if _NAME.match(name):
                        yield name

    # -- recovery ------------------------------------------------------------------------
    def remove_temporary_files(self) -> int:
        """Start-up sweep: nothing in tmp/ was acknowledged, so all of it goes."""
        removed = 0
        for entry in self.tmp_dir.iterdir():
            entry.unlink(missing_ok=True)
            removed += 1
        return removed

    def remove_orphans(self, known: set[str]) -> list[str]:
        """Remove committed files with no database row (a crash between the rename and
        the commit: never acknowledged)."""
        orphans = [name for name in self.stored_names() if name not in known]
        for name in orphans:
            self.remove(name)
        return orphans


def _bucket() -> str:
    return f"{int(time.time()) // 60 % 256:02x}"


def fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
