"""A user's mistakes end in one line naming the problem and the fix, never a traceback: a model folder that
does not exist, a hub id while offline, a port already taken, a service that cannot be reached, a missing
optional extra."""

import socket
import subprocess
import sys

import pytest
from click.testing import CliRunner

from duo.client import bench
from duo.client.cli import main
from duo.common.rpc import PortUnavailable, ServiceServer
from tests.inprocess import running_pair
from tests.tiny_models import save_pair


def error_lines(stderr: str) -> list[str]:
    """What stderr says besides the progress lines while services start (``duo: ...``)."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("duo: ")]


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    return save_pair(tmp_path_factory.mktemp("pair"), "llama")


@pytest.fixture
def unreachable_address():
    """An address nobody listens on: its port is bound, not listening, so connections are refused."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{held.getsockname()[1]}"


@pytest.fixture
def taken_port():
    """A port a duo gRPC server listens on."""
    server = ServiceServer(["duo.v1.Verifier"])
    port = server.bind("127.0.0.1:0")
    server.start()
    yield port
    server.stop(0)


def test_a_model_folder_that_does_not_exist_is_refused_before_any_service_starts(tiny_pair):
    result = CliRunner().invoke(main, ["generate", "--target-model", "/nope", "--draft-model",
                                       str(tiny_pair.draft_dir), "hi"])
    assert result.exit_code == 1
    assert error_lines(result.stderr) == ["Error: model folder /nope does not exist: give the path of a folder "
                                          "holding a Hugging Face model, a hub id or a builtin: name"]


def test_a_hub_id_offline_is_the_one_line_the_child_service_failed_with(tiny_pair):
    # Embedded mode: the verify service (a child process) fails; the client shows why, not its log.
    result = CliRunner(env={"HF_HUB_OFFLINE": "1"}).invoke(main, [
        "generate", "--target-model", "someone/some-model", "--draft-model", str(tiny_pair.draft_dir),
        "--verify-threads", "1", "hi"])
    assert result.exit_code == 1
    assert error_lines(result.stderr) == [
        "Error: the verify service could not start: someone/some-model is not a local folder, and the Hugging "
        "Face hub cannot be reached to download it: give the path of a local model folder (or connect to the "
        "internet)"]


@pytest.mark.parametrize("case", ["port taken", "missing model folder"])
def test_a_service_that_cannot_start_says_why_in_one_line(tiny_pair, taken_port, case):
    port, model = (taken_port, tiny_pair.target_dir) if case == "port taken" else (0, "/nope")
    completed = subprocess.run(
        [sys.executable, "-m", "duo.verify_service.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
         "--model", str(model), "--device", "cpu", "--log-level", "warning"],
        capture_output=True, text=True, timeout=300)
    assert completed.returncode == 1
    expected = {
        "port taken": f"Error: cannot listen on 127.0.0.1:{taken_port}: port {taken_port} is in use (another duo "
                      "service?): stop that process, or choose another port with --port (0 picks a free one)",
        "missing model folder": "Error: model folder /nope does not exist: give the path of a folder holding a "
                                "Hugging Face model, a hub id or a builtin: name",
    }[case]
    assert error_lines(completed.stderr) == [expected]


def test_two_servers_never_share_a_port(taken_port):
    # gRPC servers would share it by default (SO_REUSEPORT), and calls would reach either.
    with pytest.raises(PortUnavailable, match=f"port {taken_port} is in use"):
        ServiceServer(["duo.v1.Drafter"]).bind(f"127.0.0.1:{taken_port}")


def test_an_unreachable_draft_service_is_named(unreachable_address):
    result = CliRunner().invoke(main, ["generate", "--draft-addr", unreachable_address, "hi"])
    assert result.exit_code == 1
    assert error_lines(result.stderr) == [
        f"Error: cannot reach the draft service at {unreachable_address} (UNAVAILABLE): start it, or point "
        "--draft-addr at a running one"]


