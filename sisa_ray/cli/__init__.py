"""The ``sisa-ray`` command line: train, delete, predict, status, verify, compare, bench.

Stdout carries results only: text, or with ``--json`` one strict JSON document. Everything else
goes to stderr: progress (a tqdm bar on a terminal, plain lines otherwise; none under ``--json``
or ``--quiet``), status lines, and with ``-v`` debug logs and Ray's worker logs. Ray's start-up
messages and MLflow's table creation are shown only with ``-v``.

Every failure is one line on stderr (``sisa-ray: error: ...``; with ``-v`` the traceback too) and
a non-zero exit status: 2 for bad input (options, ids, a store that does not exist), 1 when
``verify`` finds a difference, 3 when the command could not run (a store that cannot be reached,
a Ray cluster that does not answer, a worker that failed to start). Under ``--json`` the error is
also written to stdout as ``{"error": ..., "type": ...}``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version

from ..core.store import StoreError
from . import bench, compare, pretrain, store
from .common import (  # noqa: F401  (public to tests)
    EXIT_BAD_INPUT,
    EXIT_FAILURE,
    CLIError,
    Parser,
    _emit,
    _strict,
    add_output_options,
    results_stream,
)


def _version() -> str:
    try:
        return version("sisa-ray")
    except PackageNotFoundError:  # a source tree that was never installed
        return "unknown"


def build_parser() -> Parser:
    parser = Parser(prog="sisa-ray",
                    description="Exact machine unlearning with SISA ensembles on Ray.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, Ray's and MLflow's messages, worker logs on stderr")
    # parser_class: every subcommand gets the same conventions (no abbreviations, defaults in
    # --help, one-line usage errors)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser,
                                metavar="COMMAND")
    store.add_parsers(sub)
    compare.add_parsers(sub)
    bench.add_parsers(sub)
    pretrain.add_parsers(sub)
    for p in sub.choices.values():
        add_output_options(p)
    return parser


def _configure_output(verbose: bool) -> None:
    """Quiet unless ``-v``: our logs at WARNING; Ray (see :func:`sisa_ray.executor.ensure_ray`)
    and MLflow follow the same switch. A user's own MLFLOW_LOGGING_LEVEL is kept."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr,
                        force=True)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "INFO" if verbose else "WARNING")


# Errors in the input: the message names the option or value and the fix.
_BAD_INPUT = (CLIError, ValueError, TypeError, FileNotFoundError, NotADirectoryError,
              OverflowError)


def _exit_status(e: BaseException) -> int:
    from ..core.runtime import RuntimeMismatch
    from ..ensemble import NotFittedError

    if isinstance(e, (*_BAD_INPUT, StoreError, NotFittedError, RuntimeMismatch)):
        return EXIT_BAD_INPUT
    return EXIT_FAILURE


#: a file system's own message (GCS: several hundred characters) is cut to this length
MAX_LIBRARY_MESSAGE = 300


def _one_line(e: BaseException, store: str | None = None) -> str:
    """The error as one line: its first line, and the exception's type where the message alone
    does not say what failed. An ``OSError`` of a file system gets the store it was reading."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    text = lines[0] if lines else type(e).__name__
    if isinstance(e, OSError) and not isinstance(e, (FileNotFoundError, NotADirectoryError,
                                                     ConnectionError)):
        if len(text) > MAX_LIBRARY_MESSAGE:
            text = text[:MAX_LIBRARY_MESSAGE] + "..."
        if store and store not in text:
            text = f"{store}: {text}"
        text = (f"{text}. Check the path or bucket name, the credentials and the network "
                "(a store or cluster could not be reached)")
    elif not isinstance(e, (*_BAD_INPUT, StoreError, OSError)) and type(e).__name__ not in text:
        text = f"{type(e).__name__}: {text}"
    if len(lines) > 1:
        text += " (more with -v)"
    return text


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    verbose = bool(getattr(args, "verbose", False))
    _configure_output(verbose)
    args.progress_bars = []
    with results_stream() as out:
        args.result_stream = out
        try:
            return args.func(args)
        except KeyboardInterrupt:
            print("sisa-ray: interrupted", file=sys.stderr)
            return 130
        except Exception as e:  # every failure is one line (the traceback with -v)
            if verbose:
                traceback.print_exc(file=sys.stderr)
            message = _one_line(e, getattr(args, "store", None))
            if getattr(args, "json", False):
                print(json.dumps({"error": message, "type": type(e).__name__}), file=out)
            print(f"sisa-ray: error: {message}", file=sys.stderr)
            return _exit_status(e)
        finally:
            for bar in args.progress_bars:
                bar.close()


if __name__ == "__main__":
    sys.exit(main())
