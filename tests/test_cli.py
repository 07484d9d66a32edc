"""``duo-client``: flag validation (no services needed) and the real default pair end to end."""

import importlib
import importlib.metadata
import json
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from duo.client.cli import main
from duo.common.budget import parse_budget

PROMPT = "The capital of France is"


@pytest.mark.parametrize("args, message", [
    (["generate", "--draft-budget", "many", "hi"], "expected a number of draft tokens or 'auto'"),
    (["generate", "--draft-budget", "-1", "hi"], "draft budget must be in"),
    (["generate", "--max-new-tokens", "0", "hi"], "--max-new-tokens"),
    (["generate", "--temperature", "-0.5", "hi"], "--temperature"),
    (["generate", "--top-p", "0", "hi"], "--top-p"),
    (["generate", "--verify-addr", "localhost:1", "hi"], "--verify-addr needs --draft-addr"),
    (["generate", "   "], "the prompt is empty"),
])
def test_bad_flags_are_usage_errors(args, message):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_budget_parsing():
    assert parse_budget("auto") is None
    assert parse_budget("6") == 6


@pytest.mark.parametrize("command, name", [("duo.client.cli", "duo-client"), ("duo.draft_service.cli", "duo-draft"),
                                           ("duo.verify_service.cli", "duo-verify")])
def test_every_cli_tells_its_version(command, name):
    cli = importlib.import_module(command).main
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0
    assert result.output == f"{name}, version {importlib.metadata.version('duo')}\n"


def test_remote_mode_checks_the_named_verifier_before_generating(tmp_path):
    from tests.inprocess import running_pair, verify_server
    from tests.tiny_models import save_pair, word_tokenizer

    pair = save_pair(tmp_path / "pair", "llama")
    other = save_pair(tmp_path / "other", "llama", draft_tokenizer=word_tokenizer(extra_word="other"))
    with running_pair(pair.target_dir, pair.draft_dir) as services, \
            verify_server(other.draft_dir) as (foreign_verifier, _):
        good = CliRunner().invoke(main, ["generate", "--draft-addr", services.draft_addr, "--verify-addr",
                                         services.verify_addr, "--json", "--max-new-tokens", "5", "w1 w2"])
        assert good.exit_code == 0, good.output
        assert json.loads(good.output)["stats"]["new_tokens"] == 5
        bad = CliRunner().invoke(main, ["generate", "--draft-addr", services.draft_addr, "--verify-addr",
                                        foreign_verifier, "--max-new-tokens", "5", "w1 w2"])
        assert bad.exit_code == 1
        assert "tokenizers differ" in bad.output
        assert services.verify_sessions.total_opened == 1  # the refused run never reached a verifier


def run_cli(*args, stdin=None):
    completed = subprocess.run([sys.executable, "-m", "duo.client.cli", "generate", *args], input=stdin,
                               capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed


@pytest.fixture(scope="module")
def target_reference():
    """HF greedy generate of the default target alone: 48 new tokens after PROMPT."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from duo.common.default_models import default_target_dir

    path = default_target_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.inference_mode():
        output = model.generate(ids, max_new_tokens=48, do_sample=False)
    return output[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("mode", [[], ["--no-speculation"]], ids=["speculative", "no-speculation"])
def test_default_pair_through_the_cli_equals_target_alone(target_reference, mode):
    completed = run_cli("--json", "--no-chat", "--max-new-tokens", "48", *mode, PROMPT)
    result = json.loads(completed.stdout)
    assert result["token_ids"] == target_reference
    assert result["finish_reason"] in ("eos", "length")
    stats = result["stats"]
    assert stats["new_tokens"] == len(target_reference)
    for key in ("ttft_s", "tokens_per_s", "rounds", "mean_accepted_tokens", "acceptance_rate", "draft_budget"):
        assert key in stats
    if mode:
        assert stats["draft_budget"] == 0 and stats["mean_accepted_tokens"] == 1.0
    else:
        assert stats["mean_accepted_tokens"] > 1.0


def test_chat_prompt_from_stdin_streams_an_answer():
    completed = run_cli("--max-new-tokens", "24", "--stats", stdin="What is the capital of France?")
    assert "Paris" in completed.stdout
    assert "tokens/s" in completed.stderr


def test_a_seed_reproduces_a_sampled_answer_through_the_cli():
    args = ("--json", "--temperature", "0.9", "--top-p", "0.95", "--seed", "1234", "--max-new-tokens", "24",
            "Write one sentence about the sea.")
    first = json.loads(run_cli(*args).stdout)["token_ids"]
    assert json.loads(run_cli(*args).stdout)["token_ids"] == first
