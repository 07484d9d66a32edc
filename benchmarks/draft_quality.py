"""How well a draft model predicts the target, measured on held-out chat prompts (greedy decoding).

For every prompt (chat template applied, generation prompt added) the target greedily decodes up to
``--max-new-tokens`` tokens with a KV cache, stopping after EOS. On that continuation we report:

* per-token agreement: the fraction of positions where the draft's argmax, given the target's prefix,
  equals the target's token;
* mean tokens committed per verification round at each draft budget k, from an exact simulation of greedy
  speculative decoding: each round the draft greedily proposes k tokens from the committed prefix, the target
  accepts the longest prefix that matches its own greedy tokens and adds one token of its own, so a round
  commits accepted + 1 tokens (the proposal is shortened near the end so no round passes the token limit);
* the same for duo's drafter (``TreeDrafter``, as the draft service runs it: context copying, and token trees
  for widths above 1) at each ``--drafter-widths`` width, with the target's greedy continuation standing in
  for the verifier: greedy verification commits the longest drafted path that matches it plus one token, so
  this is exact. Each round drafts ahead as the service does while a verifier works (here: as far as the
  drafter's own cap);
* the draft's time per decoded token as a fraction of the target's: incremental single-token decoding with
  a KV cache for both models, on ``--threads`` CPU threads.

Timings are taken first, alone; the simulations then run in ``--workers`` processes. Run:
``python benchmarks/draft_quality.py [--draft DIR] [--json-out FILE]`` (about 25 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from duo.common.default_models import default_draft_dir, default_target_dir
from duo.common.greedy_rounds import replay_greedy_rounds
from duo.common.params import DecodingParams
from duo.common.prompt_sets import read_prompt_file, user_prompt_ids
from duo.common.tree import DEFAULT_MAX_BRANCHES, TokenTree, path_along
from duo.draft_service.tree_drafter import TreeDrafter

PROMPTS = Path(__file__).resolve().parent / "prompts" / "heldout_chat.jsonl"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Draft-vs-target quality on held-out chat prompts.")
    parser.add_argument("--prompts", type=Path, default=PROMPTS)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--draft", default=None, help="draft folder (default: duo's shipped default draft)")
    parser.add_argument("--target", default=None, help="target folder (default: duo's default target)")
    parser.add_argument("--budgets", default="2,4,6,8", help="comma-separated draft budgets k")
    parser.add_argument("--drafter-widths", default=f"1,{DEFAULT_MAX_BRANCHES}",
                        help="token-tree widths for duo's drafter (1 = chains; default: chains and duo's default "
                             "width; empty: skip)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for the timing pass")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="processes for the simulation pass (one thread each)")
    parser.add_argument("--json-out", type=Path, default=None)
    return parser.parse_args()


@torch.no_grad()
def greedy_decode(model, prompt_ids: list[int], max_new_tokens: int, eos_id: int) -> tuple[list[int], list[float]]:
    """Greedy continuation with a KV cache, and the wall time of each single-token step after the prefill."""
    cache = DynamicCache()
    logits = model(torch.tensor([prompt_ids]), past_key_values=cache, use_cache=True).logits
    tokens = [int(logits[0, -1].argmax())]
    step_times: list[float] = []
    while len(tokens) < max_new_tokens and tokens[-1] != eos_id:
        started = time.perf_counter()
        logits = model(torch.tensor([[tokens[-1]]]), past_key_values=cache, use_cache=True).logits
        tokens.append(int(logits[0, -1].argmax()))
        step_times.append(time.perf_counter() - started)
    return tokens, step_times


@torch.no_grad()
def agreement_counts(draft, prompt_ids: list[int], target_tokens: list[int]) -> tuple[int, int]:
    """(matches, positions): the draft's teacher-forced argmax against the target's continuation."""
    sequence = torch.tensor([prompt_ids + target_tokens[:-1]])
    draft_logits = draft(sequence).logits[0, len(prompt_ids) - 1:]
    draft_tokens = draft_logits.argmax(-1)
    matches = int((draft_tokens == torch.tensor(target_tokens)).sum())
    return matches, len(target_tokens)


class DraftProposer:
    """The draft with a KV cache over the committed prefix, proposing greedy continuations."""

    def __init__(self, draft, prompt_ids: list[int]):
        self.draft = draft
        self.cache = DynamicCache()
        self.cached = 0
        self.committed = list(prompt_ids)

    @torch.no_grad()
    def _feed(self, tokens: list[int]) -> torch.Tensor:
        logits = self.draft(torch.tensor([tokens]), past_key_values=self.cache, use_cache=True).logits
        self.cached += len(tokens)
        return logits[0, -1]

    def propose(self, count: int) -> list[int]:
        if count == 0:
            return []
        if self.cached < len(self.committed) - 1:
            self._feed(self.committed[self.cached:-1])
        logits = self._feed(self.committed[-1:])
        proposal = [int(logits.argmax())]
        while len(proposal) < count:
            proposal.append(int(self._feed(proposal[-1:]).argmax()))
        return proposal

    def commit(self, tokens: list[int]) -> None:
        self.committed.extend(tokens)
        keep = min(self.cached, len(self.committed) - 1)
        self.cache.crop(keep - self.cached)  # transformers 5: a negative count of tokens to drop
        self.cached = keep


def simulate_speculative(draft, prompt_ids: list[int], target_tokens: list[int], budget: int) -> tuple[int, int]:
    """(committed tokens, rounds) of greedy speculative decoding that reproduces ``target_tokens``."""
    proposer = DraftProposer(draft, prompt_ids)

    def play_round(done: int, room: int) -> int:
        accepted = len(path_along(TokenTree.chain(proposer.propose(room)), target_tokens[done:]))
        proposer.commit(target_tokens[done:done + accepted + 1])
        return accepted

    return replay_greedy_rounds(len(target_tokens), budget, play_round)


def simulate_drafter(draft, prompt_ids: list[int], target_tokens: list[int], budget: int, width: int,
                     vocab_size: int, eos_id: int, context_copy: bool = True) -> tuple[int, int]:
    """(committed tokens, rounds) of duo's drafter against greedy verification reproducing ``target_tokens``."""
    drafter = TreeDrafter(draft, DecodingParams(), vocab_size, frozenset({eos_id}),
                          len(prompt_ids) + len(target_tokens) + budget + 1, lambda: width, tree_attention=True,
                          context_copy=context_copy)
    drafter.prefill(list(prompt_ids))

    def play_round(done: int, room: int) -> int:
        if room == 0:
            return 0
        drafter.commit(list(prompt_ids) + target_tokens[:done])
        tree = drafter.propose(room)
        while drafter.grow_ahead(len(tree) + 1 + budget):
            pass
        return len(path_along(tree, target_tokens[done:-1]))

    return replay_greedy_rounds(len(target_tokens), budget, play_round)


