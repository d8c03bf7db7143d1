"""Worker liveness as the dispatcher sees it, for ``queue status`` and the metrics.

The dispatcher is the one process that hears from every worker (local ones over ipc://,
remote ones over tcp://), and it keeps what it heard in memory only. About once a second
it writes that view to ``<data dir>/run/workers.json`` (a new file renamed over the old,
so a reader never sees half of one; no fsync: it is rewritten a second later and means
nothing after a crash); ``dicom-router queue status`` and the metrics process read the
same file, so both report the same workers. The file says when it was written: a reader
that finds it older than ``STALE_AFTER`` reports no workers (the dispatcher is gone).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

FILENAME = "workers.json"
VERSION = 1
#: A view older than this is of a dispatcher that stopped writing it.
STALE_AFTER = 10.0


@dataclass(frozen=True, slots=True)
class WorkerSeen:
    """One connected worker: its name (from its hello), the peer address of its
    connection ("local" for ipc://), the destinations it reaches (None: all), its free
    credit, and when (Unix time) the dispatcher last heard from it."""

    name: str
    host: str
    destinations: tuple[str, ...] | None
    credit: int
    last_seen: float

    def silent_for(self, now: float) -> float:
        return max(0.0, now - self.last_seen)


def view_path(data_dir: Path) -> Path:
    """The node's view file (beside router/status.py's node.json)."""
    return data_dir / "run" / FILENAME


def write_view(path: Path, workers: Iterable[WorkerSeen], now: float | None = None) -> None:
    """Replace the file with ``workers`` (atomically: a temp file renamed over it)."""
    body = {
        "version": VERSION,
        "written_at": time.time() if now is None else now,
        "workers": [asdict(w) for w in sorted(workers, key=lambda w: (w.name, w.host))],
    }
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}")
    temp.write_text(json.dumps(body))
    os.replace(temp, path)


def read_view(path: Path, now: float | None = None) -> Sequence[WorkerSeen]:
    """The workers of the latest view; none if there is no file, it is unreadable, or
    older than ``STALE_AFTER`` seconds."""
    now = time.time() if now is None else now
    try:
        body = json.loads(path.read_text())
        if body.get("version") != VERSION or now - float(body["written_at"]) > STALE_AFTER:
            return ()
        return tuple(
            WorkerSeen(
                name=str(w["name"]),
                host=str(w["host"]),
                destinations=None if w["destinations"] is None else tuple(w["destinations"]),
                credit=int(w["credit"]),
                last_seen=float(w["last_seen"]),
            )
            for w in body["workers"]
        )
    except (OSError, ValueError, KeyError, TypeError):
        return ()


def remove_view(path: Path) -> None:
    """The dispatcher stopped: it knows of no worker any more."""
    path.unlink(missing_ok=True)
