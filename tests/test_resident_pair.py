"""``duo-client up`` keeps a pair in the background that ``generate`` uses (it starts none of its own);
``down``, or any signal to the keeper, stops the pair and leaves no process behind; a stale record is found
and removed; two ``up`` at once start one pair."""

import json
import os
import signal
import subprocess
import sys

import pytest
from click.testing import CliRunner

import duo.client.cli
from duo.client import resident
from duo.client.cli import main
from tests.polling import eventually
from tests.processes import HAS_PROC, processes_with, running
from tests.tiny_models import save_pair

pytestmark = pytest.mark.skipif(not HAS_PROC, reason="reads processes from /proc")


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    return save_pair(tmp_path_factory.mktemp("pair"), "llama")


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DUO_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.parametrize("ended_by", ["down", signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGKILL],
                         ids=lambda ended_by: getattr(ended_by, "name", ended_by))
def test_up_serves_generate_until_it_ends_without_orphans(tiny_pair, cache_dir, monkeypatch, ended_by):
    models = ["--target-model", str(tiny_pair.target_dir), "--draft-model", str(tiny_pair.draft_dir)]
    up = CliRunner().invoke(main, ["up", *models, "--verify-threads", "1"])
    assert up.exit_code == 0, up.output
    pair = resident.current()
    assert pair is not None and len(pair.service_pids) == 2
    processes = [pair.keeper_pid, *pair.service_pids]
    try:
        def no_pair_of_its_own(*args, **kwargs):
            raise AssertionError("generate started a pair of its own while one was up")

        monkeypatch.setattr(duo.client.cli, "embedded_services", no_pair_of_its_own)
        for prompt in ("w1 w2", "w3 w4 w5"):
            generated = CliRunner().invoke(main, ["generate", *models, "--json", "--max-new-tokens", "6", prompt])
            assert generated.exit_code == 0, generated.output
            assert json.loads(generated.stdout)["stats"]["new_tokens"] == 6
        assert "up: target" in CliRunner().invoke(main, ["status"]).stdout
        if ended_by == "down":
            assert CliRunner().invoke(main, ["down"]).exit_code == 0
        else:
            os.kill(pair.keeper_pid, ended_by)
        assert eventually(lambda: not any(map(running, processes)), timeout_s=15), \
            [pid for pid in processes if running(pid)]
    finally:
        for pid in filter(running, processes):
            os.kill(pid, signal.SIGKILL)
    assert resident.current() is None
    assert not (cache_dir / "resident.json").exists()


def test_a_stale_record_is_found_and_removed(cache_dir):
    gone = subprocess.Popen(["true"])
    gone.wait()
    cache_dir.mkdir()
    (cache_dir / "resident.json").write_text(json.dumps({
        "keeper_pid": gone.pid, "draft": "127.0.0.1:1", "verify": "127.0.0.1:2", "service_pids": [],
        "target_model": "t", "draft_model": "d", "started_at": 0.0}))
    status = CliRunner().invoke(main, ["status"])
    assert status.stdout == "no resident pair is up (duo-client up starts one)\n"
    assert not (cache_dir / "resident.json").exists()


def test_two_ups_at_once_start_one_pair(tiny_pair, cache_dir):
    up = [sys.executable, "-m", "duo.client.cli", "up", "--target-model", str(tiny_pair.target_dir),
          "--draft-model", str(tiny_pair.draft_dir), "--verify-threads", "1"]
    env = {**os.environ, "DUO_CACHE_DIR": str(cache_dir)}
    both = [subprocess.Popen(up, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    try:
        outputs = [process.communicate(timeout=300) for process in both]
        assert [process.returncode for process in both] == [0, 0], outputs
        pair = resident.current()
        assert pair is not None
        said = sorted(stdout.split(":")[0] for stdout, _ in outputs)
        assert said == ["already up", "up"], outputs  # the second found the first one's pair
        assert all(f"keeper pid {pair.keeper_pid} " in stdout for stdout, _ in outputs), outputs
        waited = [stderr for stdout, stderr in outputs if stdout.startswith("already up")][0]
        assert "another duo-client up is starting a pair: waiting for it" in waited
        keepers = processes_with(in_command=resident.KEEPER_MODULE, in_environment=f"DUO_CACHE_DIR={cache_dir}")
        assert keepers == [pair.keeper_pid]
    finally:
        for process in both:
            process.kill()
        if (pair := resident.current()) is not None:
            resident.stop(pair)

