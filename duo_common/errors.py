"""Domain errors, each naming the gRPC status it maps to at the service boundary, and the one error of
start-up.

Code beneath the servicers raises these; `duo.common.rpc` turns them into gRPC statuses, so nothing
below the boundary imports grpc. `StartupError` never reaches a caller: the service's CLI prints it.
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


class Unavailable(DuoError):
    status = "UNAVAILABLE"


class Cancelled(DuoError):
    """The caller went away before its work ran."""

    status = "CANCELLED"


class UpstreamError(DuoError):
    """A call this service made to another one failed (the draft service's to its verifier): that status,
    passed on to this service's caller with a message that says where it came from."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status


class StartupError(RuntimeError):
    """A service cannot start (a model that cannot be loaded, a port already taken). The message is one line
    naming the problem and its fix: the service CLI prints it alone, without a traceback."""
