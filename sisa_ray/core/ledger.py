"""The append-only deletion ledger, with a compact checkpoint of its state.

Each event is its own object ``ledger/<seq>.json``, created exclusively and durably, so appending
works the same on a local disk and on an object store (which cannot append to a file). A request
is *acknowledged* once its ``acknowledged`` event is on durable storage, and *completed* once the
manifest that excludes its ids is live and a ``completed`` event follows. Request ids make
requests idempotent: the same id twice is one deletion.

Reading never lists the ledger: ``ledger/state.json`` holds the folded state (every request's
status, the ids of pending requests, every deleted id, the last sequence number folded in), and a
reader loads it and then probes ``seq+1, seq+2, ...`` until one is missing. Sequence numbers have
no gaps (an appender takes the first free number after the last one it saw), so the probe finds
every newer event. The checkpoint is only a cache of the events: a stale or missing one costs a
longer probe, never a wrong answer. Per-request bookkeeping is therefore one read of the
checkpoint plus the events after it, however long the ledger's history.
"""

from __future__ import annotations

import datetime as _dt
import json
import threading
from dataclasses import dataclass, field

from .store import Store, StoreError

LEDGER_DIR = "ledger"
LEDGER_STATE = f"{LEDGER_DIR}/state.json"
STATUSES = ("pending", "completed", "abandoned")


def event_path(seq: int) -> str:
    return f"{LEDGER_DIR}/{seq:010d}.json"


@dataclass
class Request:
    """One request as the folded ledger knows it. ``ids`` are kept only while it is pending;
    :meth:`Ledger.request_ids` reads them from the acknowledgement otherwise."""

    request_id: str
    ack_seq: int
    status: str = "pending"
    end_seq: int | None = None  # the completed/abandoned event
    ids: list[int] | None = None

    def to_dict(self) -> dict:
        d = {"ack_seq": self.ack_seq, "status": self.status, "end_seq": self.end_seq}
        if self.ids is not None:
            d["ids"] = self.ids
        return d


@dataclass
class LedgerState:
    """Everything the ledger's events say, folded."""

    seq: int = 0
    requests: dict[str, Request] = field(default_factory=dict)
    deleted: set[int] = field(default_factory=set)

    def to_dict(self) -> dict:
        return {
            "format": 1, "seq": self.seq,
            "requests": {rid: r.to_dict() for rid, r in self.requests.items()},
            "deleted_ids": sorted(self.deleted),
        }

    @classmethod
    def from_dict(cls, d: dict) -> LedgerState:
        if d.get("format") != 1:
            raise StoreError(f"ledger state has format {d.get('format')!r}; this sisa-ray reads 1.")
        reqs = {
            rid: Request(rid, int(r["ack_seq"]), r["status"], r.get("end_seq"),
                         None if r.get("ids") is None else [int(i) for i in r["ids"]])
            for rid, r in d["requests"].items()
        }
        return cls(int(d["seq"]), reqs, {int(i) for i in d["deleted_ids"]})

    def fold(self, ev: dict, where: str) -> None:
        """Apply one event (the next in sequence)."""
        rid, kind = ev["request_id"], ev["event"]
        if kind == "acknowledged":
            if rid not in self.requests:
                self.requests[rid] = Request(rid, int(ev["seq"]), ids=[int(i) for i in ev["ids"]])
        elif kind in ("completed", "abandoned"):
            req = self.requests.get(rid)
            if req is None:
                raise StoreError(
                    f"{where}: ledger has a {kind} event for request {rid!r} without its "
                    "acknowledgement. The ledger was edited by hand; restore it from backup."
                )
            if req.status == "pending":
                if kind == "completed":
                    self.deleted.update(req.ids or [])
                req.status, req.end_seq, req.ids = kind, int(ev["seq"]), None
        else:
            raise StoreError(f"{where}: unknown ledger event {kind!r} at seq {ev['seq']}.")
        self.seq = int(ev["seq"])

    def pending(self) -> list[Request]:
        return sorted((r for r in self.requests.values() if r.status == "pending"),
                      key=lambda r: r.ack_seq)

    def summary(self) -> dict:
        counts = {s: 0 for s in STATUSES}
        for r in self.requests.values():
            counts[r.status] += 1
        return {"requests": len(self.requests), **counts, "deleted_ids": len(self.deleted)}


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


