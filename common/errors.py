"""The one error tree of latentedge.

Library code raises these; only ``cli.py`` modules map them to exit codes.

    LatentEdgeError
    ├── ConfigError                 bad config file, flag value or dataclass field
    ├── DataError                   missing/malformed dataset, shard or class filter
    ├── CodecError                  tensor bytes that do not decode to the stated dtype/shape
    ├── StoreError                  durable storage failed or is inconsistent
    ├── RequestError                a request the server refuses (servicer maps to a status)
    │   ├── InvalidRequestError     malformed field             -> INVALID_ARGUMENT
    │   ├── NotFoundError           unknown node or object      -> NOT_FOUND
    │   ├── ConflictError           state forbids it right now  -> FAILED_PRECONDITION
    │   ├── TooLargeError           over a size/quota/capacity  -> RESOURCE_EXHAUSTED
    │   ├── BusyError               try again shortly           -> UNAVAILABLE
    │   ├── AuthenticationError     no or bad credential        -> UNAUTHENTICATED
    │   ├── PermissionDeniedError   credential may not do this  -> PERMISSION_DENIED
    │   └── StreamAbortedError      the client went away        -> CANCELLED
    ├── UplinkError                 a gRPC call from an edge node failed for good
    │   └── ServerUnreachableError  retries with backoff ran out
    ├── ModelExportError            torch → ONNX export or its equivalence check failed
    ├── NoiseInjectionError         bad noise spec, graph or data for the analog simulator
    └── AllocationError             malformed allocation input
        └── InfeasibleAllocationError   no plan satisfies the constraints
"""

from __future__ import annotations


class LatentEdgeError(Exception):
    """Root of every error latentedge raises on purpose."""


class ConfigError(LatentEdgeError):
    """A configuration value (file key, flag or dataclass field) is invalid."""


class DataError(LatentEdgeError):
    """A dataset cannot be found, read or partitioned as asked."""


class CodecError(LatentEdgeError):
    """Bytes on the wire do not decode to the tensor they claim to be."""


class StoreError(LatentEdgeError):
    """The durable store failed or holds inconsistent state."""


class RequestError(LatentEdgeError):
    """A request the server refuses; the subclass decides the gRPC status code."""


class InvalidRequestError(RequestError):
    """A request field is malformed (INVALID_ARGUMENT)."""


class NotFoundError(RequestError):
    """The request names a node or object the server does not have (NOT_FOUND)."""


class ConflictError(RequestError):
    """The server's state forbids the request right now (FAILED_PRECONDITION)."""


class TooLargeError(RequestError):
    """The request exceeds a size limit, a quota or the server's capacity (RESOURCE_EXHAUSTED)."""


class BusyError(RequestError):
    """The server cannot take the request right now; the client retries (UNAVAILABLE)."""


class AuthenticationError(RequestError):
    """The request carries no valid credential (UNAUTHENTICATED)."""


class PermissionDeniedError(RequestError):
    """The credential is valid but may not do this (PERMISSION_DENIED)."""


class StreamAbortedError(RequestError):
    """The client cancelled or dropped a stream before it ended (CANCELLED)."""


class UplinkError(LatentEdgeError):
    """A gRPC call from an edge node failed and will not be retried."""

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code
        """The gRPC status code name (e.g. ``NOT_FOUND``) when the server refused the call."""


class ServerUnreachableError(UplinkError):
    """The server stayed unreachable for the whole retry window."""


class ModelExportError(LatentEdgeError):
    """Exporting a torch model to ONNX failed, or the export disagrees with torch."""


class NoiseInjectionError(LatentEdgeError):
    """The analog simulator got a bad noise spec, graph or dataset."""


class AllocationError(LatentEdgeError):
    """Allocation input (scenario, devices file, cell parameters) is malformed."""


class InfeasibleAllocationError(AllocationError):
    """No allocation satisfies the constraints; the message names the binding one."""
