"""Both services in this process on loopback ephemeral ports (``duo.draft_service.inprocess``), with the tests'
defaults: float32 models on the CPU runtime below."""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator

from duo.common.packed_linear import kernel_unavailable_reason
from duo.common.sessions import SessionRegistry
from duo.draft_service import inprocess as draft_inprocess
from duo.verify_service import inprocess as verify_inprocess

# The CPU runtime the in-process services use unless a test says otherwise: duo's packed kernels where they
# can run (what `--cpu-kernels auto` picks for the services' one thread), else torch's.
DEFAULT_KERNELS = "packed" if kernel_unavailable_reason() is None else "torch"

verify_server = functools.partial(verify_inprocess.verify_server, dtype="float32", cpu_kernels=DEFAULT_KERNELS)
draft_services = functools.partial(draft_inprocess.draft_services, dtype="float32", cpu_kernels=DEFAULT_KERNELS)
running_pair = functools.partial(draft_inprocess.running_pair, dtype="float32", cpu_kernels=DEFAULT_KERNELS)


@contextlib.contextmanager
def draft_server(draft_dir, verify_addr: str, *args, **kwargs) -> Iterator[tuple[str, SessionRegistry]]:
    """The draft service's gRPC server (``draft_services``' options): its address and session registry."""
    with draft_services(draft_dir, verify_addr, *args, **kwargs) as services:
        yield services.address, services.sessions
