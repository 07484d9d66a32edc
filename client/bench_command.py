"""``duo-client bench``: the command line of ``duo.client.bench`` (which says what the systems are). Every
refusal or failure to start is one line: a missing extra, a bad model or prompt file, a service that
cannot start."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import click
import grpc

from duo.client import bench
from duo.client.embedded import EmbeddedConfig, embedded_services, usable_cores
from duo.client.orchestrator import Orchestrator
from duo.client.progress import StartProgress
from duo.common.budget import SharedEstimates
from duo.common.cli_options import KERNEL_CHOICES
from duo.common.default_models import DEFAULT_DRAFT, DEFAULT_TARGET, check_local_model, resolve_model
from duo.common.errors import FailedPrecondition, StartupError
from duo.common.prompt_sets import read_prompt_file, user_prompt_ids
from duo.common.rpc import MAX_MESSAGE_BYTES
from duo.common.tree import DEFAULT_MAX_BRANCHES


@click.command(name="bench")
@click.option("--prompts", "prompts_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="JSONL file of {\"prompt\": ...} (default: the shipped set).")
@click.option("--limit", type=click.IntRange(1), default=None, help="Use only the first N prompts.")
@click.option("--max-new-tokens", type=click.IntRange(1), default=128, show_default=True)
@click.option("--systems", default=",".join(bench.ALL_SYSTEMS), show_default=True,
              help="Comma-separated systems to run; the first one is the reference output.")
@click.option("--fixed-budget", type=click.IntRange(1, 64), default=4, show_default=True,
              help="Budget of duo-fixed and duo-sequential.")
@click.option("--max-branches", type=click.IntRange(1, 8), default=DEFAULT_MAX_BRANCHES, show_default=True,
              help="Token-tree width of the speculative duo systems (1 = chains).")
@click.option("--chat/--no-chat", default=True, show_default=True, help="Wrap prompts in the chat template.")
@click.option("--warmup/--no-warmup", default=True, show_default=True, help="One untimed run of every system first.")
@click.option("--json-out", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--chart", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Save a PNG bar chart.")
@click.option("--draft-addr", envvar="DUO_DRAFT_ADDR", help="Remote mode: a running draft service.")
@click.option("--target-model", default=DEFAULT_TARGET, show_default=True)
@click.option("--draft-model", default=DEFAULT_DRAFT, show_default=True)
@click.option("--verify-threads", type=click.IntRange(1), default=usable_cores(), show_default="this machine's cores")
@click.option("--draft-threads", type=click.IntRange(1), default=1, show_default=True)
@click.option("--cpu-kernels", type=click.Choice(KERNEL_CHOICES), default="auto", show_default=True,
              help="Both duo services' CPU matrix kernels (embedded mode).")
@click.option("--hf-threads", type=click.IntRange(1), default=None,
              help="torch threads of the HF baselines (default: the cores duo's services use, at most this "
                   "machine's).")
@click.option("--quiet", "-q", is_flag=True, help="Nothing on stderr but errors: no progress, no line per prompt.")
def bench_command(prompts_file, limit, max_new_tokens, systems, fixed_budget, max_branches, chat, warmup, json_out,
                  chart, draft_addr, target_model, draft_model, verify_threads, draft_threads, cpu_kernels, hf_threads,
                  quiet):
    """Compare duo with HF generate and HF assisted generation on the same models and cores."""
    # Everything that can be refused is refused before minutes of loading models and running prompts.
    if chart is not None and (missing := bench.chart_unavailable_reason()):
        raise click.ClickException(missing)
    chosen = [name.strip() for name in systems.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(bench.ALL_SYSTEMS))
    if unknown or not chosen:
        raise click.BadParameter(f"unknown systems {unknown}; choose from {', '.join(bench.ALL_SYSTEMS)}",
                                 param_hint="--systems")
    try:
        prompts = read_prompt_file(prompts_file or bench.DEFAULT_PROMPTS, limit)
    except ValueError as exc:
        raise click.ClickException(f"--prompts: {exc}") from exc
    hf_threads = hf_threads or min(verify_threads + draft_threads, usable_cores())
    runs: list[bench.Run] = []
    with _one_line_errors(), contextlib.ExitStack() as stack:
        for model in (target_model, draft_model):
            check_local_model(model)
        baselines = bench.HfBaselines(resolve_model(target_model), resolve_model(draft_model), threads=hf_threads)
        prompt_ids = [user_prompt_ids(baselines.tokenizer, prompt, chat) for prompt in prompts]
        if draft_addr is None and any(name.startswith("duo") for name in chosen):
            config = EmbeddedConfig(target_model, draft_model, verify_threads, draft_threads, "cpu",
                                    cpu_kernels=cpu_kernels)
            progress = StartProgress("starting the services", quiet=quiet)
            draft_addr = stack.enter_context(embedded_services(config, progress)).draft
        orchestrator = None
        if draft_addr is not None:
            channel = stack.enter_context(grpc.insecure_channel(draft_addr, options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]))
            orchestrator = Orchestrator(channel)
        learnt = SharedEstimates()  # duo-auto's sessions, one after another, on these services

        def run_one(system: str, index: int, ids: list[int]) -> bench.Run:
            if system.startswith("hf"):
                tokens, total_s, ttft_s = baselines.run(system, ids, max_new_tokens)
                return bench.Run(system, index, tokens, total_s, ttft_s)
            result = bench.duo_run(system, orchestrator, ids, max_new_tokens, fixed_budget, max_branches, learnt)
            return bench.run_from_result(system, index, result)

        if warmup:
            for system in chosen:
                run_one(system, -1, prompt_ids[0][:16])
        for index, ids in enumerate(prompt_ids):
            for system in chosen:
                run = run_one(system, index, ids)
                runs.append(run)
                if not quiet:
                    click.echo(f"prompt {index + 1}/{len(prompt_ids)} {system:<15} {len(run.token_ids):>4} tokens "
                               f"{len(run.token_ids) / run.total_s:6.2f} tok/s", err=True)
    summaries = bench.summarise(runs, chosen)
    click.echo(bench.format_table(summaries))
    meta = {"prompts": len(prompts), "max_new_tokens": max_new_tokens, "target_model": target_model,
            "draft_model": draft_model, "verify_threads": verify_threads, "draft_threads": draft_threads,
            "hf_threads": hf_threads, "cpu_kernels": cpu_kernels, "fixed_budget": fixed_budget,
            "max_branches": max_branches, "draft_addr": draft_addr}
    if json_out:
        bench.write_json(json_out, summaries, meta)
    if chart:
        bench.save_chart(chart, summaries, f"duo bench: {len(prompts)} prompts × {max_new_tokens} tokens")
    if any(summary.identical_to_reference is False for summary in summaries):
        raise click.ClickException("greedy outputs differ between systems (see the 'same' column)")


@contextlib.contextmanager
def _one_line_errors() -> Iterator[None]:
    """A model that cannot load, a service that cannot start, a call that fails: one line, no traceback."""
    try:
        yield
    except (StartupError, FailedPrecondition) as exc:
        raise click.ClickException(str(exc)) from exc
    except grpc.RpcError as exc:
        raise click.ClickException(f"a duo call failed: {exc.code().name}: {exc.details()}") from exc
