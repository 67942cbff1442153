"""The HTTP edge of the deletion service: ``sisa-ray serve`` on Ray Serve.

One Serve replica owns a :class:`~sisa_ray.service.DeletionService` (and so the store's writer
lock) for its life. JSON in, JSON out:

* ``POST /predict``  ``{"features": [[...], ...], "vote": "hard"}`` -> 200
  ``{"predictions", "proba", "generation"}``, from the live models, also while a shard retrains;
* ``POST /delete``  ``{"ids": [3, 17], "request_id": "optional"}`` -> 202
  ``{"request_id", "status": "pending", "ids"}`` once the request is durably in the ledger; it
  is applied in the background, and requests that arrive during a retrain are batched into the
  next one;
* ``GET /requests/<request_id>`` -> 200 its status (``completed`` with the report), 404 unknown;
* ``GET /status`` -> 200 the store's status.

Bad input gets a 4xx and ``{"error": "<one line: the problem and the fix>"}``, never a traceback.
The routing (:meth:`DeletionEndpoint.handle`) is plain Python; the class becomes a Serve
deployment only in :func:`start`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from urllib.parse import quote

import numpy as np

from .core.config import ResourceConfig
from .core.runtime import RuntimeMismatch
from .core.store import StoreError

log = logging.getLogger(__name__)

APP_NAME = "sisa-ray"
ROUTES = "POST /predict, POST /delete, GET /requests/<request_id>, GET /status"
# Serve's controller gives a replica this long to run __del__ (the service stops after its
# current retrain; an unfinished one stays pending in the ledger and is finished on the next start).
# Kept below serve.shutdown()'s own 30 s wait.
SHUTDOWN_GRACE_S = 25.0
VOTES = {"classification": ("hard", "soft"), "regression": ("mean", "median")}


class HTTPError(Exception):
    """An answer other than 200: its status and the one-line message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class DeletionEndpoint:
    """Routes HTTP requests to a :class:`~sisa_ray.service.DeletionService` of one store.

    Parameters
    ----------
    store : the store's path or URI.
    backend : ``"ray"`` (retrains on the shard worker pool) or ``"local"`` (in this process).
    address, resources, vote : as for :meth:`SISAEnsemble.open`.
    """

    def __init__(self, store: str, backend: str = "ray", address: str | None = None,
                 resources: ResourceConfig | None = None, vote: str = "hard") -> None:
        from .ensemble import SISAEnsemble
        from .service import DeletionService

        # recover=False: the service finishes acknowledged requests in the background, so the
        # endpoint answers at once; ids a restored backup brought back are deleted again first
        # (predictions refuse to use them).
        ens = SISAEnsemble.open(store, backend=backend, address=address, resources=resources,
                                vote=vote, recover=False)
        if ens.resurrected_:
            ens.recover()
        self.service = DeletionService(ens)

    # -- routing (plain Python) --------------------------------------------------------------------

    def handle(self, method: str, path: str, body: bytes = b"") -> tuple[int, dict]:
        """Answer one request: ``(HTTP status, JSON payload)``."""
        try:
            return self._route(method, path.rstrip("/") or "/", body)
        except HTTPError as e:
            return e.status, _error(e)
        except KeyError as e:  # an unknown request id
            return 404, _error(e.args[0] if e.args else e)
        except (ValueError, TypeError) as e:
            return 400, _error(e)
        except (StoreError, RuntimeMismatch) as e:  # the store, not the request, is at fault
            return 503, _error(e)
        except Exception as e:  # the client gets one line; the traceback goes to the log
            log.exception("%s %s failed", method, path)
            return 500, _error(f"{type(e).__name__}: {e}")

    def _route(self, method: str, path: str, body: bytes) -> tuple[int, dict]:
        if path == "/predict":
            _expect(method, "POST", path)
            req = _json_object(body, {"features", "vote"}, '{"features": [[0.0, 1.5, ...]]}')
            if "features" not in req:
                raise ValueError('The body needs "features": a list of samples, each a list of '
                                 'numbers, e.g. {"features": [[0.0, 1.5, ...]]}.')
            vote = req.get("vote")
            allowed = VOTES[self.service.ens.task_]
            if vote is not None and vote not in allowed:
                raise ValueError(f'"vote" must be one of {list(allowed)} for this ensemble. '
                                 f"Got {vote!r}.")
            return 200, self.service.predict(req["features"], vote)
        if path == "/delete":
            _expect(method, "POST", path)
            req = _json_object(body, {"ids", "request_id"}, '{"ids": [3, 17, 42]}')
            if "ids" not in req:
                raise ValueError('The body needs "ids": a list of integer sample ids, e.g. '
                                 '{"ids": [3, 17, 42]}.')
            ack = self.service.submit(req["ids"], req.get("request_id"))
            return (202 if ack["status"] == "pending" else 200), ack
        if path == "/status":
            _expect(method, "GET", path)
            self.service.ens.refresh()  # the live generation, not the one last predicted with
            return 200, self.service.status()
        if path.startswith("/requests/"):
            _expect(method, "GET", "/requests/<request_id>")
            return 200, self.service.request(path[len("/requests/"):])
        raise HTTPError(404, f"There is no route {method} {path}. Routes: {ROUTES}.")

    # -- the Serve edge ----------------------------------------------------------------------------

    async def __call__(self, request):
        from starlette.responses import Response

        body = await request.body()
        path = request.scope["path"][len(request.scope.get("root_path", "")):]
        status, payload = await asyncio.to_thread(self.handle, request.method, path, body)
        headers = {}
        if status == 202:
            headers["Location"] = "/requests/" + quote(payload["request_id"], safe="")
        return Response(to_json(payload), status_code=status, headers=headers,
                        media_type="application/json")

    def __del__(self) -> None:
        # Serve calls this on shutdown: stop the background loop, release the writer lock.
        service = self.__dict__.pop("service", None)
        if service is not None:
            service.close()


