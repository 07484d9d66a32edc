"""A duo service in a child process on loopback (``python -m MODULE serve ...``): started, its port and health
waited for (with the reason in one line, from its log, when it cannot start), and stopped. Embedded mode, the
resident pair, the benchmarks and the tests start their services through it."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from duo.common.errors import StartupError


class ServiceStartError(StartupError):
    """A child service exited or did not become healthy; says why in one line (from its log)."""


def wait_all_serving(children: tuple[ChildService, ...], deadline: float,
                     on_wait: Callable[[], None] | None = None) -> None:
    """Until every child's health says SERVING; a child that exits (or the deadline) ends the wait with its
    reason. ``on_wait`` is called between checks."""
    waiting = list(children)
    while True:
        for child in children:
            child.check_alive(deadline)
        waiting = [child for child in waiting if not child.is_serving()]
        if not waiting:
            return
        if on_wait is not None:
            on_wait()
        time.sleep(0.05)


def describe_starting(children: tuple[ChildService, ...]) -> str:
    """e.g. 'verify service: loading builtin:…; draft service: waiting for the verify service…'."""
    return "; ".join(f"{child.name} service: {child.status()}" for child in children)


class ChildService:
    """A duo service in a child process (``python -m MODULE serve ...``) on loopback, logging to
    ``WORK/NAME.log``; it announces its port in ``WORK/NAME.port``."""

    HOST = "127.0.0.1"

    def __init__(self, name: str, process: subprocess.Popen, port_file: Path, log_file: Path,
                 module_args: list[str]):
        self.name, self.process, self.port_file, self.log_file = name, process, port_file, log_file
        self.module_args = module_args  # what it was started with (to start it again)
        self._health: tuple[grpc.Channel, health_pb2_grpc.HealthStub] | None = None

    @classmethod
    def start(cls, name: str, module_args: list[str], work: Path, port: int = 0, grace_s: float = 2.0) -> ChildService:
        """Start it on ``port`` (0: a free one, see ``wait_port``); it stops once this process has gone, and
        drains for ``grace_s`` seconds on SIGTERM."""
        port_file = work / f"{name}.port"
        log_file = work / f"{name}.log"
        port_file.unlink(missing_ok=True)  # a restarted service writes it afresh
        args = [sys.executable, "-m", *module_args, "--host", cls.HOST, "--port", str(port),
                "--port-file", str(port_file), "--grace-s", str(grace_s), "--parent-pid", str(os.getpid())]
        with open(log_file, "wb") as log:
            process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        return cls(name, process, port_file, log_file, module_args)

    def lower_priority(self, by: int) -> None:
        """Run it ``by`` niceness steps lower from now on: each of its threads (Linux keeps a niceness per
        thread, and a thread started later takes its starter's); a few passes, as a thread may start
        meanwhile. Where there is no /proc, the process's own call sets it."""
        if self.process.poll() is not None:
            return
        niceness = min(19, os.getpriority(os.PRIO_PROCESS, self.process.pid) + by)
        tasks = Path(f"/proc/{self.process.pid}/task")
        for _ in range(5):
            try:
                threads = [int(tid) for tid in os.listdir(tasks)] if tasks.is_dir() else [self.process.pid]
            except FileNotFoundError:  # it has exited
                return
            others = [tid for tid in threads if _niceness(tid) not in (niceness, None)]
            if not others:
                return
            for tid in others:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.setpriority(os.PRIO_PROCESS, tid, niceness)

    def port(self) -> int | None:
        """The port it listens on, once it has said (the file is written whole, then renamed into place)."""
        try:
            return int(self.port_file.read_text())
        except FileNotFoundError:
            return None

    def address(self) -> str | None:
        port = self.port()
        return None if port is None else f"{self.HOST}:{port}"

    def wait_port(self, deadline: float, alongside: tuple[ChildService, ...] = ()) -> int:
        """The port it listens on; meanwhile, a child ``alongside`` that fails fails the wait too."""
        while (port := self.port()) is None:
            for child in (self, *alongside):
                child.check_alive(deadline)
            time.sleep(0.05)
        return port

    def wait_healthy(self, address: str, deadline: float, alongside: tuple[ChildService, ...] = ()) -> None:
        """Until its health at ``address`` says SERVING (a service restarted on a port of its choosing)."""
        with grpc.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                for child in (self, *alongside):
                    child.check_alive(deadline)
                if _says_serving(stub):
                    return
                time.sleep(0.05)

    def is_serving(self) -> bool:
        """Whether its health says SERVING now (False while it has no port yet)."""
        if self._health is None:
            if (address := self.address()) is None:
                return False
            channel = grpc.insecure_channel(address)
            self._health = channel, health_pb2_grpc.HealthStub(channel)
        return _says_serving(self._health[1])

    def status(self) -> str:
        """What it logged last (without time and level), e.g. 'loading builtin:smollm2-135m-instruct'."""
        return last_message(self.log_file)

    def check_alive(self, deadline: float) -> None:
        if self.process.poll() is not None:
            raise ServiceStartError(f"the {self.name} service could not start: {failure_line(self.log_file)}")
        if time.monotonic() > deadline:
            raise ServiceStartError(f"the {self.name} service did not become ready in time: "
                                    f"{failure_line(self.log_file)}")

    def kill(self) -> None:
        """SIGKILL, as a crash would end it."""
        self.process.kill()
        self.process.wait()
        self._close_health()

    def stop(self) -> None:
        stop_all([self])

    def terminate(self) -> None:
        """SIGTERM, unless it has exited: it drains (``--grace-s``) and exits."""
        if self.process.poll() is None:
            self.process.terminate()

    def wait_stopped(self, deadline: float) -> None:
        """Until it has exited; SIGKILL once ``deadline`` has passed."""
        try:
            self.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._close_health()

    def _close_health(self) -> None:
        if self._health is not None:
            self._health[0].close()
            self._health = None


def stop_all(children: list[ChildService], wait_s: float = 10.0) -> None:
    """SIGTERM to every child at once (each drains and exits meanwhile), then SIGKILL to any still there after
    ``wait_s``."""
    for child in children:
        child.terminate()
    deadline = time.monotonic() + wait_s
    for child in children:
        child.wait_stopped(deadline)


def _niceness(tid: int) -> int | None:
    """A thread's niceness; None once it has gone."""
    try:
        return os.getpriority(os.PRIO_PROCESS, tid)
    except ProcessLookupError:
        return None


def serving_at(address: str) -> bool:
    """Whether the service at ``address`` says SERVING now (a new connection each time: for a few checks)."""
    with grpc.insecure_channel(address) as channel:
        return _says_serving(health_pb2_grpc.HealthStub(channel))


def _says_serving(stub: health_pb2_grpc.HealthStub) -> bool:
    try:
        status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status
    except grpc.RpcError:
        return False
    return status == health_pb2.HealthCheckResponse.SERVING


_LOG_PREFIX = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [A-Z]+ [\w.]+: ")  # serve_cli.LOG_FORMAT's
_LOGGED_ERROR = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (ERROR|CRITICAL) [\w.]+: ")


def failure_line(log_file: Path) -> str:
    """What a process said last about its failure: its one-line ``Error:`` (duo's start-up errors), else its
    last logged error (a thread's traceback may follow it while the process exits), else the last line it
    wrote (an unexpected exception's, after its traceback)."""
    lines = _lines(log_file)
    errors = [line.removeprefix("Error: ") for line in lines if line.startswith("Error: ")]
    if errors:
        return errors[-1]
    logged = [_LOG_PREFIX.sub("", line) for line in lines if _LOGGED_ERROR.match(line)]
    return logged[-1] if logged else _LOG_PREFIX.sub("", lines[-1]) if lines else "(it wrote nothing)"


def last_message(log_file: Path) -> str:
    """The last thing a process logged, without its time, level and logger; 'starting' before it logs."""
    lines = _lines(log_file)
    return _LOG_PREFIX.sub("", lines[-1]) if lines else "starting"


def _lines(log_file: Path) -> list[str]:
    """A log's non-blank lines (each drawing of a progress bar is one: splitlines cuts at carriage returns)."""
    try:
        text = log_file.read_text(errors="replace")
    except OSError:
        return []
    return [line.strip() for line in text.splitlines() if line.strip()]