class Ledger:
    """Deletion requests of one store, read from and appended to ``ledger/``.

    A ``Ledger`` caches the state it has read and only probes for newer events on :meth:`state`.
    Appends take ``lock`` (the writer lock) for its fencing token and liveness check.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self._state: LedgerState | None = None
        self._mutex = threading.RLock()  # one reader may serve several threads of a handle

    def state(self) -> LedgerState:
        """The current state: the cached or checkpointed state plus every newer event."""
        with self._mutex:
            return self._refresh()

    def _refresh(self) -> LedgerState:
        if self._state is None:
            raw = self.store.read_optional(LEDGER_STATE)
            self._state = (LedgerState() if raw is None
                           else LedgerState.from_dict(self.store.read_json(LEDGER_STATE, raw)))
        st = self._state
        while True:
            rel = event_path(st.seq + 1)
            raw = self.store.read_optional(rel)
            if raw is None:
                return st
            ev = self.store.read_json(rel, raw)
            if int(ev.get("seq", -1)) != st.seq + 1:
                raise StoreError(f"{self.store.location}/{rel}: its seq field is {ev.get('seq')}.")
            st.fold(ev, self.store.location)

    def requests(self) -> dict[str, Request]:
        return dict(self.state().requests)

    def pending(self) -> list[Request]:
        return self.state().pending()

    def deleted_ids(self) -> set[int]:
        return set(self.state().deleted)

    def event(self, seq: int) -> dict:
        return self.store.read_json(event_path(seq))

    def request_ids(self, request_id: str) -> list[int]:
        """The ids of a request, from its acknowledgement."""
        req = self.state().requests[request_id]
        return req.ids if req.ids is not None else [int(i) for i in self.event(req.ack_seq)["ids"]]

    def report(self, request_id: str) -> dict:
        """The report recorded when the request completed (empty if it has not)."""
        req = self.state().requests[request_id]
        return {} if req.end_seq is None else self.event(req.end_seq).get("report", {})

    def _append(self, event: dict, lock) -> int:
        with self._mutex:
            return self._append_locked(event, lock)

    def _append_locked(self, event: dict, lock) -> int:
        lock.check()
        st = self.state()
        seq = st.seq + 1
        while True:
            full = {**event, "seq": seq, "time": _now(), "token": lock.token}
            blob = json.dumps(full, sort_keys=True).encode()
            if self.store.create_exclusive(event_path(seq), blob):
                break
            seq += 1  # another appender took it: fold it in and take the next
            st = self.state()
            seq = max(seq, st.seq + 1)
        self.state()  # fold our own event (and any before it)
        return seq

    def acknowledge(self, request_id: str, ids: list[int], lock) -> int:
        """Durably record a request. Returns its sequence number once the event is on storage."""
        return self._append({"event": "acknowledged", "request_id": request_id,
                             "ids": [int(i) for i in ids]}, lock)

    def complete(self, request_id: str, report: dict, lock) -> int:
        seq = self._append({"event": "completed", "request_id": request_id, "report": report},
                           lock)
        self.checkpoint(lock)
        return seq

    def abandon(self, request_id: str, reason: str, lock) -> int:
        """Record that a pending request will not be applied: its ids stay in the models."""
        seq = self._append({"event": "abandoned", "request_id": request_id, "reason": reason},
                           lock)
        self.checkpoint(lock)
        return seq

    def checkpoint(self, lock) -> None:
        """Write the folded state, so later readers start from here."""
        lock.check()
        self.store.write_bytes(LEDGER_STATE,
                               json.dumps(self.state().to_dict(), sort_keys=True).encode())

    def summary(self) -> dict:
        return self.state().summary()
