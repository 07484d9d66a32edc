"""``duo-draft serve``: the draft service's command line."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import click

from duo.draft_service.http_api import build_app
from duo.draft_service.http_server import HttpServer
from duo.draft_service.readiness import ServingState, follow_verifier
from duo.draft_service.servicer import DrafterConfig, DrafterServicer
from duo.common.resume import ResumePolicy
from duo.common import batched_forward
from duo.common.cli_options import KERNEL_CHOICES, KERNELS_HELP, budget_option
from duo.common.cpu_runtime import packed_kernels_will_run
from duo.common.default_models import DEFAULT_DRAFT
from duo.common.errors import FailedPrecondition, InvalidArgument, Unavailable
from duo.common.metrics import ServiceMetrics
from duo.common.models import load_causal_lm
from duo.common.progress import reported
from duo.common.security import ChannelSecurity, read_token
from duo.common.serve_cli import (ServeSettings, common_serve_options, exit_drained, log_batching, setup_process,
                                  start_server)
from duo.common.sessions import SessionRegistry
from duo.common.tree import DEFAULT_MAX_BRANCHES
from duo.protos import duo_pb2_grpc

log = logging.getLogger("duo.draft")


@click.group()
@click.version_option(package_name="duo", prog_name="duo-draft")
def main() -> None:
    """duo draft service: the draft model and the speculative loop."""


def _option(name: str, **kwargs):
    flag = name.split("/")[0]  # "--x/--no-x": the variable is named after the positive flag
    envvar = "DUO_DRAFT_" + flag.lstrip("-").replace("-", "_").upper()
    return click.option(name, envvar=envvar, show_envvar=True, show_default=True, **kwargs)


_FILE = click.Path(dir_okay=False, exists=True, path_type=Path)


@main.command()
@_option("--model", default=DEFAULT_DRAFT, help="Draft model: hub id, local folder or builtin name.")
@_option("--verify-addr", default=None,
         help="The verify service: HOST:PORT, or dns:///NAME:PORT to balance over every address NAME resolves to.")
@_option("--verify-port-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
         help="Instead of --verify-addr: a verify service on this machine's loopback that writes its port to this "
              "file (its --port-file) once it listens; waited for. Lets both services start at once.")
@_option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
         help="auto: float32 where the packed CPU kernels run (the draft's numerics never change duo's output, "
              "and that is its fastest runtime measured), else the checkpoint's own dtype.")
@_option("--cpu-kernels", type=click.Choice(KERNEL_CHOICES), default="auto", help=KERNELS_HELP)
@_option("--default-budget", default="auto", callback=budget_option,
         help="Draft tokens per round when a request sets none: a number, or auto (the latency-aware controller "
              "chooses each round from the session's timings, starting from what earlier sessions measured).")
@_option("--default-max-branches", type=click.IntRange(1, 8), default=DEFAULT_MAX_BRANCHES,
         help="Token-tree width when a request sets no budget (1: chains).")
@_option("--context-copy/--no-context-copy", default=True,
         help="Mix copies from the context (the token after the last earlier occurrence of the current suffix) "
              "into the draft's distributions.")
@_option("--verify-timeout-s", type=click.FloatRange(0.1), default=120.0, help="Longest wait for one verifier answer.")
@_option("--verify-wait-s", type=click.FloatRange(0), default=600.0, help="How long start-up waits for the verifier.")
@_option("--max-new-tokens-limit", type=click.IntRange(1), default=4096,
         help="Largest max_new_tokens a request may ask for.")
@_option("--max-prompt-tokens", type=click.IntRange(1), default=None,
         help="Longest prompt accepted, in tokens (default: the target's context).")
@_option("--draft-prefill", type=click.Choice(["parallel", "after-first-token"]), default="parallel",
         help="When the draft model reads the prompt: beside the target's prefill, or once the first token is out "
              "(where both services share cores, so the target's prefill has them all).")
@_option("--verifier-resume-attempts", type=click.IntRange(0, 100), default=ResumePolicy.attempts,
         help="New verifier sessions a generation may open after losing its verifier (prompt plus the tokens "
              "committed so far; greedy output unchanged); 0: the loss is the caller's error.")
@_option("--verifier-resume-within-s", type=click.FloatRange(0), default=ResumePolicy.within_s,
         help="Longest time after losing the verifier that a generation keeps trying to resume.")
@_option("--verify-tls-ca", type=_FILE, default=None, help="CA of the verifier's certificate: TLS to the verifier.")
@_option("--verify-tls-cert", type=_FILE, default=None, help="Client certificate for mutual TLS to the verifier.")
@_option("--verify-tls-key", type=_FILE, default=None, help="Client key for mutual TLS to the verifier.")
@_option("--verify-server-name", default=None, help="Name to check in the verifier's certificate.")
@_option("--verify-auth-token-file", type=_FILE, default=None, help="Bearer token the verifier requires.")
@_option("--http-port", type=click.IntRange(0, 65535), default=None,
         help="Also serve the OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models, "
              "/health) on this port, on --host, with --auth-token-file's token (0 picks a free port).")
@common_serve_options("DUO_DRAFT")
def serve(model, verify_addr, verify_port_file, dtype, cpu_kernels, default_budget, default_max_branches, context_copy,
          verify_timeout_s, verify_wait_s, max_new_tokens_limit, max_prompt_tokens, draft_prefill,
          verifier_resume_attempts, verifier_resume_within_s,
          verify_tls_ca, verify_tls_cert, verify_tls_key, verify_server_name, verify_auth_token_file, http_port,
          settings: ServeSettings):
    """Serve the Drafter RPCs (Session, Generate, GetModelInfo), and the HTTP API with --http-port."""
    if (verify_addr is None) == (verify_port_file is None):
        raise click.UsageError("name the verify service: --verify-addr, or --verify-port-file")
    setup_process(settings)
    if verify_port_file is not None:
        verify_addr = f"127.0.0.1:{_wait_for_verifier_port(verify_port_file, verify_wait_s)}"
    try:
        verify_security = ChannelSecurity(verify_tls_ca, verify_tls_cert, verify_tls_key,
                                          read_token(verify_auth_token_file), verify_server_name)
    except InvalidArgument as exc:
        raise click.UsageError(str(exc)) from exc
    channel = verify_security.channel(verify_addr, options=[
        ("grpc.max_receive_message_length", settings.server.max_message_bytes),
        ("grpc.max_send_message_length", settings.server.max_message_bytes),
        # Each session is one stream on one verifier; spread sessions over all resolved verifiers.
        ("grpc.lb_policy_name", "round_robin"),
    ])
    config = DrafterConfig(default_budget=default_budget, default_max_branches=default_max_branches,
                           context_copy=context_copy, verify_timeout_s=verify_timeout_s,
                           max_new_tokens_limit=max_new_tokens_limit, max_prompt_tokens=max_prompt_tokens,
                           max_batch_tokens=settings.max_batch_tokens, max_batch_sessions=settings.max_batch_sessions,
                           draft_prefill_first=draft_prefill == "parallel",
                           resume=ResumePolicy(verifier_resume_attempts, verifier_resume_within_s))
    metrics = ServiceMetrics()
    sessions = SessionRegistry(settings.server.max_sessions, settings.server.idle_timeout_s)
    servicer = DrafterServicer(config, channel, sessions, metrics, verify_security.metadata)
    server = start_server(settings, "duo.v1.Drafter", duo_pb2_grpc.add_DrafterServicer_to_server, servicer, metrics,
                          model)
    serving = ServingState(server.set_serving)
    http = None
    if http_port is not None:  # before the model loads: its /health says 503 meanwhile
        app = build_app(servicer.factory, sessions, serving, settings.server.auth_token,
                        settings.server.max_message_bytes)
        http = HttpServer(app, settings.host, http_port, settings.grace_s, settings.server.tls)
        http.start()
        log.info("HTTP API on %s://%s:%d/v1", http.scheme, settings.host, http.port)
    if dtype == "auto" and packed_kernels_will_run(cpu_kernels):
        dtype = "float32"
    loaded = load_causal_lm(model, "cpu", dtype, cpu_kernels)
    servicer.attach(loaded)
    log_batching(batched_forward.runs_together(loaded.model), settings)
    _wait_for_compatible_verifier(servicer, verify_addr, verify_wait_s)
    serving.set(True)
    follow_verifier(channel, serving.set)
    log.info("serving; verifier at %s", verify_addr)

    def stop_http() -> None:  # /health says 503 at once, and HTTP drains beside gRPC
        serving.stop()
        if http is not None:
            http.stop()

    server.serve_until_signal(settings.grace_s, on_stop=stop_http)
    stop_http()  # waits for HTTP's drain to end
    servicer.close()
    exit_drained()


def _wait_for_verifier_port(port_file: Path, wait_s: float) -> int:
    """The port a verify service on loopback announces in ``port_file`` (written whole, then renamed)."""
    deadline = time.monotonic() + wait_s
    with reported(log, f"waiting for the verify service to announce its port in {port_file}"):
        while not port_file.exists():
            if time.monotonic() > deadline:
                log.error("no verify service announced its port in %s within %.0f s", port_file, wait_s)
                sys.exit(3)
            time.sleep(0.05)
    return int(port_file.read_text())


def _wait_for_compatible_verifier(servicer: DrafterServicer, verify_addr: str, wait_s: float) -> None:
    """Refuse to serve an incompatible pair; wait (a while) for a verifier that is still starting."""
    deadline = time.monotonic() + wait_s
    with reported(log, f"waiting for the verify service at {verify_addr}"):
        while True:
            try:
                target = servicer.target_info()
                log.info("verifier %s runs %s: compatible", verify_addr, target.model_name)
                return
            except FailedPrecondition as exc:
                log.error("%s", exc)
                sys.exit(2)
            except Unavailable as exc:
                if time.monotonic() > deadline:
                    log.error("verify service at %s unavailable for %.0f s: %s", verify_addr, wait_s, exc)
                    sys.exit(3)
                # Soon after the verifier serves: the draft service starts serving no later than that.
                time.sleep(0.1)


if __name__ == "__main__":
    main()
