"""A resident local pair: the embedded services started once and kept in the background (``duo-client up``),
so that ``duo-client generate`` neither starts them nor loads the models; ``duo-client down`` stops them.

A keeper process (``python -m duo.client.resident``, in a session of its own: a terminal's Ctrl-C or hang-up is
not for it) holds the pair through ``embedded_services``, so the services are its children and stop with it,
even when it is killed outright. It records the pair in ``<cache dir>/resident.json`` while it lives; a
record whose keeper is gone is stale, and is removed when read.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

from duo.client.child_service import ServiceStartError, failure_line, last_message
from duo.client.embedded import EmbeddedConfig, embedded_services
from duo.client.progress import StartProgress
from duo.common.default_models import cache_root
from duo.common.errors import StartupError

KEEPER_MODULE = "duo.client.resident"


@dataclass(frozen=True)
class ResidentPair:
    keeper_pid: int
    draft: str  # HOST:PORT of the draft service
    verify: str
    service_pids: tuple[int, ...]
    target_model: str
    draft_model: str
    started_at: float  # seconds since the epoch

    def serves(self, target_model: str, draft_model: str) -> bool:
        return (_model_key(self.target_model), _model_key(self.draft_model)) == (_model_key(target_model),
                                                                                 _model_key(draft_model))


def record_path() -> Path:
    return cache_root() / "resident.json"


def current() -> ResidentPair | None:
    """The resident pair that is up, or None (a stale record is removed)."""
    path = record_path()
    try:
        fields = json.loads(path.read_text())
        pair = ResidentPair(**{**fields, "service_pids": tuple(fields["service_pids"])})
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError):
        pair = None  # unreadable: from another version of duo, or cut short
    if pair is None or not _keeper_alive(pair.keeper_pid):
        path.unlink(missing_ok=True)
        return None
    return pair


@contextlib.contextmanager
def starting(on_busy: Callable[[], None] = lambda: None) -> Iterator[None]:
    """Held by one ``duo-client up`` while it looks for a pair and starts one, so that two at once start one
    pair: the second waits here (after ``on_busy``), then finds the first one's. The lock (``resident.lock``)
    goes with its holder's process, however that ends."""
    path = record_path().with_suffix(".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            on_busy()
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def start(config: EmbeddedConfig, progress: StartProgress | None = None) -> ResidentPair:
    """Start a keeper and wait until its pair serves (telling ``progress`` what the keeper says meanwhile); its
    log is ``resident.log`` beside the record."""
    path = record_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    log_file = path.with_suffix(".log")
    with open(log_file, "wb") as log:
        keeper = subprocess.Popen([sys.executable, "-m", KEEPER_MODULE, json.dumps(asdict(config))],
                                  stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  start_new_session=True)
    try:
        while (pair := current()) is None or pair.keeper_pid != keeper.pid:
            if keeper.poll() is not None:
                raise ServiceStartError(failure_line(log_file))
            if progress is not None:
                progress.update(lambda: keeper_status(log_file))
            time.sleep(0.1)
    except BaseException:  # interrupted while waiting: no half-started pair left behind
        keeper.terminate()
        raise
    finally:
        if progress is not None:
            progress.finish()
    return pair


def keeper_status(log_file: Path) -> str:
    """What the keeper's services are doing, from its last progress line ('duo: starting (N s): STATUS')."""
    line = last_message(log_file)
    return line.partition("): ")[2] or line


def stop(pair: ResidentPair, wait_s: float = 30.0) -> None:
    """SIGTERM to the keeper, which stops its services (they drain) and exits; SIGKILL if it takes longer
    than ``wait_s`` (its services then see their parent gone)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pair.keeper_pid, signal.SIGTERM)
    deadline = time.monotonic() + wait_s
    while _keeper_alive(pair.keeper_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _keeper_alive(pair.keeper_pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pair.keeper_pid, signal.SIGKILL)
    record_path().unlink(missing_ok=True)


def keep(config: EmbeddedConfig) -> None:
    """The keeper's life: hold the pair, recorded, until a signal ends it."""
    path = record_path()
    with embedded_services(config, StartProgress("starting", stream=sys.stdout)) as services:
        pair = ResidentPair(os.getpid(), services.draft, services.verify, services.pids, config.target_model,
                            config.draft_model, time.time())
        staging = path.with_suffix(".tmp")
        staging.write_text(json.dumps(asdict(pair)))
        os.replace(staging, path)
        try:
            while True:
                signal.pause()  # SIGTERM and SIGHUP raise SystemExit here (embedded_services), SIGINT its own
        finally:
            with contextlib.suppress(OSError, ValueError, KeyError):  # gone, or another keeper's now
                if json.loads(path.read_text())["keeper_pid"] == pair.keeper_pid:
                    path.unlink()


def _keeper_alive(pid: int) -> bool:
    """Whether ``pid`` is a running keeper: not gone, not a zombie, not another program given its pid."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()  # empty for a zombie
    except OSError:
        return True  # no /proc here: the pid is all there is to go by
    return KEEPER_MODULE.encode() in command


def _model_key(name: str) -> str:
    """A model name as compared: a local folder by its absolute path, anything else as written."""
    return str(Path(name).resolve()) if Path(name).exists() else name


def main() -> None:
    try:
        keep(EmbeddedConfig(**json.loads(sys.argv[1])))
    except StartupError as exc:
        print(f"Error: {exc}", file=sys.stderr)  # read by ``start`` (failure_line)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(128 + signal.SIGINT)


if __name__ == "__main__":
    main()