def _expect(method: str, want: str, route: str) -> None:
    if method != want:
        raise HTTPError(405, f"{route} takes {want}, not {method}. Routes: {ROUTES}.")


def _json_object(body: bytes, keys: set[str], example: str) -> dict:
    """The body as a JSON object with only ``keys`` (a typo fails by name, it is never ignored)."""
    try:
        req = json.loads(body or b"null")
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"The body is not valid JSON ({e}). Send a JSON object, e.g. "
                         f"{example}.") from None
    if not isinstance(req, dict):
        raise ValueError(f"The body must be a JSON object, e.g. {example}. Got "
                         f"{type(req).__name__}.")
    unknown = sorted(set(req) - keys)
    if unknown:
        raise ValueError(f"Unknown field(s) {unknown} in the body; allowed: {sorted(keys)}.")
    return req


def _error(e) -> dict:
    return {"error": " ".join(str(e).split())}


def _plain(o):
    if isinstance(o, (np.generic, np.ndarray)):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def to_json(payload: dict) -> bytes:
    return json.dumps(payload, default=_plain).encode()


# -- starting and stopping ---------------------------------------------------------------------------


def check_port(host: str, port: int) -> None:
    """Refuse a port something else listens on, before Ray Serve is started."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ValueError(f"--host {host!r} is not an address of this machine ({e}).") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            raise ValueError(f"Cannot listen on {host}:{port} ({e.strerror}). Pick another "
                             "--port, or stop what uses it.") from None


def start(store: str, *, host: str = "127.0.0.1", port: int = 8000, backend: str = "ray",
          address: str | None = None, resources: ResourceConfig | None = None,
          vote: str = "hard", verbose: bool = False) -> str:
    """Start Ray (or join ``address``) and serve ``store`` over HTTP on Ray Serve; return its URL.

    The store (it exists, no other writer holds it) and the port are checked first, before Ray
    starts, so a mistake is one line at once rather than a replica that fails to start.
    """
    from .core.runtime import pinned_env
    from .ensemble import SISAEnsemble
    from .executor import ensure_ray

    ens = SISAEnsemble.open(store, backend=backend, address=address, recover=False)
    with ens.store_.writer_lock(timeout=0):
        pass
    check_port(host, port)
    ensure_ray(address)
    from ray import serve

    if not verbose:  # importing ray.serve set its logger to INFO
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
    deployment = serve.deployment(
        DeletionEndpoint,
        name="DeletionEndpoint",
        num_replicas=1,  # one writer per store
        # a predict never waits for a slot: deletions return on acknowledgement, and the
        # handlers run in threads off the replica's event loop
        max_ongoing_requests=256,
        # no CPU reserved: shard workers bound training; --backend local retrains in the replica
        # with the store's pinned runtime
        ray_actor_options={"num_cpus": 0,
                           "runtime_env": {"env_vars": pinned_env(ens.config_.training)}},
        graceful_shutdown_timeout_s=SHUTDOWN_GRACE_S,
    )
    logging_config = {"log_level": "INFO" if verbose else "WARNING",
                      "enable_access_log": verbose}
    serve.start(http_options={"host": host, "port": port}, logging_config=logging_config)
    # Inside the replica a local instance is just Ray; "local" only told this process to start one.
    inner = None if address == "local" else address
    serve.run(deployment.bind(ens.store_.uri, backend, inner, resources, vote), name=APP_NAME,
              route_prefix="/", blocking=False, logging_config=logging_config)
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


def stop() -> None:
    """Shut the app and Serve down; the replica's ``__del__`` releases the writer lock."""
    import ray
    from ray import serve

    if ray.is_initialized():  # else Serve would start Ray only to find nothing to stop
        serve.shutdown()
