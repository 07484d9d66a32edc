"""Domain errors, each naming the gRPC status it maps to at the service boundary.

Code beneath the servicers raises these; `duo_common.rpc` turns them into gRPC statuses, so nothing
below the boundary imports grpc.
"""


class DuoError(Exception):
    """Base class; ``status`` is the name of a ``grpc.StatusCode``."""

    status = "INTERNAL"


class InvalidArgument(DuoError):
    status = "INVALID_ARGUMENT"


class FailedPrecondition(DuoError):
    status = "FAILED_PRECONDITION"


class ResourceExhausted(DuoError):
    status = "RESOURCE_EXHAUSTED"


class NotFound(DuoError):
    status = "NOT_FOUND"


class Unavailable(DuoError):
    status = "UNAVAILABLE"


class Cancelled(DuoError):
    """The caller went away before its work ran."""

    status = "CANCELLED"
