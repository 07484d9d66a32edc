"""``duo-client``: generate text with a draft/verify service pair (embedded or remote)."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click
import grpc

from duo.client import resident
from duo.client.bench_command import bench_command
from duo.client.embedded import EmbeddedConfig, embedded_services, usable_cores
from duo.client.orchestrator import FixedBudget, GenerationRequest, GenerationResult, Orchestrator, check_verifier
from duo.client.progress import StartProgress
from duo.common.budget import AdaptiveBudget, ControllerConfig
from duo.common.cli_options import KERNEL_CHOICES, budget_option
from duo.common.default_models import DEFAULT_DRAFT, DEFAULT_TARGET, check_local_model
from duo.common.errors import DuoError, FailedPrecondition, StartupError
from duo.common.generation_spec import ChatMessage, ChatRole
from duo.common.params import DecodingParams, StoppingParams
from duo.common.rpc import MAX_MESSAGE_BYTES
from duo.common.security import ChannelSecurity, read_token
from duo.common.tree import DEFAULT_MAX_BRANCHES

_FILE = click.Path(dir_okay=False, exists=True, path_type=Path)


@click.group()
@click.version_option(package_name="duo", prog_name="duo-client")
def main() -> None:
    """duo: distributed speculative decoding (draft on CPU, verify on GPU, over gRPC)."""


# The options that choose and size an embedded pair: generate's (a pair of its own, or the resident one where
# it runs the same models) and up's.
_EMBEDDED_PAIR_OPTIONS = [
    click.option("--target-model", default=DEFAULT_TARGET, show_default=True, help="Embedded mode: target model."),
    click.option("--draft-model", default=DEFAULT_DRAFT, show_default=True, help="Embedded mode: draft model."),
    click.option("--verify-threads", type=click.IntRange(1), default=usable_cores(),
                 show_default="this machine's cores", help="Embedded mode: the verify service's threads."),
    click.option("--draft-threads", type=click.IntRange(1), default=1, show_default=True,
                 help="Embedded mode: the draft service's threads."),
    click.option("--device", default="auto", show_default=True, help="Embedded mode: the verify service's device."),
    click.option("--cpu-kernels", type=click.Choice(KERNEL_CHOICES), default="auto", show_default=True,
                 help="Embedded mode: both services' CPU matrix kernels (duo-verify serve --help)."),
]


def _embedded_pair_options(command):
    for option in reversed(_EMBEDDED_PAIR_OPTIONS):
        command = option(command)
    return command


quiet_option = click.option("--quiet", "-q", is_flag=True,
                            help="Nothing on stderr but errors: no progress while services start.")


@main.command()
@click.argument("prompt", required=False)
@click.option("--max-new-tokens", type=click.IntRange(1), default=128, show_default=True)
@click.option("--temperature", type=click.FloatRange(0), default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-k", type=click.IntRange(0), default=0, show_default=True, help="0 = off.")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True)
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=None,
              help="Seed for sampling: the same seed gives the same output, whatever the budget.")
@click.option("--stop", "stop_strings", multiple=True, help="Stop string (repeatable).")
@click.option("--ignore-eos", is_flag=True, help="Keep generating past end-of-sequence tokens.")
@click.option("--chat/--no-chat", default=None, help="Apply the chat template (default: when the model has one).")
@click.option("--system", "system_prompt", default=None,
              help="A system message before the prompt (sent as chat messages, through the chat template).")
@click.option("--draft-budget", default="auto", show_default=True, callback=budget_option,
              help="Draft tokens per round, or auto.")
@click.option("--max-branches", type=click.IntRange(1, 8), default=DEFAULT_MAX_BRANCHES, show_default=True,
              help="Token-tree width: alternatives per node (1 = chains).")
@click.option("--no-speculation", is_flag=True, help="The target alone through the same verify service.")
@click.option("--stats", "show_stats", is_flag=True, help="Human-readable stats on stderr.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout at the end.")
@click.option("--draft-addr", envvar="DUO_DRAFT_ADDR", help="HOST:PORT of a running draft service (remote mode).")
@click.option("--verify-addr", envvar="DUO_VERIFY_ADDR",
              help="Remote mode: HOST:PORT of the draft service's verifier, checked for a compatible tokenizer "
                   "before generating.")
@_embedded_pair_options
@quiet_option
@click.option("--timeout-s", type=click.FloatRange(0, min_open=True), default=None, help="Deadline of the generation.")
@click.option("--tls-ca", type=_FILE, envvar="DUO_CLIENT_TLS_CA", help="Remote mode: CA of the draft service (TLS).")
@click.option("--tls-cert", type=_FILE, envvar="DUO_CLIENT_TLS_CERT", help="Client certificate (mutual TLS).")
@click.option("--tls-key", type=_FILE, envvar="DUO_CLIENT_TLS_KEY", help="Client key (mutual TLS).")
@click.option("--auth-token-file", type=_FILE, envvar="DUO_CLIENT_AUTH_TOKEN_FILE",
              help="Send 'authorization: Bearer <token>' with the token in this file.")
def generate(prompt, max_new_tokens, temperature, top_k, top_p, seed, stop_strings, ignore_eos, chat, system_prompt,
             draft_budget, max_branches, no_speculation, show_stats, as_json, draft_addr, verify_addr, target_model,
             draft_model, verify_threads, draft_threads, device, cpu_kernels, quiet, timeout_s, tls_ca, tls_cert,
             tls_key, auth_token_file):
    """Generate a continuation of PROMPT (read from stdin when omitted), streaming it to stdout."""
    if prompt is None:
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise click.UsageError("the prompt is empty")
    if system_prompt is not None and chat is False:
        raise click.UsageError("--system needs the chat template: drop --no-chat")
    budget = 0 if no_speculation else draft_budget
    try:
        request = GenerationRequest(
            **_prompt(prompt, system_prompt),
            apply_chat_template=chat,
            decoding=DecodingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed),
            stopping=StoppingParams(max_new_tokens=max_new_tokens, stop_strings=tuple(stop_strings),
                                    ignore_eos=ignore_eos),
        )
        security = ChannelSecurity(tls_ca, tls_cert, tls_key, read_token(auth_token_file))
    except DuoError as exc:
        raise click.UsageError(str(exc)) from exc
    if budget is None:
        policy = AdaptiveBudget(ControllerConfig(max_branches=max_branches))
    else:
        policy = FixedBudget(budget, max_branches)
    on_text = (lambda text: None) if as_json else _print_stream

    try:
        with contextlib.ExitStack() as stack:
            if draft_addr is None:
                if verify_addr is not None:
                    raise click.UsageError("--verify-addr needs --draft-addr (the draft service talks to the verifier)")
                if (pair := resident.current()) is not None and pair.serves(target_model, draft_model):
                    draft_addr = pair.draft  # duo-client up's: started, loaded
                else:
                    for model in (target_model, draft_model):
                        check_local_model(model)  # before seconds (or minutes) of starting services
                    config = EmbeddedConfig(target_model, draft_model, verify_threads, draft_threads, device,
                                            cpu_kernels=cpu_kernels,
                                            # the pair is this call's alone: its limit is this call's request
                                            draft_options=("--max-new-tokens-limit", str(max_new_tokens)))
                    progress = StartProgress("starting the services", quiet=quiet,
                                             hint="duo-client up keeps a pair running for later calls")
                    draft_addr = stack.enter_context(embedded_services(config, progress)).draft
            channel = stack.enter_context(security.channel(draft_addr, options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]))
            peers = [_Peer("draft service", draft_addr, "--draft-addr", channel)]
            orchestrator = Orchestrator(channel, timeout_s, security.metadata)
            try:
                if verify_addr is not None:
                    verify_channel = stack.enter_context(security.channel(verify_addr))
                    peers.append(_Peer("verify service", verify_addr, "--verify-addr", verify_channel))
                    check_verifier(orchestrator, verify_channel, security.metadata)
                result = orchestrator.generate(request, policy, on_text)
            except grpc.RpcError as exc:
                raise click.ClickException(_call_failure(exc, peers)) from exc
    except (StartupError, FailedPrecondition) as exc:
        raise click.ClickException(str(exc)) from exc

    if as_json:
        click.echo(json.dumps(_json_result(result)))
    else:
        click.echo()
    if show_stats:
        _print_stats(result)


def _prompt(prompt: str, system_prompt: str | None) -> dict:
    """GenerationRequest's prompt: the text, or with a system message, the chat of both."""
    if system_prompt is None:
        return {"prompt_text": prompt}
    return {"messages": (ChatMessage(ChatRole.SYSTEM, system_prompt), ChatMessage(ChatRole.USER, prompt))}


