"""Server interceptors: bearer-token authentication and error counting, each in one place."""

from __future__ import annotations

import hmac
from typing import Callable

import grpc

# Probes (the kubelet sends no headers) and reflection stay open.
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Refuse calls without ``authorization: Bearer <token>`` with UNAUTHENTICATED."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method.startswith(OPEN_SERVICES):
            return continuation(handler_call_details)
        presented = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(presented.encode(), self._expected):
            return continuation(handler_call_details)
        return _refusal(continuation(handler_call_details), grpc.StatusCode.UNAUTHENTICATED,
                        "missing or wrong bearer token")


class ErrorCountingInterceptor(grpc.ServerInterceptor):
    """Count every call that ends with a non-OK status: ``count(method, code_name)``."""

    def __init__(self, count: Callable[[str, str], None]):
        self._count = count

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if handler.unary_unary:
            return handler._replace(unary_unary=self._wrap_unary(handler.unary_unary, method))
        if handler.unary_stream:
            return handler._replace(unary_stream=self._wrap_stream(handler.unary_stream, method))
        if handler.stream_stream:
            return handler._replace(stream_stream=self._wrap_stream(handler.stream_stream, method))
        if handler.stream_unary:
            return handler._replace(stream_unary=self._wrap_unary(handler.stream_unary, method))
        return handler

    def _wrap_unary(self, behaviour, method):
        def wrapped(request, context):
            try:
                return behaviour(request, context)
            except Exception:  # GeneratorExit (a cancelled call) is not an error
                self._record(method, context)
                raise

        return wrapped

    def _wrap_stream(self, behaviour, method):
        def wrapped(request, context):
            try:
                yield from behaviour(request, context)
            except Exception:  # GeneratorExit (a cancelled call) is not an error
                self._record(method, context)
                raise

        return wrapped

    def _record(self, method: str, context) -> None:
        code = context.code() if callable(getattr(context, "code", None)) else None
        self._count(method, code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN")


def _refusal(handler, code: grpc.StatusCode, details: str):
    """A handler of the same shape as ``handler`` that aborts with ``code``."""

    def abort(request, context):
        context.abort(code, details)

    if handler is None or handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(abort)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(abort)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(abort)
    return grpc.stream_stream_rpc_method_handler(abort)
