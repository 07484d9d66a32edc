"""Token trees vs chains at equal node budgets, greedy and sampled, on the default pair.

Both services run in this process on loopback gRPC (``duo.draft_service.inprocess``: the real servicers and
round loop; torch uses one thread, so drafting and verification each get about one core of a two-core
machine). For each width (max_branches; 1 = chains) and decoding mode, every prompt is generated with the
same node budget, and the table reports tokens committed per verification round (the target's forward
passes saved; the mean of each prompt's figure, and pooled over all prompts as benchmarks/draft_quality.py
reports it) and tokens/s (client wall time, prefill included).

Run: ``python benchmarks/trees_vs_chains.py [--prompts N] [--max-new-tokens 64] [--budget 6] [--widths 1,2,3]``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
from pathlib import Path

import grpc
import torch

from duo.client.orchestrator import FixedBudget, GenerationRequest, Orchestrator
from duo.common.default_models import DEFAULT_DRAFT, DEFAULT_TARGET
from duo.common.params import DecodingParams, StoppingParams
from duo.common.prompt_sets import read_prompt_file
from duo.draft_service.inprocess import running_pair

PROMPTS = Path(__file__).resolve().parent / "prompts" / "heldout_chat.jsonl"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts-file", type=Path, default=PROMPTS)
    parser.add_argument("--prompts", type=int, default=4, help="how many prompts (from the top of the file)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--budget", type=int, default=6, help="draft tokens (tree nodes) per round")
    parser.add_argument("--widths", default="1,2,3", help="max_branches values; 1 = chains")
    parser.add_argument("--temperatures", default="0,0.7")
    parser.add_argument("--seed", type=int, default=1)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    prompts = read_prompt_file(args.prompts_file, args.prompts)
    widths = [int(w) for w in args.widths.split(",")]
    temperatures = [float(t) for t in args.temperatures.split(",")]
    rows = []
    with running_pair(DEFAULT_TARGET, DEFAULT_DRAFT) as services, \
            grpc.insecure_channel(services.draft_addr) as channel:
        orchestrator = Orchestrator(channel, timeout_s=600)
        warm = GenerationRequest(prompt_text="Hi", stopping=StoppingParams(max_new_tokens=4))
        orchestrator.generate(warm, FixedBudget(args.budget, 1))
        for temperature in temperatures:
            for width in widths:
                per_round, speeds, acceptance = [], [], []
                committed = rounds = 0
                for index, prompt in enumerate(prompts):
                    request = GenerationRequest(
                        prompt_text=prompt,
                        decoding=DecodingParams(temperature=temperature, seed=args.seed + index if temperature else None),
                        stopping=StoppingParams(max_new_tokens=args.max_new_tokens),
                    )
                    result = orchestrator.generate(request, FixedBudget(args.budget, width))
                    summary = result.summary()
                    per_round.append(summary["mean_accepted_tokens"])
                    committed += len(result.token_ids) - 1  # the first token comes from the prefill, not a round
                    rounds += summary["rounds"]
                    speeds.append(summary["tokens_per_s"])
                    acceptance.append(summary["acceptance_rate"])
                rows.append((temperature, width, statistics.mean(per_round), committed / rounds,
                             statistics.mean(speeds), statistics.mean(acceptance)))
                print(f"  done: temperature {temperature}, max_branches {width}", file=sys.stderr, flush=True)
    print(f"\ntarget {DEFAULT_TARGET}, draft {DEFAULT_DRAFT} (each in its checkpoint's dtype); {len(prompts)} prompts, "
          f"{args.max_new_tokens} new tokens, {args.budget} nodes per round, torch threads 1")
    print("tokens/round: the mean over prompts of each prompt's tokens per round; pooled: all tokens over all rounds")
    print(f"{'temperature':>11} {'max_branches':>12} {'tokens/round':>12} {'pooled':>7} {'tokens/s':>9} "
          f"{'accepted/drafted':>16}")
    for temperature, width, tokens_per_round, pooled, tokens_per_s, accepted in rows:
        print(f"{temperature:>11.1f} {width:>12d} {tokens_per_round:>12.2f} {pooled:>7.2f} {tokens_per_s:>9.2f} "
              f"{accepted:>16.2f}")


if __name__ == "__main__":
    main()
