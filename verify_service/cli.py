"""``duo-verify serve``: the verify service's command line."""

from __future__ import annotations

import logging

import click

from duo.common.cli_options import KERNEL_CHOICES, KERNELS_HELP
from duo.common.default_models import DEFAULT_TARGET
from duo.common.metrics import ServiceMetrics
from duo.common.models import load_causal_lm
from duo.common.serve_cli import (ServeSettings, common_serve_options, exit_drained, log_batching, setup_process,
                                  start_server)
from duo.common.sessions import SessionRegistry
from duo.protos import duo_pb2_grpc
from duo.verify_service.engine import TargetVerifier
from duo.verify_service.kv_budget import default_kv_cache_tokens
from duo.verify_service.scheduler import VerifyScheduler
from duo.verify_service.servicer import VerifierServicer

log = logging.getLogger("duo.verify")


@click.group()
@click.version_option(package_name="duo", prog_name="duo-verify")
def main() -> None:
    """duo verify service: the target model, verifying draft token trees."""


@main.command()
@click.option("--model", default=DEFAULT_TARGET, show_default=True, envvar="DUO_VERIFY_MODEL", show_envvar=True,
              help="Target model: hub id, local folder or builtin name.")
@click.option("--device", default="auto", show_default=True, envvar="DUO_VERIFY_DEVICE", show_envvar=True,
              help="auto (CUDA when present), cpu, cuda or cuda:N.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              show_default=True, envvar="DUO_VERIFY_DTYPE", show_envvar=True,
              help="auto: bfloat16 on CUDA, the checkpoint's own dtype on CPU.")
@click.option("--max-tree-nodes", type=click.IntRange(1, 1024), default=64, show_default=True,
              envvar="DUO_VERIFY_MAX_TREE_NODES", show_envvar=True, help="Largest proposal accepted per round.")
@click.option("--cpu-kernels", type=click.Choice(KERNEL_CHOICES), default="auto", show_default=True,
              envvar="DUO_VERIFY_CPU_KERNELS", show_envvar=True, help=KERNELS_HELP)
@click.option("--kv-cache-tokens", type=click.IntRange(1), default=None, envvar="DUO_VERIFY_KV_CACHE_TOKENS",
              show_envvar=True, help="KV-cache positions all sessions may hold; new sessions beyond are refused "
                                     "(default: half the memory free at start, the GPU's on CUDA).")
@common_serve_options("DUO_VERIFY")
def serve(model, device, dtype, max_tree_nodes, cpu_kernels, kv_cache_tokens, settings: ServeSettings):
    """Serve the Verifier RPCs."""
    setup_process(settings)
    metrics = ServiceMetrics()
    sessions = SessionRegistry(settings.server.max_sessions, settings.server.idle_timeout_s)
    servicer = VerifierServicer(sessions, metrics)
    server = start_server(settings, "duo.v1.Verifier", duo_pb2_grpc.add_VerifierServicer_to_server, servicer, metrics,
                          model)
    loaded = load_causal_lm(model, device, dtype, cpu_kernels)
    kv_cache_tokens = kv_cache_tokens or default_kv_cache_tokens(loaded.model)
    verifier = TargetVerifier(loaded, max_tree_nodes, kv_cache_tokens=kv_cache_tokens)
    log.info("KV caches: up to %d positions over all sessions", kv_cache_tokens)
    scheduler = VerifyScheduler(verifier, settings.max_batch_tokens, settings.max_batch_sessions, metrics)
    servicer.attach(scheduler)
    log_batching(verifier.batches, settings)
    server.mark_serving()
    log.info("serving")
    server.serve_until_signal(settings.grace_s)
    scheduler.close()
    exit_drained()


if __name__ == "__main__":
    main()
