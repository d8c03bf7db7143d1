"""Command-line apps in the manner of pynetdicom's and DCMTK's (PS3.7 C-ECHO, C-STORE)."""

from __future__ import annotations

from collections.abc import Callable


def _echoscu(argv: list[str]) -> int:
    from protocol.apps.echoscu import main

    return main(argv)


def _echoscp(argv: list[str]) -> int:
    from protocol.apps.echoscp import main

    return main(argv)


def _storescu(argv: list[str]) -> int:
    from protocol.apps.storescu import main

    return main(argv)


def _storescp(argv: list[str]) -> int:
    from protocol.apps.storescp import main

    return main(argv)


APPS: dict[str, Callable[[list[str]], int]] = {
    "echoscu": _echoscu,
    "echoscp": _echoscp,
    "storescu": _storescu,
    "storescp": _storescp,
}