@dataclass(frozen=True)
class _Peer:
    service: str
    address: str
    flag: str  # the option that names its address
    channel: grpc.Channel


def _call_failure(exc: grpc.RpcError, peers: list[_Peer]) -> str:
    """One line for a failed call; a service that cannot be reached is named, with the option to check."""
    if exc.code() == grpc.StatusCode.UNAVAILABLE:
        for peer in peers:
            if not _reachable(peer.channel):
                return (f"cannot reach the {peer.service} at {peer.address} (UNAVAILABLE): start it, or point "
                        f"{peer.flag} at a running one")
    return f"{exc.code().name}: {exc.details()}"


def _reachable(channel: grpc.Channel, wait_s: float = 1.0) -> bool:
    try:
        grpc.channel_ready_future(channel).result(timeout=wait_s)
    except grpc.FutureTimeoutError:
        return False
    return True


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
        f"acceptance {stats['acceptance_rate']:.0%}, draft budget {stats['draft_budget']}\n"
        f"[duo] first token: {_first_token_line(stats['first_token'])}",
        err=True,
    )


def _first_token_line(parts: dict[str, float]) -> str:
    """e.g. 'prefill 180 ms, verifier queue 0 ms, ...', largest first."""
    named = sorted(((name.removesuffix("_s").replace("_", " "), seconds) for name, seconds in parts.items()),
                   key=lambda item: -item[1])
    return ", ".join(f"{name} {seconds * 1000:.0f} ms" for name, seconds in named)


