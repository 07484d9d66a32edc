"""Embedded mode: the verify service and the draft service as child processes on loopback ephemeral
ports, the same gRPC path as a deployment. Started, waited for (health SERVING), and always stopped: on
SIGTERM and SIGHUP as on Ctrl-C, and a client killed outright is outlived by its children for a few seconds
at most (they watch their parent: ``--parent-pid``)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from duo.client.child_service import (ChildService, ServiceStartError, describe_starting, failure_line, stop_all,
                                      wait_all_serving)
from duo.client.progress import StartProgress

log = logging.getLogger(__name__)

# Where the two services share cores, the drafter runs at a lower priority: drafting ahead then takes only the
# time the verifier leaves idle (DuoDecoding's point: drafting on hardware verification does not use), and
# never slows a verification pass. Its drafting on the critical path runs while the verifier waits anyway.
# And the draft reads the prompt after the target's first token, so the target's prefill has every core; the
# draft's own prefill is small, and on shared cores it would take its cycles from the target's anyway.
# The priority drops once both serve: starting, the drafter's imports and load are on the way to the first
# token like the verifier's, and at a low priority any other work on the machine would hold them back.
DRAFT_NICENESS = 10
SHARED_CORES_DRAFT_OPTIONS = ("--draft-prefill", "after-first-token")


def usable_cores() -> int:
    """CPUs this process may run on (its affinity, as a container's CPU set limits it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True)
class EmbeddedConfig:
    target_model: str
    draft_model: str
    # Both services share this machine: the verifier's products use every core (the drafter's thread
    # shares one; its work is light and a pass deals its columns to whichever thread is free).
    verify_threads: int = field(default_factory=usable_cores)
    draft_threads: int = 1
    verify_device: str = "auto"
    verify_dtype: str = "auto"
    draft_dtype: str = "auto"
    cpu_kernels: str = "auto"  # both services' --cpu-kernels
    start_timeout_s: float = 600.0
    verify_options: tuple[str, ...] = ()  # more ``duo-verify serve`` options (benchmarks: batching off)
    draft_options: tuple[str, ...] = ()  # more ``duo-draft serve`` options


@dataclass(frozen=True)
class ServiceAddresses:
    draft: str
    verify: str
    pids: tuple[int, ...] = ()  # of the child services


@contextlib.contextmanager
def embedded_services(config: EmbeddedConfig, progress: StartProgress | None = None) -> Iterator[ServiceAddresses]:
    """Both services started, serving, and stopped on the way out; ``progress`` hears about the wait."""
    with _stopped_by_signals(), tempfile.TemporaryDirectory(prefix="duo-embedded-") as workdir, \
            contextlib.ExitStack() as stack:
        work = Path(workdir)
        deadline = time.monotonic() + config.start_timeout_s
        started: list[ChildService] = []
        stack.callback(stop_all, started)
        verify = ChildService.start("verify", [
            "duo.verify_service.cli", "serve", "--model", config.target_model, "--threads", str(config.verify_threads),
            "--device", config.verify_device, "--dtype", config.verify_dtype, "--cpu-kernels", config.cpu_kernels,
            *config.verify_options,
        ], work)
        started.append(verify)
        # The draft service starts at once, beside the verifier (their imports and model loads overlap), and
        # reads the verifier's port from the file the verifier writes once it listens.
        shares_cores = config.verify_threads + config.draft_threads > usable_cores()
        draft = ChildService.start("draft", [
            "duo.draft_service.cli", "serve", "--model", config.draft_model, "--threads", str(config.draft_threads),
            "--dtype", config.draft_dtype, "--cpu-kernels", config.cpu_kernels,
            "--verify-port-file", str(verify.port_file),
            *(SHARED_CORES_DRAFT_OPTIONS if shares_cores else ()), *config.draft_options,
        ], work)
        started.append(draft)
        children = (verify, draft)
        on_wait = None if progress is None else (lambda: progress.update(lambda: describe_starting(children)))
        try:
            wait_all_serving(children, deadline, on_wait)
        finally:
            if progress is not None:
                progress.finish()
        if shares_cores:
            draft.lower_priority(DRAFT_NICENESS)
        addresses = ServiceAddresses(draft=draft.address(), verify=verify.address(),
                                     pids=(verify.process.pid, draft.process.pid))
        restarter = _Restarter(started, work, niceness={"draft": DRAFT_NICENESS if shares_cores else 0})
        stack.callback(restarter.stop)
        restarter.start()
        yield addresses


class _Restarter(threading.Thread):
    """The children are the client's own, so one that dies while the client runs (a crash, the OOM killer,
    a stray kill) is started again, on the port it had: the draft service finds its verifier there again and
    the orchestrator its draft service, and both resume the generation where it was (``ResumePolicy``). At
    most MAX_RESTARTS restarts of each: a service that keeps dying is left dead, and the generation fails
    with the loss it reports."""

    MAX_RESTARTS = 3
    CHECK_EVERY_S = 0.2

    def __init__(self, children: list[ChildService], work: Path, niceness: dict[str, int]):
        super().__init__(name="duo-embedded-restarter", daemon=True)
        self._children = children  # shared with the stopping on the way out: restarted ones replace the dead
        self._work = work
        self._niceness = niceness
        self._restarts = {child.name: 0 for child in children}
        self._ports = {child.name: child.port() for child in children}
        self._stopping = threading.Event()
        self._lock = threading.Lock()

    def run(self) -> None:
        while not self._stopping.wait(self.CHECK_EVERY_S):
            for index, child in enumerate(list(self._children)):
                if child.process.poll() is not None and self._restarts[child.name] < self.MAX_RESTARTS:
                    self._restart(index, child)

    def _restart(self, index: int, dead: ChildService) -> None:
        with self._lock:
            if self._stopping.is_set():
                return
            self._restarts[dead.name] += 1
            log.warning("the %s service exited (%s); restarting it on port %s (restart %d of %d)", dead.name,
                        failure_line(dead.log_file), self._ports[dead.name], self._restarts[dead.name],
                        self.MAX_RESTARTS)
            child = ChildService.start(dead.name, dead.module_args, self._work, port=self._ports[dead.name])
            self._children[index] = child
        if self._niceness.get(child.name):
            with contextlib.suppress(ServiceStartError):
                child.wait_port(time.monotonic() + 600)
                child.lower_priority(self._niceness[child.name])

    def stop(self) -> None:
        """No restarts from now on (the client is stopping its children)."""
        with self._lock:
            self._stopping.set()


@contextlib.contextmanager
def _stopped_by_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP end the client as Ctrl-C does, by an exception, so the children are stopped on the
    way out (their default action would end the client alone). Signal handlers belong to the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def exit_on_signal(signum, _frame) -> None:
        raise SystemExit(128 + signum)

    previous = {signum: signal.signal(signum, exit_on_signal) for signum in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