def load_model(path: str, dtype):
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


@dataclass(frozen=True)
class Workload:
    """What the quality pass needs for one prompt (the target's continuation is computed once, up front)."""

    prompt_ids: list[int]
    target_tokens: list[int]
    budgets: list[int]
    widths: list[int]
    vocab_size: int
    eos_id: int


_worker_draft = None


def _load_worker_draft(draft_path: str) -> None:
    global _worker_draft
    torch.set_num_threads(1)
    _worker_draft = load_model(draft_path, "auto")


def score_prompt(work: Workload) -> dict:
    """Agreement and every round simulation for one prompt (runs in a worker process)."""
    draft = _worker_draft
    matches, positions = agreement_counts(draft, work.prompt_ids, work.target_tokens)
    chains = {k: simulate_speculative(draft, work.prompt_ids, work.target_tokens, k) for k in work.budgets}
    drafter = {
        (w, k): simulate_drafter(draft, work.prompt_ids, work.target_tokens, k, w, work.vocab_size, work.eos_id)
        for w in work.widths for k in work.budgets
    }
    return {"matches": matches, "positions": positions, "chains": chains, "drafter": drafter}


def evaluate(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    target_path = args.target or str(default_target_dir())
    draft_path = args.draft or str(default_draft_dir())
    tokenizer = AutoTokenizer.from_pretrained(target_path)
    target = load_model(target_path, torch.float32)
    draft = load_model(draft_path, "auto")
    budgets = [int(b) for b in args.budgets.split(",")]
    widths = [int(w) for w in args.drafter_widths.split(",") if w.strip()]
    eos_id = tokenizer.eos_token_id
    prompts = read_prompt_file(args.prompts)

    # Pass 1, alone on the machine: the target's continuations, and both models' time per token.
    workloads: list[Workload] = []
    target_times: list[float] = []
    draft_times: list[float] = []
    for index, prompt in enumerate(prompts):
        prompt_ids = user_prompt_ids(tokenizer, prompt)
        target_tokens, step_times = greedy_decode(target, prompt_ids, args.max_new_tokens, eos_id)
        target_times += step_times
        draft_times += greedy_decode(draft, prompt_ids, args.max_new_tokens, eos_id)[1]
        workloads.append(Workload(prompt_ids, target_tokens, budgets, widths, target.config.vocab_size, eos_id))
        print(f"[{index + 1}/{len(prompts)}] {len(target_tokens)} target tokens: {prompt[:60]}", file=sys.stderr,
              flush=True)

    # Pass 2, no timing: agreement and round simulations, one process per core.
    matches = positions = 0
    committed = {k: 0 for k in budgets}
    rounds = {k: 0 for k in budgets}
    drafter_committed = {(w, k): 0 for w in widths for k in budgets}
    drafter_rounds = {(w, k): 0 for w in widths for k in budgets}
    context = multiprocessing.get_context("spawn")
    with context.Pool(args.workers, initializer=_load_worker_draft, initargs=(draft_path,)) as pool:
        for index, scores in enumerate(pool.imap(score_prompt, workloads)):
            matches, positions = matches + scores["matches"], positions + scores["positions"]
            for k, (c, r) in scores["chains"].items():
                committed[k], rounds[k] = committed[k] + c, rounds[k] + r
            for key, (c, r) in scores["drafter"].items():
                drafter_committed[key], drafter_rounds[key] = drafter_committed[key] + c, drafter_rounds[key] + r
            print(f"[{index + 1}/{len(prompts)}] agreement {scores['matches'] / scores['positions']:.3f}: "
                  f"{prompts[index][:60]}", file=sys.stderr, flush=True)
        pool.close()  # let the workers exit on their own (terminating them leaks their semaphores)
        pool.join()

    target_ms = 1000 * statistics.median(target_times)
    draft_ms = 1000 * statistics.median(draft_times)
    return {
        "target": target_path,
        "draft": draft_path,
        "draft_dtype": str(next(draft.parameters()).dtype).replace("torch.", ""),
        "prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "threads": args.threads,
        "target_tokens": positions,
        "agreement": matches / positions,
        "mean_committed_per_round": {str(k): committed[k] / rounds[k] for k in budgets},
        "drafter_mean_committed_per_round": {
            f"width={w}": {str(k): drafter_committed[w, k] / drafter_rounds[w, k] for k in budgets} for w in widths
        },
        "target_ms_per_token": target_ms,
        "draft_ms_per_token": draft_ms,
        "draft_over_target_time": draft_ms / target_ms,
    }


def print_table(result: dict) -> None:
    print(f"draft:  {result['draft']} ({result['draft_dtype']})")
    print(f"target: {result['target']} (float32)")
    print(f"{result['prompts']} held-out prompts, greedy, up to {result['max_new_tokens']} new tokens "
          f"({result['target_tokens']} target tokens), {result['threads']} thread(s)")
    print()
    print(f"{'metric':<44}{'value':>10}")
    print("-" * 54)
    print(f"{'per-token agreement (draft argmax = target)':<44}{result['agreement']:>10.3f}")
    for k, value in result["mean_committed_per_round"].items():
        print(f"{'mean tokens committed per round, k=' + k:<44}{value:>10.2f}")
    for width, per_budget in result["drafter_mean_committed_per_round"].items():
        kind = "chains" if width == "width=1" else f"trees {width}"
        for k, value in per_budget.items():
            print(f"{'duo drafter, ' + kind + ', k=' + k:<44}{value:>10.2f}")
    print(f"{'target ms per token (median)':<44}{result['target_ms_per_token']:>10.2f}")
    print(f"{'draft ms per token (median)':<44}{result['draft_ms_per_token']:>10.2f}")
    print(f"{'draft / target time per token':<44}{result['draft_over_target_time']:>10.3f}")


def main() -> None:
    args = parse_args()
    result = evaluate(args)
    print_table(result)
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
