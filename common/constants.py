"""Named constants shared by edge and server: ports, limits, timeouts."""

from __future__ import annotations

DEFAULT_LISTEN = "127.0.0.1:50051"
"""Address the server binds when none is given."""

CHUNK_BYTES = 4 * 1024 * 1024
"""Largest payload (bytes) a client puts in one streamed chunk."""

MAX_MESSAGE_BYTES = 8 * 1024 * 1024
"""gRPC message-size limit (bytes) on both sides: one chunk plus framing headroom."""

MAX_UPLOAD_BYTES = 1024 * 1024 * 1024
"""Largest upload (bytes, all chunks together) the server accepts before RESOURCE_EXHAUSTED."""

RPC_TIMEOUT_S = 30.0
"""Deadline (seconds) of a unary call."""

UPLOAD_TIMEOUT_S = 600.0
"""Deadline (seconds) of a whole streamed upload."""

RETRY_WINDOW_S = 60.0
"""How long (seconds) an edge node keeps retrying an unreachable server."""

RETRY_INITIAL_BACKOFF_S = 0.5
"""First backoff (seconds) between retries; doubles up to RETRY_MAX_BACKOFF_S."""

RETRY_MAX_BACKOFF_S = 8.0
"""Longest backoff (seconds) between retries."""

LOG_LEVEL_ENV = "LATENTEDGE_LOG_LEVEL"
"""Environment variable that sets the default log level."""
