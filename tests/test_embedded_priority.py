"""Embedded mode on shared cores: the draft service starts at the client's priority (its start is on the way
to the first token), and runs lower once both services serve, every thread of it, those started later too
(drafting ahead must not slow the verifier)."""

import os

import pytest
from click.testing import CliRunner

from duo.client.cli import main
from duo.client.embedded import DRAFT_NICENESS, EmbeddedConfig, embedded_services, usable_cores
from tests.processes import HAS_PROC, children_of
from tests.tiny_models import save_pair

pytestmark = pytest.mark.skipif(not HAS_PROC, reason="reads threads from /proc")


def thread_niceness(pid: int) -> set[int]:
    return {os.getpriority(os.PRIO_PROCESS, int(tid)) for tid in os.listdir(f"/proc/{pid}/task")}


class NicenessWhileStarting:
    """A progress report that notes the children's niceness at every check of the wait."""

    def __init__(self):
        self.seen: set[int] = set()

    def update(self, status) -> None:
        for pid in children_of(os.getpid()):
            try:
                self.seen |= thread_niceness(pid)
            except (FileNotFoundError, ProcessLookupError):  # gone meanwhile
                pass

    def finish(self) -> None:
        pass


def test_the_drafter_starts_at_full_priority_and_runs_lower_once_both_serve(tmp_path):
    pair = save_pair(tmp_path, "llama")
    own = os.getpriority(os.PRIO_PROCESS, 0)
    config = EmbeddedConfig(str(pair.target_dir), str(pair.draft_dir), verify_threads=usable_cores())  # shared
    starting = NicenessWhileStarting()
    with embedded_services(config, starting) as services:
        verify_pid, draft_pid = services.pids
        generated = CliRunner().invoke(main, ["generate", "--draft-addr", services.draft, "--max-new-tokens", "4",
                                              "w1 w2"])  # threads for its calls start now
        assert generated.exit_code == 0, generated.output
        assert thread_niceness(draft_pid) == {own + DRAFT_NICENESS}
        assert thread_niceness(verify_pid) == {own}
        assert len(os.listdir(f"/proc/{draft_pid}/task")) > 1
    assert starting.seen == {own}
