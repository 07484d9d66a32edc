"""Tokens per round of sampled sessions, unseeded (speculative sampling against the draft's distributions)
and seeded (the exponential race on noise fixed by seed and position), on the same prompts with the same
fixed budget: what a seed costs in acceptance. Counts, not timings, so it may share the machine.

    python benchmarks/sampling_acceptance.py [--limit 8] [--max-new-tokens 64] [--temperatures 0.7,1.0]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import grpc

from duo.client.embedded import EmbeddedConfig, embedded_services
from duo.client.orchestrator import FixedBudget, GenerationRequest, Orchestrator
from duo.common.default_models import DEFAULT_DRAFT, DEFAULT_TARGET
from duo.common.params import DecodingParams, StoppingParams
from duo.common.prompt_sets import read_prompt_file

PROMPTS = Path(__file__).resolve().parent / "prompts" / "heldout_chat.jsonl"
SEEDS = (1, 2, 3)  # three samples per prompt each way


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=8, help="prompts")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperatures", default="0.7,1.0")
    parser.add_argument("--budget", type=int, default=4)
    args = parser.parse_args()
    prompts = read_prompt_file(PROMPTS, args.limit)
    config = EmbeddedConfig(DEFAULT_TARGET, DEFAULT_DRAFT, 1, 1, "cpu")
    with embedded_services(config) as addresses, grpc.insecure_channel(addresses.draft) as channel:
        orchestrator = Orchestrator(channel, timeout_s=600)
        print(f"{'temperature':>11} {'sampling':<9} {'tokens':>6} {'rounds':>6} {'tok/round':>9} {'accepted':>8}")
        for temperature in (float(t) for t in args.temperatures.split(",")):
            for label, seeds in (("unseeded", (None,) * len(SEEDS)), ("seeded", SEEDS)):
                tokens = rounds = accepted = drafted = 0
                for prompt in prompts:
                    for seed in seeds:
                        request = GenerationRequest(
                            prompt_text=prompt, decoding=DecodingParams(temperature=temperature, seed=seed),
                            stopping=StoppingParams(max_new_tokens=args.max_new_tokens))
                        result = orchestrator.generate(request, FixedBudget(args.budget, 1))
                        tokens += len(result.token_ids)
                        rounds += result.server_stats.rounds
                        accepted += result.server_stats.accepted_tokens
                        drafted += result.server_stats.drafted_tokens
                print(f"{temperature:>11} {label:<9} {tokens:>6} {rounds:>6} {tokens / rounds:>9.2f} "
                      f"{accepted / drafted:>8.1%}", flush=True)


if __name__ == "__main__":
    main()