def test_an_unreachable_verify_service_is_named_not_the_draft_service(tiny_pair, unreachable_address):
    with running_pair(tiny_pair.target_dir, tiny_pair.draft_dir) as services:
        result = CliRunner().invoke(main, ["generate", "--draft-addr", services.draft_addr, "--verify-addr",
                                           unreachable_address, "hi"])
    assert result.exit_code == 1
    assert error_lines(result.stderr) == [
        f"Error: cannot reach the verify service at {unreachable_address} (UNAVAILABLE): start it, or point "
        "--verify-addr at a running one"]


def test_a_chart_without_its_extra_is_refused_before_the_bench_runs(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed: importing it fails

    def bench_started(*args, **kwargs):
        raise AssertionError("the bench ran before the missing extra was found")

    monkeypatch.setattr(bench, "HfBaselines", bench_started)
    result = CliRunner().invoke(main, ["bench", "--chart", str(tmp_path / "out.png")])
    assert result.exit_code == 1
    assert error_lines(result.stderr) == [
        "Error: --chart needs matplotlib, which duo's bench extra installs: pip install -e '.[bench]' in duo's "
        "folder (or pip install matplotlib)"]


# ───────────────── duo-client bench: the same, before and while it starts ─────────────────


def test_bench_with_a_model_folder_that_does_not_exist_is_one_line():
    result = CliRunner().invoke(main, ["bench", "--target-model", "/nope", "--limit", "1"])
    assert result.exit_code == 1
    assert error_lines(result.stderr) == ["Error: model folder /nope does not exist: give the path of a folder "
                                          "holding a Hugging Face model, a hub id or a builtin: name"]


def test_bench_with_a_hub_id_offline_is_one_line(tiny_pair):
    result = CliRunner(env={"HF_HUB_OFFLINE": "1"}).invoke(main, [
        "bench", "--target-model", "someone/some-model", "--draft-model", str(tiny_pair.draft_dir), "--limit", "1"])
    assert result.exit_code == 1
    assert error_lines(result.stderr) == [
        "Error: the HF baselines: someone/some-model is not a local folder, and the Hugging Face hub cannot be "
        "reached to download it: give the path of a local model folder (or connect to the internet)"]


def test_bench_whose_services_cannot_start_says_why_in_one_line(tmp_path):
    from tests.tiny_models import word_tokenizer

    pair = save_pair(tmp_path / "pair", "llama")
    other = save_pair(tmp_path / "other", "llama", draft_tokenizer=word_tokenizer(extra_word="other"))
    result = CliRunner().invoke(main, [
        "bench", "--target-model", str(pair.target_dir), "--draft-model", str(other.draft_dir), "--systems",
        "duo-fixed", "--limit", "1", "--max-new-tokens", "4", "--verify-threads", "1", "--no-chat"])
    assert result.exit_code == 1
    assert error_lines(result.stderr) == [
        f"Error: the draft service could not start: draft model {str(other.draft_dir)!r} cannot speculate for target "
        f"{str(pair.target_dir)!r}: their tokenizers differ (different vocabulary or special tokens). Pick a draft "
        "model that shares the target's tokenizer."]


def test_bench_with_a_broken_prompt_file_is_one_line(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "fine"}\nnot json\n')
    result = CliRunner().invoke(main, ["bench", "--prompts", str(prompts)])
    assert result.exit_code == 1
    assert len(error_lines(result.stderr)) == 1
    assert error_lines(result.stderr)[0].startswith(f"Error: --prompts: {prompts}:2: not a JSON object")


def test_a_childs_failure_is_its_logged_error_even_when_a_threads_traceback_follows(tmp_path):
    from duo.client.child_service import failure_line

    log = tmp_path / "draft.log"
    log.write_text(
        "2026-12-01 22:00:00,000 INFO duo.draft: loading m\n"
        "2026-12-01 22:00:01,000 ERROR duo.draft_service.cli: draft model 'd' cannot speculate for target 't'\n"
        "Exception in thread reporter:\nTraceback (most recent call last):\n"
        '  File "/usr/lib/python3.11/threading.py", line 1045, in _bootstrap_inner\n')
    assert failure_line(log) == "draft model 'd' cannot speculate for target 't'"
    log.write_text("Traceback (most recent call last):\n  File \"x.py\", line 1\nValueError: broken\n")
    assert failure_line(log) == "ValueError: broken"  # nothing logged: the exception's own last line
