"""An embedded ``duo-client`` never leaves its two child services behind: they stop with it on SIGTERM,
SIGHUP and SIGINT, and outlive a SIGKILL of it by a few seconds at most (they watch their parent)."""

import select
import signal
import subprocess
import sys

import pytest

from tests.polling import eventually
from tests.processes import HAS_PROC, children_of, running
from tests.tiny_models import save_pair

pytestmark = pytest.mark.skipif(not HAS_PROC, reason="reads processes from /proc")

LONG = 4000  # tokens: still generating when the signal arrives


@pytest.fixture(scope="module")
def long_pair(tmp_path_factory):
    return save_pair(tmp_path_factory.mktemp("pair"), "llama", context=LONG + 64)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGKILL],
                         ids=lambda signum: signum.name)
def test_children_do_not_outlive_the_client(long_pair, signum):
    client = subprocess.Popen(
        [sys.executable, "-m", "duo.client.cli", "generate", "--target-model", str(long_pair.target_dir),
         "--draft-model", str(long_pair.draft_dir), "--verify-threads", "1", "--max-new-tokens", str(LONG),
         "--ignore-eos", "w1 w2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        # Text arriving means both services are up and a generation is in flight.
        ready, _, _ = select.select([client.stdout], [], [], 300)
        assert ready and client.stdout.read(1), client.stderr.read().decode()[-2000:]
        services = children_of(client.pid)
        assert len(services) == 2, services
        client.send_signal(signum)
        returncode = client.wait(timeout=60)
    finally:
        client.kill()
        client.wait()
    assert returncode != 0  # it was stopped, not done
    if signum == signal.SIGKILL:  # the client stopped nothing itself: its children noticed
        assert eventually(lambda: not any(map(running, services)), timeout_s=5)
    else:  # the client stopped its children before it exited
        assert not any(map(running, services))
