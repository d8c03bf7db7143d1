"""Failpoints: named places where a test can make a process kill itself (catalogue B.7).

``DICOM_ROUTER_FAILPOINT`` holds comma-separated names, each optionally ``NAME@N``
(fire on the Nth time the place is reached, default the first). A process reaching an
armed place sends itself SIGKILL: nothing runs after it, exactly as with a power cut to
that process. Unset (production), ``hit`` is one set lookup.

Names, in the order an instance passes them:

- listener: ``listener.received_last_fragment``, ``listener.after_file_fsync``,
  ``listener.after_rename``, ``listener.after_dir_fsync``, ``listener.after_db_commit``,
  ``listener.after_zmq_push`` (the notice to the dispatcher is pushed after the commit
  and before the C-STORE response is written);
- worker: ``worker.after_claim``, ``worker.mid_send``, ``worker.after_dest_success``,
  ``worker.after_attempt_commit``.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "DICOM_ROUTER_FAILPOINT"


def _parse(text: str) -> dict[str, int]:
    armed: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, nth = item.partition("@")
        armed[name] = int(nth) if nth.isdigit() and int(nth) > 0 else 1
    return armed


_ARMED = _parse(os.environ.get(ENV, ""))
_HITS: Counter[str] = Counter()


def hit(name: str) -> None:
    """Kill this process here if ``name`` is armed and this is its Nth arrival."""
    if name not in _ARMED:
        return
    _HITS[name] += 1
    if _HITS[name] == _ARMED[name]:
        os.kill(os.getpid(), signal.SIGKILL)
