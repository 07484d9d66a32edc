"""Many sessions at once: aggregate tokens/s of duo with batching, without, and of HF ``generate`` batched.

For each verify-service mode (``batched``: the default, every waiting session's work in one forward pass;
``one-per-pass``: ``--max-batch-sessions 1``) this starts the embedded pair once and, at each concurrency
c, runs c sessions at the same time (c prompts of ``--prompts``, one thread each, through the draft
service's Session RPC, as ``duo-client`` does), timing the whole wave. The baseline is HF ``generate`` of the
target over the same c prompts as one left-padded batch (greedy, float32 and bfloat16, torch threads = duo's
two services). Every duo output is checked against the same prompt run alone (duo-nospec, batching on, one
session): a session's answer must not depend on its batch-mates. HF's padded batches compute other numbers
(padding changes its matrix shapes), so their tokens are compared and reported, not required to match.

    python benchmarks/load.py                                  # concurrency 1,2,4,8; duo-auto and duo-nospec
    python benchmarks/load.py --concurrency 1,4,16 --systems duo-nospec --max-new-tokens 32

Run it alone on the machine: anything beside it skews the ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
import torch

from duo.client.bench import percentile
from duo.common.budget import AdaptiveBudget, ControllerConfig, SharedEstimates
from duo.client.embedded import EmbeddedConfig, embedded_services
from duo.client.orchestrator import FixedBudget, GenerationRequest, Orchestrator
from duo.common.default_models import DEFAULT_DRAFT, DEFAULT_TARGET, resolve_model
from duo.common.params import StoppingParams
from duo.common.prompt_sets import read_prompt_file, user_prompt_ids

PROMPTS = Path(__file__).resolve().parent / "prompts" / "heldout_chat.jsonl"
MODES = {"batched": (), "one-per-pass": ("--max-batch-sessions", "1")}
POLICIES = {  # each takes what the system's earlier sessions on these services learnt
    "duo-nospec": lambda learnt: FixedBudget(0),
    "duo-fixed": lambda learnt: FixedBudget(4, 3),
    "duo-auto": lambda learnt: AdaptiveBudget(ControllerConfig(max_branches=3), learnt),
}


@dataclass
class Wave:
    """c sessions of one system started together."""

    system: str
    concurrency: int
    wall_s: float
    new_tokens: int
    per_session_tokens_per_s: float
    ttft_p50_s: float | None
    ttft_p99_s: float | None
    identical: bool | None  # None: not compared

    @property
    def aggregate_tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_s


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", default="1,2,4,8", help="comma-separated session counts")
    parser.add_argument("--systems", default="duo-auto,duo-nospec", help=f"from {', '.join(POLICIES)}")
    parser.add_argument("--modes", default=",".join(MODES), help=f"verify-service modes, from {', '.join(MODES)}")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--prompts", type=Path, default=PROMPTS)
    parser.add_argument("--hf", default=True, action=argparse.BooleanOptionalAction,
                        help="the HF generate batched baseline")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.systems = [s for s in args.systems.split(",") if s]
    args.modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(args.systems) - set(POLICIES)) + sorted(set(args.modes) - set(MODES))
    if unknown:
        parser.error(f"unknown systems or modes: {unknown}")
    return args


def encode_prompts(tokenizer, path: Path, count: int) -> list[list[int]]:
    prompts = read_prompt_file(path, count)
    if len(prompts) < count:
        raise SystemExit(f"{path} has {len(prompts)} prompts; the largest concurrency needs {count}")
    return [user_prompt_ids(tokenizer, prompt) for prompt in prompts]


def run_wave(orchestrator: Orchestrator, system: str, prompts: list[list[int]], max_new_tokens: int,
             reference: dict[int, list[int]] | None, learnt: SharedEstimates | None = None) -> Wave:
    results: list = [None] * len(prompts)
    errors: list[BaseException] = []

    def one(index: int) -> None:
        request = GenerationRequest(prompt_ids=tuple(prompts[index]),
                                    stopping=StoppingParams(max_new_tokens=max_new_tokens))
        try:
            results[index] = orchestrator.generate(request, POLICIES[system](learnt))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall_s = time.perf_counter() - started
    if errors:
        raise errors[0]
    ttfts = [r.ttft_s for r in results]
    return Wave(system, len(prompts), wall_s, sum(len(r.token_ids) for r in results),
                statistics.mean(r.tokens_per_s for r in results), percentile(ttfts, 0.5), percentile(ttfts, 0.99),
                None if reference is None else all(r.token_ids == reference[i] for i, r in enumerate(results)))


def hf_batched(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, system: str,
               reference: dict[int, list[int]]) -> Wave:
    width = max(map(len, prompts))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    started = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(input_ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=pad)
    wall_s = time.perf_counter() - started
    eos = set(tokenizer.eos_token_id if isinstance(tokenizer.eos_token_id, list) else [tokenizer.eos_token_id])
    outputs = []
    for row in output[:, width:].tolist():
        end = next((i + 1 for i, token in enumerate(row) if token in eos), len(row))
        outputs.append(row[:end])
    new_tokens = sum(map(len, outputs))
    return Wave(system, len(prompts), wall_s, new_tokens, new_tokens / wall_s / len(prompts), None, None,
                None if system.endswith("bf16") else all(o == reference[i] for i, o in enumerate(outputs)))


def main() -> None:
    args = parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target_path = resolve_model(DEFAULT_TARGET)
    tokenizer = AutoTokenizer.from_pretrained(target_path)
    prompts = encode_prompts(tokenizer, args.prompts, max(args.concurrency))
    waves: dict[str, list[Wave]] = {}
    reference: dict[int, list[int]] = {}
    for mode in args.modes:
        config = EmbeddedConfig(DEFAULT_TARGET, DEFAULT_DRAFT, verify_device="cpu", verify_options=MODES[mode])
        with embedded_services(config) as addresses, grpc.insecure_channel(addresses.draft) as channel:
            orchestrator = Orchestrator(channel)
            learnt = {system: SharedEstimates() for system in args.systems}  # per verifier: these services
            run_wave(orchestrator, "duo-nospec", prompts[:1], 8, None)  # warm up
            if not reference:  # every prompt alone: what each session must produce whatever runs beside it
                for index, ids in enumerate(prompts):
                    request = GenerationRequest(prompt_ids=tuple(ids),
                                                stopping=StoppingParams(max_new_tokens=args.max_new_tokens))
                    reference[index] = orchestrator.generate(request, FixedBudget(0)).token_ids
            for concurrency in args.concurrency:
                for system in args.systems:
                    wave = run_wave(orchestrator, system, prompts[:concurrency], args.max_new_tokens, reference,
                                    learnt[system])
                    waves.setdefault(f"{system} {mode}", []).append(wave)
                    report(f"{system} {mode}", wave)
    if args.hf:
        torch.set_num_threads(2)
        for name, dtype in (("hf-generate-batched", torch.float32), ("hf-generate-batched-bf16", torch.bfloat16)):
            model = AutoModelForCausalLM.from_pretrained(target_path, dtype=dtype).eval()
            hf_batched(model, tokenizer, prompts[:1], 8, name, reference)  # warm up
            for concurrency in args.concurrency:
                wave = hf_batched(model, tokenizer, prompts[:concurrency], args.max_new_tokens, name, reference)
                waves.setdefault(name, []).append(wave)
                report(name, wave)
    print_table(waves, args.concurrency)
    if args.json_out:
        args.json_out.write_text(json.dumps({name: [asdict(w) | {"aggregate_tokens_per_s": w.aggregate_tokens_per_s}
                                                    for w in ws] for name, ws in waves.items()}, indent=1))
    if any(w.identical is False for name, ws in waves.items() if name.startswith("duo") for w in ws):
        raise SystemExit("a duo session's output depended on its batch-mates (see the 'same' column)")


def report(name: str, wave: Wave) -> None:
    print(f"{name:<28} c={wave.concurrency:<3} {wave.new_tokens:>5} tokens in {wave.wall_s:6.2f} s: "
          f"{wave.aggregate_tokens_per_s:7.2f} tok/s", flush=True)


def print_table(waves: dict[str, list[Wave]], concurrency: list[int]) -> None:
    """Aggregate tokens/s per system and concurrency, and per-session rate, TTFT and identity."""
    print("\naggregate tokens/s (all sessions together); in brackets: x the same system at concurrency "
          f"{concurrency[0]}")
    print(f"{'system':<28}" + "".join(f"{'c=' + str(c):>16}" for c in concurrency))
    for name, ws in waves.items():
        base = ws[0].aggregate_tokens_per_s
        print(f"{name:<28}" + "".join(f"{w.aggregate_tokens_per_s:>8.1f} ({w.aggregate_tokens_per_s / base:4.1f}x)"
                                      for w in ws))
    print(f"\n{'system':<28}{'c':>4}{'tok/s/session':>15}{'TTFT p50 ms':>13}{'TTFT p99 ms':>13}  same")
    for name, ws in waves.items():
        for w in ws:
            ttft = "".join(f"{'-' if t is None else round(t * 1000):>13}" for t in (w.ttft_p50_s, w.ttft_p99_s))
            same = {None: "n/a", True: "yes", False: "NO"}[w.identical]
            print(f"{name:<28}{w.concurrency:>4}{w.per_session_tokens_per_s:>15.2f}{ttft}  {same}")


if __name__ == "__main__":
    main()
