"""``python -m megafs.server --data DIR --listen HOST:PORT [--quota BYTES] [...]``:
the server without the rest of the command line (``megafs server`` runs
the same :func:`run_server`)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from megafs.server.run import (
    DEFAULT_QUOTA,
    add_security_arguments,
    run_server,
    security_options,
)


def _quota(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m megafs.server", description="Serve encrypted storage over HTTP."
    )
    parser.add_argument(
        "--data",
        metavar="DIR",
        required=True,
        type=Path,
        help="directory for the database and chunks",
    )
    parser.add_argument(
        "--listen",
        metavar="HOST:PORT",
        default="127.0.0.1:8377",
        help="address to listen on (port 0: any free port; default 127.0.0.1:8377)",
    )
    parser.add_argument(
        "--quota",
        metavar="BYTES",
        type=_quota,
        default=DEFAULT_QUOTA,
        help=f"storage quota of new accounts (default {DEFAULT_QUOTA})",
    )
    add_security_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return run_server(args.data, args.listen, default_quota=args.quota, **security_options(args))


if __name__ == "__main__":
    sys.exit(main())
