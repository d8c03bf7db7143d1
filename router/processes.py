"""Whether a process named by a peer is still running, from /proc.

A worker says its process id and PID namespace in its hello (router/messages.py, 1.4).
A dispatcher in the same namespace can then see a killed worker gone within a second,
instead of waiting for its heartbeats to stop counting (``worker_timeout``): a killed
worker's associations closed with it, so its shares of the destinations' association
limits are free at once. Only for workers on the dispatcher's own host (ipc://): the
initial PID namespace has the same inode on every host. Anything unclear (another
namespace, no /proc) means "still running": the heartbeat timeout stays the rule there.
"""

from __future__ import annotations

import os
from functools import cache

_PROC = "/proc"


@cache
def pid_namespace() -> str:
    """This process's PID namespace ("pid:[4026531836]"), "" where /proc cannot tell."""
    try:
        return os.readlink(f"{_PROC}/self/ns/pid")
    except OSError:
        return ""


def has_exited(pid: int, namespace: str) -> bool:
    """True only when ``pid`` of ``namespace`` (ours) is certainly no running process:
    absent, or a zombie its parent has not reaped yet."""
    if pid <= 0 or not namespace or namespace != pid_namespace():
        return False
    try:
        with open(f"{_PROC}/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
    except FileNotFoundError:
        return True
    except (OSError, IndexError):
        return False
    return bool(fields) and fields[0] in (b"Z", b"X")
