"""What every ``sisa-ray`` command shares: the parser conventions, errors, output (text or
strict JSON), progress and the options about the store and the Ray cluster.

Output rules: stdout carries the command's result and nothing else (under ``--json`` one strict
JSON document); progress, status lines, warnings and, with ``-v``, Ray's worker logs go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from typing import IO

import numpy as np

from ..core.config import ResourceConfig

EXIT_BAD_INPUT = 2
#: the command could not run: a store, a cluster or a worker failed (not the user's input)
EXIT_FAILURE = 3


class CLIError(Exception):
    """A user error the CLI reports in one line."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default in ``--help``, unless it has none (None, an off switch) or
    the help text already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        # identity, not equality: a default of 0 or 0.0 is shown, only "no default" is not
        if any(action.default is v for v in (None, False, argparse.SUPPRESS)) \
                or "default" in text.lower():
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """Every ``sisa-ray`` parser: no abbreviated options (``--stor x`` is an error, never
    ``--store x``), defaults shown in ``--help``, and a usage error in one line on stderr."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs["allow_abbrev"] = False
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def comma_ints(text: str) -> list[int]:
    """An argparse ``type``: ``"1,2,4"`` as ``[1, 2, 4]``, every entry an int >= 1."""
    try:
        values = [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers >= 1 such as 1,2,4; got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"every value must be >= 1; got {text!r}")
    return values


def positive_int(text: str) -> int:
    """An argparse ``type``: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1; got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1; got {value}")
    return value


@contextlib.contextmanager
def results_stream() -> Iterator[IO[str]]:
    """Keep stdout for results: while a command runs, whatever else writes to stdout (Ray's
    forwarded worker logs, a library's prints, C code writing to file descriptor 1) goes to
    stderr; the command's result is written to the stream this yields."""
    out = sys.stdout
    out.flush()
    try:
        fd = out.fileno()
    except (AttributeError, OSError, ValueError):  # a captured stream (tests): Python level only
        fd = None
    saved = None
    if fd == 1:
        saved = os.dup(1)
        os.dup2(2, 1)
        result: IO[str] = open(saved, "w", closefd=False)  # noqa: SIM115  (closed below)
    else:
        result = out
    sys.stdout = sys.stderr
    try:
        yield result
    finally:
        result.flush()
        sys.stderr.flush()
        sys.stdout = out
        if saved is not None:
            result.close()
            os.dup2(saved, 1)
            os.close(saved)


def _emit(args, payload: dict, text: str) -> None:
    out = getattr(args, "result_stream", None) or sys.stdout
    if args.json:
        print(json.dumps(_strict(payload), indent=1, default=_json_default, allow_nan=False),
              file=out, flush=True)
    else:
        print(text, file=out, flush=True)


def _strict(o):
    """JSON has no NaN or infinity: an undefined number is null."""
    if isinstance(o, dict):
        return {k: _strict(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_strict(v) for v in o]
    if isinstance(o, (float, np.floating)) and not np.isfinite(o):
        return None
    return o


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def progress_mode(args) -> str:
    """``none`` under --json or --quiet; ``bar`` (tqdm: counts, rate, ETA) when stderr is a
    terminal; ``lines`` otherwise (one line per step, for logs of ``ray job submit`` and CI)."""
    if getattr(args, "json", False) or getattr(args, "quiet", False):
        return "none"
    return "bar" if sys.stderr.isatty() else "lines"


class Progress:
    """Counts with an ETA on stderr, as a tqdm bar or as plain lines in tqdm's format.

    Parameters
    ----------
    label : what is counted, e.g. ``train``.
    mode : ``bar``, ``lines`` or ``none`` (see :func:`progress_mode`).
    unit : the unit counted.
    """

    #: an announcement waits this long, so a command that fails at once (bad input) prints its
    #: one error line and nothing else
    ANNOUNCE_DELAY_S = 1.0

    def __init__(self, label: str, mode: str, unit: str = "shard") -> None:
        self.label, self.mode, self.unit = label, mode, unit
        self.start = time.perf_counter()
        self._bar = None
        self._timer: threading.Timer | None = None
        self.n, self.total = 0, None

    def announce(self, what: str, delay_s: float | None = None) -> None:
        """Say what happens before the first count (e.g. workers starting), after ``delay_s``
        unless a count or :meth:`close` comes first."""
        if self.mode == "none":
            return
        self._timer = threading.Timer(self.ANNOUNCE_DELAY_S if delay_s is None else delay_s,
                                      self._show, (f"{self.label}: {what}",))
        self._timer.daemon = True
        self._timer.start()

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _show(self, text: str) -> None:
        if self.mode == "lines":
            print(text, file=sys.stderr, flush=True)
        elif self.mode == "bar":
            self._ensure_bar()
            self._bar.set_description_str(text, refresh=True)

    def _ensure_bar(self) -> None:
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=self.label, unit=self.unit, file=sys.stderr,
                             dynamic_ncols=True, leave=True)

    def update(self, done: int, total: int, note: str = "") -> None:
        """``done`` of ``total`` finished; ``note`` says which."""
        self._cancel()
        self.n, self.total = done, total
        if self.mode == "bar":
            self._ensure_bar()
            self._bar.total = total
            self._bar.set_description_str(self.label, refresh=False)
            if note:
                self._bar.set_postfix_str(note, refresh=False)
            self._bar.update(done - self._bar.n)
        elif self.mode == "lines":
            from tqdm import tqdm

            meter = tqdm.format_meter(done, total, time.perf_counter() - self.start,
                                      prefix=self.label, unit=self.unit, ncols=0)
            print(f"  {meter}{'  ' + note if note else ''}", file=sys.stderr, flush=True)
        if done >= total:
            self.close()

    def write(self, text: str) -> None:
        """A status line that does not break the bar."""
        if self.mode == "none":
            return
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        self._cancel()
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __call__(self, p: dict) -> None:
        """The ensemble's progress callback: one call per finished shard training."""
        note = (f"shard {p['shard']} from slice {p.get('start_step', 0)}, "
                f"{p['sample_steps']} sample-steps in {p['seconds']:.2f}s")
        self.update(p["done"], p["total"], note)


