"""Failpoints: named places where a test can make a process kill itself (catalogue B.7).

``DICOM_ROUTER_FAILPOINT`` holds comma-separated names, each optionally ``NAME@N``
(fire on the Nth time the place is reached, default the first). A process reaching an
armed place sends itself SIGKILL: nothing runs after it, exactly as with a power cut to
that process. Unset (production), ``hit`` is one set lookup.

A restarted process reads the same environment, so it would die at the same place
again. With ``DICOM_ROUTER_FAILPOINT_ONCE=DIR`` each name fires once for every process
sharing DIR: the process creates ``DIR/NAME`` before it kills itself, and a place whose
file exists is passed. That lets one run of ``serve`` walk through several places, one
kill each, while the supervisor restarts what died.

Names, in the order an instance passes them:

- listener: ``listener.received_last_fragment``, ``listener.after_file_fsync``,
  ``listener.after_rename``, ``listener.after_dir_fsync``, ``listener.after_db_commit``,
  ``listener.after_zmq_push`` (the notice to the dispatcher is pushed after the commit
  and before the C-STORE response is written), ``listener.after_rsp_sent`` (the
  success response is written to the socket);
- dispatcher: ``dispatcher.after_lease_commit`` (leases committed, none sent yet),
  ``dispatcher.after_lease_sent`` (the lease messages are on the worker's socket);
- worker: ``worker.after_claim`` (a lease received), ``worker.mid_send`` (the C-STORE
  request is written to the destination, its response not read),
  ``worker.after_dest_success`` (the destination answered success, nothing recorded),
  ``worker.after_attempt_commit`` (the result is committed, the credit not yet given
  back and the spool file not yet removed);
- per instance: ``worker.sending=<SOP Instance UID>`` kills the worker each time it is
  about to send that instance (a poison instance, catalogue FI-08).
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from pathlib import Path

ENV = "DICOM_ROUTER_FAILPOINT"
ONCE_ENV = "DICOM_ROUTER_FAILPOINT_ONCE"


def _parse(text: str) -> dict[str, int]:
    armed: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, nth = item.partition("@")
        armed[name] = int(nth) if nth.isdigit() and int(nth) > 0 else 1
    return armed


_ARMED = _parse(os.environ.get(ENV, ""))
_ONCE = os.environ.get(ONCE_ENV) or None
_HITS: Counter[str] = Counter()
_KEYED = any("=" in name for name in _ARMED)


def armed(name: str) -> bool:
    """Whether ``name`` may still fire in this process (for places that must do extra
    work to reach their exact moment, only when a test asks for it)."""
    if name not in _ARMED:
        return False
    return _ONCE is None or not (Path(_ONCE) / name).exists()


def hit(name: str) -> None:
    """Kill this process here if ``name`` is armed and this is its Nth arrival."""
    if name not in _ARMED:
        return
    _HITS[name] += 1
    if _HITS[name] != _ARMED[name]:
        return
    if _ONCE is not None:
        try:  # the first process to get here fires; every later one passes
            os.close(os.open(Path(_ONCE) / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            return
    os.kill(os.getpid(), signal.SIGKILL)


def hit_for(name: str, key: str) -> None:
    """``hit`` for the place ``name`` reached with ``key`` (armed as ``NAME=KEY``)."""
    if _KEYED:
        hit(f"{name}={key}")
