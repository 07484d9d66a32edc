"""Embedded mode: the verify service and the draft service as child processes on loopback ephemeral
ports, the same gRPC path as a deployment. Started, waited for (health SERVING), and always stopped: on
SIGTERM and SIGHUP as on Ctrl-C, and a client killed outright is outlived by its children for a few seconds
at most (they watch their parent: ``--parent-pid``)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from duo.common.errors import StartupError


class ServiceStartError(StartupError):
    """A child service exited or did not become healthy; says why in one line (from its log)."""


# Where the two services share cores, the drafter runs at a lower priority: drafting ahead then takes only the
# time the verifier leaves idle (DuoDecoding's point: drafting on hardware verification does not use), and
# never slows a verification pass. Its drafting on the critical path runs while the verifier waits anyway.
# And the draft reads the prompt after the target's first token, so the target's prefill has every core; the
# draft's own prefill is small, and on shared cores it would take its cycles from the target's anyway.
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
def embedded_services(config: EmbeddedConfig) -> Iterator[ServiceAddresses]:
    with _stopped_by_signals(), tempfile.TemporaryDirectory(prefix="duo-embedded-") as workdir, \
            contextlib.ExitStack() as stack:
        work = Path(workdir)
        deadline = time.monotonic() + config.start_timeout_s
        verify = stack.enter_context(_running("verify", [
            "duo.verify_service.cli", "serve", "--model", config.target_model, "--threads", str(config.verify_threads),
            "--device", config.verify_device, "--dtype", config.verify_dtype, "--cpu-kernels", config.cpu_kernels,
            *config.verify_options,
        ], work))
        verify_addr = f"127.0.0.1:{verify.wait_port(deadline)}"
        shares_cores = config.verify_threads + config.draft_threads > usable_cores()
        draft = stack.enter_context(_running("draft", [
            "duo.draft_service.cli", "serve", "--model", config.draft_model, "--threads", str(config.draft_threads),
            "--dtype", config.draft_dtype, "--cpu-kernels", config.cpu_kernels, "--verify-addr", verify_addr,
            *(SHARED_CORES_DRAFT_OPTIONS if shares_cores else ()), *config.draft_options,
        ], work, DRAFT_NICENESS if shares_cores else 0))
        draft_addr = f"127.0.0.1:{draft.wait_port(deadline, alongside=(verify,))}"
        verify.wait_healthy(verify_addr, deadline, alongside=(draft,))
        draft.wait_healthy(draft_addr, deadline, alongside=(verify,))
        yield ServiceAddresses(draft=draft_addr, verify=verify_addr, pids=(verify.process.pid, draft.process.pid))


class ChildService:
    """A duo service in a child process (``python -m MODULE serve ...``), logging to ``WORK/NAME.log``."""

    def __init__(self, name: str, process: subprocess.Popen, port_file: Path, log_file: Path):
        self.name, self.process, self.port_file, self.log_file = name, process, port_file, log_file

    @classmethod
    def start(cls, name: str, module_args: list[str], work: Path, port: int = 0, niceness: int = 0) -> ChildService:
        """Start it on loopback ``port`` (0: a free one, see ``wait_port``); it stops once this process has gone."""
        port_file = work / f"{name}.port"
        log_file = work / f"{name}.log"
        port_file.unlink(missing_ok=True)  # a restarted service writes it afresh
        args = [sys.executable, "-m", *module_args, "--host", "127.0.0.1", "--port", str(port),
                "--port-file", str(port_file), "--grace-s", "2", "--parent-pid", str(os.getpid())]
        with open(log_file, "wb") as log:
            process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       preexec_fn=(lambda: os.nice(niceness)) if niceness else None)
        return cls(name, process, port_file, log_file)

    def wait_port(self, deadline: float, alongside: tuple[ChildService, ...] = ()) -> int:
        """The port it listens on; meanwhile, a child ``alongside`` that fails fails the wait too."""
        while not self.port_file.exists():
            for child in (self, *alongside):
                child._check_alive(deadline)
            time.sleep(0.05)
        return int(self.port_file.read_text())

    def wait_healthy(self, address: str, deadline: float, alongside: tuple[ChildService, ...] = ()) -> None:
        with grpc.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                for child in (self, *alongside):
                    child._check_alive(deadline)
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.1)

    def _check_alive(self, deadline: float) -> None:
        if self.process.poll() is not None:
            raise ServiceStartError(f"the {self.name} service could not start: {failure_line(self.log_file)}")
        if time.monotonic() > deadline:
            raise ServiceStartError(f"the {self.name} service did not become ready in time: "
                                    f"{failure_line(self.log_file)}")

    def kill(self) -> None:
        """SIGKILL, as a crash would end it."""
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def failure_line(log_file: Path) -> str:
    """What a process said last about its failure: its one-line ``Error:`` (duo's start-up errors), else the
    last line it wrote (an unexpected exception's, after its traceback)."""
    try:
        lines = [line.strip() for line in log_file.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        lines = []
    errors = [line.removeprefix("Error: ") for line in lines if line.startswith("Error: ")]
    return errors[-1] if errors else lines[-1] if lines else "(it wrote nothing)"


@contextlib.contextmanager
def _running(name: str, module_args: list[str], work: Path, niceness: int = 0) -> Iterator[ChildService]:
    child = ChildService.start(name, module_args, work, niceness=niceness)
    try:
        yield child
    finally:
        child.stop()


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