def _check_cluster(args) -> None:
    """Before a command that starts workers shows progress: a cluster named by --address (or
    RAY_ADDRESS) answers, else the command fails in one line at once."""
    address = getattr(args, "address", None) or os.environ.get("RAY_ADDRESS")
    if getattr(args, "backend", "ray") == "ray" and address:
        from ..executor import check_reachable

        check_reachable(address)


def _progress(args, label: str, announce: bool = False):
    """A progress callback for the ensemble, or None when progress is off. ``announce`` shows a
    line at once, while the shards' data is prepared and the workers start."""
    mode = progress_mode(args)
    if mode == "none":
        return None
    bar = Progress(label, mode)
    if isinstance(getattr(args, "progress_bars", None), list):
        args.progress_bars.append(bar)  # closed by main when the command ends
    if announce:
        bar.announce("starting Ray workers" if getattr(args, "backend", "local") == "ray"
                     else "preparing the shards")
    return bar


def _status_printer(args):
    """Status lines to stderr, or nothing with --json/--quiet."""
    if args.json or args.quiet:
        return lambda m: None
    return lambda m: print(m, file=sys.stderr, flush=True)


def _ensemble_kwargs(args) -> dict:
    return {
        "backend": args.backend,
        "address": args.address,
        "resources": ResourceConfig(
            num_cpus=args.cpus_per_shard, num_gpus=args.gpus_per_shard,
            max_concurrent=args.max_concurrent,
        ),
    }


def _open(args, recover: bool = True):
    """Open the store. Readers pass ``recover=False``: they never take the writer lock."""
    from ..ensemble import SISAEnsemble

    return SISAEnsemble.open(args.store, recover=recover, progress=_progress(args, "recover"),
                             **_ensemble_kwargs(args))


def _accuracy_table(ens, test) -> dict:
    from ..core.aggregation import aggregate, aggregate_regression

    probs, active = ens.shard_proba(test.features)
    if test.task == "regression":
        def mae(pred):
            return float(np.abs(pred - test.labels).mean())

        return {
            "mae_mean": mae(aggregate_regression(probs, active, "mean")),
            "mae_median": mae(aggregate_regression(probs, active, "median")),
            "shards": [None if not a else mae(p[:, 0]) for p, a in zip(probs, active)],
        }
    hard = aggregate(probs, active, "hard")[0]
    soft = aggregate(probs, active, "soft")[0]
    per_shard = [
        None if not a else float((p.argmax(1) == test.labels).mean())
        for p, a in zip(probs, active)
    ]
    return {
        "ensemble_hard": float((hard == test.labels).mean()),
        "ensemble_soft": float((soft == test.labels).mean()),
        "shards": per_shard,
    }



def add_output_options(p: argparse.ArgumentParser) -> None:
    """``-v``, ``--json``, ``--quiet``: accepted by every command, after the command's name too.
    Options a command already has are left alone."""
    have = p._option_string_actions
    if "--verbose" not in have:
        # SUPPRESS: not given after the command, the value given before it (or False) stands
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                       help="debug logging, Ray's and MLflow's messages, worker logs on stderr")
    if "--json" not in have:
        p.add_argument("--json", action="store_true",
                       help="the result as one strict JSON document on stdout, nothing else there")
    if "--quiet" not in have:
        p.add_argument("--quiet", action="store_true",
                       help="no progress and no status lines; results and errors only")


def _add_common(p: argparse.ArgumentParser, store: bool = True, backend: bool = True,
                resources: bool = True) -> None:
    """The options of the store commands. ``backend=False`` or ``resources=False`` leave out
    the options a command cannot honour (it must not accept and ignore them)."""
    if store:
        p.add_argument("--store", required=True,
                       help="local path or pyarrow.fs URI (s3://, gs://, file://) of the store")
    add_output_options(p)
    if backend:
        p.add_argument("--backend", choices=["ray", "local"], default="ray",
                       help="ray: shard workers are Ray actors; local: in this process, no Ray")
    p.add_argument("--address", default=None,
                   help="Ray cluster to join, host:port or 'auto' (default: RAY_ADDRESS, else a "
                        "local Ray instance for this command)")
    if resources:
        p.add_argument("--cpus-per-shard", type=float, default=0.0,
                       help="CPUs each worker reserves; 0 reserves a token share, and the pool "
                            "has one worker per CPU")
        p.add_argument("--gpus-per-shard", type=float, default=0.0,
                       help="GPUs each worker reserves; above 0 the pool has one worker per GPU "
                            "share")
        p.add_argument("--max-concurrent", type=int, default=None,
                       help="workers, i.e. shards training at once (default: cluster CPUs / "
                            "torch threads per shard, or GPUs / --gpus-per-shard)")
