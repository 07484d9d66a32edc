"""``duo-client``: generate text with a draft/verify service pair (embedded or remote)."""

from __future__ import annotations

import contextlib
import json
import sys

import click
import grpc

from client.budget import AdaptiveBudget
from client.embedded import EmbeddedConfig, ServiceStartError, embedded_services
from client.orchestrator import FixedBudget, GenerationRequest, GenerationResult, Orchestrator
from duo_common.default_models import DEFAULT_DRAFT, DEFAULT_TARGET
from duo_common.errors import DuoError
from duo_common.params import DecodingParams, StoppingParams
from duo_common.rpc import MAX_MESSAGE_BYTES


def parse_budget(value: str) -> int | None:
    """``auto`` → None (the client's policy), else a non-negative integer."""
    if value == "auto":
        return None
    try:
        budget = int(value)
    except ValueError:
        raise click.BadParameter(f"expected a number of draft tokens or 'auto', got {value!r}") from None
    if not 0 <= budget <= 1024:
        raise click.BadParameter(f"draft budget must be in [0, 1024], got {budget}")
    return budget


@click.group()
def main() -> None:
    """duo: distributed speculative decoding (draft on CPU, verify on GPU, over gRPC)."""


@main.command()
@click.argument("prompt", required=False)
@click.option("--max-new-tokens", type=click.IntRange(1), default=128, show_default=True)
@click.option("--temperature", type=click.FloatRange(0), default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-k", type=click.IntRange(0), default=0, show_default=True, help="0 = off.")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True)
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=None, help="Seed for sampling.")
@click.option("--stop", "stop_strings", multiple=True, help="Stop string (repeatable).")
@click.option("--ignore-eos", is_flag=True, help="Keep generating past end-of-sequence tokens.")
@click.option("--chat/--no-chat", default=None, help="Apply the chat template (default: when the model has one).")
@click.option("--draft-budget", default="auto", show_default=True, help="Draft tokens per round, or auto.")
@click.option("--no-speculation", is_flag=True, help="The target alone through the same verify service.")
@click.option("--stats", "show_stats", is_flag=True, help="Human-readable stats on stderr.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout at the end.")
@click.option("--draft-addr", envvar="DUO_DRAFT_ADDR", help="HOST:PORT of a running draft service (remote mode).")
@click.option("--verify-addr", envvar="DUO_VERIFY_ADDR",
              help="HOST:PORT of the verify service (remote mode; informational, the draft service has its own).")
@click.option("--target-model", default=DEFAULT_TARGET, show_default=True, help="Embedded mode: target model.")
@click.option("--draft-model", default=DEFAULT_DRAFT, show_default=True, help="Embedded mode: draft model.")
@click.option("--verify-threads", type=click.IntRange(1), default=1, show_default=True)
@click.option("--draft-threads", type=click.IntRange(1), default=1, show_default=True)
@click.option("--device", default="auto", show_default=True, help="Embedded mode: the verify service's device.")
@click.option("--timeout-s", type=click.FloatRange(0, min_open=True), default=None, help="Deadline of the generation.")
def generate(prompt, max_new_tokens, temperature, top_k, top_p, seed, stop_strings, ignore_eos, chat, draft_budget,
             no_speculation, show_stats, as_json, draft_addr, verify_addr, target_model, draft_model, verify_threads,
             draft_threads, device, timeout_s):
    """Generate a continuation of PROMPT (read from stdin when omitted), streaming it to stdout."""
    if prompt is None:
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise click.UsageError("the prompt is empty")
    budget = 0 if no_speculation else parse_budget(draft_budget)
    try:
        request = GenerationRequest(
            prompt_text=prompt,
            apply_chat_template=chat,
            decoding=DecodingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed),
            stopping=StoppingParams(max_new_tokens=max_new_tokens, stop_strings=tuple(stop_strings),
                                    ignore_eos=ignore_eos),
        )
    except DuoError as exc:
        raise click.UsageError(str(exc)) from exc
    policy = AdaptiveBudget() if budget is None else FixedBudget(budget)
    on_text = (lambda text: None) if as_json else _print_stream

    try:
        with contextlib.ExitStack() as stack:
            if draft_addr is None:
                if verify_addr is not None:
                    raise click.UsageError("--verify-addr needs --draft-addr (the draft service talks to the verifier)")
                config = EmbeddedConfig(target_model, draft_model, verify_threads, draft_threads, device)
                draft_addr = stack.enter_context(embedded_services(config)).draft
            channel = stack.enter_context(grpc.insecure_channel(draft_addr, options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]))
            result = Orchestrator(channel, timeout_s).generate(request, policy, on_text)
    except ServiceStartError as exc:
        raise click.ClickException(str(exc)) from exc
    except grpc.RpcError as exc:
        raise click.ClickException(f"{exc.code().name}: {exc.details()}") from exc

    if as_json:
        click.echo(json.dumps(_json_result(result)))
    else:
        click.echo()
    if show_stats:
        _print_stats(result)


def _print_stream(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _json_result(result: GenerationResult) -> dict:
    return {
        "text": result.text,
        "token_ids": result.token_ids,
        "finish_reason": result.finish_reason.value,
        "stats": result.summary(),
    }


def _print_stats(result: GenerationResult) -> None:
    stats = result.summary()
    click.echo(
        f"[duo] {stats['new_tokens']} tokens in {stats['total_s']:.2f} s ({stats['tokens_per_s']:.1f} tokens/s), "
        f"TTFT {stats['ttft_s'] * 1000:.0f} ms, finish: {result.finish_reason.value}\n"
        f"[duo] {stats['rounds']} rounds, {stats['mean_accepted_tokens']:.2f} tokens/round, "
        f"acceptance {stats['acceptance_rate']:.0%}, draft budget {stats['draft_budget']}",
        err=True,
    )


if __name__ == "__main__":
    main()
