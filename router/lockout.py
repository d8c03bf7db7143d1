"""Failed authentications per peer address, and the temporary lock-out they lead to.

Catalogue SEC-09: when a peer that guesses passcodes (``[security] user_identity =
"password"``) has failed ``max_failures`` times within ``window`` seconds, its address is
locked out for ``lockout`` seconds, during which its associations are refused
without looking at the identity (no scrypt work is spent on it, and the reply is the same
reject as a wrong passcode: nothing to learn from it). A success clears the address's
failures. Other addresses are not affected.

Pure (the clock is an argument) and per process: with ``--listeners N`` each listener
counts its own associations, so a peer spread over N listeners gets up to N times the
tries before every listener has locked it out.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

#: Addresses remembered at most; the least recently failed is forgotten first.
MAX_PEERS = 4096


@dataclass
class _Peer:
    failures: deque[float] = field(default_factory=deque)
    locked_until: float = 0.0


class PeerLockout:
    def __init__(
        self,
        max_failures: int,
        window: float,
        lockout: float,
        clock: Callable[[], float] = time.monotonic,
        max_peers: int = MAX_PEERS,
    ) -> None:
        self.max_failures = max_failures
        self.window = window
        self.lockout = lockout
        self._clock = clock
        self._max_peers = max_peers
        self._peers: OrderedDict[str, _Peer] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.max_failures > 0

    def locked_for(self, address: str) -> float:
        """Seconds the address stays locked out (0: it may try)."""
        peer = self._peers.get(address)
        if peer is None:
            return 0.0
        return max(0.0, peer.locked_until - self._clock())

    def failed(self, address: str) -> bool:
        """Count a failed authentication; True when it locked the address out."""
        if not self.enabled:
            return False
        now = self._clock()
        peer = self._peers.pop(address, None) or _Peer()
        self._peers[address] = peer  # most recent last
        while len(self._peers) > self._max_peers:
            self._peers.popitem(last=False)
        failures = peer.failures
        failures.append(now)
        while failures and failures[0] <= now - self.window:
            failures.popleft()
        if len(failures) < self.max_failures:
            return False
        failures.clear()
        peer.locked_until = now + self.lockout
        return True

    def succeeded(self, address: str) -> None:
        self._peers.pop(address, None)
