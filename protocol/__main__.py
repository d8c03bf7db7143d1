"""``python -m protocol echoscu|echoscp|storescu|storescp ...``"""

from __future__ import annotations

import sys

from protocol.apps import APPS


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] not in APPS:
        names = "|".join(sorted(APPS))
        print(
            f"usage: python -m protocol {{{names}}} [options]  (APP -h for help)", file=sys.stderr
        )
        return 2
    return APPS[args[0]](args[1:])


if __name__ == "__main__":
    sys.exit(main())
