"""The append-only deletion ledger.

Each event is its own object ``ledger/<seq>.json`` created exclusively and durably, so appending
works the same on a local disk and on an object store (which cannot append to a file). A request
is *acknowledged* once its ``acknowledged`` event is on durable storage, and *completed* once the
manifest that excludes its ids is live and a ``completed`` event follows. Request ids make
requests idempotent: the same id twice is one deletion.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass, field

from .store import Store, StoreError

LEDGER_DIR = "ledger"


@dataclass
class Request:
    request_id: str
    ids: list[int]
    acknowledged_at: str
    completed_at: str | None = None
    report: dict = field(default_factory=dict)

    @property
    def status(self) -> str:
        return "completed" if self.completed_at else "pending"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


class Ledger:
    """Deletion requests of one store, read from and appended to ``ledger/``."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def _events(self) -> list[dict]:
        events = []
        for rel in self.store.list(LEDGER_DIR):
            if not rel.endswith(".json"):
                continue  # a leftover temporary from an interrupted write
            events.append(self.store.read_json(rel))
        return sorted(events, key=lambda e: e["seq"])

    def requests(self) -> dict[str, Request]:
        """All requests by id, in the order they were acknowledged."""
        out: dict[str, Request] = {}
        for ev in self._events():
            rid = ev["request_id"]
            if ev["event"] == "acknowledged":
                out.setdefault(rid, Request(rid, [int(i) for i in ev["ids"]], ev["time"]))
            elif ev["event"] == "completed":
                if rid not in out:
                    raise StoreError(
                        f"{self.store.location}: ledger has a completion for request {rid!r} "
                        "without its acknowledgement. The ledger was edited by hand; restore it."
                    )
                out[rid].completed_at = ev["time"]
                out[rid].report = ev.get("report", {})
        return out

    def pending(self) -> list[Request]:
        return [r for r in self.requests().values() if r.status == "pending"]

    def _append(self, event: dict) -> None:
        existing = [r for r in self.store.list(LEDGER_DIR) if r.endswith(".json")]
        seq = 1 + max((int(r.rsplit("/", 1)[-1][:-5]) for r in existing), default=0)
        while True:
            event = {**event, "seq": seq, "time": _now()}
            blob = json.dumps(event, sort_keys=True).encode()
            if self.store.create_exclusive(f"{LEDGER_DIR}/{seq:010d}.json", blob):
                return
            seq += 1  # another writer took this sequence number; take the next

    def acknowledge(self, request_id: str, ids: list[int]) -> None:
        """Durably record a request. Returns only once the event is on storage."""
        self._append({"event": "acknowledged", "request_id": request_id, "ids": ids})

    def complete(self, request_id: str, report: dict) -> None:
        self._append({"event": "completed", "request_id": request_id, "report": report})

    def summary(self) -> dict:
        reqs = self.requests().values()
        return {
            "requests": len(reqs),
            "completed": sum(r.status == "completed" for r in reqs),
            "pending": sum(r.status == "pending" for r in reqs),
            "deleted_ids": len({i for r in reqs if r.status == "completed" for i in r.ids}),
        }
