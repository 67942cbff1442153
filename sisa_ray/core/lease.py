"""The writer lock of an object store: a lease with a fencing token, renewed while it is held.

An object store has no kernel to release a lock when its holder dies, so the lock is a *lease*:
one object ``.lock`` at the store root, ``{owner, token, expires, released}``, that its holder
renews every ``lease_s / 3`` seconds and that anyone may take over once it has expired. Every
change to it is a conditional write the store decides atomically (S3 ``If-None-Match`` /
``If-Match`` on the ETag, GCS generation preconditions), so of two writers racing for it exactly
one wins, and a holder can only renew or release the very version it wrote last.

The object is never deleted: each acquisition writes ``token + 1``, so the token is a fencing
token that grows across all holders, and a write stamped with an older one is recognisably
stale (Kleppmann, "How to do distributed locking", 2016; Gray & Cheriton, "Leases", SOSP 1989).

A holder stops by its own clock: :meth:`ObjectLease.check` fails once the last successful
renewal is older than ``lease_s`` minus a safety margin, while anyone else may take over only
after ``expires`` (the time of that renewal plus ``lease_s``) has passed. A paused or partitioned
holder therefore stops writing before another can start, as long as clocks disagree by less than
the margin.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import random
import socket
import threading
import time
import uuid

from .store import LOCK_FILE, LeaseLost, LockTimeout, Store, StoreError, WriterLock

log = logging.getLogger(__name__)

SAFETY_FRACTION = 0.25  # of lease_s: how long before the lease expires a holder stops writing


class ObjectLease(WriterLock):
    """Exclusive, renewed lease on an object store's ``.lock``; see the module docstring.

    Parameters
    ----------
    store : an object store (``s3://``, ``gs://``).
    timeout : seconds to wait for another holder before raising :class:`LockTimeout`.
    lease_s : seconds the lease lasts without renewal; a holder that stops renewing (crashed,
        paused, cut off) blocks others for at most this long.
    """

    def __init__(self, store: Store, timeout: float = 3600.0, lease_s: float = 60.0) -> None:
        if not isinstance(lease_s, (int, float)) or not lease_s > 0:
            raise ValueError(f"lease_s must be a number of seconds > 0. Got {lease_s!r}.")
        if not isinstance(timeout, (int, float)) or not timeout >= 0:
            raise ValueError(f"timeout must be a number of seconds >= 0. Got {timeout!r}.")
        self.store, self.timeout, self.lease_s = store, float(timeout), float(lease_s)
        self.owner: str | None = None
        self.token = 0
        self._tag: str | None = None  # the version of .lock this holder wrote last
        self._renewed_at = 0.0  # monotonic time the last successful write was sent
        self._lost: str | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    # -- the lease object --------------------------------------------------------------------------

    def _doc(self, expires: float, released: bool = False) -> bytes:
        return json.dumps({"owner": self.owner, "token": self.token, "expires": expires,
                           "released": released}, sort_keys=True).encode()

    def _read(self) -> tuple[dict | None, str | None]:
        raw, tag = self.store.read_tagged(LOCK_FILE)
        if raw is None:
            return None, None
        try:
            doc = json.loads(raw)
            lease = {"owner": str(doc["owner"]), "token": int(doc.get("token", 0)),
                     "expires": float(doc["expires"]), "released": bool(doc.get("released"))}
        except (ValueError, KeyError, TypeError, AttributeError):
            raise StoreError(
                f"{self.store.location}: the lease object '{LOCK_FILE}' is not a sisa-ray lease "
                f"({raw[:60]!r}). If no writer is running, delete it and run the command again."
            ) from None
        return lease, tag

    def _write(self, expires: float, tag: str | None, released: bool = False) -> bool:
        """Replace the lease version ``tag`` with this holder's; True if the store took it."""
        new_tag = self.store._remote().put_if(LOCK_FILE, self._doc(expires, released), tag)
        if new_tag is None:
            return False
        self._tag = new_tag
        return True

    # -- acquire -----------------------------------------------------------------------------------

    def __enter__(self) -> ObjectLease:
        if self.owner is not None:
            raise RuntimeError("This writer lock is already held; it is not re-entrant.")
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        try:
            self._acquire()
        except BaseException:
            self.owner, self.token = None, 0
            raise
        self._lost = None
        self._stop.clear()
        self._renewer = threading.Thread(target=self._renew_loop, daemon=True,
                                         name=f"sisa-ray lease {self.token}")
        self._renewer.start()
        log.debug("took the lease of %s, token %d", self.store.location, self.token)
        return self

    def _acquire(self) -> None:
        deadline = time.monotonic() + self.timeout
        poll = min(max(self.lease_s / 20, 0.05), 1.0)
        waited = False
        while True:
            lease, tag = self._read()
            sent = time.monotonic()
            if lease is not None and lease["owner"] == self.owner and not lease["released"]:
                # our own write landed although its reply was lost (a retried request): ours,
                # valid from when that write was sent, which its ``expires`` tells
                written_ago = time.time() - (lease["expires"] - self.lease_s)
                self.token, self._tag = lease["token"], tag
                self._renewed_at = min(sent, time.monotonic() - written_ago)
                return
            if lease is None or lease["released"] or lease["expires"] < time.time():
                self.token = 1 if lease is None else lease["token"] + 1
                if self._write(time.time() + self.lease_s, tag):
                    self._renewed_at = sent
                    return
                continue  # someone else changed it meanwhile: look again
            if time.monotonic() > deadline:
                ends = _dt.datetime.fromtimestamp(lease["expires"]).astimezone().isoformat(
                    sep=" ", timespec="seconds")
                raise LockTimeout(
                    f"{self.store.location} is locked by another sisa-ray writer "
                    f"({lease['owner']}, token {lease['token']}); its lease ends at {ends} unless "
                    "renewed. Wait for it to finish and try again."
                )
            if not waited:
                log.info("waiting for the writer lease of %s (held by %s)",
                         self.store.location, lease["owner"])
                waited = True
            time.sleep(poll * random.uniform(0.5, 1.5))

    # -- hold --------------------------------------------------------------------------------------

    @property
    def _valid_for(self) -> float:
        return self.lease_s * (1 - SAFETY_FRACTION)

    def _renew_loop(self) -> None:
        interval = self.lease_s / 3
        wait = interval
        while not self._stop.wait(wait) and not self._lost:
            if time.monotonic() - self._renewed_at > self._valid_for:
                # too late: the lease may have expired, and it is never revived
                self._lose(f"not renewed for more than {self._valid_for:g} s")
                return
            sent = time.monotonic()
            try:
                renewed = self._write(time.time() + self.lease_s, self._tag)
            except Exception as e:  # the store is unreachable: retry until the lease ends
                log.warning("renewing the lease of %s failed: %s", self.store.location, e)
                wait = interval / 3
                continue
            if not renewed:
                self._lose("taken over by another writer")
                return
            self._renewed_at, wait = sent, interval

    def _lose(self, why: str) -> None:
        if self._lost is None:
            self._lost = why
            log.error("lost the writer lease of %s (token %d): %s",
                      self.store.location, self.token, why)

    def check(self) -> None:
        """Raise :class:`LeaseLost` if this holder may no longer write to the store."""
        if self.owner is None:
            raise LeaseLost(f"{self.store.location}: this writer does not hold the lease.")
        age = time.monotonic() - self._renewed_at
        if not self._lost and age > self._valid_for:
            self._lose(f"not renewed for {age:.1f} s (the lease lasts {self.lease_s:g} s)")
        if self._lost:
            raise LeaseLost(
                f"{self.store.location}: this writer's lease (token {self.token}) was lost: "
                f"{self._lost}. Another writer may hold the store now; run the command again "
                "to resume from the ledger."
            )

    # -- release -----------------------------------------------------------------------------------

    def __exit__(self, *exc) -> None:
        if self.owner is None:
            return
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()  # after this, no renewal races the release
            self._renewer = None
        try:
            # only the version this holder wrote last may be released; if anyone took the lease
            # over since, the store refuses and the new owner's lease stays as it is
            if not self._write(time.time(), self._tag, released=True):
                log.warning("the writer lease of %s was taken over before release (token %d); "
                            "left it to its new owner", self.store.location, self.token)
        except StoreError as e:  # unreleased, the lease just expires after lease_s
            log.warning("could not release the writer lease of %s: %s", self.store.location, e)
        finally:
            self.owner = None