@main.command()
@_embedded_pair_options
@quiet_option
def up(target_model, draft_model, verify_threads, draft_threads, device, cpu_kernels, quiet):
    """Start a resident pair in the background: later generate calls with the same models use it, without
    starting services or loading models. duo-client down stops it."""
    def say(message: str) -> None:
        if not quiet:
            click.echo(message, err=True)

    try:
        for model in (target_model, draft_model):
            check_local_model(model)
        with resident.starting(on_busy=lambda: say("another duo-client up is starting a pair: waiting for it")):
            if (pair := resident.current()) is not None:
                click.echo(f"already up: {_describe(pair)}")
                return
            say("starting the pair (the models load; the first run converts the default target)...")
            pair = resident.start(EmbeddedConfig(target_model, draft_model, verify_threads, draft_threads, device,
                                                 cpu_kernels=cpu_kernels),
                                  StartProgress("starting the pair", quiet=quiet))
    except StartupError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"up: {_describe(pair)}")


@main.command()
def down() -> None:
    """Stop the resident pair."""
    if (pair := resident.current()) is None:
        click.echo("no resident pair is up")
        return
    resident.stop(pair)
    click.echo(f"stopped the pair of keeper pid {pair.keeper_pid}")


@main.command()
def status() -> None:
    """Say whether a resident pair is up, and which."""
    pair = resident.current()
    click.echo(f"up: {_describe(pair)}" if pair is not None else "no resident pair is up (duo-client up starts one)")


def _describe(pair: resident.ResidentPair) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(pair.started_at))
    return (f"target {pair.target_model}, draft {pair.draft_model}; draft service {pair.draft}, verify service "
            f"{pair.verify}; keeper pid {pair.keeper_pid} (services {', '.join(map(str, pair.service_pids))}), "
            f"since {since}")


main.add_command(bench_command)


if __name__ == "__main__":
    main()
