"""The one error tree of latentedge.

Library code raises these; only ``cli.py`` modules map them to exit codes.

    LatentEdgeError
    ├── ConfigError                 bad config file, flag value or dataclass field
    ├── DataError                   missing/malformed dataset, shard or class filter
    ├── CodecError                  tensor bytes that do not decode to the stated dtype/shape
    ├── StoreError                  durable storage failed or is inconsistent
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


class UplinkError(LatentEdgeError):
    """A gRPC call from an edge node failed and will not be retried."""


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
