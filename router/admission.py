"""Node-wide association limits across listener processes (DESIGN §3, last paragraph).

Several listeners share one port (SO_REUSEPORT) and the kernel picks which one gets a
connection, so each process alone cannot keep ``max_associations`` (total) and
``max_associations_per_calling_ae``. The shared count lives in one small file of the
data directory, mapped into every listener (``mmap``) and guarded by ``flock``:

- ``flock`` is released by the kernel when its holder dies, even by SIGKILL; a
  ``multiprocessing`` lock or semaphore held by a killed process stays taken forever and
  would refuse every association after it;
- every listener counts in a row of its own, so the supervisor can zero the row of a
  listener that died (its connections died with it) before starting it again;
- calling AE titles are kept in ``slots`` shared name slots; a slot is free once no row
  counts it, and since at most ``max_associations`` associations are open at once,
  ``max_associations`` slots always suffice.

Layout: rows x (1 + slots) int32 counts (column 0: the row's total), then slots x 16
bytes of AE titles (space padded). Nothing here is durable: the file is rebuilt by
every ``serve`` and never fsync'd.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from protocol.acse import reject_for_limit
from protocol.net import AssociationInfo
from protocol.net.server import SCPAssociation, SCPServer
from protocol.pdu import AAssociateRJ, AAssociateRQ

AE_BYTES = 16
_INT = 4


def admission_path(data_dir: Path) -> Path:
    return data_dir / "listener-associations"


class SharedAdmission:
    """One listener's view (row ``index``) of the node-wide counts in ``path``."""

    def __init__(
        self, path: Path, *, rows: int, index: int, max_total: int, max_per_ae: int
    ) -> None:
        if not 0 <= index < rows:
            raise ValueError(f"listener index {index} outside 0..{rows - 1}")
        self.rows, self.index = rows, index
        self.max_total, self.max_per_ae = max_total, max_per_ae
        self.slots = max(1, max_total)
        self._width = 1 + self.slots
        size = layout_size(rows, max_total)
        self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        if os.fstat(self._fd).st_size != size:
            os.close(self._fd)
            raise ValueError(f"{path} does not match {rows} listeners x {max_total} associations")
        self._map = mmap.mmap(self._fd, size)
        counts_bytes = rows * self._width * _INT
        self._counts = memoryview(self._map)[:counts_bytes].cast("i")
        self._keys = memoryview(self._map)[counts_bytes:]

    @staticmethod
    def create(path: Path, *, rows: int, max_total: int) -> None:
        """Make (or reset) the file: every count zero (the supervisor, before listeners)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.ftruncate(fd, 0)
            os.ftruncate(fd, layout_size(rows, max_total))
        finally:
            os.close(fd)  # closing releases the lock

    @staticmethod
    def clear_row(path: Path, *, rows: int, max_total: int, index: int) -> None:
        """Forget what listener ``index`` counted (it died; so did its connections)."""
        with contextlib.suppress(FileNotFoundError, ValueError):
            shared = SharedAdmission(
                path, rows=rows, index=index, max_total=max_total, max_per_ae=1
            )
            try:
                with shared._locked():
                    start = index * shared._width
                    for i in range(start, start + shared._width):
                        shared._counts[i] = 0
            finally:
                shared.close()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _total(self) -> int:
        return sum(self._counts[r * self._width] for r in range(self.rows))

    def _slot_count(self, slot: int) -> int:
        return sum(self._counts[r * self._width + 1 + slot] for r in range(self.rows))

    def _key(self, slot: int) -> bytes:
        return bytes(self._keys[slot * AE_BYTES : (slot + 1) * AE_BYTES])

    def _find(self, key: bytes, claim: bool) -> int | None:
        free = None
        for slot in range(self.slots):
            in_use = self._slot_count(slot) > 0
            if in_use and self._key(slot) == key:
                return slot
            if not in_use and free is None:
                free = slot
        if claim and free is not None:
            self._keys[free * AE_BYTES : (free + 1) * AE_BYTES] = key
        return free if claim else None

    def try_acquire(self, calling_ae: str) -> bool:
        """Count one more association from ``calling_ae`` if both limits allow it."""
        key = _ae_key(calling_ae)
        with self._locked():
            if self._total() >= self.max_total:
                return False
            slot = self._find(key, claim=True)
            if slot is None or self._slot_count(slot) >= self.max_per_ae:
                return False
            base = self.index * self._width
            self._counts[base] += 1
            self._counts[base + 1 + slot] += 1
            return True

    def release(self, calling_ae: str) -> None:
        key = _ae_key(calling_ae)
        base = self.index * self._width
        with self._locked():
            for slot in range(self.slots):
                own = self._counts[base + 1 + slot]
                if own > 0 and self._key(slot) == key:
                    self._counts[base + 1 + slot] = own - 1
                    self._counts[base] = max(0, self._counts[base] - 1)
                    return

    def counts(self) -> tuple[int, dict[str, int]]:
        """The node-wide total and the count per calling AE (for tests and status)."""
        with self._locked():
            per_ae = {
                self._key(s).decode("latin-1").rstrip(): n
                for s in range(self.slots)
                if (n := self._slot_count(s)) > 0
            }
            return self._total(), per_ae

    def close(self) -> None:
        self._counts.release()
        self._keys.release()
        self._map.close()
        os.close(self._fd)


def layout_size(rows: int, max_total: int) -> int:
    slots = max(1, max_total)
    return rows * (1 + slots) * _INT + slots * AE_BYTES


def _ae_key(calling_ae: str) -> bytes:
    return calling_ae.encode("latin-1", "replace")[:AE_BYTES].ljust(AE_BYTES, b" ")


class NodeWideSCPServer(SCPServer):
    """An SCP server whose association limits are node-wide (``SharedAdmission``).

    The shared count is taken in the admit step, after the embedding's own admit hook
    accepted, so a reservation and its release pair exactly: either the request is then
    rejected (``notify("rejected")``) or it is registered and later unregistered."""

    def __init__(self, *args: Any, shared: SharedAdmission, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._shared = shared
        self._held: set[int] = set()
        inner = self.admit

        def admit(info: AssociationInfo, rq: AAssociateRQ) -> AAssociateRJ | None:
            refusal = inner(info, rq) if inner is not None else None
            if refusal is not None:
                return refusal
            if not shared.try_acquire(rq.calling_ae):
                return reject_for_limit()  # (2, 3, 2) local-limit-exceeded, node-wide
            self._held.add(id(info))
            return None

        self.admit = admit

    def _give_back(self, info: AssociationInfo) -> None:
        if id(info) in self._held:
            self._held.discard(id(info))
            self._shared.release(info.calling_ae)

    def notify(
        self,
        event: str,
        info: AssociationInfo | None = None,
        rejection: AAssociateRJ | None = None,
    ) -> None:
        if event == "rejected" and info is not None:
            self._give_back(info)
        super().notify(event, info, rejection)

    def unregister(self, association: SCPAssociation) -> None:
        super().unregister(association)
        self._give_back(association.info)
