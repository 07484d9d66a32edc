"""Long start-up steps say what they are doing while they run: the services log a line every few seconds
(loading a model, waiting for the verifier), and ``duo-client`` relays what its services last said while it
waits for them, as plain lines when stderr is not a terminal, and nothing with ``--quiet``."""

import io
import logging
import socket
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from duo.client import progress
from duo.client.child_service import last_message
from duo.client.cli import main
from duo.client.progress import StartProgress
from duo.common.progress import reported
from tests.tiny_models import save_pair


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    return save_pair(tmp_path_factory.mktemp("pair"), "llama")


def test_a_long_step_logs_a_line_every_few_seconds_until_it_ends(caplog):
    log = logging.getLogger("test.progress")
    with caplog.at_level(logging.INFO, logger="test.progress"):
        with reported(log, "loading a model", every_s=0.05):
            time.sleep(0.28)
        lines_while_running = len(caplog.messages)
        time.sleep(0.15)
    assert 3 <= lines_while_running <= 6, caplog.messages
    assert len(caplog.messages) == lines_while_running  # none after the step
    assert all(message.startswith("still loading a model (") and message.endswith(" s)")
               for message in caplog.messages)


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_off_a_terminal_the_wait_is_plain_lines_and_on_one_a_status_line_redrawn(monkeypatch):
    monkeypatch.setattr(progress, "PLAIN_EVERY_S", 0.05)
    monkeypatch.setattr(progress, "TERMINAL_EVERY_S", 0.05)
    for stream in (io.StringIO(), FakeTerminal()):
        waiting = StartProgress("starting the services", stream=stream)
        for _ in range(30):
            waiting.update(lambda: "verify service: loading")
            time.sleep(0.01)
        waiting.finish()
        written = stream.getvalue()
        if isinstance(stream, FakeTerminal):
            assert "\n" not in written and written.count("\r") >= 3 and written.endswith("\r\x1b[K")
        else:
            lines = written.splitlines()
            assert len(lines) >= 3 and "\r" not in written and "\x1b" not in written
            assert all(line.startswith("duo: starting the services (") and line.endswith("): verify service: loading")
                       for line in lines), lines


@pytest.mark.parametrize("quiet", [False, True], ids=["default", "quiet"])
def test_an_embedded_generate_relays_its_services_progress_unless_quiet(tiny_pair, monkeypatch, quiet):
    monkeypatch.setattr(progress, "PLAIN_EVERY_S", 0.5)
    result = CliRunner().invoke(main, [
        "generate", "--target-model", str(tiny_pair.target_dir), "--draft-model", str(tiny_pair.draft_dir),
        "--verify-threads", "1", "--max-new-tokens", "4", *(["--quiet"] if quiet else []), "w1 w2"])
    assert result.exit_code == 0, result.output
    if quiet:
        assert result.stderr == ""
        return
    hint, *lines = result.stderr.splitlines()
    assert hint == "duo: duo-client up keeps a pair running for later calls"
    assert lines and "\r" not in result.stderr and "\x1b" not in result.stderr
    for line in lines:
        assert line.startswith("duo: starting the services ("), line
        assert ": verify service: " in line and "; draft service: " in line, line


def test_what_a_service_last_logged_is_its_status(tmp_path):
    log_file = tmp_path / "verify.log"
    assert last_message(log_file) == "starting"  # nothing written yet (its imports take seconds)
    log_file.write_text("2026-12-01 20:52:50,330 INFO duo.common.serve_cli: listening on 127.0.0.1:1; loading m\n"
                        "Loading weights:   0%|   | 0/272\rLoading weights: 100%|###| 272/272\n")
    assert last_message(log_file) == "Loading weights: 100%|###| 272/272"  # a progress bar's last drawing
    with log_file.open("a") as log:
        log.write("2026-12-01 20:52:56,961 INFO duo.common.models: still loading m (5 s)\n\n")
    assert last_message(log_file) == "still loading m (5 s)"


def test_the_draft_service_says_every_few_seconds_that_it_waits_for_its_verifier(tiny_pair):
    with socket.socket() as held:  # bound, never listening: a verifier that is not there
        held.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{held.getsockname()[1]}"
        completed = subprocess.run(
            [sys.executable, "-m", "duo.draft_service.cli", "serve", "--model", str(tiny_pair.draft_dir),
             "--verify-addr", address, "--verify-wait-s", "6", "--host", "127.0.0.1", "--port", "0",
             "--threads", "1"],
            capture_output=True, text=True, timeout=300)
    assert completed.returncode == 3, completed.stderr[-3000:]
    waits = [line for line in completed.stderr.splitlines() if f"still waiting for the verify service at {address}"
             in line]
    assert waits, completed.stderr[-3000:]
    assert "Loading weights" not in completed.stderr  # transformers' progress bar stays off a terminal
