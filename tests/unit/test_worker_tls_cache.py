"""The worker's cache of destinations' TLS options (messages revision 1.5, lease ``tls``).

The worker reads a destination's TLS files from the database and keeps them for
``_TLS_FRESH`` seconds. A destination removed and re-added with --tls inside that window
must not get a clear-text association from a cache that still says "no TLS": a lease
saying tls makes the worker read the database again at once.
"""

from __future__ import annotations

import asyncio

from router.db.repository import TlsOptions
from workers.worker import Worker

SECURE = TlsOptions(ca="/ca.pem")


class _Database:
    def __init__(self, tls: TlsOptions | None) -> None:
        self.tls, self.reads = tls, 0

    def __call__(self, name: str) -> TlsOptions | None:
        self.reads += 1
        return self.tls


def _worker(database: _Database) -> Worker:
    return Worker(None, None, "ipc:///nonexistent", tls_for=database)  # type: ignore[arg-type]


def test_a_lease_saying_tls_rereads_a_cache_that_says_clear_text() -> None:
    async def main() -> None:
        database = _Database(None)
        worker = _worker(database)
        assert await worker._tls_options("pacs", False) is None
        database.tls = SECURE  # removed and re-added with --tls within the window
        assert await worker._tls_options("pacs", False) is None  # cached: no lease said tls
        assert database.reads == 1
        assert await worker._tls_options("pacs", True) == SECURE
        assert database.reads == 2

    asyncio.run(main())


def test_the_cache_still_spares_reads_when_the_lease_agrees() -> None:
    async def main() -> None:
        database = _Database(SECURE)
        worker = _worker(database)
        for _ in range(5):
            assert await worker._tls_options("pacs", True) == SECURE
        database_plain = _Database(None)
        plain = _worker(database_plain)
        for _ in range(5):
            assert await plain._tls_options("pacs", False) is None
        assert (database.reads, database_plain.reads) == (1, 1)

    asyncio.run(main())
