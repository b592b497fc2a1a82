"""Server resource limits: their defaults, and the gate of concurrent, idle upload streams.

:class:`StreamGate` admits a client-streaming upload only while fewer than
``max_concurrent_streams`` are in flight (over it: ``BusyError``, UNAVAILABLE — "try again
shortly", which clients retry with backoff — at once, never queued), and cuts off a stream
whose client sends nothing for ``stream_idle_timeout_s`` while the server waits for its next
chunk.

The cut-off needs no thread per stream: one watchdog thread (running only while streams are
in flight) notes when each stream's handler started waiting for a chunk and, past the timeout,
cancels that RPC through its ``ServicerContext.cancel()``. That unblocks the handler's read;
the handler raises ``StreamAbortedError`` naming the timeout (its staged chunks are discarded
by the caller) and the client sees ``CANCELLED``. Time the server itself spends on a chunk
(decoding, writing) never counts as idle.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, TypeVar

from common.errors import BusyError, ConfigError, StreamAbortedError

logger = logging.getLogger(__name__)

DEFAULT_MAX_NODES = 10_000
"""Registered nodes the server holds at most, by default."""
DEFAULT_MAX_NODE_BYTES = 1 << 30
"""Committed latent payload (bytes) one node may hold at most, by default."""
DEFAULT_DEDUPE_DRAIN_TIMEOUT_S = 10.0
"""Seconds a re-sent, already committed upload is drained at most before it is acknowledged."""
DEFAULT_RETRAIN_MIN_INTERVAL_S = 2.0
"""Seconds between the end of one classifier training and the start of the next, by default."""
DEFAULT_MAX_CONCURRENT_RPCS = 128
"""RPCs of any kind in flight at once, by default (gRPC refuses more: RESOURCE_EXHAUSTED)."""
DEFAULT_MAX_CONCURRENT_STREAMS = 64
"""Upload streams (PushLatents, PushDelta) in flight at once, by default."""
DEFAULT_STREAM_IDLE_TIMEOUT_S = 60.0
"""Seconds an upload stream may go without a chunk, by default."""

T = TypeVar("T")


class Cancellable(Protocol):
    """What the gate needs of an RPC: a way to end it (``grpc.ServicerContext`` has it)."""

    def cancel(self) -> None:
        """End the RPC; a blocked read of its requests returns."""


@dataclass(frozen=True)
class StreamLimits:
    """Limits of the client-streaming upload RPCs."""

    max_concurrent_streams: int = DEFAULT_MAX_CONCURRENT_STREAMS
    """Uploads in flight at once; one more is refused with RESOURCE_EXHAUSTED."""
    stream_idle_timeout_s: float = DEFAULT_STREAM_IDLE_TIMEOUT_S
    """An upload whose client sends no chunk for this long is cut off (CANCELLED)."""

    def __post_init__(self) -> None:
        if self.max_concurrent_streams < 1:
            raise ConfigError(
                f"server.max_concurrent_streams must be >= 1, got {self.max_concurrent_streams}"
            )
        if not self.stream_idle_timeout_s > 0:
            raise ConfigError(
                f"server.stream_idle_timeout_s must be > 0, got {self.stream_idle_timeout_s}"
            )


class _Stream:
    """One admitted stream: its RPC and when its handler began waiting for a chunk."""

    def __init__(self, gate: StreamGate, rpc: Cancellable, method: str) -> None:
        self._gate = gate
        self.rpc = rpc
        self.method = method
        self.waiting_since: float | None = None
        """Monotonic time the handler asked for the next chunk; None while it works on one."""
        self.cut = False
        """The watchdog cancelled this stream for idling."""

    def watch(self, requests: Iterator[T]) -> Iterator[T]:
        """``requests``, cut off (``StreamAbortedError``) when the client idles too long."""
        while True:
            self._gate.waiting(self, True)
            try:
                item = next(requests)
            except StopIteration:
                self._gate.waiting(self, False)
                return
            except BaseException:
                self._gate.waiting(self, False)
                raise
            self._gate.waiting(self, False)
            yield item


class StreamGate:
    """Admission and idle timeout of upload streams (thread-safe)."""

    def __init__(self, limits: StreamLimits) -> None:
        self._limits = limits
        self._cond = threading.Condition()
        self._streams: set[_Stream] = set()
        self._watchdog: threading.Thread | None = None

    @property
    def limits(self) -> StreamLimits:
        """The limits this gate enforces."""
        return self._limits

    @property
    def in_flight(self) -> int:
        """Streams admitted and not yet finished."""
        with self._cond:
            return len(self._streams)

    @contextlib.contextmanager
    def admit(self, rpc: Cancellable, method: str) -> Iterator[_Stream]:
        """Hold a stream slot for the body; read the requests through ``.watch(requests)``.

        Raises:
            BusyError: ``max_concurrent_streams`` streams are already in flight (UNAVAILABLE:
                transient, the client retries with backoff).
        """
        stream = _Stream(self, rpc, method)
        limit = self._limits.max_concurrent_streams
        with self._cond:
            if len(self._streams) >= limit:
                raise BusyError(
                    f"{len(self._streams)} upload streams are in flight, the most this server "
                    f"takes (server.max_concurrent_streams = {limit}); retry later"
                )
            self._streams.add(stream)
            if self._watchdog is None:
                self._watchdog = threading.Thread(
                    target=self._watch, name="stream-watchdog", daemon=True
                )
                self._watchdog.start()
        try:
            yield stream
        finally:
            with self._cond:
                self._streams.discard(stream)
                self._cond.notify_all()

    def waiting(self, stream: _Stream, waiting: bool) -> None:
        """Mark ``stream`` as waiting for (or done waiting for) its client's next chunk.

        Raises:
            StreamAbortedError: the watchdog cut the stream off for idling.
        """
        with self._cond:
            if stream.cut:
                stream.waiting_since = None
                raise StreamAbortedError(
                    f"{stream.method}: the client sent nothing for "
                    f"{self._limits.stream_idle_timeout_s:g} s "
                    f"(server.stream_idle_timeout_s = {self._limits.stream_idle_timeout_s:g}); "
                    "stream cut off, nothing of it stored"
                )
            stream.waiting_since = time.monotonic() if waiting else None

    def _watch(self) -> None:
        """Cancel streams idle past the timeout; exit when none is in flight."""
        idle = self._limits.stream_idle_timeout_s
        while True:
            overdue: list[_Stream] = []
            with self._cond:
                if not self._streams:
                    self._watchdog = None
                    return
                now = time.monotonic()
                wake = now + idle
                for stream in self._streams:
                    since = stream.waiting_since
                    if since is None or stream.cut:
                        continue
                    if now - since >= idle:
                        stream.cut = True
                        overdue.append(stream)
                    else:
                        wake = min(wake, since + idle)
                if not overdue:
                    self._cond.wait(max(wake - now, 0.01))
            for stream in overdue:
                # the handler logs the refusal (one line) when its read returns
                logger.debug(
                    "[Uplink.%s] idle for %g s: cancelling the stream", stream.method, idle
                )
                stream.rpc.cancel()
