"""The health service follows the store: NOT_SERVING while the database cannot serve.

A removed, replaced or unreadable database file makes every RPC fail; a load balancer or
orchestrator must see that through the standard ``grpc.health.v1`` service instead of a
``SERVING`` answer. :class:`StoreHealth` checks the store every ``interval_s`` on one thread and
flips the overall and the ``latentedge.v1.Uplink`` status, back to ``SERVING`` on recovery.
"""

from __future__ import annotations

import logging
import threading

from grpc_health.v1 import health, health_pb2

from common.errors import StoreError
from server.grpc_app import HEALTH_SERVICES
from server.store import Store

logger = logging.getLogger(__name__)


class StoreHealth:
    """A daemon thread mirroring :meth:`Store.check` into a health servicer."""

    def __init__(
        self, store: Store, servicer: health.HealthServicer, *, interval_s: float = 1.0
    ) -> None:
        self._store = store
        self._servicer = servicer
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="store-health", daemon=True)
        self.serving = True

    def start(self) -> None:
        """Begin checking."""
        self._thread.start()

    def stop(self) -> None:
        """Stop checking (the thread exits within one interval)."""
        self._stop.set()
        self._thread.join(timeout=self._interval_s + 5.0)

    def check_once(self) -> bool:
        """One check; update the health status on a change. True when the store serves."""
        try:
            self._store.check()
            ok, reason = True, ""
        except StoreError as exc:
            ok, reason = False, str(exc)
        if ok != self.serving:
            status = (
                health_pb2.HealthCheckResponse.SERVING
                if ok
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            for name in HEALTH_SERVICES:
                self._servicer.set(name, status)
            if ok:
                logger.info("store is back: SERVING")
            else:
                logger.error("store cannot serve (%s): NOT_SERVING", reason)
            self.serving = ok
        return ok

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.check_once()
