"""Sending spooled instances to one destination over reused associations.

A ``DestinationPool`` keeps up to ``max_associations`` open associations to one
destination and sends many instances over each (DESIGN §3.3). An association proposes
one presentation context per (SOP class, transfer syntax) pair the pool has been asked
for so far; when an instance needs a pair the open association did not propose, it is
released and a new one proposes every pair seen (up to the 128 contexts PS3.8 allows),
so a destination's associations learn the spool's mix once. Files are sent as they are,
never transcoded: when the destination does not accept the file's transfer syntax the
attempt fails with ``NoAcceptableContext``, which the retry policy dead-letters
(catalogue DST-06/07). Every exception becomes an ``Outcome``; the worker never dies of
a destination's behaviour (DST-18).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path

from protocol.dimse import CStoreRSP
from protocol.errors import NoAcceptableContext
from protocol.net import Association, ContextRequest, Timeouts, associate
from router import failpoints
from router.db.repository import TlsOptions
from router.tls import client_context
from workers.retry import Outcome, from_exception

log = logging.getLogger(__name__)

MAX_CONTEXTS = 128  # PS3.8 9.3.2.2: odd context ids 1..255


@dataclass(frozen=True, slots=True)
class Destination:
    name: str
    ae_title: str
    host: str
    port: int
    max_associations: int = 2
    tls: TlsOptions | None = None  # None: clear text


def tls_context(tls: TlsOptions | None) -> ssl.SSLContext | None:
    """The client context for a destination's TLS options (``TlsConfigError`` when its
    files cannot be used); the server certificate is verified, and its name against the
    destination's host (router/tls.py)."""
    if tls is None:
        return None
    return client_context(tls.ca, tls.cert, tls.key)


@dataclass(frozen=True, slots=True)
class Item:
    """One instance to send: the spool file and what its meta header says."""

    path: Path
    sop_class_uid: str
    transfer_syntax: str


@dataclass
class _Slot:
    association: Association | None = None
    pairs: frozenset[tuple[str, str]] = field(default_factory=frozenset)
    last_used: float = 0.0
    busy: bool = False


class DestinationPool:
    def __init__(
        self,
        destination: Destination,
        calling_ae: str,
        timeouts: Timeouts | None = None,
        tls: ssl.SSLContext | None = None,
        idle_close: float = 30.0,
    ) -> None:
        self.destination = destination
        self._calling_ae = calling_ae
        self._timeouts = timeouts or Timeouts(connect=10, acse=30, dimse=60)
        self._tls = tls
        self._idle_close = idle_close
        self._free: asyncio.Queue[_Slot] = asyncio.Queue()
        self._slots: list[_Slot] = []
        self._capacity = 0
        self.resize(destination.max_associations)
        self._seen: dict[tuple[str, str], None] = {}

    @property
    def open_associations(self) -> int:
        """Associations open or being used (a slot in use may be opening one)."""
        return sum(1 for slot in self._slots if slot.busy or slot.association is not None)

    def resize(self, associations: int) -> None:
        """Allow up to ``associations`` (at least 1) at once: the dispatcher's share
        of the destination's node-wide limit for this worker can grow. Shrinking takes
        effect as slots come free (their associations are released)."""
        self._capacity = max(1, associations)
        self.destination = dataclasses.replace(self.destination, max_associations=self._capacity)
        while len(self._slots) < self._capacity:
            slot = _Slot()
            self._slots.append(slot)
            self._free.put_nowait(slot)

    async def send(self, item: Item) -> Outcome:
        """Send one instance; returns the DIMSE status or the failure as an ``Outcome``."""
        slot = await self._free.get()
        while await self._retired(slot):
            slot = await self._free.get()
        slot.busy = True
        try:
            return await self._send_on(slot, item)
        finally:
            slot.busy = False
            slot.last_used = time.monotonic()
            if not await self._retired(slot):
                self._free.put_nowait(slot)

    async def _retired(self, slot: _Slot) -> bool:
        """Drop ``slot`` (releasing its association) if the share shrank below the
        slots there are; whether it was dropped."""
        if len(self._slots) <= self._capacity:
            return False
        self._slots.remove(slot)
        await self._drop(slot)
        return True

    async def _send_on(self, slot: _Slot, item: Item) -> Outcome:
        pair = (item.sop_class_uid, item.transfer_syntax)
        self._seen.setdefault(pair, None)
        try:
            association = await self._association_for(slot, pair)
            if failpoints.armed("worker.mid_send"):
                response = await self._send_then_fail(association, item)
            else:
                response = await association.send_c_store_file(item.path)
        except Exception as exc:
            await self._drop(slot)
            return from_exception(exc)
        return Outcome(status=response.status, detail=response.error_comment or "")

    @staticmethod
    async def _send_then_fail(association: Association, item: Item) -> CStoreRSP:
        """The failpoint ``worker.mid_send``: one turn of the loop lets the send write
        its request (it then waits for the response), and the process dies there."""
        sending = asyncio.ensure_future(association.send_c_store_file(item.path))
        await asyncio.sleep(0)
        failpoints.hit("worker.mid_send")
        return await sending

    async def _association_for(self, slot: _Slot, pair: tuple[str, str]) -> Association:
        association = slot.association
        if association is not None and association.is_alive and pair in slot.pairs:
            if self._accepted(association, pair):
                return association
            raise NoAcceptableContext(
                f"{self.destination.name} did not accept {pair[0]} in {pair[1]}"
            )
        await self._drop(slot)
        pairs = list(self._seen)
        if pair in pairs:  # keep the newest pair inside the 128-context limit
            pairs.remove(pair)
        pairs = [*pairs[-(MAX_CONTEXTS - 1) :], pair]
        association = await associate(
            self.destination.host,
            self.destination.port,
            [ContextRequest(sop_class, (ts,)) for sop_class, ts in pairs],
            called_ae=self.destination.ae_title,
            calling_ae=self._calling_ae,
            timeouts=self._timeouts,
            ssl=self._tls,
            server_hostname=self.destination.host if self._tls else None,
        )
        slot.association, slot.pairs = association, frozenset(pairs)
        if not self._accepted(association, pair):
            raise NoAcceptableContext(
                f"{self.destination.name} did not accept {pair[0]} in {pair[1]}"
            )
        return association

    @staticmethod
    def _accepted(association: Association, pair: tuple[str, str]) -> bool:
        return pair in set(association.contexts.values())

    async def _drop(self, slot: _Slot) -> None:
        association, slot.association, slot.pairs = slot.association, None, frozenset()
        if association is None:
            return
        if association.is_alive:
            with contextlib.suppress(Exception):
                await association.release()
                return
        association.abort()

    async def close_idle(self) -> None:
        """Release associations unused for ``idle_close`` seconds (call periodically)."""
        now = time.monotonic()
        held = []
        while not self._free.empty():
            held.append(self._free.get_nowait())
        for slot in held:
            if slot.association is not None and now - slot.last_used > self._idle_close:
                await self._drop(slot)
            self._free.put_nowait(slot)

    async def close(self) -> None:
        held = []
        while not self._free.empty():
            held.append(self._free.get_nowait())
        for slot in held:
            await self._drop(slot)
            self._free.put_nowait(slot)
