"""The ``sisa-ray`` command line: train, delete, predict, status, verify, compare, bench.

Every command takes ``--json`` for machine-readable output on stdout. Errors go to stderr as one
line that names the problem and the fix, with exit status 2 (bad input) or 1 (verify mismatch).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

from ..core.store import StoreError
from . import bench, compare, store
from .common import EXIT_BAD_INPUT, CLIError, _emit, _strict  # noqa: F401  (public to tests)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sisa-ray", description="Exact machine unlearning with SISA ensembles on Ray."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    store.add_parsers(sub)
    compare.add_parsers(sub)
    bench.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from ..core.runtime import RuntimeMismatch
    from ..ensemble import NotFittedError

    try:
        return args.func(args)
    except (CLIError, ValueError, TypeError, StoreError, FileNotFoundError, NotFittedError,
            RuntimeMismatch, OverflowError, NotADirectoryError) as e:
        if getattr(args, "json", False):
            print(json.dumps({"error": str(e), "type": type(e).__name__}))
        print(f"sisa-ray: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
