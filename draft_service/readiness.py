"""The draft service is ready only while it can reach a verifier: a caller it could only refuse is better
sent to another replica, so its health says NOT_SERVING while the channel to the verifier fails, and SERVING
again once it connects."""

from __future__ import annotations

import logging
import threading
from typing import Callable

import grpc

log = logging.getLogger(__name__)


def follow_verifier(channel: grpc.Channel, set_serving: Callable[[bool], None]) -> Callable[[], None]:
    """Mirror the verifier channel's state into ``set_serving``; returns a function that stops it. A channel
    whose connection ended goes IDLE and would wait for the next call to reconnect: it is asked to reconnect
    at once, so a verifier that went away shows as a failed connection (TRANSIENT_FAILURE) before any caller
    is refused."""
    reconnecting: list[grpc.Future] = []  # the pending reconnection, if any

    def on_state(state: grpc.ChannelConnectivity) -> None:
        if state is grpc.ChannelConnectivity.READY:
            set_serving(True)
        elif state is grpc.ChannelConnectivity.TRANSIENT_FAILURE:
            log.warning("the verify service cannot be reached: health NOT_SERVING until it can")
            set_serving(False)
        elif state is grpc.ChannelConnectivity.IDLE and not (reconnecting and not reconnecting[-1].done()):
            reconnecting[:] = [grpc.channel_ready_future(channel)]  # it retries with backoff while it fails

    def stop() -> None:
        channel.unsubscribe(on_state)
        for future in reconnecting:
            future.cancel()

    channel.subscribe(on_state, try_to_connect=True)
    return stop


class ServingState:
    """Whether the service can take work now, told to each of ``followers`` (the gRPC health service) and
    readable by those that ask (the HTTP API's /health): not until ``set(True)``."""

    def __init__(self, *followers: Callable[[bool], None]):
        self._followers = followers
        self._serving = threading.Event()
        self._stopping = False

    def stop(self) -> None:
        """The service is stopping: not serving from now on, whatever the verifier does."""
        self._stopping = True
        self.set(False)

    def set(self, serving: bool) -> None:
        if serving and self._stopping:
            return
        if serving:
            self._serving.set()
        else:
            self._serving.clear()
        for follower in self._followers:
            follower(serving)

    def __call__(self) -> bool:
        return self._serving.is_set()
